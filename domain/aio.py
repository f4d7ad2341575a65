"""asyncio helpers every package may use."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """Await aw for at most timeout seconds (None: no limit), raising TimeoutError after: asyncio.wait_for without
    its lost cancels.

    Python 3.11's wait_for returns the result of a wait that completed in the loop turn its task was cancelled in,
    and drops the cancel (gh-86296, fixed in 3.12): a cancelled deployment of 4000 nodes went on running, as some of
    its node tasks carried on to their next step. asyncio.timeout() keeps the cancel.
    """
    async with asyncio.timeout(timeout):
        return await aw

"""domain.aio.within: a timeout that keeps the cancel asyncio.wait_for drops on Python 3.11."""
from __future__ import annotations

import asyncio

import pytest

from domain.aio import within


async def test_within_returns_the_result_or_raises_timeout_error() -> None:
    assert await within(asyncio.sleep(0, "done"), 1) == "done"
    assert await within(asyncio.sleep(0, "no limit"), None) == "no limit"
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)


async def test_a_cancel_that_meets_a_completed_wait_is_kept() -> None:
    """The wait completes and the task is cancelled in the same loop turn: the task must still end cancelled."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    went_on = []

    async def node_step() -> None:
        await within(ready, 10)
        went_on.append("next step")  # what a lost cancel lets run
        await asyncio.sleep(0)

    task = asyncio.create_task(node_step())
    await asyncio.sleep(0)
    ready.set_result("answer")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert went_on == []

"""The clock a deployment reads its deadlines from and sleeps on, injected so that tests can move time by hand."""
from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time in seconds, and a sleep on that same time."""

    def now(self) -> float:
        """Return the current time in seconds (monotonic: only differences mean anything)."""

    async def sleep(self, seconds: float) -> None:
        """Return once seconds have passed on this clock."""


class MonotonicClock:
    """The real clock: time.monotonic and asyncio.sleep."""

    def now(self) -> float:
        """Return time.monotonic()."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep in real time."""
        await asyncio.sleep(seconds)

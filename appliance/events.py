"""The event bus: one in-process stream of the boot services' typed node records, per MAC, with bounded fan-out."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Callable

from domain.progress import NodeEvent


class Subscription:
    """A bounded queue of events for one consumer; when it is full the oldest event is dropped and counted."""

    def __init__(self, bus: "EventBus", maxsize: int, accept: Callable[[NodeEvent], bool] | None = None) -> None:
        self._bus = bus
        self.accept = accept
        self._queue: asyncio.Queue[NodeEvent] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: NodeEvent) -> None:
        if self.accept is not None and not self.accept(event):
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self) -> NodeEvent:
        """Wait for the next event."""
        return await self._queue.get()

    def get_nowait(self) -> NodeEvent | None:
        """Return the next event if one is queued."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        """Stop receiving events."""
        self._bus._subs.discard(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[NodeEvent]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[NodeEvent]:
        while True:
            yield await self._queue.get()


class EventBus:
    """Publishes node records to subscribers and keeps the last records of each MAC it is told to keep (MACs are
    lower case)."""

    def __init__(self, history: int = 32, max_macs: int = 65536, keep: Callable[[str], bool] | None = None) -> None:
        self._history = history
        self._max_macs = max_macs
        # Which MACs have a history (the inventory's: what `rackboot nodes` and the API show); None: every MAC.
        # A history is ~33 objects the cyclic GC walks at each full collection: kept for 20,000 pool clients they
        # made 100-200 ms pauses of the event loop (docs/benchmarks.md, "Where rackboot's DHCP time goes").
        self._keep = keep
        # insertion-ordered: the MAC heard from longest ago is dropped first, so random MACs (perfdhcp, a
        # hostile segment) cannot grow the history without bound
        self._last: dict[str, deque[NodeEvent]] = {}
        self._subs: set[Subscription] = set()
        self.published = 0

    def publish(self, event: NodeEvent) -> None:
        """Record and fan out one record; never blocks (the boot services' EventSink)."""
        mac = event.mac
        if self._keep is None or self._keep(mac):
            history = self._last.pop(mac, None)
            if history is None:
                history = deque(maxlen=self._history)
                if len(self._last) >= self._max_macs:
                    del self._last[next(iter(self._last))]
            self._last[mac] = history
            history.append(event)
        self.published += 1
        for sub in self._subs:
            sub._offer(event)

    def subscribe(self, maxsize: int = 10000, accept: Callable[[NodeEvent], bool] | None = None) -> Subscription:
        """Return a new subscription (only events `accept` takes, when given); use it as a context manager."""
        sub = Subscription(self, maxsize, accept)
        self._subs.add(sub)
        return sub

    def last(self, mac: str, n: int | None = None) -> list[NodeEvent]:
        """Return the last events seen for a MAC, oldest first."""
        events = list(self._last.get(mac.lower(), ()))
        return events if n is None else events[-n:]

    def macs(self) -> list[str]:
        """Return every MAC that has events."""
        return list(self._last)

"""How long the appliance's event loop stalls, for /metrics: the cyclic GC's pauses by generation, and how late a
periodic timer fires (anything that holds the loop: a slow callback, the GC, the GIL held by another thread).

Every DHCP answer, TFTP block and iPXE script waits behind a stall; a deployment of thousands of nodes is
where they show. Cost: one callback per collection (two perf_counter() calls and a bisect) and a timer
LAG_PERIOD_S apart. A thread looks every quarter of HELD_S whether that timer still runs: when the loop has been
held HELD_S, it logs what the loop's thread is doing, once per stall (a 4000-node deployment's loop stalled 22 s
once, and nothing said where).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import traceback
from typing import Any

from domain.latency import REQUEST_BUCKETS, Latency

LAG_PERIOD_S = 0.05
STALL_S = 0.25  # a timer this late counts in stalled_s: the loop read no packet for that long
HELD_S = 2.0  # the loop held this long: its thread's stack goes to the log

log = logging.getLogger("rackboot.loop")


class LoopWatch:
    """Histograms of GC pauses (per generation) and of timer lateness, with the worst of each."""

    name = "loop"

    def __init__(self, period_s: float = LAG_PERIOD_S, held_s: float = HELD_S) -> None:
        self.period_s = period_s
        self.held_s = held_s
        self._tick = time.monotonic()  # when the timer last ran
        self.held_reports = 0
        self.latency = {"gc_pause_gen0": Latency(REQUEST_BUCKETS), "gc_pause_gen1": Latency(REQUEST_BUCKETS),
                        "gc_pause_gen2": Latency(REQUEST_BUCKETS), "lag": Latency(REQUEST_BUCKETS)}
        self._pauses = [self.latency["gc_pause_gen0"], self.latency["gc_pause_gen1"], self.latency["gc_pause_gen2"]]
        self.worst = {"gc_pause_gen0": 0.0, "gc_pause_gen1": 0.0, "gc_pause_gen2": 0.0, "lag": 0.0}
        self._gc_started = 0.0
        self.stalled_s = 0.0  # the sum of the lateness of every timer at least STALL_S late
        self._installed = False

    def install(self) -> None:
        """Start timing the collector's passes (idempotent)."""
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        """Stop timing them (idempotent)."""
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        generation = min(int(info.get("generation", 0)), 2)
        self._pauses[generation].observe(pause)
        key = f"gc_pause_gen{generation}"
        if pause > self.worst[key]:
            self.worst[key] = pause

    async def watch(self) -> None:
        """Measure how late a timer of period_s fires, until cancelled; meanwhile a thread reports a held loop."""
        loop = asyncio.get_running_loop()
        lag = self.latency["lag"]
        stop = threading.Event()
        if self.held_s > 0:
            threading.Thread(target=self._report_held, args=(threading.get_ident(), stop), name="loopwatch-held",
                             daemon=True).start()
        try:
            await self._time(loop, lag)
        finally:
            stop.set()

    def _report_held(self, loop_thread: int, stop: threading.Event) -> None:
        """(Thread) Log the loop thread's stack once per stall longer than held_s."""
        reported = 0.0  # the tick whose stall was reported
        while not stop.wait(self.held_s / 4):
            tick = self._tick
            held = time.monotonic() - tick
            if held < self.held_s or tick == reported:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is None:
                return
            reported = tick
            self.held_reports += 1
            stack = "".join(traceback.format_stack(frame)[-16:])
            log.warning("the event loop has been held %.1f s; its thread is at:\n%s", held, stack)

    async def _time(self, loop: asyncio.AbstractEventLoop, lag: Latency) -> None:
        while True:
            self._tick = time.monotonic()
            expected = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            late = max(0.0, loop.time() - expected)
            lag.observe(late)
            if late >= STALL_S:
                self.stalled_s += late
            if late > self.worst["lag"]:
                self.worst["lag"] = late

    def stalled_seconds(self) -> float:
        """How long the loop has stalled so far (timers at least STALL_S late), for deadlines that skip the stalls."""
        return self.stalled_s

    def stats(self) -> dict[str, int]:
        """The worst pause and lag seen, in microseconds, and the passes per generation."""
        return ({f"{key}_max_us": round(value * 1e6) for key, value in self.worst.items()}
                | {f"gc_collections_gen{g}": self._pauses[g].count for g in range(3)})

"""LoopWatch: the event loop's stalls as /metrics shows them (GC pauses by generation, timer lateness)."""
from __future__ import annotations

import asyncio
import gc
import time

from appliance.loopwatch import LoopWatch


async def test_a_blocked_loop_and_a_full_collection_are_measured() -> None:
    watch = LoopWatch(period_s=0.01)
    watch.install()
    task = asyncio.create_task(watch.watch())
    try:
        await asyncio.sleep(0.05)
        garbage = [[i] for i in range(200_000)]  # something for the full pass to walk
        gc.collect(2)
        del garbage
        time.sleep(0.2)  # a callback that holds the loop: every timer behind it fires late
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        watch.uninstall()
    stats = watch.stats()
    assert stats["gc_collections_gen2"] >= 1 and stats["gc_pause_gen2_max_us"] > 0
    assert stats["lag_max_us"] >= 150_000, stats
    assert watch.latency["lag"].count >= 3 and watch.latency["gc_pause_gen2"].total > 0
    before = stats["gc_collections_gen2"]
    gc.collect(2)  # uninstalled: no longer counted
    assert watch.stats()["gc_collections_gen2"] == before
    watch.uninstall()  # twice is fine


async def test_a_stall_adds_up_in_stalled_seconds() -> None:
    """What the deployments' boot deadlines skip: the loop held 0.4 s counts (timers STALL_S late or more)."""
    watch = LoopWatch(period_s=0.01)
    task = asyncio.create_task(watch.watch())
    try:
        await asyncio.sleep(0.03)
        before = watch.stalled_seconds()
        time.sleep(0.4)
        await asyncio.sleep(0.03)
    finally:
        task.cancel()
    assert watch.stalled_seconds() - before >= 0.35


def _hold_the_loop_a_while() -> None:
    time.sleep(0.6)


async def test_a_held_loop_logs_where_its_thread_is(caplog) -> None:  # type: ignore[no-untyped-def]
    """Held past held_s, the loop's stack goes to the log, once for the stall (not every look of the thread)."""
    watch = LoopWatch(period_s=0.01, held_s=0.2)
    task = asyncio.create_task(watch.watch())
    with caplog.at_level("WARNING", logger="rackboot.loop"):
        try:
            await asyncio.sleep(0.05)
            _hold_the_loop_a_while()
            await asyncio.sleep(0.1)
        finally:
            task.cancel()
    held = [r for r in caplog.records if "has been held" in r.getMessage()]
    assert len(held) == 1 and watch.held_reports == 1
    assert "_hold_the_loop_a_while" in held[0].getMessage()

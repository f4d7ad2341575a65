"""The reboot window: how many nodes may be between their reset and their loaded boot files at once, adapted to
what the boot services keep up with (additive increase, multiplicative decrease, as TCP's congestion window).

A node holds a slot from its reset (or power-on) until it has its script and, for the deploy environment, its kernel
and initrd: the part of a boot where thousands of firmwares load the DHCP, TFTP and HTTP services at once. The
operator's `reboot_window` is where the window starts and its ceiling. A node whose boot shows the services are
overloaded (it got stuck between its DHCP and its loaded files, rebooted by itself, or needed more than half of those
stages' deadlines) cuts the window to half the most nodes in flight since the last cut (the load that did it; a
straggler's verdict comes late, when few are left in flight), at most once per round: only a node admitted
after the last cut can cut again, as TCP halves once per round trip (RFC 5681 sec. 3.1). A node that loaded on time
widens it by 1/window (one slot per round). A node admitted after the last cut that loaded in under 1/FAST_SHARE of
those deadlines says the services have room: it widens the window by a whole slot (the window doubles each round,
as TCP's slow start, RFC 5681 sec. 3.1, with the boot's own time as the delay signal, as TCP Vegas). Without it a
window cut to 251 by the first seconds of a 4000-node storm grew back one slot a round (a POST of a minute): 18
minutes for the first reboot of nodes whose later boots each loaded in seconds. A node that never sends DHCP after
its reset says nothing about load (a dead node, a long POST), and neither does a kexec: they leave the window as
it is. A node cuts the window at most
once in a deployment, so a few nodes whose own fault looks like load (a bad cable in the middle of TFTP) cannot
narrow it round after round. So a boot storm that misses its deadlines is not started again at the same width by
the retries.
"""
from __future__ import annotations

import asyncio
from collections import deque
from enum import Enum
from typing import Callable

from appliance.deploy.bootwatch import DEADLINE_OF, BootWatch, Stage
from appliance.deploy.workflow import BootDeadlines

# The window never shrinks below 1/FLOOR_SHARE of the operator's window, nor below 2 nodes.
FLOOR_SHARE = 64
# Admissions are paced this far apart: a node's first steps after its slot (its state and boot profile written, an
# SSH or IPMI call started: a few milliseconds) run in a loop turn of their own. Unpaced, the 4000 nodes of a window of
# 4000 took their slots in one turn and held the appliance's loop for 30 s, no DHCP answered meanwhile; paced,
# 4000 nodes are admitted in 8 s, against a POST of a minute.
ADMISSION_PACE_S = 0.002
# A boot that loaded in under 1/FAST_SHARE of its deadlines from DHCP to the boot files (100 s by default: 12.5 s) is
# fast: the services had room, and the window grows a whole slot for it.
FAST_SHARE = 8
# The stages a slot covers: until the node has its script and its boot files.
LOADING_STAGES = (Stage.RESETTING, Stage.FIRMWARE, Stage.LOADING)
# The stages whose time is the boot services' doing: from the firmware's DHCP to the loaded files.
SERVED_STAGES = (Stage.FIRMWARE, Stage.LOADING)


class Verdict(Enum):
    """What one node's boot says of the boot services' load."""

    FAST = "fast"  # on time, well inside its deadlines: the services have room
    ON_TIME = "on time"
    CONGESTED = "congested"
    SILENT = "silent"  # nothing learnt: no DHCP after the reset, a kexec, or a reset that was not issued


def boot_verdict(watch: BootWatch | None, deadlines: BootDeadlines) -> tuple[Verdict, str]:
    """Judge a boot as it leaves the window: congested if stuck, looping or slow between its DHCP and its loaded
    files, fast if well inside their deadlines; return the verdict and why."""
    if watch is None or watch.how == "kexec" or watch.boots == 0:
        return Verdict.SILENT, ""
    if watch.boots > 1:  # it came back to the firmware by itself: a TFTP or HTTP fetch failed
        return Verdict.CONGESTED, f"firmware started {watch.boots} times"
    spans: dict[str, float] = {}
    for (stage, since), (_, until) in zip(watch.history, watch.history[1:]):
        spans[stage] = spans.get(stage, 0.0) + until - since
    if watch.stage is Stage.STUCK:
        stuck_in = watch.history[-2][0] if len(watch.history) > 1 else ""
        return (Verdict.CONGESTED, watch.reason) if stuck_in in SERVED_STAGES else (Verdict.SILENT, "")
    allowed = sum(getattr(deadlines, DEADLINE_OF[s]) for s in SERVED_STAGES if s.value in spans)
    used = sum(spans.get(s.value, 0.0) for s in SERVED_STAGES)
    if used > allowed / 2:
        return Verdict.CONGESTED, f"{used:.0f} s from DHCP to its boot files, over half of {allowed:.0f} s"
    if allowed and used <= allowed / FAST_SHARE:
        return Verdict.FAST, ""
    return Verdict.ON_TIME, ""


class RebootWindow:
    """At most `limit` nodes hold a slot; the limit adapts to the verdicts of the boots that leave (AIMD)."""

    def __init__(self, ceiling: int, on_change: Callable[[int, int, str], None] | None = None,
                 pace_s: float = ADMISSION_PACE_S) -> None:
        self.ceiling = max(1, ceiling)
        self.pace_s = pace_s
        self._next_admission = 0.0  # loop time before which no node is admitted
        self.floor = min(self.ceiling, max(2, self.ceiling // FLOOR_SHARE))
        self.limit = float(self.ceiling)
        self.in_flight = 0
        self._peak = 0      # the most nodes in flight since the last cut
        self.on_change = on_change  # (old limit, new limit, why), when the limit is cut
        self.cuts = 0
        self._admitted = 0  # admissions so far: each slot's round number
        self._cut_at = 0    # admissions before the last cut: their verdicts cannot cut again
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._granted = 0   # waiters woken for a slot, not yet resumed
        self._cut_by: set[str] = set()  # the nodes whose boot cut the window once already

    async def acquire(self) -> int:
        """Wait for a slot (first come, first served, pace_s apart); return its ticket, for release."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now, self._next_admission)
        self._next_admission = at + self.pace_s
        if at > now:
            await asyncio.sleep(at - now)
        if self.in_flight + self._granted >= int(self.limit) or self._waiters:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # granted, then cancelled: the slot goes to the next
                    self._granted -= 1
                    self._wake()
                elif fut in self._waiters:  # (a release may have dropped it already: _wake)
                    self._waiters.remove(fut)
                raise
            self._granted -= 1
        self.in_flight += 1
        self._peak = max(self._peak, self.in_flight)
        self._admitted += 1
        return self._admitted

    def release(self, ticket: int, verdict: Verdict, node: str, why: str = "") -> None:
        """Give a node's slot back with what its boot said; cut or widen the limit, wake the waiters it lets in."""
        self.in_flight -= 1
        if verdict is Verdict.CONGESTED and ticket > self._cut_at and node not in self._cut_by:
            old = int(self.limit)
            self.limit = float(max(self.floor, min(old, self._peak) // 2))
            self._peak = self.in_flight
            self._cut_at = self._admitted
            self._cut_by.add(node)
            self.cuts += 1
            if self.on_change is not None and int(self.limit) != old:
                self.on_change(old, int(self.limit), f"{node}: {why}")
        elif verdict in (Verdict.FAST, Verdict.ON_TIME) and self.limit < self.ceiling:
            # Slow start only on the word of a node admitted after the last cut: the nodes of the round that was cut
            # may have loaded fast before the storm peaked.
            step = 1.0 if verdict is Verdict.FAST and ticket > self._cut_at else 1.0 / self.limit
            self.limit = min(float(self.ceiling), self.limit + step)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight + self._granted < int(self.limit):
            fut = self._waiters.popleft()
            if fut.done():  # its task was cancelled (a timeout, the deployment's cancel) and has not run since
                continue
            fut.set_result(None)
            self._granted += 1

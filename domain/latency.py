"""Latency histograms the boot services keep on their hot paths and /metrics exposes (pure, no I/O).

An observation is a bisect and two additions (well under a microsecond: docs/benchmarks.md measures what the
DHCP path pays); Prometheus' cumulative buckets are made at scrape time only.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

# Per request (a DHCP reply, a DNS answer, an iPXE script): 50 µs to 1 s.
REQUEST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Per file transfer (TFTP: an NBP or a script, lock-step or windowed, maybe under loss): 10 ms to 5 min.
TRANSFER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Latency:
    """A histogram of durations in seconds: counts per bucket (upper bounds, the last open), their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = REQUEST_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        """How many durations were observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' buckets: (upper bound, observations at or under it), ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out

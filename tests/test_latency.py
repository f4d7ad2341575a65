"""The latency histograms the services keep: buckets, sum, and Prometheus' cumulative form."""
from __future__ import annotations

from domain.latency import TRANSFER_BUCKETS, Latency


def test_observations_fall_in_their_bucket_and_add_up() -> None:
    h = Latency((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.05, 3.0):
        h.observe(seconds)
    assert h.counts == [2, 1, 1, 1]  # an observation equal to a bound counts in that bound's bucket (le)
    assert h.count == 5 and abs(h.total - 3.0535) < 1e-9
    assert h.cumulative() == [("0.001", 2), ("0.01", 3), ("0.1", 4), ("+Inf", 5)]


def test_transfer_buckets_reach_minutes() -> None:
    h = Latency(TRANSFER_BUCKETS)
    h.observe(95.0)  # a lock-step NBP under heavy loss
    assert h.cumulative()[-2] == ("300.0", 1) and h.cumulative()[-3] == ("120.0", 1)

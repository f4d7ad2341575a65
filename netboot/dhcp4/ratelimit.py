"""Token buckets per source for DHCP requests from MACs outside the inventory: pure, the time is passed in.

The source of a request is its relay agent (giaddr, RFC 2131 4.1; RFC 3046 2: a relay sets giaddr to the
address of the interface it heard the client on, so one relay is one segment) or, for a client on the
appliance's own segment (giaddr 0), the ingress: the one interface and UDP port the request came in on.
A flood of random MACs on one segment therefore spends that segment's tokens only; inventory nodes are
never looked up here.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_SOURCES = 4096  # buckets kept; the source heard from longest ago is forgotten first


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A refill rate (requests a second) and a burst (the bucket's size, at least 1)."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")


class TokenBucket:
    """One token bucket: `take(now)` spends a token if there is one, refilling at `rate` up to `burst`."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.rate = limit.rate
        self.burst = float(limit.burst)
        self.tokens = float(limit.burst)  # a new source starts with a full burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token at `now` (seconds, any monotonic origin); False when the bucket is empty."""
        elapsed = now - self.stamp
        if elapsed > 0:  # a clock going backwards refills nothing
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SourceLimiter:
    """A token bucket per source key, at most `max_sources` of them (least recently heard forgotten first)."""

    def __init__(self, limit: RateLimit, max_sources: int = MAX_SOURCES) -> None:
        self.limit = limit
        self.max_sources = max_sources
        self._buckets: dict[object, TokenBucket] = {}
        self.dropped = 0                       # requests refused, in all
        self.dropped_by: dict[object, int] = {}  # refused since the last `take_report()`, by source

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: object, now: float) -> bool:
        """True when a request from source `key` at `now` is within its rate; a refusal is counted."""
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.limit, now)
            if len(buckets) >= self.max_sources:
                del buckets[next(iter(buckets))]
        buckets[key] = bucket  # re-inserted: insertion order is recency order
        if bucket.take(now):
            return True
        self.dropped += 1
        if key in self.dropped_by or len(self.dropped_by) < self.max_sources:
            self.dropped_by[key] = self.dropped_by.get(key, 0) + 1
        return False

    def take_report(self) -> dict[object, int]:
        """Return the refusals by source since the last call, and start counting anew."""
        report, self.dropped_by = self.dropped_by, {}
        return report


def parse_rate(text: str) -> float:
    """Read a rate like '100/s', '6000/min' or '100' (a second) as requests a second; raise ValueError."""
    number, _, unit = str(text).strip().partition("/")
    per = {"": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}.get(unit.strip())
    if per is None:
        raise ValueError(f"unknown unit {unit!r} (use /s or /min)")
    value = float(number)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("the rate must be a positive number")
    return value / per

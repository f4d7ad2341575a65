"""Token buckets per source for DHCP requests from MACs outside the inventory: pure, the time is passed in.

The source of a request is, for a relayed request (giaddr set, RFC 2131 4.1), the relay's circuit: giaddr with
the relay agent information's agent circuit ID and remote ID (RFC 3046 2.0 and 3.1-3.2: the switch port or VLAN
the relay heard the client on) when the relay sends option 82, the relay (giaddr: one relay interface is one
segment, RFC 3046 2) when it does not; for a client on the appliance's own segment (giaddr 0), the ingress: the
one interface and UDP port the request came in on. A flood of random MACs on one switch port therefore spends
that port's tokens only, not those of the other ports of its relay; inventory nodes are never looked up here.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_SOURCES = 4096  # buckets kept; the source heard from longest ago is forgotten first
MAX_CIRCUITS_PER_RELAY = 256  # circuit buckets of one relay; its further circuits share the relay's bucket


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
    """A token bucket per source key, at most `max_sources` of them (least recently heard forgotten first).

    A key may belong to a group (a relay circuit to its relay): a group has at most `max_per_group` buckets of
    its own keys, and a key of a full group spends from the group's bucket instead, so keys a sender makes up
    (a relay that passes on a client's option 82) buy at most that many buckets and evict no other source's.
    """

    def __init__(self, limit: RateLimit, max_sources: int = MAX_SOURCES,
                 max_per_group: int = MAX_CIRCUITS_PER_RELAY) -> None:
        self.limit = limit
        self.max_sources = max_sources
        self.max_per_group = max_per_group
        self._buckets: dict[object, TokenBucket] = {}
        self._group_of: dict[object, object] = {}  # key -> its group, for the keys that have one
        self._members: dict[object, int] = {}      # group -> how many of its keys have a bucket
        self.dropped = 0                       # requests refused, in all
        self.dropped_by: dict[object, int] = {}  # refused since the last `take_report()`, by source

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: object, now: float, group: object = None) -> bool:
        """True when a request from source `key` (of `group`, if not None) at `now` is within its rate; a refusal
        is counted."""
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None and group is not None and self._members.get(group, 0) >= self.max_per_group:
            key, group = group, None  # the group has all the buckets it may have: this key shares the group's
            bucket = buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.limit, now)
            if len(buckets) >= self.max_sources:
                self._forget(next(iter(buckets)))
            if group is not None:
                self._group_of[key] = group
                self._members[group] = self._members.get(group, 0) + 1
        buckets[key] = bucket  # re-inserted: insertion order is recency order
        if bucket.take(now):
            return True
        self.dropped += 1
        if key in self.dropped_by or len(self.dropped_by) < self.max_sources:
            self.dropped_by[key] = self.dropped_by.get(key, 0) + 1
        return False

    def _forget(self, key: object) -> None:
        """Drop the bucket of `key` (the least recently heard), and its place in its group."""
        del self._buckets[key]
        group = self._group_of.pop(key, None)
        if group is not None:
            left = self._members[group] - 1
            if left:
                self._members[group] = left
            else:
                del self._members[group]

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

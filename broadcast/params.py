"""Tuning of a chain or tree broadcast session: what every relay of the session runs with (it travels in the hello)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from domain.errors import MalformedPacket

RELAY_PATHS = ("auto", "splice", "python")


@dataclass(frozen=True)
class ChainParams:
    """Tuning shared by every relay of a session (it travels in the hello)."""

    chunk: int = 256 * 1024  # recv size at relays
    window: int = 32 << 20  # retention window per relay (bytes kept for resuming children)
    ack_interval: float = 0.2  # seconds between acks (also the liveness heartbeat)
    stall_timeout: float = 10.0  # no ack, or no progress while data is pending, for this long: failed
    # ... for this long: suspect, and its children are fed by its parent meanwhile (0: 10 ack intervals, at least
    # 2 s, at most half the stall timeout); see broadcast.feeder
    suspect_after: float = 0.0
    connect_timeout: float = 5.0
    resume_depth: int = 2  # levels below a child whose offsets its parent tracks (2: survives any single failure locally)
    orphan_after: float = 0.0  # relay without upstream asks the source after this (0: 2 x stall_timeout)
    # the source stops waiting for the reports still missing once it has heard none for this long and feeds nobody
    # (0: 6 x stall_timeout); a safety net: a node is watched by its parent until its report is sent, so only a node
    # and its parent both dying between their reports and their children's goes unreported
    quiet_after: float = 0.0
    give_up_after: float = 0.0  # ... and fails after this (0: 6 x stall_timeout)
    source_rate: float = 0.0  # bytes/s cap per source link (0: none); for tests and shaped demos
    sink_queue: int = 8  # chunks queued for the disk writer
    # how relays forward: "auto" (kernel pipes with splice/tee where the platform and the fds allow it,
    # else copies through Python), "splice" (kernel pipes required: a relay without them refuses the
    # session, an fd refusing splice fails its connection) or "python" (always copies)
    relay_path: str = "auto"

    def __post_init__(self) -> None:
        if self.relay_path not in RELAY_PATHS:
            raise ValueError(f"relay_path must be one of {', '.join(RELAY_PATHS)}")

    def to_json(self) -> dict[str, Any]:
        """Return the params as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChainParams":
        """Rebuild params from a hello; unknown keys are refused."""
        names = {f.name: f.type for f in fields(cls)}
        if set(data) - set(names):
            raise MalformedPacket(f"params: unknown keys {sorted(set(data) - set(names))}")
        for k, v in data.items():
            if names[k] in ("str", str):
                if v not in RELAY_PATHS:
                    raise MalformedPacket(f"params: {k} must be one of {', '.join(RELAY_PATHS)}")
                continue
            kind = (int,) if names[k] in ("int", int) else (int, float)
            if isinstance(v, bool) or not isinstance(v, kind) or v < 0:
                raise MalformedPacket(f"params: {k} must be a non-negative {'integer' if kind == (int,) else 'number'}")
        p = cls(**data)
        if p.chunk < 1 or p.window < p.chunk or p.resume_depth < 1 or p.stall_timeout <= 0:
            raise MalformedPacket("params: out of range")
        return p

    @property
    def suspect_delay(self) -> float:
        """Seconds of silence (or of no progress with data pending) before a child is bypassed."""
        return min(self.suspect_after or max(2.0, 10 * self.ack_interval), self.stall_timeout / 2)

    @property
    def quiet_delay(self) -> float:
        """Seconds without any report after which the source gives up on the missing ones."""
        return self.quiet_after or 6 * self.stall_timeout

    @property
    def orphan_delay(self) -> float:
        """Seconds a relay waits for a new upstream before asking the source."""
        return self.orphan_after or 2 * self.stall_timeout

    @property
    def give_up_delay(self) -> float:
        """Seconds a relay waits for a new upstream before failing."""
        return max(self.give_up_after or 6 * self.stall_timeout, self.orphan_delay + self.stall_timeout)

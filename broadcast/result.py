"""The result every broadcast method returns, so the controller can fall back from one to another."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SOURCE_NAME = "@source"  # who reports a node the appliance could not reach or hear from

@dataclass
class NodeResult:
    """What happened to one node: ok or failed, why, how much, which checksums, how long."""

    name: str
    ok: bool = False
    reason: str = ""
    bytes_received: int = 0
    bytes_written: int = 0
    sha256: str = ""  # of the stream the node received (the catalog's image checksum)
    written_sha256: str = ""  # of the decompressed data it wrote
    durations: dict[str, float] = field(default_factory=dict)  # e.g. transfer, write, total (seconds)
    reported_by: str = ""  # the node itself, or the peer that saw it fail
    notes: list[str] = field(default_factory=list)  # e.g. "bypassed by node-3: stalled"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)

    def report_fields(self) -> dict[str, Any]:
        """The fields of the `result` message a node sends about itself (broadcast.wire schema)."""
        return {"node": self.name, "ok": self.ok, "reason": self.reason, "bytes_received": self.bytes_received,
                "bytes_written": self.bytes_written, "sha256": self.sha256, "written_sha256": self.written_sha256,
                "durations": self.durations}

    @classmethod
    def from_report(cls, msg: dict[str, Any], name: str, notes: list[str] | None = None) -> "NodeResult":
        """Rebuild node `name`'s own result from the `result` message it sent."""
        return cls(name=name, ok=msg["ok"], reason=msg["reason"], bytes_received=msg["bytes_received"],
                   bytes_written=msg["bytes_written"], sha256=msg["sha256"], written_sha256=msg["written_sha256"],
                   durations={k: float(v) for k, v in msg["durations"].items() if isinstance(v, (int, float))},
                   reported_by=name, notes=notes if notes is not None else [])


@dataclass
class BroadcastResult:
    """Per-node outcome of one broadcast of one image with one method."""

    method: str
    size: int
    sha256: str | None
    nodes: dict[str, NodeResult]
    seconds: float = 0.0
    arm_seconds: float = 0.0  # spent arming the nodes, before `seconds` (the broadcast itself) began
    counters: dict[str, int] = field(default_factory=dict)  # e.g. bypassed (suspects), orphans (fed by the source)

    @property
    def ok(self) -> list[str]:
        """Names of nodes that received, wrote and verified the image."""
        return [n for n, r in self.nodes.items() if r.ok]

    @property
    def failed(self) -> list[str]:
        """Names of nodes that did not."""
        return [n for n, r in self.nodes.items() if not r.ok]

    def merge(self, later: "BroadcastResult") -> "BroadcastResult":
        """Return this result with the nodes of a later (fallback) attempt replacing theirs here."""
        nodes = dict(self.nodes)
        for name, r in later.nodes.items():
            before = nodes.get(name)
            if before is not None and not before.ok:
                r.notes = [f"{self.method}: {before.reason}"] + r.notes
            nodes[name] = r
        counters = dict(self.counters)
        for k, v in later.counters.items():
            counters[k] = counters.get(k, 0) + v
        return BroadcastResult(method=f"{self.method}+{later.method}", size=self.size, sha256=self.sha256,
                               nodes=nodes, seconds=self.seconds + later.seconds,
                               arm_seconds=self.arm_seconds + later.arm_seconds, counters=counters)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"method": self.method, "size": self.size, "sha256": self.sha256, "seconds": self.seconds,
                "arm_seconds": self.arm_seconds, "counters": self.counters, "ok": self.ok, "failed": self.failed, "nodes": {n: r.to_json() for n, r in self.nodes.items()}}

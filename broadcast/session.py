"""A node's side of one armed broadcast session (chain, tree or star): what it was armed with, the timing
of its stream, and the result it reports.

Relays (chain, tree) and star downloads share these, so the sink a node writes through and the result it
sends upstream are built one way whatever the method.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from broadcast.image import SinkSpec, WriteReport
from broadcast.result import NodeResult


@dataclass(frozen=True)
class ArmedSession:
    """What the controller told a node (over SSH) to expect: the session, its secret, where to write."""

    session: str
    token: str
    sink: SinkSpec

    def sink_for(self, size: int | None, sha256: str | None) -> SinkSpec:
        """The armed sink, expecting the announced stream's size and checksum where the controller left them open."""
        spec = self.sink
        return SinkSpec(**{**spec.to_json(),
                           "expected_sha256": spec.expected_sha256 or sha256,
                           "expected_size": spec.expected_size if spec.expected_size is not None else size})


class StreamClock:
    """When a node's session started and its stream's first and last bytes arrived (monotonic seconds)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None

    def data(self) -> None:
        """Note that stream bytes arrived now."""
        now = time.monotonic()
        self.first = self.first or now
        self.last = now

    def durations(self) -> dict[str, float]:
        """Seconds waiting for the stream, transferring it, writing after its end, and in all."""
        now = time.monotonic()
        first = self.first or now
        last = self.last or now
        return {"wait": round(first - self.started, 6), "transfer": round(last - first, 6),
                "write_tail": round(now - last, 6), "total": round(now - self.started, 6)}


def node_result(name: str, report: WriteReport, clock: StreamClock) -> NodeResult:
    """This node's own result for a session, from its sink's write report and its stream's timing."""
    return NodeResult(name=name, ok=report.ok, reason=report.reason, bytes_received=report.bytes_received,
                      bytes_written=report.bytes_written, sha256=report.sha256, written_sha256=report.written_sha256,
                      durations=clock.durations(), reported_by=name)

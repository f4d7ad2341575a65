"""A deployment's boot stages per node (pure): the nodes' boot records and transitions in, stage segments out.

The stages are those of a node's way through a deployment, as the boot services and the controller see them:
DHCP (the firmware's or iPXE's exchange), NBP (the iPXE binary sent), script (the per-MAC iPXE script served),
kernel/initrd (fetched), agent up (the deploy environment called back), image written (the node left
BroadcastEnv with its image on disk) and installed system up (its own DHCP, then its callback or SSH). Each
segment lasts from the stage's first record until the next stage's; a node that boots again (a retry, the reboot
into its disk) starts a new run of segments. `appliance/timeline.py` draws them under the macro-steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# stage key -> (label, colour), in boot order
# (colours apart from the macro-steps' of appliance/timeline.py)
STAGES: dict[str, tuple[str, str]] = {
    "dhcp": ("DHCP", "#9c755f"),
    "nbp": ("NBP", "#edc948"),
    "script": ("script", "#b07aa1"),
    "kernel": ("kernel/initrd", "#ff9da7"),
    "agent": ("agent up", "#17becf"),
    "image": ("image written", "#bcbd22"),
    "os_boot": ("installed system booting", "#c7e9c0"),
    "os": ("installed system up", "#2e7d32"),
}
# boot record kind (domain/progress.py) -> stage
STAGE_OF_RECORD = {
    "dhcp_from_firmware": "dhcp", "nbp_sent": "nbp", "script_served": "script", "kernel_fetched": "kernel",
    "initrd_fetched": "kernel", "agent_up": "agent", "dhcp_from_os": "os_boot", "os_up": "os", "os_reachable": "os",
}
IMAGE_STEP = "BroadcastEnv"  # leaving it for another step: the image is written
FINAL = ("done", "failed")


@dataclass(frozen=True, slots=True)
class Segment:
    """One boot stage of one node: from start to end (end == start: the node's last stage, a mark)."""

    node: str
    stage: str
    start: float
    end: float
    record: str  # the record kind (or "transition") that began it

    @property
    def label(self) -> str:
        """The stage's name as the chart shows it."""
        return STAGES[self.stage][0]


def boot_records(nodes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return {node, kind, ts} per boot record of nodes as the API lists them (name, events: [{kind, ts, ...}])."""
    return [{"node": n["name"], "kind": e["kind"], "ts": float(e["ts"])}
            for n in nodes for e in n.get("events") or () if e.get("kind") in STAGE_OF_RECORD]


def _windows(transitions: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per node: from its first transition in the deployment to its final one (open while it runs)."""
    out: dict[str, tuple[float, float]] = {}
    for t in sorted(transitions, key=lambda t: t["ts"]):
        start, _ = out.get(t["node"], (float(t["ts"]), float("inf")))
        out[t["node"]] = (start, float(t["ts"]) if t["to_state"] in FINAL else float("inf"))
    return out


def _image_marks(transitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The moments nodes left the image step for another step (not for failed): their image is on disk."""
    out: list[dict[str, Any]] = []
    where: dict[str, str] = {}
    for t in sorted(transitions, key=lambda t: t["ts"]):
        node, to = t["node"], t["to_state"]
        if where.get(node) == IMAGE_STEP and to not in (IMAGE_STEP, "failed"):
            out.append({"node": node, "kind": "transition", "ts": float(t["ts"]), "stage": "image"})
        where[node] = to
    return out


def segments(transitions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, list[Segment]]:
    """Per node of the deployment: its boot-stage segments, oldest first, from the records inside its window."""
    windows = _windows(transitions)
    marks: list[dict[str, Any]] = _image_marks(transitions)
    for r in records:
        stage = STAGE_OF_RECORD.get(r["kind"])
        window = windows.get(r["node"])
        if stage and window and window[0] <= float(r["ts"]) <= window[1]:
            marks.append({**r, "stage": stage})
    by_node: dict[str, list[dict[str, Any]]] = {}
    for m in sorted(marks, key=lambda m: float(m["ts"])):
        runs = by_node.setdefault(m["node"], [])
        if runs and (runs[-1]["stage"] == m["stage"] or (runs[-1]["stage"], m["stage"]) == ("kernel", "os_boot")):
            continue  # PXE's then iPXE's DHCP, kernel then initrd, the deploy kernel's own DHCP: one stage
        runs.append(m)
    out: dict[str, list[Segment]] = {}
    for node, runs in by_node.items():
        end = windows[node][1]
        out[node] = [Segment(node, m["stage"], float(m["ts"]),
                             float(after["ts"]) if after is not None else (end if end != float("inf") else float(m["ts"])),
                             m["kind"])
                     for m, after in zip(runs, runs[1:] + [None])]
    return out

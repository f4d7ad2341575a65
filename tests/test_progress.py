"""`rackboot deploy`'s progress view fed with a deployment's log entries (as the events stream sends them)."""
from __future__ import annotations

import io
import re

from appliance.progress import DeployProgress

NODES = ["node-1", "node-2", "node-3"]
ENTRIES = [
    {"node": "", "what": "step", "step": "SetDeploymentEnv", "nodes": "node-[1-3]"},
    *({"node": n, "what": "SetDeploymentEnv", "step": "SetDeploymentEnv", "impl": "reboot", "reason": ""} for n in NODES),
    {"node": "node-2", "what": "boot", "stage": "dhcp"},
    {"node": "node-3", "what": "failed", "step": "SetDeploymentEnv", "impl": "reboot", "reason": "no DHCP within 30s after the hard reboot"},
    {"node": "", "what": "step", "step": "BroadcastEnv", "nodes": "node-[1-2]"},
    *({"node": n, "what": "BroadcastEnv", "step": "BroadcastEnv", "impl": "chain", "reason": ""} for n in NODES[:2]),
    {"node": "", "what": "broadcast", "step": "BroadcastEnv", "impl": "chain", "nodes": 2, "ok": 2, "arm_s": 0.4,
     "stream_s": 3.2, "bypassed": 1, "orphans": 1, "dropped_malformed": 0},
    {"node": "", "what": "step", "step": "BootNewEnv", "nodes": "node-[1-2]"},
    *({"node": n, "what": "BootNewEnv", "step": "BootNewEnv", "impl": "kexec", "reason": ""} for n in NODES[:2]),
    *({"node": n, "what": "done", "step": "BootNewEnv", "impl": "kexec", "reason": ""} for n in NODES[:2]),
    {"node": "", "what": "finished", "status": "done"},
]


def test_plain_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    with DeployProgress(NODES, out) as view:  # a StringIO is not a terminal: plain lines
        for entry in ENTRIES:
            view.feed(entry)
    lines = [re.sub(r"^\[\s*[\d.]+s\] ", "", line) for line in out.getvalue().splitlines()]
    assert lines == [
        "SetDeploymentEnv: node-[1-3]",
        "node-3 failed in SetDeploymentEnv/reboot: no DHCP within 30s after the hard reboot",
        "BroadcastEnv: node-[1-2]",
        "chain broadcast: 2/2 nodes (arming 0.4 s, stream 3.2 s, 1 suspects bypassed)",
        "BootNewEnv: node-[1-2]",
        "deployment done: 2 done, 1 failed",
    ]


def test_live_view_bars_counts_and_failures_as_they_happen() -> None:
    out = io.StringIO()
    view = DeployProgress(NODES, out, live=True)
    with view:
        for entry in ENTRIES[:6]:
            view.feed(entry)
        assert view._counts() == "2 SetDeploymentEnv, 1 failed"
        for entry in ENTRIES[6:]:
            view.feed(entry)
    text = out.getvalue()
    assert "node-3 failed in SetDeploymentEnv/reboot: no DHCP within 30s after the hard reboot" in text
    final = text[text.rfind("SetDeploymentEnv "):]  # the last frame of the live display
    assert re.search(r"SetDeploymentEnv\s.*2/3\s+1 failed", final), final
    assert re.search(r"BroadcastEnv\s.*2/2", final) and re.search(r"BootNewEnv\s.*2/2", final), final
    assert "2 done, 1 failed" in final


def test_entries_of_unknown_nodes_or_kinds_change_nothing() -> None:
    view = DeployProgress(NODES, io.StringIO(), live=False)
    view.feed({"node": "node-9", "what": "failed", "reason": "x"})
    view.feed({"node": "node-1", "what": "rebooting", "level": "hard"})
    view.feed({"what": "keepalive"})
    assert view.state == dict.fromkeys(NODES, "pending") and not view.failures

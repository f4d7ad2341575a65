"""The per-node timeline SVG of a deployment, from transitions as the API serves them."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from appliance.timeline import gantt_svg

SVG = "{http://www.w3.org/2000/svg}"
T0 = 1_700_000_000.0
MOVES = [
    {"node": "node-10", "ts": T0, "to_state": "SetDeploymentEnv", "impl": "reboot", "reason": ""},
    {"node": "node-2", "ts": T0, "to_state": "SetDeploymentEnv", "impl": "reboot", "reason": ""},
    {"node": "node-2", "ts": T0 + 30, "to_state": "SetDeploymentEnv", "impl": "hard_reboot", "reason": "no DHCP"},
    {"node": "node-10", "ts": T0 + 40, "to_state": "BroadcastEnv", "impl": "chain", "reason": ""},
    {"node": "node-2", "ts": T0 + 45, "to_state": "failed", "impl": "hard_reboot", "reason": "no DHCP <after> reset"},
    {"node": "node-10", "ts": T0 + 55, "to_state": "BootNewEnv", "impl": "kexec", "reason": ""},
    {"node": "node-10", "ts": T0 + 70, "to_state": "done", "impl": "kexec", "reason": ""},
]


def test_one_bar_per_stay_coloured_by_step_and_a_failure_mark_with_its_reason() -> None:
    root = ET.fromstring(gantt_svg(MOVES, "deployment d1"))  # well-formed XML (the reason's < > are escaped)
    stays = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "stay"]
    assert [(r.get("data-state"), r.findtext(f"{SVG}title")) for r in stays] == [
        ("SetDeploymentEnv", "node-2 SetDeploymentEnv/reboot: 30.0 s"),
        ("SetDeploymentEnv", "node-2 SetDeploymentEnv/hard_reboot: 15.0 s"),
        ("SetDeploymentEnv", "node-10 SetDeploymentEnv/reboot: 40.0 s"),
        ("BroadcastEnv", "node-10 BroadcastEnv/chain: 15.0 s"),
        ("BootNewEnv", "node-10 BootNewEnv/kexec: 15.0 s"),
    ]  # node-2 before node-10
    failed = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "failed"]
    assert [r.findtext(f"{SVG}title") for r in failed] == ["node-2 failed: no DHCP <after> reset"]
    xs = [float(r.get("x", 0)) + float(r.get("width", 0)) for r in stays]
    assert max(xs) <= 900  # the last node's last stay ends inside the chart


def test_no_transitions_still_draws() -> None:
    assert "no transitions" in gantt_svg([])

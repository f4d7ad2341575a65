"""The per-node timeline SVG of a deployment, from transitions as the API serves them."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from appliance.bootstages import boot_records
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


# A node's way through a deployment, as the boot services record it: the deploy environment netbooted, the image
# written, then a reboot into the installed system through the local-boot script.
BOOT = [("dhcp_from_firmware", 1), ("nbp_sent", 2), ("dhcp_from_firmware", 3), ("script_served", 4),
        ("kernel_fetched", 5), ("initrd_fetched", 7), ("dhcp_from_os", 9), ("agent_up", 12),
        ("profile_set", 30), ("dhcp_from_firmware", 42), ("nbp_sent", 43), ("script_served", 44),
        ("dhcp_from_os", 50), ("os_up", 58)]
FLOW = [{"node": "node-1", "ts": T0, "to_state": "SetDeploymentEnv", "impl": "reboot", "reason": ""},
        {"node": "node-1", "ts": T0 + 13, "to_state": "BroadcastEnv", "impl": "chain", "reason": ""},
        {"node": "node-1", "ts": T0 + 40, "to_state": "BootNewEnv", "impl": "reboot", "reason": ""},
        {"node": "node-1", "ts": T0 + 60, "to_state": "done", "impl": "reboot", "reason": ""},
        {"node": "node-2", "ts": T0, "to_state": "SetDeploymentEnv", "impl": "reboot", "reason": ""},
        {"node": "node-2", "ts": T0 + 20, "to_state": "failed", "impl": "reboot", "reason": "no script"}]


def stage_bars(svg: str) -> dict[str, list[tuple[str, float, float]]]:
    """Per node: (stage, x, x + width) of its boot-stage bars, in document order."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for r in ET.fromstring(svg).iter(f"{SVG}rect"):
        if r.get("class") == "stage":
            x, w = float(r.get("x", 0)), float(r.get("width", 0))
            out.setdefault(r.get("data-node", ""), []).append((r.get("data-stage", ""), x, x + w))
    return out


def test_the_boot_stages_of_each_node_in_order_under_its_steps() -> None:
    records = [{"node": "node-1", "kind": k, "ts": T0 + t} for k, t in BOOT]
    records += [{"node": "node-2", "kind": "dhcp_from_firmware", "ts": T0 + 2},
                {"node": "node-2", "kind": "dhcp_from_firmware", "ts": T0 - 50},   # before the deployment: not in it
                {"node": "node-1", "kind": "dhcp_from_firmware", "ts": T0 + 70}]   # after node-1 was done: neither
    svg = gantt_svg(FLOW, "deployment d2", records)
    bars = stage_bars(svg)
    assert [s for s, _, _ in bars["node-1"]] == [
        "dhcp", "nbp", "dhcp", "script", "kernel", "agent", "image", "dhcp", "nbp", "script", "os_boot", "os"]
    assert [s for s, _, _ in bars["node-2"]] == ["dhcp"]  # it never got further; its bar lasts until it failed
    # times consistent: each bar ends where the next begins, the first at the node's first record, the last at
    # its final transition, all inside the chart
    one = bars["node-1"]
    scale = (one[-1][2] - one[0][1]) / (60 - 1)
    assert abs(one[0][1] - (110 + 1 * scale)) < 0.2 and one[-1][2] <= 900
    assert all(abs(a[2] - b[1]) < 0.2 for a, b in zip(one, one[1:]))
    assert abs(bars["node-2"][0][2] - (110 + 20 * scale)) < 0.2
    # the tooltips name the stage and when it began; the legend names every stage, in boot order
    titles = [r.findtext(f"{SVG}title") for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("class") == "stage"]
    assert titles[5] == "node-1 agent up: at 12.0 s, 28.0 s" and titles[6] == "node-1 image written: at 40.0 s, 2.0 s"
    legend = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    order = ["DHCP", "NBP", "script", "kernel/initrd", "agent up", "image written", "installed system up"]
    assert [legend.index(label) for label in order] == sorted(legend.index(label) for label in order)


def test_the_api_nodes_records_feed_the_boot_stages() -> None:
    nodes = [{"name": "node-1", "events": [{"kind": "script_served", "ts": T0 + 4, "mac": "m", "detail": {}},
                                           {"kind": "profile_set", "ts": T0 + 5, "mac": "m", "detail": {}}]}]
    assert boot_records(nodes) == [{"node": "node-1", "kind": "script_served", "ts": T0 + 4}]

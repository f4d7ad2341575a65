"""Loss on the testbed's wire (nftables in the fabric namespace): nodes still boot to their script through it."""
from __future__ import annotations

import secrets
import time

import pytest

from vmtestbed.control import Control
from vmtestbed.plan import make_plan
from vmtestbed.testbed import down, start_appliance, up
from vmtestbed.topology import existing_namespaces
from vmtestbed.wireloss import dropped, ruleset


def test_the_ruleset_drops_udp_and_tcp_of_node_ports_both_ways() -> None:
    script = ruleset(0.1)
    rules = [line.strip() for line in script.splitlines() if "drop" in line]
    assert len(rules) == 8 and all("numgen random mod 1000000 < 100000 counter drop" in r for r in rules)
    assert {r.split()[0] for r in rules} == {"iifname", "oifname"} and {r.split()[1] for r in rules} == {'"n*"', '"q*"'}
    assert not [line for line in ruleset(0.0).splitlines() if "drop" in line]  # 0: the table stays, empty
    with pytest.raises(ValueError):
        ruleset(1.0)


@pytest.mark.netns
def test_nodes_boot_to_their_script_through_20_percent_loss() -> None:
    name = f"ci{secrets.token_hex(3)}"
    plan = make_plan(name, 6, 2, post_s="0.2", seed=3, wire_loss=0.2)
    try:
        result = up(plan)
        start_appliance(plan, result.files)
        with Control(plan.state_dir) as ctl:
            ctl.call("power", nodes=[n.name for n in plan.node_list], action="on")
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                stages = [n["stage"] for n in ctl.call("status")["nodes"]]
                if all(s == "script" for s in stages):
                    break
                time.sleep(0.5)
        assert stages == ["script"] * 6, stages
        assert dropped(plan.fabric_ns) > 0  # ~20 % of a few hundred frames; P(none) < 1e-9
    finally:
        down(name)
    assert existing_namespaces(plan.prefix) == []

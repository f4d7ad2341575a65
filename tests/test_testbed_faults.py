"""Injected faults act on the virtual nodes and BMCs as --faults says (no appliance needed: nothing answers DHCP)."""
from __future__ import annotations

import secrets
import subprocess
import time

import pytest

from vmtestbed.appliance_files import BMC_USER, bmc_password
from vmtestbed.control import Control
from vmtestbed.faults import assign_faults, parse_faults
from vmtestbed.plan import make_plan
from vmtestbed.testbed import down, up

pytestmark = pytest.mark.netns
SPEC = "posthang=0.2,bmcdead=0.2,die=0.2@dhcp,noreturn=0.2"


def _wait_stage(ctl: Control, node: str, stages: set[str], limit: float = 30.0) -> str:
    deadline = time.monotonic() + limit
    while True:
        stage = str(ctl.call("status", nodes=[node])["nodes"][0]["stage"])
        if stage in stages or time.monotonic() > deadline:
            return stage
        time.sleep(0.1)


def test_faults_hit_the_nodes_the_seed_picks() -> None:
    name = f"ci{secrets.token_hex(3)}"
    plan = make_plan(name, 10, 2, post_s="0.1", faults=SPEC, seed=5)
    faults = assign_faults(parse_faults(SPEC), [n.name for n in plan.node_list], 5)
    pick = {kind: next(n for n, f in faults.items() if getattr(f, attr) and sum(bool(getattr(f, a)) for a in ("posthang", "bmc_dead", "die_stage", "noreturn")) == 1)
            for kind, attr in (("posthang", "posthang"), ("bmcdead", "bmc_dead"), ("die", "die_stage"), ("noreturn", "noreturn"))}
    try:
        up(plan)
        with Control(plan.state_dir) as ctl:
            status = ctl.call("status")
            assert status["bmcs"] == 10 - sum(f.bmc_dead for f in faults.values())
            ctl.call("power", nodes=list(pick.values()), action="on")
            assert _wait_stage(ctl, pick["posthang"], {"post-hang"}) == "post-hang"
            assert _wait_stage(ctl, pick["die"], {"dead"}) == "dead"
            assert _wait_stage(ctl, pick["noreturn"], {"dhcp"}) == "dhcp"   # the first power-on works
            ctl.call("power", nodes=[pick["noreturn"], pick["posthang"]], action="reset")
            assert _wait_stage(ctl, pick["noreturn"], {"dead"}) == "dead"    # ...it never comes back from a reboot
            assert _wait_stage(ctl, pick["posthang"], {"dhcp"}) == "dhcp"    # a reset cures the POST hang
        dead_bmc = plan.node(pick["bmcdead"]).bmc_ip
        out = subprocess.run(
            ["ip", "netns", "exec", plan.appliance_ns, "ipmitool", "-I", "lanplus", "-N", "1", "-R", "1",
             "-H", dead_bmc, "-U", BMC_USER, "-P", bmc_password(plan), "power", "status"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode != 0
    finally:
        down(name)

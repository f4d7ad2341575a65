"""The deployment state machine with fake drivers: escalation, fallbacks, failures with step and reason, persisted
transitions, reboots as workflows, internal errors, deadlines on an injected clock."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.catalog import Environment
from appliance.deploy.bootwatch import DEPLOY, INSTALLED, BootWatch, Stage
from appliance.deploy.controller import Controller, OverlapError
from appliance.deploy.nodestate import FINAL, TRANSITIONS, IllegalTransition, NodeRun, NodeState, advance
from appliance.deploy.workflow import BootDeadlines, default_workflow, parse_steps
from domain.progress import (
    AgentUp, DhcpFromFirmware, DhcpFromOs, FirmwareKind, InitrdFetched, KernelFetched, OsUp, ScriptServed, Via,
)
from domain.nodes import Node
from fakes import FAST, fake_world, make_nodes

@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    deps, cluster, env, power, agent = fake_world(tmp_path, make_nodes(8))
    controller = Controller(deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=FAST))
    return controller, deps, cluster, env, power, agent


async def run_deployment(controller: Controller, nodes: list[Node], env: Environment, **kw: object) -> dict:
    serve = asyncio.create_task(controller.serve())
    try:
        dep = controller.start(nodes, env, "admin", **kw)  # type: ignore[arg-type]
        return await asyncio.wait_for(controller.tasks[dep.id], 30)
    finally:
        serve.cancel()


async def test_all_nodes_deploy_through_three_steps(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    nodes = list(deps.inventory.nodes)
    result = await run_deployment(controller, nodes, env)
    assert result["status"] == "done", result["ko"]
    assert result["ok_nodeset"] == "node-[1-8]"
    # soft reboot first (the fake agent answers), kexec into the new system, bootdev set for hard reboots only
    assert ("soft_reboot", "node-1") in agent.calls and ("kexec", "node-1") in agent.calls
    assert ("broadcast:chain", "node-8") in agent.calls and ("post_install", "node-8") in agent.calls
    assert deps.profiles.get(nodes[0].mac).kind == "local"
    stored = deps.store.get(result["id"])
    assert stored["status"] == "done" and {n["state"] for n in stored["nodes"]} == {"done"}
    steps = {(s["node"], s["step"]) for s in deps.store.steps(result["id"])}
    assert ("node-3", "BroadcastEnv") in steps and ("node-3", "BootNewEnv") in steps


async def test_unreachable_node_escalates_to_hard_then_very_hard(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    agent.no_ssh = {"node-2"}               # no SSH: soft reboot impossible, go to IPMI
    cluster.never_boot = {"node-3"}         # never comes back from any reboot
    power.state["node-4"] = "off"           # off: no soft reboot tried (no SSH to it, and an ARP timeout in a window slot)
    nodes = list(deps.inventory.nodes)[:4]
    result = await run_deployment(controller, nodes, env)
    ko = {k["node"]: k for k in result["ko"]}
    assert set(result["ok"]) == {"node-1", "node-2", "node-4"}
    assert ("soft_reboot", "node-2") in agent.calls and ("node-2", "bootdev network") in power.calls
    assert ("node-2", "reset") in power.calls  # it was on: a hard reboot resets it
    assert ("soft_reboot", "node-4") not in agent.calls and ("node-4", "on") in power.calls  # it was off: powered on
    skipped = [e for e in controller.deployments[result["id"]].log if e["node"] == "node-4" and e["what"] == "escalate"]
    assert [e["reason"] for e in skipped] == ["soft reboot skipped: the BMC reports the node off"]
    assert ko["node-3"]["step"] == "SetDeploymentEnv"
    # Silent even after its power was cut and restored: failed at once, without the next implementation
    # (hard_reboot) that could only do the same again, so the healthy nodes do not wait for it.
    assert ko["node-3"]["impl"] == "reboot"
    assert ko["node-3"]["reason"] == ("no DHCP within 0s after the soft reboot; no DHCP within 0s after the hard reboot; "
                                      "no DHCP within 0s after the very hard reboot")
    assert not any(e["node"] == "node-3" and e.get("impl") == "hard_reboot" for e in controller.deployments[result["id"]].log)
    assert ("node-3", "off") in power.calls  # very hard = off then on


async def test_dead_bmc_and_firmware_loop_are_reported_precisely(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    power.dead = {"node-1"}
    cluster.nbp_loop = {"node-2"}
    result = await run_deployment(controller, list(deps.inventory.nodes)[:3], env,
                                  workflow=replace(parse_steps("SetDeploymentEnv|hard_reboot:0:30"), deadlines=FAST))
    ko = {k["node"]: k for k in result["ko"]}
    assert "BMC does not answer" in ko["node-1"]["reason"] and ko["node-1"]["step"] == "SetDeploymentEnv"
    assert "loops fetching its boot file" in ko["node-2"]["reason"]
    assert result["ok"] == ["node-3"]


async def test_broadcast_falls_back_and_wrong_system_is_caught(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    agent.fail = {("broadcast:chain", "node-1"): "chain: stalled", ("broadcast:chain", "node-2"): "chain: died",
                  ("broadcast:tree", "node-2"): "tree: died", ("broadcast:star", "node-2"): "star: connection refused"}
    cluster.wrong_env = {"node-3"}
    result = await run_deployment(controller, list(deps.inventory.nodes)[:4], env)
    ko = {k["node"]: k for k in result["ko"]}
    assert "node-1" in result["ok"]  # chain failed, tree succeeded
    assert ko["node-2"] == {"node": "node-2", "step": "BroadcastEnv", "impl": "star", "reason": "star: connection refused"}
    assert ko["node-3"]["step"] == "BootNewEnv" and "booted 'other:1'" in ko["node-3"]["reason"]
    node1 = next(n for n in result["nodes"] if n["node"] == "node-1")
    assert node1["notes"] == ["BroadcastEnv/chain: chain: stalled"]


async def test_overlap_refused_unless_forced_and_wrong_token_ignored(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    cluster.never_boot = {"node-1", "node-2"}
    serve = asyncio.create_task(controller.serve())
    try:
        first = controller.start(list(deps.inventory.nodes)[:2], env, "admin")
        with pytest.raises(OverlapError, match=r"node-2 already in deployment"):
            controller.start([deps.inventory.by_name["node-2"]], env, "admin")
        await asyncio.sleep(0.1)
        # a callback that proves another deployment (a late one of an earlier deployment): not this node's progress
        deps.events.publish(AgentUp(deps.inventory.by_name["node-1"].mac, "d-earlier", 22, 7070))
        await asyncio.sleep(0.05)
        assert first.runs["node-1"].watch is not None and first.runs["node-1"].watch.stage is not Stage.UP
        assert controller.cancel(first.id)
        with pytest.raises(asyncio.CancelledError):
            await controller.tasks[first.id]
        assert first.status == "cancelled" and first.result()["ko"][0]["reason"] == "deployment cancelled"
        assert controller.busy(["node-1", "node-2"]) == {}
    finally:
        serve.cancel()


MAC1 = "52:54:00:77:00:01"


def test_bootwatch_table() -> None:
    w = BootWatch(DEPLOY, FAST)
    w.start(0.0)
    assert w.stage is Stage.RESETTING and w.deadline == pytest.approx(0.4)
    assert w.on_event(DhcpFromFirmware(MAC1, FirmwareKind.UEFI_PXE, 7), 0.1) and w.stage is Stage.FIRMWARE
    assert not w.on_event(KernelFetched(MAC1, "k"), 0.15)  # not expected in firmware: ignored
    assert w.on_event(ScriptServed(MAC1, "deploy", Via.TFTP), 0.2) and w.stage is Stage.LOADING
    assert not w.on_event(DhcpFromOs(MAC1), 0.25)  # the deploy environment's own client is not a reboot
    assert w.on_event(InitrdFetched(MAC1, "i"), 0.3) and w.stage is Stage.STARTING
    assert not w.on_event(OsUp(MAC1, "d1", "debian12:1"), 0.31)  # an installed system is not the deploy target
    assert w.on_tick(0.3 + 0.5) and w.stage is Stage.STUCK
    assert "deploy agent did not call back" in w.reason


def test_bootwatch_kexec_is_watched_by_the_new_kernels_own_dhcp_then_its_callback() -> None:
    w = BootWatch(INSTALLED, FAST)
    w.start(0.0, how="kexec")
    assert w.stage is Stage.KEXECING
    assert not w.on_event(AgentUp(MAC1, "d1", 22, 7070), 0.1)
    assert w.on_event(DhcpFromOs(MAC1, "debian"), 0.2) and w.stage is Stage.OS_STARTING
    assert w.on_event(OsUp(MAC1, "d1", "debian12:1"), 0.3) and w.stage is Stage.UP


def test_bootwatch_counts_a_boot_from_its_delivery_and_not_the_last_boots_records() -> None:
    """The very hard reset of a node stuck in firmware is on its way (power off, wait, on) when that stuck boot gets its
    script: not the new boot's progress. Once the reset is delivered, the first deadline runs from then."""
    w = BootWatch(DEPLOY, FAST)
    w.start(10.0, how="very hard reboot", delivered=False)
    assert not w.on_event(ScriptServed(MAC1, "deploy", Via.HTTP), 11.0) and w.stage is Stage.RESETTING
    assert not w.on_tick(100.0)  # no deadline before the delivery
    w.issued(101.0)
    assert w.deadline == pytest.approx(101.0 + FAST.dhcp_after_reset)
    assert w.on_event(DhcpFromFirmware(MAC1, FirmwareKind.BIOS_PXE, 0), 101.1) and w.stage is Stage.FIRMWARE


def test_parse_steps() -> None:
    wf = parse_steps("BroadcastEnv|star:1:900,chain:0:60&BootNewEnv|hard_reboot")
    assert [i.name for i in wf.steps[1].implementations] == ["star", "chain"]
    assert wf.steps[1].implementations[0].retries == 1 and wf.steps[1].implementations[0].timeout == 900
    with pytest.raises(ValueError, match="no implementation 'warp'"):
        parse_steps("BroadcastEnv|warp")


async def test_reboot_to_deploy_and_plain_reboot(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    agent.no_ssh = {"node-1", "node-2"}
    cluster.never_boot = {"node-2"}
    serve = asyncio.create_task(controller.serve())
    try:
        nodes = [deps.inventory.by_name[n] for n in ("node-1", "node-2")]
        results = await asyncio.wait_for(controller.reboot(nodes, "deploy", "soft", "admin"), 20)
        by = {r["node"]: r for r in results}
        assert by["node-1"]["ok"] and by["node-1"]["stage"] == "up"
        assert not by["node-2"]["ok"] and "no DHCP within" in by["node-2"]["reason"]
        plain = await asyncio.wait_for(controller.reboot([deps.inventory.by_name["node-3"]], "", "hard", "admin"), 20)
        assert plain[0]["ok"] and ("soft_reboot", "node-3") not in agent.calls
        assert controller.busy(["node-1", "node-2", "node-3"]) == {}
        with pytest.raises(ValueError):
            await controller.reboot(nodes, "", "gentle", "admin")
    finally:
        serve.cancel()


async def test_reboot_window_caps_the_nodes_in_firmware(world) -> None:  # type: ignore[no-untyped-def]
    """A window slot is held from the reset until the node fetched its script: never more than the window in firmware."""
    controller, deps, cluster, env, power, agent = world
    controller.workflow_factory = lambda method, kexec: replace(default_workflow(method, kexec), deadlines=FAST, reboot_window=2)
    cluster.firmware_s = 0.05
    result = await run_deployment(controller, list(deps.inventory.nodes), env)
    assert result["status"] == "done", result["ko"]
    assert cluster.max_in_firmware == 2


async def test_unexpected_exception_fails_the_deployment(world, caplog) -> None:  # type: ignore[no-untyped-def]
    """A bug in a driver (not a DeployError) ends the deployment failed, with the error, instead of running for ever."""
    controller, deps, cluster, env, power, agent = world
    agent.crash = {("prepare_disk", "node-2"): "disk controller on fire"}
    nodes = list(deps.inventory.nodes)[:3]
    with caplog.at_level("ERROR", logger="rackboot.deploy"):
        result = await run_deployment(controller, nodes, env)
    assert result["status"] == "failed" and result["ok"] == []
    why = "internal error: RuntimeError: disk controller on fire"
    assert result["error"] == why
    assert {k["node"]: k["reason"] for k in result["ko"]} == {n.name: why for n in nodes}
    assert any("Traceback" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    dep = controller.deployments[result["id"]]
    assert dep.log[-1]["what"] == "finished" and dep.log[-1]["status"] == "failed"
    assert await asyncio.wait_for(dep.wait_log(len(dep.log)), 1) == []  # the event stream ends at once
    stored = deps.store.get(result["id"])
    assert stored["status"] == "failed" and {n["reason"] for n in stored["nodes"]} == {why}
    assert controller.busy([n.name for n in nodes]) == {}
    await controller.close()  # nothing left to raise


async def test_every_transition_is_persisted_with_its_reason(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    agent.fail = {("broadcast:chain", "node-1"): "chain: stalled"}
    result = await run_deployment(controller, list(deps.inventory.nodes)[:2], env)
    assert result["status"] == "done", result["ko"]
    moves = [(t["from"], t["to"], t["impl"], t["reason"]) for t in deps.store.transitions(result["id"], "node-1")]
    assert moves == [
        ("pending", "SetDeploymentEnv", "reboot", ""),
        ("SetDeploymentEnv", "BroadcastEnv", "chain", ""),
        ("BroadcastEnv", "BroadcastEnv", "tree", "chain: stalled"),  # the fallback says why
        ("BroadcastEnv", "BootNewEnv", "kexec", ""),
        ("BootNewEnv", "done", "kexec", ""),
    ]
    run = controller.deployments[result["id"]].runs["node-1"]
    assert [(t.frm.value, t.to.value) for t in run.history] == [m[:2] for m in moves]
    assert all(t["ts"] > 0 for t in deps.store.transitions(result["id"]))


def test_transition_table_refuses_what_it_does_not_declare() -> None:
    run = NodeRun(make_nodes(1).nodes[0])
    with pytest.raises(IllegalTransition, match="pending -> BootNewEnv"):
        advance(run, NodeState.BOOT_NEW_ENV, 1.0)
    advance(run, NodeState.SET_DEPLOYMENT_ENV, 1.0, "SetDeploymentEnv", "reboot")
    advance(run, NodeState.FAILED, 2.0, reason="no DHCP")
    assert run.state is NodeState.FAILED and run.step == "SetDeploymentEnv" and run.reason == "no DHCP"
    for state in NodeState:
        with pytest.raises(IllegalTransition):
            advance(run, state, 3.0)  # nothing leaves a final state
    assert all(TRANSITIONS[s] for s in NodeState if s not in FINAL)


async def test_reboot_runs_as_a_recorded_workflow(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    serve = asyncio.create_task(controller.serve())
    try:
        results = await asyncio.wait_for(controller.reboot([deps.inventory.by_name["node-4"]], "local", "hard", "admin"), 20)
    finally:
        serve.cancel()
    assert results == [{"node": "node-4", "ok": True, "reason": "", "stage": "up"}]
    dep_id = next(i for i in controller.deployments if i.startswith("r"))
    stored = deps.store.get(dep_id)
    assert stored["status"] == "done" and stored["method"] == "reboot" and stored["params"]["level"] == "hard"
    assert [(t["from"], t["to"], t["impl"]) for t in deps.store.transitions(dep_id)] == [
        ("pending", "Reboot", "hard_reboot"), ("Reboot", "done", "hard_reboot")]
    assert deps.profiles.get(deps.inventory.by_name["node-4"].mac).kind == "local"


async def test_boot_deadline_expires_on_the_injected_clock(world, fake_clock) -> None:  # type: ignore[no-untyped-def]
    """A minute-long DHCP deadline expires when the fake clock is advanced, without a minute of real time."""
    controller, deps, cluster, env, power, agent = world
    slow = BootDeadlines(dhcp_after_reset=60.0)
    controller.workflow_factory = lambda method, kexec: replace(default_workflow(method, kexec), deadlines=slow)
    deps.clock = fake_clock
    cluster.never_boot = {"node-5"}
    serve = asyncio.create_task(controller.serve())
    started, t0 = asyncio.get_running_loop().time(), fake_clock.now()
    try:
        reboot = asyncio.create_task(controller.reboot([deps.inventory.by_name["node-5"]], "", "hard", "admin"))
        await asyncio.sleep(0.3)
        assert not reboot.done()  # real time passes, the fake clock does not: the node is still within its deadline
        while not reboot.done():
            fake_clock.advance(5.0)
            await asyncio.sleep(0.005)
        results = reboot.result()
    finally:
        serve.cancel()
    assert results[0]["ok"] is False and results[0]["stage"] == "stuck"
    assert results[0]["reason"] == "no DHCP within 60s after the hard reboot; no DHCP within 60s after the very hard reboot"
    assert fake_clock.now() - t0 >= 120 and asyncio.get_running_loop().time() - started < 10


async def test_forced_takeover_fails_the_node_in_the_first_deployment_only(world) -> None:  # type: ignore[no-untyped-def]
    controller, deps, cluster, env, power, agent = world
    cluster.never_boot = {"node-1", "node-2"}
    serve = asyncio.create_task(controller.serve())
    try:
        first = controller.start(list(deps.inventory.nodes)[:2], env, "admin")
        await asyncio.sleep(0.1)
        second = controller.start([deps.inventory.by_name["node-2"]], env, "admin", force=True)
        assert first.runs["node-2"].state is NodeState.FAILED
        results = await asyncio.wait_for(asyncio.gather(controller.tasks[first.id], controller.tasks[second.id]), 30)
    finally:
        serve.cancel()
    # the first deployment's attempt on node-2 ran on without bringing it back to life or crashing
    assert results[0]["status"] == "failed" and "error" not in results[0]
    assert {k["node"]: k["reason"] for k in results[0]["ko"]}["node-2"] == "taken over by a forced deployment"
    assert results[1]["ko"][0]["node"] == "node-2" and "no DHCP" in results[1]["ko"][0]["reason"]


async def test_a_stock_installed_system_is_known_up_by_ssh_without_a_callback(world) -> None:  # type: ignore[no-untyped-def]
    """Issue 10: BootNewEnv works with images that call nothing back: the controller reaches them over SSH."""
    controller, deps, cluster, env, power, agent = world
    deps.os_probe_interval = 0.05
    cluster.silent_os = {"node-1", "node-2"}
    cluster.wrong_env = {"node-2"}
    result = await run_deployment(controller, list(deps.inventory.nodes)[:3], env)
    assert sorted(result["ok"]) == ["node-1", "node-3"], result
    [ko] = result["ko"]
    assert ko["node"] == "node-2" and "booted 'other:1'" in ko["reason"]
    assert ("probe_installed", "node-1") in agent.calls
    kinds = [e.kind for e in deps.events.last(deps.inventory.by_name["node-1"].mac)]
    assert "os_reachable" in kinds and "os_up" not in kinds


async def test_a_node_through_the_last_step_is_done_at_once_and_stays_done_when_the_deployment_is_cancelled(world) -> None:  # type: ignore[no-untyped-def]
    """The slowest node does not hold the others' result: node-1 is done as soon as its installed system is up, and
    cancelling the deployment while node-2 is still stuck fails node-2 only."""
    controller, deps, cluster, env, power, agent = world
    cluster.silent_os = {"node-2"}  # its installed system never calls back: BootNewEnv waits on it
    serve = asyncio.create_task(controller.serve())
    try:
        dep = controller.start(list(deps.inventory.nodes)[:2], env, "admin")
        for _ in range(200):
            if dep.runs["node-1"].state is NodeState.DONE:
                break
            await asyncio.sleep(0.02)
        assert dep.runs["node-1"].state is NodeState.DONE and dep.runs["node-2"].state is NodeState.BOOT_NEW_ENV
        assert controller.cancel(dep.id)
        await asyncio.wait({controller.tasks[dep.id]}, timeout=10)
    finally:
        serve.cancel()
    result = dep.result()
    assert result["status"] == "cancelled"
    assert result["ok_nodeset"] == "node-1" and [k["node"] for k in result["ko"]] == ["node-2"]


async def test_a_node_that_calls_back_while_waiting_to_be_reset_again_is_up(world) -> None:  # type: ignore[no-untyped-def]
    """node-1 gets its script after its deadline (stuck in firmware) and its agent calls back while it waits for a
    window slot to be reset again: it is up, and is not reset a second time."""
    controller, deps, cluster, env, power, agent = world
    controller.workflow_factory = lambda method, kexec: replace(default_workflow(method, kexec), deadlines=FAST, reboot_window=1)
    cluster.firmware_s_of = {"node-1": 0.6}  # over FAST's 0.4 s from DHCP to the script
    cluster.firmware_s = 0.3                 # node-2 holds the one slot meanwhile
    agent.no_ssh = {"node-1"}                # node-1 straight to an IPMI reset; node-2 reboots over SSH, in its slot
    result = await run_deployment(controller, list(deps.inventory.nodes)[:2], env)
    assert result["status"] == "done", result["ko"]
    assert [op for name, op in power.calls if name == "node-1" and op in ("reset", "on", "off")] == ["reset"]  # once (it was on)
    dep = controller.deployments[result["id"]]
    assert any(e["what"] == "boot" and e.get("late") for e in dep.log if e["node"] == "node-1")


async def test_the_kexec_deadline_counts_from_when_the_kexec_got_to_the_node(world) -> None:  # type: ignore[no-untyped-def]
    """node-1's kexec waits 0.6 s for its SSH connection, over FAST's 0.4 s from the kexec to the new kernel: the
    deadline starts when the kexec is delivered, so it comes up by kexec and is not rebooted."""
    controller, deps, cluster, env, power, agent = world
    agent.delivery_s[("kexec", "node-1")] = 0.6
    result = await run_deployment(controller, list(deps.inventory.nodes)[:2], env)
    assert result["status"] == "done", result["ko"]
    dep = controller.deployments[result["id"]]
    assert not [e for e in dep.log if e["node"] == "node-1" and e["what"] == "impl_failed"]
    assert [name for op, name in agent.calls if op == "soft_reboot"].count("node-1") == 1  # the first reboot only


async def test_an_installed_system_calling_back_after_its_kexec_deadline_is_up_without_a_reboot(world) -> None:  # type: ignore[no-untyped-def]
    """node-1's installed system calls back 0.6 s after its kexec, past FAST's 0.4 s: its kexec implementation failed,
    and its callback (which spends its token) arrives while node-2's slow kexec holds the next implementation back.
    It is up: not rebooted again (the reboot would call back with a spent token, and be refused, at every level)."""
    controller, deps, cluster, env, power, agent = world
    cluster.os_callback_s_of = {"node-1": 0.6}
    agent.delivery_s[("kexec", "node-2")] = 1.0
    result = await run_deployment(controller, list(deps.inventory.nodes)[:2], env)
    assert result["status"] == "done", result["ko"]
    dep = controller.deployments[result["id"]]
    assert [e["impl"] for e in dep.log if e["node"] == "node-1" and e["what"] == "impl_failed"] == ["kexec"]
    assert [name for op, name in agent.calls if op == "soft_reboot"].count("node-1") == 1  # the first reboot only
    assert any(e["what"] == "boot" and e.get("late") for e in dep.log if e["node"] == "node-1")


async def test_a_boot_stuck_in_firmware_that_gets_its_script_while_waiting_to_be_reset_again_goes_on(world) -> None:  # type: ignore[no-untyped-def]
    """node-1 gets its script after its deadline (stuck in firmware) while node-2, loading its files, holds the one
    window slot; node-1's agent calls back only after node-2 lets the slot go. The late script is a sign its boot goes
    on: it is watched again, not power-cycled for a slot it does not need."""
    controller, deps, cluster, env, power, agent = world
    deadlines = replace(FAST, kernel_after_script=2.0, agent_after_kernel=2.0)
    controller.workflow_factory = lambda method, kexec: replace(default_workflow(method, kexec), deadlines=deadlines, reboot_window=1)
    power.state.update({"node-1": "off", "node-2": "off"})  # no soft reboot: node-1 reset first, then node-2
    cluster.firmware_s_of = {"node-1": 0.6}   # over FAST's 0.4 s from DHCP to the script
    cluster.firmware_s = 0.1
    cluster.files_s_of = {"node-2": 0.9}      # node-2 holds the slot from about 0.4 s to its initrd, about 1.4 s
    cluster.agent_s_of = {"node-1": 1.0}      # node-1's agent calls back about 1.6 s in, after that
    result = await run_deployment(controller, list(deps.inventory.nodes)[:2], env)
    assert result["status"] == "done", result["ko"]
    assert [op for name, op in power.calls if name == "node-1" and op in ("reset", "on", "off")] == ["on"]
    dep = controller.deployments[result["id"]]
    stages = [e["stage"] for e in dep.log if e["node"] == "node-1" and e["what"] == "boot"]
    assert stages[:5] == ["firmware", "stuck", "loading", "starting", "up"]  # then BootNewEnv's

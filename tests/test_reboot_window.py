"""The adaptive reboot window: the verdict of each boot on the boot services' load, the AIMD limit, and a deployment
whose retries are let in at the narrower width after a boot storm overloaded the (fake) services."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.deploy.bootwatch import DEPLOY, INSTALLED, BootWatch, Stage
from appliance.deploy.controller import Controller
from appliance.deploy.deployment import Deployment
from appliance.deploy.window import RebootWindow, Verdict, boot_verdict
from appliance.deploy.workflow import BootDeadlines, default_workflow
from domain.progress import DhcpFromFirmware, FirmwareKind, InitrdFetched, ScriptServed, Via
from fakes import FAST, FakeClock, fake_world, make_nodes

DEADLINES = BootDeadlines(dhcp_after_reset=45, script_after_dhcp=40, kernel_after_script=60)
MAC = "52:54:00:77:00:01"


def watched(*moves: tuple[float, object], how: str = "reset", target: str = DEPLOY) -> BootWatch:
    """A watch started at t=0 fed (time, record) pairs, each at its time."""
    watch = BootWatch(target, DEADLINES)
    watch.start(0.0, how=how)
    for t, record in moves:
        watch.on_event(record, t)  # type: ignore[arg-type]
    return watch


DHCP = DhcpFromFirmware(MAC, FirmwareKind.BIOS_PXE, 0)
SCRIPT = ScriptServed(MAC, "deploy", Via.HTTP, "deploy")
INITRD = InitrdFetched(MAC, "deploy/initrd.img")


def test_a_boot_that_loaded_well_within_its_deadlines_is_on_time() -> None:
    watch = watched((60, DHCP), (70, SCRIPT), (90, INITRD))  # 30 s of the 100 s allowed from DHCP to the initrd
    assert watch.stage is Stage.STARTING
    assert boot_verdict(watch, DEADLINES) == (Verdict.ON_TIME, "")
    fast = watched((60, DHCP), (61, SCRIPT), (72, INITRD))  # 12 s of 100 s: the services have room
    assert boot_verdict(fast, DEADLINES) == (Verdict.FAST, "")


def test_a_boot_that_used_over_half_its_deadlines_is_congested() -> None:
    verdict, why = boot_verdict(watched((60, DHCP), (95, SCRIPT), (120, INITRD)), DEADLINES)  # 60 s of 100 s
    assert verdict is Verdict.CONGESTED and why == "60 s from DHCP to its boot files, over half of 100 s"
    # the installed system's boot has only the script to fetch: 25 s of 40 s is slow too
    local = watched((60, DHCP), (85, ScriptServed(MAC, "local", Via.HTTP, "debian12:1")), target=INSTALLED)
    assert local.stage is Stage.LOCAL_BOOT and boot_verdict(local, DEADLINES)[0] is Verdict.CONGESTED


def test_stuck_after_its_dhcp_or_back_in_firmware_is_congested_but_silent_after_a_reset_is_not() -> None:
    stuck = watched((60, DHCP))
    stuck.on_tick(101)
    assert stuck.stage is Stage.STUCK and boot_verdict(stuck, DEADLINES) == (Verdict.CONGESTED, stuck.reason)
    again = watched((60, DHCP), (70, SCRIPT), (75, DHCP))  # the firmware came back by itself
    assert boot_verdict(again, DEADLINES) == (Verdict.CONGESTED, "firmware started 2 times")
    dead = watched()
    dead.on_tick(46)  # no DHCP at all: a dead node or a long POST, nothing about load
    assert dead.stage is Stage.STUCK and boot_verdict(dead, DEADLINES) == (Verdict.SILENT, "")
    assert boot_verdict(watched(how="kexec"), DEADLINES)[0] is Verdict.SILENT
    assert boot_verdict(None, DEADLINES)[0] is Verdict.SILENT


async def test_the_window_admits_up_to_its_limit_first_come_first_served() -> None:
    window = RebootWindow(3, pace_s=0)
    tickets = [await window.acquire() for _ in range(3)]
    order: list[int] = []

    async def wait(i: int) -> None:
        await window.acquire()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert window.in_flight == 3 and order == []
    window.release(tickets[0], Verdict.SILENT, "node-1")
    window.release(tickets[1], Verdict.SILENT, "node-2")
    await asyncio.sleep(0)
    assert order == [0, 1] and window.in_flight == 3
    waiters[2].cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert window.in_flight == 3 and not window._waiters


async def test_a_congested_boot_halves_the_window_once_a_round_and_once_a_node() -> None:
    cuts: list[tuple[int, int, str]] = []
    window = RebootWindow(128, on_change=lambda old, new, why: cuts.append((old, new, why)), pace_s=0)
    first = [await window.acquire() for _ in range(100)]  # 100 in flight: the load that did it
    window.release(first[0], Verdict.CONGESTED, "node-1", "stuck in firmware")
    assert window.limit == 50 and cuts == [(128, 50, "node-1: stuck in firmware")]
    window.release(first[1], Verdict.CONGESTED, "node-2", "slow")  # same round: admitted before the cut
    assert window.limit == 50
    for t in first[2:60]:
        window.release(t, Verdict.SILENT, "node-x")
    later = await window.acquire()  # 41 in flight now, a new round
    window.release(later, Verdict.CONGESTED, "node-1", "again")  # node-1 cut once already: its own fault, maybe
    assert window.limit == 50 and window.cuts == 1
    later = await window.acquire()
    window.release(later, Verdict.CONGESTED, "node-3", "slow")
    assert window.limit == 25 and window.cuts == 2  # half the limit it had (fewer than the 99 in flight since the cut)
    for t in first[60:]:
        window.release(t, Verdict.SILENT, "node-x")
    on_time = await window.acquire()
    window.release(on_time, Verdict.ON_TIME, "node-4")
    assert window.limit == pytest.approx(25 + 1 / 25)  # one slot a round


async def test_fast_boots_admitted_after_a_cut_grow_the_window_a_slot_each() -> None:
    window = RebootWindow(1000, pace_s=0)
    storm = [await window.acquire() for _ in range(1000)]
    window.release(storm[0], Verdict.CONGESTED, "node-0", "stuck in firmware")
    assert window.limit == 500
    window.release(storm[1], Verdict.FAST, "node-1")  # of the round that was cut: one slot a round, as ON_TIME
    assert window.limit == pytest.approx(500 + 1 / 500)
    for t in storm[2:600]:
        window.release(t, Verdict.SILENT, "node-x")
    after = [await window.acquire() for _ in range(100)]
    for i, t in enumerate(after):
        window.release(t, Verdict.FAST, f"node-{1000 + i}")  # admitted after the cut, loaded in seconds
    assert window.limit == pytest.approx(600 + 1 / 500)  # a whole slot each: the window doubles in a round
    for t in storm[600:]:
        window.release(t, Verdict.SILENT, "node-x")
    more = [await window.acquire() for _ in range(550)]
    for i, t in enumerate(more):
        window.release(t, Verdict.FAST, f"node-{2000 + i}")
    assert window.limit == 1000  # never above the operator's window


async def test_the_window_never_closes_below_its_floor() -> None:
    window = RebootWindow(256, pace_s=0)  # floor: 1/64 of it
    for i in range(10):
        t = await window.acquire()
        window.release(t, Verdict.CONGESTED, f"node-{i}", "slow")
    assert window.limit == 4 == window.floor


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    stalled = [0.0]
    deps, cluster, env, power, agent = fake_world(tmp_path, make_nodes(8), loop_stalled=lambda: stalled[0])
    return deps, cluster, env, agent, stalled


async def test_a_boot_storm_that_overloads_the_services_narrows_the_window_for_the_retries(world) -> None:  # type: ignore[no-untyped-def]
    """8 nodes reset at once where the services keep up with 3 in firmware: 5 boots die, the window is cut to 4 (half
    the 8 in flight), and the 5 retries go through 4 at a time: one dies, not 2 as with the fixed window of 8."""
    deps, cluster, env, agent, stalled = world
    agent.no_ssh = {n.name for n in deps.inventory.nodes}  # straight to IPMI resets
    cluster.overload_above, cluster.firmware_s = 3, 0.05
    controller = Controller(deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=FAST, reboot_window=8))
    serve = asyncio.create_task(controller.serve())
    try:
        dep = controller.start(list(deps.inventory.nodes), env, "admin")
        result = await asyncio.wait_for(controller.tasks[dep.id], 30)
    finally:
        serve.cancel()
    assert result["status"] == "done", result["ko"]
    cuts = [e for e in dep.log if e["what"] == "reboot_window"]
    assert [(c["was"], c["limit"]) for c in cuts][:1] == [(8, 4)]
    assert "stuck in firmware" in cuts[0]["reason"]
    assert cluster.died_in_firmware == 5 + 1


async def test_boot_deadlines_skip_the_time_the_appliance_loop_stalled(world) -> None:  # type: ignore[no-untyped-def]
    deps, cluster, env, agent, stalled = world
    clock = FakeClock(0.0)
    deps.clock = clock
    dep = Deployment("d1", list(deps.inventory.nodes)[:2], env, "admin", replace(default_workflow(), deadlines=FAST), deps)
    late, punctual = dep.runs["node-1"], dep.runs["node-2"]
    for run in (late, punctual):
        run.watch = BootWatch(DEPLOY, FAST)
        run.watch.start(0.0)
    clock.t = 0.3
    stalled[0] = 0.5  # the loop read no packet for half a second: node-1's deadline moves by as much
    dep.tick()
    punctual.watch.deadline = 0.4  # type: ignore[union-attr]  # (node-2 stands for a watch started after the stall)
    clock.t = 0.6
    dep.tick()
    assert late.watch.stage is Stage.RESETTING and late.watch.deadline == pytest.approx(0.9)  # type: ignore[union-attr]
    assert punctual.watch.stage is Stage.STUCK  # type: ignore[union-attr]
    clock.t = 0.95
    dep.tick()
    assert late.watch.stage is Stage.STUCK  # type: ignore[union-attr]


async def test_admissions_are_paced_so_a_wide_window_does_not_hold_the_loop() -> None:
    """20 nodes asking a window of 4000 at once are let in 10 ms apart, not in one loop turn."""
    window = RebootWindow(4000, pace_s=0.01)
    loop = asyncio.get_running_loop()
    admitted: list[float] = []

    async def node() -> None:
        await window.acquire()
        admitted.append(loop.time())

    started = loop.time()
    await asyncio.gather(*(node() for _ in range(20)))
    assert window.in_flight == 20
    assert admitted[-1] - started >= 19 * 0.01 * 0.9  # a limit on pacing, not a timing of the machine
    assert all(b >= a for a, b in zip(admitted, admitted[1:]))


async def test_waiters_cancelled_together_while_slots_are_released() -> None:
    """A deployment's cancel (or a step's timeout) cancels every waiting node at once; the slots their holders give
    back in the same loop turn must neither raise nor be lost (seen as InvalidStateError failing 4000 nodes)."""
    window = RebootWindow(4, pace_s=0)
    held = [await window.acquire() for _ in range(4)]
    waiters = [asyncio.create_task(window.acquire()) for _ in range(8)]
    await asyncio.sleep(0)
    for w in waiters:
        w.cancel()
    for i, t in enumerate(held):  # the holders' finally blocks, before the cancelled waiters have run
        window.release(t, Verdict.SILENT, f"node-{i}")
    await asyncio.gather(*waiters, return_exceptions=True)
    assert all(w.cancelled() for w in waiters)
    assert window.in_flight == 0 and window._granted == 0 and not window._waiters
    assert [await window.acquire() for _ in range(4)] and window.in_flight == 4


async def test_a_stuck_node_that_calls_back_late_does_not_wait_for_a_slot(world) -> None:  # type: ignore[no-untyped-def]
    """Window of one: node-1 is stuck by its deadline, then its agent calls back while node-2 holds the only slot.
    node-1 is up at once, not when node-2 gives the slot back (under a storm, minutes behind thousands of nodes)."""
    deps, cluster, env, agent, stalled = world
    agent.no_ssh = {n.name for n in deps.inventory.nodes}  # straight to IPMI resets
    cluster.firmware_s_of = {"node-1": 0.6, "node-2": 3.0}  # node-1: 0.2 s late; node-2 holds its slot for seconds
    nodes = [n for n in deps.inventory.nodes if n.name in ("node-1", "node-2")]
    controller = Controller(deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=FAST, reboot_window=1))
    serve = asyncio.create_task(controller.serve())
    try:
        dep = controller.start(nodes, env, "admin")
        await asyncio.wait_for(controller.tasks[dep.id], 60)
    finally:
        serve.cancel()
    log = [(e["node"], e["what"], e.get("late"), e.get("level")) for e in dep.log if e.get("node") in ("node-1", "node-2")]
    late_up = log.index(("node-1", "boot", True, None))
    node2_reset = log.index(("node-2", "rebooting", None, "hard"))
    node2_stuck = next(i for i, e in enumerate(log) if e[0] == "node-2" and e[1] == "escalate" and e[3] == "hard")
    assert node2_reset < late_up < node2_stuck, log
    assert dep.runs["node-1"].state.value == "done"

"""Bringing a node to a target system: the reboot ladder (soft -> hard -> very hard, or kexec), power through the
BMC (bootdev network, reset, off/on), reboot windows, and the BootWatch of each boot.

Reboots escalate soft (SSH) -> hard (IPMI reset) -> very hard (power off, then on), inside reboot windows.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from appliance.catalog import Environment
from appliance.deploy.bootwatch import INSTALLED, BootWatch, Stage
from appliance.deploy.clock import Clock
from appliance.deploy.drivers import DeployDriver, DeployError
from appliance.deploy.nodestate import NodeRun
from appliance.deploy.power import BmcAuthRefused, BmcUnreachable, PowerDriver, PowerError
from appliance.deploy.window import LOADING_STAGES, RebootWindow, Verdict, boot_verdict
from appliance.deploy.workflow import BootDeadlines
from domain.errors import RackbootError

log = logging.getLogger("rackboot.deploy")

# Which reboot levels an implementation climbs, in order.
LADDERS: dict[str, tuple[str, ...]] = {
    "reboot": ("soft", "hard", "very_hard"),
    "hard_reboot": ("hard", "very_hard"),
    "very_hard_reboot": ("very_hard",),
}
# A reboot's starting level -> the implementation that climbs from it.
LEVEL_IMPL: dict[str, str] = {"soft": "reboot", "hard": "hard_reboot", "very_hard": "very_hard_reboot"}


class Hopeless(RackbootError):
    """Nothing else can work for this node in this deployment: its BMC does not answer, or it showed no
    sign of life after a power cycle. The node fails the step at once, without the remaining
    implementations and retries, so the healthy nodes do not wait for it."""


Note = Callable[..., None]  # Journal.note(run, what, **detail)
Reached = Callable[[NodeRun, str], None]  # the installed system of a node answered SSH with this environment
PROBE_INTERVAL_S = 5.0  # how often a node booting its installed system is tried over SSH


class Rebooter:
    """Reboots nodes of one deployment and watches them boot; at most `window` of them in firmware at once."""

    def __init__(self, power: PowerDriver, agent: DeployDriver, clock: Clock, deadlines: BootDeadlines, window: int,
                 power_off_wait: float, note: Note, reached: Reached | None = None,
                 probe_interval: float = PROBE_INTERVAL_S) -> None:
        self.power = power
        self.agent = agent
        self.clock = clock
        self.deadlines = deadlines
        self.power_off_wait = power_off_wait
        self.note = note
        self.reached = reached
        self.probe_interval = probe_interval
        self.window = RebootWindow(window, on_change=self._window_cut)

    def _window_cut(self, old: int, new: int, why: str) -> None:
        log.info("reboot window cut from %d to %d nodes: %s", old, new, why)
        self.note(None, "reboot_window", limit=new, was=old, reason=why)

    async def reboot(self, run: NodeRun, level: str) -> str | None:
        """Reboot one node at a level; return None when the reboot was issued, else why not.

        Raise Hopeless when the BMC does not answer at all.
        """
        node = run.node
        if level == "soft":
            try:
                await self.agent.soft_reboot(node)
                return None
            except DeployError as exc:
                return f"soft reboot impossible: {exc}"
        if node.bmc is None or node.bmc.driver == "none":
            return f"{level} reboot impossible: no BMC in the inventory"
        try:
            try:
                # Where the driver supports it, the next boot goes to the network whatever the installed
                # OS did to the boot order, so the appliance keeps control of the node.
                await self.power.set_boot_device(node, "network", persistent=False)
            except (BmcUnreachable, BmcAuthRefused):
                raise
            except PowerError as exc:
                run.notes.append(f"bootdev network not set: {exc}")
            if level == "hard":
                state = await self.power.power(node, "status")
                await self.power.power(node, "reset" if state == "on" else "on")
            else:
                await self.power.power(node, "off")
                await self.clock.sleep(self.power_off_wait)
                await self.power.power(node, "on")
        except (BmcUnreachable, BmcAuthRefused) as exc:  # no other level does better with a silent BMC or refused credentials
            raise Hopeless(f"{level} reboot failed: {exc}") from exc
        except PowerError as exc:
            return f"{level} reboot failed: {exc}"
        return None

    async def boot(self, run: NodeRun, target: str, levels: tuple[str, ...], kexec_env: Environment | None = None) -> str | None:
        """Bring a node to target (deploy env, installed system, netboot), by kexec into kexec_env if given,
        else climbing reboot levels; None when up, else the reason of every level.

        Raise Hopeless when the BMC does not answer or the node stays silent after a power cycle.
        """
        reasons: list[str] = []
        try:
            return await self._climb(run, target, levels, kexec_env, reasons)
        except Hopeless as exc:
            raise Hopeless("; ".join([*reasons, str(exc)])) from None

    async def _wait(self, run: NodeRun, until: Callable[[BootWatch], bool]) -> None:
        watch = run.watch
        assert watch is not None
        while not until(watch):
            await run.changed.wait()
            run.changed.clear()

    def _watch(self, run: NodeRun, target: str, how: str) -> BootWatch:
        watch = BootWatch(target, self.deadlines)
        run.watch = watch
        watch.start(self.clock.now(), how=how, delivered=False)  # the first deadline starts at watch.issued()
        return watch

    async def _climb(self, run: NodeRun, target: str, levels: tuple[str, ...], kexec_env: Environment | None,
                     reasons: list[str]) -> str | None:
        attempts = (("kexec",) if kexec_env is not None else ()) + levels
        # The watch of the node's last boot to this target: a stuck boot of the installed system kept from the last
        # implementation (steps._attempts), whose system may still call back while this one waits for a slot.
        kept = run.watch
        last = kept if target == INSTALLED and kept is not None and kept.target == target and kept.done else None
        for level in attempts:
            if level == "soft" and await self._powered_off(run):
                why = "soft reboot skipped: the BMC reports the node off"
                reasons.append(why)
                self.note(run, "escalate", level=level, reason=why)
                continue
            why: str | None = None
            # A window slot is held from the reset until the node has its iPXE script and, for the deploy environment,
            # its kernel and initrd (or is stuck): at most `window` nodes are in POST, DHCP, TFTP and HTTP at once, the
            # unreliable part under load, and the window narrows when their boots show the services overloaded
            # (appliance.deploy.window). A node waiting for a slot has no deadline running. Kexec'ing nodes take slots
            # too, until the new kernel is on the network: hundreds of systems starting at once is a DHCP storm of its own.
            ticket = await self._next_slot(run, last, reasons)
            if ticket is None:  # it called back late, while waiting for this slot
                run.watch = last
                self.note(run, "boot", stage=Stage.UP.value, late=True)
                return None
            verdict, slow = Verdict.SILENT, ""
            try:
                if level == "kexec":
                    assert kexec_env is not None
                    watch = self._watch(run, target, "kexec")
                    try:
                        await self.agent.kexec(run.node, kexec_env)
                    except DeployError as exc:
                        why = f"kexec failed: {exc}"
                    else:
                        watch.issued(self.clock.now())
                        self.note(run, "rebooting", level=level, target=target)
                        await self._wait(run, lambda w: w.done or w.stage is not Stage.KEXECING)
                else:
                    watch = self._watch(run, target, f"{level.replace('_', ' ')} reboot")
                    why = await self.reboot(run, level)
                    if why is None:
                        watch.issued(self.clock.now())
                        self.note(run, "rebooting", level=level, target=target)
                        await self._wait(run, lambda w: w.done or w.stage not in LOADING_STAGES)
                        verdict, slow = boot_verdict(run.watch, self.deadlines)
            finally:
                self.window.release(ticket, verdict, run.node.name, slow)
            if why is not None:
                run.watch = None
                reasons.append(why)
                if level != "kexec":
                    self.note(run, "escalate", level=level, reason=why)
                continue
            probe = None
            if target == INSTALLED and self.reached is not None:
                probe = asyncio.get_running_loop().create_task(self._probe(run))
            try:
                await self._wait(run, lambda w: w.done)
            finally:
                if probe is not None:
                    probe.cancel()
            watch = last = run.watch
            assert watch is not None
            if watch.stage is Stage.UP:
                return None
            if level == "very_hard" and watch.stage is Stage.STUCK and watch.boots == 0:
                # Power cut and restored, and not one DHCP packet: no other reboot will do better.
                raise Hopeless(watch.reason)
            reasons.append(watch.reason)
            self.note(run, "escalate", level=level, reason=watch.reason)
        return "; ".join(reasons) if reasons else "no way to reboot"


    async def _powered_off(self, run: NodeRun) -> bool:
        """Whether the node's BMC reports it off, asked before a soft reboot and outside the window: a node that is off
        has no system to take SSH, and each try would hold a slot through an ARP timeout (3 s; 4000 nodes off, as a
        new rack or a testbed starts, queued minutes behind those tries). Unknown (no BMC, an error) is not off."""
        node = run.node
        if node.bmc is None or node.bmc.driver == "none":
            return False
        try:
            return await self.power.power(node, "status") == "off"
        except PowerError:  # the soft reboot is tried; the hard one says what the BMC does
            return False

    async def _next_slot(self, run: NodeRun, last: BootWatch | None, reasons: list[str]) -> int | None:
        """A window slot for the next level; None when the last boot (stuck) came up meanwhile. A stuck boot that goes
        on while it waits (its script, its files or its system came late) is watched again, no reset sent: slow, not
        stuck (4000 nodes: 1267 first boots stuck in firmware by their starved TFTP were power-cycled, a POST more)."""
        while True:
            ticket = await self._slot(run, last)
            if ticket is not None or last is None or last.stage is Stage.UP:
                return ticket
            await self._wait(run, lambda w: w.done)  # its stages are in the log as they come (Deployment.on_event)
            if last.stage is Stage.UP:
                return None
            reasons.append(last.reason)
            self.note(run, "escalate", level="late", reason=last.reason)

    async def _slot(self, run: NodeRun, last: BootWatch | None) -> int | None:
        """A window slot for the next level; None, without waiting for one, as soon as the last boot (stuck) is not
        stuck any more: it called back late, or went on. Under a boot storm the wait is minutes (4000 nodes: 485
        late callbacks waited for a slot they did not need, behind thousands of nodes not yet reset)."""
        if last is None:
            return await self.window.acquire()
        acquiring = asyncio.ensure_future(self.window.acquire())
        try:
            while last.stage is Stage.STUCK and not acquiring.done():
                changed = asyncio.ensure_future(run.changed.wait())
                try:
                    await asyncio.wait((acquiring, changed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if run.changed.is_set():
                    run.changed.clear()
        except BaseException:  # cancelled (a timeout, the deployment's cancel): a slot granted meanwhile goes back
            self._drop_slot(acquiring, run)
            raise
        if last.stage is not Stage.STUCK:
            self._drop_slot(acquiring, run)
            return None
        return acquiring.result()

    def _drop_slot(self, acquiring: asyncio.Future[int], run: NodeRun) -> None:
        """Give back the slot being acquired: cancel the wait, or release the slot if it was taken already."""
        if not acquiring.done():
            acquiring.cancel()  # RebootWindow.acquire hands a slot granted but not yet taken to the next waiter
        elif not acquiring.cancelled() and acquiring.exception() is None:
            self.window.release(acquiring.result(), Verdict.SILENT, run.node.name)

    async def _probe(self, run: NodeRun) -> None:
        """Try the node's installed system over SSH until it answers with its stamp, as Kadeploy checks a node:
        once it has left the firmware (local boot or kexec), every probe_interval seconds."""
        assert self.reached is not None
        while True:
            await self.clock.sleep(self.probe_interval)
            watch = run.watch
            if watch is None or watch.done:
                return
            if watch.stage not in (Stage.LOCAL_BOOT, Stage.KEXECING, Stage.OS_STARTING):
                continue
            try:
                env = await self.agent.probe_installed(run.node)
            except DeployError:
                continue
            if env:
                self.reached(run, env)
                return


def describe_watch(run: NodeRun) -> str:
    """Return ' (stage)' for the boot being watched, or '' (for timeout messages)."""
    return f" ({run.watch.stage.value})" if run.watch else ""

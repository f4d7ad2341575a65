"""Watching one node boot, as a state table with a deadline per wait state (pure: events and ticks in).

A reboot is only as good as what the boot services see next: DHCP from the firmware, the NBP over TFTP,
the per-MAC script, kernel and initrd, then the callback of what booted (`domain.progress` records). Each stage has its own short
deadline, so a node that never sends DHCP after a reset, or loops fetching its NBP, is known in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from appliance.deploy.workflow import BootDeadlines
from domain.progress import (
    AgentUp,
    DhcpFromFirmware,
    DhcpFromOs,
    InitrdFetched,
    NbpSent,
    NodeEvent,
    OsReachable,
    OsUp,
    ScriptServed,
)


class Stage(StrEnum):
    """Where a booting node is."""

    RESETTING = "resetting"    # reset issued; waiting for the firmware's DHCP
    FIRMWARE = "firmware"      # DHCP seen; waiting for the per-MAC script
    LOADING = "loading"        # deploy script fetched; waiting for kernel and initrd
    STARTING = "starting"      # kernel and initrd fetched; waiting for the deploy agent's callback
    LOCAL_BOOT = "local_boot"  # local-boot script fetched; waiting for the installed system's callback
    KEXECING = "kexecing"      # kexec issued; waiting for the new kernel's DHCP or callback
    OS_STARTING = "os_starting"  # the booted system's own DHCP client seen; waiting for its callback
    UP = "up"                  # the expected system called back with the right token
    STUCK = "stuck"            # a deadline passed; reason says where


DEPLOY = "deploy"        # target: the deploy environment (RAM-disk system with the agent)
INSTALLED = "installed"  # target: the installed system on local disk
NETBOOT = "netboot"      # target: just back in network boot (the per-MAC script fetched), for plain reboots

# (stage, record type) -> next stage: the watch is a lookup on the boot services' records. Targets that
# differ are spelled out; anything absent is ignored.
TRANSITIONS: dict[tuple[Stage, type], Stage | dict[str, Stage]] = {
    (Stage.RESETTING, DhcpFromFirmware): Stage.FIRMWARE,
    (Stage.RESETTING, NbpSent): Stage.FIRMWARE,
    (Stage.RESETTING, ScriptServed): {DEPLOY: Stage.LOADING, INSTALLED: Stage.LOCAL_BOOT, NETBOOT: Stage.UP},
    (Stage.FIRMWARE, ScriptServed): {DEPLOY: Stage.LOADING, INSTALLED: Stage.LOCAL_BOOT, NETBOOT: Stage.UP},
    (Stage.LOADING, InitrdFetched): Stage.STARTING,
    # A node that shows up in firmware again after its script rebooted on its own: start over, counted.
    (Stage.LOADING, DhcpFromFirmware): Stage.FIRMWARE,
    (Stage.STARTING, DhcpFromFirmware): Stage.FIRMWARE,
    (Stage.LOCAL_BOOT, DhcpFromFirmware): Stage.FIRMWARE,
    (Stage.KEXECING, DhcpFromFirmware): Stage.FIRMWARE,
    (Stage.OS_STARTING, DhcpFromFirmware): Stage.FIRMWARE,
    # The kexec'd kernel or the locally booted system is on the network: it has its own deadline to call back.
    (Stage.KEXECING, DhcpFromOs): Stage.OS_STARTING,
    (Stage.LOCAL_BOOT, DhcpFromOs): Stage.OS_STARTING,
}
# The callback of the expected system (its one-time token already checked by the HTTP service) ends the boot.
for _stage in (Stage.RESETTING, Stage.FIRMWARE, Stage.LOADING, Stage.STARTING, Stage.LOCAL_BOOT, Stage.KEXECING, Stage.OS_STARTING):
    TRANSITIONS[(_stage, AgentUp)] = {DEPLOY: Stage.UP}
    TRANSITIONS[(_stage, OsUp)] = {INSTALLED: Stage.UP}
# A callback after a deadline: the node was slow, not stuck. It counts as long as no other reset was issued (the
# Rebooter looks before each level): under a boot storm a node stuck by a few seconds waits minutes for a window
# slot to be reset, and its agent calls back meanwhile (4000 nodes: hundreds were reset again for nothing).
TRANSITIONS[(Stage.STUCK, AgentUp)] = {DEPLOY: Stage.UP}
TRANSITIONS[(Stage.STUCK, OsUp)] = {INSTALLED: Stage.UP}
# So does a sign that the boot went on (its script, its files, its system's own DHCP): the Rebooter watches it again
# instead of resetting it, with the next stage's deadline. DHCP from firmware is not one (a node that loops).
TRANSITIONS[(Stage.STUCK, ScriptServed)] = {DEPLOY: Stage.LOADING, INSTALLED: Stage.LOCAL_BOOT, NETBOOT: Stage.UP}
TRANSITIONS[(Stage.STUCK, InitrdFetched)] = {DEPLOY: Stage.STARTING}
TRANSITIONS[(Stage.STUCK, DhcpFromOs)] = {INSTALLED: Stage.OS_STARTING}
# Or the installed system answers SSH with the environment stamped in it (checked once it has left the firmware).
for _stage in (Stage.LOCAL_BOOT, Stage.KEXECING, Stage.OS_STARTING):
    TRANSITIONS[(_stage, OsReachable)] = {INSTALLED: Stage.UP}

# How long each wait state may last, by BootDeadlines field.
DEADLINE_OF: dict[Stage, str] = {
    Stage.RESETTING: "dhcp_after_reset",
    Stage.FIRMWARE: "script_after_dhcp",
    Stage.LOADING: "kernel_after_script",
    Stage.STARTING: "agent_after_kernel",
    Stage.LOCAL_BOOT: "os_after_script",
    Stage.KEXECING: "kexec_alive",
    Stage.OS_STARTING: "callback_after_os_dhcp",
}

STUCK_REASON: dict[Stage, str] = {
    Stage.RESETTING: "no DHCP within {d:.0f}s after the {how}",
    Stage.FIRMWARE: "stuck in firmware: DHCP seen but no iPXE script within {d:.0f}s",
    Stage.LOADING: "iPXE script fetched but kernel/initrd not fetched within {d:.0f}s",
    Stage.STARTING: "kernel and initrd loaded but the deploy agent did not call back within {d:.0f}s",
    Stage.LOCAL_BOOT: "local boot started but the installed system did not call back within {d:.0f}s",
    Stage.KEXECING: "no DHCP nor callback within {d:.0f}s after the kexec: the new kernel did not come up",
    Stage.OS_STARTING: "the booted system sent DHCP but did not call back within {d:.0f}s",
}


@dataclass
class BootWatch:
    """One node's boot towards a target, with the current stage, its deadline and what was seen."""

    target: str
    deadlines: BootDeadlines
    how: str = "reset"
    stage: Stage = Stage.RESETTING
    since: float = 0.0
    deadline: float = 0.0
    nbp_count: int = 0
    boots: int = 0
    reason: str = ""
    history: list[tuple[str, float]] = field(default_factory=list)
    delivered: bool = True  # the reset or kexec reached the node: its records are this boot's from now on

    def start(self, now: float, how: str = "reset", delivered: bool = True) -> None:
        """Begin watching: after a reset (firmware boot) or a kexec (straight to the callback). Not yet delivered,
        the first deadline and the node's records wait for issued()."""
        self.how = how
        self.nbp_count = 0
        self.reason = ""
        self._enter(Stage.KEXECING if how == "kexec" else Stage.RESETTING, now)
        self.delivered = delivered
        if not delivered:
            self.deadline = float("inf")

    def issued(self, now: float) -> None:
        """The reset or kexec was delivered now: the first deadline counts from here. The command may have waited
        for its BMC or for an SSH connection to the agent (4000 nodes: kexecs queued 26 s behind the SSH bound, and
        their 30 s after the kexec ran out 4 s after it), and the node cannot have started before it got it."""
        self.delivered = True
        if self.stage in (Stage.RESETTING, Stage.KEXECING):
            key = DEADLINE_OF[self.stage]
            self.since = now
            self.deadline = now + getattr(self.deadlines, key)

    def _enter(self, stage: Stage, now: float) -> None:
        if stage is Stage.FIRMWARE and self.stage is not Stage.FIRMWARE:
            self.boots += 1
        self.stage = stage
        self.since = now
        key = DEADLINE_OF.get(stage)
        self.deadline = now + getattr(self.deadlines, key) if key else float("inf")
        self.history.append((stage.value, now))

    @property
    def done(self) -> bool:
        """True once the node is up or stuck."""
        return self.stage in (Stage.UP, Stage.STUCK)

    def on_event(self, event: NodeEvent, now: float) -> bool:
        """Apply one of the node's records; return True when the stage changed."""
        if self.stage is Stage.UP or not self.delivered:
            # Before the reset or kexec reached the node, its records are the last boot's: a boot stuck in firmware
            # that got its script while its very hard reset was on its way moved the new watch to LOADING, and the
            # power cycle then left it "stuck" 60 s later, failing a healthy node (4000 nodes, 5 of them).
            return False
        kind = type(event)
        if kind is NbpSent and self.stage is not Stage.STUCK:
            self.nbp_count += 1
            if self.nbp_count >= self.deadlines.nbp_loop_limit and self.stage in (Stage.RESETTING, Stage.FIRMWARE):
                self.reason = f"loops fetching its boot file: NBP sent {self.nbp_count} times without the iPXE script"
                self._enter(Stage.STUCK, now)
                return True
        nxt = TRANSITIONS.get((self.stage, kind))
        if isinstance(nxt, dict):
            nxt = nxt.get(self.target)
        if nxt is None or nxt is self.stage:
            return False
        if nxt is Stage.FIRMWARE and self.stage is not Stage.RESETTING:
            # DHCP from firmware again: the node rebooted by itself in the middle of a boot
            self.nbp_count = 0
        self._enter(nxt, now)
        return True

    def postpone(self, seconds: float) -> None:
        """Move the deadline later by seconds (time the appliance could not read the node's packets)."""
        if not self.done:
            self.deadline += seconds

    def on_tick(self, now: float) -> bool:
        """Check the deadline; return True when the node just became stuck."""
        if self.done or now < self.deadline:
            return False
        d = self.deadline - self.since
        self.reason = STUCK_REASON[self.stage].format(d=d, how=f"{self.how}")
        self._enter(Stage.STUCK, now)
        return True

"""The workflow declared as data: macro-steps, each an ordered list of implementations with timeouts and retries.

Like Kadeploy3: SetDeploymentEnv, BroadcastEnv, BootNewEnv. Nodes that fail an implementation (after its
retries) are handed to the next implementation of the same macro-step; nodes that fail the last one are
reported failed with that step and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

MACRO_STEPS = ("SetDeploymentEnv", "BroadcastEnv", "BootNewEnv")
REBOOT = "Reboot"  # the one macro-step of a reboot workflow (implementations: reboot, hard_reboot, very_hard_reboot)

# What each macro-step may be implemented by.
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "SetDeploymentEnv": ("reboot", "hard_reboot"),
    "BroadcastEnv": ("chain", "tree", "star"),
    "BootNewEnv": ("kexec", "reboot", "hard_reboot"),
}


@dataclass(frozen=True)
class Implementation:
    """One way of doing a macro-step: its name, a timeout that grows with the node count, and retries."""

    name: str
    timeout: float
    per_node: float = 0.0
    retries: int = 1

    def timeout_for(self, n_nodes: int) -> float:
        """Return the step timeout for n nodes (base + per-node growth)."""
        return self.timeout + self.per_node * n_nodes


@dataclass(frozen=True)
class MacroStep:
    """A macro-step and its implementations, tried in order."""

    name: str
    implementations: tuple[Implementation, ...]


@dataclass(frozen=True)
class BootDeadlines:
    """How long a node may stay in each wait state of a boot before it is escalated or failed.

    These are what makes a node stuck in firmware visible in seconds: the boot services report every
    DHCP, NBP and script request, so each stage has its own short deadline instead of one long timeout.
    """

    dhcp_after_reset: float = 45.0    # POST + firmware until the first DISCOVER
    script_after_dhcp: float = 40.0   # DHCP -> NBP over TFTP -> iPXE -> per-MAC script
    kernel_after_script: float = 60.0  # script -> kernel and initrd fetched
    agent_after_kernel: float = 180.0  # kernel boot -> deploy agent calls back
    os_after_script: float = 240.0    # local boot -> installed system calls back
    kexec_alive: float = 30.0         # kexec -> the new kernel's DHCP (or its callback), no firmware involved
    callback_after_os_dhcp: float = 180.0  # a booted system's own DHCP -> its callback
    nbp_loop_limit: int = 4           # NBP sent this many times without a script: the node loops in firmware


@dataclass(frozen=True)
class Workflow:
    """The whole workflow of a deployment."""

    steps: tuple[MacroStep, ...]
    deadlines: BootDeadlines = field(default_factory=BootDeadlines)
    reboot_window: int = 100          # at most this many nodes power-cycled at once
    reboot_to: str = ""               # a reboot workflow's target: "" (netboot as is), deploy, local or an environment


def default_workflow(broadcast: str = "chain", kexec: bool = True) -> Workflow:
    """Return the default workflow; the chosen broadcast method goes first, the others are fallbacks."""
    if broadcast not in IMPLEMENTATIONS["BroadcastEnv"]:
        raise ValueError(f"unknown broadcast method {broadcast!r}")
    order = [broadcast] + [m for m in ("chain", "tree", "star") if m != broadcast]
    boot_new = (["kexec"] if kexec else []) + ["reboot", "hard_reboot"]
    return Workflow(
        steps=(
            MacroStep("SetDeploymentEnv", (Implementation("reboot", 300, 0.5, 1), Implementation("hard_reboot", 300, 0.5, 0))),
            MacroStep("BroadcastEnv", tuple(Implementation(m, 600, 1.0, 0) for m in order)),
            MacroStep("BootNewEnv", tuple(Implementation(m, 300, 0.5, 0) for m in boot_new)),
        )
    )


def parse_steps(spec: str, base: Workflow | None = None) -> Workflow:
    """Parse Kadeploy-like step overrides: 'SetDeploymentEnv|reboot:2:300&BroadcastEnv|chain:0:600,star:1:900'.

    Each macro-step named replaces its implementations: NAME|IMPL:RETRIES:TIMEOUT[,IMPL:RETRIES:TIMEOUT...].
    """
    wf = base or default_workflow()
    steps = {s.name: s for s in wf.steps}
    for part in filter(None, spec.split("&")):
        name, _, impls = part.partition("|")
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown macro-step {name!r} (expected one of {', '.join(MACRO_STEPS)})")
        parsed = []
        for item in filter(None, impls.split(",")):
            fields = item.split(":")
            if fields[0] not in IMPLEMENTATIONS[name]:
                raise ValueError(f"{name} has no implementation {fields[0]!r} (expected one of {', '.join(IMPLEMENTATIONS[name])})")
            retries = int(fields[1]) if len(fields) > 1 else 0
            timeout = float(fields[2]) if len(fields) > 2 else 300.0
            parsed.append(Implementation(fields[0], timeout, 0.0, retries))
        if not parsed:
            raise ValueError(f"{name}: no implementation given")
        steps[name] = MacroStep(name, tuple(parsed))
    return replace(wf, steps=tuple(steps[n] for n in MACRO_STEPS))


def reboot_workflow(impl: str, to: str, base: Workflow | None = None) -> Workflow:
    """Return the workflow of a reboot: one Reboot macro-step whose implementation (reboot, hard_reboot or
    very_hard_reboot) is the ladder to climb, towards `to`; deadlines and window from base."""
    wf = base or default_workflow()
    return replace(wf, steps=(MacroStep(REBOOT, (Implementation(impl, 3600.0, 1.0, 0),)),), reboot_to=to)

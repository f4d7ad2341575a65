"""The boot profiles a deployment gives its nodes: the deploy environment (with the `rackboot.*` kernel
command line the deploy agent reads, and no secret: the agent claims its token at its first callback) and
the installed system."""
from __future__ import annotations

from appliance.catalog import Environment
from domain.nodes import Node
from domain.profiles import BootProfile


def deploy_profile(base: BootProfile, node: Node, dep_id: str, env: Environment) -> BootProfile:
    """Return the deploy environment's profile for one node: base plus what its agent reads from /proc/cmdline."""
    # broadcast.agent.AgentConfig.from_cmdline reads these; {callback} is filled in by the script renderer.
    cmdline = (f"{base.cmdline} rackboot.name={node.name} rackboot.mac={node.mac} rackboot.ip={node.ip} "
               f"rackboot.callback={{callback}} rackboot.deployment={dep_id}").strip()
    return BootProfile(kind="deploy", kernel=base.kernel, initrds=base.initrds, cmdline=cmdline, env=env.ref,
                       params={**base.params, "deployment": dep_id})


def installed_profile(env: Environment) -> BootProfile:
    """Return the profile that boots env once installed: its kernel over the network, or the local disk."""
    if env.boot_kind == "kernel":
        return BootProfile(kind="kernel", kernel=env.kernel, initrds=(env.initrd,) if env.initrd else (),
                           cmdline=env.cmdline, env=env.ref)
    return BootProfile(kind="local", env=env.ref)

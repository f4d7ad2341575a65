"""Packet loss on the wire of a testbed: nftables drops a fraction of the nodes' UDP and TCP frames, both ways.

This kernel has no sch_netem, so loss is an nftables rule in the bridge family of the fabric namespace: on the
forward hook, a frame that enters or leaves a node's port (nK, or a QEMU VM's tap qK) on its rack bridge is
dropped with probability P (`numgen random`), UDP (DHCP, TFTP, DNS) and TCP (HTTP, SSH) alike; ARP and the
uplinks between bridges are left alone, so each packet meets the rule once per direction. Unlike the simulated
firmware's own `loss=` fault, this loses the server's answers too and works for QEMU VMs.

One rule per direction, port kind and protocol: this kernel's nf_tables refuses anonymous sets in the bridge
family ("Operation not supported"), so `{ udp, tcp }` is written out.
"""
from __future__ import annotations

import re
import subprocess

TABLE = "rackboot_wireloss"
_PORTS = ("n*", "q*")  # namespace nodes' ports, QEMU VMs' taps (vmtestbed.topology, vmtestbed.qemunodes)


class WireLossError(RuntimeError):
    """nft refused the ruleset or could not be run."""


def ruleset(fraction: float) -> str:
    """The nft script that replaces the testbed's loss table with one dropping `fraction` of the nodes' frames."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"loss must be in [0, 1), not {fraction}")
    per_million = round(fraction * 1_000_000)
    rules = [f'        {side} "{port}" meta l4proto {proto} numgen random mod 1000000 < {per_million} counter drop'
             for side in ("iifname", "oifname") for port in _PORTS for proto in ("udp", "tcp")]
    # `add` then `delete` then `add`: replaces a previous table whether or not there was one (nft -f is atomic).
    return "\n".join([f"add table bridge {TABLE}", f"delete table bridge {TABLE}", f"table bridge {TABLE} {{",
                      "    chain forward {", "        type filter hook forward priority 0; policy accept;",
                      *(rules if per_million else []), "    }", "}", ""])


def set_loss(fabric_ns: str, fraction: float) -> None:
    """Make the fabric namespace's rack bridges drop `fraction` of the nodes' UDP and TCP frames (0: none)."""
    done = subprocess.run(["ip", "netns", "exec", fabric_ns, "nft", "-f", "-"], input=ruleset(fraction),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise WireLossError(f"nft in {fabric_ns}: {done.stderr.strip()}")


def dropped(fabric_ns: str) -> int:
    """Frames the loss rules dropped so far (0 when there is no loss table)."""
    done = subprocess.run(["ip", "netns", "exec", fabric_ns, "nft", "list", "table", "bridge", TABLE],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return 0
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", done.stdout))

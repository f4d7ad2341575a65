"""Join a testbed's fabric bridge to the same bridge on other hosts with VXLAN (RFC 7348), so one testbed's racks
can live on several machines and still share one layer-2 segment (DHCP broadcasts, ARP) with the appliance.

The VXLAN device is created where the underlay is (the namespace that holds the hosts' network: the root
namespace on a real host, a namespace standing for a host in tests), which is where its UDP socket stays, then
moved into the fabric namespace and enslaved to the bridge. Broadcast and unknown frames go to every remote
host by head-end replication (one all-zero FDB entry per remote, RFC 7348 4.2's alternative to multicast, which
a hosts' network rarely routes). VXLAN adds 50 bytes a frame: the underlay's MTU must be at least the fabric's
plus 50 (UNDERLAY_OVERHEAD), else full-size frames are dropped silently.
"""
from __future__ import annotations

import subprocess
from typing import Sequence

VXLAN_PORT = 4789          # IANA's VXLAN port (RFC 7348 5)
UNDERLAY_OVERHEAD = 50     # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8


def _ip(ns: str | None, *argv: str) -> None:
    """Run `ip` (or `bridge`, when argv starts with it) inside a namespace, or in this one when ns is None."""
    tool, rest = ("bridge", argv[1:]) if argv and argv[0] == "bridge" else ("ip", argv)
    prefix = ["ip", "netns", "exec", ns] if ns else []
    subprocess.run([*prefix, tool, *rest], check=True, capture_output=True, text=True, timeout=30)


def join_fabric(underlay_ns: str | None, fabric_ns: str, bridge: str, vni: int, local: str, remotes: Sequence[str],
                device: str = "vx0", port: int = VXLAN_PORT) -> None:
    """Put a VXLAN port carrying segment `vni` on `bridge` in `fabric_ns`, its tunnel from `local` to every remote
    host's underlay address; the remote hosts do the same with their own `local` and this host among `remotes`."""
    _ip(underlay_ns, "link", "add", device, "type", "vxlan", "id", str(vni), "local", local, "dstport", str(port))
    try:
        for remote in remotes:
            _ip(underlay_ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", device, "dst", remote)
        _ip(underlay_ns, "link", "set", device, "netns", fabric_ns)
    except BaseException:
        subprocess.run([*(["ip", "netns", "exec", underlay_ns] if underlay_ns else []), "ip", "link", "del", device],
                       capture_output=True, timeout=30)
        raise
    _ip(fabric_ns, "link", "set", device, "master", bridge, "up")

"""Build and tear down a testbed's network with netlink (pyroute2): every bridge, link and address inside its namespaces.

Layout (nothing in the root namespace):
  fabric ns: one bridge per rack (r1..rR), a core bridge, a management bridge; rack i joins the core
             through a veth pair (u-ri in the rack bridge, c-ri in the core bridge).
  node ns:   eth0 (the node's MAC), veth to port nK of its rack bridge; no address until its firmware's DHCP.
  appliance: rb0 on the core bridge (10.78.0.1/16), mgmt0 on the management bridge (10.79.0.1/16).
  bmc ns:    eth0 on the management bridge carrying every BMC address; the node daemon runs here.
  QEMU VMs:  no namespace; the node daemon puts each VM's tap (qK) on its rack bridge when it starts QEMU.
Links are shaped with tbf on both ends (tbf shapes egress only; sch_netem is not in this kernel).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from pyroute2 import IPRoute, netns

from vmtestbed.netns import created, iproute_in, kill_and_remove
from vmtestbed.plan import (
    APPLIANCE_IF, APPLIANCE_IP, APPLIANCE_MGMT_IF, APPLIANCE_MGMT_IP, MGMT_NET, NODE_NET, TestbedPlan,
)

log = logging.getLogger("rackboot.testbed.topology")
CORE_BRIDGE = "core"
MGMT_BRIDGE = "mgmt"


def _index(ipr: IPRoute, ifname: str) -> int:
    """Return an interface index by name with one RTM_GETLINK (link_lookup dumps every link)."""
    return int(ipr.link("get", ifname=ifname)[0]["index"])


def shape(ipr: IPRoute, ifname: str, mbit: int) -> None:
    """Limit an interface's egress to mbit with tbf (0 = unshaped)."""
    if mbit <= 0:
        return
    rate_bytes = mbit * 1_000_000 // 8
    # tbf needs a bucket of at least rate/HZ bytes; 1/100 s of traffic keeps it above that for HZ >= 100.
    ipr.tc("add", "tbf", index=_index(ipr, ifname), rate=f"{mbit}mbit", burst=max(rate_bytes // 100, 16384), latency="50ms")


def _bridge(ipr: IPRoute, name: str) -> int:
    """Create a bridge that forwards at once (no STP, no forward delay) and return its index."""
    ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_forward_delay=0)
    idx = _index(ipr, name)
    ipr.link("set", index=idx, state="up")
    return idx


def _ipv4_only() -> None:
    """Turn IPv6 off in the namespace this thread has entered, before it has links.

    Every interface with IPv6 on sends duplicate-address probes, MLD reports and router solicitations, to multicast
    groups a rack bridge floods to all its ports: 4000 nodes coming up were millions of frame copies, and the kernel
    dropped frames for seconds (/proc/net/softnet_stat). The testbed's nodes and fabric speak IPv4 only."""
    for scope in ("all", "default"):
        Path(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6").write_text("1")


def _lo_up(ipr: IPRoute) -> None:
    ipr.link("set", index=_index(ipr, "lo"), state="up")


def build(plan: TestbedPlan, progress: Callable[[str], None] | None = None) -> float:
    """Create every namespace, bridge, veth, address and qdisc of the plan; return the seconds it took.

    The caller records the plan on disk first, so that `destroy` can remove a half-built testbed.
    """
    t0 = time.monotonic()
    say = progress or (lambda _msg: None)
    with created(plan.fabric_ns):
        _ipv4_only()
        fabric = IPRoute()
    try:
        _lo_up(fabric)
        racks = {r: _bridge(fabric, r) for r in plan.rack_names}
        core = _bridge(fabric, CORE_BRIDGE)
        mgmt = _bridge(fabric, MGMT_BRIDGE)
        for rack, idx in racks.items():
            fabric.link("add", ifname=f"u-{rack}", kind="veth", master=idx, state="up", peer={"ifname": f"c-{rack}"})
            fabric.link("set", index=_index(fabric, f"c-{rack}"), master=core, state="up")
            shape(fabric, f"u-{rack}", plan.uplink_mbit)
            shape(fabric, f"c-{rack}", plan.uplink_mbit)

        with created(plan.appliance_ns):
            app = IPRoute()
        with app:
            _lo_up(app)
            for ifname, bridge, ip, net, peer in ((APPLIANCE_IF, core, APPLIANCE_IP, NODE_NET, "a-core"), (APPLIANCE_MGMT_IF, mgmt, APPLIANCE_MGMT_IP, MGMT_NET, "a-mgmt")):
                app.link("add", ifname=ifname, kind="veth", state="up", peer={"ifname": peer, "net_ns_fd": plan.fabric_ns})
                fabric.link("set", index=_index(fabric, peer), master=bridge, state="up")
                app.addr("add", index=_index(app, ifname), address=str(ip), prefixlen=net.prefixlen)

        with created(plan.bmc_ns):
            bmc = IPRoute()
        with bmc:
            _lo_up(bmc)
            bmc.link("add", ifname="eth0", kind="veth", state="up", peer={"ifname": "a-bmcs", "net_ns_fd": plan.fabric_ns})
            fabric.link("set", index=_index(fabric, "a-bmcs"), master=mgmt, state="up")
            eth0 = _index(bmc, "eth0")
            for n in plan.node_list:
                bmc.addr("add", index=eth0, address=n.bmc_ip, prefixlen=MGMT_NET.prefixlen)
        say(f"fabric: {plan.racks} racks, core and management bridges, appliance and BMC namespaces")

        for n in plan.netns_nodes:  # a QEMU VM's tap is made by the node daemon when it starts the VM
            with created(n.namespace):
                _ipv4_only()
                node = IPRoute()
            with node:
                _lo_up(node)
                node.link("add", ifname="eth0", kind="veth", address=n.mac, state="up",
                          peer={"ifname": n.fabric_if, "net_ns_fd": plan.fabric_ns})
                shape(node, "eth0", plan.link_mbit)
            port = _index(fabric, n.fabric_if)
            fabric.link("set", index=port, master=racks[n.rack], state="up")
            shape(fabric, n.fabric_if, plan.link_mbit)
            if (n.index + 1) % 250 == 0:
                say(f"nodes: {n.index + 1}/{plan.nodes}")  # namespace nodes come first
    finally:
        fabric.close()
    return time.monotonic() - t0


def existing_namespaces(prefix: str) -> list[str]:
    """Return the namespaces that exist with this testbed prefix."""
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


def destroy(prefix: str) -> list[str]:
    """Stop every process inside the testbed's namespaces and remove them (and so every link); return their names."""
    names = existing_namespaces(prefix)
    kill_and_remove(names)
    return names


def links_in(ns: str) -> list[str]:
    """Return the interface names inside a namespace (for status and tests)."""
    with iproute_in(ns) as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]

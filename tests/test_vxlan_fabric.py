"""Two testbed fabrics on two "hosts" (namespaces joined by an underlay link) joined by VXLAN: one layer-2 segment,
broadcasts included, full-size frames through (vmtestbed/vxlan.py; docs/scale.md, "Beyond one machine")."""
from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from vmtestbed.netns import Lab
from vmtestbed.vxlan import UNDERLAY_OVERHEAD, join_fabric

pytestmark = pytest.mark.netns

RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.bind(("0.0.0.0", 6767))
s.settimeout(10)
for _ in range(2):
    data, peer = s.recvfrom(4096)
    print(len(data), peer[0], flush=True)
"""
SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")  # no route to 255.255.255.255 otherwise
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment, fail if it does not fit
s.sendto(b"d" * 300, ("255.255.255.255", 6767))   # a DISCOVER-sized broadcast
s.sendto(b"x" * 1472, ("10.78.0.1", 6767))        # 1500 bytes of IP: a full-size frame
"""


@pytest.fixture
def two_hosts() -> Iterator[tuple[Lab, str, str]]:
    """host-a and host-b (underlay 192.0.2.1/.2, MTU 1500 + VXLAN's 50), each with a fabric namespace holding a
    core bridge and one node on it (10.78.0.1 on host a, 10.78.0.2 on host b), the two cores joined by VXLAN."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with Lab() as lab:
        host_a, host_b = lab.ns("host-a"), lab.ns("host-b")
        lab.veth(host_a, "u0", host_b, "u0")
        for host, addr in ((host_a, "192.0.2.1/24"), (host_b, "192.0.2.2/24")):
            lab.run(host, ["ip", "link", "set", "u0", "mtu", str(1500 + UNDERLAY_OVERHEAD)], check=True)
            lab.addr(host, "u0", addr)
        nodes = []
        for side, host, local, remote, node_ip in (("a", host_a, "192.0.2.1", "192.0.2.2", "10.78.0.1/16"),
                                                   ("b", host_b, "192.0.2.2", "192.0.2.1", "10.78.0.2/16")):
            fabric, node = lab.ns(f"fab-{side}"), lab.ns(f"node-{side}")
            lab.bridge(fabric, "core")
            lab.veth(node, "eth0", fabric, f"p-{side}", master_b="core")
            lab.addr(node, "eth0", node_ip)
            join_fabric(host, fabric, "core", 4242, local, [remote])
            nodes.append(node)
        yield lab, nodes[0], nodes[1]


def test_two_fabrics_joined_by_vxlan_are_one_segment(two_hosts: tuple[Lab, str, str]) -> None:
    lab, node_a, node_b = two_hosts
    ping = lab.run(node_b, ["ping", "-c", "2", "-W", "3", "10.78.0.1"])  # ARP's broadcast crosses first
    assert ping.returncode == 0, ping.stdout + ping.stderr
    receiver = lab.popen(node_a, ["python3", "-c", RECEIVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lab.run(node_a, ["sleep", "0.3"])
    sent = lab.run(node_b, ["python3", "-c", SENDER])
    assert sent.returncode == 0, sent.stderr
    out, err = receiver.communicate(timeout=15)
    assert out.decode().split("\n")[:2] == ["300 10.78.0.2", "1472 10.78.0.2"], (out, err)
    links = lab.run(f"{lab.prefix}-fab-a", ["ip", "-d", "link", "show", "vx0"]).stdout
    assert "vxlan id 4242" in links and "master core" in links, links

"""Chain broadcast and tree exec across network namespaces (vmtestbed.netns.Lab): each node's sockets in its own namespace."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

import asyncssh
import pytest
from pyroute2 import netns

from broadcast.agent import AgentConfig, DeployAgent
from broadcast.image import SinkSpec
from broadcast.methods import BroadcastJob, run_broadcast
from broadcast.params import ChainParams
from broadcast.texec import tree_exec
from broadcast.topology import Target
from vmtestbed.netns import Lab
from receiver_faults import FaultyReceiver

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]
N = 6


def in_ns(ns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside a namespace (the socket stays there; this thread goes back)."""
    netns.pushns(ns)
    try:
        return make()
    finally:
        netns.popns()


def listen_factory(ns: str) -> Callable[[str, int], socket.socket]:
    def make(host: str, port: int) -> socket.socket:
        def new() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
            return s
        return in_ns(ns, new)
    return make


def socket_factory(ns: str) -> Callable[[tuple[Any, ...]], socket.socket]:
    return lambda addr_info: in_ns(ns, lambda: socket.socket(addr_info[0], addr_info[1], addr_info[2]))


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Lab, str, list[str]]]:
    """A fabric namespace with one bridge, the appliance (10.99.0.1) and N nodes (10.99.0.11..) on it."""
    with Lab() as lab:
        fabric = lab.ns("fab")
        lab.bridge(fabric, "br0")
        names = ["app"] + [f"n{i}" for i in range(1, N + 1)]
        spaces = []
        for i, short in enumerate(names):
            ns = lab.ns(short)
            lab.veth(ns, "eth0", fabric, f"v-{short}", master_b="br0")
            lab.addr(ns, "eth0", f"10.99.0.{1 if i == 0 else 10 + i}/24")
            spaces.append(ns)
        yield lab, spaces[0], spaces[1:]
    assert not [n for n in netns.listnetns() if n.startswith(lab.prefix)]


async def test_chain_across_namespaces_with_a_node_killed(lab: tuple[Lab, str, list[str]], tmp_path: Path) -> None:
    _, app_ns, node_ns = lab
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(8 << 20))
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    receivers = [FaultyReceiver(f"node-{i + 1}", f"10.99.0.{11 + i}", 7070, listen_factory=listen_factory(ns),
                          socket_factory=socket_factory(ns)) for i, ns in enumerate(node_ns)]
    for r in receivers:
        await r.start()
    by_name = {r.name: r for r in receivers}
    armed: list[str] = []

    async def arm(t: Target, session: str, token: str) -> None:
        by_name[t.name].arm(session, token, SinkSpec(kind="raw", compression="none", target=str(tmp_path / t.name)))
        armed.append(session)

    async def kill_mid_stream() -> None:
        while not armed or by_name["node-3"].progress(armed[0]) < (2 << 20):
            await asyncio.sleep(0.005)
        by_name["node-3"].kill()

    targets = [Target(r.name, r.host, r.port, rack="r1" if i < 3 else "r2") for i, r in enumerate(receivers)]
    job = BroadcastJob(image=image, sha256=sha, report_host="10.99.0.1", deadline=60,
                       params=ChainParams(stall_timeout=1.0, ack_interval=0.05, window=2 << 20, source_rate=8 << 20),
                       socket_factory=socket_factory(app_ns), listen_factory=listen_factory(app_ns))
    killer = asyncio.create_task(kill_mid_stream())
    try:
        result = await run_broadcast(job, targets, "chain", arm)
        await killer
    finally:
        for r in receivers:
            await r.close()
    assert result.failed == ["node-3"] and result.nodes["node-3"].reported_by == "node-2"
    for name in result.ok:
        assert result.nodes[name].sha256 == sha
        assert (tmp_path / name).read_bytes() == image.read_bytes()


async def test_tree_exec_across_namespaces(lab: tuple[Lab, str, list[str]], tmp_path: Path) -> None:
    _, app_ns, node_ns = lab
    deploy = asyncssh.generate_private_key("ssh-ed25519")
    tree = asyncssh.generate_private_key("ssh-ed25519")
    tree.write_private_key(str(tmp_path / "tree_key"))
    agents = []
    for i, ns in enumerate(node_ns):
        cfg = AgentConfig(name=f"node-{i + 1}", mac=f"52:54:00:99:00:{i + 1:02x}", host=f"10.99.0.{11 + i}", ssh_port=2222,
                          data_port=7071, authorized_keys=(deploy.export_public_key().decode(), tree.export_public_key().decode()),
                          tree_key=str(tmp_path / "tree_key"), workdir=str(tmp_path / f"w{i}"),
                          shell_prefix=("ip", "netns", "exec", ns))
        agents.append(DeployAgent(cfg, listen_factory=listen_factory(ns), socket_factory=socket_factory(ns)))
    for a in agents:
        await a.start()
    try:
        targets = [Target(a.config.name, a.config.host, 2222) for a in agents]
        result = await tree_exec("ip -4 -o addr show dev eth0 | awk '{print $4}'", targets, deploy, fanout=2, timeout=10,
                                 socket_factory=socket_factory(app_ns))
    finally:
        for a in agents:
            await a.close()
    assert sorted(result.ok) == [f"node-{i}" for i in range(1, N + 1)]
    for i in range(N):  # each command ran inside its node's namespace
        assert result.nodes[f"node-{i + 1}"].stdout == f"10.99.0.{11 + i}/24\n"

"""Tree remote execution on loopback agents: fanout, grouping, a dead node, a hung node, a slow command."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import AsyncIterator

import asyncssh
import pytest

from broadcast.agent import AgentConfig, DeployAgent
from broadcast.texec import ExecResult, tree_exec
from broadcast.topology import Subtree, Target, build_forest
from broadcast.wire import VERSION, decode, encode

pytestmark = pytest.mark.timeout(90)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
async def agents(tmp_path: Path, keys: tuple[asyncssh.SSHKey, str]) -> AsyncIterator[list[DeployAgent]]:
    deploy, tree_path = keys
    tree_pub = asyncssh.read_private_key(tree_path).export_public_key().decode()
    out = []
    for i in range(1, 9):
        cfg = AgentConfig(name=f"node-{i}", mac=f"52:54:00:77:00:{i:02x}", host=f"127.0.0.{i + 1}", ssh_port=0, data_port=0,
                          authorized_keys=(deploy.export_public_key().decode(), tree_pub), tree_key=tree_path,
                          workdir=str(tmp_path / f"w{i}"))
        a = DeployAgent(cfg)
        await a.start()
        out.append(a)
    yield out
    for a in out:
        await a.close()


def targets(agents: list[DeployAgent]) -> list[Target]:
    return [Target(a.config.name, a.config.host, a.ssh_port) for a in agents]


async def test_tree_exec_groups_identical_output(agents: list[DeployAgent], keys: tuple[asyncssh.SSHKey, str]) -> None:
    result = await tree_exec("echo hello; echo $RACKBOOT_NODE >&2", targets(agents), keys[0], fanout=2, timeout=10)
    assert sorted(result.ok) == sorted(a.config.name for a in agents)
    assert result.nodes["node-5"].stderr == "node-5\n"
    vias = {r.via for r in result.nodes.values()}
    assert vias == {a.config.name for a in agents}  # each node reported for itself, through the tree
    only_stdout = ExecResult("x", {n: r for n, r in result.nodes.items()})
    for r in only_stdout.nodes.values():
        r.stderr = ""
    assert only_stdout.grouped()[0][0] == "node-[1-8]"
    assert "node-[1-8] (exit 0)\n---------------\nhello" in only_stdout.format()


async def test_dead_hung_and_slow_nodes_are_isolated(agents: list[DeployAgent], keys: tuple[asyncssh.SSHKey, str]) -> None:
    ts = targets(agents)
    forest = build_forest(ts, 2)
    inner = forest[0].children()[0]  # an inner node: its children must still run the command
    assert inner.children()
    dead = inner.name
    adopted = [c.name for c in inner.children()]
    by_name = {a.config.name: a for a in agents}
    await by_name[dead].close()
    ts = [Target(t.name, t.host, free_port(t.host)) if t.name == dead else t for t in ts]
    # a node whose SSH server accepts TCP and then never speaks
    hung_name = forest[1].children()[-1].name
    await by_name[hung_name].close()
    hung = await asyncio.start_server(lambda r, w: None, by_name[hung_name].config.host, 0)
    hung_port = hung.sockets[0].getsockname()[1]
    ts = [Target(t.name, t.host, hung_port) if t.name == hung_name else t for t in ts]
    slow = next(t.name for t in ts if t.name not in (dead, hung_name, *adopted))
    try:
        result = await tree_exec(f'[ "$RACKBOOT_NODE" = {slow} ] && sleep 30; echo done', ts, keys[0], fanout=2,
                                 timeout=1.5, connect_timeout=1.0, order=False)
    finally:
        hung.close()
    assert result.nodes[dead].error is not None and result.nodes[dead].error.startswith("unreachable")
    assert result.nodes[hung_name].error == "unreachable: timed out"
    assert result.nodes[slow].timed_out and result.nodes[slow].status is None
    healthy = set(result.nodes) - {dead, hung_name, slow}
    assert set(result.ok) == healthy and set(adopted) <= healthy
    assert all(result.nodes[n].stdout == "done\n" for n in healthy)
    groups = dict(result.grouped())
    assert len(groups) == 4  # done, timed out, refused, timed-out connect


async def test_agents_without_a_tree_key_hand_their_children_back(agents: list[DeployAgent], keys: tuple[asyncssh.SSHKey, str]) -> None:
    """An installed system's agent has no tree key: it runs the command and its parent opens its children."""
    keyless = {"node-1", "node-3"}
    for a in agents:
        if a.config.name in keyless:
            a.tree_key = None
    ts = targets(agents)
    forest = build_forest(ts, 2)
    def walk(st: Subtree) -> list[Subtree]:
        return [st] + [d for c in st.children() for d in walk(c)]

    inner_keyless = [st for root in forest for st in walk(root) if st.name in keyless and st.children()]
    assert inner_keyless  # the keyless agents are inner nodes of the tree: they have children to hand back
    result = await tree_exec("echo $RACKBOOT_NODE", ts, keys[0], fanout=2, timeout=10)
    assert sorted(result.ok) == sorted(a.config.name for a in agents), {n: r.error for n, r in result.nodes.items()}
    assert all(r.stdout == f"{n}\n" for n, r in result.nodes.items())


async def test_agent_texec_stream_ends_with_xdone(agents: list[DeployAgent], keys: tuple[asyncssh.SSHKey, str]) -> None:
    """One agent's `rackboot-agent texec` for a leaf: its own xresult, then xdone, exit status 0."""
    a = agents[0]
    leaf = Subtree([[a.config.name, a.config.host, a.ssh_port, 1]])
    request = encode("texec", v=VERSION, id="t1", command="echo $RACKBOOT_NODE", timeout=10.0, fanout=2,
                     connect_timeout=2.0, tree=leaf.to_json(), max_output=1024)
    async with asyncssh.connect(a.config.host, a.ssh_port, username="root", client_keys=[keys[0]], known_hosts=None,
                                agent_path=None, config=None) as conn:
        proc = await conn.run("rackboot-agent texec", input=request, encoding=None, timeout=20)
    assert isinstance(proc.stdout, bytes)
    msgs = [decode(line) for line in proc.stdout.splitlines()]
    assert [m["type"] for m in msgs] == ["xresult", "xdone"]
    assert msgs[0]["stdout"] == f"{a.config.name}\n" and msgs[1]["node"] == a.config.name
    assert proc.exit_status == 0

"""A deploy agent given a builtin answers the commands it knows in process (no child), over SSH and through the tree."""
from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import asyncssh
import pytest

from broadcast.agent import AgentConfig, DeployAgent
from broadcast.agent_client import AgentClient
from broadcast.builtin import Builtin, BuiltinAnswer
from broadcast.texec import tree_exec
from broadcast.topology import Target
from vmtestbed.firmware import builtin_true

pytestmark = pytest.mark.timeout(90)


def answers(command: str) -> BuiltinAnswer | None:
    """The tests' builtin: `true`, `:`, and one command with output and a status; None for the rest."""
    if command == "answer":
        return BuiltinAnswer(3, b"out\n", b"err\n")
    return builtin_true(command)


@pytest.fixture
def spawn_log(tmp_path: Path) -> Path:
    """A shell prefix that records every process the agents spawn (one line each), then runs the command."""
    prefix = tmp_path / "spawned"
    log = tmp_path / "spawned.log"
    prefix.write_text(f'#!/bin/sh\necho "$RACKBOOT_NODE" >> {log}\nexec "$@"\n')
    prefix.chmod(0o755)
    log.touch()
    return log


def spawned(log: Path) -> list[str]:
    """The nodes that spawned a process, one entry a process."""
    return log.read_text().split()


async def start_agents(tmp_path: Path, keys: tuple[asyncssh.SSHKey, str], count: int, builtin: Builtin | None) -> list[DeployAgent]:
    """count agents on 127.0.0.2..., each running commands through the spawn-recording prefix."""
    deploy, tree_path = keys
    tree_pub = asyncssh.read_private_key(tree_path).export_public_key().decode()
    out = []
    for i in range(1, count + 1):
        cfg = AgentConfig(name=f"node-{i}", mac=f"52:54:00:77:00:{i:02x}", host=f"127.0.0.{i + 1}", ssh_port=0, data_port=0,
                          authorized_keys=(deploy.export_public_key().decode(), tree_pub), tree_key=tree_path,
                          workdir=str(tmp_path / f"w{i}"), shell_prefix=(str(tmp_path / "spawned"),))
        a = DeployAgent(cfg, builtin=builtin)
        await a.start()
        out.append(a)
    return out


@pytest.fixture
async def agents(tmp_path: Path, keys: tuple[asyncssh.SSHKey, str], spawn_log: Path) -> AsyncIterator[list[DeployAgent]]:
    out = await start_agents(tmp_path, keys, 7, answers)
    yield out
    for a in out:
        await a.close()


def targets(agents: list[DeployAgent]) -> list[Target]:
    return [Target(a.config.name, a.config.host, a.ssh_port) for a in agents]


def test_builtin_true_answers_exactly_true_and_colon() -> None:
    assert builtin_true("true") == BuiltinAnswer(0, b"", b"")
    assert builtin_true(":") == BuiltinAnswer(0)
    for other in ("true ", " true", "/bin/true", "true; false", "false", "true && reboot", ""):
        assert builtin_true(other) is None, other


async def test_ssh_session_answers_builtins_without_a_process(agents: list[DeployAgent], keys: tuple[asyncssh.SSHKey, str],
                                                              spawn_log: Path) -> None:
    agent = agents[0]
    async with AgentClient(agent.config.host, agent.ssh_port, keys[0]) as c:
        for command in ("true", ":"):
            r = await c.run(command)
            assert (r.status, r.stdout, r.stderr) == (0, "", "")
        r = await c.run("answer")
        assert (r.status, r.stdout, r.stderr) == (3, "out\n", "err\n")
        assert spawned(spawn_log) == []  # none of them forked
        r = await c.run("echo out; echo err >&2; echo $RACKBOOT_NODE; exit 4")  # any other command: the shell, as before
        assert (r.status, r.stdout, r.stderr) == (4, "out\nnode-1\n", "err\n")
        r = await c.run("true ")  # not exactly `true`: the shell
        assert r.status == 0
        assert (await c.call("status"))["stats"]["builtin_commands"] == 3  # agent operations are never builtins
    assert spawned(spawn_log) == ["node-1", "node-1"]
    assert agent.counters["shell_commands"] == 2


async def test_tree_answers_builtins_without_a_process(agents: list[DeployAgent], keys: tuple[asyncssh.SSHKey, str],
                                                       spawn_log: Path) -> None:
    names = sorted(a.config.name for a in agents)
    result = await tree_exec("true", targets(agents), keys[0], fanout=2, timeout=10)
    assert sorted(result.ok) == names
    assert {r.via for r in result.nodes.values()} == set(names)  # through the tree: each agent reported for itself
    result = await tree_exec("answer", targets(agents), keys[0], fanout=2, timeout=10)
    assert {(r.status, r.stdout, r.stderr, r.error) for r in result.nodes.values()} == {(3, "out\n", "err\n", None)}
    assert spawned(spawn_log) == []
    result = await tree_exec("echo $RACKBOOT_NODE", targets(agents), keys[0], fanout=2, timeout=10)
    assert {n: r.stdout for n, r in result.nodes.items()} == {n: f"{n}\n" for n in names}
    assert sorted(spawned(spawn_log)) == names  # one process a node for a command the builtin does not know


async def test_without_a_builtin_true_runs_the_shell(tmp_path: Path, keys: tuple[asyncssh.SSHKey, str], spawn_log: Path) -> None:
    agents = await start_agents(tmp_path, keys, 3, None)
    try:
        result = await tree_exec("true", targets(agents), keys[0], fanout=2, timeout=10)
        assert len(result.ok) == 3
        async with AgentClient(agents[0].config.host, agents[0].ssh_port, keys[0]) as c:
            assert (await c.run(":")).status == 0
        assert sorted(spawned(spawn_log)) == ["node-1", "node-1", "node-2", "node-3"]
        assert agents[0].counters["builtin_commands"] == 0
    finally:
        for a in agents:
            await a.close()

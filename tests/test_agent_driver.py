"""The controller's deploy driver against real deploy agents over SSH on loopback (two nodes, one process)."""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any, AsyncIterator

import asyncssh
import pytest
from helpers import rootfs_tar_gz

from appliance.auth import NodeTokens
from appliance.catalog import Environment, Partition
from appliance.config import ApplianceConfig, DeployConfig
from appliance.deploy.agent_driver import AgentDeployDriver, partition_specs
from appliance.deploy.drivers import DeployError
from appliance.inventory import Inventory
from broadcast.agent import AgentConfig, DeployAgent
from broadcast.agent_client import load_or_create_key
from domain.nodes import Node


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    key = load_or_create_key(tmp_path / "state" / "deploy_key")
    assert (tmp_path / "state" / "deploy_key.pub").is_file()
    nodes = [Node(name=f"node-{i}", mac=f"52:54:00:77:00:0{i}", ip=ipaddress.IPv4Address(f"127.0.0.{10 + i}"), rack="r1")
             for i in (1, 2)]
    config = ApplianceConfig(interface="lo", address=ipaddress.IPv4Interface("127.0.0.1/8"), state_dir=tmp_path / "state",
                             inventory=Inventory(tuple(nodes)), deploy=DeployConfig(ssh_key=tmp_path / "state" / "deploy_key"))
    tokens = NodeTokens()
    driver = AgentDeployDriver(config, tokens)
    events: list[tuple[str, str]] = []
    agents = []
    for n in nodes:
        disk = tmp_path / f"{n.name}.disk"
        with open(disk, "wb") as f:
            f.truncate(96 << 20)

        async def kexec(kernel: str, initrd: str | None, cmdline: str, name: str = n.name) -> None:
            events.append((name, f"kexec {Path(kernel).name}"))

        async def reboot(name: str = n.name) -> None:
            events.append((name, "reboot"))

        agent = DeployAgent(AgentConfig(name=n.name, mac=n.mac, host=str(n.ip), ssh_port=0, data_port=0, disk=str(disk),
                                        authorized_keys=(key.export_public_key().decode(),), workdir=str(tmp_path / n.name)),
                            kexec_hook=kexec, reboot_hook=reboot)
        await agent.start()
        agents.append(agent)
        tokens.issue(n.mac, "d1", str(n.ip))
        driver.agent_up(n, {"ssh_port": str(agent.ssh_port), "data_port": str(agent.receiver.port)})
    yield {"driver": driver, "nodes": nodes, "agents": agents, "events": events, "tmp": tmp_path}
    for a in agents:
        await a.close()


def environment(tmp_path: Path) -> tuple[Environment, Path]:
    image = tmp_path / "rootfs.tar.gz"
    image.write_bytes(rootfs_tar_gz())
    env = Environment(name="tiny", version=2, owner="admin", image_kind="tar", compression="gzip",
                      sha256=hashlib.sha256(image.read_bytes()).hexdigest(), size=image.stat().st_size,
                      layout=(Partition("swap", "8M", "swap"), Partition("root", "rest", "ext4", "/")),
                      postinstall=("echo $RACKBOOT_ENV > $RACKBOOT_ROOT/etc/deployed-env",), kernel="/boot/vmlinuz", initrd="/boot/initrd.img")
    return env, image


async def test_partition_broadcast_postinstall_kexec_reboot_and_exec(cluster: dict[str, Any]) -> None:
    driver, nodes, tmp = cluster["driver"], cluster["nodes"], cluster["tmp"]
    env, image = environment(tmp)
    for n in nodes:
        await driver.prepare_disk(n, env)
    outcome = await asyncio.wait_for(driver.broadcast("chain", nodes, env, image), 60)
    assert outcome.nodes == {"node-1": (True, ""), "node-2": (True, "")}
    user_key = asyncssh.generate_private_key("ssh-ed25519", comment="alice@laptop").export_public_key().decode().strip()
    for n in nodes:
        await driver.post_install(n, env, [user_key])
        root = tmp / n.name / "root"
        assert (root / "etc/hostname").read_text() == f"{n.name}\n"
        authorized = (root / "root/.ssh/authorized_keys").read_text().splitlines()
        assert user_key in authorized and driver.key.export_public_key().decode().strip() in authorized
        assert (root / "etc/os-release").read_text() == "ID=test\n"
        assert (root / "etc/deployed-env").read_text() == "tiny:2\n"
        stamp = json.loads((root / "etc/rackboot/deployed.json").read_text())
        assert stamp["env"] == "tiny:2" and stamp["sha256"] == env.sha256 and stamp["token"]
        assert stamp["callback"].endswith("/callback/" + n.mac.replace(":", "-"))
    await driver.kexec(nodes[0], env)
    await driver.soft_reboot(nodes[1])
    result = await driver.exec(nodes, "cat /proc/sys/kernel/ostype")
    assert result.ok == ["node-1", "node-2"] and result.grouped()[0][0] == "node-[1-2]"
    for _ in range(50):
        if len(cluster["events"]) == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(cluster["events"]) == [("node-1", "kexec vmlinuz"), ("node-2", "reboot")]


async def test_failures_become_deploy_errors(cluster: dict[str, Any]) -> None:
    driver, nodes, tmp = cluster["driver"], cluster["nodes"], cluster["tmp"]
    env, image = environment(tmp)
    bad = Environment(**{**env.__dict__, "postinstall": ("echo broken >&2; exit 7",)})
    await driver.prepare_disk(nodes[0], env)
    with pytest.raises(DeployError, match=r"^script post-0 exited 7: broken$"):
        await driver.post_install(nodes[0], bad)
    ghost = Node(name="node-9", mac="52:54:00:77:00:09", ip=ipaddress.IPv4Address("127.0.0.99"))
    with pytest.raises(DeployError, match="cannot reach the agent at 127.0.0.99"):
        await driver.soft_reboot(ghost)


def test_partition_sizes() -> None:
    specs = partition_specs((Partition("efi", "512M", "vfat"), Partition("swap", "2G", "swap"), Partition("root", "rest", "ext4")))
    assert [(s.size_mib, s.type, s.fs, s.label) for s in specs] == [(512, "efi", "vfat", "efi"), (2048, "swap", "swap", "swap"),
                                                                     (None, "linux", "ext4", "root")]
    with pytest.raises(DeployError):
        partition_specs((Partition("x", "lots"),))


async def test_soft_reboot_of_a_stock_installed_system_goes_through_its_init(tmp_path: Path) -> None:
    """A stock OS answers SSH with the deploy key but has no rackboot-agent: the soft reboot falls back to
    `systemctl --no-block reboot` run by its own shell."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    asked = tmp_path / "systemctl.args"
    (bindir / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" > {asked}\n")
    (bindir / "systemctl").chmod(0o755)
    key = load_or_create_key(tmp_path / "deploy_key")

    async def shell(process: asyncssh.SSHServerProcess[bytes]) -> None:
        # What sshd does with an exec request: the user's shell runs the command (here with only bindir on PATH).
        proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", process.command or "", env={"PATH": str(bindir)},
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        async def feed() -> None:
            proc.stdin.write(await process.stdin.read())  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]

        feeding = asyncio.ensure_future(feed())  # like sshd: the command runs whether or not stdin ever ends
        out, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
        await proc.wait()
        feeding.cancel()
        process.stdout.write(out)
        process.stderr.write(err)
        process.exit(proc.returncode or 0)

    server = await asyncssh.create_server(asyncssh.SSHServer, "127.0.0.21", 0, encoding=None,
                                          server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                          authorized_client_keys=asyncssh.import_authorized_keys(key.export_public_key().decode()),
                                          process_factory=shell)
    port = server.sockets[0].getsockname()[1]
    node = Node(name="node-1", mac="52:54:00:77:00:01", ip=ipaddress.IPv4Address("127.0.0.21"))
    config = ApplianceConfig(interface="lo", address=ipaddress.IPv4Interface("127.0.0.1/8"), state_dir=tmp_path,
                             inventory=Inventory((node,)), deploy=DeployConfig(ssh_key=tmp_path / "deploy_key", ssh_port=port))
    try:
        await AgentDeployDriver(config, NodeTokens()).soft_reboot(node)
        assert asked.read_text() == "--no-block reboot\n"
        # Both fail (fakes: this shell's PATH holds only bindir, so nothing of the host's can run).
        (bindir / "systemctl").write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
        (bindir / "reboot").write_text("#!/bin/sh\necho 'reboot: no init answers' >&2\nexit 1\n")
        (bindir / "reboot").chmod(0o755)
        with pytest.raises(DeployError, match=r"^soft reboot: reboot: .* exited 1: Failed to connect to bus\nreboot: no init answers$"):
            await AgentDeployDriver(config, NodeTokens()).soft_reboot(node)
    finally:
        server.close()
        await server.wait_closed()


async def test_handshakes_to_agents_are_bounded(tmp_path: Path) -> None:
    """With one handshake at a time, the second node's SSH handshake starts only once the first one's has ended
    (here: timed out against a listener that never speaks SSH); their TCP connections do not wait (a node that is off
    fails its ARP without holding a place)."""
    key_path = tmp_path / "state" / "deploy_key"
    load_or_create_key(key_path)
    nodes = [Node(name=f"node-{i}", mac=f"52:54:00:77:01:0{i}", ip=ipaddress.IPv4Address(f"127.0.0.{20 + i}"), rack="r1")
             for i in (1, 2)]
    config = ApplianceConfig(interface="lo", address=ipaddress.IPv4Interface("127.0.0.1/8"), state_dir=tmp_path / "state",
                             inventory=Inventory(tuple(nodes)), deploy=DeployConfig(ssh_key=key_path))
    driver = AgentDeployDriver(config, NodeTokens(), connect_timeout=0.5, handshakes=1)
    seen: list[str] = []
    servers = []
    for n in nodes:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = n.name) -> None:
            seen.append(f"{name} connected")
            if await reader.read(1):
                seen.append(f"{name} spoke")  # the client's SSH version line: its handshake began
            await reader.read()  # never a word of SSH: the client's handshake times out and closes
            seen.append(f"{name} closed")
            writer.close()

        server = await asyncio.start_server(silent, str(n.ip), 0)
        servers.append(server)
        driver.agent_up(n, {"ssh_port": str(server.sockets[0].getsockname()[1]), "data_port": "7070"})
    try:
        results = await asyncio.gather(*(driver.soft_reboot(n) for n in nodes), return_exceptions=True)
        assert all(isinstance(r, DeployError) for r in results), results
        for _ in range(100):
            if len(seen) == 6:
                break
            await asyncio.sleep(0.01)
        assert seen[:2] == ["node-1 connected", "node-2 connected"] or seen[:2] == ["node-2 connected", "node-1 connected"]
        first, second = seen[2].split()[0], seen[4].split()[0]
        assert seen[2:] == [f"{first} spoke", f"{first} closed", f"{second} spoke", f"{second} closed"], seen
    finally:
        for server in servers:
            server.close()


async def test_a_connection_lost_in_the_handshake_is_tried_again(tmp_path: Path) -> None:
    """An agent whose TCP connection closes in the middle of the SSH handshake (a node under load) is connected to
    again, as one whose connect failed: the post-install tries 5 times before it fails the node."""
    key_path = tmp_path / "state" / "deploy_key"
    load_or_create_key(key_path)
    node = Node(name="node-1", mac="52:54:00:77:01:01", ip=ipaddress.IPv4Address("127.0.0.31"), rack="r1")
    config = ApplianceConfig(interface="lo", address=ipaddress.IPv4Interface("127.0.0.1/8"), state_dir=tmp_path / "state",
                             inventory=Inventory((node,)), deploy=DeployConfig(ssh_key=key_path))
    driver = AgentDeployDriver(config, NodeTokens(), connect_timeout=2.0, connect_backoff_s=0.01)
    connections = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read(1)  # the client's SSH version line has begun: close in the middle of the handshake
        writer.close()

    server = await asyncio.start_server(hang_up, str(node.ip), 0)
    driver.agent_up(node, {"ssh_port": str(server.sockets[0].getsockname()[1]), "data_port": "7070"})
    env = Environment(name="tiny", version=1, owner="admin")
    try:
        with pytest.raises(DeployError, match="post-install: cannot reach the agent"):
            await driver.post_install(node, env)
    finally:
        server.close()
    assert connections == 5

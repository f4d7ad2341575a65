"""The deploy agent over real SSH on loopback: key check, shell, callback, partitioning, receive, post-install, kexec hook."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import asyncssh
import pytest
from aiohttp import web
from helpers import rootfs_tar_gz

from broadcast.agent import AgentConfig, DeployAgent
from broadcast.agent_client import AgentClient, ssh_arm
from broadcast.disk import Partition, PartitionSpec, format_partitions, sfdisk_script, write_mbr
from broadcast.errors import AgentError
from broadcast.image import SinkSpec
from broadcast.methods import BroadcastJob, run_broadcast
from broadcast.params import ChainParams
from broadcast.topology import Target
from ipxe import callback_path

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def deploy_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture
async def agent(tmp_path: Path, deploy_key: asyncssh.SSHKey) -> AsyncIterator[DeployAgent]:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)  # sparse, like a virtual node's disk
    kexecs: list[tuple[str, str | None, str]] = []

    async def hook(kernel: str, initrd: str | None, cmdline: str) -> None:
        kexecs.append((kernel, initrd, cmdline))

    a = DeployAgent(AgentConfig(name="node-1", mac="52:54:00:77:00:01", host="127.0.0.2", ssh_port=0, data_port=0,
                                authorized_keys=(deploy_key.export_public_key().decode(),), disk=str(disk),
                                workdir=str(tmp_path / "work"), token="t0ken"), kexec_hook=hook)
    a.kexecs = kexecs  # type: ignore[attr-defined]
    await a.start()
    yield a
    await a.close()


async def test_shell_command_and_only_the_deploy_key(agent: DeployAgent, deploy_key: asyncssh.SSHKey) -> None:
    async with AgentClient("127.0.0.2", agent.ssh_port, deploy_key) as c:
        r = await c.run("echo out; echo err >&2; echo $RACKBOOT_NODE; exit 3")
        assert (r.status, r.stdout, r.stderr) == (3, "out\nnode-1\n", "err\n")
        r = await c.run("cat | tr a-z A-Z", stdin=b"piped\n")
        assert r.stdout == "PIPED\n"
        assert (await c.call("status"))["name"] == "node-1"
        with pytest.raises(AgentError, match="unknown agent operation"):
            await c.call("format-everything")
        with pytest.raises(AgentError, match="missing 'session'"):
            await c.call("arm", token="x", sink={})
    intruder = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await AgentClient("127.0.0.2", agent.ssh_port, intruder).connect()


@pytest.fixture
async def callback_server() -> AsyncIterator[tuple[int, "asyncio.Queue[tuple[str, dict[str, Any]]]"]]:
    """An appliance stand-in on 127.0.0.1 that queues every POST /callback/{mac} as (mac, JSON body)."""
    received: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def callback(request: web.Request) -> web.Response:
        await received.put((request.match_info["mac"], await request.json()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/callback/{mac}", callback)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1], received  # type: ignore[union-attr]
    await runner.cleanup()


async def test_callback_with_token(agent: DeployAgent, callback_server: tuple[int, Any]) -> None:
    port, received = callback_server
    cfg = agent.config
    agent.config = AgentConfig(**{**cfg.__dict__, "callback_url": f"http://127.0.0.1:{port}{callback_path(cfg.mac)}"})
    assert await agent.callback()
    mac, body = received.get_nowait()
    assert mac == "52-54-00-77-00-01"  # ipxe.callback_path's form
    assert body["token"] == "t0ken" and body["stage"] == "agent_up" and body["ssh_port"] == agent.ssh_port
    assert body["data_port"] == agent.receiver.port


@pytest.mark.skipif(shutil.which("sfdisk") is None or shutil.which("mkfs.ext4") is None, reason="needs sfdisk and mkfs.ext4")
async def test_partition_and_format_a_file_backed_disk(agent: DeployAgent, deploy_key: asyncssh.SSHKey) -> None:
    parts = [PartitionSpec(size_mib=8, type="efi"), PartitionSpec(size_mib=16, type="swap"), PartitionSpec(type="linux", fs="ext4")]
    async with AgentClient("127.0.0.2", agent.ssh_port, deploy_key) as c:
        reply = await c.partition(parts, label="gpt")
    got = reply["partitions"]
    assert [(p["number"], p["start"], p["size"]) for p in got[:2]] == [(1, 1 << 20, 8 << 20), (2, 9 << 20, 16 << 20)]
    assert reply["formatted"] == ["3:ext4"]
    table = json.loads(subprocess.run(["sfdisk", "--json", agent.config.disk], capture_output=True, check=True).stdout)
    assert [int(p["start"]) * 512 for p in table["partitiontable"]["partitions"]] == [p["start"] for p in got]
    with open(agent.config.disk, "rb") as f:  # ext4 superblock magic 0xEF53 at byte 1080 of the partition
        f.seek(got[2]["start"] + 1080)
        assert struct.unpack("<H", f.read(2))[0] == 0xEF53


def test_mbr_fallback_is_a_standard_table(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(32 << 20)
    parts = write_mbr(disk, [PartitionSpec(size_mib=4, type="linux", bootable=True), PartitionSpec(type="swap")])
    assert [(p.start, p.size) for p in parts] == [(1 << 20, 4 << 20), (5 << 20, 27 << 20)]
    if shutil.which("sfdisk"):  # util-linux as an independent reader of our bytes
        table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, check=True).stdout)["partitiontable"]
        assert table["label"] == "dos"
        assert [(int(p["start"]) * 512, int(p["size"]) * 512, p["type"]) for p in table["partitions"]] == [
            (1 << 20, 4 << 20, "83"), (5 << 20, 27 << 20, "82")]
        assert table["partitions"][0].get("bootable") is True
    assert "size=4MiB, type=linux" in sfdisk_script([PartitionSpec(size_mib=4)], "gpt")


async def test_deploy_flow_over_ssh(agent: DeployAgent, deploy_key: asyncssh.SSHKey, tmp_path: Path) -> None:
    """arm over SSH, chain broadcast of a tar.gz, wait, post-install, kexec (the testbed's hook)."""
    image = tmp_path / "env.tar.gz"
    image.write_bytes(rootfs_tar_gz())
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    root = str(tmp_path / "work" / "root")
    target = Target("node-1", "127.0.0.2", agent.receiver.port)
    arm = ssh_arm(deploy_key, agent.ssh_port, lambda t: SinkSpec(kind="tar", compression="gzip", target=root))
    result = await run_broadcast(BroadcastJob(image=image, sha256=sha, deadline=20, params=ChainParams(stall_timeout=2)),
                                 [target], "chain", arm)
    assert result.ok == ["node-1"], result.nodes["node-1"].reason
    async with AgentClient("127.0.0.2", agent.ssh_port, deploy_key) as c:
        session = next(iter(agent.receiver.relays))
        mine = await c.wait_receive(session, timeout=5)
        assert mine["ok"] and mine["sha256"] == sha
        post = await c.postinstall([{"name": "hostname", "content": "#!/bin/sh\necho $RACKBOOT_NODE > $RACKBOOT_ROOT/etc/hostname\n"},
                                    {"name": "fails", "content": "#!/bin/sh\necho nope >&2\nexit 4\n"},
                                    {"name": "never", "content": "#!/bin/sh\ntouch $RACKBOOT_ROOT/never\n"}], root=root)
        assert not post["ok"] and [s["status"] for s in post["scripts"]] == [0, 4] and post["scripts"][1]["stderr"] == "nope\n"
        assert (Path(root) / "etc/hostname").read_text() == "node-1\n" and not (Path(root) / "never").exists()
        with pytest.raises(AgentError, match="no such file"):
            await c.kexec("boot/missing", root=root)
        assert await c.kexec("boot/vmlinuz", "boot/initrd.img", "root=/dev/vda3 quiet", root=root) == {"ok": True, "via": "hook"}
    for _ in range(100):
        if agent.kexecs:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    assert agent.kexecs == [(f"{root}/boot/vmlinuz", f"{root}/boot/initrd.img", "root=/dev/vda3 quiet")]  # type: ignore[attr-defined]


async def test_verify_reads_back_what_is_on_disk(agent: DeployAgent, deploy_key: asyncssh.SSHKey) -> None:
    with open(agent.config.disk, "r+b") as f:
        f.seek(4096)
        f.write(b"image bytes")
    async with AgentClient("127.0.0.2", agent.ssh_port, deploy_key) as c:
        good = await c.call("verify", path=agent.config.disk, offset=4096, length=11, sha256=hashlib.sha256(b"image bytes").hexdigest())
        bad = await c.call("verify", path=agent.config.disk, offset=4096, length=11, sha256="00" * 32)
    assert good["ok"] and not bad["ok"]


def test_config_from_kernel_cmdline() -> None:
    cfg = AgentConfig.from_cmdline("quiet rackboot.name=node-7 rackboot.mac=52:54:00:77:00:07 rackboot.ip=10.77.0.17 "
                                   "rackboot.callback=http://10.77.0.1:8080/callback/52-54-00-77-00-07 rackboot.token=abc rackboot.disk=/dev/vda",
                                   authorized_keys=("ssh-ed25519 AAAA",))
    assert (cfg.name, cfg.host, cfg.token, cfg.disk) == ("node-7", "10.77.0.17", "abc", "/dev/vda")
    assert cfg.callback_url == "http://10.77.0.1:8080/callback/52-54-00-77-00-07"
    with pytest.raises(AgentError, match="rackboot.mac"):
        AgentConfig.from_cmdline("rackboot.name=x rackboot.ip=1.2.3.4")


async def test_rackboot_agent_entry_point_reads_the_kernel_command_line(tmp_path: Path, deploy_key: asyncssh.SSHKey,
                                                                         callback_server: tuple[int, Any]) -> None:
    """`python -m broadcast.agent` (the rackboot-agent script an initramfs runs): cmdline and key files in, callback and SSH out."""
    import socket
    import sys

    port, received = callback_server
    with socket.socket() as s:  # a free port for the agent's SSH server
        s.bind(("127.0.0.3", 0))
        ssh_port = s.getsockname()[1]
    (tmp_path / "cmdline").write_text(
        f"console=ttyS0 rackboot.name=node-9 rackboot.mac=52:54:00:77:00:09 rackboot.ip=127.0.0.3 rackboot.token=tok9 "
        f"rackboot.callback=http://127.0.0.1:{port}/callback/52-54-00-77-00-09 rackboot.deployment=d1\n")
    (tmp_path / "authorized_keys").write_text("# the appliance's deploy key\n" + deploy_key.export_public_key().decode())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broadcast.agent", "--cmdline", str(tmp_path / "cmdline"), "--keys", str(tmp_path / "authorized_keys"),
        "--tree-key", str(tmp_path / "none"), "--workdir", str(tmp_path / "work"), "--ssh-port", str(ssh_port), "--data-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        mac, got = await asyncio.wait_for(received.get(), 30)
        assert mac == "52-54-00-77-00-09"
        assert (got["token"], got["stage"], got["name"], got["ip"], got["ssh_port"]) == ("tok9", "agent_up", "node-9", "127.0.0.3", ssh_port)
        async with AgentClient("127.0.0.3", ssh_port, deploy_key) as client:
            result = await client.run("echo $RACKBOOT_NODE $RACKBOOT_MAC")
        assert result.stdout.strip() == "node-9 52:54:00:77:00:09"
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
            async with AgentClient("127.0.0.3", ssh_port, asyncssh.generate_private_key("ssh-ed25519")) as client:
                await client.run("true")
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")
async def test_formatting_inside_a_sparse_disk_file_writes_megabytes_not_a_zeroed_journal(tmp_path: Path) -> None:
    """An 8 GiB ext4 in a sparse disk file: mke2fs zeroing its journal wrote 69 MB a node and filled the machine's
    disk at 1000-2000 testbed nodes; lazy init writes a few MB, and the filesystem is whole (e2fsck finds nothing)."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 30)
    root = Partition(number=1, start=1 << 20, size=(8 << 30) - (2 << 20), type="linux", device="", fs="ext4", label="root")
    assert await format_partitions(str(disk), [root]) == ["1:ext4"]
    assert disk.stat().st_blocks * 512 < 16 << 20, disk.stat().st_blocks * 512
    if shutil.which("e2fsck"):
        image = tmp_path / "root.img"  # e2fsck has no offset option: check a copy of the partition's first blocks' fs
        subprocess.run(["dd", f"if={disk}", f"of={image}", "bs=1M", "skip=1", "count=8190", "conv=sparse", "status=none"],
                       check=True)
        checked = subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr

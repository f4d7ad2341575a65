"""Node progress through the typed records, end to end on loopback: real packets to the real DHCP, TFTP and
HTTP services move a deployment's node through its boot stages and to `done`.

The node is played by this test with real clients: a PXE DISCOVER built by scapy, a TFTP fetch of its
per-MAC `boot.ipxe` (tftpy, from the node's address), the initrd over HTTP, the deploy agent's callback
that claims the node's token and the installed system's that redeems it. Only power and the deploy
agent's remote operations are fakes.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import tftpy
from fakes import FakeDeploy, FakePower
from helpers import BIOS_VC, make_dhcp, pxe_options, request_bytes

from appliance.auth import NodeTokens
from appliance.booting import NodeBootTargets
from appliance.catalog import Catalog, Environment
from appliance.deploy.controller import Controller, ControllerDeps
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import BootDeadlines, default_workflow
from appliance.events import EventBus
from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from appliance.statedb import open_state_db
from domain.nodes import BmcSpec, Node
from domain.profiles import BootProfile
from domain.progress import (
    AgentUp,
    DhcpFromFirmware,
    InitrdFetched,
    OsUp,
    ScriptServed,
    Via,
)
from ipxe.script import ScriptRenderer
from netboot.dhcp4.server import DhcpService
from netboot.http import HttpService, HttpSettings
from netboot.tftp.server import TftpService, TftpSettings

NODE = Node("node-1", "52:54:00:77:00:01", ipaddress.IPv4Address("127.0.0.11"), bmc=BmcSpec("fake", "10.78.0.11"))
DEADLINES = BootDeadlines(dhcp_after_reset=10, script_after_dhcp=10, kernel_after_script=10, agent_after_kernel=10,
                          os_after_script=10, kexec_alive=10, callback_after_os_dhcp=10)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Wired:
    """The boot services and the controller, wired as the composition root does, on loopback."""

    def __init__(self, tmp_path: Path) -> None:
        db = open_state_db(tmp_path / "state.db")
        self.inventory = Inventory((NODE,))
        self.events = EventBus()
        self.profiles = ProfileStore(db, BootProfile())
        self.tokens = NodeTokens()
        files = tmp_path / "files"
        (files / "deploy").mkdir(parents=True)
        (files / "deploy" / "vmlinuz").write_bytes(b"k" * 1000)
        (files / "deploy" / "initrd.img").write_bytes(b"i" * 1000)
        (tmp_path / "tftp").mkdir()
        self.http_settings = HttpSettings(address=ipaddress.IPv4Address("127.0.0.1"), port=free_port(socket.SOCK_STREAM),
                                          files=files)
        base = self.http_settings.base_url
        scripts = ScriptRenderer(NodeBootTargets(self.inventory, self.profiles), base)
        self.dhcp_setup = make_dhcp(address="127.0.0.1/8", interface="lo", nodes=(("node-1", NODE.mac, str(NODE.ip)),),
                                    port=free_port(), client_port=free_port(), broadcast_replies=True)
        self.dhcp = DhcpService(self.dhcp_setup.settings, self.dhcp_setup.reservations, self.events.publish, None)
        self.tftp = TftpService(TftpSettings(address=ipaddress.IPv4Address("127.0.0.1"), root=tmp_path / "tftp", port=0),
                                self.events.publish, self.mac_for_ip, scripts)
        self.http = HttpService(self.http_settings, self.events.publish, scripts, self.mac_for_ip,
                                tokens=self.tokens)
        self.power, self.agent = FakePower(), FakeDeploy()
        catalog = Catalog(db, tmp_path / "images")
        image = tmp_path / "image.tar"
        image.write_bytes(b"x" * 1000)
        self.env = catalog.add(Environment(name="debian12", version=1, owner="admin", visibility="public", kexec=False), image)
        deps = ControllerDeps(
            inventory=self.inventory, profiles=self.profiles, events=self.events, tokens=self.tokens,
            store=DeploymentStore(db), catalog=catalog, power=self.power, agent=self.agent, http_base=base,
            deploy_profile=BootProfile(kind="deploy", kernel="deploy/vmlinuz", initrds=("deploy/initrd.img",),
                                       cmdline="console=ttyS0"),
            power_off_wait=0.01,
        )
        self.controller = Controller(deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=DEADLINES))
        self.node_tasks: list[asyncio.Task[None]] = []
        self.xid = 0x100

    def mac_for_ip(self, ip: ipaddress.IPv4Address) -> str | None:
        node = self.inventory.by_ip.get(ipaddress.IPv4Address(str(ip)))
        return node.mac if node else None

    async def start(self) -> None:
        for service in (self.dhcp, self.tftp, self.http):
            await service.start()

    async def close(self) -> None:
        await self.controller.close()
        for task in self.node_tasks:
            task.cancel()
        for service in (self.http, self.tftp, self.dhcp):
            await service.close()

    # -- the node, played with real clients ----------------------------------------------------------

    def power_event(self, node: Node, op: str) -> None:
        """A reset or a soft reboot: the node goes through its firmware again."""
        if op in ("on", "reset", "cycle", "soft"):
            self.node_tasks.append(asyncio.get_running_loop().create_task(self.boot(node)))

    async def boot(self, node: Node) -> None:
        await asyncio.sleep(0.05)
        self.xid += 1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the PXE ROM's DISCOVER
            s.sendto(request_bytes(node.mac, "discover", xid=self.xid, options=pxe_options(0, BIOS_VC)),
                     ("127.0.0.1", self.dhcp_setup.settings.port))
        served = sum(1 for e in self.events.last(node.mac, None) if isinstance(e, ScriptServed))
        script = await self.tftp_get("boot.ipxe")  # iPXE fetches its script over TFTP
        # A real node spends seconds booting what the script names; the TFTP data plane reports the transfer from its
        # worker process, which under load can come after a callback sent at once (seen in CI: no local_boot stage).
        for _ in range(500):
            if sum(1 for e in self.events.last(node.mac, None) if isinstance(e, ScriptServed)) > served:
                break
            await asyncio.sleep(0.01)
        base = self.http_settings.base_url
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(str(node.ip), 0))) as http:
            if "kernel " in script:  # the deploy environment
                for path in ("deploy/vmlinuz", "deploy/initrd.img"):
                    async with http.get(f"{base}/files/{path}") as r:
                        assert r.status == 200
                        await r.read()
                assert "rackboot.token" not in script  # no secret in what any host can fetch
                body: dict[str, Any] = {"stage": "agent_up", "ssh_port": 22, "data_port": 7070}  # claims the token
            else:  # the installed system, with the token the post-install stamped
                body = {"stage": "installed", "token": self.tokens.token_of(node.mac), "env": self.env.ref}
            async with http.post(f"{base}/callback/{node.mac.replace(':', '-')}", json=body) as r:
                assert r.status == 200, await r.text()

    async def tftp_get(self, name: str) -> str:
        out = Path(self.http_settings.files.parent) / f"{name}.{self.xid}"
        client = tftpy.TftpClient("127.0.0.1", self.tftp.address[1], localip=str(NODE.ip))
        await asyncio.to_thread(client.download, name, str(out), timeout=2)
        return out.read_text()


@pytest.fixture
async def wired(tmp_path: Path) -> AsyncIterator[Wired]:
    w = Wired(tmp_path)
    w.power.on_change = w.power_event
    w.agent.on_reboot = w.power_event
    await w.start()
    try:
        yield w
    finally:
        await w.close()


async def test_firmware_dhcp_tftp_script_and_callbacks_move_the_node_to_done(wired: Wired) -> None:
    serve = asyncio.create_task(wired.controller.serve())
    try:
        dep = wired.controller.start([NODE], wired.env, "admin")
        result = await asyncio.wait_for(wired.controller.tasks[dep.id], 60)
    finally:
        serve.cancel()
    assert result["ok"] == ["node-1"], result
    # Each boot went through the stages the records say, classified where the packets were understood.
    stages = [e["stage"] for e in dep.log if e.get("what") == "boot"]
    assert stages == ["firmware", "loading", "starting", "up", "firmware", "local_boot", "up"], stages
    records = wired.events.last(NODE.mac, None)
    firmware = [e for e in records if isinstance(e, DhcpFromFirmware)]
    assert len(firmware) == 2 and all(e.arch == 0 for e in firmware)
    served = [(e.profile, e.via) for e in records if isinstance(e, ScriptServed)]
    assert served == [("deploy", Via.TFTP), ("local", Via.TFTP)]
    assert any(isinstance(e, InitrdFetched) for e in records)
    [up] = [e for e in records if isinstance(e, AgentUp)]
    [os_up] = [e for e in records if isinstance(e, OsUp)]
    assert up.deployment == os_up.deployment == dep.id and os_up.env == wired.env.ref
    assert wired.http.stats()["callbacks_refused"] == 0

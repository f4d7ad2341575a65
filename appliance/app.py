"""The composition root: one validated config in, every boot service built and run in one TaskGroup."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.events import EventBus
from domain.profiles import BootProfile
from appliance.profiles import ProfileStore
from appliance.service import Service
from appliance.statedb import open_state_db

log = logging.getLogger("rackboot.appliance")


class Appliance:
    """Owns the config, the event stream, the state database and every service; nothing is global."""

    def __init__(self, config: ApplianceConfig) -> None:
        from netboot.dhcp4.server import DhcpService
        from netboot.dns import DnsService
        from netboot.http import DEFAULT_DISCOVERY_PROFILE, HttpService
        from netboot.ra import RouterAdvertiser
        from netboot.tftp.server import TftpService

        self.config = config
        self.events = EventBus()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_state_db(config.state_dir / "rackboot.db")
        self.profiles = ProfileStore(self.db, DEFAULT_DISCOVERY_PROFILE if config.boot.default_profile == "discovery" else BootProfile(kind=config.boot.default_profile))
        self.dhcp = DhcpService(config, self.events, self.db)
        self.tftp = TftpService(config, self.events, mac_for_ip=self.mac_for_ip, virtual=self.tftp_virtual_file)
        self.http = HttpService(config, self.events, self.profiles, mac_for_ip=self.mac_for_ip)
        self.dns = DnsService(config)
        self._build_controller(config)
        self.services: list[Service] = [self.tftp, self.http, self.dns]
        if config.dhcp.mode != "off":
            self.services.insert(0, self.dhcp)
        if config.dhcp.router_advertisements:
            self.services.append(RouterAdvertiser(config))
        self._stop = asyncio.Event()

    def _build_controller(self, config: ApplianceConfig) -> None:
        """The deployment controller, the catalog, users and rights, and the REST API on the HTTP server."""
        from dataclasses import replace

        from appliance.api import Api
        from appliance.auth import NodeTokens, Users
        from appliance.catalog import Catalog
        from appliance.deploy.agent_driver import AgentDeployDriver
        from appliance.deploy.controller import Controller, ControllerDeps
        from appliance.deploy.power import IpmiPower, PowerByDriver
        from appliance.deploy.store import DeploymentStore
        from appliance.deploy.workflow import BootDeadlines, default_workflow

        self.users = Users(self.db)
        self.users.ensure_admin(config.state_dir / "admin.token")
        self.tokens = NodeTokens()
        self.catalog = Catalog(self.db, config.state_dir / "images")
        self.store = DeploymentStore(self.db)
        self.store.mark_interrupted()
        self.ipmi = IpmiPower(per_bmc=config.deploy.bmc_concurrency)
        self.agent = AgentDeployDriver(config, self.tokens)
        deadlines = replace(BootDeadlines(), **config.deploy.deadlines)
        d = config.deploy
        power = PowerByDriver({"ipmi": self.ipmi})
        deps = ControllerDeps(
            inventory=config.inventory, profiles=self.profiles, events=self.events, tokens=self.tokens, store=self.store,
            catalog=self.catalog, power=power, agent=self.agent, http_base=config.http_base,
            deploy_profile=BootProfile(kind="deploy", kernel=d.kernel, initrds=d.initrds, cmdline=d.cmdline, env="deploy"),
        )
        self.controller = Controller(
            deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=deadlines,
                                                reboot_window=d.reboot_window, bmc_concurrency=d.bmc_concurrency))
        self.api = Api(self.http.app, inventory=config.inventory, users=self.users, tokens=self.tokens, catalog=self.catalog,
                       controller=self.controller, deployments=self.store, power=power, exec_runner=self.agent.exec,
                       profiles=self.profiles, events=self.events, stats=self.stats, stage_dir=config.state_dir / "upload",
                       shares=self.agent.shares)

    def mac_for_ip(self, ip: ipaddress.IPv4Address | str) -> str | None:
        """Return the MAC behind a node address (inventory first, then dynamic leases)."""
        addr = ipaddress.IPv4Address(str(ip))
        node = self.config.inventory.by_ip.get(addr)
        if node is not None:
            return node.mac
        return self.dhcp.mac_for_ip(addr)

    def tftp_virtual_file(self, mac: str | None, path: str) -> bytes | None:
        """Per-MAC files rendered on the fly for TFTP: `boot.ipxe`, the node's current iPXE script (for
        firmware whose iPXE is told to fetch its script over TFTP)."""
        if mac is None or path != "boot.ipxe":
            return None
        from ipxe.script import render_script

        node = self.config.inventory.by_mac.get(mac)
        return render_script(self.profiles.get(mac), node, mac, self.config.http_base).encode()

    async def start(self) -> None:
        """Bind every socket before serving anything; on failure close what was bound and re-raise."""
        started: list[Service] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
        except BaseException:
            for service in reversed(started):
                await service.close()
            raise
        log.info("appliance bound on %s (%s): %s", self.config.interface, self.config.address, ", ".join(s.name for s in self.services))

    def stop(self) -> None:
        """Ask run() to return (SIGTERM handler)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve with every service in one TaskGroup until stop() or a service fails."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(s.serve(), name=s.name) for s in self.services]
                tasks.append(tg.create_task(self.controller.serve(), name="controller"))
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            await self.controller.close()
            for service in reversed(self.services):
                await service.close()
            self.ipmi.close()
            self.db.close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Return the counters of every service."""
        return {s.name: s.stats() for s in self.services} | {"events": {"published": self.events.published}}


async def serve_forever(config: ApplianceConfig) -> None:
    """Build the appliance, bind, serve until SIGTERM or SIGINT."""
    ready = Path(config.state_dir / "serve.ready")
    ready.unlink(missing_ok=True)
    app = Appliance(config)
    await app.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    ready.write_text(f"{os.getpid()}\n")
    try:
        await app.run()
    finally:
        ready.unlink(missing_ok=True)

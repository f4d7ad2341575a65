"""The composition root: one validated config in, every boot service built and run in one TaskGroup."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.events import EventBus
from appliance.profiles import BootProfile, ProfileStore
from appliance.service import Service
from appliance.statedb import open_state_db

log = logging.getLogger("rackboot.appliance")


class Appliance:
    """Owns the config, the event stream, the state database and every service; nothing is global."""

    def __init__(self, config: ApplianceConfig) -> None:
        from netboot.dhcp4.server import DhcpService
        from netboot.dns import DnsService
        from netboot.http import HttpService
        from netboot.ra import RouterAdvertiser
        from netboot.tftp.server import TftpService

        self.config = config
        self.events = EventBus()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_state_db(config.state_dir / "rackboot.db")
        self.profiles = ProfileStore(self.db, BootProfile(kind=config.boot.default_profile) if config.boot.default_profile != "discovery" else BootProfile())
        self.dhcp = DhcpService(config, self.events, self.db)
        self.tftp = TftpService(config, self.events, mac_for_ip=self.mac_for_ip)
        self.http = HttpService(config, self.events, self.profiles, mac_for_ip=self.mac_for_ip)
        self.dns = DnsService(config)
        self.services: list[Service] = [self.tftp, self.http, self.dns]
        if config.dhcp.mode != "off":
            self.services.insert(0, self.dhcp)
        if config.dhcp.router_advertisements:
            self.services.append(RouterAdvertiser(config))
        self._stop = asyncio.Event()

    def mac_for_ip(self, ip: ipaddress.IPv4Address | str) -> str | None:
        """Return the MAC behind a node address (inventory first, then dynamic leases)."""
        addr = ipaddress.IPv4Address(str(ip))
        node = self.config.inventory.by_ip.get(addr)
        if node is not None:
            return node.mac
        return self.dhcp.mac_for_ip(addr)

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
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            for service in reversed(self.services):
                await service.close()
            self.db.close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Return the counters of every service."""
        return {s.name: s.stats() for s in self.services} | {"events": {"published": self.events.published}}


async def serve_forever(config: ApplianceConfig) -> None:
    """Build the appliance, bind, serve until SIGTERM or SIGINT."""
    app = Appliance(config)
    await app.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    Path(config.state_dir / "serve.ready").write_text("ready\n")
    await app.run()

"""The composition root: one validated config in, every boot service built and run in one TaskGroup."""
from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from ClusterShell.NodeSet import NodeSet

from appliance.api import Api
from appliance.auth import NodeTokens, Users
from appliance.booting import DEFAULT_DISCOVERY_PROFILE, NodeBootTargets
from appliance.catalog import Catalog
from appliance.config import ApplianceConfig, load_config
from appliance.dashboard import add_dashboard
from appliance.inventory import Inventory
from appliance.logs import LogLevels, setup_serve_logging
from appliance.loopwatch import LoopWatch
from appliance.deploy.agent_driver import AgentDeployDriver
from appliance.deploy.controller import Controller, ControllerDeps
from appliance.deploy.ipmitool_power import IpmitoolPower
from appliance.deploy.power import PowerByDriver
from appliance.deploy.pyghmi_power import PyghmiPower
from appliance.deploy.store import DeploymentStore
from appliance.deploy.workflow import BootDeadlines, default_workflow
from appliance.events import EventBus
from appliance.metrics import add_metrics_route
from appliance.sdnotify import notify, watchdog_interval
from appliance.profiles import ProfileStore
from appliance.service import Service
from appliance.statedb import open_state_db
from domain.errors import ConfigError
from domain.latency import Latency
from domain.profiles import BootProfile
from domain.progress import ProfileSet
from ipxe.script import ScriptRenderer
from netboot.dhcp4.server import DhcpService
from netboot.dhcp4.ratelimit import RateLimit
from netboot.dhcp4.settings import BootPrograms, DhcpSettings, Reservation
from netboot.dns import DnsService, DnsSettings
from netboot.http import HttpService, HttpSettings
from netboot.ra import RouterAdvertiser
from netboot.tftp.server import TftpService, TftpSettings

log = logging.getLogger("rackboot.appliance")
GC_FREEZE_EVERY_S = 30.0  # while a deployment runs, what survived this long leaves the cyclic GC's sight


class Appliance:
    """Owns the config, the event stream, the state database and every service; nothing is global.

    The only place that reads the whole config: each service gets its own settings and narrow lookups.
    """

    def __init__(self, config: ApplianceConfig, log_levels: LogLevels | None = None) -> None:
        self.config = config
        self.log_levels = log_levels  # serve's: a reload applies the config's log levels again
        self._log = config.log
        inventory_macs = config.inventory.by_mac  # the Inventory is updated in place by a reload (Inventory.take)
        self.events = EventBus(keep=lambda mac: mac in inventory_macs)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = open_state_db(config.state_dir / "rackboot.db")
        default = DEFAULT_DISCOVERY_PROFILE if config.boot.default_profile == "discovery" else BootProfile(kind=config.boot.default_profile)
        self.profiles = ProfileStore(self.db, default)
        inventory = config.inventory
        discovery = DEFAULT_DISCOVERY_PROFILE if config.dhcp.unknown_macs == "discovery" else None
        self.scripts = ScriptRenderer(NodeBootTargets(inventory, self.profiles, discovery), config.http_base,
                                      local_efi=config.deploy.local_efi)
        self.users = Users(self.db)
        self.users.ensure_admin(config.state_dir / "admin.token")
        self.tokens = NodeTokens()
        self.agent = AgentDeployDriver(config, self.tokens)
        reservations = {n.mac: Reservation(n.ip, n.name) for n in inventory.nodes}
        self.dhcp = DhcpService(dhcp_settings(config), reservations, self.events.publish, self.db,
                                journal=config.state_dir / "dhcp4-leases.journal")
        self.tftp = TftpService(tftp_settings(config), self.events.publish, self.mac_for_ip, self.scripts)
        self.http = HttpService(http_settings(config), self.events.publish, self.scripts, self.mac_for_ip,
                                tokens=self.tokens, shared_images=self.agent.shares.get)
        self.dns = DnsService(dns_settings(config), {n.name: n.ip for n in inventory.nodes})
        self.loop_watch = LoopWatch()
        self._build_controller(config)
        self.services: list[Service] = [self.tftp, self.http, self.dns]
        if config.dhcp.mode != "off":
            self.services.insert(0, self.dhcp)
        if config.dhcp.router_advertisements:
            self.services.append(RouterAdvertiser(config.interface))
        self._stop = asyncio.Event()

    def _build_controller(self, config: ApplianceConfig) -> None:
        """The deployment controller, the catalog, users and rights, and the REST API on the HTTP server."""
        self.catalog = Catalog(self.db, config.state_dir / "images")
        self.store = DeploymentStore(self.db)
        self._recover_interrupted(self.store.mark_interrupted())
        self.ipmi = IpmitoolPower() if config.deploy.ipmi_client == "ipmitool" else PyghmiPower()
        deadlines = replace(BootDeadlines(), **config.deploy.deadlines)
        d = config.deploy
        power = PowerByDriver({"ipmi": self.ipmi})
        deps = ControllerDeps(
            inventory=config.inventory, profiles=self.profiles, events=self.events, tokens=self.tokens, store=self.store,
            catalog=self.catalog, power=power, agent=self.agent, http_base=config.http_base,
            deploy_profile=BootProfile(kind="deploy", kernel=d.kernel, initrds=d.initrds, cmdline=d.cmdline, env="deploy"),
            loop_stalled=self.loop_watch.stalled_seconds,
        )
        self.controller = Controller(
            deps, lambda method, kexec: replace(default_workflow(method, kexec), deadlines=deadlines,
                                                reboot_window=d.reboot_window))
        add_metrics_route(self.http.app, self.stats, self._live_node_states, self.latencies)
        self.api = Api(self.http.app, inventory=config.inventory, users=self.users, catalog=self.catalog,
                       controller=self.controller, deployments=self.store, power=power, exec_runner=self.agent.exec,
                       profiles=self.profiles, events=self.events, stats=self.stats, stage_dir=config.state_dir / "upload",
                       image_files=(config.http.files,))
        add_dashboard(self.http.app)

    def _live_node_states(self) -> list[tuple[str, str]]:
        """(deployment status, node state) of every node of the deployments in memory, for /metrics."""
        return [(dep.status, str(run.state)) for dep in self.controller.deployments.values() for run in dep.runs.values()]

    def _recover_interrupted(self, interrupted: list[tuple[str, str, str]]) -> None:
        """Nodes of deployments a restart interrupted: none stays on the deploy environment, whose token died."""
        stranded = []
        for dep_id, name, state in interrupted:
            node = self.config.inventory.by_name.get(name)
            if node is not None and self.profiles.get(node.mac).kind == "deploy":
                stranded.append(node)
            log.warning("deployment %s was interrupted: %s was in %s", dep_id, name, state)
        if stranded:
            # The default profile (nothing, or local disk): the nodes wait for the next deployment.
            self.profiles.set([n.mac for n in stranded], self.profiles.default)
            for node in stranded:
                self.events.publish(ProfileSet(node.mac, self.profiles.default.kind, "", "restart"))

    def reload(self) -> str:
        """Reload the inventory from the config's files (SIGHUP): check-config first; new, changed and removed
        nodes take effect at once, except nodes of a running deployment, which keep their entry until it ends
        (the next reload applies it). Leases, profiles and deployments are kept. Return what changed; raise
        ConfigError (nothing changed) when the files do not validate or the result would be inconsistent."""
        fresh = load_config(self.config.source)
        ignored = [f for f in ("interface", "address", "state_dir", "dhcp", "tftp", "http", "dns", "boot", "deploy")
                   if getattr(fresh, f) != getattr(self.config, f)]
        log_changed = fresh.log != self._log
        old = self.config.inventory
        new_by_name = dict(fresh.inventory.by_name)
        busy = set(self.controller.busy([n.name for n in old.nodes]))
        kept = []
        for name in sorted(busy):
            if new_by_name.get(name) != old.by_name[name]:
                new_by_name[name] = old.by_name[name]  # its deployment holds this entry: it waits
                kept.append(name)
        nodes = [new_by_name[n.name] for n in fresh.inventory.nodes if n.name in new_by_name]
        nodes += [old.by_name[name] for name in kept if name not in fresh.inventory.by_name]
        merged = Inventory(tuple(nodes), fresh.inventory.source, origin=dict(fresh.inventory.origin))
        if len(merged.by_mac) != len(nodes) or len(merged.by_ip) != len(nodes):
            raise ConfigError([f"{', '.join(kept)}: being deployed, their old entries clash with the new inventory's "
                               f"MACs or addresses: reload again when the deployment has ended"])
        added = sorted(set(merged.by_name) - set(old.by_name))
        removed = sorted(set(old.by_name) - set(merged.by_name))
        changed = sorted(n for n in set(merged.by_name) & set(old.by_name) if merged.by_name[n] != old.by_name[n])
        old.take(merged)  # every holder of the inventory (API, controller, scripts, this) sees it now
        self.dhcp.set_reservations({n.mac: Reservation(n.ip, n.name) for n in merged.nodes})
        self.dns.set_hosts({n.name: n.ip for n in merged.nodes})
        if self.log_levels is not None:
            self.log_levels.apply(fresh.log)
            self._log = fresh.log
        summary = (f"inventory reloaded: {len(merged)} nodes; added {_names(added)}, changed {_names(changed)}, "
                   f"removed {_names(removed)}")
        if kept:
            summary += f"; {_names(kept)} kept as they were until their deployment ends"
        if log_changed and self.log_levels is not None:
            summary += "; log levels applied"
        if ignored:
            summary += f"; changes to {', '.join(ignored)} need a restart"
        log.info("%s", summary)
        return summary

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
                tasks.append(tg.create_task(self.controller.serve(), name="controller"))
                self.loop_watch.install()
                tasks.append(tg.create_task(self.loop_watch.watch(), name="loop-watch"))
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            self.loop_watch.uninstall()
            await self.controller.close()
            for service in reversed(self.services):
                await service.close()
            self.ipmi.close()
            self.db.close()

    def latencies(self) -> dict[str, dict[str, Latency]]:
        """Return the latency histograms every service keeps (for /metrics)."""
        return ({s.name: dict(getattr(s, "latency", {})) for s in self.services if getattr(s, "latency", None)}
                | {"bmc": dict(self.ipmi.latency), "loop": dict(self.loop_watch.latency)})

    def stats(self) -> dict[str, dict[str, int]]:
        """Return the counters of every service."""
        return ({s.name: s.stats() for s in self.services} | {"events": {"published": self.events.published}}
                | {"bmc": self.ipmi.stats(), "loop": self.loop_watch.stats()})


async def serve_forever(config: ApplianceConfig) -> None:
    """Build the appliance, bind, serve until SIGTERM or SIGINT."""
    ready = Path(config.state_dir / "serve.ready")
    ready.unlink(missing_ok=True)
    if sys.version_info < (3, 12):
        _watch_children_by_pidfd()
    app = Appliance(config, setup_serve_logging(config.log))
    await app.start()
    # What start-up made (modules, classes, the config, the inventory: ~200,000 objects) lives as long as the
    # process: out of the cyclic GC's sight, a full collection walks only what serving makes, and stops
    # pausing the event loop for 100-200 ms (docs/benchmarks.md, "Where rackboot's DHCP time goes").
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    loop.add_signal_handler(signal.SIGHUP, _reload, app)
    ready.write_text(f"{os.getpid()}\n")
    notify(f"READY=1\nSTATUS=serving {', '.join(s.name for s in app.services)} on {config.interface}")
    freezer = asyncio.create_task(_freeze_while_deploying(app.controller), name="gc-freeze")
    watchdog = None
    interval = watchdog_interval()
    if interval is not None:
        watchdog = asyncio.create_task(_watchdog(interval), name="watchdog")
    try:
        await app.run()
    finally:
        notify("STOPPING=1")
        freezer.cancel()
        if watchdog is not None:
            watchdog.cancel()
        ready.unlink(missing_ok=True)


def _reload(app: Appliance) -> None:
    """SIGHUP: reload the inventory; a config that does not validate changes nothing and says why."""
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        summary = app.reload()
    except ConfigError as exc:
        log.error("reload refused, nothing changed: %s", "; ".join(exc.problems))
        notify("READY=1\nSTATUS=reload refused: the config does not validate (see the log)")
        return
    notify(f"READY=1\nSTATUS={summary}")


def _names(names: list[str]) -> str:
    """A node set for a log line ('-' when empty)."""
    return str(NodeSet.fromlist(names)) if names else "-"


def _watch_children_by_pidfd() -> None:
    """Wait for child processes (ipmitool, one a BMC call) through a pidfd the loop reads, not a thread each.

    Python 3.11's default watcher starts a thread per child to block in waitpid: thousands of reboots start as many
    threads next to the loop. 3.12 uses pidfds by itself (PidfdChildWatcher, Linux 5.3 and later)."""
    watcher = asyncio.PidfdChildWatcher()
    asyncio.get_event_loop_policy().set_child_watcher(watcher)  # type: ignore[attr-defined, unused-ignore]
    watcher.attach_loop(asyncio.get_running_loop())


async def _freeze_while_deploying(controller: Controller) -> None:
    """While a deployment runs, move what survived into the cyclic GC's permanent generation every
    GC_FREEZE_EVERY_S: a deployment of thousands of nodes grows the heap (runs, watches, journal entries), and
    every full collection would walk all of it with the loop stopped (2.1 s seen at 4000 nodes, docs/scale.md).
    Once no deployment runs, all is given back to the collector, collected once, and frozen again."""
    frozen = False
    while True:
        await asyncio.sleep(GC_FREEZE_EVERY_S)
        if any(not task.done() for task in controller.tasks.values()):
            gc.freeze()
            frozen = True
        elif frozen:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            frozen = False


async def _watchdog(interval: float) -> None:
    """Ping systemd's watchdog while the event loop turns: a stuck loop stops the pings and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _nbp_names(config: ApplianceConfig) -> tuple[str, ...]:
    boot = config.boot
    return tuple(n for n in (boot.bios_nbp, boot.uefi_nbp, boot.arm64_nbp) if n)


def dhcp_settings(config: ApplianceConfig) -> DhcpSettings:
    """The DHCP service's settings from the appliance config."""
    d, b = config.dhcp, config.boot
    return DhcpSettings(
        interface=config.interface, address=config.address,
        boot=BootPrograms(http_base=config.http_base, bios_nbp=b.bios_nbp, uefi_nbp=b.uefi_nbp, arm64_nbp=b.arm64_nbp),
        mode=d.mode, port=d.port, client_port=d.client_port, proxy_port=d.proxy_port, lease_time=d.lease_time,
        pool=d.pool, router=d.router, dns_servers=d.dns_servers, domain=config.dns.domain,
        discovery=d.unknown_macs == "discovery", broadcast_replies=d.broadcast_replies,
        unknown_rate=RateLimit(d.unknown_rate, d.unknown_burst) if d.unknown_rate is not None else None,
        relayed_subnets=d.relayed_subnets,
    )


def tftp_settings(config: ApplianceConfig) -> TftpSettings:
    """The TFTP service's settings from the appliance config."""
    t = config.tftp
    return TftpSettings(address=config.ip, root=t.root, ipxe_dir=config.boot.ipxe_dir, nbp_names=_nbp_names(config),
                        port=t.port, interface=config.interface, max_blksize=t.max_blksize,
                        max_windowsize=t.max_windowsize, timeout=t.timeout, retries=t.retries, max_sessions=t.max_sessions,
                        max_sessions_per_host=t.max_sessions_per_host, data_workers=_data_workers(t.data_workers),
                        busy_poll=t.busy_poll)


def _data_workers(configured: int | None) -> int:
    """TFTP data-plane worker processes: as configured, or one per CPU when there are 2 or more (else the thread)."""
    if configured is not None:
        return configured
    cpus = os.cpu_count() or 1
    return cpus if cpus > 1 else 0


def http_settings(config: ApplianceConfig) -> HttpSettings:
    """The HTTP service's settings from the appliance config."""
    h = config.http
    return HttpSettings(address=config.ip, port=h.port, files=h.files, ipxe_dir=config.boot.ipxe_dir,
                        nbp_names=_nbp_names(config), interface=config.interface, tls_cert=h.tls_cert,
                        tls_key=h.tls_key, tls_port=h.tls_port)


def dns_settings(config: ApplianceConfig) -> DnsSettings:
    """The DNS service's settings from the appliance config."""
    n = config.dns
    return DnsSettings(interface=config.interface, address=config.address, domain=n.domain, port=n.port, ttl=n.ttl,
                       unknown=n.unknown, upstream=n.upstream)

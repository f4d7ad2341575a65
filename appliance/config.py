"""The appliance configuration: one YAML file, validated once into typed, frozen options."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from appliance.deploy.workflow import BootDeadlines
from appliance.inventory import Inventory, load_inventory
from appliance.yamlsource import Located, load_yaml_mapping
from domain.errors import ConfigError
from netboot.dhcp4.ratelimit import parse_rate
from netboot.dhcp4.settings import DEFAULT_UNKNOWN_RATE, RelayedSubnet

DHCP_MODES = ("authoritative", "proxy", "off")
UNKNOWN_MAC_POLICIES = ("ignore", "discovery")
DNS_UNKNOWN_POLICIES = ("refuse", "forward")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class DhcpConfig:
    """DHCP responder options."""

    mode: str = "authoritative"
    port: int = 67
    client_port: int = 68
    proxy_port: int = 4011
    lease_time: int = 3600
    pool: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    router: ipaddress.IPv4Address | None = None
    dns_servers: tuple[ipaddress.IPv4Address, ...] = ()
    unknown_macs: str = "ignore"
    router_advertisements: bool = True
    broadcast_replies: bool = False
    unknown_rate: float | None = DEFAULT_UNKNOWN_RATE.rate   # requests/s per relay circuit, relay or port from non-inventory MACs; None: off
    unknown_burst: int = DEFAULT_UNKNOWN_RATE.burst
    relayed_subnets: tuple[RelayedSubnet, ...] = ()   # networks of nodes behind DHCP relays (authoritative mode)


@dataclass(frozen=True)
class TftpConfig:
    """TFTP server options."""

    port: int = 69
    root: Path = Path("/var/lib/rackboot/tftp")
    max_blksize: int = 1468
    max_windowsize: int = 64
    timeout: float = 1.0
    retries: int = 6
    max_sessions: int = 4096
    max_sessions_per_host: int = 64
    data_workers: int | None = None  # data-plane worker processes; None: one per CPU when there are 2 or more
    busy_poll: float = 0.0001  # seconds the data plane polls without sleeping after answering, when few transfers run


@dataclass(frozen=True)
class HttpConfig:
    """HTTP server options (iPXE scripts, files, API)."""

    port: int = 8080
    files: Path = Path("/var/lib/rackboot/files")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int = 8443


@dataclass(frozen=True)
class DnsConfig:
    """DNS responder options."""

    domain: str = "cluster.test"
    port: int = 53
    ttl: int = 60
    unknown: str = "refuse"
    upstream: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class BootConfig:
    """Network boot programs and the profile given to nodes that have none."""

    ipxe_dir: Path = Path("/usr/lib/ipxe")
    bios_nbp: str = "undionly.kpxe"
    uefi_nbp: str = "snponly.efi"
    arm64_nbp: str | None = None
    default_profile: str = "none"


@dataclass(frozen=True)
class DeployConfig:
    """The deploy environment (RAM-disk system with the agent) and how the controller drives nodes."""

    kernel: str = "deploy/vmlinuz"
    initrds: tuple[str, ...] = ("deploy/initrd.img",)
    cmdline: str = "console=ttyS0"
    # What iPXE chains on UEFI nodes whose profile is "local": GRUB that boots the node's disk (`rackboot build
    # deploy-env` puts it there); empty: iPXE exits with an error status, so the firmware tries its next boot option.
    local_efi: str = "deploy/localboot-x64.efi"
    ssh_key: Path = Path("/var/lib/rackboot/deploy_key")
    ssh_port: int = 22
    reboot_window: int = 100
    deadlines: dict[str, float] = field(default_factory=dict)
    # The IPMI client: ipmitool (a process a call) or pyghmi (in-process; deadlocks at ~100 BMCs with failing ones)
    ipmi_client: str = "ipmitool"


@dataclass(frozen=True)
class LogConfig:
    """Log levels, by logger name, and the HTTP access log: applied when serve starts and at each reload."""

    level: str | None = None  # the root logger's; None: the command line's (info for serve, debug with -vv)
    levels: tuple[tuple[str, str], ...] = ()  # (logger name, level), e.g. ("rackboot.dhcp", "debug")
    http_access: bool = False  # the HTTP access log (logger rackboot.http.access, at info)


@dataclass(frozen=True)
class ApplianceConfig:
    """Everything the appliance needs, validated once."""

    interface: str
    address: ipaddress.IPv4Interface
    state_dir: Path
    inventory: Inventory
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = ""

    @property
    def ip(self) -> ipaddress.IPv4Address:
        """The appliance's own address on the node-facing interface."""
        return self.address.ip

    @property
    def http_base(self) -> str:
        """The base URL nodes use to reach the HTTP server."""
        return f"http://{self.address.ip}:{self.http.port}"


class _Reader:
    """Collects problems while reading typed values out of a Located mapping."""

    def __init__(self, loc: Located, problems: list[str], allowed: tuple[str, ...]) -> None:
        self.loc = loc
        self.problems = problems
        for key in loc.keys():
            if key not in allowed:
                problems.append(f"{loc.at(key)}: {loc.name(key)}: unknown key (expected one of: {', '.join(allowed)})")

    def get(self, key: str, default: Any, convert: Callable[[Any], Any], what: str) -> Any:
        """Return the converted value of key, or default; record a problem when conversion fails."""
        if not self.loc.has(key) or self.loc.raw(key) is None:
            return default
        raw = self.loc.raw(key)
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            self.problems.append(f"{self.loc.at(key)}: {self.loc.name(key)}: expected {what}, got {raw!r}{detail}")
            return default

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """Return a value that must be one of choices."""
        def conv(v: Any) -> str:
            if isinstance(v, bool):
                # YAML 1.1 reads unquoted off/on/yes/no as booleans
                raise ValueError("YAML read an unquoted off/on/yes/no as a boolean: quote it, e.g. 'off'")
            if str(v) not in choices:
                raise ValueError("")
            return str(v)
        return self.get(key, default, conv, "one of " + " | ".join(choices))

    def port(self, key: str, default: int) -> int:
        """Return a TCP/UDP port number."""
        def conv(v: Any) -> int:
            if isinstance(v, bool) or int(v) != v or not 0 <= int(v) <= 65535:
                raise ValueError("")
            return int(v)
        return self.get(key, default, conv, "a port number 0-65535")

    def positive(self, key: str, default: Any, kind: type = int) -> Any:
        """Return a positive number."""
        def conv(v: Any) -> Any:
            if isinstance(v, bool) or kind(v) <= 0:
                raise ValueError("")
            return kind(v)
        return self.get(key, default, conv, f"a positive {kind.__name__}")

    def boolean(self, key: str, default: bool) -> bool:
        """Return a boolean."""
        def conv(v: Any) -> bool:
            if not isinstance(v, bool):
                raise ValueError("")
            return v
        return self.get(key, default, conv, "true or false")


def _pool(v: Any) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    first, _, last = str(v).partition("-")
    a, b = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
    if b < a:
        raise ValueError("the range ends before it starts")
    return (a, b)


def _relayed_subnets(v: Any) -> tuple[RelayedSubnet, ...]:
    """A list of {network: CIDR, router: ADDRESS}: the networks whose relays forward to us, none overlapping."""
    if not isinstance(v, list):
        raise ValueError("a list of {network: 10.80.0.0/24, router: 10.80.0.1}")
    out: list[RelayedSubnet] = []
    for i, item in enumerate(v):
        if not isinstance(item, dict) or set(item) - {"network", "router"} or "network" not in item:
            raise ValueError(f"item {i}: expected a mapping with network (and router), like {{network: 10.80.0.0/24, router: 10.80.0.1}}")
        try:
            net = ipaddress.IPv4Network(str(item["network"]))
        except ValueError as exc:
            raise ValueError(f"item {i}: network: {exc}") from None
        router = ipaddress.IPv4Address(str(item["router"])) if item.get("router") is not None else None
        if router is not None and (router not in net or router in (net.network_address, net.broadcast_address)):
            raise ValueError(f"item {i}: router {router} is not a host address of {net}")
        for other in out:
            if net.overlaps(other.network):
                raise ValueError(f"item {i}: {net} overlaps {other.network}")
        out.append(RelayedSubnet(net, router))
    return tuple(out)


def _rate(v: Any) -> float | None:
    if v is False or str(v) == "off":  # an unquoted off is read as false by YAML 1.1: both mean off here
        return None
    if isinstance(v, bool):
        raise ValueError("")
    return parse_rate(str(v))


def _upstream(v: Any) -> tuple[tuple[str, int], ...]:
    items = v if isinstance(v, list) else [v]
    out = []
    for item in items:
        host, _, port = str(item).rpartition(":") if str(item).count(":") == 1 else (str(item), "", "53")
        ipaddress.ip_address(host)
        out.append((host, int(port)))
    return tuple(out)


def _network_of(ip: ipaddress.IPv4Address, own: ipaddress.IPv4Network,
                relayed: tuple[RelayedSubnet, ...]) -> ipaddress.IPv4Network | None:
    """The network of the appliance's (its own, or one behind a relay) an address is on."""
    return next((net for net in (own, *(s.network for s in relayed)) if ip in net), None)


def load_config(path: str | Path) -> ApplianceConfig:
    """Load the appliance config and its inventory; raise ConfigError listing every problem with file:line."""
    path = Path(path)
    root = load_yaml_mapping(path)
    problems: list[str] = []
    top = _Reader(root, problems, ("interface", "address", "state_dir", "http_port", "dhcp", "tftp", "http", "dns", "boot", "deploy", "inventory",
                                        "log"))
    for required in ("interface", "address", "inventory"):
        if not root.has(required):
            problems.append(f"{root.where}: {required}: missing (required)")
    interface = top.get("interface", "", lambda v: _nonempty(str(v)), "an interface name")
    address = top.get("address", ipaddress.IPv4Interface("0.0.0.0/32"), _iface, "an IPv4 address with prefix, like 10.77.0.1/24")
    state_dir = top.get("state_dir", Path("/var/lib/rackboot"), lambda v: (path.parent / str(v)).resolve(), "a directory")
    http_port = top.port("http_port", 8080)

    dhcp = DhcpConfig()
    if (d := _child(root, "dhcp", problems)) is not None:
        r = _Reader(d, problems, ("mode", "port", "client_port", "proxy_port", "lease_time", "pool", "router", "dns_servers", "unknown_macs", "router_advertisements", "broadcast_replies",
                                     "unknown_rate", "unknown_burst", "relayed_subnets"))
        dhcp = DhcpConfig(
            mode=r.choice("mode", "authoritative", DHCP_MODES),
            port=r.port("port", 67),
            client_port=r.port("client_port", 68),
            proxy_port=r.port("proxy_port", 4011),
            lease_time=r.positive("lease_time", 3600),
            pool=r.get("pool", None, _pool, "an address range like 10.77.0.100-10.77.0.199"),
            router=r.get("router", None, ipaddress.IPv4Address, "an IPv4 address"),
            dns_servers=r.get("dns_servers", (), lambda v: tuple(ipaddress.IPv4Address(x) for x in (v if isinstance(v, list) else [v])), "a list of IPv4 addresses"),
            unknown_macs=r.choice("unknown_macs", "ignore", UNKNOWN_MAC_POLICIES),
            router_advertisements=r.boolean("router_advertisements", True),
            broadcast_replies=r.boolean("broadcast_replies", False),
            unknown_rate=r.get("unknown_rate", DEFAULT_UNKNOWN_RATE.rate, _rate, "a rate like 200/s or 6000/min, or 'off'"),
            unknown_burst=r.positive("unknown_burst", DEFAULT_UNKNOWN_RATE.burst),
            relayed_subnets=r.get("relayed_subnets", (), _relayed_subnets, "networks behind DHCP relays"),
        )
        for subnet in dhcp.relayed_subnets:
            if address.ip.packed != b"\0\0\0\0" and subnet.network.overlaps(address.network):
                problems.append(f"{d.at('relayed_subnets')}: dhcp.relayed_subnets: {subnet.network} overlaps the appliance's "
                                f"own network {address.network}")
        if dhcp.pool and address.ip.packed != b"\0\0\0\0":
            for end in dhcp.pool:
                if end not in address.network:
                    problems.append(f"{d.at('pool')}: dhcp.pool: {end} is outside {address.network}")

    tftp = TftpConfig(root=state_dir / "tftp")
    if (t := _child(root, "tftp", problems)) is not None:
        r = _Reader(t, problems, ("port", "root", "max_blksize", "max_windowsize", "timeout", "retries", "max_sessions",
                                     "max_sessions_per_host", "data_workers", "busy_poll"))
        tftp = TftpConfig(
            port=r.port("port", 69),
            root=r.get("root", state_dir / "tftp", lambda v: (path.parent / str(v)).resolve(), "a directory"),
            max_blksize=r.get("max_blksize", 1468, lambda v: _int_range(v, 8, 65464), "an integer 8-65464 (RFC 2348)"),
            max_windowsize=r.get("max_windowsize", 64, lambda v: _int_range(v, 1, 65535), "an integer 1-65535 (RFC 7440)"),
            timeout=r.positive("timeout", 1.0, float),
            retries=r.positive("retries", 6),
            max_sessions=r.positive("max_sessions", 4096),
            max_sessions_per_host=r.positive("max_sessions_per_host", 64),
            data_workers=r.get("data_workers", None, _workers, "'auto' or an integer 0-64"),
            busy_poll=r.get("busy_poll", 0.0001, _busy_poll, "seconds, 0-0.01"),
        )

    http = HttpConfig(port=http_port, files=state_dir / "files")
    if (h := _child(root, "http", problems)) is not None:
        r = _Reader(h, problems, ("files", "tls_cert", "tls_key", "tls_port"))
        a_file = lambda v: (path.parent / str(v)).resolve()  # noqa: E731
        http = HttpConfig(
            port=http_port,
            files=r.get("files", state_dir / "files", a_file, "a directory"),
            tls_cert=r.get("tls_cert", None, a_file, "a PEM file"),
            tls_key=r.get("tls_key", None, a_file, "a PEM file"),
            tls_port=r.port("tls_port", 8443),
        )
        if (http.tls_cert is None) != (http.tls_key is None):
            problems.append(f"{h.where}: http: tls_cert and tls_key go together")
        for key, value in (("tls_cert", http.tls_cert), ("tls_key", http.tls_key)):
            if value is not None and not value.is_file():
                problems.append(f"{h.at(key)}: http.{key}: no such file {value}")

    dns = DnsConfig()
    if (n := _child(root, "dns", problems)) is not None:
        r = _Reader(n, problems, ("domain", "port", "ttl", "unknown", "upstream"))
        dns = DnsConfig(
            domain=r.get("domain", "cluster.test", lambda v: _nonempty(str(v).strip(".").lower()), "a domain name"),
            port=r.port("port", 53),
            ttl=r.positive("ttl", 60),
            unknown=r.choice("unknown", "refuse", DNS_UNKNOWN_POLICIES),
            upstream=r.get("upstream", (), _upstream, "a list of upstream resolvers (ADDR or ADDR:PORT)"),
        )
        if dns.unknown == "forward" and not dns.upstream:
            problems.append(f"{n.at('unknown')}: dns.unknown: 'forward' needs dns.upstream")

    boot = BootConfig()
    if (b := _child(root, "boot", problems)) is not None:
        r = _Reader(b, problems, ("ipxe_dir", "bios_nbp", "uefi_nbp", "arm64_nbp", "default_profile"))
        boot = BootConfig(
            ipxe_dir=r.get("ipxe_dir", Path("/usr/lib/ipxe"), lambda v: (path.parent / str(v)).resolve(), "a directory"),
            bios_nbp=r.get("bios_nbp", "undionly.kpxe", str, "a file name"),
            uefi_nbp=r.get("uefi_nbp", "snponly.efi", str, "a file name"),
            arm64_nbp=r.get("arm64_nbp", None, str, "a file name"),
            default_profile=r.choice("default_profile", "none", ("none", "local", "discovery")),
        )

    deploy = DeployConfig(ssh_key=state_dir / "deploy_key")
    if (dp := _child(root, "deploy", problems)) is not None:
        deadline_keys = tuple(k for k in BootDeadlines.__dataclass_fields__ if k != "nbp_loop_limit")
        r = _Reader(dp, problems, ("kernel", "initrds", "cmdline", "local_efi", "ssh_key", "ssh_port", "reboot_window", "deadlines",
                                     "ipmi_client"))
        deadlines: dict[str, float] = {}
        if (dl := _child(dp, "deadlines", problems)) is not None:
            rd = _Reader(dl, problems, deadline_keys)
            deadlines = {k: rd.positive(k, 0.0, float) for k in dl.keys() if k in deadline_keys}
        deploy = DeployConfig(
            kernel=r.get("kernel", "deploy/vmlinuz", str, "a path under http.files or a URL"),
            initrds=r.get("initrds", ("deploy/initrd.img",), lambda v: tuple(str(x) for x in (v if isinstance(v, list) else [v])), "a list of paths"),
            cmdline=r.get("cmdline", "console=ttyS0", str, "a kernel command line"),
            local_efi=r.get("local_efi", "deploy/localboot-x64.efi", str, "a path under http.files or a URL, or ''"),
            ssh_key=r.get("ssh_key", state_dir / "deploy_key", lambda v: (path.parent / str(v)).resolve(), "a private key file"),
            ssh_port=r.port("ssh_port", 22),
            reboot_window=r.positive("reboot_window", 100),
            deadlines=deadlines,
            ipmi_client=r.choice("ipmi_client", "ipmitool", ("ipmitool", "pyghmi")),
        )

    log_config = LogConfig()
    if (lg := _child(root, "log", problems)) is not None:
        r = _Reader(lg, problems, ("level", "levels", "http_access"))
        named: list[tuple[str, str]] = []
        if (lv := _child(lg, "levels", problems)) is not None:
            rl = _Reader(lv, problems, tuple(lv.keys()))  # any logger name: rackboot.dhcp, aiohttp.server, ...
            named = [(name, level) for name in lv.keys() if (level := rl.get(name, None, _level, _LEVEL_WHAT))]
        log_config = LogConfig(level=r.get("level", None, _level, _LEVEL_WHAT), levels=tuple(named),
                               http_access=r.boolean("http_access", False))

    inventory: Inventory | None = None
    inv_name = root.raw("inventory")
    if inv_name:
        inv_path = path.parent / str(inv_name)
        if not inv_path.is_file():
            problems.append(f"{root.at('inventory')}: inventory: no such file {inv_path}")
        else:
            try:
                inventory = load_inventory(inv_path)
            except ConfigError as exc:
                problems.extend(exc.problems)
    if inventory is not None and address.ip.packed != b"\0\0\0\0":
        for node in inventory.nodes:
            where = inventory.origin.get(node.name, inventory.source)
            if node.ip == address.ip:
                problems.append(f"{where}: node {node.name} has the appliance's own address {node.ip}")
            elif (network := _network_of(node.ip, address.network, dhcp.relayed_subnets)) is None:
                problems.append(f"{where}: node {node.name}: {node.ip} is outside the appliance's network {address.network}"
                                + (" and every dhcp.relayed_subnets network" if dhcp.relayed_subnets else
                                   " (nodes behind a DHCP relay need their network in dhcp.relayed_subnets)"))
            elif node.ip in (network.network_address, network.broadcast_address):
                problems.append(f"{where}: node {node.name}: {node.ip} is the network's own or broadcast address")
            elif any(node.ip == s.router for s in dhcp.relayed_subnets):
                problems.append(f"{where}: node {node.name}: {node.ip} is the router of its network (dhcp.relayed_subnets)")
            if dhcp.pool and dhcp.pool[0] <= node.ip <= dhcp.pool[1]:
                problems.append(f"{where}: node {node.name}: {node.ip} lies inside the dynamic pool")
    if problems or inventory is None:
        raise ConfigError(problems or [f"{path}: no inventory"])
    return ApplianceConfig(
        interface=interface, address=address, state_dir=state_dir, inventory=inventory,
        dhcp=dhcp, tftp=tftp, http=http, dns=dns, boot=boot, deploy=deploy, log=log_config, source=str(path),
    )


def _child(root: Located, key: str, problems: list[str]) -> Located | None:
    try:
        return root.child(key)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


_LEVEL_WHAT = "a log level: " + " | ".join(LOG_LEVELS)


def _level(v: Any) -> str:
    if isinstance(v, bool) or str(v).lower() not in LOG_LEVELS:
        raise ValueError("")
    return str(v).lower()


def _nonempty(s: str) -> str:
    if not s:
        raise ValueError("empty")
    return s


def _iface(v: Any) -> ipaddress.IPv4Interface:
    if "/" not in str(v):
        raise ValueError("a prefix length is required")
    return ipaddress.IPv4Interface(str(v))


def _workers(value: Any) -> int | None:
    """'auto' (None) or a count of worker processes."""
    if value == "auto":
        return None
    return _int_range(value, 0, 64)


def _busy_poll(value: Any) -> float:
    """Seconds of busy polling, 0 (off) to 10 ms."""
    if isinstance(value, bool) or not 0 <= float(value) <= 0.01:
        raise ValueError("")
    return float(value)


def _int_range(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or int(v) != v or not lo <= int(v) <= hi:
        raise ValueError("")
    return int(v)


def summarize(config: ApplianceConfig) -> str:
    """Return a human summary of a validated config, as check-config prints it."""
    inv = config.inventory
    racks: dict[str, int] = {}
    for n in inv.nodes:
        racks[n.rack or "-"] = racks.get(n.rack or "-", 0) + 1
    with_bmc = sum(1 for n in inv.nodes if n.bmc is not None)
    from ClusterShell.NodeSet import NodeSet

    lines = [
        f"config    {config.source}: OK",
        f"interface {config.interface} address {config.address}",
        f"state     {config.state_dir}",
        f"dhcp      mode={config.dhcp.mode} port={config.dhcp.port}"
        + (f" pool={config.dhcp.pool[0]}-{config.dhcp.pool[1]}" if config.dhcp.pool else "")
        + f" unknown_macs={config.dhcp.unknown_macs} ra={'on' if config.dhcp.router_advertisements else 'off'}"
        + (f" unknown_rate={config.dhcp.unknown_rate:g}/s burst {config.dhcp.unknown_burst}"
           if config.dhcp.unknown_rate is not None else " unknown_rate=off"),
        f"tftp      port={config.tftp.port} root={config.tftp.root} blksize<={config.tftp.max_blksize} windowsize<={config.tftp.max_windowsize}",
        f"http      {config.http_base}/ files={config.http.files}",
        f"dns       domain={config.dns.domain} port={config.dns.port} unknown={config.dns.unknown}",
        f"log       level={config.log.level or 'info (serve; debug with -vv)'}"
        + "".join(f" {name}={level}" for name, level in config.log.levels)
        + f" http_access={'on' if config.log.http_access else 'off'}",
        f"inventory {inv.source}: {len(inv)} nodes {NodeSet.fromlist([n.name for n in inv.nodes])}",
        "racks     " + ", ".join(f"{k}: {v}" for k, v in sorted(racks.items())),
        f"bmcs      {with_bmc}/{len(inv)} nodes have a BMC",
    ]
    return "\n".join(lines)

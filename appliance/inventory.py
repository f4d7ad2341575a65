"""The node inventory: nodes, their MACs, addresses, BMCs and placement, loaded from YAML with folded ranges."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ClusterShell.NodeSet import NodeSetParseError, expand

from appliance.yamlsource import Located, load_yaml_mapping
from domain.errors import ConfigError
from domain.nodes import BMC_DRIVERS, BmcSpec, Node, mac_add, normalize_mac

BMC_KEYS = ("driver", "address", "port", "credentials")


IPMI_PASSWORD_MAX = 20  # bytes: IPMI 2.0 section 13.31 (RAKP keys), ipmitool refuses more ("password is longer than 20 bytes")


def _ipmi_credentials(cred_path: Path) -> list[str]:
    """What is wrong with an IPMI credentials file (never its password in the message)."""
    try:
        loc = load_yaml_mapping(cred_path)
    except ConfigError as exc:
        return [str(exc)]
    password = loc.raw("password", "")
    if not isinstance(password, str):
        return [f"{loc.at('password')}: password: expected a string (quote it), got a {type(password).__name__}"]
    if len(password.encode()) > IPMI_PASSWORD_MAX:
        return [f"{loc.at('password')}: password: {len(password.encode())} bytes, IPMI 2.0 allows at most "
                f"{IPMI_PASSWORD_MAX} (BMCs and ipmitool refuse longer)"]
    return []


def read_bmc_credentials(bmc: BmcSpec) -> tuple[str, str]:
    """Read (username, password) from a BMC's credentials file ('' and '' when it names none)."""
    if bmc.credentials_file is None:
        return ("", "")
    loc = load_yaml_mapping(bmc.credentials_file)
    return (str(loc.raw("username", "")), str(loc.raw("password", "")))


@dataclass(frozen=True)
class Inventory:
    """All nodes, indexed by name, MAC and IP."""

    nodes: tuple[Node, ...]
    source: str = ""
    by_name: dict[str, Node] = field(default_factory=dict, compare=False, repr=False)
    by_mac: dict[str, Node] = field(default_factory=dict, compare=False, repr=False)
    by_ip: dict[ipaddress.IPv4Address, Node] = field(default_factory=dict, compare=False, repr=False)
    origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # name -> "FILE:LINE" of its entry

    def __post_init__(self) -> None:
        for n in self.nodes:
            self.by_name[n.name] = n
            self.by_mac[n.mac] = n
            self.by_ip[n.ip] = n

    def __len__(self) -> int:
        return len(self.nodes)

    def select(self, nodeset: str) -> list[Node]:
        """Return the nodes named by a folded node set (e.g. node-[1-40]); raise ConfigError on unknown names."""
        try:
            names = expand(nodeset)
        except NodeSetParseError as exc:
            raise ConfigError([f"bad node set {nodeset!r}: {exc}"]) from exc
        unknown = [n for n in names if n not in self.by_name]
        if unknown:
            raise ConfigError([f"unknown nodes: {', '.join(unknown[:10])}"])
        return [self.by_name[n] for n in names]

    def take(self, other: "Inventory") -> None:
        """Become other (a reloaded inventory) in place: whoever holds this object, or its indexes, sees the new
        nodes at once (the appliance reloads on SIGHUP; everything runs on one event loop, so no reader sees half)."""
        object.__setattr__(self, "nodes", other.nodes)
        object.__setattr__(self, "source", other.source)
        for mine, theirs in ((self.by_name, other.by_name), (self.by_mac, other.by_mac), (self.by_ip, other.by_ip),
                             (self.origin, other.origin)):
            mine.clear()
            mine.update(theirs)  # type: ignore[arg-type]


def _expand_field(entry: Located, key: str, count: int, problems: list[str]) -> list[str] | None:
    """Expand a folded value to count items, or to one start value that the caller increments per node."""
    value = entry.raw(key)
    if value is None:
        return None
    if isinstance(value, list):
        items = [str(v) for v in value]
    else:
        try:
            items = expand(str(value)) if "[" in str(value) else [str(value)]
        except NodeSetParseError as exc:
            problems.append(f"{entry.at(key)}: {entry.name(key)}: bad range {value!r}: {exc}")
            return None
    if len(items) not in (1, count):
        problems.append(f"{entry.at(key)}: {entry.name(key)}: {len(items)} values for {count} nodes")
        return None
    return items


def load_inventory(path: Path) -> Inventory:
    """Load and validate the node inventory; raise ConfigError listing every problem with file:line."""
    root = load_yaml_mapping(path)
    problems: list[str] = []
    nodes: list[Node] = []
    seen_names: dict[str, str] = {}
    seen_macs: dict[str, str] = {}
    seen_ips: dict[ipaddress.IPv4Address, str] = {}
    origin: dict[str, str] = {}
    for key in root.keys():
        if key == "defaults":
            problems.append(f"{root.at(key)}: defaults: not supported: give each entry of nodes its keys "
                            "(a folded entry like node-[1-40] covers a whole run)")
        elif key != "nodes":
            problems.append(f"{root.at(key)}: unknown key {key!r} (expected: nodes)")
    entries = root.children("nodes")
    if not entries:
        problems.append(f"{root.where}: no nodes defined (expected a 'nodes:' list)")
    for entry in entries:
        for key in entry.keys():
            if key not in ("name", "mac", "ip", "rack", "switch", "disk", "tags", "bmc"):
                problems.append(f"{entry.at(key)}: {entry.name(key)}: unknown key")
        raw_name = entry.raw("name")
        if not raw_name:
            problems.append(f"{entry.where}: {entry.name('name')}: missing")
            continue
        try:
            names = expand(str(raw_name))
        except NodeSetParseError as exc:
            problems.append(f"{entry.at('name')}: {entry.name('name')}: bad node set {raw_name!r}: {exc}")
            continue
        count = len(names)
        macs = _expand_field(entry, "mac", count, problems)
        ips = _expand_field(entry, "ip", count, problems)
        if entry.raw("mac") is None:
            problems.append(f"{entry.where}: {entry.name('mac')}: missing")
        if entry.raw("ip") is None:
            problems.append(f"{entry.where}: {entry.name('ip')}: missing")
        if macs is None or ips is None:
            continue
        bmc_loc = entry.child("bmc")
        bmc_addrs: list[str] | None = None
        bmc_port = 623
        if bmc_loc is not None:
            for key in bmc_loc.keys():
                if key not in BMC_KEYS and key not in ("username", "password"):
                    problems.append(f"{bmc_loc.at(key)}: {bmc_loc.name(key)}: unknown key (expected one of: {', '.join(BMC_KEYS)})")
            if bmc_loc.raw("address") is None and str(bmc_loc.raw("driver", "ipmi")) != "none":
                problems.append(f"{bmc_loc.where}: {bmc_loc.name('address')}: missing")
            raw_port = bmc_loc.raw("port", 623)
            if isinstance(raw_port, bool) or not isinstance(raw_port, int) or not 1 <= raw_port <= 65535:
                problems.append(f"{bmc_loc.at('port')}: {bmc_loc.name('port')}: expected a port number 1-65535, got {raw_port!r}")
            else:
                bmc_port = raw_port
            bmc_addrs = _expand_field(bmc_loc, "address", count, problems)
            driver = str(bmc_loc.raw("driver", "ipmi"))
            if driver not in BMC_DRIVERS:
                problems.append(f"{bmc_loc.at('driver')}: {bmc_loc.name('driver')}: unknown driver {driver!r} (expected one of {', '.join(BMC_DRIVERS)})")
            if bmc_loc.has("password") or bmc_loc.has("username"):
                problems.append(f"{bmc_loc.where}: {bmc_loc.name('password')}: credentials must be in a file named by 'credentials', not inline")
            cred = bmc_loc.raw("credentials")
            cred_path = (path.parent / str(cred)) if cred else None
            if cred_path is not None and not cred_path.is_file():
                problems.append(f"{bmc_loc.at('credentials')}: {bmc_loc.name('credentials')}: no such file {cred_path}")
            elif cred_path is not None and driver == "ipmi":
                problems += _ipmi_credentials(cred_path)
        tags_raw = entry.raw("tags", [])
        tags = tuple(str(t) for t in (tags_raw if isinstance(tags_raw, list) else [tags_raw]))
        for i, name in enumerate(names):
            try:
                mac = normalize_mac(macs[i]) if len(macs) == count else mac_add(normalize_mac(macs[0]), i)
            except ValueError as exc:
                hint = ""
                if isinstance(entry.raw("mac"), int):
                    hint = " (YAML 1.1 reads an unquoted MAC as a base-60 number: quote the MAC, e.g. mac: \"52:54:00:12:34:56\")"
                problems.append(f"{entry.at('mac')}: {entry.name('mac')}: {exc}{hint}")
                break
            try:
                ip = ipaddress.IPv4Address(ips[i]) if len(ips) == count else ipaddress.IPv4Address(ips[0]) + i
            except ValueError as exc:
                problems.append(f"{entry.at('ip')}: {entry.name('ip')}: {exc}")
                break
            bmc = None
            if bmc_loc is not None and bmc_addrs:
                try:
                    addr = bmc_addrs[i] if len(bmc_addrs) == count else str(ipaddress.IPv4Address(bmc_addrs[0]) + i)
                except ValueError as exc:
                    problems.append(f"{bmc_loc.at('address')}: {bmc_loc.name('address')}: {exc}")
                    break
                cred = bmc_loc.raw("credentials")
                bmc = BmcSpec(
                    driver=str(bmc_loc.raw("driver", "ipmi")),
                    address=addr,
                    port=bmc_port,
                    credentials_file=(path.parent / str(cred)) if cred else None,
                )
            where = str(entry.at("name"))
            origin[name] = where
            for table, value, what in ((seen_names, name, "name"), (seen_macs, mac, "MAC"), (seen_ips, ip, "IP")):
                if value in table:
                    problems.append(f"{where}: duplicate {what} {value} (first at {table[value]})")
                else:
                    table[value] = where
            nodes.append(
                Node(
                    name=name,
                    mac=mac,
                    ip=ip,
                    rack=str(entry.raw("rack", "")),
                    switch=str(entry.raw("switch", entry.raw("rack", ""))),
                    disk=str(entry.raw("disk", "")),
                    tags=tags,
                    bmc=bmc,
                )
            )
    if problems:
        raise ConfigError(problems)
    return Inventory(nodes=tuple(nodes), source=str(path), origin=origin)

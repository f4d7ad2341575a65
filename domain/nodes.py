"""Nodes as every package sees them: name, MAC, address, placement and how to reach the BMC."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?[0-9a-f]{2}){5}$")
BMC_DRIVERS = ("ipmi", "ssh", "none")


def normalize_mac(text: str) -> str:
    """Return a MAC as lower-case colon-separated hex; raise ValueError when it is not one."""
    t = str(text).strip().lower()
    if not _MAC_RE.match(t):
        raise ValueError(f"not a MAC address: {text!r}")
    hexdigits = t.replace(":", "").replace("-", "")
    return ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2))


def mac_add(mac: str, n: int) -> str:
    """Return the MAC n positions after mac (for folded node entries)."""
    value = int(mac.replace(":", ""), 16) + n
    if value >= 1 << 48:
        raise ValueError(f"MAC range overflows after {mac}")
    h = f"{value:012x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def mac_slug(mac: str) -> str:
    """Return a MAC in the form used in URLs: lower-case, dash-separated (52-54-00-77-00-01)."""
    return mac.lower().replace(":", "-")


@dataclass(frozen=True)
class BmcSpec:
    """How to reach a node's BMC; credentials live in a file (read by the power driver), never inline."""

    driver: str
    address: str
    port: int = 623
    credentials_file: Path | None = None


@dataclass(frozen=True)
class Node:
    """One node of the inventory."""

    name: str
    mac: str
    ip: ipaddress.IPv4Address
    rack: str = ""
    switch: str = ""
    disk: str = ""
    tags: tuple[str, ...] = ()
    bmc: BmcSpec | None = None

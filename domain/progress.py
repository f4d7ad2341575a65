"""Node progress: one typed vocabulary, from the packet to the deployment.

Each boot service classifies what it sees once, where the packet is understood, and emits at most one
record per step of a node's boot (not one per packet): the DHCP service one per DHCP exchange, TFTP
and HTTP one per file served, the callback handler one per accepted callback. The deployment's boot
watch is a lookup on the record types (`appliance/deploy/bootwatch.py`). Records carry no secret: a
callback's one-time token is checked by the callback handler, and only the deployment it proved
travels on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Callable, ClassVar, Union


class FirmwareKind(StrEnum):
    """What network-boot client sent a DHCP request (RFC 4578 option 93, vendor class, iPXE user class)."""

    BIOS_PXE = "bios_pxe"      # a BIOS PXE ROM (arch 0)
    UEFI_PXE = "uefi_pxe"      # UEFI PXE (arch 6, 7, 9 or arm64 11)
    UEFI_HTTP = "uefi_http"    # UEFI HTTP boot (vendor class HTTPClient, arch 15, 16, 19)
    IPXE = "ipxe"              # iPXE (user class "iPXE")
    PXE = "pxe"                # another PXE client (vendor class PXEClient, unknown architecture)


class Via(StrEnum):
    """The protocol a file was served over."""

    TFTP = "tftp"
    HTTP = "http"


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True)
class DhcpFromFirmware:
    """A network-boot client (firmware or iPXE) started a DHCP exchange: the node is (re)booting."""

    kind: ClassVar[str] = "dhcp_from_firmware"
    mac: str
    firmware: FirmwareKind
    arch: int | None = None
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class DhcpFromOs:
    """A booted system's own DHCP client (no PXE vendor class, no iPXE) started an exchange: an OS is up."""

    kind: ClassVar[str] = "dhcp_from_os"
    mac: str
    vendor_class: str = ""
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class NbpSent:
    """A network boot program (iPXE binary) was sent whole."""

    kind: ClassVar[str] = "nbp_sent"
    mac: str
    path: str
    via: Via
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class ScriptServed:
    """The node's per-MAC iPXE script was served; `profile` is the boot profile kind it renders."""

    kind: ClassVar[str] = "script_served"
    mac: str
    profile: str
    via: Via
    env: str = ""
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class KernelFetched:
    """The kernel of the node's boot profile was downloaded."""

    kind: ClassVar[str] = "kernel_fetched"
    mac: str
    path: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class InitrdFetched:
    """An initrd of the node's boot profile was downloaded."""

    kind: ClassVar[str] = "initrd_fetched"
    mac: str
    path: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class FileSent:
    """Another file was sent to the node whole."""

    kind: ClassVar[str] = "file_sent"
    mac: str
    path: str
    via: Via
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class TransferFailed:
    """A file the node asked for could not be sent (missing, refused, timed out)."""

    kind: ClassVar[str] = "transfer_failed"
    mac: str
    path: str
    via: Via
    reason: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class BootFailed:
    """The node's iPXE script reported that a download failed after its retries."""

    kind: ClassVar[str] = "boot_failed"
    mac: str
    what: str
    message: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class AgentUp:
    """The deploy agent of a deployment called back with the node's one-time token: the deploy environment is up."""

    kind: ClassVar[str] = "agent_up"
    mac: str
    deployment: str
    ssh_port: int
    data_port: int
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class OsUp:
    """An installed system called back with the node's one-time token: it booted `env`."""

    kind: ClassVar[str] = "os_up"
    mac: str
    deployment: str
    env: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class OsReachable:
    """The controller reached the installed system over SSH and read the environment the post-install stamped
    (a stock image needs no callback of its own)."""

    kind: ClassVar[str] = "os_reachable"
    mac: str
    deployment: str
    env: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class NodeReport:
    """A callback that claims no deployment stage (a script's or a tool's message)."""

    kind: ClassVar[str] = "node_report"
    mac: str
    stage: str
    status: str
    message: str
    ts: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class ProfileSet:
    """The node's boot profile was switched (by a deployment or the API)."""

    kind: ClassVar[str] = "profile_set"
    mac: str
    profile: str
    env: str = ""
    source: str = ""
    ts: float = field(default_factory=_now)


NodeEvent = Union[
    DhcpFromFirmware, DhcpFromOs, NbpSent, ScriptServed, KernelFetched, InitrdFetched, FileSent, TransferFailed,
    BootFailed, AgentUp, OsUp, OsReachable, NodeReport, ProfileSet,
]
EVENT_TYPES: tuple[type, ...] = NodeEvent.__args__  # type: ignore[attr-defined]

# Where boot services send their records (the appliance's event bus; a list's append in tests).
EventSink = Callable[[NodeEvent], None]

# Callback stages that claim a deployment stage; they need the node's one-time token.
AGENT_STAGES = ("agent_up", "deploy", "agent")
OS_STAGES = ("installed", "os")
CLAIMED_STAGES = AGENT_STAGES + OS_STAGES


def event_json(event: NodeEvent) -> dict[str, object]:
    """Return the JSON form of a record: {kind, mac, ts, detail: the other fields}."""
    detail = {f.name: _plain(getattr(event, f.name)) for f in fields(event) if f.name not in ("mac", "ts")}
    return {"mac": event.mac, "kind": event.kind, "ts": event.ts, "detail": detail}


def _plain(value: object) -> object:
    return str(value) if isinstance(value, StrEnum) else value

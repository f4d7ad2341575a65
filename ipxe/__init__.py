"""iPXE: chainload targets, per-MAC script URLs and script rendering."""
from __future__ import annotations

from domain.nodes import mac_slug

__all__ = ["mac_slug", "script_path", "nbp_path", "callback_path", "files_path"]


def script_path(mac: str) -> str:
    """Return the HTTP path of a node's per-MAC iPXE script; DHCP hands it to iPXE, HTTP serves it."""
    return f"/boot/{mac_slug(mac)}.ipxe"


def nbp_path(name: str) -> str:
    """Return the HTTP path of an iPXE binary (UEFI HTTP boot fetches the NBP over HTTP)."""
    return f"/nbp/{name}"


def callback_path(mac: str) -> str:
    """Return the HTTP path a node's scripts and deploy environment report progress to."""
    return f"/callback/{mac_slug(mac)}"


def files_path(relative: str) -> str:
    """Return the HTTP path of a file under the HTTP files root."""
    return f"/files/{relative.lstrip('/')}"

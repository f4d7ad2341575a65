"""What each MAC boots: the inventory, the per-MAC profile store and the discovery policy, behind ipxe's BootTargets."""
from __future__ import annotations

from appliance.inventory import Inventory
from appliance.profiles import ProfileStore
from domain.nodes import Node
from domain.profiles import BootProfile

# What a node outside the inventory boots when dhcp.unknown_macs is 'discovery' and nobody set another
# profile: files laid out under the HTTP files root by convention.
DEFAULT_DISCOVERY_PROFILE = BootProfile(
    kind="discovery",
    kernel="discovery/vmlinuz",
    initrds=("discovery/initrd.img",),
    cmdline="console=ttyS0 rackboot.mac={mac} rackboot.callback={callback}",
    env="discovery",
)


class NodeBootTargets:
    """Answers the iPXE renderer: inventory nodes boot their profile; other MACs their explicit one, discovery, or nothing."""

    def __init__(self, inventory: Inventory, profiles: ProfileStore, discovery: BootProfile | None = None) -> None:
        self._inventory = inventory
        self._profiles = profiles
        self._discovery = discovery

    def node(self, mac: str) -> Node | None:
        """Return the inventory node with this MAC, or None."""
        return self._inventory.by_mac.get(mac)

    def profile_for(self, mac: str) -> BootProfile | None:
        """Return what a MAC boots, or None for a MAC outside the inventory that is ignored."""
        if mac in self._inventory.by_mac:
            return self._profiles.get(mac)
        explicit = self._profiles.explicit(mac)
        if explicit is not None:
            return explicit
        return self._discovery

"""What a testbed is made of: its name, nodes, racks, addresses and links, derived from a few numbers (pure)."""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from domain.nodes import mac_add

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
MAX_PORTS_PER_BRIDGE = 1000  # a Linux bridge takes at most 1024 ports (BR_MAX_PORTS)
STATE_ROOT = Path("/run/rackboot-testbed")

NODE_NET = ipaddress.IPv4Network("10.78.0.0/16")
MGMT_NET = ipaddress.IPv4Network("10.79.0.0/16")
APPLIANCE_IP = ipaddress.IPv4Address("10.78.0.1")
APPLIANCE_MGMT_IP = ipaddress.IPv4Address("10.79.0.1")
FIRST_NODE_IP = ipaddress.IPv4Address("10.78.1.1")
FIRST_BMC_IP = ipaddress.IPv4Address("10.79.1.1")
FIRST_MAC = "52:54:00:7b:00:01"
APPLIANCE_IF = "rb0"
APPLIANCE_MGMT_IF = "mgmt0"
HTTP_PORT = 8080


@dataclass(frozen=True)
class NodePlan:
    """One virtual node: identity, placement, addresses and the interface names on both ends of its link."""

    index: int
    name: str
    mac: str
    ip: str
    rack: str
    bmc_ip: str
    namespace: str
    fabric_if: str
    firmware: str = "bios"


@dataclass(frozen=True)
class TestbedPlan:
    """A whole testbed, computed from its parameters; saved as plan.json beside the testbed's state."""

    name: str
    nodes: int
    racks: int
    link_mbit: int = 1000
    uplink_mbit: int = 10000
    post_s: str = "1"
    faults: str = ""
    seed: int = 0
    firmware: str = "bios"
    node_list: tuple[NodePlan, ...] = field(default=(), repr=False)

    @property
    def prefix(self) -> str:
        """The prefix of every namespace of this testbed (names carry the testbed name)."""
        return f"rbt-{self.name}-"

    @property
    def fabric_ns(self) -> str:
        """The namespace holding the rack bridges, the core bridge and the management bridge."""
        return self.prefix + "fabric"

    @property
    def appliance_ns(self) -> str:
        """The namespace where the appliance runs, plugged into the core and management bridges."""
        return self.prefix + "appliance"

    @property
    def bmc_ns(self) -> str:
        """The namespace of the management network's BMC addresses and of the node daemon."""
        return self.prefix + "bmc"

    @property
    def rack_names(self) -> list[str]:
        """Rack names r1..rR."""
        return [f"r{i + 1}" for i in range(self.racks)]

    @property
    def state_dir(self) -> Path:
        """Where this testbed keeps its state, config and disks."""
        return STATE_ROOT / self.name

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this testbed makes."""
        return [self.fabric_ns, self.appliance_ns, self.bmc_ns] + [n.namespace for n in self.node_list]

    @property
    def appliance_url(self) -> str:
        """The appliance's HTTP base as nodes see it."""
        return f"http://{APPLIANCE_IP}:{HTTP_PORT}"

    def node(self, name: str) -> NodePlan:
        """Return a node by name; raise KeyError when unknown."""
        for n in self.node_list:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "TestbedPlan":
        """Rebuild a plan from its JSON form."""
        d = dict(data)
        nodes = tuple(NodePlan(**n) for n in d.pop("node_list", []))  # type: ignore[arg-type, union-attr]
        return cls(**d, node_list=nodes)  # type: ignore[arg-type]

    def save(self, path: Path) -> None:
        """Write the plan as JSON."""
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> "TestbedPlan":
        """Read a plan written by save()."""
        return cls.from_json(json.loads(path.read_text()))


def validate_name(name: str) -> str:
    """Return the name if it is a valid testbed name, else raise ValueError."""
    if not NAME_RE.match(name):
        raise ValueError(f"testbed name {name!r}: use 1-16 of a-z, 0-9 and '-', starting with a letter or digit")
    return name


def make_plan(
    name: str,
    nodes: int,
    racks: int = 2,
    link_mbit: int = 1000,
    uplink_mbit: int = 10000,
    post_s: str = "1",
    faults: str = "",
    seed: int = 0,
    firmware: str = "bios",
) -> TestbedPlan:
    """Compute the plan of a testbed: nodes spread evenly over racks, addresses and names assigned in order."""
    validate_name(name)
    if nodes < 1 or racks < 1:
        raise ValueError("a testbed needs at least one node and one rack")
    if racks > nodes:
        raise ValueError(f"{racks} racks for {nodes} nodes: some racks would be empty")
    per_rack = -(-nodes // racks)
    if per_rack > MAX_PORTS_PER_BRIDGE:
        raise ValueError(f"{per_rack} nodes per rack: a Linux bridge takes at most 1024 ports, use more racks")
    if nodes > 60000:
        raise ValueError("at most 60000 nodes (the 10.78.0.0/16 node network)")
    if firmware not in ("bios", "uefi", "mixed"):
        raise ValueError(f"firmware {firmware!r}: expected bios, uefi or mixed")
    prefix = f"rbt-{name}-"
    node_list = []
    for i in range(nodes):
        rack = i * racks // nodes
        fw = firmware if firmware != "mixed" else ("uefi" if i % 2 else "bios")
        node_list.append(
            NodePlan(
                index=i,
                name=f"node-{i + 1}",
                mac=mac_add(FIRST_MAC, i),
                ip=str(FIRST_NODE_IP + i),
                rack=f"r{rack + 1}",
                bmc_ip=str(FIRST_BMC_IP + i),
                namespace=f"{prefix}node-{i + 1}",
                fabric_if=f"n{i + 1}",
                firmware=fw,
            )
        )
    return TestbedPlan(
        name=name, nodes=nodes, racks=racks, link_mbit=link_mbit, uplink_mbit=uplink_mbit,
        post_s=post_s, faults=faults, seed=seed, firmware=firmware, node_list=tuple(node_list),
    )

"""What a testbed is made of: its name, nodes, racks, addresses and links, derived from a few numbers (pure)."""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from domain.nodes import mac_add
from vmtestbed.accel import ACCELS

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
QEMU_FIRMWARES = ("bios", "uefi", "uefi-http")  # vmtestbed.qemu.FIRMWARES (not imported: the plan stays light)
MAX_PORTS_PER_BRIDGE = 1000  # a Linux bridge takes at most 1024 ports (BR_MAX_PORTS)
NODES_PER_DAEMON = 500  # the default: one node-daemon process per 500 namespace nodes (1 up to 500)
MAX_DAEMONS = 64
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
    kind: str = "netns"  # "netns": a namespace node of the node daemon; "qemu": a QEMU VM on a tap (fabric_if) in its rack bridge

    @property
    def is_vm(self) -> bool:
        """True for a QEMU VM (no namespace of its own: its tap is in the fabric namespace)."""
        return self.kind == "qemu"


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
    qemu: int = 0
    qemu_firmware: str = "bios"
    qemu_disk_mb: int = 4096
    qemu_memory_mb: int = 1024
    qemu_accel: str = "auto"
    wire_loss: float = 0.0
    daemons: int = 1  # node-daemon processes, each owning a shard of the nodes (vmtestbed.shards)
    # The deploy agents answer `true` and `:` in process instead of forking a shell (exec benchmarks: the node side
    # then costs the SSH session only, as on a real node where the command runs on its own CPU)
    builtin_true: bool = False
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
        return [self.fabric_ns, self.appliance_ns, self.bmc_ns] + [n.namespace for n in self.node_list if not n.is_vm]

    @property
    def netns_nodes(self) -> list[NodePlan]:
        """The nodes the node daemon plays in namespaces (not the QEMU VMs)."""
        return [n for n in self.node_list if not n.is_vm]

    @property
    def vms(self) -> list[NodePlan]:
        """The QEMU VMs, after the namespace nodes in name, MAC, IP and BMC address order."""
        return [n for n in self.node_list if n.is_vm]

    @property
    def qemu_dir(self) -> Path:
        """Where the VMs' disks, serial logs, QMP sockets and pid files live."""
        return self.state_dir / "qemu"

    def vm_name(self, node: NodePlan) -> str:
        """QEMU's -name of a VM: carries the testbed's prefix, so a leftover process is recognised as this testbed's."""
        return f"{self.prefix}{node.name}"

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


def default_daemons(netns_nodes: int) -> int:
    """How many node-daemon processes a testbed gets by default: 1 up to NODES_PER_DAEMON namespace nodes, then one per
    NODES_PER_DAEMON (at most MAX_DAEMONS); vmtestbed.shards gives each whole racks where it can."""
    return max(1, min(MAX_DAEMONS, -(-netns_nodes // NODES_PER_DAEMON)))


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
    qemu: int = 0,
    qemu_firmware: str = "bios",
    qemu_disk_mb: int = 4096,
    qemu_memory_mb: int = 1024,
    qemu_accel: str = "auto",
    wire_loss: float = 0.0,
    daemons: int = 0,
    builtin_true: bool = False,
) -> TestbedPlan:
    """Compute the plan of a testbed: nodes spread evenly over racks, addresses and names assigned in order.

    The qemu QEMU VMs come after the nodes namespace nodes (node-(nodes+1)..., MACs, IPs and BMC addresses
    counting on), and the racks are filled in that order, so each rack holds a run of consecutive nodes.
    daemons is the number of node-daemon processes (0: default_daemons). builtin_true: the deploy agents answer `true`
    and `:` in process (vmtestbed.firmware.builtin_true).
    """
    validate_name(name)
    if nodes < 0 or qemu < 0:
        raise ValueError("node and VM counts cannot be negative")
    total = nodes + qemu
    if total < 1 or racks < 1:
        raise ValueError("a testbed needs at least one node (or VM) and one rack")
    if racks > total:
        raise ValueError(f"{racks} racks for {total} nodes: some racks would be empty")
    if qemu_firmware not in (*QEMU_FIRMWARES, "mixed"):
        raise ValueError(f"QEMU firmware {qemu_firmware!r}: expected {', '.join(QEMU_FIRMWARES)} or mixed")
    if not 0.0 <= wire_loss < 1.0:
        raise ValueError(f"wire loss {wire_loss}: expected a fraction in [0, 1)")
    if qemu_accel not in ACCELS:
        raise ValueError(f"QEMU accelerator {qemu_accel!r}: expected {', '.join(ACCELS)}")
    if qemu and qemu_disk_mb < 1024:
        raise ValueError(f"a {qemu_disk_mb} MiB VM disk is too small for Debian 12 (at least 1024)")
    per_rack = -(-total // racks)
    if per_rack > MAX_PORTS_PER_BRIDGE:
        raise ValueError(f"{per_rack} nodes per rack: a Linux bridge takes at most 1024 ports, use more racks")
    if total > 60000:
        raise ValueError("at most 60000 nodes (the 10.78.0.0/16 node network)")
    if firmware not in ("bios", "uefi", "mixed"):
        raise ValueError(f"firmware {firmware!r}: expected bios, uefi or mixed")
    daemons = daemons or default_daemons(nodes)
    if not 1 <= daemons <= min(MAX_DAEMONS, max(1, nodes)):
        raise ValueError(f"{daemons} node daemons: expected 1 to {min(MAX_DAEMONS, max(1, nodes))} (each owns at least one namespace node)")
    prefix = f"rbt-{name}-"
    node_list = []
    for i in range(total):
        rack = i * racks // total
        vm = i >= nodes
        j = i - nodes if vm else i
        kind_fw = qemu_firmware if vm else firmware
        if kind_fw != "mixed":
            fw = kind_fw
        else:  # namespace nodes alternate BIOS and UEFI PXE; VMs go round their three firmwares
            fw = QEMU_FIRMWARES[j % 3] if vm else ("uefi" if j % 2 else "bios")
        node_list.append(
            NodePlan(
                index=i,
                name=f"node-{i + 1}",
                mac=mac_add(FIRST_MAC, i),
                ip=str(FIRST_NODE_IP + i),
                rack=f"r{rack + 1}",
                bmc_ip=str(FIRST_BMC_IP + i),
                namespace="" if vm else f"{prefix}node-{i + 1}",
                fabric_if=f"q{i + 1}" if vm else f"n{i + 1}",  # a VM's tap, in the fabric namespace
                firmware=fw,
                kind="qemu" if vm else "netns",
            )
        )
    return TestbedPlan(
        name=name, nodes=nodes, racks=racks, link_mbit=link_mbit, uplink_mbit=uplink_mbit,
        post_s=post_s, faults=faults, seed=seed, firmware=firmware, qemu=qemu, qemu_firmware=qemu_firmware,
        qemu_disk_mb=qemu_disk_mb, qemu_memory_mb=qemu_memory_mb, qemu_accel=qemu_accel, wire_loss=wire_loss, daemons=daemons,
        builtin_true=builtin_true, node_list=tuple(node_list),
    )

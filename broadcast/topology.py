"""Who sends to whom: topology-aware node order, chains and k-ary trees over it.

`order_chain` groups nodes by switch, then rack, so that a chain crosses each inter-switch link once
(Kadeploy's topology-aware chain: the switches' backplane is the limit). `build_forest` cuts the
ordered list into contiguous ranges, so a k-ary tree keeps each subtree on as few switches as the
order allows; fanout 1 gives the chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence


class Placed(Protocol):
    """Anything with a name and a place in the network (appliance.inventory.Node fits)."""

    name: str
    rack: str
    switch: str


@dataclass(frozen=True)
class Target:
    """A node as the broadcast sees it: where its receiver listens, where it sits."""

    name: str
    host: str
    port: int
    rack: str = ""
    switch: str = ""

    @classmethod
    def from_node(cls, node: Any, port: int) -> "Target":
        """Build a target from an inventory Node (name, ip, rack, switch) and the agents' data port."""
        return cls(name=node.name, host=str(node.ip), port=port, rack=getattr(node, "rack", ""), switch=getattr(node, "switch", ""))


class Subtree:
    """A broadcast (sub)tree as a flat preorder list of [name, host, port, size] entries.

    `size` counts the entry's own subtree, so every subtree is a contiguous slice: a chain of 4000
    nodes needs no recursion to build, encode, decode or walk (JSON nesting 4000 deep would not parse).
    """

    __slots__ = ("entries",)

    def __init__(self, entries: list[list[Any]]) -> None:
        self.entries = entries

    @property
    def root(self) -> Target:
        """The node at the top of this subtree."""
        name, host, port, _ = self.entries[0]
        return Target(name=name, host=host, port=port)

    @property
    def name(self) -> str:
        """The root's name."""
        return str(self.entries[0][0])

    def __len__(self) -> int:
        return len(self.entries)

    def children(self) -> list["Subtree"]:
        """Return the subtrees directly under the root."""
        out, j = [], 1
        while j < len(self.entries):
            size = self.entries[j][3]
            out.append(Subtree(self.entries[j : j + size]))
            j += size
        return out

    def leaf(self) -> "Subtree":
        """The root alone, without the nodes below it."""
        name, host, port, _ = self.entries[0]
        return Subtree([[name, host, port, 1]])

    def names(self) -> list[str]:
        """Every node name in this subtree, preorder."""
        return [e[0] for e in self.entries]

    def depth(self) -> int:
        """Levels below the root (0 for a leaf)."""
        deepest, stack = 0, [(0, 0)]  # (index, depth)
        while stack:
            i, d = stack.pop()
            deepest = max(deepest, d)
            j = i + 1
            while j < i + self.entries[i][3]:
                stack.append((j, d + 1))
                j += self.entries[j][3]
        return deepest

    def to_json(self) -> list[list[Any]]:
        """The flat list carried in a hello message."""
        return self.entries

    @classmethod
    def from_json(cls, data: Any) -> "Subtree":
        """Validate a flat preorder list and wrap it; raise MalformedPacket when sizes or types are wrong."""
        from domain.errors import MalformedPacket

        if not isinstance(data, list) or not data:
            raise MalformedPacket("tree: expected a non-empty list")
        for e in data:
            if (not isinstance(e, list) or len(e) != 4 or not isinstance(e[0], str) or not isinstance(e[1], str)
                    or isinstance(e[2], bool) or not isinstance(e[2], int) or not 0 < e[2] < 65536
                    or isinstance(e[3], bool) or not isinstance(e[3], int) or e[3] < 1):
                raise MalformedPacket("tree: entries must be [name, host, port, size]")
        if data[0][3] != len(data):
            raise MalformedPacket("tree: root size does not match the list")
        # every subtree must nest inside its parent's range
        ends = [len(data)]
        for i, e in enumerate(data):
            while ends and i >= ends[-1]:
                ends.pop()
            if not ends or i + e[3] > ends[-1]:
                raise MalformedPacket("tree: a subtree overflows its parent")
            ends.append(i + e[3])
        return cls(data)


def order_chain(nodes: Iterable[Placed]) -> list[Any]:
    """Order nodes so each switch (then each rack inside it) is contiguous; groups keep first-seen order."""
    groups: dict[tuple[str, str], list[Any]] = {}
    switch_rank: dict[str, int] = {}
    for n in nodes:
        sw = getattr(n, "switch", "") or getattr(n, "rack", "")
        rack = getattr(n, "rack", "")
        switch_rank.setdefault(sw, len(switch_rank))
        groups.setdefault((sw, rack), []).append(n)
    keys = sorted(groups, key=lambda k: switch_rank[k[0]])  # stable: racks keep first-seen order inside a switch
    return [n for k in keys for n in groups[k]]


def build_forest(ordered: Sequence[Target], fanout: int) -> list[Subtree]:
    """Cut an ordered list into at most `fanout` contiguous subtrees, recursively (fanout 1: one chain)."""
    if fanout < 1:
        raise ValueError("fanout must be >= 1")
    items = list(ordered)
    if not items:
        return []
    if fanout == 1:  # a chain: iterative, any length
        n = len(items)
        return [Subtree([[t.name, t.host, t.port, n - i] for i, t in enumerate(items)])]
    forest = []
    for part in _split(items, fanout):
        entries: list[list[Any]] = []
        _emit(part, fanout, entries)  # recursion depth is log_fanout(n)
        forest.append(Subtree(entries))
    return forest


def _emit(part: list[Target], fanout: int, out: list[list[Any]]) -> None:
    t = part[0]
    out.append([t.name, t.host, t.port, len(part)])
    if len(part) > 1:
        for p in _split(part[1:], fanout):
            _emit(p, fanout, out)


def _split(items: list[Target], k: int) -> list[list[Target]]:
    k = min(k, len(items))
    size, extra = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def forest_for(method: str, targets: Sequence[Target], fanout: int = 2, order: bool = True) -> list[Subtree]:
    """Return the forest a method uses: 'chain' (one chain), 'tree' (k-ary), in topology order."""
    ordered = order_chain(targets) if order else list(targets)
    if method == "chain":
        return build_forest(ordered, 1)
    if method == "tree":
        return build_forest(ordered, max(2, fanout))
    raise ValueError(f"no forest for method {method!r}")

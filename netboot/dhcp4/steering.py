"""A classic BPF program that steers inventory nodes' DHCP requests to a socket of their own (pure: it only builds it).

Two UDP sockets share the DHCP port through SO_REUSEPORT; the program attached with SO_ATTACH_REUSEPORT_CBPF
returns the index of the socket that gets a datagram: 0 (the first bound) when its chaddr is an inventory
node's, 1 otherwise. The kernel runs it with the data starting at the UDP payload (net/core/sock_reuseport.c
pulls the UDP header first), so offsets are those of RFC 2131 2: chaddr at 28. A flood of other MACs then
fills only the second socket's queue: the kernel never drops a node's request behind it.

Broadcast datagrams (most DHCP requests) are not steered: the kernel gives a copy to every socket bound to the
port. So each socket also gets a plain socket filter (SO_ATTACH_FILTER, which sees the UDP header first) built
from the same comparisons: the first keeps inventory nodes' datagrams only, the second everything else.
"""
from __future__ import annotations

import struct
from typing import Iterable

NODE_SOCKET, OTHER_SOCKET = 0, 1
KEEP, DROP = 0xFFFF, 0  # a socket filter's verdict: octets to keep
UDP_HEADER = 8          # where a socket filter sees the payload start
MAX_INSNS = 4096   # BPF_MAXINSNS
_CHUNK = 200       # MACs compared after one prefix test: keeps every jump offset under 256 (8-bit jt/jf)
_MIN_LEN = 240     # RFC 2131 2: the fixed header (236 octets) and the magic cookie

# <linux/filter.h> opcodes
_LD_LEN = 0x80     # BPF_LD | BPF_W | BPF_LEN
_LD_W = 0x20       # BPF_LD | BPF_W | BPF_ABS
_LD_H = 0x28       # BPF_LD | BPF_H | BPF_ABS
_JEQ = 0x15        # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35        # BPF_JMP | BPF_JGE | BPF_K
_JA = 0x05         # BPF_JMP | BPF_JA
_RET = 0x06        # BPF_RET | BPF_K
_CHADDR = 28

Insn = tuple[int, int, int, int]  # code, jt, jf, k (struct sock_filter)


def steering_program(chaddrs: Iterable[bytes], node: int = NODE_SOCKET, other: int = OTHER_SOCKET,
                     base: int = 0) -> list[Insn] | None:
    """A program returning `node` for these 6-octet hardware addresses and `other` for any other datagram (or one
    too short for DHCP), the payload starting at `base`; None when it would exceed BPF_MAXINSNS."""
    groups: dict[int, list[int]] = {}
    for mac in sorted(set(chaddrs)):
        groups.setdefault(int.from_bytes(mac[:4], "big"), []).append(int.from_bytes(mac[4:6], "big"))
    prog: list[Insn] = [(_LD_LEN, 0, 0, 0), (_JGE, 1, 0, base + _MIN_LEN), (_RET, 0, 0, other)]
    for hi, los in groups.items():
        for start in range(0, len(los), _CHUNK):
            chunk = los[start:start + _CHUNK]
            n = len(chunk)
            prog += [(_LD_W, 0, 0, base + _CHADDR), (_JEQ, 0, n + 3, hi), (_LD_H, 0, 0, base + _CHADDR + 4)]
            prog += [(_JEQ, n - i, 0, lo) for i, lo in enumerate(chunk)]
            prog += [(_JA, 0, 0, 1), (_RET, 0, 0, node)]
    prog.append((_RET, 0, 0, other))
    return prog if len(prog) <= MAX_INSNS else None


def socket_filters(chaddrs: Iterable[bytes]) -> tuple[list[Insn], list[Insn]] | None:
    """The socket filters of the node socket (keeps inventory nodes' datagrams) and of the other (keeps the rest)."""
    macs = list(chaddrs)
    nodes = steering_program(macs, KEEP, DROP, UDP_HEADER)
    others = steering_program(macs, DROP, KEEP, UDP_HEADER)
    return (nodes, others) if nodes is not None and others is not None else None


def encode_program(prog: list[Insn]) -> bytes:
    """The program as an array of struct sock_filter (native byte order, as setsockopt takes it)."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)

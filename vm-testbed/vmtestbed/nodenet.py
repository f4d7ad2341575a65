"""A virtual node's hold on its own network namespace: sockets opened there, its address set and cleared.

Many nodes share one asyncio process: every socket a node uses is opened inside the node's namespace
(setns in the calling thread and straight back, about 15 µs); netlink work (setting the address the DHCP
server gave) runs on a small thread pool, since pyroute2's synchronous API cannot run inside the event loop.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from vmtestbed.netns import entered, namespace_fd, socket_in
from vmtestbed.wire import BPF_UDP_DST_68, ETH_P_IP

SO_ATTACH_FILTER = 26


def _attach_bpf(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    """Attach a classic BPF program to a socket (SO_ATTACH_FILTER takes a struct sock_fprog)."""
    insns = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(insns)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class NodeNetwork:
    """Sockets and addresses of one node, all inside its namespace."""

    def __init__(self, namespace: str, ifname: str, netlink_pool: ThreadPoolExecutor) -> None:
        self.namespace = namespace
        self.ifname = ifname
        self._pool = netlink_pool
        self._fd = namespace_fd(namespace)
        self.ifindex = 0

    def close(self) -> None:
        """Release the namespace descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def dhcp_socket(self) -> socket.socket:
        """Open the raw socket a ROM's UNDI driver would use: whole frames out, DHCP replies (udp dst 68) in."""
        sock = socket_in(self._fd, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        try:
            _attach_bpf(sock, BPF_UDP_DST_68)
            sock.bind((self.ifname, ETH_P_IP))
            sock.setblocking(False)
            # Frames that arrived between socket() and the filter may be anything: drain them.
            while True:
                try:
                    sock.recv(65535)
                except BlockingIOError:
                    break
        except BaseException:
            sock.close()
            raise
        return sock

    def udp_socket(self, ip: str) -> socket.socket:
        """Open a UDP socket bound to the node's address on an ephemeral port (TFTP)."""
        sock = socket_in(self._fd, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((ip, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def stream_socket(self, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """Open a TCP socket in the namespace (the HTTP client connects it)."""
        sock = socket_in(self._fd, family, type_, proto)
        sock.setblocking(False)
        return sock

    def listen_socket(self, port: int, host: str = "0.0.0.0") -> socket.socket:
        """Open a listening TCP socket in the namespace (the agent's SSH and data ports)."""
        sock = socket_in(self._fd, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def set_address(self, ip: str, prefixlen: int) -> None:
        """Give the interface exactly this IPv4 address (what a DHCP client does after its ACK)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._set_address, ip, prefixlen)

    async def clear_addresses(self) -> None:
        """Remove every IPv4 address of the interface (power off)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._set_address, None, 0)

    def _set_address(self, ip: str | None, prefixlen: int) -> None:
        from pyroute2 import IPRoute

        with entered(self._fd):
            ipr = IPRoute()
        with ipr:
            idx = self.ifindex or int(ipr.link("get", ifname=self.ifname)[0]["index"])
            self.ifindex = idx
            for addr in ipr.get_addr(family=socket.AF_INET, index=idx):
                have = addr.get_attr("IFA_ADDRESS")
                if have != ip or addr["prefixlen"] != prefixlen:
                    ipr.addr("del", index=idx, address=have, prefixlen=addr["prefixlen"])
                else:
                    ip = None  # already there
            if ip is not None:
                ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)

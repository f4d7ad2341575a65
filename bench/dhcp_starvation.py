#!/usr/bin/env python3
"""Starvation benchmark (issue 11): 10,000 random MACs flood DISCOVER/REQUEST at full speed while inventory nodes ask.

Everything is on loopback ('lo', free high ports on 127.0.0.1; nothing is sent anywhere else):

    flood process (--flooders of them)  --DISCOVER+REQUEST of --macs random MACs, as fast as sendto() goes-->  server
    this process: --nodes inventory nodes, each DISCOVER -> OFFER, REQUEST -> ACK in a loop, resending after 0.5 s
    server process: the real DhcpService (authoritative, a pool, the nodes' reservations, events on an EventBus)

Each phase starts a fresh server (rate limit of MACs outside the inventory as configured, then off), floods for
--seconds and reports: the inventory nodes' reply latency (median, p99, max; target: every one within 1 s,
resends included), whether each reply carried the node's reservation, the packets the server handled a second,
what it dropped (rate limit, and the kernel's drops on its full socket), pool exhaustion, its table sizes, and its
RSS before and after. The processes it started are stopped on success, failure and Ctrl-C.

Run:  .venv/bin/python bench/dhcp_starvation.py [--macs 10000] [--nodes 20] [--seconds 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import ScratchDir, exit_cleanly_on_sigterm, fmt, machine_load, markdown_table, say, stop, write_json  # noqa: E402

SERVER_IP = "127.0.0.1"
POOL = ("127.0.1.1", "127.0.1.254")
NODE_BASE = int(ipaddress.IPv4Address("127.0.0.11"))
RESEND_S = 0.5   # the inventory prober's resend timeout (PXE ROMs wait 4 s: this is harsher on the server)


def node_mac(i: int) -> str:
    """The MAC of inventory node i."""
    return f"52:54:00:aa:{i >> 8:02x}:{i & 0xff:02x}"


def free_udp_port() -> int:
    """A currently free UDP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(chaddr: bytes, mt: int, xid: int, wanted: bytes | None = None) -> bytes:
    """An encoded DHCP request (broadcast flag set, so replies go to the clients' port on lo)."""
    from netboot.dhcp4 import options as o
    from netboot.dhcp4.codec import DhcpPacket, encode

    opts = {o.MESSAGE_TYPE: bytes([mt])}
    if wanted is not None:
        opts[o.REQUESTED_IP] = wanted
        opts[o.SERVER_ID] = socket.inet_aton(SERVER_IP)
    return encode(DhcpPacket(xid=xid, flags=0x8000, chaddr=chaddr + bytes(16 - len(chaddr)), options=opts))


# ---------------------------------------------------------------- the server process


def serve(args: argparse.Namespace) -> int:
    """Run the DHCP service until stdin closes; answer 'stats' lines on stdin with one JSON line on stdout."""
    from appliance.events import EventBus
    from netboot.dhcp4.ratelimit import RateLimit
    from netboot.dhcp4.server import DhcpService
    from netboot.dhcp4.settings import BootPrograms, DhcpSettings, Reservation

    rate = None if args.unknown_rate == "off" else RateLimit(float(args.unknown_rate), args.unknown_burst)
    settings = DhcpSettings(interface="lo", address=ipaddress.IPv4Interface("127.0.0.1/8"),
                            boot=BootPrograms(http_base="http://127.0.0.1:8080"), port=args.port,
                            client_port=args.client_port, pool=(ipaddress.IPv4Address(POOL[0]), ipaddress.IPv4Address(POOL[1])),
                            unknown_rate=rate)
    reservations = {node_mac(i): Reservation(ipaddress.IPv4Address(NODE_BASE + i), f"node-{i}") for i in range(args.nodes)}
    bus = EventBus()

    async def main() -> None:
        service = DhcpService(settings, reservations, bus.publish, None, Path(args.journal))
        await service.start()
        task = asyncio.create_task(service.serve())
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_stdin() -> None:
            line = sys.stdin.readline()
            if not line:
                if not done.done():
                    done.set_result(None)
                return
            stats = dict(service.stats(), event_macs=len(bus.macs()), rss_kib=rss_kib(os.getpid()))
            print(json.dumps(stats), flush=True)

        loop.add_reader(sys.stdin.fileno(), on_stdin)
        print(json.dumps({"ready": True}), flush=True)
        try:
            await done
        finally:
            loop.remove_reader(sys.stdin.fileno())
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await service.close()

    asyncio.run(main())
    return 0


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def kernel_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP sockets bound to port (full receive buffer): /proc/net/udp 'drops'."""
    total = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            total += int(fields[-1])
    return total


# ---------------------------------------------------------------- the flood process


def flood(args: argparse.Namespace) -> int:
    """Send DISCOVER and REQUEST of --macs random MACs round and round at full speed for --seconds; print the count."""
    rng = random.Random(args.seed)
    first, last = int(ipaddress.IPv4Address(POOL[0])), int(ipaddress.IPv4Address(POOL[1]))
    packets = []
    for _ in range(args.macs):
        chaddr = bytes([0x02]) + rng.randbytes(5)
        xid = rng.getrandbits(31) | (1 << 31)  # the prober's xids stay below 2**31
        packets.append(request(chaddr, 1, xid))
        packets.append(request(chaddr, 3, xid, rng.randint(first, last).to_bytes(4, "big")))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = (SERVER_IP, args.port)
    sent = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for data in packets[sent % len(packets):][:1000]:
            try:
                sock.sendto(data, target)
            except OSError:
                continue  # ENOBUFS on a saturated loopback: go on
            sent += 1
    print(sent, flush=True)
    return 0


# ---------------------------------------------------------------- this process: inventory nodes and the report


async def probe_nodes(nodes: int, port: int, client_port: int, until: float) -> dict[str, Any]:
    """Inventory nodes doing DISCOVER/REQUEST exchanges in a loop until `until`; their reply latencies and answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("0.0.0.0", client_port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[bytes]] = {}
    latencies: list[float] = []
    result: dict[str, Any] = {"exchanges": 0, "wrong_address": 0, "resends": 0, "unanswered": 0}

    async def reader() -> None:
        while True:
            data, _ = await loop.sock_recvfrom(sock, 4096)
            fut = waiting.pop(int.from_bytes(data[4:8], "big"), None) if len(data) >= 240 else None
            if fut is not None and not fut.done():
                fut.set_result(data)

    async def ask(data: bytes) -> bytes | None:
        xid = int.from_bytes(data[4:8], "big")
        start = time.perf_counter()
        for attempt in range(int(5 / RESEND_S)):
            fut = waiting[xid] = loop.create_future()
            sock.sendto(data, (SERVER_IP, port))
            try:
                async with asyncio.timeout(RESEND_S):
                    reply = await fut
            except TimeoutError:
                result["resends"] += 1
                continue
            latencies.append(time.perf_counter() - start)
            return reply
        result["unanswered"] += 1
        return None

    async def node(i: int) -> None:
        chaddr = bytes.fromhex(node_mac(i).replace(":", ""))
        ip = (NODE_BASE + i).to_bytes(4, "big")
        n = 0
        while time.monotonic() < until:
            xid = (i << 16) | (n & 0xfffe)
            n += 2
            for data in (request(chaddr, 1, xid), request(chaddr, 3, xid + 1, ip)):
                reply = await ask(data)
                if reply is not None and reply[16:20] != ip:
                    result["wrong_address"] += 1
            result["exchanges"] += 1
            await asyncio.sleep(0.05)

    read = asyncio.create_task(reader())
    try:
        await asyncio.gather(*(node(i) for i in range(nodes)))
    finally:
        read.cancel()
        sock.close()
    latencies.sort()
    result["replies"] = len(latencies)
    if latencies:
        result.update(median_ms=1000 * latencies[len(latencies) // 2],
                      p99_ms=1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                      max_ms=1000 * latencies[-1], within_1s=sum(x <= 1.0 for x in latencies))
    return result


class Server:
    """The server process: started, asked for its stats, stopped (on any exit of the with block)."""

    def __init__(self, args: argparse.Namespace, rate: str, scratch: str) -> None:
        self.port, self.client_port = free_udp_port(), free_udp_port()
        argv = [sys.executable, __file__, "serve", "--port", str(self.port), "--client-port", str(self.client_port),
                "--nodes", str(args.nodes), "--unknown-rate", rate, "--unknown-burst", str(args.unknown_burst),
                "--journal", str(Path(scratch) / f"leases-{rate}.journal")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if json.loads(self.proc.stdout.readline() or "{}").get("ready") is not True:
            stop(self.proc)  # type: ignore[arg-type]
            raise RuntimeError("the DHCP server did not start")

    def stats(self) -> dict[str, int]:
        """The service's counters and table sizes, its event bus's MACs and its RSS, now."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        stop(self.proc)  # type: ignore[arg-type]


def phase(args: argparse.Namespace, rate: str, scratch: str) -> dict[str, Any]:
    """One flood against a fresh server with the given unknown_rate ('off' or requests/s)."""
    with Server(args, rate, scratch) as server:
        before = server.stats()
        drops0 = kernel_drops(server.port)
        floods = [subprocess.Popen([sys.executable, __file__, "flood", "--port", str(server.port), "--macs",
                                    str(args.macs // args.flooders), "--seconds", str(args.seconds), "--seed", str(k)],
                                   stdout=subprocess.PIPE, text=True) for k in range(args.flooders)]
        try:
            started = time.monotonic()
            probe = asyncio.run(probe_nodes(args.nodes, server.port, server.client_port, started + args.seconds))
            sent = sum(int(f.communicate(timeout=30)[0] or 0) for f in floods)
            elapsed = time.monotonic() - started
        finally:
            for f in floods:
                stop(f)  # type: ignore[arg-type]
        after = server.stats()
        drops = kernel_drops(server.port) - drops0  # read while the server's socket is open
    handled = after["received"] - before["received"]
    return {"unknown_rate": rate, "flood_sent": sent, "seconds": elapsed, "handled": handled,
            "handled_per_s": handled / elapsed, "kernel_drops": drops, "probe": probe, "before": before, "after": after}


def report(phases: list[dict[str, Any]], args: argparse.Namespace, load: dict[str, Any]) -> str:
    """A markdown report of the phases."""
    rows = []
    for p in phases:
        pr, a, b = p["probe"], p["after"], p["before"]
        rate = "off" if p["unknown_rate"] == "off" else f"{p['unknown_rate']}/s burst {args.unknown_burst}"
        rows.append([rate, f"{p['flood_sent']:,}", f"{p['handled']:,}", fmt(p["handled_per_s"]),
                     f"{a['rate_limited']:,}", f"{p['kernel_drops']:,}", f"{a['pool_exhausted']:,}",
                     f"{pr['replies']:,}", fmt(pr.get("median_ms"), 2), fmt(pr.get("p99_ms"), 1), fmt(pr.get("max_ms"), 1),
                     f"{pr.get('within_1s', 0):,}/{pr['replies']:,}", str(pr["resends"]), str(pr["unanswered"]),
                     str(pr["wrong_address"]), f"{a['leases']}/{a['offers_pending']}/{a['exchanges_tracked']:,}/{a['event_macs']:,}",
                     f"{b['rss_kib'] / 1024:.1f} -> {a['rss_kib'] / 1024:.1f}"])
    table = markdown_table(["unknown_rate", "flood sent", "server handled", "handled/s", "rate-limited", "kernel drops",
                            "pool exhausted", "node replies", "median ms", "p99 ms", "max ms", "within 1 s", "resends",
                            "unanswered", "wrong address", "leases/offers/exchanges/event MACs", "RSS MiB"], rows)
    return (f"{args.macs:,} random MACs ({args.flooders} flood process(es)), {args.nodes} inventory nodes, {args.seconds:g} s "
            f"a phase, pool {POOL[0]}-{POOL[1]} (254), loopback; load before: {load.get('load1')} "
            f"(busy {load.get('busy_pct', 0):.0f} %)\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run a subcommand (serve, flood) or the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "serve", "flood"))
    parser.add_argument("--macs", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flooders", type=int, default=1)
    parser.add_argument("--unknown-rate", default="200", help="requests/s per relay circuit, relay or port, or 'off'")
    parser.add_argument("--unknown-burst", type=int, default=1000)
    parser.add_argument("--phases", default="200,off", help="unknown_rate of each phase, comma-separated")
    parser.add_argument("--json")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client-port", type=int, default=0)
    parser.add_argument("--journal", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        return serve(args)
    if args.mode == "flood":
        return flood(args)
    exit_cleanly_on_sigterm()
    load = machine_load()
    phases = []
    with ScratchDir("rb-starve-") as scratch:
        for rate in args.phases.split(","):
            say(f"phase unknown_rate={rate}: {args.macs} MACs for {args.seconds:g} s")
            phases.append(phase(args, rate.strip(), scratch))
    write_json(args.json, {"phases": phases, "load": load, "args": vars(args)})
    print(report(phases, args, load))
    ok = all(p["probe"]["unanswered"] == 0 and p["probe"]["wrong_address"] == 0
             and p["probe"].get("within_1s") == p["probe"]["replies"] for p in phases)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

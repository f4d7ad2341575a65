#!/usr/bin/env python3
"""What the latency histograms cost the DHCP hot path (issue 12: at most 5 % of the DHCP benchmark).

In-process, no network: the DHCP request path the server runs per datagram (decode, DhcpPolicy.handle, the
reply's bytes) over the fuzzing corpus of valid requests (tests/fuzz_targets.py: BIOS/UEFI/HTTP/iPXE clients,
relayed, every message type), timed with and without what the server adds per request for /metrics (a
perf_counter() call and Latency.observe per request, one perf_counter() per wake-up), interleaved, --repeats times; prints the median microseconds per
request of each and the ratio.

Run: .venv/bin/python bench/latency_cost.py [--requests 200000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
import fuzz_targets as ft  # noqa: E402
from domain.errors import MalformedPacket  # noqa: E402
from domain.latency import Latency  # noqa: E402
from netboot.dhcp4.codec import decode  # noqa: E402
from netboot.dhcp4.policy import VIA_DHCP  # noqa: E402


def run(requests: int, timed: bool) -> float:
    """Mean microseconds per request over `requests` requests (the corpus in turn), with or without the histogram."""
    target = ft.dhcp_target("authoritative")
    corpus = ft.dhcp_corpus()
    latency = Latency()
    handle = target.policy.handle
    now = ft.NOW
    observe = latency.observe
    t0 = time.perf_counter()
    woke = t0
    for i in range(requests):
        data = corpus[i % len(corpus)]
        if timed and i % 256 == 0:  # the server reads up to 256 datagrams a wake-up (netboot/dhcp4/server.py)
            woke = time.perf_counter()
        try:
            handle(decode(data), now, VIA_DHCP, ("10.77.0.200", 68))
        except MalformedPacket:
            continue
        if timed:
            observe(time.perf_counter() - woke)  # as DhcpService.read_batch does after each request
    return (time.perf_counter() - t0) / requests * 1e6


def main() -> int:
    """Interleave the two, print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # DECLINE warnings and the like: not what is measured
    plain, timed = [], []
    for _ in range(args.repeats):
        plain.append(run(args.requests, False))
        timed.append(run(args.requests, True))
    p, t = statistics.median(plain), statistics.median(timed)
    print(f"DHCP request path, {args.requests} requests x {args.repeats} repeats (medians):")
    print(f"  without the histogram {p:.2f} µs/request, with it {t:.2f} µs/request: +{t - p:.2f} µs, {t / p:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fuzz the DHCP, TFTP and DNS codecs and policies with 1,000,000 random inputs (issue 11), in-process.

The checks are those of tests/test_fuzz.py (tests/fuzz_targets.py), driven by random.Random(seed) instead of
hypothesis (no shrinking, ~100x cheaper per input): mutations of corpora of valid packets (scapy-built DHCP
requests, TFTP datagrams as clients send them, dnslib-built DNS queries), random TFTP sessions (options,
limits, ACK/ERROR/junk/tick sequences) and random TFTP paths. A third of the inputs go to DHCP (the
authoritative, proxy and discovery policies in turn, each over one lease table kept for the whole run), a
third to TFTP (half datagrams, a quarter sessions, a quarter paths), a third to DNS. Every DHCP reply is also
parsed by scapy unless --scapy-every says otherwise. Any exception other than MalformedPacket from a decoder,
and any broken property, is counted with its input in hex; the exit status is 1 if there was one.

Run: .venv/bin/python bench/fuzz_codecs.py [--inputs 1000000] [--seed 1] [--scapy-every 1]
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
import fuzz_targets as ft  # noqa: E402
from netboot.dhcp4.policy import VIA_DHCP, VIA_PXE  # noqa: E402

MAX_SHOWN = 5  # exceptions shown per target (all are counted)


@dataclass
class Tally:
    """What became of one target's inputs."""

    name: str
    inputs: int = 0
    decoded: int = 0
    malformed: int = 0
    replies: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (exception, input) of the first few
    failed: int = 0


def _show(value: Any) -> str:
    """An input as hex (bytes) or repr, for the report."""
    return value.hex() if isinstance(value, bytes) else repr(value)[:2000]


def run(tally: Tally, count: int, one: Callable[[int], tuple[Any, Callable[[], Any]]]) -> None:
    """Feed count inputs: one(i) returns (input, thunk); the thunk's result is counted, any exception recorded."""
    start = time.perf_counter()
    for i in range(count):
        value, thunk = one(i)
        try:
            outcome = thunk()
        except Exception as exc:  # noqa: BLE001 - every escape is what we count
            tally.failed += 1
            if len(tally.failures) < MAX_SHOWN:
                tally.failures.append((f"{type(exc).__name__}: {exc}", _show(value)))
            continue
        if outcome == ft.MALFORMED:
            tally.malformed += 1
        else:
            tally.decoded += 1
            if outcome == ft.REPLY:
                tally.replies += 1
            elif isinstance(outcome, ft.TftpRun):
                tally.replies += outcome.datagrams
    tally.inputs += count
    tally.seconds += time.perf_counter() - start


def fuzz_dhcp(count: int, seed: int, scapy_every: int) -> Tally:
    """Mutated scapy-built requests through decode and the three policies (one lease table each, clock advancing)."""
    rng = random.Random(f"{seed}-dhcp")
    corpus = ft.dhcp_corpus()
    targets = [ft.dhcp_target(mode) for mode in ft.DHCP_MODES]
    tally = Tally("DHCP (decode + DhcpPolicy.handle, 3 modes)")

    def one(i: int) -> tuple[Any, Callable[[], Any]]:
        """One mutated (or random) datagram for the i-th input's policy."""
        target = targets[i % 3]
        data = ft.mutate(rng, rng.choice(corpus), corpus, ft.dhcp_codec.OPTIONS_OFFSET, ft.DHCP_TLV_CODES) \
            if rng.random() < 0.97 else rng.randbytes(rng.randint(0, 600))
        via = VIA_PXE if target.mode == "proxy" and rng.random() < 0.5 else VIA_DHCP
        now = ft.NOW + i * 0.01  # leases and offers expire and are reclaimed during the run
        return data, lambda: ft.check_dhcp(target, data, now, via, scapy_every > 0 and i % scapy_every == 0)

    run(tally, count, one)
    return tally


def fuzz_tftp(count: int, seed: int) -> list[Tally]:
    """Mutated datagrams through the codec, random ReadSessions, random paths through normalize_path."""
    rng = random.Random(f"{seed}-tftp")
    corpus = ft.TFTP_CORPUS
    datagrams, sessions, paths = Tally("TFTP codec (decode, encode back)"), Tally("TFTP ReadSession (datagrams sent)"), \
        Tally("TFTP normalize_path")

    def datagram(i: int) -> tuple[Any, Callable[[], Any]]:
        """One mutated (or random) TFTP datagram."""
        data = ft.mutate(rng, rng.choice(corpus), corpus) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 64))
        return data, lambda: ft.check_tftp_datagram(data)

    def session(i: int) -> tuple[Any, Callable[[], Any]]:
        """One random ReadSession run."""
        args = ft.random_tftp_session(rng)
        return args, lambda: ft.check_tftp_session(*args)

    def path(i: int) -> tuple[Any, Callable[[], Any]]:
        """One random request path."""
        p = ft.random_path(rng)
        return p, lambda: ft.check_tftp_path(p)

    run(datagrams, count - 2 * (count // 4), datagram)
    run(sessions, count // 4, session)
    run(paths, count // 4, path)
    return [datagrams, sessions, paths]


def fuzz_dns(count: int, seed: int) -> Tally:
    """Mutated dnslib-built queries through decode_query, DnsZone.answer and the UDP packing."""
    rng = random.Random(f"{seed}-dns")
    corpus = ft.dns_corpus()
    zone = ft.dns_zone()
    tally = Tally("DNS (decode_query + DnsZone.answer + pack)")

    def one(i: int) -> tuple[Any, Callable[[], Any]]:
        """One mutated (or random) DNS message."""
        data = ft.mutate(rng, rng.choice(corpus), corpus, 12) if rng.random() < 0.97 else rng.randbytes(rng.randint(0, 300))
        return data, lambda: ft.check_dns(zone, data)

    run(tally, count, one)
    return tally


def main() -> int:
    """Parse options, fuzz each protocol, print a markdown table and the exceptions; 1 if there was one."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs in all, a third per protocol (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scapy-every", type=int, default=1, help="parse every Nth DHCP input's reply with scapy too (0: never)")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # the policies' rate-limited warnings (DECLINE, pool exhausted) are expected
    third = args.inputs // 3
    load0, cpu0, wall0 = os.getloadavg(), time.process_time(), time.perf_counter()
    print(f"fuzz_codecs: {args.inputs:,} inputs, seed {args.seed}, load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
          flush=True)
    tallies = [fuzz_dhcp(args.inputs - 2 * third, args.seed, args.scapy_every)]
    tallies += fuzz_tftp(third, args.seed)
    tallies.append(fuzz_dns(third, args.seed))
    wall, cpu, load1 = time.perf_counter() - wall0, time.process_time() - cpu0, os.getloadavg()
    print()
    print("| target | inputs | decoded ok | dropped as malformed | replies | unexpected exceptions | seconds | inputs/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in tallies:
        print(f"| {t.name} | {t.inputs:,} | {t.decoded:,} | {t.malformed:,} | {t.replies:,} | {t.failed} | {t.seconds:.1f} | "
              f"{t.inputs / t.seconds:,.0f} |")
    total = sum(t.inputs for t in tallies)
    failed = sum(t.failed for t in tallies)
    seconds = sum(t.seconds for t in tallies)
    print(f"| **all** | {total:,} | {sum(t.decoded for t in tallies):,} | {sum(t.malformed for t in tallies):,} | "
          f"{sum(t.replies for t in tallies):,} | {failed} | {seconds:.1f} | {total / seconds:,.0f} |")
    print()
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s, load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    for t in tallies:
        for message, value in t.failures:
            print(f"\n{t.name}: {message}\n  input: {value}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

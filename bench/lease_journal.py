#!/usr/bin/env python3
"""What durable leases cost the DHCP hot path: LeaseTable offer+bind with and without the lease journal.

In-process, no network: 20,000 distinct clients are offered and bound an address, with the journal (one
write() per lease change, what makes a lease durable before its ACK leaves) and without it, interleaved,
--repeats times; prints the median microseconds per offer+bind of each.

Run: .venv/bin/python bench/lease_journal.py
"""
from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netboot.dhcp4.leases import LeaseTable  # noqa: E402

POOL = (ipaddress.IPv4Address("10.99.1.0"), ipaddress.IPv4Address("10.99.255.250"))


def per_lease_us(clients: int, journal: Path | None) -> float:
    """Offer and bind an address to each of `clients` MACs; return the mean microseconds per client."""
    table = LeaseTable(None, POOL, (), journal)
    macs = [f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}" for i in range(clients)]
    now = time.time()
    t0 = time.perf_counter()
    for mac in macs:
        ip = table.offer(mac, None, now)
        assert ip is not None
        table.bind(mac, ip, now, 3600)
    elapsed = time.perf_counter() - t0
    table.close()
    return elapsed / clients * 1e6


def main() -> int:
    """Measure and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    without: list[float] = []
    with_journal: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            without.append(per_lease_us(args.clients, None))
            with_journal.append(per_lease_us(args.clients, Path(tmp) / f"journal-{r}"))
    for name, values in (("no journal", without), ("journal", with_journal)):
        print(f"{name:>10}: {statistics.median(values):.2f} us per offer+bind (median of {args.repeats}:"
              f" {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

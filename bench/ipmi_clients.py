#!/usr/bin/env python3
"""The appliance's two IPMI clients against many BMCs: ipmitool processes (the default) and pyghmi's client.

Loopback only, no root: pyghmi BMCs (tests/bmc_farm.py, the vm-testbed's BMC code) on 127.R.S.x, port 10623,
at most 100 per farm process. For each client and each N, `power status` then `power reset` on every BMC at
once through the client's driver class (appliance/deploy/*_power.py: retries, one call per BMC at a time), in
a child process killed after --limit seconds (pyghmi's client can deadlock). Prints, per run: wall time, CPU
seconds of the driver's process and of its children (the ipmitool processes), CPU ms per call, and the calls
that succeeded and failed. --mix failing is the mix at which pyghmi deadlocked in docs/reliability.md
(60 % healthy, 10 % slow, 15 % refusing, 5 % busy, 10 % dead); healthy has only healthy BMCs.

Run: .venv/bin/python bench/ipmi_clients.py [--bmcs 100 400] [--mix healthy failing] [--limit 240]
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "vm-testbed")]
FARM = ROOT / "tests" / "bmc_farm.py"
PORT = 10623
MIXES = {"healthy": {"ok": 1.0}, "failing": {"ok": 0.6, "slow": 0.1, "badpass": 0.08, "noname": 0.07, "busy": 0.05, "dead": 0.1}}
PER_FARM = 100


async def _one(client: str, n: int, mix: str) -> dict[str, Any]:
    """One run in this process: the farm, then every call at once; the figures."""
    from appliance.deploy.ipmitool_power import IpmitoolPower
    from appliance.deploy.pyghmi_power import PyghmiPower
    from domain.nodes import BmcSpec, Node

    tmp = Path(tempfile.mkdtemp(prefix="rb-ipmi-bench-"))
    prefix = f"127.{random.randint(2, 250)}.{random.randint(2, 250)}"
    nodes, specs = [], []
    kinds = [k for k, share in MIXES[mix].items() for _ in range(round(share * n))][:n]
    kinds += ["ok"] * (n - len(kinds))
    for i, kind in enumerate(kinds, 1):
        password = secrets.token_hex(8)
        creds = tmp / f"bmc-{i}.yaml"
        creds.write_text(f"username: rbadmin\npassword: {password}\n")
        address = f"{prefix}.{i % 250 + 1}" if n <= 250 else f"127.{prefix.split('.')[1]}.{2 + i // 250}.{i % 250 + 1}"
        specs.append({"address": address, "port": PORT, "kind": kind, "user": "rbadmin", "password": password, "delay": 0.4})
        nodes.append(Node(name=f"{kind}-{i}", mac=f"52:54:00:77:{i // 256:02x}:{i % 256:02x}",
                          ip=ipaddress.IPv4Address(f"10.77.{i // 256}.{i % 256}"), bmc=BmcSpec("ipmi", address, PORT, creds)))
    farms = []
    try:
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for spec in specs:
            by_kind.setdefault(spec["kind"], []).append(spec)
        for kind, group in by_kind.items():
            for j in range(0, len(group), PER_FARM):
                path = tmp / f"farm-{kind}-{j}.json"
                path.write_text(json.dumps(group[j:j + PER_FARM]))
                proc = await asyncio.create_subprocess_exec(sys.executable, str(FARM), str(path), stdin=subprocess.PIPE,
                                                            stdout=subprocess.PIPE)
                farms.append(proc)
                assert proc.stdout is not None
                assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        ipmi = IpmitoolPower() if client == "ipmitool" else PyghmiPower()

        async def call(node: Node, op: str) -> bool:
            try:
                await ipmi.power(node, op)
                return True
            except Exception:  # noqa: BLE001 - a failed call is a figure
                return False

        own0, kids0, t0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        ok = await asyncio.gather(*(call(node, op) for node in nodes for op in ("status", "reset")))
        wall = time.monotonic() - t0
        own1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        ipmi.close()
    finally:
        for proc in farms:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in farms:
            await proc.wait()
    own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
    # RUSAGE_CHILDREN counts reaped children: the ipmitool processes (the farms are reaped after this point).
    kids = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    calls = len(ok)
    return {"client": client, "bmcs": n, "mix": mix, "wall_s": round(wall, 1), "cpu_own_s": round(own, 2), "cpu_children_s": round(kids, 2),
            "cpu_ms_per_call": round(1000 * (own + kids) / calls, 1), "ok": sum(ok), "failed": calls - sum(ok)}


def main() -> None:
    """Run every (mix, N, client) in a child process with a time limit; print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bmcs", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--mix", nargs="+", choices=sorted(MIXES), default=["healthy", "failing"])
    parser.add_argument("--clients", nargs="+", choices=["ipmitool", "pyghmi"], default=["ipmitool", "pyghmi"])
    parser.add_argument("--limit", type=float, default=240.0, help="seconds before a run is called hung and killed")
    parser.add_argument("--one", nargs=3, metavar=("CLIENT", "N", "MIX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(_one(args.one[0], int(args.one[1]), args.one[2]))), flush=True)
        return
    print(f"{'mix':8} {'BMCs':>5} {'client':9} {'wall s':>7} {'CPU own s':>9} {'CPU kids s':>10} {'CPU ms/call':>11} {'ok':>5} {'failed':>6}")
    for mix in args.mix:
        for n in args.bmcs:
            for client in args.clients:
                try:
                    out = subprocess.run([sys.executable, __file__, "--one", client, str(n), mix], capture_output=True, text=True,
                                         timeout=args.limit, check=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    print(f"{mix:8} {n:>5} {client:9} {r['wall_s']:>7} {r['cpu_own_s']:>9} {r['cpu_children_s']:>10} "
                          f"{r['cpu_ms_per_call']:>11} {r['ok']:>5} {r['failed']:>6}", flush=True)
                except subprocess.TimeoutExpired:
                    print(f"{mix:8} {n:>5} {client:9} hung: no end within {args.limit:g} s (killed)", flush=True)


if __name__ == "__main__":
    main()

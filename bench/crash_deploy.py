"""`kill -9` of the appliance at random moments of testbed deployments, and what it finds after the restart.

    sudo .venv/bin/python bench/crash_deploy.py [--nodes 20] [--trials 20] [--seed 1]

One testbed (N nodes, 2 racks), the real `rackboot serve` and the sample environment. A first deployment, left
alone, then a second (the nodes run an installed system, as in every trial), gives the length T of a deployment. Then per trial: `rackboot deploy -m node-[1-N]` started through the
CLI, the appliance killed with SIGKILL at a moment drawn uniformly in [0.3 s, T] (seeded), restarted, and
checked:

- leases: the inventory nodes have reservations (never in the lease table), so the bench adds a pool to the
  appliance's config and a churn of DHCP clients with random MACs in a namespace of its own on the core bridge
  (scapy-built DISCOVER/REQUEST, broadcast flag): every lease ACKed before the kill is in the lease table after
  the restart (the journal replayed), and clients after the restart get none of those addresses;
- profiles: no node is left on the deploy profile (its one-time token died with the process);
- the interrupted deployment is no longer running, and each of its nodes has a final state with a reason;
- a new deployment of the same nodes deploys every one of them.

Prints a JSON line per trial (kill moment, the node stages at the kill, what each check found) and a summary;
exit 1 when any check failed. Everything is removed at the end, also on failure and Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from scapy.layers.dhcp import BOOTP, DHCP

from vmtestbed.appliance_files import ApplianceFiles, write_sample_environment
from vmtestbed.control import Control
from vmtestbed.demo import rackboot_cli
from vmtestbed.netns import entered
from vmtestbed.plan import TestbedPlan, make_plan
from vmtestbed.testbed import add_namespace, add_pool, admin_token, down, read_state, start_appliance, up
from vmtestbed.topology import existing_namespaces

DEPLOY_TIMEOUT_S = 300.0
CHURN_PER_S = 20.0


class PoolChurn:
    """DHCP clients with random MACs, one at a time, from a namespace on the testbed's core bridge."""

    def __init__(self, plan: TestbedPlan) -> None:
        self.ns = add_namespace(plan, "pool")  # no address: a DHCP client's interface
        self.acked: list[tuple[float, str, str]] = []  # (time, mac, ip)
        self.naks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with entered(self.ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        self.sock.bind(("0.0.0.0", 68))
        self.sock.settimeout(1.0)

    def start(self) -> None:
        """Start leasing in a thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop leasing (the lease in progress is finished or timed out first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _exchange(self, packet: Any, xid: int, want: int) -> Any:
        self.sock.sendto(bytes(packet), ("255.255.255.255", 67))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                return None
            reply = BOOTP(data)
            if reply.xid == xid and DHCP in reply:
                kind = dict(o for o in reply[DHCP].options if isinstance(o, tuple)).get("message-type")
                if kind == want or kind == 6:
                    return reply
        return None

    def _run(self) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            mac = "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))
            xid = rng.getrandbits(32)
            chaddr = bytes.fromhex(mac.replace(":", ""))
            base = BOOTP(chaddr=chaddr, xid=xid, flags=0x8000)
            offer = self._exchange(base / DHCP(options=[("message-type", "discover"), "end"]), xid, 2)
            if offer is not None and offer.yiaddr != "0.0.0.0":
                server = dict(o for o in offer[DHCP].options if isinstance(o, tuple)).get("server_id")
                ack = self._exchange(base / DHCP(options=[("message-type", "request"), ("requested_addr", offer.yiaddr),
                                                          ("server_id", server), "end"]), xid, 5)
                if ack is not None and dict(o for o in ack[DHCP].options if isinstance(o, tuple)).get("message-type") == 5:
                    self.acked.append((time.time(), mac, ack.yiaddr))
                elif ack is not None:
                    self.naks += 1
            self._stop.wait(1.0 / CHURN_PER_S)

    def close(self) -> None:
        """Stop, close the socket and delete the namespace."""
        self.stop()
        self.sock.close()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def api(plan: TestbedPlan, path: str) -> Any:
    """GET an API path as the admin, from the appliance's namespace."""
    req = urllib.request.Request(plan.appliance_url + path, headers={"Authorization": f"Bearer {admin_token(plan)}"})
    with entered(plan.appliance_ns):
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)


def deploy(plan: TestbedPlan, nodes: str) -> subprocess.Popen[str]:
    """Start `rackboot deploy -m NODES -e sample --json` from the appliance's namespace."""
    return subprocess.Popen(rackboot_cli(plan, "deploy", "-m", nodes, "-e", "sample", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leases(state_dir: Path) -> dict[str, str]:
    """The lease table as the restarted appliance keeps it: {mac: ip}."""
    with sqlite3.connect(f"file:{state_dir / 'rackboot.db'}?mode=ro", uri=True) as db:
        return {mac: ip for mac, ip in db.execute("SELECT mac, ip FROM dhcp4_leases")}


def trial(plan: TestbedPlan, files: ApplianceFiles, churn: PoolChurn, nodes: str, kill_at: float) -> dict[str, Any]:
    """One kill and its checks."""
    out: dict[str, Any] = {"kill_at_s": round(kill_at, 2)}
    pid = int(read_state(plan.name)["appliance_pid"])
    first_ack = len(churn.acked)
    churn.start()
    client = deploy(plan, nodes)
    time.sleep(kill_at)
    with Control(plan.state_dir) as ctl:
        before = ctl.call("status")["nodes"]
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
    churn.stop()
    out["stages_at_kill"] = dict(Counter(n["stage"] for n in before))
    try:
        client.wait(60)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
    out["client_exit"] = client.returncode
    start_appliance(plan, files)
    had = {mac: ip for t, mac, ip in churn.acked[first_ack:] if t <= killed}
    table = leases(files.state_dir)
    out["pool_leases_acked_before_kill"] = len(had)
    out["leases_lost"] = sorted(f"{mac} {ip}" for mac, ip in had.items() if table.get(mac) != ip)
    after = len(churn.acked)
    churn.start()
    time.sleep(2.0)  # new clients after the restart: none may get an address ACKed to another before the kill
    churn.stop()
    given = {mac: ip for _, mac, ip in churn.acked[after:]}
    earlier = {ip: mac for _, mac, ip in churn.acked[:after]}
    out["addresses_given_twice"] = sorted(ip for mac, ip in given.items() if ip in earlier and earlier[ip] != mac)
    out["left_on_deploy_profile"] = sorted(n["name"] for n in api(plan, "/api/v1/nodes")["nodes"] if n["profile"]["kind"] == "deploy")
    interrupted = max(api(plan, "/api/v1/deployments")["deployments"], key=lambda d: d["created"])
    shown = api(plan, f"/api/v1/deployments/{interrupted['id']}")
    out["interrupted_status"] = shown.get("status")
    states = [(n["node"], n["state"], n.get("reason", "")) for n in shown.get("nodes", [])]
    out["final_states"] = dict(Counter(s for _, s, _ in states))
    out["without_reason"] = sorted(name for name, s, why in states if s not in ("done", "DONE") and not why)
    t0 = time.monotonic()
    again = deploy(plan, nodes)
    stdout, _ = again.communicate(timeout=DEPLOY_TIMEOUT_S)
    report = json.loads(stdout) if again.returncode in (0, 1) and stdout.strip().startswith("{") else {}
    out["redeployed"] = f"{len(report.get('ok', []))}/{plan.nodes}"
    out["redeploy_s"] = round(time.monotonic() - t0, 1)
    out["ok"] = (not out["leases_lost"] and not out["addresses_given_twice"] and not out["left_on_deploy_profile"]
                 and out["interrupted_status"] not in ("running", None) and not out["without_reason"]
                 and out["redeployed"] == f"{plan.nodes}/{plan.nodes}")
    return out


def main() -> int:
    """Run the trials; print JSON lines and a summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    rng = random.Random(args.seed)
    name = f"ck{secrets.token_hex(2)}"
    plan = make_plan(name, args.nodes, 2, post_s="0.2-1", seed=args.seed)
    nodes = f"node-[1-{args.nodes}]"
    results = []
    churn: PoolChurn | None = None
    try:
        result = up(plan)
        add_pool(result.files)
        start_appliance(plan, result.files)
        churn = PoolChurn(plan)
        with tempfile.TemporaryDirectory(prefix="rackboot-crash-") as tmp:
            added = subprocess.run(rackboot_cli(plan, "env", "add", str(write_sample_environment(Path(tmp), size_mib=2))),
                                   capture_output=True, text=True, timeout=120)
            if added.returncode != 0:
                raise RuntimeError(f"env add: {added.stderr}")
        # Each trial deploys nodes that run an installed system already (the previous trial's redeployment): the
        # second of two undisturbed deployments is the one whose length the kill moments are drawn within.
        for which in ("first", "second"):
            t0 = time.monotonic()
            stdout, _ = deploy(plan, nodes).communicate(timeout=DEPLOY_TIMEOUT_S)
            length = time.monotonic() - t0
            print(json.dumps({f"undisturbed_{which}_deployment_s": round(length, 1), "ok": len(json.loads(stdout).get("ok", []))}), flush=True)
        for i in range(args.trials):
            row = {"trial": i + 1, **trial(plan, result.files, churn, nodes, rng.uniform(0.3, length))}
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        if churn is not None:
            churn.close()
        down(name)
    good = sum(r["ok"] for r in results)
    during = sum(r.get("interrupted_status") == "interrupted" for r in results)
    print(f"\n{good}/{len(results)} trials passed every check ({during} kills landed during the deployment, the others "
          f"after its end); namespaces left: {len(existing_namespaces(plan.prefix))}")
    return 0 if good == len(results) == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Image broadcast on the vm-testbed: rackboot chain, tree and star against udpcast (multicast), shaped links.

For each node count N this script builds a vm-testbed (`bb` + 6 hex digits), starts the appliance in
it, reboots every node into the deploy environment (`rackboot reboot --to deploy --level hard`, the
CLI in the appliance's namespace) and waits until every node runs its deploy agent (SSH on port 22,
the broadcast receiver on port 7070). Then, on the same nodes and links, one method at a time:

- rackboot chain, tree (fanout 2) and star: `broadcast.methods.run_broadcast` from a driver process
  run inside the appliance's namespace (this script re-run with --inner), every node armed over SSH
  with the appliance's deploy key, exactly as the controller's AgentDeployDriver.broadcast does. Each
  node's sink hashes the stream and checks it against the image's sha256 (kind "discard": hash only,
  nothing is written, so 200 x 256 MiB need no disk space).
- udpcast: `udp-sender --file IMAGE --interface rb0 --min-receivers N --nokbd --full-duplex
  --rexmit-hello-interval 100 --max-bitrate 0.97xLINK --mcast-rdv-address 239.255.77.1` in the
  appliance's namespace and one `udp-receiver --interface eth0 --mcast-rdv-address 239.255.77.1
  --pipe sha256sum` per node namespace (real processes; multicast on the same bridges); its time runs
  from the sender's "Starting transfer" (all receivers connected) to its exit, and every receiver's
  sha256 is checked.
- floor: one plain TCP stream (sendfile to a reader in node-1's namespace) measures what one shaped
  link carries; the nominal floor is image size / link rate.

Every node link is shaped with tbf at --link-mbit (both directions), rack uplinks at 10x that. All
virtual nodes live in ONE Python process (the testbed's node daemon) on a 2-core machine, so N relays
x link rate must fit in what that process can move: the report gives the daemon's CPU time per run.
With --kill-at N, a chain broadcast at N powers off --kill-pct of the nodes --kill-after seconds into
the stream; those must be reported failed with a reason and every other node verified.

Each measured run holds an exclusive lock on /tmp/rackboot-bench.lock (a testbed session holds it
from `up` to `down`), so two benchmarks never overlap on this machine. Everything is removed on
success, failure, Ctrl-C and SIGTERM (`vmtestbed.testbed.down`).

Run (as root, after ./setup.sh --bench):
    .venv/bin/python bench/broadcast_bench.py --nodes 10 --link-mbit 100 --rackboot-commit HEAD
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    ScratchDir, code_description, cpu_seconds, fmt, machine_load, markdown_table, median, resolve_commit, say, write_json,
)

LOCK_FILE = Path("/tmp/rackboot-bench.lock")
METHODS = ("chain", "tree", "star", "udpcast")
AGENT_SSH_PORT = 22
AGENT_DATA_PORT = 7070
FLOOR_PORT = 7171
APPLIANCE_IF = "rb0"
# udpcast's rendezvous: the testbed's addresses have no broadcast address, so udpcast's default (the
# interface's broadcast, else 224.0.0.1 which a receiver bound to its unicast address never hears) fails.
UDPCAST_RDV = "239.255.77.1"
EXPORT_ENV = "RACKBOOT_BENCH_EXPORT"  # set when this process runs an exported commit (see reexec_at_commit)


# ---------------------------------------------------------------------------------------------------
# Shared with exec_bench.py: the lock, the exported commit, a booted testbed.


def held_by_ancestor(path: Path) -> bool:
    """True when a process this one descends from holds an flock on path (e.g. `flock /tmp/rackboot-bench.lock CMD`)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    # "1: FLOCK  ADVISORY  WRITE 775 fe:00:2146965 0 EOF" (a waiter's line has "->" in the second field)
    holders = {int(f[4]) for f in (line.split() for line in lines) if len(f) > 5 and f[1] == "FLOCK" and f[5] == inode}
    pid = os.getppid()
    while pid > 1:
        if pid in holders:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class BenchLock:
    """Exclusive flock on /tmp/rackboot-bench.lock: one benchmark at a time on this machine.

    When an ancestor already holds it (the run was started as `flock /tmp/rackboot-bench.lock ...`), that lock
    covers this run: taking it again on a new open file would wait for ourselves forever.
    """

    def __init__(self, path: Path = LOCK_FILE) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "BenchLock":
        if held_by_ancestor(self.path):
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"  waiting for {self.path} (another benchmark is running)")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def reexec_at_commit(commit: str | None) -> ScratchDir | None:
    """With a commit, export it (git archive) and re-run this script with PYTHONPATH on the export; return its dir.

    Everything the bench starts (the node daemon, the appliance, the CLI, the in-namespace drivers)
    inherits PYTHONPATH, so the whole run measures that commit, not other people's uncommitted edits.
    The re-run process owns the export directory and removes it at the end.
    """
    if os.environ.get(EXPORT_ENV):
        export = ScratchDir.__new__(ScratchDir)
        export.name, export._owner = os.environ[EXPORT_ENV], os.getpid()
        return export
    if not commit:
        return None
    repo = Path(__file__).resolve().parent.parent
    export = ScratchDir(prefix="rackboot-bench-code-")
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        export.cleanup()
        sys.exit(f"cannot export commit {commit}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", export.name], input=archive.stdout, check=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([export.name, str(Path(export.name) / "vm-testbed")])
    env[EXPORT_ENV] = export.name
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise AssertionError("unreachable")


def commit_of_export() -> str:
    """Describe which code runs: the exported commit, or the checkout's HEAD and whether its code has uncommitted edits."""
    if os.environ.get("RACKBOOT_BENCH_COMMIT_DESC"):
        return os.environ["RACKBOOT_BENCH_COMMIT_DESC"]
    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", "appliance", "netboot",
                            "broadcast", "vm-testbed"], capture_output=True, text=True).stdout.split()
    return f"checkout at {head or 'unknown'}" + (f" + uncommitted edits in {', '.join(dirty[1::2])}" if dirty else "")


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: unwind and tear down."""


def raise_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into Interrupted so every finally block (testbed down) runs."""
    def handler(signum: int, frame: object) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def require_root_and_tools(tools: Sequence[str]) -> None:
    """Exit with a clear message when not root or a peer program is missing."""
    if os.geteuid() != 0:
        sys.exit("this benchmark needs root (it creates network namespaces)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing programs: {', '.join(missing)} (run ./setup.sh --bench)")


def busy_snapshot() -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def busy_since(snap: tuple[int, int]) -> float:
    """Percent of all CPUs busy since snap."""
    total, idle = busy_snapshot()
    return round(100.0 * (1 - (idle - snap[1]) / max(1, total - snap[0])), 1)


class DeployTestbed:
    """A testbed whose nodes all run the deploy agent: up, appliance, reboot --to deploy; down on exit."""

    def __init__(self, nodes: int, racks: int, link_mbit: int, uplink_mbit: int, seed: int = 0, boot_batch: int = 200,
                 min_booted: float = 1.0, builtin_true: bool = False) -> None:
        from vmtestbed.plan import make_plan

        self.name = f"bb{secrets.token_hex(3)}"
        self.plan = make_plan(self.name, nodes, racks, link_mbit=link_mbit, uplink_mbit=uplink_mbit, post_s="0.5-2", seed=seed,
                              builtin_true=builtin_true)
        self.daemon_pids: tuple[int, ...] = ()  # every node daemon's (one per shard)
        self.files: Any = None
        self.procs: list[subprocess.Popen[Any]] = []  # everything this session started, stopped by close()
        self.boot_batch = boot_batch
        self.min_booted = min_booted  # fraction of the nodes that must run the agent (the rest are left out)
        self.running: list[str] = []
        self.boot_s = 0.0
        self.boot_rounds = 1
        self.up_s = 0.0

    @property
    def key(self) -> Path:
        """The appliance's deploy key (the agents accept it)."""
        return self.plan.state_dir / "appliance" / "state" / "deploy_key"

    @property
    def appliance_ns(self) -> str:
        """The appliance's namespace."""
        return self.plan.appliance_ns

    def node_ns(self, name: str) -> str:
        """A node's namespace."""
        return self.plan.node(name).namespace

    def start(self) -> "DeployTestbed":
        """Build the testbed, start the appliance, boot every node into the deploy environment."""
        from vmtestbed.testbed import ensure_neighbour_table, start_appliance, up

        plan = self.plan
        t0 = time.monotonic()
        result = up(plan)
        self.up_s = time.monotonic() - t0
        self.daemon_pids = result.daemon_pids
        self.files = result.files
        # The testbed sizes the kernel's (global) ARP table for appliance<->node and BMC traffic (3N+256);
        # chains and exec trees add node<->node neighbours, and past gc_thresh3 new neighbours fail
        # ("No route to host"). Same API, a larger figure; the last `down` restores the old limits.
        ensure_neighbour_table(6 * plan.nodes + 1024, say)
        start_appliance(plan, result.files)
        say(f"  testbed {self.name}: {plan.nodes} nodes in {plan.racks} racks, links {plan.link_mbit} Mbit/s, "
            f"uplinks {plan.uplink_mbit} Mbit/s, up in {self.up_s:.1f}s")
        t0 = time.monotonic()
        names = [n.name for n in plan.node_list]
        # In batches, as Kadeploy-style reboot windows do: 1000 nodes at once overload the 2 cores, the
        # controller then resets nodes it thinks are stuck, and a reset while an agent starts can leave
        # that node's port 7070 bound for good (see docs/benchmarks.md, "Broadcast").
        for i in range(0, len(names), self.boot_batch):
            self._reboot(names[i:i + self.boot_batch], 1)
        missing = self._wait_running(names, 1)
        for attempt in range(2, 4):
            if not missing:
                break
            self.boot_rounds = attempt
            self._reboot(missing, attempt)
            missing = self._wait_running(missing, attempt)
        self.running = [n for n in names if n not in set(missing)]
        self.boot_s = time.monotonic() - t0
        if len(self.running) < self.min_booted * plan.nodes:
            raise RuntimeError(f"{len(missing)} nodes never ran the deploy agent: {missing[:10]}")
        say(f"  {len(self.running)}/{plan.nodes} nodes run the deploy agent ({self.boot_s:.1f}s after the first "
            f"`rackboot reboot --to deploy`, {self.boot_rounds} round(s))" + (f"; left out: {missing}" if missing else ""))
        return self

    def _reboot(self, names: list[str], attempt: int) -> None:
        """`rackboot reboot --to deploy --level hard` of these nodes (the CLI waits until the controller sees them up)."""
        from ClusterShell.NodeSet import NodeSet

        t0 = time.monotonic()
        nodeset = str(NodeSet.fromlist(names))
        out = self.run_cli(["reboot", "-m", nodeset, "--to", "deploy", "--level", "hard"], timeout=600 + len(names))
        if out.returncode not in (0, 2):
            raise RuntimeError(f"rackboot reboot exited {out.returncode}: {(out.stderr or out.stdout)[-500:]}")
        failed = [line.strip() for line in out.stdout.splitlines() if "FAILED" in line]
        say(f"  round {attempt}: `rackboot reboot -m {nodeset[:40]} --to deploy --level hard` returned after "
            f"{time.monotonic() - t0:.1f}s" + (f"; {' | '.join(failed)[:300]}" if failed else ""))

    def _wait_running(self, names: list[str], attempt: int) -> list[str]:
        """Wait while more of these nodes reach the deploy agent (60 s without progress ends it); return the others."""
        from collections import Counter

        wanted = set(names)
        best, last_progress = -1, time.monotonic()
        while True:
            status = [n for n in self.daemon_status()["nodes"] if n["name"] in wanted]
            missing = [n for n in status if not (n["stage"] == "running" and n["detail"] == "deploy agent")]
            if len(status) - len(missing) > best:
                best, last_progress = len(status) - len(missing), time.monotonic()
            if not missing or time.monotonic() - last_progress > 60:
                break
            time.sleep(2)
        if missing:
            stages = Counter(f"{n['stage']} ({n['detail'][:60]})" for n in missing)
            say(f"  round {attempt}: {len(missing)} nodes not at the deploy agent: {dict(stages.most_common(4))}")
        return [n["name"] for n in missing]

    def run_cli(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run `rackboot ARGV` as a client of the testbed's appliance, from its namespace."""
        from vmtestbed.demo import rackboot_cli

        return subprocess.run(rackboot_cli(self.plan, *argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in its own session, remembered so close() stops it."""
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(proc)
        return proc

    def in_ns(self, ns: str, argv: list[str]) -> list[str]:
        """argv run inside a namespace."""
        return ["ip", "netns", "exec", ns, *argv]

    def python(self) -> list[str]:
        """argv prefix that re-runs this script with this Python."""
        return [sys.executable, str(Path(__file__).resolve())]

    def daemon_cpu(self) -> float:
        """CPU seconds used so far by every node daemon (each shard's process and its reaped children)."""
        return sum(cpu_seconds(pid) for pid in self.daemon_pids)

    def daemon_status(self) -> dict[str, Any]:
        """The node daemon's status reply."""
        from vmtestbed.control import Control

        with Control(self.plan.state_dir, timeout=60) as ctl:
            return ctl.call("status")

    def close(self) -> None:
        """Stop what this session started and remove the testbed."""
        from vmtestbed.testbed import down

        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        removed = down(self.name)
        say(f"  testbed {self.name} down ({len(removed)} namespaces removed)")

    def __enter__(self) -> "DeployTestbed":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def leftover_namespaces(names: Sequence[str]) -> list[str]:
    """Namespaces of these testbeds still present (should be none at the end)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if any(line.startswith(f"rbt-{n}-") for n in names)]


# ---------------------------------------------------------------------------------------------------
# In-namespace parts (this script re-run with --inner).


def inner_broadcast(spec: dict[str, Any]) -> dict[str, Any]:
    """Appliance side: arm every node over SSH, run_broadcast, optionally power off nodes mid-stream; return figures."""
    import asyncssh

    from broadcast.agent_client import ssh_arm
    from broadcast.image import SinkSpec
    from broadcast.methods import BroadcastJob, run_broadcast
    from broadcast.params import ChainParams
    from broadcast.topology import Target, order_chain

    async def go() -> dict[str, Any]:
        key = asyncssh.read_private_key(spec["key"])
        targets = [Target(name=n, host=ip, port=AGENT_DATA_PORT, rack=rack) for n, ip, rack in spec["targets"]]
        sink = SinkSpec(kind="discard", compression="none", expected_sha256=spec["sha256"], expected_size=spec["size"])
        base_arm = ssh_arm(key, AGENT_SSH_PORT, lambda _t: sink)
        armed = {"n": 0}
        all_armed = asyncio.Event()
        marks: dict[str, Any] = {}

        async def arm(target: Any, session: str, token: str) -> None:
            try:
                await base_arm(target, session, token)
            finally:
                armed["n"] += 1
                if armed["n"] == len(targets):
                    marks["t_armed"] = time.monotonic()
                    marks["daemon_cpu0"] = sum(cpu_seconds(pid) for pid in spec["daemon_pids"])
                    marks["self_cpu0"] = _self_cpu()
                    marks["busy0"] = busy_snapshot()
                    all_armed.set()

        killed: list[str] = []

        async def killer() -> None:
            from vmtestbed.control import Control

            await all_armed.wait()
            await asyncio.sleep(spec["kill_after"])
            marks["kill_at"] = time.monotonic() - marks["t_armed"]

            def power_off() -> None:
                with Control(Path(spec["state_dir"])) as ctl:
                    ctl.call("power", action="off", nodes=spec["kill"])

            await asyncio.to_thread(power_off)
            killed.extend(spec["kill"])

        job = BroadcastJob(image=Path(spec["image"]), sha256=spec["sha256"], url=spec.get("url"), fanout=spec["fanout"],
                           params=ChainParams(**spec["params"]), report_host=spec["report_host"], deadline=spec["deadline"])
        t0 = time.monotonic()
        kill_task = asyncio.create_task(killer()) if spec.get("kill") else None
        result = await run_broadcast(job, targets, method=spec["method"], arm=arm)
        t_end = time.monotonic()
        if kill_task is not None:
            kill_task.cancel()
        daemon_cpu = sum(cpu_seconds(pid) for pid in spec["daemon_pids"]) - marks.get("daemon_cpu0", 0.0)
        ordered = [t.name for t in order_chain(targets)]
        verified = [n for n, r in result.nodes.items() if r.ok and r.sha256 == spec["sha256"] and r.bytes_received == spec["size"]]
        last = result.nodes[ordered[-1]]
        fill = None
        if last.ok and "transfer" in last.durations:
            # the last node of the chain got its first byte about this long after the stream started
            fill = result.seconds - last.durations["transfer"] - last.durations.get("write_tail", 0.0)
        return {
            "method": spec["method"], "nodes": len(targets), "seconds": result.seconds, "arm_s": marks.get("t_armed", t_end) - t0,
            "wall_s": t_end - t0, "ok": len(result.ok), "verified": len(verified),
            "failed": {n: result.nodes[n].reason for n in result.failed},
            "failed_notes": {n: result.nodes[n].notes for n in result.failed},
            "killed": killed, "kill_at": marks.get("kill_at"),
            "daemon_cpu_s": daemon_cpu, "driver_cpu_s": _self_cpu() - marks.get("self_cpu0", 0.0),
            "busy_pct": busy_since(marks["busy0"]) if "busy0" in marks else None,
            "last_node": ordered[-1], "fill_s": fill,
            "transfer_s": median([r.durations.get("transfer", 0.0) for r in result.nodes.values() if r.ok]),
        }

    return asyncio.run(go())


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def inner_sink(port: int) -> dict[str, Any]:
    """Node side of the floor measurement: accept one TCP stream, read it to the end, hash it."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    h = hashlib.sha256()
    n = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        k = conn.recv_into(buf)
        if not k:
            break
        h.update(view[:k])
        n += k
    conn.close()
    return {"bytes": n, "sha256": h.hexdigest()}


def inner_send(host: str, port: int, image: str, count: int) -> dict[str, Any]:
    """Appliance side of the floor measurement: sendfile count bytes of the image, wait for the reader's close."""
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.settimeout(None)
    t0 = time.monotonic()
    with open(image, "rb") as f:
        sent = 0
        while sent < count:
            sent += os.sendfile(sock.fileno(), f.fileno(), sent, count - sent)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # EOF once the reader has everything
    seconds = time.monotonic() - t0
    sock.close()
    return {"bytes": sent, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------
# Outer side: one measurement of each kind.


@dataclass
class Run:
    """One measured broadcast."""

    nodes: int
    link_mbit: int
    method: str
    repeat: int
    seconds: float | None  # the stream: from the first byte sent to the last node's verified result
    ok: int
    verified: int
    arm_s: float | None = None  # rackboot: arming every node over SSH; udpcast: receivers' rendezvous
    fill_s: float | None = None
    daemon_cpu_s: float | None = None
    peer_cpu_s: float | None = None  # udpcast: CPU of udp-sender + every udp-receiver (and its sha256sum)
    busy_pct: float | None = None
    failed: dict[str, str] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)
    load: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def measure_floor(tb: DeployTestbed, image: Path, count: int) -> float:
    """Bytes per second one TCP stream carries from the appliance to node-1 over the shaped links."""
    reader = tb.popen(tb.in_ns(tb.node_ns("node-1"), [*tb.python(), "--inner", "sink", "--port", str(FLOOR_PORT)]),
                      stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    reader.stdout.readline()  # "listening"
    out = subprocess.run(tb.in_ns(tb.appliance_ns, [*tb.python(), "--inner", "send", "--host", tb.plan.node("node-1").ip,
                                                    "--port", str(FLOOR_PORT), "--image", str(image), "--count", str(count)]),
                         capture_output=True, text=True, timeout=600, check=True)
    sent = json.loads(out.stdout.strip().splitlines()[-1])
    got = json.loads(reader.stdout.read().strip().splitlines()[-1])
    reader.wait(10)
    if got["bytes"] != sent["bytes"]:
        raise RuntimeError(f"floor stream: sent {sent['bytes']}, received {got['bytes']}")
    return float(sent["bytes"]) / float(sent["seconds"])


def run_rackboot(tb: DeployTestbed, method: str, image: Path, sha: str, url: str, args: argparse.Namespace,
                 scratch: Path, repeat: int, kill: list[str] | None = None) -> Run:
    """One rackboot broadcast through the in-namespace driver."""
    plan = tb.plan
    size = image.stat().st_size
    params: dict[str, Any] = {}
    if args.window_mib:
        params["window"] = args.window_mib << 20
    if args.relay_path:
        params["relay_path"] = args.relay_path
    spec = {
        "method": method, "image": str(image), "sha256": sha, "size": size, "url": url, "fanout": args.fanout,
        "key": str(tb.key), "targets": [[n.name, n.ip, n.rack] for n in plan.node_list], "daemon_pids": list(tb.daemon_pids),
        "report_host": "10.78.0.1", "deadline": args.deadline, "params": params, "state_dir": str(plan.state_dir),
        "kill": kill or [], "kill_after": args.kill_after,
    }
    spec_file = scratch / f"spec-{method}-{repeat}.json"
    spec_file.write_text(json.dumps(spec))
    load = machine_load(0.5)["uptime"]
    proc = tb.popen(tb.in_ns(tb.appliance_ns, [*tb.python(), "--inner", "broadcast", "--spec", str(spec_file)]),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=args.deadline + 120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"{method}: the driver did not finish in {args.deadline + 120:.0f}s")
    if proc.returncode != 0:
        raise RuntimeError(f"{method}: driver exited {proc.returncode}: {err[-2000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    return Run(nodes=plan.nodes, link_mbit=plan.link_mbit, method=method, repeat=repeat, seconds=r["seconds"], ok=r["ok"],
               verified=r["verified"], arm_s=r["arm_s"], fill_s=r["fill_s"], daemon_cpu_s=r["daemon_cpu_s"],
               busy_pct=r["busy_pct"], failed=r["failed"], killed=r["killed"], load=load,
               extra={"driver_cpu_s": r["driver_cpu_s"], "transfer_median_s": r["transfer_s"], "kill_at": r["kill_at"],
                      "failed_notes": r["failed_notes"], "wall_s": r["wall_s"]})


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_udpcast(tb: DeployTestbed, image: Path, sha: str, args: argparse.Namespace, scratch: Path, repeat: int) -> Run:
    """One udpcast transfer: a receiver per node namespace (hashing what it gets), then the sender in the appliance's."""
    plan = tb.plan
    portbase = 9000 + 2 * repeat  # a fresh port pair each time (udpcast uses portbase and portbase+1)
    out_dir = scratch / f"udpcast-{repeat}"
    out_dir.mkdir()
    load = machine_load(0.5)["uptime"]
    cpu0 = _children_cpu()
    daemon0 = tb.daemon_cpu()
    receivers: dict[str, subprocess.Popen[Any]] = {}
    for n in plan.node_list:
        log = (out_dir / f"{n.name}.log").open("wb")
        receivers[n.name] = tb.popen(tb.in_ns(n.namespace, [
            "udp-receiver", "--nokbd", "--interface", "eth0", "--portbase", str(portbase), "--mcast-rdv-address", UDPCAST_RDV, "--file", str(out_dir / f"{n.name}.sha"),
            "--pipe", "sha256sum", "--start-timeout", str(int(args.deadline)), "--receive-timeout", "60"]),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
    time.sleep(1.0 + plan.nodes / 200)  # let every receiver bind before the sender's first hello
    rate = f"{int(plan.link_mbit * 1000 * args.udpcast_rate)}k"  # kbit/s: 0.95 x 2 Mbit/s must not truncate to 1m
    sender_argv = tb.in_ns(tb.appliance_ns, [
        "udp-sender", "--file", str(image), "--interface", APPLIANCE_IF, "--portbase", str(portbase), "--nokbd",
        "--mcast-rdv-address", UDPCAST_RDV,
        "--min-receivers", str(plan.nodes), "--max-wait", str(int(args.deadline)), "--max-bitrate", rate, *args.udpcast_opt])
    t0 = time.monotonic()
    snap = busy_snapshot()
    sender = tb.popen(sender_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started: list[float] = []
    lines: list[str] = []

    def watch() -> None:
        assert sender.stdout is not None
        buf = b""
        while True:
            ch = sender.stdout.read1(4096) if hasattr(sender.stdout, "read1") else sender.stdout.read(1)
            if not ch:
                break
            buf += ch
            while b"\n" in buf or b"\r" in buf:
                cut = min(i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0)
                line, buf = buf[:cut].decode(errors="replace"), buf[cut + 1:]
                if line.strip():
                    lines.append(line)
                if "Starting transfer" in line and not started:
                    started.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        sender.wait(timeout=args.deadline + 60)
    except subprocess.TimeoutExpired:
        os.killpg(sender.pid, signal.SIGKILL)
        sender.wait()
    t_end = time.monotonic()
    busy = busy_since(snap)
    watcher.join(5)
    deadline = time.monotonic() + 60
    for name, proc in receivers.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    peer_cpu = _children_cpu() - cpu0
    failed: dict[str, str] = {}
    verified = 0
    for n in plan.node_list:
        try:
            got = (out_dir / f"{n.name}.sha").read_text().split()[0]
        except (OSError, IndexError):
            got = ""
        if got == sha:
            verified += 1
        else:
            tail = (out_dir / f"{n.name}.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
            failed[n.name] = f"sha256 {got or 'missing'} (receiver exit {receivers[n.name].returncode}: {tail[0][-120:]})"
    t_start = started[0] if started else t0
    return Run(nodes=plan.nodes, link_mbit=plan.link_mbit, method="udpcast", repeat=repeat,
               seconds=(t_end - t_start) if sender.returncode == 0 else None, ok=verified, verified=verified,
               arm_s=t_start - t0, daemon_cpu_s=tb.daemon_cpu() - daemon0, peer_cpu_s=peer_cpu, busy_pct=busy,
               failed=failed, load=load, extra={"sender_exit": sender.returncode, "sender_tail": lines[-4:], "rate": rate})


# ---------------------------------------------------------------------------------------------------
# The session for one N, and the report.


def make_image(path: Path, mib: int) -> str:
    """Write mib MiB of incompressible bytes (seeded) and return their sha256."""
    rng = random.Random(5)
    h = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(mib):
            block = rng.randbytes(1 << 20)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def session(n: int, link: int, args: argparse.Namespace, image: Path, sha: str, scratch: Path, names: list[str]) -> dict[str, Any]:
    """Boot a testbed of n nodes and run every method args.repeats times (interleaved); return runs and figures."""
    size = image.stat().st_size
    runs: list[Run] = []
    info: dict[str, Any] = {"nodes": n, "link_mbit": link, "size": size}
    racks = args.racks or max(2, -(-n // 500))
    tb = DeployTestbed(n, racks, link, link * args.uplink_factor, seed=args.seed, boot_batch=args.boot_batch)
    names.append(tb.name)
    with BenchLock(), tb:
        info.update(racks=racks, uplink_mbit=link * args.uplink_factor, boot_s=round(tb.boot_s, 1), testbed=tb.name)
        info["load_start"] = machine_load()["uptime"]
        files_image = tb.files.files_dir / image.name
        os.link(image, files_image)  # star downloads it from the appliance's /files/
        url = f"{tb.plan.appliance_url}/files/{image.name}"
        probe = min(size, max(8 << 20, int(link * 1e6 / 8 * args.floor_s)))
        rate = measure_floor(tb, image, probe)
        info["floor_rate_Bps"] = rate
        info["floor_probe_bytes"] = probe
        say(f"  floor: one TCP stream carries {rate * 8 / 1e6:.1f} Mbit/s over a {link} Mbit/s link "
            f"({size / rate:.1f}s for the image; nominal {size * 8 / (link * 1e6):.1f}s)")
        methods = list(args.methods)
        for repeat in range(1, args.repeats + 1):
            order = methods[(repeat - 1) % len(methods):] + methods[:(repeat - 1) % len(methods)]
            for method in order:
                if method == "udpcast":
                    run = run_udpcast(tb, image, sha, args, scratch, repeat)
                else:
                    run = run_rackboot(tb, method, image, sha, url, args, scratch, repeat)
                runs.append(run)
                say(f"  N={n} {method:8s} repeat {repeat}: {fmt(run.seconds, 1)}s, verified {run.verified}/{n}, "
                    f"arm {fmt(run.arm_s, 1)}s, daemon CPU {fmt(run.daemon_cpu_s, 1)}s, busy {run.busy_pct}%"
                    + (f", failed: {dict(list(run.failed.items())[:3])}" if run.failed else ""))
        if n in args.kill_at:
            count = max(1, round(n * args.kill_pct / 100))
            rng = random.Random(args.seed + n)
            victims = sorted(rng.sample([x.name for x in tb.plan.node_list[1:-1]], count), key=lambda s: int(s.split("-")[1]))
            run = run_rackboot(tb, "chain", image, sha, url, args, scratch, 0, kill=victims)
            run.method = "chain, 5% killed" if args.kill_pct == 5 else f"chain, {args.kill_pct:g}% killed"
            runs.append(run)
            survivors = n - len(victims)
            say(f"  N={n} chain with {len(victims)} nodes powered off at {fmt(run.extra.get('kill_at'), 1)}s: "
                f"{fmt(run.seconds, 1)}s, verified {run.verified}/{survivors} survivors; failed: {run.failed}")
        info["daemon_rss_mb"] = round(tb.daemon_status()["rss"] / 1e6)
        info["load_end"] = machine_load()["uptime"]
    return {"info": info, "runs": runs}


def report(sessions: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown table of every session: medians over the repeats, ratios to the floor and to udpcast."""
    rows = []
    for s in sessions:
        info = s["info"]
        size, link, n = info["size"], info["link_mbit"], info["nodes"]
        nominal = size * 8 / (link * 1e6)
        measured = size / info["floor_rate_Bps"]
        by_method: dict[str, list[Run]] = {}
        for r in s["runs"]:
            by_method.setdefault(r.method, []).append(r)
        udp = median([r.seconds for r in by_method.get("udpcast", []) if r.seconds and r.verified == n])
        for method, rs in by_method.items():
            want = n - len(rs[0].killed)
            t = median([r.seconds for r in rs if r.seconds is not None and r.verified == want])
            cpu = median([r.daemon_cpu_s for r in rs])
            peer = median([r.peer_cpu_s for r in rs])
            fill = median([r.fill_s for r in rs]) if method.startswith(("chain", "tree")) else None
            rows.append([
                str(n), f"{link}", f"{size >> 20}", method, f"**{fmt(t, 1)} s** ({' / '.join(fmt(r.seconds, 1) for r in rs)})",
                f"{nominal:.1f} s", f"{measured:.1f} s", f"**{fmt(t / nominal, 2)}**" if t else "-",
                fmt(fill, 1) if fill is not None else "-", fmt(t / (nominal + fill), 2) if (t and fill is not None) else "-",
                fmt(median([r.arm_s for r in rs]), 1), f"{' / '.join(str(r.verified) for r in rs)} of {want}",
                (f"{fmt(cpu, 0)} s ({fmt(100 * cpu / t, 0)} % of a core)" if cpu and t else "-") + (f"; udpcast processes {fmt(peer, 0)} s" if peer else ""),
                fmt(median([r.busy_pct for r in rs]), 0),
                fmt(t / udp, 2) if (t and udp and method != "udpcast") else "-",
            ])
    return markdown_table(
        ["N", "link Mbit/s", "image MiB", "method", "time (median; runs)", "floor = image / link", "one TCP stream",
         "time / floor", "fill: last node's first byte (s)", "time / (floor + fill)", "arm / rendezvous (s)", "verified",
         "node daemon CPU", "machine busy %", "time / udpcast"], rows)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sessions, print the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[10], help="node counts, one testbed each (default 10)")
    ap.add_argument("--link-mbit", type=int, nargs="+", default=[100],
                    help="node link rate per node count (one value for all, or one per --nodes value)")
    ap.add_argument("--uplink-factor", type=int, default=10, help="rack uplinks carry this many times the node link rate")
    ap.add_argument("--racks", type=int, default=0, help="default: 2 (one per 500 nodes above 1000)")
    ap.add_argument("--image-mib", type=int, nargs="+", default=[256],
                    help="image size in MiB (one value for all, or one per --nodes value)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {','.join(METHODS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fanout", type=int, default=2, help="tree fanout")
    ap.add_argument("--window-mib", type=int, default=0, help="ChainParams.window (default: the library default, 32 MiB)")
    ap.add_argument("--relay-path", default="", help="ChainParams.relay_path (auto, splice, python; default: the library's)")
    ap.add_argument("--udpcast-rate", type=float, default=0.97,
                    help="udp-sender --max-bitrate (its raw rate, IP and UDP headers included) as a fraction of the link rate")
    ap.add_argument("--udpcast-opt", default="--full-duplex --rexmit-hello-interval 100",
                    help="extra udp-sender options (space-separated)")
    ap.add_argument("--kill-at", type=int, nargs="*", default=[], help="node counts at which to run the chain with nodes killed")
    ap.add_argument("--kill-pct", type=float, default=5.0)
    ap.add_argument("--kill-after", type=float, default=4.0, help="seconds into the stream")
    ap.add_argument("--floor-s", type=float, default=8.0, help="seconds of traffic for the one-stream floor probe")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds for one broadcast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot-batch", type=int, default=200, help="nodes per `rackboot reboot --to deploy` call")
    ap.add_argument("--rackboot-commit", default=None, help="measure this git commit (exported) instead of the checkout")
    ap.add_argument("--json", help="also write every run as JSON to this file")
    ap.add_argument("--inner", choices=("broadcast", "sink", "send"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner == "broadcast":
        print(json.dumps(inner_broadcast(json.loads(Path(args.spec).read_text()))), flush=True)
        return 0
    if args.inner == "sink":
        print(json.dumps(inner_sink(args.port)), flush=True)
        return 0
    if args.inner == "send":
        print(json.dumps(inner_send(args.host, args.port, args.image, args.count)), flush=True)
        return 0

    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(args.methods) - set(METHODS):
        ap.error(f"unknown methods {set(args.methods) - set(METHODS)}")
    for opt in ("link_mbit", "image_mib"):
        if len(getattr(args, opt)) not in (1, len(args.nodes)):
            ap.error(f"--{opt.replace('_', '-')}: one value, or one per --nodes value")
    links = args.link_mbit * len(args.nodes) if len(args.link_mbit) == 1 else args.link_mbit
    sizes = args.image_mib * len(args.nodes) if len(args.image_mib) == 1 else args.image_mib
    args.udpcast_opt = args.udpcast_opt.split()
    require_root_and_tools(["ip", "ssh"] + (["udp-sender", "udp-receiver", "sha256sum"] if "udpcast" in args.methods else []))
    raise_on_signals()
    commit = resolve_commit(args.rackboot_commit) if not os.environ.get(EXPORT_ENV) else None
    if commit:
        os.environ["RACKBOOT_BENCH_COMMIT_DESC"] = code_description(commit)
    export = reexec_at_commit(commit)
    sessions: list[dict[str, Any]] = []
    testbeds: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M")
    try:
        with ScratchDir(prefix="rackboot-bench-bcast-") as scratch_name:
            scratch = Path(scratch_name)
            os.chmod(scratch, 0o755)
            images: dict[int, tuple[Path, str]] = {}
            for mib in sorted(set(sizes)):
                image = scratch / f"bench-{mib}mib.img"
                images[mib] = (image, make_image(image, mib))
                say(f"image {image.name}: {mib} MiB, sha256 {images[mib][1][:16]}...")
            say(f"code: {commit_of_export()}; machine at start: {machine_load()['uptime']}")
            for n, link, mib in zip(args.nodes, links, sizes):
                sessions.append(session(n, link, args, images[mib][0], images[mib][1], scratch, testbeds))
    except (KeyboardInterrupt, Interrupted) as exc:
        say(f"interrupted ({exc or 'Ctrl-C'}); testbeds torn down")
        return 130
    finally:
        if export is not None:
            export.cleanup()
        left = leftover_namespaces(testbeds)
        if left:
            say(f"WARNING: namespaces left: {left[:5]}...")
    print(f"broadcast bench, {started} - {time.strftime('%H:%M')}, code: {commit_of_export()}, "
          f"repeats {args.repeats}\n")
    for s in sessions:
        i = s["info"]
        print(f"- N={i['nodes']}: image {i['size'] >> 20} MiB, testbed {i['testbed']}, {i['racks']} racks, links {i['link_mbit']} Mbit/s, uplinks "
              f"{i['uplink_mbit']} Mbit/s; boot to the deploy agent {i['boot_s']} s; node daemon RSS after {i['daemon_rss_mb']} MB; "
              f"load at start `{i['load_start']}`, at end `{i['load_end']}`")
    print()
    print(report(sessions, args))
    for s in sessions:
        for r in s["runs"]:
            if r.killed:
                print(f"\nN={r.nodes} {r.method}: powered off {', '.join(r.killed)} at {fmt(r.extra.get('kill_at'), 1)} s; "
                      f"failed with reasons: " + "; ".join(f"{k}: {v}" for k, v in r.failed.items()))
    write_json(args.json, [{"info": s["info"], "runs": [r.__dict__ for r in s["runs"]]} for s in sessions])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A testbed's life: up (network, files, node daemons), status, exec, down (also after a crash).

Everything a testbed makes is found again from its name: namespaces are named rbt-NAME-*, its state,
generated files and disks live in /run/rackboot-testbed/NAME/. The plan and state are written to disk
before anything is created, so `down` removes a half-built or crashed testbed as well.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vmtestbed.appliance_files import ApplianceFiles, write_appliance_files
from vmtestbed.daemon import disk_path, rss_bytes
from vmtestbed.plan import STATE_ROOT, TestbedPlan, validate_name
from vmtestbed.shards import PLAN_FILE, log_file, ready_file
from vmtestbed.topology import CORE_BRIDGE, build, destroy, existing_namespaces
from vmtestbed.wireloss import set_loss

STATE_FILE = "state.json"
NEIGH_SYSCTLS = (Path("/proc/sys/net/ipv4/neigh/default"), Path("/proc/sys/net/ipv6/neigh/default"))  # ARP, NDP
BACKLOG_SYSCTL = Path("/proc/sys/net/core/netdev_max_backlog")
SYSCTLS_SAVED = STATE_ROOT / "raised-sysctls.json"  # {path: first value} of every setting the testbeds raised
LEGACY_SAVED = (STATE_ROOT / "neigh-thresholds.json", STATE_ROOT / "netdev-backlog.json")  # where older rackboots saved them
NEIGH_KEYS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
DISK_BYTES = 8 << 30  # sparse: nothing is allocated until written


class TestbedError(Exception):
    """A testbed cannot be built, found or reached."""


@dataclass(frozen=True)
class UpResult:
    """What `up` made and how long it took."""

    plan: TestbedPlan
    files: ApplianceFiles
    daemon_pids: tuple[int, ...]  # one node daemon per shard, in shard order
    network_s: float
    total_s: float

    @property
    def daemon_pid(self) -> int:
        """The first node daemon's pid (the only one when plan.daemons is 1)."""
        return self.daemon_pids[0]


def state_dir(name: str) -> Path:
    """Where the testbed NAME keeps its state."""
    return STATE_ROOT / validate_name(name)


def read_state(name: str) -> dict[str, Any]:
    """Return the recorded state of a testbed (empty when none)."""
    try:
        return dict(json.loads((state_dir(name) / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def write_state(plan: TestbedPlan, **changes: Any) -> None:
    """Update the recorded state of a testbed (atomically)."""
    path = plan.state_dir / STATE_FILE
    state = read_state(plan.name) or {"name": plan.name, "prefix": plan.prefix, "created": time.time()}
    state.update(changes)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def load_plan(name: str) -> TestbedPlan:
    """Return the plan of an existing testbed; raise TestbedError when there is none."""
    try:
        return TestbedPlan.load(state_dir(name) / PLAN_FILE)
    except OSError as exc:
        raise TestbedError(f"no testbed named {name!r} (no {state_dir(name) / PLAN_FILE})") from exc


def neighbour_entries_needed(nodes: int) -> int:
    """ARP entries a deploying testbed of that many nodes holds: the appliance's for every node and BMC, each node's for
    the appliance and for its two neighbours in a chain broadcast (a tree's parent and children: as many on average).

    3 per node (without the broadcast peers) overflowed at 1000 nodes reaching their post-install together."""
    return 5 * nodes + 256


def other_testbeds_nodes(this: str, say: Callable[[str], None] = lambda _m: None, root: Path = STATE_ROOT) -> list[int]:
    """The node counts of the machine's other testbeds, read from their plans' counts only: a testbed of another
    rackboot version (a plan with keys this one does not know) still counts; an unreadable plan is skipped, said."""
    counts = []
    for sd in sorted(root.iterdir()) if root.is_dir() else []:
        name, path = sd.name, sd / PLAN_FILE
        if name == this or not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
            counts.append(int(raw.get("nodes", 0)) + int(raw.get("qemu", 0)))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            say(f"testbed {name}: its plan is unreadable ({exc.__class__.__name__}), not counted in the neighbour table")
    return counts


def raise_sysctl(sysctl: Path, value: int) -> int | None:
    """Raise one global kernel setting to at least value; its first value is saved for restore_sysctls.

    Return the old value when it was raised, None when it was already high enough (it is never lowered here)."""
    current = int(sysctl.read_text())
    if current >= value:
        return None
    saved = _saved_sysctls()
    if str(sysctl) not in saved:
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        saved[str(sysctl)] = current
        SYSCTLS_SAVED.write_text(json.dumps(saved))
    sysctl.write_text(str(value))
    return current


def restore_sysctls() -> None:
    """Put back every setting raise_sysctl raised, once no testbed is left, last raised first (so the neighbour
    limits go down thresh1, thresh2, thresh3 and thresh1 <= thresh2 <= thresh3 holds throughout)."""
    if list_testbeds():
        return
    for path, value in reversed(list(_saved_sysctls().items())):
        try:
            Path(path).write_text(str(int(value)))
        except (OSError, ValueError, TypeError):
            pass
    for saved in (SYSCTLS_SAVED, *LEGACY_SAVED):
        saved.unlink(missing_ok=True)


def _saved_sysctls() -> dict[str, int]:
    """The saved first values, by sysctl path, in the order raised (with what older rackboots saved apart)."""
    saved: dict[str, int] = {}
    neigh, backlog = LEGACY_SAVED
    try:
        if neigh.exists():
            old = json.loads(neigh.read_text())
            for path, values in ({str(NEIGH_SYSCTLS[0]): old} if "gc_thresh3" in old else old).items():
                saved |= {str(Path(path) / key): int(values[key]) for key in reversed(NEIGH_KEYS)}
        if backlog.exists():
            saved[str(BACKLOG_SYSCTL)] = int(json.loads(backlog.read_text())["netdev_max_backlog"])
        if SYSCTLS_SAVED.exists():
            saved |= {path: int(value) for path, value in json.loads(SYSCTLS_SAVED.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return saved


def ensure_neighbour_table(needed: int, say: Callable[[str], None] = lambda _m: None) -> None:
    """Raise the kernel's neighbour table limits (ARP and IPv6 NDP) when testbeds need more entries than they allow.

    The limits (net.ipv4/ipv6.neigh.default.gc_thresh1/2/3) are global: every namespace's entries count
    against the same table, and the sysctls exist only in the root namespace. With the default 1024,
    a testbed of a few hundred booted nodes overflows it and new neighbours fail ("neighbor table
    overflow"): packets to them are dropped, connections fail with EHOSTUNREACH. The old values are
    saved and put back by `down` of the last testbed.
    """
    for sysctl in NEIGH_SYSCTLS:
        current = int((sysctl / "gc_thresh3").read_text())
        if current >= needed:
            continue
        for key, value in (("gc_thresh3", needed), ("gc_thresh2", needed // 2), ("gc_thresh1", needed // 8)):
            raise_sysctl(sysctl / key, value)
        say(f"kernel neighbour table limit raised from {current} to {needed} entries ({sysctl}/gc_thresh3; restored by the last down)")


def backlog_needed(nodes: int) -> int:
    """Packets the kernel may queue per CPU for the testbeds' links (net.core.netdev_max_backlog).

    A frame sent on a veth is queued on the sending CPU's backlog (netif_rx), and a broadcast is copied to every
    port of its rack's bridge within the sender's call: with the default 1000, a few DHCP broadcasts at once in
    a rack of 500 overflow it and the kernel drops frames everywhere (seen in /proc/net/softnet_stat during the
    4000-node storm: DHCP answers, ARP and TFTP lost, nodes reset for deadlines they could have met)."""
    return max(1000, 20 * nodes)


def ensure_backlog(needed: int, say: Callable[[str], None] = lambda _m: None) -> None:
    """Raise net.core.netdev_max_backlog (global, root namespace only) to needed, put back by the last `down`."""
    current = raise_sysctl(BACKLOG_SYSCTL, needed)
    if current is not None:
        say(f"kernel per-CPU packet backlog raised from {current} to {needed} ({BACKLOG_SYSCTL}; restored by the last down)")


def up(plan: TestbedPlan, say: Callable[[str], None] = lambda _m: None, daemon_args: tuple[str, ...] = ()) -> UpResult:
    """Build the testbed and start its node daemon; on any failure (or Ctrl-C) remove what was made."""
    t0 = time.monotonic()
    sd = plan.state_dir
    if sd.exists() or existing_namespaces(plan.prefix):
        raise TestbedError(f"testbed {plan.name!r} already exists: `rackboot testbed down --name {plan.name}` first")
    sd.mkdir(parents=True)
    try:
        plan.save(sd / PLAN_FILE)
        write_state(plan, phase="building")
        # The table is shared by every testbed on the machine: size it for all of them together.
        nodes = [plan.nodes + plan.qemu, *other_testbeds_nodes(plan.name, say)]
        ensure_neighbour_table(sum(neighbour_entries_needed(n) for n in nodes), say)
        ensure_backlog(backlog_needed(sum(nodes)), say)
        network_s = build(plan, progress=say)
        say(f"network: {len(plan.namespaces)} namespaces in {network_s:.1f}s")
        if plan.wire_loss:
            set_loss(plan.fabric_ns, plan.wire_loss)
            say(f"wire loss: {plan.wire_loss:.0%} of the nodes' UDP and TCP frames dropped, both ways (nftables)")
        files = write_appliance_files(plan, sd / "appliance")
        (sd / "disks").mkdir()
        for n in plan.netns_nodes:  # a VM's disk is made beside its QEMU files (plan.qemu_dir)
            with disk_path(sd, n.name).open("wb") as f:
                f.truncate(DISK_BYTES)
        procs = start_daemons(plan, daemon_args)
        deadline = time.monotonic() + 60 + plan.nodes * 0.05 + plan.qemu * 10
        while waiting := [i for i in range(len(procs)) if not ready_file(sd, i).exists()]:
            for i in waiting:
                if procs[i].poll() is not None:
                    raise TestbedError(f"node daemon {i} exited with status {procs[i].returncode}; see {log_file(sd, i)}")
            if time.monotonic() > deadline:
                raise TestbedError(f"node daemon {waiting[0]} did not get ready in time; see {log_file(sd, waiting[0])}")
            time.sleep(0.05)
        write_state(plan, phase="up", config=str(files.config), inventory=str(files.inventory))
    except BaseException:
        down(plan.name)
        raise
    return UpResult(plan=plan, files=files, daemon_pids=tuple(p.pid for p in procs), network_s=network_s, total_s=time.monotonic() - t0)


def start_daemons(plan: TestbedPlan, daemon_args: tuple[str, ...] = ()) -> list[subprocess.Popen[bytes]]:
    """Start one node daemon per shard in the BMC namespace, recording each pid in the state as it starts."""
    sd = plan.state_dir
    procs: list[subprocess.Popen[bytes]] = []
    for i in range(plan.daemons):
        log = log_file(sd, i).open("ab")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", plan.bmc_ns, sys.executable, "-m", "vmtestbed.daemon", str(sd), "--shard", str(i), *daemon_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        log.close()
        write_state(plan, phase="starting", daemon_pid=procs[0].pid, daemon_pids=[p.pid for p in procs])
    return procs


def daemon_pids(name: str) -> list[int]:
    """The recorded pids of a testbed's node daemons, in shard order (also from a state written before shards)."""
    state = read_state(name)
    pids = state.get("daemon_pids") or ([state["daemon_pid"]] if "daemon_pid" in state else [])
    return [p for p in pids if isinstance(p, int)]


def start_appliance(plan: TestbedPlan, files: ApplianceFiles, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Run `rackboot serve` in the testbed's appliance namespace; return once it is bound (serve.ready).

    Its pid is recorded, so `down` stops it; its log is STATE_DIR/appliance.log.
    """
    sd = plan.state_dir
    (files.state_dir / "serve.ready").unlink(missing_ok=True)
    log = (sd / "appliance.log").open("ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", plan.appliance_ns, sys.executable, "-m", "appliance.cli", "serve", "--config", str(files.config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    write_state(plan, appliance_pid=proc.pid)
    deadline = time.monotonic() + timeout
    while not (files.state_dir / "serve.ready").exists():
        if proc.poll() is not None:
            raise TestbedError(f"the appliance exited with status {proc.returncode}: {_tail(sd / 'appliance.log')}")
        if time.monotonic() > deadline:
            raise TestbedError(f"the appliance did not get ready in {timeout:.0f} s: {_tail(sd / 'appliance.log')}")
        time.sleep(0.05)
    return proc


def ipmi_power(plan: TestbedPlan, action: str, nodes: list[str] | None = None, parallel: int = 8, retries: int = 3) -> dict[str, bool]:
    """Run `ipmitool -I lanplus ... power ACTION` against the BMCs of nodes, from the appliance's namespace.

    Real ipmitool, as an operator would; each call has a timeout and is retried, so one silent BMC
    (a fault) costs seconds, not the run. pyghmi's client, shared by threads, was seen to hang for good
    under load, which is why this does not use it. Returns {node: success}.
    """
    from concurrent.futures import ThreadPoolExecutor

    from vmtestbed.appliance_files import BMC_USER, bmc_password

    password = bmc_password(plan)
    targets = [plan.node(n) for n in nodes] if nodes else list(plan.node_list)

    def one(bmc_ip: str) -> bool:
        for _ in range(retries):
            try:
                done = subprocess.run(
                    ["ip", "netns", "exec", plan.appliance_ns, "ipmitool", "-I", "lanplus", "-N", "2", "-R", "2",
                     "-H", bmc_ip, "-U", BMC_USER, "-P", password, "power", action],
                    capture_output=True, timeout=30,
                )
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0:
                return True
        return False

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = list(pool.map(one, [n.bmc_ip for n in targets]))
    return {n.name: ok for n, ok in zip(targets, results)}


def admin_token(plan: TestbedPlan) -> str:
    """The appliance's admin API token (it writes STATE_DIR/admin.token on first start), or "" before that."""
    try:
        return (plan.state_dir / "appliance" / "state" / "admin.token").read_text().strip()
    except OSError:
        return ""


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def down(name: str) -> list[str]:
    """Stop every process of the testbed, remove its namespaces (and so every link) and its state; return the namespaces removed."""
    validate_name(name)
    sd = STATE_ROOT / name
    state = read_state(name)
    prefix = str(state.get("prefix") or f"rbt-{name}-")
    # Processes recorded by pid (the appliance, every node daemon): stop them first so that nothing restarts a
    # boot while the network goes.
    recorded = [state.get("appliance_pid"), state.get("daemon_pid"), *(state.get("daemon_pids") or [])]
    for pid in dict.fromkeys(recorded):
        if isinstance(pid, int) and pid > 1 and _alive(pid) and _belongs(pid, prefix, sd):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    # Then everything inside the namespaces (recorded or not), then the namespaces themselves.
    # QEMU VMs (their pid files are in the state dir): they run in the fabric namespace, so the scan below
    # would find them too; by pid first, for a crashed daemon whose VMs are still running.
    for pidfile in sorted((sd / "qemu").glob("*.pid")):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid > 1 and _alive(pid) and _belongs(pid, prefix, sd):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    removed = destroy(prefix)
    if sd.exists():
        shutil.rmtree(sd, ignore_errors=True)
    restore_sysctls()
    return removed


def _belongs(pid: int, prefix: str, sd: Path) -> bool:
    """Tell whether pid is one of this testbed's processes (guards against a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return False
    return str(sd) in cmdline or prefix in cmdline


def exec_in(name: str, target: str, argv: list[str]) -> None:
    """Replace this process with argv running inside a testbed namespace (a node name, appliance, fabric or bmc)."""
    plan = load_plan(name)
    special = {"appliance": plan.appliance_ns, "fabric": plan.fabric_ns, "bmc": plan.bmc_ns}
    if target in special:
        ns = special[target]
    else:
        try:
            ns = plan.node(target).namespace
        except KeyError:
            raise TestbedError(f"testbed {name}: no node {target!r} (nodes are node-1..node-{plan.nodes}; also appliance, fabric, bmc)") from None
        if not ns:
            raise TestbedError(f"testbed {name}: {target} is a QEMU VM, it has no namespace (its serial log: {plan.qemu_dir / (plan.vm_name(plan.node(target)) + '.serial.log')})")
    if not argv:
        argv = [os.environ.get("SHELL", "/bin/sh")]
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])


def list_testbeds() -> list[str]:
    """Return the names of the testbeds with state on this machine."""
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in STATE_ROOT.iterdir() if p.is_dir())


def self_rss() -> int:
    """Resident memory of this process (for the scale benchmark)."""
    return rss_bytes()


# Inside the node network, clear of the nodes (10.78.1.x...) and the appliance: what benchmarks lease from.
BENCH_POOL = "10.78.200.1-10.78.229.254"


def add_pool(files: ApplianceFiles, pool: str = BENCH_POOL) -> None:
    """Give the generated appliance config a dynamic DHCP pool (before `start_appliance`): the testbed's nodes all
    have reservations, so clients that lease (benchmarks) need one."""
    import yaml

    config = yaml.safe_load(files.config.read_text())
    config["dhcp"]["pool"] = pool
    files.config.write_text(yaml.safe_dump(config, sort_keys=False))


def add_namespace(plan: TestbedPlan, suffix: str, address: str = "", mac: str = "") -> str:
    """A namespace on the testbed's core bridge (eth0, optionally a static /16 address and a MAC), named with the
    testbed's prefix so `down` removes it with the others; return its name."""
    ns = f"{plan.prefix}{suffix}"
    for argv in (["netns", "add", ns],
                 ["-n", plan.fabric_ns, "link", "add", f"c-{suffix}", "type", "veth", "peer", "name", "eth0", "netns", ns],
                 *([["-n", ns, "link", "set", "eth0", "address", mac]] if mac else []),
                 ["-n", plan.fabric_ns, "link", "set", f"c-{suffix}", "master", CORE_BRIDGE, "up"],
                 *([["-n", ns, "addr", "add", f"{address}/16", "dev", "eth0"]] if address else []),
                 ["-n", ns, "link", "set", "eth0", "up"], ["-n", ns, "link", "set", "lo", "up"]):
        subprocess.run(["ip", *argv], check=True, capture_output=True)
    return ns

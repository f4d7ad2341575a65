#!/usr/bin/env python3
"""Remote execution of `true` on N nodes of the vm-testbed: `rackboot exec` (tree of deploy agents) against pdsh and clush.

For each node count N this script builds a vm-testbed (`bb` + 6 hex digits), starts the appliance,
reboots every node into the deploy environment (`rackboot reboot --to deploy --level hard`) and waits
until every node runs its deploy agent: an SSH server (asyncssh) on port 22 of the node's address that
accepts the appliance's deploy key and runs commands with /bin/sh inside the node's namespace. Then,
from the appliance's namespace, one tool at a time, each run timed from its start to its exit:

- rackboot: `rackboot exec -m node-[1-N] --json --fanout F -- true`, the CLI as a user types it: a
  client of the appliance's API, whose deploy driver runs broadcast.texec.tree_exec (SSH to the roots,
  each agent opens the next level with its tree key and streams results upward).
- pdsh: `pdsh -R ssh -f F -w ^HOSTFILE true` (pdsh's ssh module runs one OpenSSH client per node; the
  client options go in PDSH_SSH_ARGS).
- clush: `clush -f F --hostfile HOSTFILE -o "SSH OPTIONS" -S true` (ClusterShell, OpenSSH clients).

The OpenSSH clients use the deploy key with `-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
-o BatchMode=yes -o IdentitiesOnly=yes -o GSSAPIAuthentication=no` (the agents' host keys are fresh at
every boot) against the node IPs listed in a temporary host file; /etc/hosts is never touched. A run
counts the nodes where `true` succeeded (rackboot: from its JSON; pdsh and clush: every node minus
those named in their error lines). Reported: wall time, nodes ok, CPU time of the client side (the
tool and its ssh processes, or the CLI plus the appliance process) and of the node daemons (every
virtual node's SSH server and its `sh -c true` live in those processes, one per shard, and their children).

--node-side fork (the default) runs each `true` as a real node does, through the shell: the node daemon
forks `ip netns exec NS /bin/sh -c true` (about 5.6 ms of CPU each), which bounds every tool at N=1000.
--node-side builtin starts the testbed with plan.builtin_true: the agents answer exactly `true` in
process, so a node costs its SSH session only and the comparison measures the tools.

Each testbed session holds an exclusive lock on /tmp/rackboot-bench.lock (or runs under an ancestor's
`flock` of it, as below); everything is removed on success, failure, Ctrl-C and SIGTERM.

Run (as root, after ./setup.sh --bench):
    flock /tmp/rackboot-bench.lock .venv/bin/python bench/exec_bench.py --nodes 100 1000 --rackboot-commit HEAD
    flock /tmp/rackboot-bench.lock .venv/bin/python bench/exec_bench.py --nodes 1000 --node-side builtin --rackboot-commit HEAD
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broadcast_bench import (  # noqa: E402
    EXPORT_ENV, BenchLock, DeployTestbed, Interrupted, busy_since, busy_snapshot, commit_of_export, leftover_namespaces,
    raise_on_signals, reexec_at_commit, require_root_and_tools,
)
from ClusterShell.NodeSet import NodeSet  # noqa: E402
from measure import ScratchDir, code_description, cpu_seconds, fmt, machine_load, markdown_table, median, resolve_commit, say, write_json  # noqa: E402

TOOLS = ("rackboot", "pdsh", "clush")
NODE_SIDES = ("fork", "builtin")
NODE_SIDE_TEXT = {"fork": "each `true` forked as `ip netns exec NS /bin/sh -c true`",
                  "builtin": "the agents answer `true` in process"}
IP_RE = re.compile(r"\b10\.78\.\d+\.\d+\b")


@dataclass(frozen=True)
class Variant:
    """One tool at one fanout."""

    tool: str
    fanout: int

    @property
    def label(self) -> str:
        """How the report names it."""
        return f"{self.tool} -f {self.fanout}" if self.tool != "rackboot" else f"rackboot exec --fanout {self.fanout}"


@dataclass
class ExecRun:
    """One timed run of one variant."""

    nodes: int
    variant: str
    repeat: int
    seconds: float
    ok: int
    exit_status: int
    client_cpu_s: float
    daemon_cpu_s: float
    busy_pct: float
    inner_seconds: float | None = None  # rackboot: tree_exec's own time, from the API's answer
    failed: dict[str, str] = field(default_factory=dict)
    load: str = ""


def ssh_options(key: Path) -> list[str]:
    """OpenSSH client options for the agents (fresh host keys every boot, key auth only, no prompts)."""
    return ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "GSSAPIAuthentication=no", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def appliance_pid(tb: DeployTestbed) -> int:
    """The pid of `rackboot serve` in the testbed (recorded by start_appliance)."""
    from vmtestbed.testbed import read_state

    return int(read_state(tb.name)["appliance_pid"])


def run_variant(tb: DeployTestbed, v: Variant, hostfile: Path, ips: dict[str, str], repeat: int, timeout: float) -> ExecRun:
    """Run `true` on every node with one tool; return the timing and the outcome."""
    n = len(ips)
    env = dict(os.environ)
    if v.tool == "rackboot":
        from vmtestbed.testbed import admin_token

        # not vmtestbed.demo.rackboot_cli: it appends --server/--token, which `exec`'s trailing command would swallow
        argv = tb.in_ns(tb.appliance_ns, [sys.executable, "-m", "appliance.cli", "exec", "--server", tb.plan.appliance_url,
                                          "--token", admin_token(tb.plan), "-m", str(NodeSet.fromlist(list(ips))), "--json",
                                          "--fanout", str(v.fanout), "--timeout", "60", "--", "true"])
    elif v.tool == "pdsh":
        # pdsh's ssh module: "%u"/"%h" are its user and host placeholders (pdsh(1), PDSH_SSH_ARGS)
        env["PDSH_SSH_ARGS"] = " ".join(["-a", "-x", "-l%u", "%h", *ssh_options(tb.key)])
        env["PDSH_RCMD_TYPE"] = "ssh"
        argv = tb.in_ns(tb.appliance_ns, ["pdsh", "-R", "ssh", "-S", "-b", "-f", str(v.fanout), "-t", "10", "-u", "60",
                                          "-w", f"^{hostfile}", "true"])
    else:
        argv = tb.in_ns(tb.appliance_ns, ["clush", "-S", "-q", "-f", str(v.fanout), "-t", "10", "-u", "60", "-l", "root",
                                          "--hostfile", str(hostfile), "-o", " ".join(ssh_options(tb.key)), "true"])
    load = machine_load(0.5)["uptime"]
    app = appliance_pid(tb)
    cpu0, app0, daemon0, snap = _children_cpu(), cpu_seconds(app), tb.daemon_cpu(), busy_snapshot()
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    busy = busy_since(snap)
    client = _children_cpu() - cpu0 + (cpu_seconds(app) - app0 if v.tool == "rackboot" else 0.0)
    daemon = tb.daemon_cpu() - daemon0
    failed: dict[str, str] = {}
    inner = None
    if v.tool == "rackboot":
        try:
            data = json.loads(out.stdout)
            inner = float(data["seconds"])
            for name in data["failed"]:
                r = data["nodes"][name]
                failed[name] = r["error"] or f"exit {r['status']}"
            ok = len(data["ok"])
        except (ValueError, KeyError):
            ok = 0
            failed["*"] = (out.stderr or out.stdout)[-300:]
    else:
        by_ip = {ip: name for name, ip in ips.items()}
        for line in (out.stderr + out.stdout).splitlines():
            for ip in IP_RE.findall(line):
                if ip in by_ip:
                    failed.setdefault(by_ip[ip], line.strip()[-160:])
        ok = n - len(failed) if out.returncode == 0 or failed else 0
        if out.returncode != 0 and not failed:
            failed["*"] = (out.stderr or out.stdout)[-300:]
    return ExecRun(nodes=n, variant=v.label, repeat=repeat, seconds=seconds, ok=ok, exit_status=out.returncode,
                   client_cpu_s=client, daemon_cpu_s=daemon, busy_pct=busy, inner_seconds=inner, failed=failed, load=load)


def session(n: int, variants: list[Variant], args: argparse.Namespace, scratch: Path, names: list[str]) -> dict[str, Any]:
    """Boot a testbed of n nodes and run every variant args.repeats times (order rotated each repeat)."""
    racks = args.racks or max(2, -(-n // 500))
    tb = DeployTestbed(n, racks, args.link_mbit, args.link_mbit * 10, seed=args.seed, boot_batch=args.boot_batch,
                       min_booted=args.min_booted, builtin_true=args.node_side == "builtin")
    names.append(tb.name)
    runs: list[ExecRun] = []
    info: dict[str, Any] = {"nodes": n, "racks": racks, "link_mbit": args.link_mbit, "node_side": args.node_side,
                            "daemons": tb.plan.daemons}
    with BenchLock(), tb:
        info.update(testbed=tb.name, boot_s=round(tb.boot_s, 1), up_s=round(tb.up_s, 1), load_start=machine_load()["uptime"])
        running = set(tb.running)
        ips = {node.name: node.ip for node in tb.plan.node_list if node.name in running}
        info["booted"] = len(ips)
        hostfile = scratch / f"hosts-{n}"
        hostfile.write_text("".join(f"{ip}\n" for ip in ips.values()))
        if args.warmup:  # first contact (ARP entries, page cache of each tool), not reported
            for v in variants:
                w = run_variant(tb, v, hostfile, ips, 0, args.timeout)
                say(f"  N={n} {v.label:28s} warm-up:  {w.seconds:6.2f}s, ok {w.ok}/{n}")
        for repeat in range(1, args.repeats + 1):
            k = (repeat - 1) % len(variants)
            for v in variants[k:] + variants[:k]:
                r = run_variant(tb, v, hostfile, ips, repeat, args.timeout)
                runs.append(r)
                say(f"  N={n} {v.label:28s} repeat {repeat}: {r.seconds:6.2f}s, ok {r.ok}/{n}, exit {r.exit_status}, "
                    f"client CPU {r.client_cpu_s:.1f}s, daemon CPU {r.daemon_cpu_s:.1f}s, busy {r.busy_pct}%"
                    + (f", failed {dict(list(r.failed.items())[:2])}" if r.failed else ""))
        info["daemon_rss_mb"] = round(tb.daemon_status()["rss"] / 1e6)
        info["load_end"] = machine_load()["uptime"]
    return {"info": info, "runs": runs}


def report(sessions: list[dict[str, Any]]) -> str:
    """One markdown table: every variant at every N, medians, ratios to rackboot."""
    rows = []
    for s in sessions:
        n = s["info"]["booted"]
        by: dict[str, list[ExecRun]] = {}
        for r in s["runs"]:
            by.setdefault(r.variant, []).append(r)
        rb = median([r.seconds for r in next((rs for k, rs in by.items() if k.startswith("rackboot")), [])])
        for label, rs in by.items():
            t = median([r.seconds for r in rs])
            rows.append([
                str(n), label, f"**{fmt(t, 2)} s** ({' / '.join(fmt(r.seconds, 2) for r in rs)})",
                " / ".join(str(r.ok) for r in rs),
                fmt(median([r.inner_seconds for r in rs]), 2) if rs[0].inner_seconds is not None else "-",
                fmt(median([r.client_cpu_s for r in rs]), 1), fmt(median([r.daemon_cpu_s for r in rs]), 1),
                fmt(median([r.busy_pct for r in rs]), 0),
                fmt(t / rb, 2) if (t and rb and not label.startswith("rackboot")) else "-",
            ])
    return markdown_table(["N", "tool", "wall time (median; runs)", "nodes ok", "rackboot: tree_exec inside the appliance",
                           "client CPU s", "node daemons' CPU s", "machine busy %", "time / rackboot"], rows)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sessions, print the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[100], help="node counts, one testbed each (default 100)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated from {','.join(TOOLS)}")
    ap.add_argument("--rackboot-fanout", type=int, nargs="+", default=[16], help="rackboot exec --fanout values (default 16)")
    ap.add_argument("--pdsh-fanout", type=int, nargs="+", default=[32], help="pdsh -f values (default 32, pdsh's own)")
    ap.add_argument("--clush-fanout", type=int, nargs="+", default=[64], help="clush -f values (default 64, clush's own)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--node-side", choices=NODE_SIDES, default="fork",
                    help="fork: every `true` is a shell the node daemon forks (default); builtin: the agents answer `true` in process")
    ap.add_argument("--link-mbit", type=int, default=1000)
    ap.add_argument("--racks", type=int, default=0, help="default: 2 (one per 500 nodes above 1000)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for one run of one tool")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first run of each tool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot-batch", type=int, default=200, help="nodes per `rackboot reboot --to deploy` call")
    ap.add_argument("--min-booted", type=float, default=1.0,
                    help="fraction of the nodes that must reach the deploy agent (the others are left out and reported)")
    ap.add_argument("--rackboot-commit", default=None, help="measure this git commit (exported) instead of the checkout")
    ap.add_argument("--json", help="also write every run as JSON to this file")
    args = ap.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if set(tools) - set(TOOLS):
        ap.error(f"unknown tools {set(tools) - set(TOOLS)}")
    fanouts = {"rackboot": args.rackboot_fanout, "pdsh": args.pdsh_fanout, "clush": args.clush_fanout}
    variants = [Variant(t, f) for t in tools for f in fanouts[t]]
    require_root_and_tools(["ip", "ssh"] + [t for t in tools if t != "rackboot"])
    raise_on_signals()
    commit = resolve_commit(args.rackboot_commit) if not os.environ.get(EXPORT_ENV) else None
    if commit:
        os.environ["RACKBOOT_BENCH_COMMIT_DESC"] = code_description(commit)
    export = reexec_at_commit(commit)
    sessions: list[dict[str, Any]] = []
    testbeds: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M")
    say(f"code: {commit_of_export()}; node side: {args.node_side}; machine at start: {machine_load()['uptime']}")
    try:
        with ScratchDir(prefix="rackboot-bench-exec-") as scratch_name:
            for n in args.nodes:
                sessions.append(session(n, variants, args, Path(scratch_name), testbeds))
    except (KeyboardInterrupt, Interrupted) as exc:
        say(f"interrupted ({exc or 'Ctrl-C'}); testbeds torn down")
        return 130
    finally:
        if export is not None:
            export.cleanup()
        left = leftover_namespaces(testbeds)
        if left:
            say(f"WARNING: namespaces left: {left[:5]}...")
    print(f"exec bench, {started} - {time.strftime('%H:%M')}, code: {commit_of_export()}, repeats {args.repeats}, "
          f"node side: {args.node_side} ({NODE_SIDE_TEXT[args.node_side]})\n")
    for s in sessions:
        i = s["info"]
        print(f"- N={i['nodes']} ({i['booted']} running the deploy agent): testbed {i['testbed']}, {i['racks']} racks, "
              f"{i['daemons']} node daemon(s), links {i['link_mbit']} Mbit/s; up {i['up_s']} s, "
              f"boot to the deploy agent {i['boot_s']} s; node daemon RSS after {i['daemon_rss_mb']} MB; "
              f"load at start `{i['load_start']}`, at end `{i['load_end']}`")
    print()
    print(report(sessions))
    write_json(args.json, [{"info": s["info"], "runs": [r.__dict__ for r in s["runs"]]} for s in sessions])
    return 0


if __name__ == "__main__":
    sys.exit(main())

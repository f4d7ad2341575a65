"""`rackboot demo`: a testbed, the appliance inside it, and a real deployment of a sample environment on every node.

What a new user would do by hand, in order: build the testbed (`rackboot testbed up`), start the
appliance in its namespace (`rackboot serve`), add the sample environment to the catalog
(`rackboot env add`), then `rackboot deploy -m node-[1-N] -e sample --broadcast chain` — the CLI, a
client of the appliance's API, run from the appliance's namespace. The workflow powers the nodes on over
IPMI, they boot the deploy environment over PXE/iPXE, the deploy agents partition their disks, receive
the image through the chain, run the post-install, kexec into the installed system and call back. While
it runs the demo prints where the nodes are; then the deployment's report and, last,
`deployed X/Y nodes`. Everything is torn down at the end, whatever happens (Ctrl-C included).

With `--qemu K` the testbed also has K QEMU VMs: the demo builds (cached) the real deploy environment and
the debian12 image under the appliance's http.files, adds it, deploys it on the VMs in a deployment of
their own (`-k` with a key pair it makes, BootNewEnv by reboot so the VMs boot their disks), then logs in
to each VM with OpenSSH to check its host name and /etc/rackboot/deployed.json. A VM counts as deployed
only when that check passes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ClusterShell.NodeSet import NodeSet

from broadcast.agent_client import load_or_create_key
from vmtestbed.appliance_files import SAMPLE_ENV, ApplianceFiles, write_sample_environment
from vmtestbed.control import Control
from vmtestbed.plan import TestbedPlan, make_plan
from vmtestbed.testbed import TestbedError, admin_token, down, start_appliance, up


DEBIAN_ENV = "debian12"
VM_BOOT_STEPS = "BootNewEnv|reboot:0:900"  # the VMs must boot their disk: a reboot through the firmware, not kexec
BUILD_TIMEOUT_S = 1800.0  # cold: mmdebstrap, a few minutes; cached: about a second


class _Interrupted(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Interrupted()


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; return 0 only when every node was deployed."""
    name = f"demo{secrets.token_hex(3)}"
    qemu = getattr(args, "qemu", 0)
    total, deployed = args.nodes + qemu, 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    plan: TestbedPlan | None = None
    try:
        racks = max(1, min(args.racks, total))  # `--nodes 0 --qemu 1`: one rack, not an empty second one
        plan = make_plan(name, args.nodes, racks, post_s=args.post_s, faults=args.faults, seed=args.seed, firmware=args.firmware,
                         qemu=qemu, qemu_firmware=getattr(args, "qemu_firmware", "bios"), qemu_disk_mb=getattr(args, "qemu_disk_mb", 4096),
                         qemu_accel=getattr(args, "qemu_accel", "auto"), daemons=getattr(args, "daemons", 0))
        vms = f" and {qemu} QEMU VMs ({plan.qemu_firmware})" if qemu else ""
        print(f"rackboot demo: {args.nodes} nodes{vms} in {racks} racks, testbed {name}", flush=True)
        deployed = _demo(plan, args)
    except (TestbedError, ValueError) as exc:
        print(f"rackboot demo: {exc}", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, _Interrupted):
        print("rackboot demo: interrupted", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if plan is not None and not args.keep:
            t0 = time.monotonic()
            removed = down(name)
            print(f"  torn down: {len(removed)} namespaces removed in {time.monotonic() - t0:.1f}s", flush=True)
        elif plan is not None:
            print(f"  kept: rackboot testbed status --name {name}; rackboot testbed down --name {name}")
        signal.signal(signal.SIGTERM, previous)
    print(f"deployed {deployed}/{total} nodes", flush=True)
    return 0 if deployed == total else 1


def rackboot_cli(plan: TestbedPlan, *argv: str) -> list[str]:
    """The argv of `rackboot ARGV...` run as a client of the testbed's appliance, from its namespace."""
    return ["ip", "netns", "exec", plan.appliance_ns, "env", f"RACKBOOT_SERVER={plan.appliance_url}",
            f"RACKBOOT_TOKEN={admin_token(plan)}", sys.executable, "-m", "appliance.cli", *argv]


def _demo(plan: TestbedPlan, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    result = up(plan)
    sd = plan.state_dir
    vms = f", {plan.qemu} QEMU VMs started paused" if plan.qemu else ""
    print(f"  testbed up in {result.total_s:.1f}s: {len(plan.namespaces)} namespaces{vms}, "
          f"node daemon pid {', '.join(map(str, result.daemon_pids))}", flush=True)
    if plan.qemu:
        _build_for_vms(plan, result.files)
    t1 = time.monotonic()
    appliance = start_appliance(plan, result.files)
    print(f"  appliance serving on {plan.appliance_url} (pid {appliance.pid}) in {time.monotonic() - t1:.1f}s, log {sd / 'appliance.log'}",
          flush=True)
    deployed = 0
    if plan.netns_nodes:
        deployed += _deploy_sample(plan, args)
    if plan.vms:
        deployed += _deploy_vms(plan, args)
    print(f"  demo steps took {time.monotonic() - t0:.1f}s before the teardown", flush=True)
    return deployed


def _run_timed(what: str, argv: list[str], timeout: float) -> str:
    """Run a command, print its first output line and how long it took; raise TestbedError when it fails."""
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise TestbedError(f"{what}: {(done.stderr or done.stdout).strip()[-2000:]}")
    first = (done.stdout.strip().splitlines() or ["ok"])[0].strip()
    print(f"  {what} in {time.monotonic() - t0:.1f}s: {first}", flush=True)
    return done.stdout


def _build_for_vms(plan: TestbedPlan, files: ApplianceFiles) -> None:
    """The real deploy environment (the appliance's key baked in) and the debian12 image, under the appliance's http.files.

    Both are cached across runs by the hash of their inputs (/var/cache/rackboot/...): about a second each when
    cached. The namespace nodes boot this deploy environment too (they read only its keys).
    """
    cli = [sys.executable, "-m", "appliance.cli"]
    _run_timed("rackboot build deploy-env --config rackboot.yaml", [*cli, "build", "deploy-env", "--config", str(files.config)], BUILD_TIMEOUT_S)
    image = files.files_dir / "images" / f"{DEBIAN_ENV}.tar.zst"
    image.parent.mkdir(parents=True, exist_ok=True)
    _run_timed(f"rackboot build image {DEBIAN_ENV} --out {image.relative_to(plan.state_dir)}",
               [*cli, "build", "image", DEBIAN_ENV, "--out", str(image)], BUILD_TIMEOUT_S)


def _deploy_sample(plan: TestbedPlan, args: argparse.Namespace) -> int:
    """Deploy the sample environment on the namespace nodes (as the demo always did); return how many were deployed."""
    sd = plan.state_dir
    desc = write_sample_environment(sd / "sample", size_mib=args.image_mib)
    added = subprocess.run(rackboot_cli(plan, "env", "add", str(desc)), capture_output=True, text=True, timeout=120)
    if added.returncode != 0:
        raise TestbedError(f"rackboot env add: {(added.stderr or added.stdout).strip()}")
    print(f"  rackboot env add {desc.name}: {added.stdout.strip() or 'ok'}", flush=True)
    nodes = str(NodeSet.fromlist([n.name for n in plan.netns_nodes]))
    ok, _ = _deploy(plan, "sample", ["-m", nodes, "-e", SAMPLE_ENV, "--broadcast", args.broadcast],
                    args.timeout or 180 + plan.nodes / 2)
    return len(ok)


def _deploy_vms(plan: TestbedPlan, args: argparse.Namespace) -> int:
    """Deploy debian12 on the VMs (-k with a key pair the demo makes, BootNewEnv by reboot), then log in to each with SSH.

    Return how many VMs were deployed and answered the SSH check.
    """
    sd = plan.state_dir
    t0 = time.monotonic()
    desc = plan.state_dir / "appliance" / "state" / "files" / "images" / f"{DEBIAN_ENV}.yaml"
    added = subprocess.run(rackboot_cli(plan, "env", "add", str(desc)), capture_output=True, text=True, timeout=600)
    if added.returncode != 0:
        raise TestbedError(f"rackboot env add {desc.name}: {(added.stderr or added.stdout).strip()}")
    print(f"  rackboot env add {desc.name} in {time.monotonic() - t0:.1f}s: {added.stdout.strip() or 'ok'}", flush=True)
    key = sd / "demo_key"
    load_or_create_key(key)  # the demo user's key pair (ed25519, .pub beside)
    nodes = str(NodeSet.fromlist([n.name for n in plan.vms]))
    ok, _ = _deploy(plan, "vms", ["-m", nodes, "-e", DEBIAN_ENV, "-k", f"{key}.pub", "--steps", VM_BOOT_STEPS],
                    args.timeout or 600 + 300 * plan.qemu)
    checked = 0
    for n in plan.vms:
        if n.name not in ok:
            continue
        t1 = time.monotonic()
        problem, env = check_installed(plan, key, n.name, n.ip)
        if problem:
            print(f"  ssh root@{n.ip} ({n.name}): FAILED: {problem}", flush=True)
        else:
            checked += 1
            print(f"  ssh root@{n.ip} ({n.name}): hostname {n.name}, /etc/rackboot/deployed.json env {env} "
                  f"({time.monotonic() - t1:.1f}s)", flush=True)
    return checked


def check_installed(plan: TestbedPlan, key: Path, name: str, ip: str) -> tuple[str, str]:
    """Log in as root with OpenSSH's client from the appliance's namespace; return (why it is not debian12 as name, or "", its env)."""
    argv = ["ip", "netns", "exec", plan.appliance_ns, "ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", f"root@{ip}",
            "hostname; cat /etc/rackboot/deployed.json"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return "ssh timed out after 90 s", ""
    if done.returncode != 0:
        return f"ssh exited {done.returncode}: {done.stderr.strip()[-300:]}", ""
    env = re.search(r'"env":\s*"([^"]*)"', done.stdout)
    return installed_problem(done.stdout, name), env.group(1) if env else ""


def installed_problem(output: str, name: str) -> str:
    """Judge `hostname; cat /etc/rackboot/deployed.json` from a node: "" when it is name running debian12, else the problem."""
    lines = output.strip().splitlines()
    if not lines or lines[0].strip() != name:
        return f"hostname is {lines[0].strip() if lines else '(nothing)'!r}, not {name!r}"
    try:
        stamp = json.loads("\n".join(lines[1:]))
    except ValueError:
        return f"/etc/rackboot/deployed.json is not JSON: {' '.join(lines[1:])[:200]!r}"
    env = str(stamp.get("env", "")) if isinstance(stamp, dict) else ""
    if env.split(":")[0] != DEBIAN_ENV:
        return f"/etc/rackboot/deployed.json says env {env!r}, not {DEBIAN_ENV}"
    return ""


def _deploy(plan: TestbedPlan, tag: str, args: list[str], timeout: float) -> tuple[list[str], float]:
    """Run `rackboot deploy ARGS -o -n` from the appliance's namespace, watching the nodes; return (ok nodes, seconds)."""
    sd = plan.state_dir
    ok_file, ko_file = sd / f"ok-{tag}.txt", sd / f"ko-{tag}.txt"
    argv = rackboot_cli(plan, "deploy", *args, "-o", str(ok_file), "-n", str(ko_file))
    print(f"  rackboot deploy {' '.join(args)}", flush=True)
    out_path = sd / f"deploy-{tag}.out"
    t0 = time.time()
    with out_path.open("w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _watch(plan, proc, timeout, t0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
    for line in out_path.read_text().splitlines():
        print(f"  | {line}", flush=True)
    if proc.returncode not in (0, 2):
        raise TestbedError(f"rackboot deploy exited with status {proc.returncode}")
    ok = _lines(ok_file)
    took = time.time() - t0
    print(f"  deployment took {took:.1f}s; ok: {NodeSet.fromlist(ok) if ok else '-'}", flush=True)
    m = re.search(r"^deployment (\S+):", out_path.read_text(), re.M)
    stats = subprocess.run(rackboot_cli(plan, "stats", "--json", "--deployment", m.group(1)), capture_output=True, text=True,
                           timeout=60) if m else None
    if stats is not None and stats.returncode == 0:
        spans = step_spans(json.loads(stats.stdout)["steps"])
        print("  macro-steps (first node in to last node out): "
              + ", ".join(f"{step} {span:.1f}s" for step, span in spans.items()), flush=True)
    return ok, took


def step_spans(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per macro-step, seconds from the first node entering it to the last leaving it (from the step records)."""
    spans: dict[str, tuple[float, float]] = {}
    for r in rows:
        start, end = spans.get(r["step"], (r["started"], r["ended"]))
        spans[r["step"]] = (min(start, r["started"]), max(end, r["ended"]))
    return {step: round(end - start, 1) for step, (start, end) in spans.items()}


def _lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def watch_line(nodes: list[dict[str, Any]]) -> str:
    """One progress line from the daemon's status: namespace nodes counted by stage, each VM with its serial console's last line."""
    plain = [n for n in nodes if not n["stage"].startswith("qemu ")]
    counts = Counter(f"{n['stage']} ({n['detail'].split(':')[0]})" if n["stage"] == "running" else n["stage"] for n in plain)
    parts = [f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    parts += [f"{n['name']} {n['stage'][5:]}: {n['detail'][:70] or '-'}" for n in nodes if n["stage"].startswith("qemu ")]
    return ", ".join(parts)


def _watch(plan: TestbedPlan, proc: subprocess.Popen[bytes], timeout: float, t0: float) -> None:
    """Print where the nodes are (the testbed's view) until the deploy command ends or the time is up."""
    deadline = time.monotonic() + timeout
    last_line, last_print = "", 0.0
    with Control(plan.state_dir) as ctl:
        while proc.poll() is None:
            nodes = ctl.call("status")["nodes"]
            line = watch_line(nodes)
            now = time.monotonic()
            # A running VM's console changes all the time: then a line every 10 s at most.
            every = 10.0 if any(n["stage"] == "qemu running" for n in nodes) else 1.0
            if line != last_line and now - last_print >= every:
                print(f"  t={time.time() - t0:5.1f}s  {line}", flush=True)
                last_line, last_print = line, now
            if now > deadline:
                print(f"  gave up waiting after {timeout:.0f}s", flush=True)
                return
            time.sleep(0.25)

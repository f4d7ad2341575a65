"""`rackboot experiment run FILE.yaml`: a described, seeded, repeatable deployment experiment on the vm-testbed.

The file says the testbed (node counts, racks, link and uplink rates, a POST-time distribution, faults, a
seed) and the deployments to run on it (environment, broadcast method, repeats). For each node count the
runner builds the testbed, starts the appliance in its namespace, adds the sample environment, runs each
deployment with the `rackboot` CLI from the appliance's namespace (as an operator would), collects the
appliance's per-node step records and the testbed's per-node boot counts, and tears the testbed down, on
success, failure and Ctrl-C alike. experiment_report writes what it measured. Everything random is drawn
from the seed, so the same file reruns the same experiment.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from ClusterShell.NodeSet import NodeSet

from vmtestbed.appliance_files import SAMPLE_ENV, write_sample_environment
from vmtestbed.control import Control
from vmtestbed.demo import rackboot_cli
from vmtestbed.faults import parse_faults, parse_post_delay
from vmtestbed.plan import TestbedPlan, make_plan
from vmtestbed.testbed import TestbedError, daemon_pids, down, start_appliance, up

BROADCASTS = ("chain", "tree", "star")
NODES_PER_RACK = 500  # a Linux bridge takes at most 1024 ports (BR_MAX_PORTS): racks of 500 nodes leave room


class ExperimentError(ValueError):
    """An experiment file that does not describe an experiment; the message names the key."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of the experiment, run `repeats` times on each testbed."""

    env: str = SAMPLE_ENV
    broadcast: str = "chain"
    repeats: int = 1
    steps: str = ""  # `rackboot deploy --steps`, e.g. "BootNewEnv|reboot:1:600" (default: the workflow's)


@dataclass(frozen=True)
class ExperimentSpec:
    """What an experiment file describes."""

    name: str
    nodes: tuple[int, ...]
    racks: int = 0  # 0: one rack per NODES_PER_RACK nodes, at least 2
    link_mbit: int = 1000
    uplink_mbit: int = 10000
    post_s: str = "1"
    faults: str = ""
    seed: int = 1
    image_mib: int = 8
    reboot_window: int = 0  # the appliance's deploy.reboot_window (0: its default, 100)
    daemons: int = 0  # node-daemon processes of each testbed (0: vmtestbed.plan.default_daemons)
    deployments: tuple[DeploymentSpec, ...] = (DeploymentSpec(),)
    source: str = ""

    def racks_for(self, nodes: int) -> int:
        """Racks of the testbed of `nodes` nodes."""
        return self.racks or max(2, -(-nodes // NODES_PER_RACK))


_TOP_KEYS = {f for f in ExperimentSpec.__dataclass_fields__ if f != "source"}
_DEPLOY_KEYS = set(DeploymentSpec.__dataclass_fields__)


def load_experiment(path: Path) -> ExperimentSpec:
    """Read and check an experiment file; raise ExperimentError naming the file and key of the first problem."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping of experiment settings")

    def bad(key: str, what: str) -> ExperimentError:
        return ExperimentError(f"{path}: {key}: {what}")

    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (expected one of: {', '.join(sorted(_TOP_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name):
        raise bad("name", "expected a short lower-case name (letters, digits, '-')")
    nodes = raw.get("nodes")
    counts = nodes if isinstance(nodes, list) else [nodes]
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10000 for n in counts):
        raise bad("nodes", "expected a node count 1-10000, or a list of them")
    ints = {}
    for key, low in (("racks", 0), ("link_mbit", 0), ("uplink_mbit", 0), ("seed", 0), ("image_mib", 1), ("reboot_window", 0), ("daemons", 0)):
        value = raw.get(key, getattr(ExperimentSpec, key))
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise bad(key, f"expected an integer >= {low}")
        ints[key] = value
    post_s, faults = str(raw.get("post_s", "1")), str(raw.get("faults", "") or "")
    try:
        parse_post_delay(post_s)
    except ValueError as exc:
        raise bad("post_s", str(exc)) from None
    try:
        parse_faults(faults)
    except ValueError as exc:
        raise bad("faults", str(exc)) from None
    deployments = []
    for i, d in enumerate(raw.get("deployments") or [{}]):
        where = f"deployments[{i}]"
        if not isinstance(d, dict):
            raise bad(where, "expected a mapping (env, broadcast, repeats, steps)")
        extra = sorted(set(d) - _DEPLOY_KEYS)
        if extra:
            raise bad(f"{where}.{extra[0]}", f"unknown key (expected one of: {', '.join(sorted(_DEPLOY_KEYS))})")
        spec = DeploymentSpec(env=str(d.get("env", SAMPLE_ENV)), broadcast=str(d.get("broadcast", "chain")),
                              repeats=d.get("repeats", 1), steps=str(d.get("steps", "") or ""))
        if spec.env != SAMPLE_ENV:
            raise bad(f"{where}.env", f"only the testbed's {SAMPLE_ENV!r} environment is deployable on namespace nodes")
        if spec.broadcast not in BROADCASTS:
            raise bad(f"{where}.broadcast", f"expected one of {', '.join(BROADCASTS)}")
        if not isinstance(spec.repeats, int) or isinstance(spec.repeats, bool) or not 1 <= spec.repeats <= 100:
            raise bad(f"{where}.repeats", "expected 1-100")
        deployments.append(spec)
    return ExperimentSpec(name=name, nodes=tuple(counts), post_s=post_s, faults=faults, deployments=tuple(deployments),
                          source=str(path), **ints)


@dataclass
class RunResult:
    """One deployment of one testbed: what the appliance and the testbed said about it."""

    nodes: int
    racks: int
    broadcast: str
    repeat: int
    up_s: float = 0.0
    deploy_env_bytes: int = 0  # the deploy kernel and initrds every node downloads
    deploy_s: float = 0.0
    ok: list[str] = field(default_factory=list)
    ko: list[dict[str, str]] = field(default_factory=list)  # node, step, reason
    steps: list[dict[str, Any]] = field(default_factory=list)  # the appliance's per-node step records
    boots_per_node: dict[str, int] = field(default_factory=dict)
    daemon_cpu_s: float = 0.0  # every node daemon together
    daemon_cpu_per_shard_s: list[float] = field(default_factory=list)
    daemon_shards: list[dict[str, Any]] = field(default_factory=list)  # each node daemon after the run: pid, RSS, loop lag
    appliance_cpu_s: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str = ""
    timeline_svg: str = ""  # the appliance's per-node timeline of the deployment (`rackboot stats --svg`)
    events_gz: bytes = b""  # the deployment's log, a JSON object a line, gzipped (`rackboot deployments ID --events`)

    def to_json(self) -> dict[str, Any]:
        """The run as JSON-ready data (the step records included)."""
        return asdict(self)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children), from /proc; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_experiment(spec: ExperimentSpec, work: Path, say: Callable[[str], None] = print) -> list[RunResult]:
    """Run every deployment of the experiment on a testbed of each node count; return the runs in order."""
    results: list[RunResult] = []
    for n in spec.nodes:
        results += _one_testbed(spec, n, work, say)
    return results


def _one_testbed(spec: ExperimentSpec, n: int, work: Path, say: Callable[[str], None]) -> list[RunResult]:
    racks = spec.racks_for(n)
    name = f"x{secrets.token_hex(2)}"
    plan = make_plan(name, n, racks, link_mbit=spec.link_mbit, uplink_mbit=spec.uplink_mbit, post_s=spec.post_s,
                     faults=spec.faults, seed=spec.seed, daemons=min(spec.daemons, n))
    runs: list[RunResult] = []
    try:
        t0 = time.monotonic()
        built = up(plan)
        up_s = round(time.monotonic() - t0, 1)
        say(f"N={n}: testbed {name} up in {up_s} s ({racks} racks, {plan.daemons} node daemon{'s' if plan.daemons > 1 else ''})")
        if spec.reboot_window:
            config = yaml.safe_load(built.files.config.read_text())
            config.setdefault("deploy", {})["reboot_window"] = spec.reboot_window
            built.files.config.write_text(yaml.safe_dump(config, sort_keys=False))
        appliance = start_appliance(plan, built.files, timeout=300)
        desc = write_sample_environment(work / name, size_mib=spec.image_mib)
        added = subprocess.run(rackboot_cli(plan, "env", "add", str(desc)), capture_output=True, text=True, timeout=600)
        if added.returncode != 0:
            raise RuntimeError(f"env add: {(added.stderr or added.stdout)[-500:]}")
        daemons = daemon_pids(name)
        env_bytes = sum(p.stat().st_size for p in (built.files.files_dir / "deploy").glob("*") if p.is_file())
        for d in spec.deployments:
            for repeat in range(1, d.repeats + 1):
                run = RunResult(nodes=n, racks=racks, broadcast=d.broadcast, repeat=repeat, up_s=up_s, deploy_env_bytes=env_bytes)
                _deploy(plan, d, run, daemons, appliance.pid, work / name)
                say(f"N={n} {d.broadcast} #{repeat}: {len(run.ok)}/{n} deployed in {run.deploy_s} s"
                    + (f" ({run.error})" if run.error else ""))
                runs.append(run)
    except (TestbedError, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        say(f"N={n}: the testbed failed: {exc}")
        runs.append(RunResult(nodes=n, racks=racks, broadcast="-", repeat=0, error=f"testbed: {exc}"[:500]))
    finally:
        down(name)
    return runs


def _deploy(plan: TestbedPlan, d: DeploymentSpec, run: RunResult, daemons: list[int], appliance: int, work: Path) -> None:
    """One deployment through the CLI; fills run."""
    run.load_before = os.getloadavg()
    cpu_daemons, cpu_appliance = [cpu_seconds(p) for p in daemons], cpu_seconds(appliance)
    t0 = time.monotonic()
    argv = ["deploy", "-m", str(NodeSet.fromlist([node.name for node in plan.node_list])), "-e", d.env,
            "--broadcast", d.broadcast, "--json"] + (["--steps", d.steps] if d.steps else [])
    done = subprocess.run(rackboot_cli(plan, *argv), capture_output=True, text=True, timeout=6 * 3600)
    run.deploy_s = round(time.monotonic() - t0, 1)
    run.daemon_cpu_per_shard_s = [round(cpu_seconds(p) - c, 1) for p, c in zip(daemons, cpu_daemons)]
    run.daemon_cpu_s = round(sum(run.daemon_cpu_per_shard_s), 1)
    run.appliance_cpu_s = round(cpu_seconds(appliance) - cpu_appliance, 1)
    run.load_after = os.getloadavg()
    try:
        report = json.loads(done.stdout)
    except ValueError:
        run.error = f"deploy exit {done.returncode}: {(done.stderr or done.stdout)[-500:]}"
        return
    run.ok = list(report["ok"])
    run.ko = [{"node": k.get("node", ""), "step": k.get("step", ""), "reason": k.get("reason", "")} for k in report["ko"]]
    stats = subprocess.run(rackboot_cli(plan, "stats", "--json", "--deployment", report["id"]), capture_output=True, text=True,
                           timeout=600)
    try:
        run.steps = json.loads(stats.stdout)["steps"]
    except (ValueError, KeyError):
        run.error = f"stats: {(stats.stderr or stats.stdout)[-300:]}"
    svg = work / f"timeline-{report['id']}.svg"
    drawn = subprocess.run(rackboot_cli(plan, "stats", "--deployment", report["id"], "--svg", str(svg)), capture_output=True,
                           text=True, timeout=600)
    if drawn.returncode == 0 and svg.is_file():
        run.timeline_svg = svg.read_text()
    log = subprocess.run(rackboot_cli(plan, "deployments", report["id"], "--events"), capture_output=True, timeout=600)
    if log.returncode == 0:
        run.events_gz = gzip.compress(log.stdout)
    with Control(plan.state_dir) as ctl:  # boots per node: 2 when nothing went wrong (deploy env, installed system)
        status = ctl.call("status")
    boots = Counter(str(node["boots"]) for node in status["nodes"])
    run.boots_per_node = dict(sorted(boots.items()))
    run.daemon_shards = [{k: shard[k] for k in ("shard", "pid", "nodes", "rss", "loop_lag_max")} for shard in status["shards"]]

"""What `rackboot experiment run` writes: a report directory anyone can read and rerun.

    report.md       the experiment, the commit and the machine, one row per run, spans per macro-step, failures
                    by reason, the slowest nodes, the time over the physical floor
    spans.svg       per macro-step span and the whole deployment against N (medians over repeats)
    failures.svg    failed nodes by reason, over every run
    timeline-*.svg  the appliance's per-node timeline of each deployment (`rackboot stats --svg`)
    events-*.jsonl.gz  each deployment's log (`rackboot deployments ID --events`): every boot stage, escalation and
                    window change, summed in report.md's "Boots"
    steps.csv       the raw per-node step records of every run; runs.json every run whole
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
import statistics
import subprocess
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any, Sequence

from vmtestbed.demo import step_spans
from vmtestbed.experiment import ExperimentSpec, RunResult
from vmtestbed.faults import NodeFaults, assign_faults, draw_post_delay, parse_faults, parse_post_delay

MACRO_STEPS = ("SetDeploymentEnv", "BroadcastEnv", "BootNewEnv")
CSV_FIELDS = ("nodes", "broadcast", "repeat", "node", "step", "impl", "attempt", "started", "ended", "duration", "ok", "reason")
NO_FAULT = NodeFaults()
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def physical_floor_s(spec: ExperimentSpec, deploy_env_bytes: int) -> float:
    """The least a deployment can take on this testbed: two POSTs (the distribution's mean), the deploy
    environment's download and the image through one node link, and the chain's pipeline fill (one block per hop,
    negligible at these sizes)."""
    kind, a, b = parse_post_delay(spec.post_s)
    post = {"uniform": (a + b) / 2, "exp": a, "normal": a}.get(kind, a)
    return 2 * post + _transfer_s(spec, deploy_env_bytes)


def _transfer_s(spec: ExperimentSpec, deploy_env_bytes: int) -> float:
    link_bytes_s = (spec.link_mbit or 10000) * 1e6 / 8
    return (deploy_env_bytes + spec.image_mib * 2**20) / link_bytes_s


def slowest_post_floor_s(spec: ExperimentSpec, deploy_env_bytes: int, nodes: int, posts: int = 2, trials: int = 200) -> float:
    """The floor when every node must be done: a reboot through the firmware ends with the slowest of N POSTs, so
    `posts` expected maxima of N draws of the POST distribution (estimated over `trials` seeded testbeds) plus the
    same transfers."""
    dist = parse_post_delay(spec.post_s)
    rng = random.Random(f"floor:{spec.seed}:{nodes}")
    slowest = statistics.fmean(max(draw_post_delay(dist, rng) for _ in range(nodes)) for _ in range(trials))
    return posts * slowest + _transfer_s(spec, deploy_env_bytes)


def firmware_reboots(run: RunResult) -> int:
    """Reboots through the firmware (POSTs) the deployment asked of its nodes: 1 when BootNewEnv kexec'd them all."""
    impls = {s.get("impl") for s in run.steps if s.get("step") == "BootNewEnv" and s.get("ok")}
    return 1 if impls == {"kexec"} else 2


def _folded(ko: dict[str, str]) -> str:
    """A failure as "step: reason", numbers folded ("no DHCP within N s after ..."); of a reason that lists every
    level of a reboot ladder ("soft reboot impossible: ...; no DHCP within 155s after the very hard reboot"), the
    last, which says why the node failed."""
    return f"{ko['step']}: " + _fold_numbers(_clauses(ko["reason"])[-1])[:100]


def _fold_numbers(text: str) -> str:
    """Every number as N, so that reasons differing only in addresses, ports or seconds count together."""
    return re.sub(r"\d+(\.\d+)*", "N", text)


def _clauses(reason: str) -> list[str]:
    """A reason's "; "-separated clauses, not split inside brackets (ipmitool's own "(...; 2 tries)")."""
    clauses, depth, start = [], 0, 0
    for i, ch in enumerate(reason):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and reason.startswith("; ", i):
            clauses.append(reason[start:i])
            start = i + 2
    return [*clauses, reason[start:]]


def failure_reasons(runs: Sequence[RunResult]) -> Counter[str]:
    """Failed nodes by step and reason, numbers folded."""
    return Counter(_folded(k) for r in runs for k in r.ko)


def _faults_of(spec: ExperimentSpec, run: RunResult) -> dict[str, NodeFaults]:
    """The faults the seed gave each node of the run's testbed."""
    names = [f"node-{i}" for i in range(1, run.nodes + 1)]  # as vmtestbed.plan names them
    return assign_faults(parse_faults(spec.faults), names, spec.seed)


def fault_outcomes(spec: ExperimentSpec, run: RunResult) -> list[tuple[str, int, int, Counter[str]]]:
    """What became of the nodes each injected fault hit, and of the healthy ones: (fault, nodes, failed, failures
    by reason) per kind of faulty node (as the testbed describes it, e.g. "die@broadcast"), "healthy" last."""
    ko = {k["node"]: k for k in run.ko}
    groups: dict[str, list[str]] = {}
    for name, faults in _faults_of(spec, run).items():
        groups.setdefault(faults.describe() or "healthy", []).append(name)
    order = sorted(groups, key=lambda g: (g == "healthy", g))
    return [(g, len(groups[g]), sum(n in ko for n in groups[g]), Counter(_folded(ko[n]) for n in groups[g] if n in ko))
            for g in order]


def healthy_done_s(spec: ExperimentSpec, run: RunResult) -> float:
    """When the last node without an injected fault was through its last step (s from the deployment's start)."""
    if not run.steps:
        return 0.0
    faults = _faults_of(spec, run)
    t0 = min(r["started"] for r in run.steps)
    ends = [r["ended"] - t0 for r in run.steps
            if r["ok"] and r["step"] == MACRO_STEPS[-1] and not faults.get(r["node"], NO_FAULT).any]
    return max(ends, default=0.0)


def machine() -> dict[str, Any]:
    """The machine the experiment ran on: CPUs, memory, kernel."""
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    return {"cpus": os.cpu_count(), "memory_mib": mem, "kernel": os.uname().release}


def commit(repo: Path) -> str:
    """The git commit of the code that ran (with '+dirty' when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(spec: ExperimentSpec, runs: Sequence[RunResult], out: Path, code: str) -> Path:
    """Write the report directory; return report.md's path."""
    deploy_env_bytes = max((r.deploy_env_bytes for r in runs), default=0)
    out.mkdir(parents=True, exist_ok=True)
    boots = [boot_summary(r.events_gz) for r in runs]  # each log read once: 300,000 entries at 4000 nodes
    (out / "runs.json").write_text(json.dumps({"experiment": spec.source, "commit": code, "machine": machine(),
                                               "runs": [r.to_json() | {"timeline_svg": None, "events_gz": None, "boots": b}
                                                        for r, b in zip(runs, boots)]},
                                              indent=1))
    with (out / "steps.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            for row in r.steps:
                w.writerow({**row, "nodes": r.nodes, "broadcast": r.broadcast, "repeat": r.repeat})
    for r in runs:
        if r.events_gz:
            (out / f"events-{r.nodes}-{r.broadcast}-{r.repeat}.jsonl.gz").write_bytes(r.events_gz)
    timelines = []
    for r in runs:
        if r.timeline_svg:
            name = f"timeline-{r.nodes}-{r.broadcast}-{r.repeat}.svg"
            (out / name).write_text(r.timeline_svg)
            timelines.append(name)
    (out / "spans.svg").write_text(spans_svg(runs))
    (out / "failures.svg").write_text(failures_svg(failure_reasons(runs)))
    report = out / "report.md"
    report.write_text(_markdown(spec, runs, boots, code, deploy_env_bytes, timelines))
    return report


def _daemon_cpu(r: RunResult) -> str:
    """The node daemons' CPU: the total, each process's when there are several, the largest loop lag ("253 s (2: 130 + 123), loop lag max 2.1 s")."""
    lag = f", loop lag max {max(s['loop_lag_max'] for s in r.daemon_shards):.1f} s" if r.daemon_shards else ""
    if len(r.daemon_cpu_per_shard_s) < 2:
        return f"{r.daemon_cpu_s} s{lag}"
    return f"{r.daemon_cpu_s} s ({len(r.daemon_cpu_per_shard_s)}: {' + '.join(str(c) for c in r.daemon_cpu_per_shard_s)}){lag}"


def _markdown(spec: ExperimentSpec, runs: Sequence[RunResult], boots: Sequence[dict[str, Any]], code: str,
              deploy_env_bytes: int, timelines: list[str]) -> str:
    m = machine()
    floor = physical_floor_s(spec, deploy_env_bytes)
    lines = [f"# Experiment {spec.name}", "",
             f"File `{spec.source}`; rackboot {code}; {m['cpus']} CPUs, {m['memory_mib']} MiB, Linux {m['kernel']}.",
             f"Testbed: N = {', '.join(map(str, spec.nodes))}; links {spec.link_mbit} Mbit/s, uplinks {spec.uplink_mbit} Mbit/s; "
             f"POST {spec.post_s} s; faults `{spec.faults or 'none'}`; seed {spec.seed}; image {spec.image_mib} MiB; "
             f"node daemons {spec.daemons or 'default (1 per 500 nodes)'}.", "",
             "| N | racks | broadcast | # | testbed up | deployed | deployment | " + " | ".join(MACRO_STEPS)
             + " | over the floor | over the slowest-POST floor | node daemon CPU | appliance CPU | load before / after |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in MACRO_STEPS) + " | ---: | ---: | ---: | ---: | --- |"]
    slowest = {(n, k): slowest_post_floor_s(spec, deploy_env_bytes, n, k) for n in sorted({r.nodes for r in runs}) for k in (1, 2)}
    for r in runs:
        spans = step_spans(r.steps)
        ratio = f"{r.deploy_s / floor:.2f}x" if floor > 0 and r.deploy_s else "-"
        last = slowest[r.nodes, firmware_reboots(r)]
        ratio += f" | {r.deploy_s / last:.2f}x ({last:.0f} s)" if last > 0 and r.deploy_s else " | -"
        lines.append(f"| {r.nodes} | {r.racks} | {r.broadcast} | {r.repeat} | {r.up_s} s | {len(r.ok)}/{r.nodes} "
                     f"({100 * len(r.ok) / r.nodes:.1f} %) | {r.deploy_s} s | "
                     + " | ".join(f"{spans[s]} s" if s in spans else "-" for s in MACRO_STEPS)
                     + f" | {ratio} | {_daemon_cpu(r)} | {r.appliance_cpu_s} s | "
                     f"{' '.join(f'{x:.2f}' for x in r.load_before)} / {' '.join(f'{x:.2f}' for x in r.load_after)} |")
    lines += ["", f"The physical floor ({floor:.1f} s): two POSTs at the distribution's mean, the deploy environment "
              f"({deploy_env_bytes / 2**20:.1f} MiB) and the image through one node link; the pipeline fill is negligible here. "
              "A reboot of every node ends with the slowest node's POST, not the mean: the slowest-POST floor (in brackets) "
              "takes the expected maximum of N draws for each reboot through the firmware, one when BootNewEnv kexecs.", "",
              "![spans against N](spans.svg)", "", "## Failures by reason", ""]
    reasons = failure_reasons(runs)
    if reasons:
        lines += ["| failed nodes | step: reason |", "| ---: | --- |"] + [f"| {n} | {why} |" for why, n in reasons.most_common()]
        lines += ["", "![failures by reason](failures.svg)"]
    else:
        lines.append("None: every node of every run was deployed.")
    if spec.faults:
        lines += ["", "## Injected faults", "",
                  "Per run, what became of the nodes each fault hit (the seed picks them), and of the healthy nodes.", ""]
        for r in runs:
            lines += [f"N={r.nodes} {r.broadcast} #{r.repeat}: the last healthy node was deployed at "
                      f"{healthy_done_s(spec, r):.0f} s.", "", "| nodes | fault | failed | step: reason |", "| ---: | --- | ---: | --- |"]
            for group, count, failed, why in fault_outcomes(spec, r):
                text = "; ".join(f"{n} x {w}" for w, n in why.most_common(3)) or "-"
                lines.append(f"| {count} | {group} | {failed} | {text} |")
            lines.append("")
    errors = [f"- N={r.nodes} {r.broadcast} #{r.repeat}: {r.error}" for r in runs if r.error]
    if errors:
        lines += ["", "Runs that did not complete:", *errors]
    lines += _boots_markdown(runs, boots)
    lines += ["", "## The slowest nodes", "", "Per run, the five nodes that finished last: when each macro-step ended (s from the deployment's start).", ""]
    for r in runs:
        slow = _slowest(r.steps, 5)
        if slow:
            lines.append(f"- N={r.nodes} {r.broadcast} #{r.repeat}: " + "; ".join(
                f"{node} " + ", ".join(f"{step} {end:.0f}" for step, end in ends) for node, ends in slow))
    if timelines:
        lines += ["", "Per-node timelines of each deployment: " + ", ".join(f"[{t}]({t})" for t in timelines) + "."]
    lines += ["", "Raw per-node step records: [steps.csv](steps.csv); every run: [runs.json](runs.json).", ""]
    return "\n".join(lines)


def boot_summary(events_gz: bytes) -> dict[str, Any]:
    """What a deployment's log says of its boots: when each node's first boot was up (quantiles, s from the first
    entry), how many of those were late callbacks, every change of the reboot window, escalations by level and
    reason (numbers folded), and each broadcast's figures. Empty without a log."""
    if not events_gz:
        return {}
    entries = [json.loads(line) for line in gzip.decompress(events_gz).splitlines() if line.strip()]
    stamped = [e for e in entries if "ts" in e]
    if not stamped:
        return {}
    t0 = min(e["ts"] for e in stamped)
    up: dict[str, float] = {}
    late, window, escalations, broadcasts = 0, [], Counter(), []
    for e in stamped:
        what = e.get("what")
        if what == "broadcast" and not e.get("node"):
            broadcasts.append({k: e.get(k, 0) for k in ("impl", "nodes", "ok", "arm_s", "stream_s", "bypassed", "orphans")})
        elif what == "boot" and e.get("stage") == "up" and e.get("node") not in up:
            up[e["node"]] = e["ts"] - t0
            late += bool(e.get("late"))
        elif what == "reboot_window":
            window.append({"at_s": round(e["ts"] - t0), "was": e.get("was"), "limit": e.get("limit"), "reason": e.get("reason", "")})
        elif what == "escalate":
            escalations[f"{e.get('level')}: " + _fold_numbers(str(e.get("reason", "")))[:100]] += 1
    times = sorted(up.values())
    quantiles = {f"p{int(q * 100)}": round(times[int(q * (len(times) - 1))]) for q in (0.5, 0.9, 0.99)} if times else {}
    return {"first_up_nodes": len(times), "first_up_s": quantiles | ({"max": round(times[-1])} if times else {}),
            "late_callbacks": late, "window": window, "escalations": dict(escalations.most_common()), "broadcasts": broadcasts}


def _boots_markdown(runs: Sequence[RunResult], boots: Sequence[dict[str, Any]]) -> list[str]:
    """The "Boots" section: each run's boot summary (boot_summary), none without a log."""
    items = []
    for r, b in zip(runs, boots):
        if not b:
            continue
        q = ", ".join(f"{k} {v} s" for k, v in b["first_up_s"].items())
        changes = "; ".join(f"{w['was']} -> {w['limit']} at {w['at_s']} s" for w in b["window"]) or "none"
        items += [f"- N={r.nodes} {r.broadcast} #{r.repeat} ([log](events-{r.nodes}-{r.broadcast}-{r.repeat}.jsonl.gz)): "
                  f"first boot up for {b['first_up_nodes']} nodes: {q}; {b['late_callbacks']} late callbacks; "
                  f"reboot window changes: {changes}."]
        items += [f"  - {n} x {why}" for why, n in list(b["escalations"].items())[:6]]
        items += [f"  - broadcast ({c['impl']}): {c['ok']}/{c['nodes']} nodes; arming {c['arm_s']} s, then {c['stream_s']} s; "
                  f"{c['bypassed']} suspects bypassed, {c['orphans']} nodes fed by the source" for c in b.get("broadcasts", [])]
    if not items:
        return []
    return ["", "## Boots", "", "Per run, from the deployment's log: when each node's first boot was up (s from the "
            "deployment's start), the reboot window's changes, why boots were escalated to the next level, and each "
            "broadcast: its arming, its stream, the suspects it bypassed.", "", *items]


def _slowest(rows: Sequence[dict[str, Any]], k: int) -> list[tuple[str, list[tuple[str, float]]]]:
    """The k nodes whose last step ended last, with the end of each of their steps (s from the first start)."""
    if not rows:
        return []
    t0 = min(r["started"] for r in rows)
    ends: dict[str, dict[str, float]] = {}
    for r in rows:
        ends.setdefault(r["node"], {})[r["step"]] = max(ends.get(r["node"], {}).get(r["step"], 0.0), r["ended"] - t0)
    last = sorted(ends, key=lambda n: -max(ends[n].values()))[:k]
    return [(n, sorted(ends[n].items(), key=lambda kv: kv[1])) for n in last]


def spans_svg(runs: Sequence[RunResult]) -> str:
    """A line chart: per macro-step span and the whole deployment (medians over repeats) against N."""
    series: dict[str, list[tuple[float, float]]] = {}
    for n in sorted({r.nodes for r in runs}):
        mine = [r for r in runs if r.nodes == n and r.deploy_s]
        if not mine:
            continue
        series.setdefault("deployment", []).append((n, statistics.median(r.deploy_s for r in mine)))
        for step in MACRO_STEPS:
            values = [s[step] for s in (step_spans(r.steps) for r in mine) if step in s]
            if values:
                series.setdefault(step, []).append((n, statistics.median(values)))
    return line_chart(series, "nodes", "seconds", "Deployment and macro-step spans against N (medians over repeats)")


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, title: str,
               width: int = 720, height: int = 420) -> str:
    """A plain SVG line chart of named (x, y) series, axes from 0."""
    pad_l, pad_r, pad_t, pad_b = 64, 170, 36, 48
    xs = [x for pts in series.values() for x, _ in pts] or [1.0]
    ys = [y for pts in series.values() for _, y in pts] or [1.0]
    x_max, y_max = max(xs) * 1.05 or 1.0, max(ys) * 1.1 or 1.0
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def px(x: float, y: float) -> tuple[float, float]:
        return pad_l + w * x / x_max, pad_t + h * (1 - y / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#333"/>',
           f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#333"/>',
           f'<text x="{pad_l + w / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>',
           f'<text x="16" y="{pad_t + h / 2}" text-anchor="middle" transform="rotate(-90 16 {pad_t + h / 2})">{escape(y_label)}</text>']
    for i in range(6):
        yv = y_max * i / 5
        _, y = px(0, yv)
        out.append(f'<text x="{pad_l - 6}" y="{y + 4:.1f}" text-anchor="end">{yv:.0f}</text>')
        out.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}" stroke="#eee"/>')
    for x in sorted(set(xs)):
        gx, _ = px(x, 0)
        out.append(f'<text x="{gx:.1f}" y="{pad_t + h + 16}" text-anchor="middle">{x:g}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in sorted(pts)))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in pts:
            cx, cy = px(x, y)
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"><title>{escape(name)}: {y:g} s at N={x:g}</title></circle>')
        ly = pad_t + 16 * i + 8
        out.append(f'<rect x="{pad_l + w + 16}" y="{ly - 8}" width="12" height="3" fill="{colour}"/>'
                   f'<text x="{pad_l + w + 34}" y="{ly}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def failures_svg(reasons: Counter[str], width: int = 720) -> str:
    """A horizontal bar chart of failed nodes by reason (an empty chart says there were none)."""
    rows = reasons.most_common(12)
    height = 60 + 22 * max(1, len(rows))
    top = max((n for _, n in rows), default=1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">Failed nodes by reason</text>']
    if not rows:
        out.append(f'<text x="{width / 2}" y="45" text-anchor="middle">none: every node was deployed</text>')
    for i, (why, n) in enumerate(rows):
        y = 36 + 22 * i
        bar = 200 * n / top
        out.append(f'<rect x="8" y="{y}" width="{bar:.1f}" height="16" fill="#d62728"/>'
                   f'<text x="{bar + 14:.1f}" y="{y + 12}">{n}  {escape(why)}</text>')
    out.append("</svg>")
    return "\n".join(out)

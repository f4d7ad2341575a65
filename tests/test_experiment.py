"""`rackboot experiment run`: the experiment files (all that ship load; mistakes name their key), the report
directory written from runs (markdown, SVG, CSV, JSON), and, as root, the tiny experiment run end to end on a
vm-testbed (4 nodes, about a minute)."""
from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmtestbed.appliance_files import dhcp_after_reset_s
from vmtestbed.experiment import ExperimentError, RunResult, load_experiment
from vmtestbed.experiment_report import boot_summary, fault_outcomes, firmware_reboots, healthy_done_s, physical_floor_s, slowest_post_floor_s, write_report
from vmtestbed.faults import assign_faults, parse_faults

EXPERIMENTS = Path(__file__).resolve().parent.parent / "vm-testbed" / "experiments"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_file_loads(path: Path) -> None:
    spec = load_experiment(path)
    assert spec.name == path.stem and spec.nodes and spec.deployments


@pytest.mark.parametrize("text,expected", [
    ("name: x\nnodes: 0\n", "nodes: expected a node count"),
    ("name: x\nnodes: [10, many]\n", "nodes: expected a node count"),
    ("name: x\nnodes: 4\nlink: 10\n", "link: unknown key"),
    ("name: x\nnodes: 4\npost_s: soon\n", "post_s: --post-s 'soon'"),
    ("name: x\nnodes: 4\nfaults: gremlins=1\n", "faults:"),
    ("name: x\nnodes: 4\ndeployments: [{broadcast: carrier-pigeon}]\n", "deployments[0].broadcast: expected one of chain, tree, star"),
    ("name: x\nnodes: 4\ndeployments: [{env: debian12}]\n", "deployments[0].env: only the testbed's 'sample'"),
    ("name: x\nnodes: 4\ndeployments: [{repeats: 0}]\n", "deployments[0].repeats: expected 1-100"),
    ("name: x\nnodes: 4\ndaemons: -1\n", "daemons: expected an integer >= 0"),
    ("name: X Y\nnodes: 4\n", "name: expected a short lower-case name"),
    ("- 1\n", "expected a mapping"),
])
def test_experiment_file_mistakes_name_their_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError, match=None) as info:
        load_experiment(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_the_dhcp_deadline_follows_the_post_distribution() -> None:
    assert dhcp_after_reset_s("1") == 30 and dhcp_after_reset_s("0.5-5") == 30
    assert dhcp_after_reset_s("normal:60,20") == 60 + 80 + 15 and dhcp_after_reset_s("20-90") == 105


def _run(nodes: int, repeat: int, deploy_s: float, failed: int = 0, impl: str = "x") -> RunResult:
    steps = []
    for i in range(1, nodes + 1):
        t = 1000.0
        for step, took in (("SetDeploymentEnv", 20.0 + i), ("BroadcastEnv", 10.0), ("BootNewEnv", 5.0)):
            steps.append({"node": f"node-{i}", "step": step, "impl": impl, "attempt": 1, "started": t, "ended": t + took,
                          "duration": took, "ok": 1, "reason": ""})
            t += took
    ko = [{"node": f"node-{nodes - j}", "step": "BootNewEnv", "reason": f"no callback within {100 + j}s"} for j in range(failed)]
    ok = [f"node-{i}" for i in range(1, nodes + 1 - failed)]
    return RunResult(nodes=nodes, racks=2, broadcast="chain", repeat=repeat, up_s=3.0, deploy_env_bytes=2**20, deploy_s=deploy_s,
                     ok=ok, ko=ko, steps=steps, boots_per_node={"2": nodes}, timeline_svg="<svg xmlns='http://www.w3.org/2000/svg'/>")


def test_the_report_directory(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("name: curve\nnodes: [10, 20]\npost_s: '10-20'\nlink_mbit: 1000\nimage_mib: 8\n")
    spec = load_experiment(path)
    runs = [_run(10, 1, 60.0), _run(10, 2, 70.0), _run(20, 1, 90.0, failed=2)]
    report = write_report(spec, runs, tmp_path / "out", "abc1234")
    text = report.read_text()
    assert "rackboot abc1234" in text and "| 20 | 2 | chain | 1 | 3.0 s | 18/20 (90.0 %) | 90.0 s |" in text
    floor = physical_floor_s(spec, 2**20)  # 2 x 15 s POST + 9 MiB at 125 MB/s
    assert abs(floor - (30 + 9 * 2**20 / 125e6)) < 1e-6 and f"{90.0 / floor:.2f}x" in text
    # every node done: two of the slowest of 20 POSTs drawn from 10-20 s (expected 10 + 10 * 20/21 each); one with kexec
    slowest = slowest_post_floor_s(spec, 2**20, 20)
    assert abs(slowest - floor - 2 * (10 * 20 / 21 - 5)) < 0.5 and f"{90.0 / slowest:.2f}x ({slowest:.0f} s)" in text
    assert firmware_reboots(runs[0]) == 2 and firmware_reboots(_run(10, 1, 60.0, impl="kexec")) == 1
    one = slowest_post_floor_s(spec, 2**20, 20, posts=1)
    assert abs(one - (slowest - (slowest - 9 * 2**20 / 125e6) / 2)) < 1e-6
    assert "| 2 | BootNewEnv: no callback within Ns |" in text  # failures by reason, numbers folded
    assert "node-10 " in text  # the slowest node of N=10 (its SetDeploymentEnv took the longest)
    for svg in ("spans.svg", "failures.svg", "timeline-20-chain-1.svg"):
        ET.parse(tmp_path / "out" / svg)  # well-formed
    spans = (tmp_path / "out" / "spans.svg").read_text()
    assert "deployment: 65 s at N=10" in spans and "BroadcastEnv" in spans  # median of 60 and 70
    rows = list(csv.DictReader((tmp_path / "out" / "steps.csv").open()))
    assert len(rows) == 3 * (10 + 10 + 20) and rows[0]["nodes"] == "10" and rows[0]["step"] == "SetDeploymentEnv"
    data = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert data["commit"] == "abc1234" and len(data["runs"]) == 3 and data["machine"]["cpus"]


def test_the_report_says_what_became_of_each_injected_fault(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("name: faulty\nnodes: 20\nfaults: noreturn=0.1,bmcdead=0.05\nseed: 4\n")
    spec = load_experiment(path)
    faults = assign_faults(parse_faults(spec.faults), [f"node-{i}" for i in range(1, 21)], 4)
    noreturn = sorted(n for n, f in faults.items() if f.noreturn and not f.bmc_dead)
    bmcdead = sorted(n for n, f in faults.items() if f.bmc_dead and not f.noreturn)
    assert len(noreturn) == 2 and len(bmcdead) == 1
    run = _run(20, 1, 90.0)
    healthy_node = next(f"node-{i}" for i in range(1, 21) if not faults[f"node-{i}"].any)
    run.ko = ([{"node": n, "step": "BootNewEnv", "reason": "no DHCP within 240 s"} for n in noreturn]
              + [{"node": bmcdead[0], "step": "SetDeploymentEnv",
                  "reason": "soft reboot impossible: no agent at 10.78.1.4; hard reboot failed: BMC 10.79.1.4 unreachable "
                            "(Get Auth Capabilities error; 2 tries)"},
                 {"node": healthy_node, "step": "BroadcastEnv", "reason": "chain timed out"}])
    rows = {g: (count, failed, dict(why)) for g, count, failed, why in fault_outcomes(spec, run)}
    assert list(rows)[-1] == "healthy"
    assert rows["noreturn"] == (2, 2, {"BootNewEnv: no DHCP within N s": 2})
    assert rows["bmcdead"] == (1, 1, {"SetDeploymentEnv: hard reboot failed: BMC N unreachable (Get Auth Capabilities error; N tries)": 1})
    assert rows["healthy"] == (17, 1, {"BroadcastEnv: chain timed out": 1})
    # the last healthy node's BootNewEnv ended at 1000 + (20 + i) + 10 + 5 for the highest healthy i; t0 = 1000
    last = max(i for i in range(1, 21) if not faults[f"node-{i}"].any)
    assert healthy_done_s(spec, run) == 20 + last + 10 + 5
    text = write_report(spec, [run], tmp_path / "out", "abc1234").read_text()
    assert "## Injected faults" in text and "| 2 | noreturn | 2 | 2 x BootNewEnv: no DHCP within N s |" in text


def test_the_boots_section_reads_the_deployments_log(tmp_path: Path) -> None:
    log = [{"ts": 100.0, "node": None, "what": "step", "step": "SetDeploymentEnv"},
           {"ts": 101.0, "node": "node-1", "what": "escalate", "level": "soft", "reason": "soft reboot skipped: the BMC reports the node off"},
           {"ts": 101.0, "node": "node-2", "what": "escalate", "level": "soft", "reason": "soft reboot skipped: the BMC reports the node off"},
           {"ts": 150.0, "node": None, "what": "reboot_window", "was": 1000, "limit": 500, "reason": "node-2: stuck"},
           {"ts": 150.0, "node": "node-2", "what": "escalate", "level": "hard", "reason": "stuck in firmware: DHCP seen but no iPXE script within 40s"},
           {"ts": 160.0, "node": "node-1", "what": "boot", "stage": "up"},
           {"ts": 230.0, "node": "node-2", "what": "boot", "stage": "up", "late": True},
           {"ts": 300.0, "node": "", "what": "broadcast", "step": "BroadcastEnv", "impl": "chain", "nodes": 2, "ok": 2,
            "arm_s": 3.5, "stream_s": 20.1, "bypassed": 1, "orphans": 1, "dropped_malformed": 0},
           {"ts": 400.0, "node": "node-1", "what": "boot", "stage": "up"},  # its second boot: not the first
           {"what": "result", "result": {"ok": ["node-1", "node-2"]}}]
    run = _run(2, 1, 300.0)
    run.events_gz = gzip.compress("".join(json.dumps(e) + "\n" for e in log).encode())
    summary = boot_summary(run.events_gz)
    assert summary["first_up_nodes"] == 2 and summary["first_up_s"] == {"p50": 60, "p90": 60, "p99": 60, "max": 130}
    assert summary["late_callbacks"] == 1
    assert summary["window"] == [{"at_s": 50, "was": 1000, "limit": 500, "reason": "node-2: stuck"}]
    assert summary["escalations"] == {"soft: soft reboot skipped: the BMC reports the node off": 2,
                                      "hard: stuck in firmware: DHCP seen but no iPXE script within Ns": 1}
    spec = load_experiment(EXPERIMENTS / "tiny.yaml")
    text = write_report(spec, [run], tmp_path / "out", "abc1234").read_text()
    assert summary["broadcasts"] == [{"impl": "chain", "nodes": 2, "ok": 2, "arm_s": 3.5, "stream_s": 20.1, "bypassed": 1, "orphans": 1}]
    assert "reboot window changes: 1000 -> 500 at 50 s." in text and "  - 2 x soft: soft reboot skipped" in text
    assert "  - broadcast (chain): 2/2 nodes; arming 3.5 s, then 20.1 s; 1 suspects bypassed, 1 nodes fed by the source" in text
    assert (tmp_path / "out/events-2-chain-1.jsonl.gz").read_bytes() == run.events_gz
    assert json.loads((tmp_path / "out/runs.json").read_text())["runs"][0]["boots"] == summary


@pytest.mark.netns
@pytest.mark.timeout(600)
@pytest.mark.parametrize("daemons", [0, 2], ids=["one-daemon", "two-daemons"])
def test_the_tiny_experiment_runs_end_to_end(tmp_path: Path, daemons: int) -> None:
    """As root: `rackboot experiment run vm-testbed/experiments/tiny.yaml` builds a 4-node testbed, deploys it,
    removes it, and writes a report in which every node was deployed; also with the nodes split between two node
    daemons (`daemons: 2`, one rack each)."""
    out = tmp_path / "report"
    path = EXPERIMENTS / "tiny.yaml"
    if daemons:
        path = tmp_path / "tiny.yaml"
        path.write_text((EXPERIMENTS / "tiny.yaml").read_text() + f"daemons: {daemons}\n")
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "experiment", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (out / "report.md").read_text()
    assert "| 4 | 2 | chain | 1 |" in text and "4/4 (100.0 %)" in text, text
    if daemons:
        assert f"{daemons} node daemons" in done.stdout and " s (2: " in text, text  # the CPU of each daemon
    assert "None: every node of every run was deployed." in text
    rows = list(csv.DictReader((out / "steps.csv").open()))
    assert {r["step"] for r in rows} >= {"SetDeploymentEnv", "BroadcastEnv", "BootNewEnv"} and {r["node"] for r in rows} == {f"node-{i}" for i in range(1, 5)}
    assert list(out.glob("timeline-4-chain-1.svg")), list(out.iterdir())
    ET.parse(out / "spans.svg")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "rbt-x" not in left, left  # the testbed is gone

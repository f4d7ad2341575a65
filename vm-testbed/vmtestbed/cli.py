"""`rackboot testbed up|status|exec|down` and `rackboot demo`: plugged into appliance.cli by register()."""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from vmtestbed.faults import parse_faults, parse_post_delay

EXIT_USAGE = 64  # as rackboot's other commands (appliance.cli): a bad value on the command line, not "some failed"


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the testbed and demo subcommands to rackboot's parser."""
    tb = sub.add_parser("testbed", help="virtual clusters in network namespaces: nodes with PXE/iPXE firmware and IPMI BMCs")
    tsub = tb.add_subparsers(dest="testbed_command", required=True)

    p = tsub.add_parser("up", help="build a testbed and start its nodes' firmware and BMCs (nodes stay powered off)")
    p.add_argument("--name", required=True, help="testbed name (namespaces are rbt-NAME-*)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--racks", type=int, default=2)
    p.add_argument("--link-mbit", type=int, default=1000, help="node link rate, tbf on both ends (0: unshaped)")
    p.add_argument("--uplink-mbit", type=int, default=10000, help="rack-to-core uplink rate (0: unshaped)")
    p.add_argument("--post-s", default="1", help="POST duration: S, A-B (uniform), exp:MEAN, normal:MEAN,SD")
    p.add_argument("--faults", default="", help="fault SPEC, e.g. loss=0.05,posthang=0.1,bmcdead=0.02,die=0.05@tftp")
    p.add_argument("--wire-loss", type=float, default=0.0, metavar="P",
                   help="drop P (0-1) of the nodes' UDP and TCP frames on their bridge ports, both ways (nftables)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (faults, POST, xids)")
    p.add_argument("--firmware", default="bios", choices=("bios", "uefi", "mixed"))
    p.add_argument("--builtin-true", action="store_true",
                   help="the nodes' deploy agents answer `true` and `:` in process instead of forking a shell (exec benchmarks)")
    _daemons_option(p)
    _qemu_options(p)
    p.set_defaults(func=_cmd_up)

    p = tsub.add_parser("status", help="each node's power and boot state")
    p.add_argument("--name", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("node", nargs="?", help="one node, with its boot history")
    p.set_defaults(func=_cmd_status)

    p = tsub.add_parser("exec", help="run a command inside a node's namespace (or appliance, fabric, bmc)")
    p.add_argument("--name", required=True)
    p.add_argument("node")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=_cmd_exec)

    p = tsub.add_parser("down", help="remove everything a testbed made (also after a crash)")
    p.add_argument("--name", required=True)
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("demo", help="testbed + appliance: deploy a sample environment on every virtual node, report, tear down")
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--racks", type=int, default=2)
    p.add_argument("--post-s", default="0.5-2")
    p.add_argument("--faults", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--firmware", default="bios", choices=("bios", "uefi", "mixed"))
    p.add_argument("--broadcast", default="chain", choices=("chain", "tree", "star"), help="how the image reaches the nodes")
    p.add_argument("--image-mib", type=int, default=8, help="payload of the sample image, in MiB")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for the deployment (default: 180 + nodes/2)")
    p.add_argument("--keep", action="store_true", help="leave the testbed up at the end (for debugging)")
    _daemons_option(p)
    _qemu_options(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("experiment", help="described, seeded deployment experiments on the vm-testbed, with a report")
    esub = p.add_subparsers(dest="experiment_command", required=True)
    e = esub.add_parser("run", help="build each testbed of FILE, run its deployments, write a report directory")
    e.add_argument("file", help="an experiment file (vm-testbed/experiments/*.yaml)")
    e.add_argument("--out", help="the report directory (default: experiment-NAME-DATE here)")
    e.set_defaults(func=_cmd_experiment)


def _daemons_option(p: argparse.ArgumentParser) -> None:
    """--daemons, shared by `testbed up` and `demo`."""
    p.add_argument("--daemons", type=int, default=0, metavar="K",
                   help="node-daemon processes, each owning whole racks of nodes and their BMCs (default: 1 per 500 namespace nodes)")


def _qemu_options(p: argparse.ArgumentParser) -> None:
    """The QEMU VM options shared by `testbed up` and `demo`."""
    p.add_argument("--qemu", type=int, default=0, metavar="K",
                   help="also K QEMU VMs (KVM or TCG, 1024 MiB, virtio disk) after the namespace nodes, each with an IPMI BMC driving it through QMP")
    p.add_argument("--qemu-firmware", default="bios", choices=("bios", "uefi", "uefi-http", "mixed"),
                       help="SeaBIOS + iPXE ROM, OVMF with UEFI PXE, OVMF with UEFI HTTP boot, or the three in turn")
    p.add_argument("--qemu-disk-mb", type=int, default=4096, help="each VM's sparse raw virtio disk, in MiB")
    p.add_argument("--qemu-accel", default="auto", choices=("auto", "kvm", "tcg"),
                   help="auto: KVM when a probe shows it runs SeaBIOS+iPXE and OVMF, else TCG (see docs/testbed.md)")


def _cmd_up(args: argparse.Namespace) -> int:
    from vmtestbed.plan import make_plan
    from vmtestbed.testbed import TestbedError, up

    try:
        parse_faults(args.faults)
        parse_post_delay(args.post_s)
        plan = make_plan(args.name, args.nodes, args.racks, args.link_mbit, args.uplink_mbit, args.post_s, args.faults, args.seed, args.firmware,
                         qemu=args.qemu, qemu_firmware=args.qemu_firmware, qemu_disk_mb=args.qemu_disk_mb,
                         qemu_accel=args.qemu_accel, wire_loss=args.wire_loss, daemons=args.daemons,
                         builtin_true=args.builtin_true)
    except ValueError as exc:
        print(f"rackboot testbed up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = up(plan, say=lambda m: print(f"  {m}", flush=True))
    except TestbedError as exc:
        print(f"rackboot testbed up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rackboot testbed up: interrupted; everything removed", file=sys.stderr)
        return 130
    f = result.files
    vms = f" and {plan.qemu} QEMU VMs ({plan.vms[0].name}..{plan.vms[-1].name}, {plan.qemu_firmware})" if plan.qemu else ""
    print(f"testbed {plan.name}: {plan.nodes} nodes{vms} in {plan.racks} racks, up in {result.total_s:.1f}s "
          f"({plan.daemons} node daemon{'s' if plan.daemons > 1 else ''}, pid {', '.join(map(str, result.daemon_pids))})")
    print(f"  appliance config  {f.config}")
    print(f"  inventory         {f.inventory}")
    print(f"  BMC credentials   {f.credentials}")
    print(f"  run the appliance rackboot testbed exec --name {plan.name} appliance -- {sys.executable} -m appliance.cli serve --config {f.config}")
    print(f"  power a node on   rackboot testbed exec --name {plan.name} appliance -- ipmitool -I lanplus -H {plan.node_list[0].bmc_ip} -U admin -P $(awk '/password/{{print $2}}' {f.credentials}) power on")
    if plan.qemu:
        print(f"  VM files          {plan.qemu_dir} (disks, serial logs, QMP sockets, pid files)")
        print(f"  the VMs need a real deploy environment: rackboot build deploy-env --config {f.config}")
    print(f"  remove it         rackboot testbed down --name {plan.name}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from vmtestbed.control import Control, ControlError
    from vmtestbed.testbed import TestbedError, load_plan, read_state
    from vmtestbed.topology import existing_namespaces

    try:
        plan = load_plan(args.name)
    except (TestbedError, ValueError) as exc:
        print(f"rackboot testbed status: {exc}", file=sys.stderr)
        return 1
    try:
        with Control(plan.state_dir) as ctl:
            reply = ctl.call("status", nodes=[args.node] if args.node else None, history=bool(args.node))
    except (ControlError, KeyError) as exc:
        state = read_state(args.name)
        print(f"testbed {args.name}: phase {state.get('phase', '?')}, {len(existing_namespaces(plan.prefix))} namespaces, node daemon unreachable: {exc}")
        return 1
    if args.json:
        print(json.dumps(reply, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    nodes = reply["nodes"]
    now = time.time()
    vms = f" ({reply['vms']} QEMU VMs)" if reply.get("vms") else ""
    shards = reply.get("shards", [])
    table = Table(title=f"testbed {args.name}: {len(nodes)} nodes{vms}, {reply['bmcs']} BMCs, {len(shards)} node daemon(s), {reply['rss'] / 1e6:.0f} MB")
    for col in ("node", "rack", "power", "stage", "for", "ip", "boots", "bootdev", "detail", "faults"):
        table.add_column(col)
    for n in nodes:
        table.add_row(n["name"], n["rack"], n["power"], n["stage"], f"{now - n['since']:.0f}s", n["ip"] or "-", str(n["boots"]), n["bootdev"], n["detail"][:60], n["faults"])
    console = Console(width=200)
    console.print(table)
    counts = Counter(n["stage"] for n in nodes)
    console.print("stages: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for sh in shards:
        console.print(f"node daemon {sh['shard']}: pid {sh['pid']}, {sh['nodes']} nodes, {sh['bmcs']} BMCs, CPU {sh['cpu_s']:.1f} s, "
                      f"RSS {sh['rss'] / 1e6:.0f} MB, loop lag max {sh['loop_lag_max']:.2f} s")
    if args.node:
        for h in nodes[0]["history"]:
            console.print(f"  {time.strftime('%H:%M:%S', time.localtime(h['ts']))}.{int(h['ts'] * 1000) % 1000:03d} {h['stage']:<14} {h['detail']}")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    from vmtestbed.testbed import TestbedError, exec_in

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    try:
        exec_in(args.name, args.node, argv)
    except (TestbedError, ValueError) as exc:
        print(f"rackboot testbed exec: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from vmtestbed.testbed import down

    t0 = time.monotonic()
    try:
        removed = down(args.name)
    except ValueError as exc:
        print(f"rackboot testbed down: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if removed:
        print(f"testbed {args.name}: removed {len(removed)} namespaces in {time.monotonic() - t0:.1f}s")
    else:
        print(f"testbed {args.name}: nothing left to remove")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vmtestbed.demo import run_demo

    return run_demo(args)


def _cmd_experiment(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from vmtestbed.experiment import ExperimentError, load_experiment, run_experiment
    from vmtestbed.experiment_report import commit, write_report

    try:
        spec = load_experiment(Path(args.file))
    except ExperimentError as exc:
        print(f"rackboot experiment run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        print("rackboot experiment run: needs root (network namespaces)", file=sys.stderr)
        return 1
    import signal

    # SIGTERM (timeout, systemd, kill) ends the run as Ctrl-C does: the testbed of the moment is removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = Path(args.out or f"experiment-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    work = Path(tempfile.mkdtemp(prefix="rackboot-experiment-"))
    code = commit(Path(__file__).resolve().parents[2])
    try:
        runs = run_experiment(spec, work, say=lambda m: print(f"  {m}", flush=True))
    except KeyboardInterrupt:
        print("rackboot experiment run: interrupted; every testbed removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = write_report(spec, runs, out, code)
    failed = sum(len(r.ko) for r in runs) + sum(1 for r in runs if r.error)
    print(f"experiment {spec.name}: {len(runs)} runs, report in {report}")
    return 0 if not failed else 2

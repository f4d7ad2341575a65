"""The node daemon: the virtual nodes and BMCs of one shard of a testbed in one asyncio process, with a control socket.

A testbed runs plan.daemons of them (vmtestbed.shards says which nodes each owns); the shard holding the QEMU
VMs also starts them (paused: powered off) and serves their BMCs from the same farm. Faults are drawn over
every node of the testbed, then each shard keeps its own, so they do not depend on the number of shards.

`rackboot testbed up` starts each in the testbed's BMC namespace (`python -m vmtestbed.daemon STATE_DIR --shard I`);
it binds only its own nodes' BMC addresses, writes STATE_DIR/daemon-I.ready once they are bound, and answers
JSON requests, one per line, on the Unix socket STATE_DIR/control-I.sock (vmtestbed.control is the client).
"""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import json
import logging
import os
import resource
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vmtestbed.appliance_files import BMC_USER, bmc_password
from vmtestbed.bmc import BmcFarm
from vmtestbed.faults import assign_faults, parse_faults, parse_post_delay
from vmtestbed.firmware import FirmwareSettings, VirtualNode
from vmtestbed.plan import TestbedPlan
from vmtestbed.qemunodes import QemuNode
from vmtestbed.shards import PLAN_FILE, control_socket, ready_file, shard_nodes

log = logging.getLogger("rackboot.testbed.daemon")
DAEMON_NICE = 5  # the node daemons' niceness: the appliance (0) gets about 3 times their CPU share when both want it


def disk_path(state_dir: Path, node: str) -> Path:
    """Where a node's sparse virtual disk lives."""
    return state_dir / "disks" / f"{node}.img"


def node_workdir(state_dir: Path, node: str) -> Path:
    """A node's deploy-agent work dir (its root/ stands for the deploy partition's files)."""
    return state_dir / "nodes" / node


def rss_bytes() -> int:
    """Return this process's resident memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds_self() -> float:
    """User + system CPU seconds of this process."""
    t = os.times()
    return t.user + t.system


class NodeDaemon:
    """Owns one shard's nodes, their BMCs and its control socket."""

    def __init__(self, state_dir: Path, shard: int = 0) -> None:
        self.state_dir = state_dir
        self.shard = shard
        self.plan = TestbedPlan.load(state_dir / PLAN_FILE)
        if not 0 <= shard < self.plan.daemons:
            raise ValueError(f"shard {shard}: the testbed has {self.plan.daemons} node daemons (0-{self.plan.daemons - 1})")
        self.nodes: dict[str, VirtualNode | QemuNode] = {}
        self.vms: list[QemuNode] = []
        self.farm: BmcFarm | None = None
        self.started = time.time()
        self.loop_lag_max = 0.0
        self._stop = asyncio.Event()

    async def _watch_loop_lag(self) -> None:
        """Measure how late the event loop runs a timer (a busy or blocked loop delays every node and BMC)."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.1)
            lag = loop.time() - t - 0.1
            if lag > self.loop_lag_max:
                self.loop_lag_max = lag
                if lag > 0.5:
                    log.warning("event loop ran %.2fs late", lag)

    async def run(self) -> None:
        """Create nodes and BMCs, serve the control socket until SIGTERM, then power everything off."""
        loop = asyncio.get_running_loop()
        plan = self.plan
        # Over every node of the testbed, then this shard's: the same nodes are faulty whatever the number of shards.
        faults = assign_faults(parse_faults(plan.faults), [n.name for n in plan.netns_nodes], plan.seed)
        settings = FirmwareSettings(appliance_url=plan.appliance_url, post=parse_post_delay(plan.post_s), seed=plan.seed,
                                    builtin_true=plan.builtin_true)
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="netlink")
        mine = shard_nodes(plan)[self.shard]
        netns_nodes, vm_nodes = [n for n in mine if not n.is_vm], [n for n in mine if n.is_vm]
        for n in netns_nodes:
            self.nodes[n.name] = VirtualNode(n, faults[n.name], disk_path(self.state_dir, n.name), node_workdir(self.state_dir, n.name), settings, pool)
        try:
            for n in vm_nodes:  # QEMU paused = powered off, until its BMC (or the control socket) powers it on
                vm = QemuNode(plan, n)
                self.vms.append(vm)
                self.nodes[n.name] = vm
                await vm.start()
                log.info("%s: QEMU %s started paused (pid file %s)", n.name, n.firmware, vm.vm.pidfile)
        except BaseException:
            await self._stop_vms()
            raise
        self.farm = BmcFarm(loop)
        users = {BMC_USER: bmc_password(plan)}
        for n in netns_nodes:
            if not faults[n.name].bmc_dead:
                self.farm.add(self.nodes[n.name], n.bmc_ip, users, faults[n.name].bmc_slow_s)  # type: ignore[arg-type]
        for vm in self.vms:
            self.farm.add(vm.bmc_side, vm.plan.bmc_ip, users)  # type: ignore[arg-type]  # QemuPower: the node side of a BMC
        self.farm.wake()
        sock_path = control_socket(self.state_dir, self.shard)
        sock_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._client, path=str(sock_path), limit=1 << 20)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        lag_task = loop.create_task(self._watch_loop_lag())
        # Thousands of long-lived node and BMC objects: keep them out of the collector's full passes,
        # which otherwise stall the event loop of every node for a noticeable time.
        gc.freeze()
        ready_file(self.state_dir, self.shard).write_text(f"{os.getpid()}\n")
        log.info("shard %d: %d nodes, %d BMCs ready (%.1f MB)", self.shard, len(self.nodes), len(self.farm.bmcs), rss_bytes() / 1e6)
        try:
            await self._stop.wait()
        finally:
            lag_task.cancel()
            server.close()
            for node in self.nodes.values():
                if isinstance(node, VirtualNode):
                    node.power_off()
            self.farm.close()
            await self._stop_vms()
            await asyncio.sleep(0.2)
            pool.shutdown(wait=False, cancel_futures=True)

    async def _stop_vms(self) -> None:
        """Stop every QEMU (its tap goes with it)."""
        for vm in self.vms:
            try:
                await vm.vm.stop()
            except Exception:  # stop the others whatever happens to one
                log.exception("%s: stopping QEMU", vm.name)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if req.get("op") == "status" and self.vms:
                        names = req.get("nodes")
                        wanted = None if names in (None, "all") else set(names)
                        await asyncio.gather(*(vm.refresh() for vm in self.vms if wanted is None or vm.name in wanted))
                    reply = self.handle(req)
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _select(self, names: Any) -> list[VirtualNode | QemuNode]:
        if names in (None, "all"):
            return list(self.nodes.values())
        return [self.nodes[n] for n in names]

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Answer one control request."""
        op = req.get("op")
        if op == "status":
            nodes = [n.status() for n in self._select(req.get("nodes"))]
            if not req.get("history"):
                for s in nodes:
                    s.pop("history")
            return {"ok": True, "name": self.plan.name, "shard": self.shard, "pid": os.getpid(), "rss": rss_bytes(),
                    "cpu_s": round(cpu_seconds_self(), 2), "uptime": time.time() - self.started,
                    "owned": len(self.nodes), "vms": len(self.vms),
                    "bmcs": len(self.farm.bmcs) if self.farm else 0,
                    "loop_lag_max": round(self.loop_lag_max, 3), "nodes": nodes}
        if op == "power":
            action = req["action"]
            done = {}
            for node in self._select(req.get("nodes")):
                fn = {"on": node.power_on, "off": node.power_off, "reset": node.reset}[action]
                done[node.name] = fn()
            return {"ok": True, "changed": done}
        if op == "bootdev":
            for node in self._select(req.get("nodes")):
                node.set_boot_device(req["device"], bool(req.get("persistent")))
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown op {op!r}"}


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m vmtestbed.daemon STATE_DIR [--shard I]."""
    parser = argparse.ArgumentParser(prog="vmtestbed.daemon")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--shard", type=int, default=0, help="which of the testbed's node daemons this is (vmtestbed.shards)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Below the appliance on the CPUs they share: on a real cluster the appliance has its machine to itself and every
    # node its own CPU, so what a testbed measures should be the appliance's work, with the emulated nodes slowed
    # when the two compete (the 4000-node boot storm: 8 daemons and the appliance at a load of 15, docs/scale.md).
    os.nice(DAEMON_NICE)
    asyncio.run(NodeDaemon(args.state_dir, args.shard).run(), debug=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())

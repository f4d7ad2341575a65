"""End-to-end fixtures: a running `rackboot serve` in its own namespace, on a bridge with client namespaces.

Topology (every namespace named by one per-run `Lab` prefix, all removed on success, failure and Ctrl-C):

    PREFIX-app  rb0 10.77.0.1/24 ──veth──┐
    PREFIX-n1   eth0 (node-1's MAC) ─────┤ br0 in PREFIX-fab (also where QEMU's taps live)
    PREFIX-n2   eth0 (node-2's MAC) ─────┤
    PREFIX-n3   eth0 (node-3's MAC, static 10.77.0.13/24)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pyroute2 import NetNS

from realnodes import deploy_env  # noqa: F401  (a session fixture: the deploy environment, built once)
from vmtestbed.netns import Lab, unique_prefix

APPLIANCE_IF = "rb0"
APPLIANCE_IP = "10.77.0.1"
PREFIXLEN = 24
HTTP_PORT = 8080
DOMAIN = "cluster.test"
BRIDGE = "br0"
NODE_COUNT = 5
# node-1 udhcpc, node-2 dhclient, node-3 a client with a static address (tftp, curl, dig), node-4/5 QEMU.
CLIENT_NODES = ("node-1", "node-2", "node-3")
STATIC_NODES = ("node-3",)
READY_TIMEOUT_S = 30.0

TOOLS = ("ip", "udhcpc", "dhclient", "tftp", "atftp", "curl", "dig", "ping", "tcpdump")


@dataclass(frozen=True)
class NodeSpec:
    """A node of the test inventory and, for client nodes, the namespace that plays it."""

    name: str
    mac: str
    ip: str
    ns: str | None = None
    ifname: str = "eth0"

    @property
    def fqdn(self) -> str:
        """The node's name in the appliance's DNS domain."""
        return f"{self.name}.{DOMAIN}"


@dataclass
class E2eAppliance:
    """A running appliance, its namespaces and files, and helpers to act from the clients' side."""

    lab: Lab
    ns: str
    fabric_ns: str
    bridge: str
    workdir: Path
    config_path: Path
    state_dir: Path
    tftp_root: Path
    files_dir: Path
    nodes: dict[str, NodeSpec]
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path = field(default_factory=Path)
    inventory: list[NodeSpec] = field(default_factory=list)
    tftp_files: dict[str, bytes] = field(default_factory=dict)
    http_files: dict[str, bytes] = field(default_factory=dict)
    address: str = APPLIANCE_IP

    @property
    def url(self) -> str:
        """The appliance's HTTP base URL as nodes see it."""
        return f"http://{self.address}:{HTTP_PORT}"

    def run(self, ns: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in a namespace (a client's, the fabric's or the appliance's)."""
        return self.lab.run(ns, argv, timeout=timeout)

    def server_log(self) -> str:
        """Return what `rackboot serve` printed so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def assert_alive(self) -> None:
        """Fail with the server's output when `rackboot serve` has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"rackboot serve exited with {self.proc.returncode}:\n{self.server_log()[-4000:]}")

    def api_nodes(self) -> list[dict[str, Any]]:
        """GET /api/v1/nodes from inside the appliance namespace; return the list of nodes."""
        done = self.run(self.ns, ["curl", "-sS", "--fail", "--max-time", "5", *self.auth_header(), f"{self.url}/api/v1/nodes"], timeout=10)
        if done.returncode != 0:
            self.assert_alive()
            raise AssertionError(f"GET /api/v1/nodes failed ({done.returncode}): {done.stderr}")
        return self.nodes_of(json.loads(done.stdout))

    def auth_header(self) -> list[str]:
        """curl arguments carrying the appliance's admin token, when it wrote one."""
        token = self.state_dir / "admin.token"
        return ["-H", f"Authorization: Bearer {token.read_text().strip()}"] if token.is_file() else []

    def cli_env(self) -> dict[str, str]:
        """Environment for running the rackboot CLI: no endpoint or token from the caller's environment or home."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RACKBOOT_")}
        env["RACKBOOT_CLIENT_CONFIG"] = str(self.workdir / "no-client.yaml")
        return env

    def events_of(self, mac: str) -> list[dict[str, Any]]:
        """Return the boot events the appliance reports for a MAC (oldest first)."""
        for node in self.api_nodes():
            if str(node.get("mac", "")).lower() == mac.lower():
                return list(node.get("events", []))
        return []

    def capture(self, name: str, ns: str | None = None, iface: str | None = None) -> "contextlib.AbstractContextManager[Path]":
        """Record a pcap of the bridge (or another interface) while the block runs; return its path."""
        return _capture(self, name, ns or self.fabric_ns, iface or self.bridge)

    @staticmethod
    def nodes_of(payload: Any) -> list[dict[str, Any]]:
        """Return the node list of an /api/v1/nodes answer ({"nodes": [...]} or a bare list)."""
        if isinstance(payload, dict):
            payload = payload.get("nodes", [])
        assert isinstance(payload, list), f"unexpected /api/v1/nodes payload: {payload!r}"
        return payload

    @staticmethod
    def pcap_text(pcap: Path, limit: int = 80) -> str:
        """Decode a pcap with tcpdump -v (for failure messages and diagnosis)."""
        done = subprocess.run(["tcpdump", "-n", "-v", "-r", str(pcap)], capture_output=True, text=True, timeout=30)
        lines = done.stdout.splitlines()
        return "\n".join(lines[:limit]) + (f"\n... ({len(lines) - limit} more lines)" if len(lines) > limit else "")

    @staticmethod
    def rackboot_command() -> list[str]:
        """argv prefix of the rackboot console script of this environment (falls back to `python -m`)."""
        script = Path(sys.executable).with_name("rackboot")
        return [str(script)] if script.exists() else [sys.executable, "-m", "appliance.cli"]


@contextlib.contextmanager
def _capture(app: E2eAppliance, name: str, ns: str, iface: str) -> Iterator[Path]:
    pcap = app.workdir / f"{name}.pcap"
    proc = app.lab.popen(ns, ["tcpdump", "-i", iface, "-n", "-U", "-w", str(pcap)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 3
    while not pcap.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield pcap
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)


def _require_environment() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (network namespaces)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing client tools: {', '.join(missing)} (./setup.sh --test installs them)")


def inventory_nodes() -> list[NodeSpec]:
    """The test inventory: node-1..5 with consecutive MACs and addresses."""
    return [NodeSpec(f"node-{i}", f"52:54:00:77:00:{i:02x}", f"10.77.0.{10 + i}") for i in range(1, NODE_COUNT + 1)]


def write_config(workdir: Path, nodes: list[NodeSpec]) -> Path:
    """Write rackboot.yaml and nodes.yaml (folded ranges, as users write them) and the served test files."""
    (workdir / "nodes.yaml").write_text(
        "nodes:\n"
        f"  - name: node-[1-{len(nodes)}]\n"
        f'    mac: "{nodes[0].mac}"\n'
        f"    ip: {nodes[0].ip}\n"
        "    rack: r1\n"
    )
    config = workdir / "rackboot.yaml"
    config.write_text(
        f"interface: {APPLIANCE_IF}\n"
        f"address: {APPLIANCE_IP}/{PREFIXLEN}\n"
        "state_dir: state\n"
        f"http_port: {HTTP_PORT}\n"
        "dhcp:\n"
        "  mode: authoritative\n"
        "tftp:\n"
        "  root: tftp\n"
        "http:\n"
        "  files: files\n"
        "dns:\n"
        f"  domain: {DOMAIN}\n"
        "inventory: nodes.yaml\n"
    )
    return config


def random_bytes(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (not compressible, so truncation or reordering shows)."""
    import random

    return random.Random(seed).randbytes(size)


# Served test files: one over TFTP an exact multiple of 512 (the RFC 1350 empty last block) and one odd-sized
# larger than a blksize-1428 window; one over HTTP.
TFTP_FILES = {"test-512x200.bin": random_bytes(512 * 200, 1), "sub/test-odd.bin": random_bytes(1_000_003, 2)}
HTTP_FILES = {"test-http.bin": random_bytes(300_001, 3)}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2eAppliance]:
    """Build the namespaces, write config + inventory, run `rackboot serve`, yield; always tear everything down."""
    _require_environment()
    with serving_appliance(tmp_path_factory.mktemp("e2e")) as app:
        yield app


@pytest.fixture(scope="module")
def appliance_factory() -> Callable[..., "contextlib.AbstractContextManager[E2eAppliance]"]:
    """serving_appliance, for test modules that need their own appliance (another inventory, config or files)."""
    _require_environment()
    return serving_appliance


@contextlib.contextmanager
def serving_appliance(workdir: Path, prefix: str = "e2e", before_serve: Callable[[E2eAppliance], None] | None = None) -> Iterator[E2eAppliance]:
    """The `appliance` fixture's body: before_serve(app) may rewrite the config or add files before `rackboot serve` starts."""
    nodes = inventory_nodes()
    config = write_config(workdir, nodes)
    tftp_root, files_dir = workdir / "tftp", workdir / "files"
    for root, files in ((tftp_root, TFTP_FILES), (files_dir, HTTP_FILES)):
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)

    previous_sigterm = signal.getsignal(signal.SIGTERM)

    owner = os.getpid()

    def _sigterm(signum: int, frame: object) -> None:
        """Turn SIGTERM into the Ctrl-C path so cleanup runs; a forked helper (pyroute2 forks) just dies."""
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with Lab(unique_prefix(prefix)) as lab:
            app_ns, fabric = lab.ns("app"), lab.ns("fab")
            lab.bridge(fabric, BRIDGE)
            lab.veth(app_ns, APPLIANCE_IF, fabric, "app", master_b=BRIDGE)
            lab.addr(app_ns, APPLIANCE_IF, f"{APPLIANCE_IP}/{PREFIXLEN}")
            by_name = {n.name: n for n in nodes}
            for name in CLIENT_NODES:
                spec = by_name[name]
                ns = lab.ns(name.replace("node-", "n"))
                lab.veth(ns, spec.ifname, fabric, name.replace("node-", "n"), master_b=BRIDGE)
                with NetNS(ns) as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname=spec.ifname)[0], address=spec.mac)
                if name in STATIC_NODES:
                    lab.addr(ns, spec.ifname, f"{spec.ip}/{PREFIXLEN}")
                by_name[name] = NodeSpec(spec.name, spec.mac, spec.ip, ns=ns, ifname=spec.ifname)

            app = E2eAppliance(
                lab=lab, ns=app_ns, fabric_ns=fabric, bridge=BRIDGE, workdir=workdir, config_path=config,
                state_dir=workdir / "state", tftp_root=tftp_root, files_dir=files_dir, nodes=by_name,
                stderr_path=workdir / "serve.log", tftp_files=TFTP_FILES, http_files=HTTP_FILES,
                inventory=nodes,
            )
            if before_serve is not None:
                before_serve(app)
            with open(app.stderr_path, "wb") as log:
                app.proc = lab.popen(app_ns, [sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            ready = app.state_dir / "serve.ready"
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not ready.exists():
                app.assert_alive()
                if time.monotonic() > deadline:
                    pytest.fail(f"rackboot serve not ready after {READY_TIMEOUT_S:.0f} s:\n{app.server_log()[-4000:]}")
                time.sleep(0.05)
            yield app
            app.assert_alive()
            app.proc.send_signal(signal.SIGTERM)
            try:
                rc = app.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rackboot serve did not stop within 10 s of SIGTERM:\n{app.server_log()[-2000:]}")
            assert rc == 0, f"rackboot serve exited with {rc} on SIGTERM:\n{app.server_log()[-4000:]}"
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


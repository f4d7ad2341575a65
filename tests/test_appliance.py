"""The composition root: every socket bound before serving, clear failures, clean stop on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tftpy

from appliance.app import Appliance
from appliance.cli import main
from domain.progress import ScriptServed, Via
from appliance.config import load_config
from appliance.deploy.nodestate import NodeState, Transition
from domain.profiles import BootProfile
from domain.errors import BindError


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_both(*taken: int) -> int:
    """A port free for both UDP and TCP (DNS binds both), other than the ones given: the kernel may hand the same
    number to a UDP and a TCP probe (seen: the DNS port equal to the HTTP port, the TCP bind refused)."""
    while True:
        port = free_port()
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def write_config(tmp_path: Path, tftp_port: int, dhcp: str = "mode: 'off'", interface: str = "lo") -> Path:
    (tmp_path / "nodes.yaml").write_text("nodes:\n  - {name: node-1, mac: '52:54:00:77:00:01', ip: 127.0.0.11}\n"
                                         "  - {name: node-2, mac: '52:54:00:77:00:02', ip: 127.0.0.12}\n")
    http_port = free_port(socket.SOCK_STREAM)
    (tmp_path / "rackboot.yaml").write_text(textwrap.dedent(f"""\
        interface: {interface}
        address: 127.0.0.1/8
        state_dir: {tmp_path / 'state'}
        http_port: {http_port}
        dhcp: {{{dhcp}, router_advertisements: false}}
        tftp: {{port: {tftp_port}}}
        dns: {{domain: cluster.test, port: {free_port_both(http_port, tftp_port)}}}
        inventory: nodes.yaml
        """))
    return tmp_path / "rackboot.yaml"


async def test_appliance_binds_everything_and_serves_per_mac_tftp_file(tmp_path: Path) -> None:
    app = Appliance(load_config(write_config(tmp_path, free_port())))
    await app.start()
    try:
        assert [s.name for s in app.services] == ["tftp", "http", "dns"]
        # node-1 (127.0.0.11) fetches its per-MAC script over TFTP: rendered like over HTTP, reported as served
        out = tmp_path / "boot.ipxe"
        client = tftpy.TftpClient("127.0.0.1", app.tftp.address[1], localip="127.0.0.11")
        await asyncio.to_thread(client.download, "boot.ipxe", str(out), timeout=2)
        assert out.read_bytes().startswith(b"#!ipxe") and b"node-1" in out.read_bytes()
        for _ in range(500):  # the transfer's end reaches the loop from the TFTP data plane's thread
            if app.tftp.stats()["transfers_active"] == 0:
                break
            await asyncio.sleep(0.01)
        [served] = [e for e in app.events.last("52:54:00:77:00:01") if isinstance(e, ScriptServed)]
        assert (served.via, served.profile) == (Via.TFTP, "none")
        assert app.mac_for_ip("127.0.0.11") == "52:54:00:77:00:01"
        assert (tmp_path / "state" / "admin.token").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "state" / "deploy_key.pub").read_text().startswith("ssh-ed25519 ")
    finally:
        app.stop()
        await app.run()


def test_a_restart_ends_interrupted_deployments_and_takes_nodes_off_the_deploy_environment(tmp_path: Path) -> None:
    """Defect of 2026-12-05: after a crash nodes kept the deploy profile with a dead token, and a node already in its
    installed system was reported like the others."""
    config = load_config(write_config(tmp_path, free_port()))
    first = Appliance(config)
    deploy = BootProfile(kind="deploy", kernel="deploy/vmlinuz", cmdline="rackboot.deployment=d1")
    first.profiles.set("52:54:00:77:00:01", deploy)
    first.profiles.set("52:54:00:77:00:02", BootProfile(kind="local", env="debian12:1"))
    first.store.create("d1", "admin", "debian12:1", ["node-1", "node-2"], "chain", {})
    first.store.transition("d1", Transition(1.0, "node-1", NodeState.PENDING, NodeState.SET_DEPLOYMENT_ENV,
                                            "SetDeploymentEnv", "reboot", ""))
    first.store.transition("d1", Transition(1.0, "node-2", NodeState.PENDING, NodeState.BOOT_NEW_ENV,
                                            "BootNewEnv", "kexec", ""))
    first.db.close()  # the process dies: nothing finishes the deployment
    again = Appliance(config)
    try:
        stored = again.store.get("d1")
        assert stored is not None and stored["status"] == "interrupted"
        reasons = {n["node"]: (n["state"], n["reason"]) for n in stored["nodes"]}
        assert reasons["node-1"][0] == "failed" and "going to the deploy environment" in reasons["node-1"][1]
        assert reasons["node-2"][0] == "failed" and "may be running the installed system" in reasons["node-2"][1]
        assert again.profiles.get("52:54:00:77:00:01").kind == "none"  # no dead token left to boot with
        assert again.profiles.get("52:54:00:77:00:02").kind == "local"  # its installed system boots on
        assert [t["to"] for t in again.store.transitions("d1", "node-1")][-1] == "failed"
    finally:
        again.db.close()


async def test_port_taken_fails_fast_and_releases_what_was_bound(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        app = Appliance(load_config(write_config(tmp_path, squatter.getsockname()[1])))
        with pytest.raises(BindError, match=r"tftp: cannot bind UDP 127\.0\.0\.1:\d+: .*in use"):
            await app.start()


async def test_missing_interface_is_a_clear_error(tmp_path: Path) -> None:
    # DHCP binds to the configured device only; a device that does not exist is refused before any packet.
    config = load_config(write_config(tmp_path, free_port(), dhcp=f"mode: authoritative, port: {free_port()}", interface="rbnope0"))
    with pytest.raises(BindError, match="rbnope0"):
        await Appliance(config).start()


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "state" / "serve.ready").exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reports_a_taken_port_and_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        config = write_config(tmp_path, squatter.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot serve: tftp: cannot bind UDP 127.0.0.1" in done.stderr


async def test_optional_https_site_serves_the_api(tmp_path: Path) -> None:
    import ssl

    import aiohttp

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rackboot.test", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    path = write_config(tmp_path, free_port())
    tls_port = free_port(socket.SOCK_STREAM)
    path.write_text(path.read_text() + f"http: {{tls_cert: cert.pem, tls_key: key.pem, tls_port: {tls_port}}}\n")
    app = Appliance(load_config(path))
    await app.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{tls_port}/api/v1/health", ssl=context) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
    finally:
        app.stop()
        await app.run()


async def test_metrics_page_serves_the_services_counters_for_prometheus(tmp_path: Path) -> None:
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    app = Appliance(load_config(write_config(tmp_path, free_port())))
    await app.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{app.config.http_base}/boot/52-54-00-77-00-01.ipxe") as r:
                assert r.status == 200
            async with http.get(f"{app.config.http_base}/metrics") as r:  # no API token: Prometheus scrapes as is
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
    finally:
        app.stop()
        await app.run()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["rackboot_http_scripts_total"] == 1
    assert samples["rackboot_tftp_transfers_active"] == 0 and "rackboot_dns_received_total" in samples
    assert samples["rackboot_events_published_total"] >= 1
    assert "token" not in text
    # Latency histograms: the script's handler time was observed once, under a second.
    buckets = {s.labels["le"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "rackboot_http_script_seconds_bucket"}
    assert samples["rackboot_http_script_seconds_count"] == 1 and buckets["1.0"] == 1 and buckets["+Inf"] == 1
    assert samples["rackboot_dns_query_seconds_count"] == 0 and "rackboot_tftp_transfer_seconds_sum" in samples
    # BMC calls by result and their durations (none made here; tests/test_bmc_failures.py counts real ones).
    assert samples["rackboot_bmc_calls_ok_total"] == 0 and samples["rackboot_bmc_calls_unreachable_total"] == 0
    assert samples["rackboot_bmc_calls_in_flight"] == 0 and samples["rackboot_bmc_call_failed_seconds_count"] == 0
    # Event-loop stalls: GC pauses per generation and timer lateness (tests/test_loopwatch.py measures real ones).
    assert "rackboot_loop_lag_seconds_count" in samples and "rackboot_loop_gc_pause_gen2_seconds_count" in samples
    assert "rackboot_loop_lag_max_us" in samples and "rackboot_loop_gc_collections_gen0_total" in samples


def test_metrics_count_live_nodes_by_state() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.metrics import ApplianceCollector

    registry = CollectorRegistry(auto_describe=False)
    states = [("running", "BroadcastEnv"), ("running", "BroadcastEnv"), ("running", "failed"), ("done", "done")]
    registry.register(ApplianceCollector(lambda: {"dhcp": {"received": 5, "leases": 2}}, lambda: states))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {(s.name, s.labels.get("state", "")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("rackboot_dhcp_received_total", "")] == 5 and samples[("rackboot_dhcp_leases", "")] == 2
    assert samples[("rackboot_deployment_nodes", "BroadcastEnv")] == 2
    assert samples[("rackboot_deployment_nodes", "failed")] == 1 and samples[("rackboot_deployment_nodes", "done")] == 1


def test_install_service_writes_a_unit_that_systemd_accepts(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    unit = tmp_path / "rackboot.service"
    assert main(["install-service", "--config", str(config), "--out", str(unit)]) == 0
    text = unit.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and f"serve --config {config}" in text
    assert f"ReadWritePaths={tmp_path / 'state'}" in text and "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_serve_tells_systemd_it_is_ready_pings_the_watchdog_and_says_when_it_stops(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify_path))
        listener.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")  # a ping every 0.1 s
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            messages = [listener.recv(4096).decode() for _ in range(3)]
            assert messages[0].startswith("READY=1\nSTATUS=serving tftp, http, dns on lo"), messages
            assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"], messages
            os.kill(proc.pid, signal.SIGTERM)
            while (message := listener.recv(4096).decode()) == "WATCHDOG=1":
                pass
            assert message == "STOPPING=1"
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

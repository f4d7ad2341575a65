"""`serve` reloads the inventory on SIGHUP: new, changed and removed nodes, leases and running deployments kept."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dnslib
import pytest

from appliance.app import Appliance
from appliance.config import load_config
from domain.errors import ConfigError
from test_appliance import free_port, write_config

NODES_AFTER = ("nodes:\n  - {name: node-1, mac: '52:54:00:77:00:01', ip: 127.0.0.21}\n"   # changed address
               "  - {name: node-3, mac: '52:54:00:77:00:03', ip: 127.0.0.13}\n")           # node-2 removed, node-3 new


def dig(app: Appliance, name: str) -> list[str]:
    """The A records the appliance's DNS zone answers for a name."""
    reply = app.dns.zone.answer(dnslib.DNSRecord.question(f"{name}.cluster.test"))
    return [str(r.rdata) for r in reply.rr]


async def test_reload_applies_new_changed_and_removed_nodes_everywhere(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), dhcp=f"mode: authoritative, port: {free_port()}, pool: 127.0.0.100-127.0.0.110")
    app = Appliance(load_config(config))
    await app.start()
    try:
        ip = app.dhcp.leases.offer("02:00:00:00:00:01", None, time.time())
        assert ip is not None and app.dhcp.leases.bind("02:00:00:00:00:01", ip, time.time(), 3600)
        (tmp_path / "nodes.yaml").write_text(NODES_AFTER)
        summary = app.reload()
        assert summary.startswith("inventory reloaded: 2 nodes; added node-3, changed node-1, removed node-2"), summary
        inv = app.config.inventory
        assert sorted(inv.by_name) == ["node-1", "node-3"] and str(inv.by_name["node-1"].ip) == "127.0.0.21"
        # Every service sees it: DNS, DHCP reservations (and their steering), iPXE scripts, the address lookups.
        assert dig(app, "node-3") == ["127.0.0.13"] and dig(app, "node-2") == [] and dig(app, "node-1") == ["127.0.0.21"]
        assert "52:54:00:77:00:03" in app.dhcp.policy._node_ip and "52:54:00:77:00:02" not in app.dhcp.policy._node_ip
        assert bytes.fromhex("525400770003") in app.dhcp.policy.node_chaddrs
        assert app.scripts.render("52:54:00:77:00:03").profile == "none"      # known now: waits for a profile
        assert app.scripts.render("52:54:00:77:00:02").profile == "unknown"   # gone
        assert app.mac_for_ip("127.0.0.21") == "52:54:00:77:00:01" and app.mac_for_ip("127.0.0.12") is None
        assert app.dhcp.leases.lease_for("02:00:00:00:00:01") is not None  # pool leases survive a reload
    finally:
        app.stop()
        await app.run()


async def test_a_node_being_deployed_keeps_its_entry_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    app = Appliance(load_config(config))
    await app.start()
    try:
        app.controller._busy["node-1"] = "d-running"  # as a running deployment marks its nodes
        (tmp_path / "nodes.yaml").write_text(NODES_AFTER)
        summary = app.reload()
        assert "node-1 kept as they were until their deployment ends" in summary, summary
        assert str(app.config.inventory.by_name["node-1"].ip) == "127.0.0.11"  # its deployment still reaches it there
        assert "node-3" in app.config.inventory.by_name and "node-2" not in app.config.inventory.by_name
        del app.controller._busy["node-1"]
        assert "changed node-1" in app.reload()  # once the deployment has ended
        (tmp_path / "nodes.yaml").write_text("nodes:\n  - {name: node-9, mac: 52:54:00:12:34:56, ip: 127.0.0.19}\n")
        with pytest.raises(ConfigError, match="quote"):
            app.reload()
        assert sorted(app.config.inventory.by_name) == ["node-1", "node-3"]  # unchanged
    finally:
        app.stop()
        await app.run()


def test_sighup_reloads_a_running_serve(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port())
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "state" / "serve.ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = load_config(config).http_base + "/api/v1/nodes"
        token = (tmp_path / "state" / "admin.token").read_text().strip()

        def names() -> list[str]:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return [n["name"] for n in json.load(resp)["nodes"]]

        assert names() == ["node-1", "node-2"]
        (tmp_path / "nodes.yaml").write_text(NODES_AFTER)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while names() != ["node-1", "node-3"]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "inventory reloaded: 2 nodes; added node-3, changed node-1, removed node-2" in log.read_text()
        (tmp_path / "nodes.yaml").write_text("nodes: [\n")
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload refused, nothing changed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert names() == ["node-1", "node-3"] and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)

"""The appliance against real, independent clients, each run in its own network namespace.

busybox udhcpc and ISC dhclient get their reservations; tftp-hpa and atftp (blksize, windowsize) fetch
files intact; curl fetches files, a byte range and the per-MAC iPXE script; dig resolves names both ways;
`rackboot nodes --json` reports what the clients did. Client scripts never touch the host: they only
record what they were told and configure the address inside the client's namespace.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ipxe import script_path

if TYPE_CHECKING:  # the fixture comes from conftest.py; its types are only needed by type checkers
    from conftest import E2eAppliance, NodeSpec

pytestmark = pytest.mark.netns

DHCP_TIMEOUT_S = 30.0


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _env_file(path: Path) -> dict[str, str]:
    """Parse `env` output written by a DHCP client script."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def udhcpc_lease(app: E2eAppliance, node: NodeSpec) -> dict[str, str]:
    """Run busybox udhcpc once in the node's namespace; return the variables of its 'bound' call."""
    assert node.ns is not None
    record = app.workdir / f"udhcpc-{node.name}.lease"
    for old in record.parent.glob(record.name + ".*"):
        old.unlink()
    # udhcpc runs the script with $1 = deconfig | bound | renew | leasefail | nak and the lease in the environment.
    script = _script(app.workdir / f"udhcpc-{node.name}.sh", (
        f'env > {shlex.quote(str(record))}."$1"\n'
        'if [ "$1" = bound ] || [ "$1" = renew ]; then ip addr replace "$ip/$mask" dev "$interface"; fi\n'
    ))
    done = app.run(node.ns, ["udhcpc", "-f", "-q", "-n", "-i", node.ifname, "-t", "6", "-T", "2", "-s", str(script)],
                   timeout=DHCP_TIMEOUT_S)
    bound = Path(f"{record}.bound")
    assert done.returncode == 0 and bound.exists(), (
        f"udhcpc got no lease (rc {done.returncode}):\n{done.stdout}\n{done.stderr}\nserver:\n{app.server_log()[-3000:]}")
    return _env_file(bound)


def dhclient_lease(app: E2eAppliance, node: NodeSpec) -> dict[str, str]:
    """Run ISC dhclient in the node's namespace until it is BOUND; return the variables of that call."""
    assert node.ns is not None
    record = app.workdir / f"dhclient-{node.name}.lease"
    for old in record.parent.glob(record.name + ".*"):
        old.unlink()
    script = _script(app.workdir / f"dhclient-{node.name}.sh", (
        f'env > {shlex.quote(str(record))}."$reason"\n'
        'case "$reason" in\n'
        '  PREINIT) ip link set "$interface" up ;;\n'
        '  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;\n'
        'esac\n'
    ))
    conf = app.workdir / "dhclient.conf"
    conf.write_text("request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers, host-name;\n")
    # Own config, lease, pid files and script: dhclient must not touch the host's /etc/resolv.conf or leases.
    argv = ["dhclient", "-4", "-d", "-1", "-v", "-cf", str(conf), "-lf", str(app.workdir / f"dhclient-{node.name}.leases"),
            "-pf", str(app.workdir / f"dhclient-{node.name}.pid"), "-sf", str(script), node.ifname]
    log = app.workdir / f"dhclient-{node.name}.log"
    with open(log, "wb") as out:
        proc = app.lab.popen(node.ns, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    bound = Path(f"{record}.BOUND")
    try:
        deadline = time.monotonic() + DHCP_TIMEOUT_S
        while not bound.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert bound.exists(), f"dhclient got no lease:\n{log.read_text()}\nserver:\n{app.server_log()[-3000:]}"
    return _env_file(bound)


def test_udhcpc_gets_its_reservation(appliance: E2eAppliance) -> None:
    node = appliance.nodes["node-1"]
    lease = udhcpc_lease(appliance, node)
    assert lease["ip"] == node.ip
    assert lease["serverid"] == appliance.address
    assert lease["subnet"] == "255.255.255.0"
    ping = appliance.run(node.ns, ["ping", "-c", "1", "-W", "2", appliance.address])  # the leased address works
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_dhclient_gets_its_reservation(appliance: E2eAppliance) -> None:
    node = appliance.nodes["node-2"]
    lease = dhclient_lease(appliance, node)
    assert lease["new_ip_address"] == node.ip
    assert lease["new_dhcp_server_identifier"] == appliance.address
    assert lease["new_subnet_mask"] == "255.255.255.0"
    assert int(lease["new_dhcp_lease_time"]) > 0


@pytest.mark.parametrize("name", ["test-512x200.bin", "sub/test-odd.bin"])
def test_tftp_hpa_fetches_file_intact(appliance: E2eAppliance, name: str) -> None:
    node = appliance.nodes["node-3"]
    out = appliance.workdir / f"tftp-hpa-{name.replace('/', '_')}"
    out.unlink(missing_ok=True)
    done = appliance.run(node.ns, ["tftp", "-v", "-m", "binary", appliance.address, "-c", "get", name, str(out)], timeout=60)
    assert out.exists(), f"tftp-hpa: {done.stdout}{done.stderr}"
    assert out.read_bytes() == appliance.tftp_files[name], f"tftp-hpa: {done.stdout}{done.stderr}"


def _atftp_supports_windowsize() -> bool:
    """atftp gained the RFC 7440 windowsize option in 0.8.0."""
    done = subprocess.run(["atftp", "-V"], capture_output=True, text=True)
    m = re.search(r"atftp-(\d+)\.(\d+)", done.stdout + done.stderr)
    return m is not None and (int(m[1]), int(m[2])) >= (0, 8)


def test_atftp_fetches_file_with_blksize_and_windowsize(appliance: E2eAppliance) -> None:
    node = appliance.nodes["node-3"]
    name = "sub/test-odd.bin"
    out = appliance.workdir / "atftp-odd.bin"
    out.unlink(missing_ok=True)
    options = ["--option", "blksize 1428"]
    if _atftp_supports_windowsize():
        options += ["--option", "windowsize 8"]
    done = appliance.run(node.ns, ["atftp", "--trace", *options, "-g", "-r", name, "-l", str(out), appliance.address, "69"], timeout=60)
    trace = done.stdout + done.stderr
    assert done.returncode == 0, trace[-3000:]
    assert out.read_bytes() == appliance.tftp_files[name]
    # The server must have acknowledged the options (OACK, RFC 2347), else atftp silently falls back to 512.
    oack = "\n".join(line for line in trace.splitlines() if "OACK" in line)
    assert "blksize" in oack and "1428" in oack, trace[:2000]
    if _atftp_supports_windowsize():
        assert "windowsize" in oack, trace[:2000]


def test_curl_fetches_file_and_range(appliance: E2eAppliance) -> None:
    node = appliance.nodes["node-3"]
    data = appliance.http_files["test-http.bin"]
    url = f"{appliance.url}/files/test-http.bin"
    out = appliance.workdir / "curl-full.bin"
    done = appliance.run(node.ns, ["curl", "-sS", "--fail", "--max-time", "20", "-o", str(out), url])
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == data

    part = appliance.workdir / "curl-range.bin"
    done = appliance.run(node.ns, ["curl", "-sS", "--fail", "--max-time", "20", "-r", "1000-1999", "-o", str(part),
                                   "-w", "%{http_code}", url])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "206"
    assert part.read_bytes() == data[1000:2000]


def test_curl_gets_per_mac_script(appliance: E2eAppliance) -> None:
    node = appliance.nodes["node-3"]
    done = appliance.run(node.ns, ["curl", "-sS", "--fail", "--max-time", "10", appliance.url + script_path(node.mac)])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!ipxe"), done.stdout[:500]


def _dig(app: E2eAppliance, node: NodeSpec, *query: str) -> str:
    assert node.ns is not None
    done = app.run(node.ns, ["dig", f"@{app.address}", "+short", "+time=2", "+tries=2", *query])
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_dig_resolves_names_both_ways(appliance: E2eAppliance) -> None:
    client = appliance.nodes["node-3"]
    for name in ("node-1", "node-5"):
        target = next(n for n in appliance.inventory if n.name == name)
        assert _dig(appliance, client, target.fqdn, "A") == target.ip
        assert _dig(appliance, client, "-x", target.ip) == target.fqdn + "."


def test_rackboot_nodes_shows_client_events(appliance: E2eAppliance) -> None:
    dhcp_node, http_node = appliance.nodes["node-1"], appliance.nodes["node-3"]
    udhcpc_lease(appliance, dhcp_node)
    done = appliance.run(http_node.ns, ["curl", "-sS", "--fail", "--max-time", "10", appliance.url + script_path(http_node.mac)])
    assert done.returncode == 0, done.stderr

    # --config only supplies the admin token (if the API wants one); the URL is the one nodes use.
    done = appliance.lab.run(http_node.ns, [*appliance.rackboot_command(), "nodes", "--server", appliance.url,
                                            "--config", str(appliance.config_path), "--json"],
                             timeout=30, env=appliance.cli_env())
    assert done.returncode == 0, done.stderr
    nodes = {n["name"]: n for n in appliance.nodes_of(json.loads(done.stdout))}
    assert set(nodes) >= {f"node-{i}" for i in range(1, 6)}
    assert nodes["node-1"]["mac"].lower() == dhcp_node.mac
    kinds_1 = [e["kind"] for e in nodes["node-1"].get("events", [])]
    kinds_3 = [e["kind"] for e in nodes["node-3"].get("events", [])]
    assert "dhcp_from_os" in kinds_1, nodes["node-1"]
    assert "script_served" in kinds_3, nodes["node-3"]
    assert all(isinstance(e["ts"], (int, float)) for e in nodes["node-1"]["events"])

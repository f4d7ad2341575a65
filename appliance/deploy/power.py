"""Power drivers: one interface (on/off/reset/cycle/status, next boot device) and a real IPMI one.

pyghmi blocks, so IPMI calls run in a bounded thread pool, one at a time per BMC, with retries and
backoff: BMCs are known to fail under bursts of calls. One at a time is pyghmi's limit, not a setting:
`pyghmi.ipmi.private.session.Session.__new__` hands every Command to the same BMC with the same
credentials the one cached session (keyed by the BMC's address, user, password and Kg), so a second
session per BMC cannot be had from one process, and two threads on one session hang.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from appliance.inventory import read_bmc_credentials
from domain.errors import RackbootError
from domain.logfields import fields
from domain.nodes import Node

log = logging.getLogger("rackboot.power")

POWER_OPS = ("on", "off", "reset", "cycle", "status")


class PowerError(RackbootError):
    """A BMC did not do what was asked (unreachable, refused, timed out)."""


class BmcUnreachable(PowerError):
    """The BMC does not answer at all: no other call to it will do better in this deployment."""


class BmcAuthRefused(PowerError):
    """The BMC answered and refused the credentials (wrong password, unknown user, role refused): never retried,
    since a real BMC locks an account out after a few failed logins, and no other call will do better."""


class BmcSessionRefused(PowerError):
    """The BMC answered and refused to open a session (no free session slot): retried, as its sessions time out."""


class BmcTimedOut(PowerError):
    """The BMC set a session up but did not answer the command in time (a slow or overloaded BMC)."""


# pyghmi's words when the BMC refused the login (RAKP errors, IPMI 2.0 table 13-15), as opposed to silence.
_AUTH_REFUSED = ("incorrect password", "unauthorized name", "invalid role", "unauthorized role", "invalid username",
                 "invalid integrity check", "wrong kg", "password is too long")
# pyghmi's words when the BMC refused to open a session at all (RMCP+ open session status 0x01 or 0x0b).
_SESSION_REFUSED = ("insufficient resources",)
# pyghmi's words for "nobody answered" (as opposed to a BMC that answered with an error).
_UNREACHABLE = ("no longer connected", "timeout", "timed out", "unable to establish", "unreachable", "no route")
PER_BMC = 1  # calls in flight per BMC: pyghmi's limit (see the module docstring)
BACKOFF_S = 0.5  # before the first retry; doubled for each next one, with up to 100 % jitter


class PowerDriver(Protocol):
    """What the controller needs from a node's BMC."""

    async def power(self, node: Node, op: str) -> str:
        """Apply on/off/reset/cycle, or read the state; return 'on' or 'off' (the state after the op)."""

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Set the next boot device ('network' or 'disk'), for the next boot only unless persistent."""


class IpmiPower:
    """IPMI over LAN (RMCP+) through pyghmi, behind a thread pool, one call at a time per BMC.

    A call is tried at most retries + 1 times; silence (BmcUnreachable) at most twice; a refused login
    (BmcAuthRefused) once, and not again with the same credentials. `attempts` counts the tries per BMC and `most_in_flight` the most calls one BMC
    had at once, for the tests and the metrics.
    """

    def __init__(self, threads: int = 32, retries: int = 3, backoff_s: float = BACKOFF_S) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipmi")
        self._sems: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._commands: dict[tuple[str, int], Any] = {}  # pyghmi Command per BMC
        self._retries = retries
        self._backoff_s = backoff_s
        self.attempts: Counter[tuple[str, int]] = Counter()
        self.most_in_flight: Counter[tuple[str, int]] = Counter()
        self._in_flight: Counter[tuple[str, int]] = Counter()
        # BMC -> (credentials, pyghmi's words) of a refused login: not tried again until the credentials file changes
        self._refused: dict[tuple[str, int], tuple[tuple[str, str], str]] = {}

    def _sem(self, key: tuple[str, int]) -> asyncio.Semaphore:
        if key not in self._sems:
            self._sems[key] = asyncio.Semaphore(PER_BMC)
        return self._sems[key]

    async def _call(self, node: Node, what: str, fn: Callable[..., object]) -> object:
        if node.bmc is None:
            raise PowerError(f"{node.name}: no BMC in the inventory")
        bmc = node.bmc
        user, password = read_bmc_credentials(bmc)
        key = (bmc.address, bmc.port)

        def run() -> object:
            from pyghmi.ipmi.command import Command

            # One long-lived session per BMC, used by one call at a time (the per-BMC semaphore): pyghmi
            # caches sessions per BMC, and a Command made after logging out of the cached one fails
            # ("'<' not supported between ... 'NoneType'"); two threads on one BMC's session hang.
            cmd = self._commands.get(key)
            if cmd is None:
                try:
                    cmd = Command(bmc=bmc.address, userid=user, password=password, port=bmc.port, keepalive=True)
                except Exception as exc:  # noqa: BLE001 - pyghmi raises bare exceptions
                    cause = _lost_login_error(exc) or exc
                    _forget_session(bmc.address, bmc.port)
                    raise _LoginFailed(cause) from exc
                self._commands[key] = cmd
            try:
                return fn(cmd)
            except Exception:
                self._commands.pop(key, None)
                _forget_session(bmc.address, bmc.port)
                raise

        where = f"{node.name}: BMC {bmc.address}:{bmc.port} {what}"
        loop = asyncio.get_running_loop()
        delay = self._backoff_s
        last: Exception | None = None
        tries = self._retries + 1
        async with self._sem(key):
            refused = self._refused.get(key)  # looked at once the calls before this one on the BMC have ended
            if refused is not None and refused[0] == (user, password):
                raise BmcAuthRefused(f"{where}: {_EXPLAIN[BmcAuthRefused]} ({refused[1]}; not tried again with the same credentials)")
            self._in_flight[key] += 1
            self.most_in_flight[key] = max(self.most_in_flight[key], self._in_flight[key])
            try:
                attempt = 0
                while attempt < tries:
                    attempt += 1
                    self.attempts[key] += 1
                    try:
                        # No timeout of ours around the thread: pyghmi times out on its own (a silent BMC fails in
                        # seconds), and a call abandoned while its thread runs on would let a retry reset the node
                        # twice, the late reset landing in the middle of the deployment.
                        return await loop.run_in_executor(self._pool, run)
                    except Exception as exc:  # noqa: BLE001 - pyghmi raises bare exceptions
                        kind = _classify(exc)
                        if last is None or kind is not PowerError or _classify(last) is PowerError:
                            # The most telling failure is reported: a retry may only meet pyghmi's stale session
                            # of the failed login ("'Session' object has no attribute 'errormsg'").
                            last = exc
                        log.debug("%s: %s failed (attempt %d, %s): %s", node.name, what, attempt, kind.__name__, _words(exc),
                                  extra=fields(node=node.name, mac=node.mac))
                        if kind is BmcAuthRefused:
                            self._refused[key] = ((user, password), _words(exc))
                            break  # a BMC locks accounts out after a few refused logins: never insist
                        if kind is BmcUnreachable:
                            # Silence is retried once (a BMC may drop a burst); busy or erroring BMCs get every retry.
                            tries = min(tries, 2)
                        if attempt < tries:
                            await asyncio.sleep(delay * (1 + random.random()))
                            delay *= 2
            finally:
                self._in_flight[key] -= 1
        kind = _classify(last) if last is not None else BmcUnreachable
        tried = f"{attempt} {'try' if attempt == 1 else 'tries'}"
        raise kind(f"{where}: {_EXPLAIN[kind]} ({_words(last)}; {tried})")

    async def power(self, node: Node, op: str) -> str:
        """Apply or read the power state through IPMI."""
        if op not in POWER_OPS:
            raise ValueError(f"unknown power op {op!r}")
        if op == "status":
            result = await self._call(node, "power status", lambda c: c.get_power())
        else:
            state = {"cycle": "boot"}.get(op, op)
            result = await self._call(node, f"power {op}", lambda c: c.set_power(state, wait=False))
        if isinstance(result, dict):
            if "error" in result:
                raise PowerError(f"{node.name}: BMC answered {result['error']}")
            got = result.get("powerstate") or ("on" if op in ("on", "reset", "cycle") else "off")
            return str(got)
        return "on" if op in ("on", "reset", "cycle") else "off"

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Set the next boot device through IPMI (chassis bootdev)."""
        dev = {"network": "network", "pxe": "network", "disk": "hd", "hd": "hd"}[device]
        await self._call(node, f"bootdev {dev}", lambda c: c.set_bootdev(dev, persist=persistent))

    def close(self) -> None:
        """Stop the thread pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class _LoginFailed(Exception):
    """pyghmi could not set a session up (Command() raised): the BMC was silent, busy or refused the login."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(_words(cause))
        self.cause = cause


_EXPLAIN: dict[type[PowerError], str] = {
    BmcUnreachable: "unreachable, no answer",
    BmcAuthRefused: "authentication refused, not retried: check the credentials file",
    BmcSessionRefused: "session refused: the BMC has no free session slot",
    BmcTimedOut: "timed out: the BMC set a session up but did not answer the command",
    PowerError: "failed",
}


def _words(exc: BaseException | None) -> str:
    """pyghmi's message of a failure ('no answer' for the None it gives when a login saw no reply)."""
    if exc is None:
        return "no answer"
    text = str(exc.cause if isinstance(exc, _LoginFailed) else exc)
    return "no answer" if text in ("", "None") else text


def _classify(exc: BaseException) -> type[PowerError]:
    """Tell a silent BMC from one that refused the login, one that timed out on a command, and other errors."""
    text = _words(exc).lower()
    if any(w in text for w in _AUTH_REFUSED):
        return BmcAuthRefused
    if any(w in text for w in _SESSION_REFUSED):
        return BmcSessionRefused
    if isinstance(exc, _LoginFailed):
        # Silence during the login: nothing came back at all. Anything else (a busy BMC refusing a session) is an answer.
        return BmcUnreachable if text == "no answer" or any(w in text for w in _UNREACHABLE) else PowerError
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or any(w in text for w in _UNREACHABLE):
        return BmcTimedOut
    if isinstance(exc, OSError):
        return BmcUnreachable
    return PowerError


LOST_ERROR_WAIT_S = 1.0  # how long the login's real error may take to be written by pyghmi's other thread


def _lost_login_error(exc: BaseException, wait_s: float = LOST_ERROR_WAIT_S) -> Exception | None:
    """The real reason of a failed login that pyghmi lost to a race, or None when exc is not that race.

    pyghmi 1.6's `Session._mark_broken` calls `logout()`, which sets `broken`, before it sets `errormsg`; the
    thread that handled the BMC's answer (any thread in `wait_for_rsp` may) does this while the thread in
    `Session.__init__` polls `broken` and raises `IpmiException(self.errormsg)`: it can then read an
    `errormsg` not yet written and raise AttributeError instead of e.g. "Unauthorized name in RAKP2". The
    session is still in the traceback's `__init__` frame; its errormsg is written microseconds later.
    """
    if not (isinstance(exc, AttributeError) and "errormsg" in str(exc)):
        return None
    from pyghmi.ipmi.private.session import Session

    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        session = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if isinstance(session, Session):
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if hasattr(session, "errormsg"):
                    return Exception(str(session.errormsg))
                time.sleep(0.005)
            return None
        tb = tb.tb_next
    return None


def _forget_session(address: str, port: int) -> None:
    """Drop pyghmi's cached session of a BMC after a failure, so that a retry logs in anew.

    pyghmi keeps a session whose login failed in `Session.initting_sessions`, and hands it to the next
    Command for the same BMC and credentials: the retry then fails in seconds with "Session no longer
    connected" without sending anything.
    """
    from pyghmi.ipmi.private import session as ipmisession

    cls = ipmisession.Session
    for k in [k for k in list(cls.initting_sessions) if k[0] == address and k[3] == port]:
        cls.initting_sessions.pop(k, None)


class PowerByDriver:
    """Routes each node to the power driver its inventory entry names (ipmi today; ssh and none have no BMC)."""

    def __init__(self, drivers: dict[str, PowerDriver]) -> None:
        self._drivers = drivers

    def _for(self, node: Node) -> PowerDriver:
        driver = node.bmc.driver if node.bmc else "none"
        if driver not in self._drivers:
            raise PowerError(f"{node.name}: no BMC power control (bmc driver {driver!r})")
        return self._drivers[driver]

    async def power(self, node: Node, op: str) -> str:
        """Apply or read the power state with the node's driver."""
        return await self._for(node).power(node, op)

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Set the next boot device with the node's driver."""
        await self._for(node).set_boot_device(node, device, persistent)

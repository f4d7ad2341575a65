"""IPMI over LAN (RMCP+) through pyghmi's client, in a bounded thread pool (`power.ipmi_client: pyghmi`).

Not the default: at ~100 BMCs with failing ones among them, pyghmi's client deadlocks on its own session
locks, every pool thread blocked (docs/reliability.md, "BMCs"), and BMCs slower than its retransmission get
answers paired with the wrong requests. ipmitool_power is the default.

pyghmi blocks, so calls run in threads, one at a time per BMC. One at a time is pyghmi's limit, not a setting:
`pyghmi.ipmi.private.session.Session.__new__` hands every Command to the same BMC with the same credentials
the one cached session (keyed by the BMC's address, user, password and Kg), so a second session per BMC cannot
be had from one process, and two threads on one session hang.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from appliance.deploy.power import (
    BACKOFF_S,
    POWER_OPS,
    BmcAuthRefused,
    BmcSessionRefused,
    BmcTimedOut,
    BmcUnreachable,
    PowerError,
    RetriedBmcCalls,
)
from domain.nodes import BmcSpec, Node

# pyghmi's words when the BMC refused the login (RAKP errors, IPMI 2.0 table 13-15), as opposed to silence.
_AUTH_REFUSED = ("incorrect password", "unauthorized name", "invalid role", "unauthorized role", "invalid username",
                 "invalid integrity check", "wrong kg", "password is too long")
# pyghmi's words when the BMC refused to open a session at all (RMCP+ open session status 0x01 or 0x0b).
_SESSION_REFUSED = ("insufficient resources",)
# pyghmi's words for "nobody answered" (as opposed to a BMC that answered with an error).
_UNREACHABLE = ("no longer connected", "timeout", "timed out", "unable to establish", "unreachable", "no route")
LOST_ERROR_WAIT_S = 1.0  # how long the login's real error may take to be written by pyghmi's other thread

PyghmiRequest = Callable[[Any], object]  # a function of a pyghmi Command


class PyghmiPower(RetriedBmcCalls[PyghmiRequest]):
    """IPMI over LAN (RMCP+) through pyghmi, behind a thread pool, one call at a time per BMC."""

    def __init__(self, threads: int = 32, retries: int = 3, backoff_s: float = BACKOFF_S) -> None:
        super().__init__(retries, backoff_s)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipmi")
        self._commands: dict[tuple[str, int], Any] = {}  # pyghmi Command per BMC

    async def _try(self, bmc: BmcSpec, user: str, password: str, request: PyghmiRequest) -> object:
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
                return request(cmd)
            except Exception:
                self._commands.pop(key, None)
                _forget_session(bmc.address, bmc.port)
                raise

        # No timeout of ours around the thread: pyghmi times out on its own (a silent BMC fails in seconds),
        # and a call abandoned while its thread runs on would let a retry reset the node twice, the late reset
        # landing in the middle of the deployment.
        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    def _classify(self, exc: BaseException) -> type[PowerError]:
        return _classify(exc)

    def _words(self, exc: BaseException | None) -> str:
        return _words(exc)

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

"""Power drivers: one interface (on/off/reset/cycle/status, next boot device), the error classes every IPMI
client reports in, and what every client shares: retries with backoff, one call at a time per BMC, a refused
login never retried with the same credentials.

The IPMI clients themselves live beside this module: `ipmitool_power` (the default: one ipmitool process a
call) and `pyghmi_power` (pyghmi's RMCP+ client in threads; it deadlocks at ~100 BMCs with failing ones
among them, see docs/reliability.md "BMCs").
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Generic, Protocol, TypeVar

from appliance.inventory import read_bmc_credentials
from domain.errors import RackbootError
from domain.latency import TRANSFER_BUCKETS, Latency
from domain.logfields import fields
from domain.nodes import BmcSpec, Node

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


class BmcClientMissing(PowerError):
    """The IPMI client program is not on this host: no try can do better, so the call ends at the first."""


PER_BMC = 1  # calls in flight per BMC: a BMC has a handful of session slots, and pyghmi cannot do more (pyghmi_power)
BACKOFF_S = 0.5  # before the first retry; doubled for each next one, with up to 100 % jitter

EXPLAIN: dict[type[PowerError], str] = {
    BmcUnreachable: "unreachable, no answer",
    BmcAuthRefused: "authentication refused, not retried: check the credentials file",
    BmcSessionRefused: "session refused: the BMC has no free session slot",
    BmcTimedOut: "timed out: the BMC set a session up but did not answer the command",
    BmcClientMissing: "the IPMI client is not installed on the appliance, not retried",
    PowerError: "failed",
}
# The result of a call, as /metrics counts it (rackboot_bmc_calls_<result>).
RESULT = {BmcUnreachable: "unreachable", BmcAuthRefused: "auth_refused", BmcSessionRefused: "session_refused",
          BmcTimedOut: "timed_out", BmcClientMissing: "failed", PowerError: "failed"}


class PowerDriver(Protocol):
    """What the controller needs from a node's BMC."""

    async def power(self, node: Node, op: str) -> str:
        """Apply on/off/reset/cycle, or read the state; return 'on' or 'off' (the state after the op)."""

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Set the next boot device ('network' or 'disk'), for the next boot only unless persistent."""


Request = TypeVar("Request")


class RetriedBmcCalls(Generic[Request]):
    """The retry discipline of an IPMI client; a client says how to make one try and what its failures mean.

    A call is tried at most retries + 1 times; silence (BmcUnreachable) at most twice; a refused login
    (BmcAuthRefused) once, and not again with the same credentials until the credentials file changes. One call
    at a time per BMC (PER_BMC). `attempts` counts the tries per BMC and `most_in_flight` the most calls one BMC
    had at once, for the tests and the metrics.
    """

    def __init__(self, retries: int = 3, backoff_s: float = BACKOFF_S) -> None:
        self._sems: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._retries = retries
        self._backoff_s = backoff_s
        self.attempts: Counter[tuple[str, int]] = Counter()
        self.most_in_flight: Counter[tuple[str, int]] = Counter()
        self._in_flight: Counter[tuple[str, int]] = Counter()
        # BMC -> (credentials, the client's words) of a refused login: not tried again until the credentials file changes
        self._refused: dict[tuple[str, int], tuple[tuple[str, str], str]] = {}
        self.results: Counter[str] = Counter()  # calls by result: ok, or a RESULT value
        # How long calls took (all their tries), ok and failed apart: a BMC that fails is slow to fail.
        self.latency = {"call_ok": Latency(TRANSFER_BUCKETS), "call_failed": Latency(TRANSFER_BUCKETS)}

    def stats(self) -> dict[str, int]:
        """Calls by result, tries, and calls in flight (for /metrics; no address, no credential)."""
        return ({f"calls_{r}": self.results[r] for r in ("ok", *dict.fromkeys(RESULT.values()))}
                | {"tries": sum(self.attempts.values()), "calls_in_flight": sum(self._in_flight.values())})

    async def _try(self, bmc: BmcSpec, user: str, password: str, request: Request) -> object:
        """Make one try of a request on a BMC; return the client's answer, raise its failure."""
        raise NotImplementedError

    def _classify(self, exc: BaseException) -> type[PowerError]:
        """Which PowerError a failure of one try is."""
        raise NotImplementedError

    def _words(self, exc: BaseException | None) -> str:
        """The client's message of a failure, for the node's error (never a password)."""
        return "no answer" if exc is None else str(exc) or type(exc).__name__

    def _telling(self, new: BaseException, last: BaseException | None) -> bool:
        """Whether a try's failure says more than the one kept so far (the one reported at the end): a retry may
        only meet what the first try left behind (pyghmi's stale session of a failed login)."""
        return last is None or self._classify(new) is not PowerError or self._classify(last) is PowerError

    async def _call(self, node: Node, what: str, request: Request) -> object:
        """Run a request on the node's BMC with the retry discipline; raise the PowerError of the telling failure."""
        if node.bmc is None:
            raise PowerError(f"{node.name}: no BMC in the inventory")
        bmc = node.bmc
        user, password = read_bmc_credentials(bmc)
        key = (bmc.address, bmc.port)
        where = f"{node.name}: BMC {bmc.address}:{bmc.port} {what}"
        delay = self._backoff_s
        last: BaseException | None = None
        tries = self._retries + 1
        sem = self._sems.setdefault(key, asyncio.Semaphore(PER_BMC))
        async with sem:
            refused = self._refused.get(key)  # looked at once the calls before this one on the BMC have ended
            if refused is not None and refused[0] == (user, password):
                self.results[RESULT[BmcAuthRefused]] += 1
                self.latency["call_failed"].observe(0.0)
                raise BmcAuthRefused(f"{where}: {EXPLAIN[BmcAuthRefused]} ({refused[1]}; not tried again with the same credentials)")
            self._in_flight[key] += 1
            self.most_in_flight[key] = max(self.most_in_flight[key], self._in_flight[key])
            started = time.monotonic()
            try:
                attempt = 0
                while attempt < tries:
                    attempt += 1
                    self.attempts[key] += 1
                    try:
                        answer = await self._try(bmc, user, password, request)
                        self.results["ok"] += 1
                        self.latency["call_ok"].observe(time.monotonic() - started)
                        return answer
                    except Exception as exc:  # noqa: BLE001 - clients raise bare exceptions
                        kind = self._classify(exc)
                        if self._telling(exc, last):
                            last = exc
                        log.debug("%s: %s failed (attempt %d, %s): %s", node.name, what, attempt, kind.__name__, self._words(exc),
                                  extra=fields(node=node.name, mac=node.mac))
                        if kind is BmcAuthRefused:
                            self._refused[key] = ((user, password), self._words(exc))
                            break  # a BMC locks accounts out after a few refused logins: never insist
                        if kind is BmcClientMissing:
                            break
                        if kind is BmcUnreachable:
                            # Silence is retried once (a BMC may drop a burst); busy or erroring BMCs get every retry.
                            tries = min(tries, 2)
                        if attempt < tries:
                            await asyncio.sleep(delay * (1 + random.random()))
                            delay *= 2
            finally:
                self._in_flight[key] -= 1
        kind = self._classify(last) if last is not None else BmcUnreachable
        self.results[RESULT[kind]] += 1
        self.latency["call_failed"].observe(time.monotonic() - started)
        tried = f"{attempt} {'try' if attempt == 1 else 'tries'}"
        raise kind(f"{where}: {EXPLAIN[kind]} ({self._words(last)}; {tried})")


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

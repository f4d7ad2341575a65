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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from appliance.inventory import read_bmc_credentials
from domain.errors import RackbootError
from domain.nodes import Node

log = logging.getLogger("rackboot.power")

POWER_OPS = ("on", "off", "reset", "cycle", "status")


class PowerError(RackbootError):
    """A BMC did not do what was asked (unreachable, refused, timed out)."""


class BmcUnreachable(PowerError):
    """The BMC does not answer at all: no other call to it will do better in this deployment."""


# pyghmi's words for "nobody answered" (as opposed to a BMC that answered with an error).
_UNREACHABLE = ("no longer connected", "timeout", "timed out", "unable to establish", "unreachable", "no route")


class PowerDriver(Protocol):
    """What the controller needs from a node's BMC."""

    async def power(self, node: Node, op: str) -> str:
        """Apply on/off/reset/cycle, or read the state; return 'on' or 'off' (the state after the op)."""

    async def set_boot_device(self, node: Node, device: str, persistent: bool = False) -> None:
        """Set the next boot device ('network' or 'disk'), for the next boot only unless persistent."""


class IpmiPower:
    """IPMI over LAN (RMCP+) through pyghmi, behind a thread pool, one call at a time per BMC."""

    def __init__(self, threads: int = 32, retries: int = 3) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ipmi")
        self._sems: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._commands: dict[tuple[str, int], Any] = {}  # pyghmi Command per BMC
        self._retries = retries

    def _sem(self, node: Node) -> asyncio.Semaphore:
        assert node.bmc is not None
        key = (node.bmc.address, node.bmc.port)
        if key not in self._sems:
            self._sems[key] = asyncio.Semaphore(1)
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
                cmd = self._commands[key] = Command(bmc=bmc.address, userid=user, password=password, port=bmc.port, keepalive=True)
            try:
                return fn(cmd)
            except Exception:
                self._commands.pop(key, None)
                raise

        loop = asyncio.get_running_loop()
        delay = 0.5
        last: Exception | None = None
        tries = self._retries + 1
        async with self._sem(node):
            attempt = 0
            while attempt < tries:
                attempt += 1
                try:
                    # No timeout of ours around the thread: pyghmi times out on its own (a silent BMC fails in
                    # seconds), and a call abandoned while its thread runs on would let a retry reset the node
                    # twice, the late reset landing in the middle of the deployment.
                    return await loop.run_in_executor(self._pool, run)
                except Exception as exc:  # noqa: BLE001 - pyghmi raises bare exceptions
                    last = exc
                    log.debug("%s: %s failed (attempt %d): %s", node.name, what, attempt, exc)
                    if _is_unreachable(exc):
                        # Silence is retried once (a BMC may drop a burst); busy or erroring BMCs get every retry.
                        tries = min(tries, 2)
                    if attempt < tries:
                        await asyncio.sleep(delay * (1 + random.random()))
                        delay *= 2
        message = f"{node.name}: BMC {bmc.address}:{bmc.port} {what} failed after {attempt} tries: {last or 'timeout'}"
        raise (BmcUnreachable if last is None or _is_unreachable(last) else PowerError)(message)

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


def _is_unreachable(exc: BaseException) -> bool:
    """Tell whether a pyghmi failure means the BMC did not answer at all."""
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, OSError)) or any(w in str(exc).lower() for w in _UNREACHABLE)


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

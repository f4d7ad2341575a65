"""A farm of misbehaving IPMI BMCs for the BMC-failure tests: the vm-testbed's pyghmi BMCs (vmtestbed/bmc.py) in a
child process, each on its own loopback address, some of them healthy, slow, refusing or dead.

Run as `python tests/bmc_farm.py SPEC.json`; SPEC is a list of {"address", "port", "kind", "user", "password",
"delay"}. Kinds: ok; slow (answers every command after `delay` s); badpass (knows the user with another
password: RAKP 2 does not verify); noname (refuses the user: RAKP 2 status 0x0d, Unauthorized name); busy
(refuses every session: open-session status 0x01, no session slot); dead (a bound socket that never answers).
The child prints "ready" once every socket is bound, then one JSON line of counters for every line read on
stdin: per address, datagrams, open-session requests and commands received, and the most commands it held
unanswered at once. It exits when stdin closes, so it never outlives the test. A fake: tests only.
"""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from collections import Counter
from typing import Any

import pyghmi.ipmi.private.serversession as serversession

from vmtestbed.bmc import BmcFarm, VirtualBmc, _CipherSuite3Session

RMCP_NO_SLOT = 0x01  # IPMI 2.0 table 13-15: insufficient resources to create a session
RMCP_UNAUTHORIZED_NAME = 0x0D


class FakeNode:
    """What a VirtualBmc drives: power state and the next boot device (no firmware behind it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.power = "on"
        self.bootdev = "disk"
        self.bootdev_persistent = False
        self.resets = 0
        self.plan = type("Plan", (), {"firmware": "bios"})()

    def power_on(self) -> None:
        """Power on."""
        self.power = "on"

    def power_off(self) -> None:
        """Power off."""
        self.power = "off"

    def reset(self) -> None:
        """Hard reset."""
        self.resets += 1

    def set_boot_device(self, device: str, persistent: bool) -> None:
        """Next boot device."""
        self.bootdev, self.bootdev_persistent = device, persistent


class _Busy(_CipherSuite3Session):
    """A server session that refuses at the open-session step: no session slot (status 0x01)."""

    def create_open_session_response(self, request: bytearray) -> bytearray:
        """Open session response with status 0x01."""
        req = bytearray(request)
        self.clientsessionid = req[4:8]
        return bytearray([req[0], RMCP_NO_SLOT, 0, 0]) + req[4:8]


class _NoName(_CipherSuite3Session):
    """A server session that refuses the user at RAKP 2 (status 0x0d, Unauthorized name)."""

    def _got_rakp1(self, data: Any) -> None:
        self.send_payload(bytearray([data[0], RMCP_UNAUTHORIZED_NAME, 0, 0]) + self.clientsessionid,
                          serversession.constants.payload_types["rakp2"], retry=False)


REFUSING = {"busy": _Busy, "noname": _NoName}


class CountingBmc(VirtualBmc):
    """A VirtualBmc that counts datagrams, session opens and commands, and may refuse sessions."""

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.counts: Counter[str] = Counter()
        self.held = 0
        self.lock = threading.Lock()

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        """Count open-session requests; refuse them as the kind says."""
        d = bytearray(data)
        if len(d) >= 22 and d[0] == 6 and d[2:4] == b"\xff\x07" and d[4] == 6 and d[5] == 16:
            self.counts["open_session"] += 1
            if self.kind in REFUSING:
                REFUSING[self.kind](self.authdata, self.kg, sockaddr, self.serversocket, d[16:], self.uuid, bmc=self)
                return
        super().sessionless_data(data, sockaddr)

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        """Count commands and how many are held unanswered at once (slow BMCs hold them for `slow_s`)."""
        with self.lock:
            self.counts["commands"] += 1
            self.held += 1
            self.counts["max_held"] = max(self.counts["max_held"], self.held)
        if self.slow_s:
            threading.Timer(self.slow_s, self._answer, (request, session)).start()
        else:
            self._answer(request, session)

    def _answer(self, request: dict[str, Any], session: Any) -> None:
        try:
            super(VirtualBmc, self).handle_raw_request(request, session)
        finally:
            with self.lock:
                self.held -= 1


async def main(spec: list[dict[str, Any]]) -> None:
    """Serve the farm until stdin closes."""
    loop = asyncio.get_running_loop()
    farm = BmcFarm(loop)
    bmcs: dict[str, CountingBmc] = {}
    dead: dict[str, socket.socket] = {}
    for i, b in enumerate(spec):
        if b["kind"] == "dead":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((b["address"], b["port"]))
            dead[b["address"]] = sock
            continue
        password = b["password"] + "-not" if b["kind"] == "badpass" else b["password"]
        bmc = CountingBmc(b["kind"], FakeNode(f"n{i}"), b["address"], {b["user"]: password}, loop,
                          b.get("delay", 0.0) if b["kind"] == "slow" else 0.0, b["port"])
        farm.bmcs[b["address"]] = bmc
        bmcs[b["address"]] = bmc
    farm.wake()
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        out: dict[str, dict[str, int]] = {a: dict(b.counts) for a, b in bmcs.items()}
        for address, sock in dead.items():
            n = 0
            while True:
                try:
                    sock.recv(4096, socket.MSG_DONTWAIT)
                    n += 1
                except BlockingIOError:
                    break
            out[address] = {"datagrams": n}
        for address, bmc in bmcs.items():
            out[address]["resets"] = bmc.node.resets  # type: ignore[attr-defined]
        print(json.dumps(out), flush=True)
    farm.close()
    for sock in dead.values():
        sock.close()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(main(json.load(f)))

"""Virtual BMCs: pyghmi's IPMI-over-LAN server (RMCP+, lanplus), one per node, thousands in one process.

Each BMC listens on its own management address, port 623, and drives its node's power and next boot
device. pyghmi keeps its I/O in module-level state served by one thread; four of its limits are worked
around here, in one place (install_many_bmc_support):
  - its threads flip the shared sockets between blocking and non-blocking mode, so the I/O thread can
    end up blocked in recvfrom on a quiet socket and every BMC goes silent: reads use MSG_DONTWAIT;
  - its I/O thread calls select(), which cannot watch descriptors above 1023: a poll(2) stand-in;
  - it keys server sessions by client address and local *port*, so one client socket talking to two
    BMCs (pyghmi's client shares sockets) would mix their sessions: the key becomes (local address, port);
  - its I/O thread only watches the sockets that existed when it last woke: the farm wakes it with a
    datagram shorter than 4 bytes (which pyghmi discards) after adding BMCs (field notes).
The base class ignores the persistent and EFI bits of the boot flags; VirtualBmc keeps them (IPMI 2.0
table 28-14, boot option parameter 5). pyghmi's server answers every RMCP+ open session request with
cipher suite 3 whatever was proposed; pyghmi's own client proposes SHA-256 first and cannot use that
answer, so a proposal other than suite 3 is refused (status 0x11) and the client falls back to SHA-1.
"""
from __future__ import annotations

import asyncio
import logging
import select as _select
import socket
import threading
from typing import Any, Callable

import pyghmi.ipmi.bmc as pyghmi_bmc
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession

from vmtestbed.firmware import VirtualNode

log = logging.getLogger("rackboot.testbed.bmc")
IPMI_PORT = 623
CC_OK = 0x00
CC_NOT_IN_PRESENT_STATE = 0xD5  # IPMI 2.0 table 5-2: command not supported in present state
CC_INVALID_DATA = 0xCC
# Boot device selector, IPMI 2.0 table 28-14, parameter 5 data 2 bits [5:2]
BOOTDEV_CODES = {"default": 0x0, "pxe": 0x1, "disk": 0x2}
BOOTDEV_NAMES = {0x0: "default", 0x1: "pxe", 0x2: "disk"}


class _PollSelect:
    """Stands in for the select module inside pyghmi's session code: poll(2) has no FD_SETSIZE limit."""

    def __init__(self) -> None:
        self.ready: set[int] = set()

    def select(self, rlist: list[Any], wlist: Any, xlist: Any, timeout: float | None = None) -> tuple[list[Any], list[Any], list[Any]]:
        """Wait until one of rlist is readable; remember which, for the graball below."""
        poller = _select.poll()
        by_fd = {}
        for sock in rlist:
            fd = sock.fileno()
            if fd >= 0:
                by_fd[fd] = sock
                poller.register(fd, _select.POLLIN)
        events = poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
        self.ready = {fd for fd, _ in events}
        return [by_fd[fd] for fd, _ in events if fd in by_fd], [], []

    def __getattr__(self, name: str) -> Any:
        return getattr(_select, name)


_poll_select = _PollSelect()


def _io_graball(mysockets: list[Any], iowaiters: dict[Any, Any]) -> list[Any]:
    """pyghmi's session._io_graball, reading only the sockets poll() reported, with sessions keyed by (address, port)."""
    sockaddrs = []
    ready = _poll_select.ready
    for mysocket in mysockets:
        if ready and mysocket.fileno() not in ready:
            continue
        while True:
            rdata = ipmisession._io_recvfrom(mysocket, 3000)
            if rdata is None:
                break
            if len(rdata[0]) < 4:  # a wake-up datagram
                continue
            myport = _session_key(mysocket)
            rdata = rdata + (mysocket,)
            relsession = None
            if rdata[1] in ipmisession.Session.bmc_handlers and myport in ipmisession.Session.bmc_handlers[rdata[1]]:
                rdata = rdata + (True,)
                relsession = ipmisession.Session.bmc_handlers[rdata[1]][myport]
            elif rdata[2] in ipmisession.Session.bmc_handlers:
                rdata = rdata + (False,)
                relsession = ipmisession.Session.bmc_handlers[rdata[2]][0]
            if relsession is not None:
                relsession.pktqueue.append(rdata)
                ipmisession.sessionqueue.append(relsession)
            if rdata[1] in iowaiters:
                for w in iowaiters[rdata[1]]:
                    w[1].set()
                del iowaiters[rdata[1]]
            sockaddrs.append(rdata[1])
    _poll_select.ready = set()
    return sockaddrs


def _io_recvfrom(sock: Any, size: int) -> tuple[bytes, Any] | None:
    """pyghmi's session._io_recvfrom without switching the socket to non-blocking mode.

    pyghmi flips the shared socket's blocking mode: setblocking(0) before each read in the I/O
    thread, setblocking(1) before each send in the dispatcher. When a send lands between the two,
    the I/O thread blocks in recvfrom on a quiet BMC socket and every BMC of the process goes silent.
    MSG_DONTWAIT makes each read non-blocking by itself.
    """
    try:
        return sock.recvfrom(size, socket.MSG_DONTWAIT)
    except OSError:
        return None


def _io_sendto(sock: Any, packet: bytes, sockaddr: Any) -> None:
    """pyghmi's session._io_sendto without touching the socket's blocking mode (see _io_recvfrom)."""
    try:
        sock.sendto(packet, sockaddr)
    except Exception:  # as pyghmi: a datagram that cannot be sent is lost, the peer retransmits
        pass


def _session_key(sock: Any) -> Any:
    """The key of a BMC's sessions: (address, port) of its socket; pyghmi uses the port alone."""
    name = sock.getsockname()
    return (name[0], name[1])


_installed = False


def install_many_bmc_support() -> None:
    """Patch pyghmi's session module for many BMCs in one process (see the module docstring); idempotent.

    pyghmi's IPMI *client* no longer works in a process so patched (its answers are never matched): the
    appliance's client runs in `rackboot serve`, never beside a farm; tests that drive the client in-process run
    before any test that serves BMCs in-process (tests/conftest.py)."""
    global _installed
    if _installed:
        return
    ipmisession.select = _poll_select
    ipmisession._io_graball = _io_graball
    ipmisession._io_recvfrom = _io_recvfrom
    ipmisession._io_sendto = _io_sendto
    _installed = True


RMCP_NO_CIPHER_SUITE_MATCH = 0x11  # IPMI 2.0 table 13-15


class _CipherSuite3Session(serversession.ServerSession):
    """A server session that refuses proposals other than cipher suite 3 instead of ignoring them."""

    def create_open_session_response(self, request: bytearray) -> bytearray:
        """Answer an RMCP+ Open Session Request (IPMI 2.0 sec. 13.17): suite 3 or a refusal."""
        req = bytearray(request)
        # Algorithms proposed (table 13-16): authentication at byte 12, integrity at 20, confidentiality at 28.
        if len(req) >= 32 and (req[12], req[20], req[28]) != (1, 1, 1):
            self.clientsessionid = req[4:8]
            return bytearray([req[0], RMCP_NO_CIPHER_SUITE_MATCH, 0, 0]) + req[4:8]
        return super().create_open_session_response(request)

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        """A packet queued for this session after its client address was dropped: hand it to the BMC.

        pyghmi's process_pktqueue calls this on the session when the session's entry went away between
        its I/O thread queueing the packet and the dispatcher handling it; ServerSession has no such method.
        """
        self.bmc.sessionless_data(data, sockaddr)


class VirtualBmc(pyghmi_bmc.Bmc):
    """The BMC of one virtual node; IPMI handlers run on pyghmi's thread and act on the node in its event loop."""

    def __init__(self, node: VirtualNode, address: str, users: dict[str, str], loop: asyncio.AbstractEventLoop, slow_s: float = 0.0,
                 port: int = IPMI_PORT) -> None:
        super().__init__(users, port=port, address=address)
        self.port = _session_key(self.serversocket)  # type: ignore[assignment]  # see _session_key
        self.node = node
        self.loop = loop
        self.slow_s = slow_s
        self.commands = 0
        self._pending: str | None = None

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        """Open RMCP+ sessions with _CipherSuite3Session; everything else as pyghmi does."""
        d = bytearray(data)
        # RMCP (byte 0 = 6, class IPMI 0x07), auth type 6 = RMCP+, payload type 16 = open session request.
        if len(d) >= 22 and d[0] == 6 and d[2:4] == b"\xff\x07" and d[4] == 6 and d[5] == 16:
            _CipherSuite3Session(self.authdata, self.kg, sockaddr, self.serversocket, d[16:], self.uuid, bmc=self)
            return
        super().sessionless_data(data, sockaddr)

    def _request(self, fn: Callable[[], Any], expect: str | None = None) -> None:
        """Hand a power action to the nodes' event loop without waiting for it.

        The BMC answers at once, as a real one does, however busy the loop is; until the loop has acted,
        power status reports the state asked for (`power on; power status` says on).
        """
        self._pending = expect

        def apply() -> None:
            try:
                fn()
            finally:
                if self._pending == expect:
                    self._pending = None

        self.loop.call_soon_threadsafe(apply)

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        """Count, delay when the BMC is slow (fault), then dispatch like pyghmi's Bmc."""
        self.commands += 1
        if self.slow_s:
            threading.Timer(self.slow_s, super().handle_raw_request, (request, session)).start()
            return
        super().handle_raw_request(request, session)

    def get_power_state(self) -> str:
        """Chassis power: on or off (or what was just asked for, until the node has acted)."""
        return self._pending or self.node.power

    def power_on(self) -> int:
        """Power on (no-op when on)."""
        self._request(self.node.power_on, "on")
        return CC_OK

    def power_off(self) -> int:
        """Hard power off."""
        self._request(self.node.power_off, "off")
        return CC_OK

    def power_shutdown(self) -> int:
        """Soft off: the virtual OS goes down at once."""
        return self.power_off()

    def power_reset(self) -> int:
        """Hard reset; refused when the node is off, like real BMCs."""
        if self.get_power_state() == "off":
            return CC_NOT_IN_PRESENT_STATE
        self._request(self.node.reset)
        return CC_OK

    def power_cycle(self) -> int:
        """Power off, then on again one second later; refused when the node is off."""
        if self.get_power_state() == "off":
            return CC_NOT_IN_PRESENT_STATE

        def cycle() -> None:
            self.node.power_off()
            self.loop.call_later(1.0, self.node.power_on)

        self._request(cycle)
        return CC_OK

    def pulse_diag(self) -> int:
        """NMI: the virtual node ignores it."""
        return CC_OK

    def cold_reset(self) -> int:
        """BMC cold reset: nothing to restart in a virtual BMC."""
        return CC_OK

    def get_boot_device(self) -> str:
        """The next boot device, in pyghmi's names."""
        return {"pxe": "network", "disk": "hd"}.get(self.node.bootdev, "default")

    def get_system_boot_options(self, request: dict[str, Any], session: Any) -> None:
        """Boot flags (parameter 5) with the valid and persistent bits; other parameters as pyghmi does."""
        if request["data"][0] != 5:
            return super().get_system_boot_options(request, session)
        persistent = self.node.bootdev_persistent
        flags1 = 0x80 | (0x40 if persistent else 0) | (0x20 if self.node.plan.firmware.startswith("uefi") else 0)
        flags2 = BOOTDEV_CODES.get(self.node.bootdev, 0) << 2
        session.send_ipmi_response(data=[1, 5, flags1, flags2, 0, 0, 0])

    def set_system_boot_options(self, request: dict[str, Any], session: Any) -> None:
        """Set the boot flags (parameter 5): device from data 2 bits [5:2], persistent from data 1 bit 6."""
        data = request["data"]
        if data[0] != 5:
            return super().set_system_boot_options(request, session)
        if len(data) < 3:
            session.send_ipmi_response(code=CC_INVALID_DATA)
            return
        valid, persistent = bool(data[1] & 0x80), bool(data[1] & 0x40)
        device = BOOTDEV_NAMES.get((data[2] >> 2) & 0x0F)
        if device is None:
            session.send_ipmi_response(code=CC_INVALID_DATA)
            return
        if not valid:
            device, persistent = "default", False
        self.node.set_boot_device(device, persistent)  # two attribute writes: safe from this thread
        session.send_ipmi_response()


class BmcFarm:
    """Every BMC of a testbed, served by pyghmi's I/O thread and one dispatcher thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        install_many_bmc_support()
        self.loop = loop
        self.bmcs: dict[str, VirtualBmc] = {}
        # The first socket pyghmi makes is the one its threads wake up through; make it a dual-stack
        # socket on an ephemeral port (BMC sockets are bound to IPv4 management addresses).
        self._wake = ipmisession.Session._assignsocket()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._dispatch, name="ipmi-dispatch", daemon=True)
        self._thread.start()

    def add(self, node: VirtualNode, address: str, users: dict[str, str], slow_s: float = 0.0, port: int = IPMI_PORT) -> VirtualBmc:
        """Create and bind the BMC of a node (call wake() after a batch)."""
        bmc = VirtualBmc(node, address, users, self.loop, slow_s, port)
        self.bmcs[node.name] = bmc
        return bmc

    def wake(self) -> None:
        """Make pyghmi's I/O thread pick up the sockets added since it last woke."""
        try:
            self._wake.sendto(b"\x01", (ipmisession.myself, self._wake.getsockname()[1]))
        except OSError as exc:
            log.warning("cannot wake the IPMI I/O thread: %s", exc)

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                ipmisession.Session.wait_for_rsp(timeout=1)
            except Exception:  # one bad packet must not stop every BMC
                log.exception("IPMI dispatch")

    def close(self) -> None:
        """Stop dispatching and close the BMC sockets."""
        self._stop.set()
        for bmc in self.bmcs.values():
            try:
                bmc.serversocket.close()
            except OSError:
                pass

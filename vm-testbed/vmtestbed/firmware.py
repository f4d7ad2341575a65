"""A virtual node: power state, POST, a PXE ROM and iPXE on the wire, then a deploy environment or the installed system.

On power-on the node waits out its POST, then does what real firmware does, packet for packet:
  PXE ROM  DHCP DISCOVER/REQUEST (options 93/94/97/60, flags=0: replies come unicast to an address the
           node does not have yet, so they are read off a raw socket), then the address is configured and
           the NBP is fetched over TFTP (blksize/windowsize, OVMF's size probe for UEFI nodes);
  iPXE     a second DHCP with user class "iPXE" (option 77), its per-MAC script over HTTP, interpreted
           (vmtestbed.ipxe_script), kernel and initrd downloaded over HTTP;
  OS       a booted kernel is the deploy environment: the keys come out of the initrd it downloaded
           (vmtestbed.deploy_env) and the real deploy agent (broadcast.agent.DeployAgent) runs with the
           node's sockets, its sparse disk and its work dir, calls back with its one-time token and takes
           the appliance's SSH commands; its kexec and reboot hooks restart this node, never the host.
           A local boot (sanboot/exit, or a kexec) finds what a deployment installed (the deploy
           partition's files, kept in the work dir as ROOT/etc/rackboot/deployed.json tells) and the
           installed system calls back with the environment it runs and the node's token.
Failures fall through like real firmware: timeouts and retries, then the next boot device, then a halt.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import urllib.parse
import uuid as uuidlib
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable

import aiohttp

from domain.nodes import mac_slug
from domain.errors import BindError
from broadcast.agent import AgentConfig, DeployAgent
from broadcast.builtin import BuiltinAnswer
from broadcast.errors import AgentError
from vmtestbed import wire
from vmtestbed.deploy_env import DeployKeys, InitrdError, read_deploy_keys
from vmtestbed.faults import NodeFaults, draw_post_delay
from vmtestbed.ipxe_script import FetchError, Interpreter, Outcome, SCRIPT_MAGIC
from vmtestbed.nodenet import NodeNetwork
from vmtestbed.plan import NodePlan
from vmtestbed.tftp_client import TftpSettings, TransferStats, tftp_get

log = logging.getLogger("rackboot.testbed.node")

DEPLOYED_STAMP = "etc/rackboot/deployed.json"  # written by the appliance's post-install (agent_driver)
AGENT_SSH_PORT = 22
AGENT_DATA_PORT = 7070
USER_AGENT = "iPXE/1.0.0+ (rackboot vm-testbed)"

# DHCP retransmission schedules (seconds to wait for each attempt).
PXE_DHCP_TIMEOUTS = (4.0, 8.0, 16.0, 32.0)   # PXE spec 2.1 sec. 2.2.1: 4, 8, 16, 32 s, then PXE-E51
IPXE_DHCP_TIMEOUTS = (1.0, 2.0, 4.0, 8.0)    # iPXE's DHCP backs off from 1 s and gives up after ~15 s
OS_DHCP_TIMEOUTS = (3.0, 6.0, 12.0, 24.0)


DIE_AFTER_BYTES = 1 << 20  # die@broadcast: the node dies after this much of the stream


class _Died(Exception):
    """The node hit a fault that kills it: it stays powered on and silent."""


@dataclass(frozen=True)
class FirmwareSettings:
    """Timings and knobs shared by every node of a testbed."""

    appliance_url: str
    post: tuple[str, float, float] = ("fixed", 1.0, 0.0)
    ipxe_init_s: float = 0.2
    kernel_boot_s: float = 0.5
    os_boot_s: float = 1.0
    tftp: TftpSettings = field(default_factory=TftpSettings)
    nbp_attempts: int = 3
    boot_retry_s: float = 20.0   # 0: halt at "no bootable device", like a BIOS without boot retry
    seed: int = 0
    builtin_true: bool = False  # the deploy agents answer `true` and `:` in process (builtin_true below)


@dataclass(frozen=True)
class Lease:
    """What a DHCP exchange gave the node."""

    ip: str
    prefixlen: int
    server: str
    next_server: str
    bootfile: str
    hostname: str
    router: str | None


def builtin_true(command: str) -> BuiltinAnswer | None:
    """A deploy agent's in-process answer to exactly `true` or `:` (status 0, no output); None for any other command."""
    return BuiltinAnswer(0) if command in ("true", ":") else None


def installed_identity(root: Path) -> dict[str, Any] | None:
    """Return what a deployment stamped into the installed root ({env, sha256, token, callback}), or None."""
    try:
        data = json.loads((root / DEPLOYED_STAMP).read_text())
    except OSError:
        return None
    except ValueError:
        return {"env": "unreadable"}
    return dict(data) if isinstance(data, dict) else {"env": "unreadable"}


def installed_authorized_keys(root: Path) -> tuple[str, ...]:
    """Return the keys root's SSH accepts in the installed system (root/.ssh/authorized_keys)."""
    try:
        text = (root / "root/.ssh/authorized_keys").read_text()
    except OSError:
        return ()
    return tuple(line for line in text.splitlines() if line.strip() and not line.startswith("#"))


class VirtualNode:
    """One virtual node: powered by its BMC, booting through the appliance, observable by status()."""

    def __init__(self, plan: NodePlan, faults: NodeFaults, disk: Path, workdir: Path, settings: FirmwareSettings,
                 netlink_pool: ThreadPoolExecutor) -> None:
        self.plan = plan
        self.name = plan.name
        self.mac = plan.mac
        self.faults = faults
        self.disk = disk
        self.workdir = workdir  # the agent's work dir; workdir/root stands for the deploy partition's files
        self.settings = settings
        self.net = NodeNetwork(plan.namespace, "eth0", netlink_pool)
        self.uuid = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"rackboot-testbed:{plan.namespace}")
        self.rng = random.Random(f"{settings.seed}:{plan.name}")
        self.power = "off"
        self.stage = "off"
        self.detail = ""
        self.since = time.time()
        self.boots = 0
        self.ip: str | None = None
        self.bootdev = "default"        # default | pxe | disk (set through the BMC)
        self.bootdev_persistent = False
        self.booted_once = False
        self.counters: dict[str, int] = {"dhcp_sent": 0, "dhcp_received": 0, "lost": 0, "tftp_retransmits": 0, "callbacks": 0}
        self.history: deque[tuple[float, str, str]] = deque(maxlen=40)
        self.callback_replies: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._boots: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()  # every boot task started, stale ones too
        self._http: aiohttp.ClientSession | None = None
        self._ssh: asyncio.AbstractServer | None = None
        self._agent: DeployAgent | None = None
        self._cleanup: asyncio.Task[None] | None = None
        self._boot_t0 = 0.0
        self._interpreter_settings: dict[str, str] = {}

    # ---- power, as the BMC drives it -------------------------------------------------------------

    def power_on(self) -> bool:
        """Power on; return False when already on."""
        if self.power == "on":
            return False
        self.power = "on"
        self._start()
        return True

    def power_off(self) -> bool:
        """Cut the power at once; return False when already off."""
        if self.power == "off":
            return False
        self.power = "off"
        self._stop()
        self._set("off")
        return True

    def reset(self) -> bool:
        """Hard reset (power stays on); return False when the node is off (IPMI: not in present state)."""
        if self.power == "off":
            return False
        self._stop()
        self._start()
        return True

    def set_boot_device(self, device: str, persistent: bool) -> None:
        """Select the next boot device (pxe, disk or default), once or until changed."""
        self.bootdev = device
        self.bootdev_persistent = persistent

    def _start(self, kexec: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(kexec), name=f"boot-{self.name}")
        self._boots.add(self._task)

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._release()

    def _release(self) -> None:
        """Close what the running boot holds, in the background; the next boot waits for it (_run)."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        closing: list[Awaitable[None]] = []
        if self._agent is not None:
            agent, self._agent = self._agent, None
            closing.append(agent.close())
        if self._http is not None:
            http, self._http = self._http, None
            closing.append(http.close())
        self.ip = None
        self._cleanup = asyncio.get_running_loop().create_task(self._clean_up(closing))

    async def _clean_up(self, closing: list[Awaitable[None]]) -> None:
        """Close the last boot's agent and HTTP client, then clear the address: a real machine's next boot finds none
        of them (at 4000 nodes a new boot's agent bound its port while the old one still listened: "cannot listen")."""
        for c in closing:
            try:
                await c
            except Exception as exc:  # a half-closed agent must not keep the node from booting
                log.debug("%s: closing the last boot: %s", self.name, exc)
        try:
            await self.net.clear_addresses()
        except Exception as exc:  # the namespace may be gone during teardown
            log.debug("%s: clearing addresses: %s", self.name, exc)

    # ---- observable state --------------------------------------------------------------------------

    def _stop_if_stale(self) -> None:
        """Raise CancelledError in a boot that is no longer the node's."""
        task = asyncio.current_task()
        if task is not None and task is not self._task and task in self._boots:
            # A boot that was reset or powered off but lived on: Python 3.11's asyncio.wait_for returns the result of
            # a wait that completed in the same loop turn as the cancel and drops the cancel (gh-86296). Such a boot
            # went on to start a second deploy agent beside the new boot's (2000 nodes: 3 halted, "cannot listen on
            # ...:7070: Address already in use"). It goes no further than its next stage.
            raise asyncio.CancelledError(f"{self.name}: a boot that was stopped")

    def _set(self, stage: str, detail: str = "") -> None:
        self._stop_if_stale()
        self.stage, self.detail, self.since = stage, detail, time.time()
        self.history.append((self.since, stage, detail))
        if self.faults.die_stage and self.faults.die_stage == stage and self.power == "on":
            raise _Died(f"fault: dies at {stage}")

    def _note(self, detail: str, what: str = "note") -> None:
        """Record what went wrong (or a detail of the stage) without changing the stage."""
        self.detail = detail
        self.history.append((time.time(), what, detail))

    def status(self) -> dict[str, Any]:
        """Return the node's state as JSON-ready data."""
        return {
            "name": self.name, "mac": self.mac, "ip": self.ip, "rack": self.plan.rack, "bmc": self.plan.bmc_ip,
            "power": self.power, "stage": self.stage, "detail": self.detail, "since": self.since,
            "boots": self.boots, "bootdev": self.bootdev + (" (persistent)" if self.bootdev_persistent else ""),
            "faults": self.faults.describe(), "counters": dict(self.counters),
            "history": [{"ts": ts, "stage": s, "detail": d} for ts, s, d in self.history],
        }

    # ---- the boot --------------------------------------------------------------------------------

    async def _run(self, kexec: bool = False) -> None:
        try:
            while True:
                if self._cleanup is not None:
                    await self._cleanup
                    self._cleanup = None
                outcome = await (self._kexec_boot() if kexec else self._boot_once())
                kexec = False
                if outcome != "reboot":
                    return
                self._release()
        except asyncio.CancelledError:
            raise
        except _Died as exc:
            self._set("dead", str(exc).strip("'"))
        except Exception as exc:  # a bug in the emulation must not take the other nodes down
            log.exception("%s: firmware crashed", self.name)
            self.stage, self.detail = "crashed", repr(exc)
        if self.stage in ("dead", "crashed", "halted"):
            await asyncio.Event().wait()  # powered on and silent until the BMC acts

    async def _boot_once(self) -> str:
        self.boots += 1
        self._boot_t0 = time.monotonic()
        if self.faults.noreturn and self.booted_once:
            self._set("dead", "fault: never came back from the reboot")
            await asyncio.Event().wait()
        self._set("post")
        if self.faults.posthang and self.boots == 1:
            self._set("post-hang", "fault: hangs in POST (power cycle to cure)")
            await asyncio.Event().wait()
        if self.faults.die_after_s:
            asyncio.get_running_loop().call_later(self.faults.die_after_s, self._die_now, self.boots)
        await asyncio.sleep(draw_post_delay(self.settings.post, self.rng))
        self.booted_once = True
        device = self.bootdev
        if not self.bootdev_persistent:
            self.bootdev = "default"
        order = ["disk"] if device == "disk" else ["net", "disk"]
        for dev in order:
            result = await (self._netboot() if dev == "net" else self._localboot())
            if result != "next":
                return result
        if self.settings.boot_retry_s <= 0:
            self._set("halted", "no bootable device")
            await asyncio.Event().wait()
        # Server BIOSes retry the boot order after a pause ("boot retry") rather than stopping for good.
        self._set("no-boot", f"no bootable device, retrying the boot in {self.settings.boot_retry_s:g}s")
        await asyncio.sleep(self.settings.boot_retry_s)
        return "reboot"

    def _die_now(self, boot: int) -> None:
        if self.power == "on" and self.boots == boot and self._task is not None:
            self._task.cancel()
            self._task = None
            self._release()
            self.stage, self.detail, self.since = "dead", f"fault: died {self.faults.die_after_s:g}s after power-on", time.time()
            self.history.append((self.since, self.stage, self.detail))

    def _drop(self) -> bool:
        """Decide whether a boot packet is lost (fault injection)."""
        if self.faults.loss and self.rng.random() < self.faults.loss:
            self.counters["lost"] += 1
            return True
        return False

    async def _netboot(self) -> str:
        arch = 7 if self.plan.firmware == "uefi" else 0
        lease = None
        nbp = b""
        for attempt in range(self.settings.nbp_attempts):
            self._set("dhcp", f"PXE ROM, attempt {attempt + 1}")
            lease = await self._dhcp(wire.pxe_client_options(arch, self.uuid.bytes_le, ipxe=False), PXE_DHCP_TIMEOUTS)
            if lease is None:
                break  # PXE-E51: no offers after the whole schedule: next boot device
            if not lease.bootfile:
                self._note("PXE-E53: no boot filename received")
                break
            self._set("tftp", f"{lease.next_server}:{lease.bootfile}")
            try:
                nbp = await self._tftp(lease, uefi=arch == 7)
                break
            except FetchError as exc:
                self._note(f"PXE-E32: {exc}")
                nbp = b""
        if lease is None or not nbp:
            self._note("PXE-E51: no DHCP or proxyDHCP offers were received" if lease is None else self.detail, "netboot-failed")
            return "next"
        return await self._ipxe(arch, chained=0)

    async def _tftp(self, lease: Lease, uefi: bool) -> bytes:
        settings = self.settings.tftp
        stats = TransferStats()
        if uefi:
            # OVMF first asks for the size and aborts after the OACK (field notes), then reads the file.
            await tftp_get(self.net.udp_socket(lease.ip), lease.next_server, lease.bootfile, settings, size_probe=True, drop=self._drop, stats=stats)
        else:
            settings = TftpSettings(**{**settings.__dict__, "blksize": min(settings.blksize, 1456)})
        data = await tftp_get(self.net.udp_socket(lease.ip), lease.next_server, lease.bootfile, settings, drop=self._drop, stats=stats)
        self.counters["tftp_retransmits"] += stats.retransmits
        self._note(f"{lease.bootfile}: {len(data)} bytes, blksize {stats.blksize}, windowsize {stats.windowsize}", "nbp")
        return data

    async def _ipxe(self, arch: int, chained: int) -> str:
        await asyncio.sleep(self.settings.ipxe_init_s)
        self._set("ipxe", "DHCP as iPXE")
        lease = await self._dhcp(wire.pxe_client_options(arch, self.uuid.bytes_le, ipxe=True), IPXE_DHCP_TIMEOUTS)
        if lease is None:
            self._note("iPXE: no DHCP answer (No configuration methods succeeded)")
            return "next"
        self._interpreter_settings = {
            "mac": self.mac, "net0/mac": self.mac, "ip": lease.ip, "netmask": _netmask(lease.prefixlen),
            "gateway": lease.router or "", "next-server": lease.next_server, "filename": lease.bootfile,
            "hostname": lease.hostname, "uuid": str(self.uuid), "platform": "efi" if arch == 7 else "pcbios",
            "buildarch": "x86_64" if arch == 7 else "i386", "manufacturer": "rackboot", "product": "vm-testbed",
            "serial": self.name, "asset": self.name, "user-class": "iPXE",
        }
        bootfile = lease.bootfile
        if not bootfile:
            self._note("iPXE: no filename in the DHCP answer")
            return "next"
        uri = bootfile if "://" in bootfile else f"tftp://{lease.next_server}/{bootfile}"
        self._set("script", uri)
        try:
            data = await self.fetch(uri, "script")
        except FetchError as exc:
            self._note(f"iPXE: {exc}")
            return "next"
        if not data.lstrip().startswith(SCRIPT_MAGIC):
            # The server handed iPXE a binary again instead of its script: real iPXE chainloads it forever.
            if chained >= 2:
                self._set("halted", f"chainload loop: iPXE got {bootfile} again instead of a script")
                await asyncio.Event().wait()
            return await self._ipxe(arch, chained + 1)
        interpreter = Interpreter(host=self, settings=dict(self._interpreter_settings))
        outcome = await interpreter.run_script(data, uri)
        return await self._after_script(outcome)

    async def _after_script(self, outcome: Outcome) -> str:
        if outcome.kind == "kernel":
            return await self._deploy_environment(outcome)
        if outcome.kind == "local":
            return await self._localboot()
        if outcome.kind == "reboot":
            return "reboot"
        if outcome.kind == "halt":
            self._set("halted", f"iPXE: {outcome.error}")
            await asyncio.Event().wait()
        self._note(f"iPXE script failed: {outcome.error}", "script-failed")
        return "next"

    # ---- ScriptHost: what the iPXE interpreter asks of the firmware ------------------------------

    async def fetch(self, uri: str, purpose: str) -> bytes:
        """Download for iPXE over HTTP or TFTP; raise FetchError like iPXE reports errors."""
        if purpose in ("kernel", "initrd"):
            self._set(purpose, uri)
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme == "tftp":
            lease_ip = self._interpreter_settings.get("ip", "")
            stats = TransferStats()
            data = await tftp_get(self.net.udp_socket(lease_ip), parsed.hostname or "", parsed.path.lstrip("/"), self.settings.tftp, drop=self._drop, stats=stats, port=parsed.port or 69)
            return data
        if parsed.scheme not in ("http", "https"):
            raise FetchError(f"{uri}: unsupported URI scheme")
        session = self._http_session()
        try:
            async with session.get(uri, headers={"User-Agent": USER_AGENT}) as resp:
                if resp.status != 200:
                    raise FetchError(f"{uri}: HTTP {resp.status}")
                return await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise FetchError(f"{uri}: {exc.__class__.__name__}: {exc}") from exc

    async def sleep(self, seconds: float) -> None:
        """Sleep for the script."""
        await asyncio.sleep(seconds)

    async def dhcp(self) -> bool:
        """Redo DHCP for the script's `dhcp` command."""
        arch = 7 if self.plan.firmware == "uefi" else 0
        return await self._dhcp(wire.pxe_client_options(arch, self.uuid.bytes_le, ipxe=True), IPXE_DHCP_TIMEOUTS) is not None

    def echo(self, text: str) -> None:
        """Keep what the script printed in the node's history (a message repeated by a polling script once)."""
        if self.history and self.history[-1][1:] == ("echo", text[:200]):
            return
        self.history.append((time.time(), "echo", text[:200]))

    def _http_session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(
                socket_factory=lambda ai: self.net.stream_socket(ai[0], ai[1], ai[2]),
                limit=4, enable_cleanup_closed=False, force_close=True,
            )
            self._http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300, sock_connect=10, sock_read=30))
        return self._http

    # ---- DHCP over a raw socket --------------------------------------------------------------------

    async def _dhcp(self, options: list[tuple[int, bytes]], timeouts: tuple[float, ...]) -> Lease | None:
        """Run DISCOVER/OFFER/REQUEST/ACK; configure the address; return the lease, or None after the last timeout."""
        loop = asyncio.get_running_loop()
        sock = self.net.dhcp_socket()
        queue: asyncio.Queue[wire.DhcpReply] = asyncio.Queue(maxsize=64)
        mac = wire.mac_bytes(self.mac)

        def readable() -> None:
            while True:
                try:
                    frame = sock.recv(2048)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                try:
                    reply = wire.parse_reply(wire.parse_udp_frame(frame).payload)
                except Exception:
                    continue  # malformed or not DHCP: dropped, as a ROM would
                if reply.chaddr[:6] == mac and not queue.full():
                    queue.put_nowait(reply)

        loop.add_reader(sock.fileno(), readable)
        try:
            xid = self.rng.getrandbits(32)
            t0 = time.monotonic()
            for timeout in timeouts:
                self._send_dhcp(sock, wire.build_request(wire.DISCOVER, xid, self.mac, options, secs=int(time.monotonic() - t0)))
                offer = await self._wait_reply(queue, xid, (wire.OFFER,), timeout)
                if offer is None:
                    continue
                request_opts = [(wire.OPT_REQUESTED_IP, socket.inet_aton(offer.yiaddr))]
                if offer.server_id:
                    request_opts.append((wire.OPT_SERVER_ID, socket.inet_aton(offer.server_id)))
                ack = None
                for _ in range(3):
                    self._send_dhcp(sock, wire.build_request(wire.REQUEST, xid, self.mac, request_opts + options, secs=int(time.monotonic() - t0)))
                    ack = await self._wait_reply(queue, xid, (wire.ACK, wire.NAK), 4.0)
                    if ack is not None:
                        break
                if ack is None or ack.message_type == wire.NAK:
                    continue
                lease = Lease(
                    ip=ack.yiaddr, prefixlen=ack.prefixlen, server=ack.server_id or offer.server_id or "",
                    next_server=ack.next_server, bootfile=ack.bootfile or offer.bootfile,
                    hostname=ack.text_option(wire.OPT_HOSTNAME), router=ack.router,
                )
                await self.net.set_address(lease.ip, lease.prefixlen)
                self.ip = lease.ip
                return lease
            return None
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()

    def _send_dhcp(self, sock: socket.socket, payload: bytes) -> None:
        self.counters["dhcp_sent"] += 1
        if self._drop():
            return
        frame = wire.udp_frame(wire.mac_bytes(self.mac), wire.BROADCAST_MAC, "0.0.0.0", "255.255.255.255", 68, 67, payload)
        try:
            sock.send(frame)
        except OSError as exc:
            log.debug("%s: DHCP send: %s", self.name, exc)

    async def _wait_reply(self, queue: asyncio.Queue[wire.DhcpReply], xid: int, types: tuple[int, ...], timeout: float) -> wire.DhcpReply | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                reply = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                return None
            self.counters["dhcp_received"] += 1
            if self._drop():
                continue
            if reply.xid == xid and reply.message_type in types and (reply.message_type == wire.NAK or reply.yiaddr != "0.0.0.0"):
                return reply

    # ---- what runs after the firmware ------------------------------------------------------------

    async def _deploy_environment(self, outcome: Outcome) -> str:
        kernel = outcome.kernel
        assert kernel is not None
        self._set("os", f"deploy environment: {kernel.name} {outcome.cmdline}".strip())
        try:
            keys = read_deploy_keys(i.data for i in outcome.initrds)
        except InitrdError as exc:
            self._set("halted", f"kernel panic: {exc}")
            await asyncio.Event().wait()
        await asyncio.sleep(self.settings.kernel_boot_s)
        # A deploy environment's own DHCP client names itself, so the server hands it no boot file (field notes).
        lease = await self._dhcp(wire.os_client_options("rackboot-deploy"), OS_DHCP_TIMEOUTS)
        if lease is None:
            self._set("halted", "deploy environment: no DHCP answer")
            await asyncio.Event().wait()
        args = _rackboot_args(outcome.cmdline)
        url = args.get("callback") or _callback_url(kernel.uri, self.mac) or _callback_url(self.settings.appliance_url, self.mac) or ""
        await self._run_agent(keys, url, args.get("token", ""), "agent_up", "deploy agent",
                              kernel=kernel.uri, boot_s=round(time.monotonic() - self._boot_t0, 3))
        return "halt"

    async def _run_agent(self, keys: DeployKeys, callback: str, token: str, stage: str, what: str, **detail: Any) -> None:
        """Start the deploy agent on this node's sockets, call back with stage, then serve until the node stops."""
        tree_key = None
        if keys.tree_key:
            path = self.workdir / "tree_key"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_bytes(keys.tree_key)
            tree_key = str(path)
        assert self.ip is not None
        config = AgentConfig(name=self.name, mac=self.mac, host=self.ip, callback_url=callback or None, token=token,
                             ssh_port=AGENT_SSH_PORT, data_port=AGENT_DATA_PORT, authorized_keys=keys.authorized_keys,
                             tree_key=tree_key, disk=str(self.disk), workdir=str(self.workdir),
                             shell_prefix=("ip", "netns", "exec", self.plan.namespace))
        agent = DeployAgent(config, kexec_hook=self._kexec_hook, reboot_hook=self._reboot_hook,
                            listen_factory=lambda host, port: self.net.listen_socket(port, host),
                            socket_factory=lambda ai: self.net.stream_socket(ai[0], ai[1], ai[2]),
                            builtin=builtin_true if self.settings.builtin_true else None)
        # Held before it starts: a reset during start() (binding takes several awaits under load) must close it
        # too (_release). Assigned after, it leaked, its ports stayed bound, and every later boot of the node halted
        # with "cannot listen ... Address already in use" (105 of 2000 nodes).
        # A boot that was stopped must not hold it: assigned by such a boot after the reset's _release, it replaced
        # nothing that would close it, and the node's next boot halted with "Address already in use" (5 of 4000).
        self._stop_if_stale()
        self._agent = agent
        try:
            await agent.start()
        except (BindError, AgentError) as exc:
            self._agent = None
            await agent.close()
            self._set("halted", f"{what}: {exc}")
            await asyncio.Event().wait()
        try:
            self._stop_if_stale()  # stopped while it bound its ports
        except asyncio.CancelledError:
            if self._agent is agent:
                self._agent = None
            await agent.close()
            raise
        self._set("callback", callback)
        if await agent.callback(stage, **detail):
            self.counters["callbacks"] += 1
        else:
            self.history.append((time.time(), "callback-failed", f"{stage}: refused or unreachable"))
        self._set("running", what)
        if self.faults.die_stage == "broadcast" and stage == "agent_up":
            await self._die_mid_broadcast(agent)
        await asyncio.Event().wait()

    async def _die_mid_broadcast(self, agent: DeployAgent) -> None:
        """The die@broadcast fault: once the agent has received DIE_AFTER_BYTES of a broadcast, the node hangs."""
        receiver = agent.receiver
        while not any(receiver.progress(s) >= DIE_AFTER_BYTES for s in [*receiver.relays, *receiver.downloads]):
            # Often once the stream flows: an 8 MiB image crosses a 1 Gbit/s link in 70 ms, and a node looked at 5
            # times a second could receive it whole before it died (1 of 27 in the 4000-node run).
            await asyncio.sleep(0.01 if receiver.relays or receiver.downloads else 0.5)
        # Its address goes first, so its peers get no reset or FIN: a hung kernel answers nothing, and the chain
        # before it finds out by its own timeouts. Its sockets stay open, as the powered-on machine's would.
        await self.net.clear_addresses()
        raise _Died("fault: dies mid-broadcast")

    async def _kexec_hook(self, kernel: str, initrd: str | None, cmdline: str) -> None:
        """The agent's kexec: this node jumps into the installed system without going through its firmware."""
        asyncio.get_running_loop().call_soon(self._jump, True)

    async def _reboot_hook(self) -> None:
        """The agent's `reboot`: a warm reboot of this node through its firmware (never the host's)."""
        asyncio.get_running_loop().call_soon(self._jump, False)

    def _jump(self, kexec: bool) -> None:
        if self.power != "on":
            return
        self._stop()
        self._start(kexec=kexec)

    async def _kexec_boot(self) -> str:
        self.boots += 1
        self._boot_t0 = time.monotonic()
        if self.faults.noreturn:
            self._set("dead", "fault: never came back from the kexec")
            await asyncio.Event().wait()
        self._set("kexec", "into the installed kernel")
        return await self._installed_system()

    async def _localboot(self) -> str:
        self._set("local", f"disk {self.disk.name}")
        return await self._installed_system()

    async def _installed_system(self) -> str:
        root = self.workdir / "root"
        identity = await asyncio.get_running_loop().run_in_executor(None, installed_identity, root)
        if identity is None:
            self._note("no operating system on the disk")
            return "next"
        env = str(identity.get("env", "?"))
        self._set("os", f"installed system: {env}")
        await asyncio.sleep(self.settings.os_boot_s)
        lease = await self._dhcp(wire.os_client_options("rackboot-installed"), OS_DHCP_TIMEOUTS)
        if lease is None:
            self._set("halted", "installed system: no DHCP answer")
            await asyncio.Event().wait()
        # Its sshd takes the keys the post-install put in root's authorized_keys (the appliance's deploy key),
        # so the appliance can soft-reboot it and run commands; it reports the environment it runs.
        keys = DeployKeys(authorized_keys=installed_authorized_keys(root), tree_key=None)
        detail = {"env": env, "sha256": str(identity.get("sha256", "")), "boot_s": round(time.monotonic() - self._boot_t0, 3)}
        callback = str(identity.get("callback") or _callback_url(self.settings.appliance_url, self.mac) or "")
        if keys.authorized_keys:
            await self._run_agent(keys, callback, str(identity.get("token", "")), "installed", f"installed system: {env}", **detail)
        else:
            await self._callback(callback, {"stage": "installed", "status": "ok", "token": str(identity.get("token", "")),
                                            "name": self.name, "ip": self.ip, **detail})
            await self._serve_ssh()
            self._set("running", f"installed system: {env}")
            await asyncio.Event().wait()
        return "halt"

    async def _callback(self, url: str, payload: dict[str, Any]) -> None:
        """POST the callback URL (the appliance's /callback/<mac>), retrying like a deploy agent does."""
        self._set("callback", url)
        session = self._http_session()
        delay = 1.0
        for _ in range(6):
            try:
                async with session.post(url, json=payload) as resp:
                    self.callback_replies.append(resp.status)
                    if resp.status < 300:
                        self.counters["callbacks"] += 1
                        return
                    self.detail = f"callback: HTTP {resp.status}"
                    if resp.status in (400, 401, 403, 404):  # refused: retrying will not help (as broadcast.agent)
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self.detail = f"callback: {exc}"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        self.history.append((time.time(), "callback-failed", self.detail))

    async def _serve_ssh(self) -> None:
        """Answer on port 22 with an SSH identification string (RFC 4253 sec. 4.2), enough for reachability checks."""
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(b"SSH-2.0-rackboot_vnode_1.0\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.read(256), 10)
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()

        if self._ssh is None:
            self._ssh = await asyncio.start_server(greet, sock=self.net.listen_socket(22))


def _netmask(prefixlen: int) -> str:
    return socket.inet_ntoa(((0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF).to_bytes(4, "big"))


def _rackboot_args(cmdline: str) -> dict[str, str]:
    """Return the rackboot.KEY=VALUE words of a kernel command line (callback, token, ... as broadcast.agent reads them)."""
    out = {}
    for word in cmdline.split():
        key, eq, value = word.partition("=")
        if eq and key.startswith("rackboot."):
            out[key[len("rackboot."):]] = value
    return out


def _callback_url(base: str, mac: str) -> str | None:
    """The appliance's callback URL for a MAC, on the server that served base (a URL)."""
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return f"{parsed.scheme}://{parsed.netloc}/callback/{mac_slug(mac)}"

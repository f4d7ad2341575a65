"""The TFTP service: a thin asyncio transport around the codec, the file store and one ReadSession per transfer.

Requests arrive on settings.port and are handled in the event loop; every transfer gets its own ephemeral
socket (its TID, RFC 1350 sec. 4; connected to the client) whose per-block DATA/ACK exchange runs in the data plane (datapath.py): in
data_workers worker processes (workers.py: the socket and a memfd of the file passed by SCM_RIGHTS, more than one
core) when there are at least 2, else in a thread of this process.
One node record per transfer that ends: `NbpSent`, `ScriptServed` (the per-MAC `boot.ipxe`, rendered by
the same `ipxe.script.ScriptRenderer` as over HTTP), `FileSent` or `TransferFailed`.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import resource
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from domain.latency import TRANSFER_BUCKETS, Latency
from domain.errors import BindError, MalformedPacket
from domain.progress import (
    EventSink,
    FileSent,
    NbpSent,
    NodeEvent,
    ScriptServed,
    TransferFailed,
    Via,
)
from ipxe.script import ScriptRenderer
from netboot.tftp.codec import (
    ErrorCode,
    ReadRequest,
    WriteRequest,
    decode,
    encode_error,
)
from netboot.tftp.files import (
    FileCache,
    FileStore,
    TftpFile,
    TftpFileError,
    VirtualFile,
)
from netboot.tftp.datapath import DataPlane, TransferResult, TransferWorker, open_transfer_socket
from netboot.tftp.session import Datagrams, Outcome, ReadSession, SessionLimits
from netboot.tftp.sharedfiles import HeldContents
from netboot.tftp.workers import WorkerPool

log = logging.getLogger("rackboot.tftp")

MacForIp = Callable[[ipaddress.IPv4Address], "str | None"]
Address = tuple[str, int]
MODES = ("octet", "netascii")
_COUNTERS = (
    "received", "sent", "dropped_malformed", "dropped_wrong_tid", "dropped_busy", "dropped_host_busy", "dropped_unexpected",
    "requests", "duplicate_requests", "write_refused", "bad_mode", "not_found", "access_denied",
    "transfers_sent", "transfers_failed", "transfers_aborted", "retransmitted", "duplicate_acks", "bytes_sent",
    "transfers_windowed", "transfers_large_blocks",
)


SCRIPT_NAME = "boot.ipxe"  # the per-MAC virtual file: the node's current iPXE script


@dataclass(frozen=True)
class TftpSettings:
    """The TFTP service's own settings."""

    address: ipaddress.IPv4Address          # where to listen
    root: Path
    ipxe_dir: Path = Path("/usr/lib/ipxe")
    nbp_names: tuple[str, ...] = ("undionly.kpxe", "snponly.efi")  # served from ipxe_dir when not under root
    port: int = 69
    interface: str = ""                      # for error messages
    max_blksize: int = 1468
    max_windowsize: int = 64
    timeout: float = 1.0
    retries: int = 6
    first_retries: int = 2
    max_sessions: int = 4096
    max_sessions_per_host: int = 64          # one host cannot take the whole table (a node needs one or two)
    rto_floor: float = 0.02                  # the adaptive retransmission timeout's floor (timeout is its start and cap)
    data_workers: int = 0                    # data-plane worker processes; 0 or 1: a thread of this process
    busy_poll: float = 0.0                   # seconds the data plane polls without sleeping after an answer (few transfers)


def raise_nofile_limit() -> int:
    """Raise the RLIMIT_NOFILE soft limit to the hard limit (one socket per transfer); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError) as exc:
            log.warning("tftp: cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft


def _format_options(options: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


@dataclass(eq=False)
class _Transfer:
    """One client TID's transfer, from its RRQ until it ends (the file may still be loading)."""

    client: Address
    request: ReadRequest
    mac: str | None
    task: asyncio.Task[None] | None = None
    worker: TransferWorker | None = None     # run by the service's own data-plane thread
    handoff: int | None = None               # or by a worker process: its id in the WorkerPool
    file: TftpFile | None = None
    shares_datagrams: bool = False           # holds a use of the thread's shared DATA datagrams of file.data
    closed: bool = field(default=False)
    started: float = field(default_factory=time.perf_counter)  # the RRQ


class _RequestEndpoint(asyncio.DatagramProtocol):
    """The well-known port: hands every datagram to the service."""

    def __init__(self, service: "TftpService") -> None:
        self.service = service

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.service._on_request(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("tftp: request socket error: %s", exc)


class TftpService:
    """RFC 1350 read-only TFTP with RFC 2347/2348/2349/7440 options, for NBPs and per-MAC virtual files."""

    name = "tftp"

    def __init__(
        self,
        settings: TftpSettings,
        emit: EventSink,
        mac_for_ip: MacForIp,
        scripts: ScriptRenderer | None = None,
        cache_bytes: int = 512 << 20,
    ) -> None:
        self.settings = settings
        self.emit = emit
        self.mac_for_ip = mac_for_ip
        self.scripts = scripts
        self.files = FileStore(
            root=settings.root,
            ipxe_dir=settings.ipxe_dir,
            nbp_names=settings.nbp_names,
            virtual=self._script_file if scripts is not None else None,
            cache=FileCache(cache_bytes),
        )
        self.limits = SessionLimits(
            max_blksize=settings.max_blksize,
            max_windowsize=settings.max_windowsize,
            timeout=settings.timeout,
            retries=settings.retries,
            first_retries=settings.first_retries,
            rto_floor=settings.rto_floor,
        )
        self._host = str(settings.address)
        self._transport: asyncio.DatagramTransport | None = None
        self._transfers: dict[Address, _Transfer] = {}
        self._per_host: dict[str, int] = {}  # transfers per client address
        self._counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        # Every transfer's DATA/ACK exchange: in worker processes (workers.py), or in a thread of this one (datapath.py).
        self._plane = DataPlane(spin=settings.busy_poll)
        self._pool = WorkerPool(settings.data_workers, settings.busy_poll) if settings.data_workers > 1 else None
        self.latency = {"transfer": Latency(TRANSFER_BUCKETS)}
        # The thread's transfers: each file content's DATA datagrams, shared while transfers of it run (by id(data):
        # the data, its users, the datagrams). Worker processes keep their own (sharedfiles.MappedFiles).
        self._datagrams: HeldContents[int, bytes] = HeldContents()

    @property
    def address(self) -> Address:
        """The bound (host, port) of the request socket (useful when the configured port is 0)."""
        if self._transport is None:
            raise RuntimeError("tftp: not started")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return (host, port)

    @property
    def data_worker_pids(self) -> list[int]:
        """The process ids of the data-plane worker processes running now (empty: transfers run in a thread)."""
        return self._pool.pids if self._pool is not None else []

    async def start(self) -> None:
        """Bind the request socket on (settings.address, settings.port); raise BindError with the reason on failure."""
        if self._transport is not None:
            return
        limit = raise_nofile_limit()
        port = self.settings.port
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # request bursts of a boot storm
            except OSError:
                pass
            sock.bind((self._host, port))
        except OSError as exc:
            sock.close()
            hint = {
                errno.EADDRINUSE: " (port already in use: is another TFTP server such as tftpd-hpa running?)",
                errno.EADDRNOTAVAIL: f" (address not configured on any interface: is {self.settings.interface or 'the interface'} up with {self._host}?)",
                errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            }.get(exc.errno or 0, "")
            raise BindError(f"tftp: cannot bind UDP {self._host}:{port}: {exc.strerror or exc}{hint}") from exc
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _RequestEndpoint(self), sock=sock)
        self._transport = transport
        if self._pool is not None:
            self._pool.start()
        log.info("tftp: serving %s on %s:%d (file descriptor limit %d)", self.settings.root, *self.address, limit)

    async def serve(self) -> None:
        """Serve until cancelled (datagrams are handled by the endpoints' callbacks)."""
        if self._transport is None:
            raise RuntimeError("tftp: serve() before start()")
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        """Abort every transfer and release every socket; safe to call twice."""
        tasks = [t.task for t in self._transfers.values() if t.task is not None and not t.task.done()]
        for transfer in list(self._transfers.values()):
            self._drop(transfer)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self._plane.close)  # the data plane closes every transfer socket it still holds
        if self._pool is not None:
            await self._pool.close()  # and so does every worker process, which then exits
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def stats(self) -> dict[str, int]:
        """Return counters: datagrams, drops, requests, transfers, retransmissions, cache."""
        cache = self.files.cache
        counters = dict(self._counters)
        for transfer in list(self._transfers.values()):  # in flight in the thread count too (a worker process reports at the end)
            worker = transfer.worker
            if worker is not None and not transfer.closed:
                seen = worker.counts
                counters["received"] += seen.received
                counters["sent"] += seen.sent
                counters["dropped_wrong_tid"] += seen.dropped_wrong_tid
                counters["dropped_malformed"] += seen.dropped_malformed
                counters["retransmitted"] += worker.session.retransmitted
                counters["duplicate_acks"] += worker.session.duplicate_acks
        return counters | {
            "transfers_active": len(self._transfers),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_bytes": cache.bytes,
        }

    # -- request socket -------------------------------------------------------------------------

    def _script_file(self, mac: str | None, name: str) -> VirtualFile | None:
        """The per-MAC `boot.ipxe`: the node's current script, as HTTP serves it (firmware whose iPXE fetches it over TFTP)."""
        if mac is None or name != SCRIPT_NAME or self.scripts is None:
            return None
        script = self.scripts.render(mac)
        return VirtualFile(script.text.encode(), ScriptServed(mac, script.profile, Via.TFTP, script.env))

    def _publish(self, mac: str | None, event: Callable[[str], NodeEvent]) -> None:
        if mac:
            self.emit(event(mac))

    def _reply_error(self, addr: Address, code: int, message: str) -> None:
        if self._transport is not None:
            self._transport.sendto(encode_error(code, message), addr)
            self._counters["sent"] += 1

    def _lookup_mac(self, host: str) -> str | None:
        try:
            return self.mac_for_ip(ipaddress.IPv4Address(host))
        except Exception:  # a failing lookup must not cost the transfer
            log.exception("tftp: mac_for_ip(%s) failed", host)
            return None

    def _on_request(self, data: bytes, addr: Address) -> None:
        counters = self._counters
        counters["received"] += 1
        try:
            packet = decode(data)
        except MalformedPacket as exc:
            counters["dropped_malformed"] += 1
            log.debug("tftp: malformed request from %s:%d: %s", addr[0], addr[1], exc)
            return
        if isinstance(packet, WriteRequest):
            counters["write_refused"] += 1
            self._reply_error(addr, ErrorCode.ACCESS_VIOLATION, "write requests are not accepted")
            self._publish(self._lookup_mac(addr[0]),
                          lambda mac: TransferFailed(mac, packet.filename, Via.TFTP, "write request refused"))
            return
        if not isinstance(packet, ReadRequest):
            counters["dropped_unexpected"] += 1
            return
        counters["requests"] += 1
        existing = self._transfers.get(addr)
        if existing is not None:
            if existing.request == packet:
                # The client repeated its RRQ because our first answer was late or lost; the
                # transfer's own timer retransmits that answer.
                counters["duplicate_requests"] += 1
                return
            self._drop(existing)  # the client restarted with another request from the same port
        if len(self._transfers) >= self.settings.max_sessions:
            # Drop rather than refuse: the client retries its RRQ, where an ERROR would make it give up.
            counters["dropped_busy"] += 1
            return
        if self._per_host.get(addr[0], 0) >= self.settings.max_sessions_per_host:
            counters["dropped_host_busy"] += 1  # one host's flood must not deny the others
            return
        if packet.mode not in MODES:
            counters["bad_mode"] += 1
            self._reply_error(addr, ErrorCode.ILLEGAL_OPERATION, f"unsupported transfer mode {packet.mode!r}")
            return
        mac = self._lookup_mac(addr[0])
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tftp: %s:%d asks %r (%s) %s", addr[0], addr[1], packet.filename, packet.mode,
                      _format_options(packet.options))
        transfer = _Transfer(client=addr, request=packet, mac=mac)
        self._transfers[addr] = transfer
        self._per_host[addr[0]] = self._per_host.get(addr[0], 0) + 1
        transfer.task = asyncio.get_running_loop().create_task(self._open(transfer))

    async def _open(self, transfer: _Transfer) -> None:
        """Find the file, open the transfer's socket and send the first datagrams."""
        request, addr = transfer.request, transfer.client
        try:
            try:
                file = await self.files.open(transfer.mac, request.filename, netascii=request.mode == "netascii")
            except TftpFileError as exc:
                self._counters["not_found" if exc.code == ErrorCode.FILE_NOT_FOUND else "access_denied"] += 1
                self._reply_error(addr, exc.code, str(exc))
                self._forget(transfer)
                reason = str(exc)
                self._publish(transfer.mac, lambda mac: TransferFailed(mac, request.filename, Via.TFTP, reason))
                return
            if transfer.closed:
                return
            transfer.file = file
            sock, foreign = open_transfer_socket(self._host, addr)  # connected to the client: its TID only
            self._counters["dropped_wrong_tid"] += foreign
            if self._pool is not None and self._pool.usable:
                try:
                    transfer.handoff = self._pool.add(sock, addr, file.data, dict(request.options), self.limits,
                                                      lambda result: self._finish(transfer, result))
                except BaseException:
                    sock.close()
                    raise
                return
            shared = self._share_datagrams(file.data)
            transfer.shares_datagrams = True
            session = ReadSession(file.data, request.options, self.limits, shared)
            loop = asyncio.get_running_loop()

            def done(worker: TransferWorker) -> None:
                try:
                    loop.call_soon_threadsafe(self._finish, transfer, worker.result())
                except RuntimeError:  # the loop is gone: the service was closed
                    pass

            transfer.worker = TransferWorker(sock, addr, session, done)
            self._plane.add(transfer.worker)
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            # Out of file descriptors or ports: behave as when busy, the client will retry.
            self._counters["dropped_busy"] += 1
            log.warning("tftp: cannot open a transfer socket for %s:%d: %s", addr[0], addr[1], exc)
            self._forget(transfer)
        except Exception as exc:
            log.exception("tftp: transfer of %r to %s:%d failed", request.filename, addr[0], addr[1])
            self._reply_error(addr, ErrorCode.NOT_DEFINED, "internal server error")
            self._forget(transfer)
            reason = f"internal error: {exc}"
            self._publish(transfer.mac, lambda mac: TransferFailed(mac, request.filename, Via.TFTP, reason))

    def _share_datagrams(self, data: bytes) -> Datagrams:
        """The DATA datagrams shared by the thread's transfers of data (held by id, with data itself, so the id
        names it while held); pair with _unshare_datagrams(data)."""
        return self._datagrams.hold(id(data), lambda: data)[1]

    def _unshare_datagrams(self, data: bytes) -> None:
        self._datagrams.release(id(data))

    def _forget(self, transfer: _Transfer) -> None:
        transfer.closed = True
        if self._transfers.get(transfer.client) is transfer:
            del self._transfers[transfer.client]
            host = transfer.client[0]
            left = self._per_host.get(host, 1) - 1
            if left > 0:
                self._per_host[host] = left
            else:
                self._per_host.pop(host, None)
        if transfer.worker is not None:
            self._plane.remove(transfer.worker)
        if transfer.shares_datagrams and transfer.file is not None:
            transfer.shares_datagrams = False
            self._unshare_datagrams(transfer.file.data)
        if transfer.handoff is not None and self._pool is not None:
            self._pool.remove(transfer.handoff)

    def _drop(self, transfer: _Transfer) -> None:
        """End a transfer without an outcome (superseded, or the service closes)."""
        if transfer.task is not None and not transfer.task.done():
            transfer.task.cancel()
        self._forget(transfer)

    def _finish(self, transfer: _Transfer, result: TransferResult) -> None:
        """Account for a transfer whose data path ended, publish its outcome, release its socket."""
        if transfer.closed:
            return
        self._forget(transfer)
        counters = self._counters
        counters["received"] += result.received
        counters["sent"] += result.sent
        counters["dropped_wrong_tid"] += result.dropped_wrong_tid
        counters["dropped_malformed"] += result.dropped_malformed
        counters["retransmitted"] += result.retransmitted
        counters["duplicate_acks"] += result.duplicate_acks
        file = transfer.file
        path = file.name if file is not None else transfer.request.filename
        if result.outcome is Outcome.SENT:
            self.latency["transfer"].observe(time.perf_counter() - transfer.started)  # RRQ to the last ACK
            counters["transfers_sent"] += 1
            counters["bytes_sent"] += result.size
            counters["transfers_windowed"] += result.windowsize > 1  # RFC 7440 clients
            counters["transfers_large_blocks"] += result.blksize > 512  # RFC 2348 clients
            if file is not None and file.event is not None:
                self._publish(transfer.mac, lambda mac: replace(file.event, mac=mac, ts=time.time()))  # type: ignore[type-var]
            elif file is not None and file.is_nbp:
                self._publish(transfer.mac, lambda mac: NbpSent(mac, path, Via.TFTP))
            else:
                self._publish(transfer.mac, lambda mac: FileSent(mac, path, Via.TFTP))
        elif result.outcome is Outcome.ABORTED:
            counters["transfers_aborted"] += 1  # e.g. OVMF's tsize probe: not a failure
        else:
            reason = result.reason or "data path ended"
            counters["transfers_failed"] += 1
            log.info("tftp: %s to %s:%d failed: %s", path, transfer.client[0], transfer.client[1], reason)
            self._publish(transfer.mac, lambda mac: TransferFailed(mac, path, Via.TFTP, reason))

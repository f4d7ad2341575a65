"""The TFTP service's data-plane worker processes: transfers handed over by SCM_RIGHTS, their ends reported back.

The boot-protocol state stays in the event loop (server.py: RRQ, policy, options, access checks, events). Once a
transfer is accepted, its socket and a memfd of its file go to the least busy worker process (dataworker.py), which
runs the DATA/ACK exchange with the same data plane as the service's own thread, on a core of its own; the
transfer's end comes back to the loop as a TransferResult. A worker that dies fails its transfers (each one's
`done` gets a result without outcome) and is replaced, up to max_restarts; past that the pool is no longer
`usable` and the service runs new transfers in its own thread.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from domain.errors import MalformedPacket
from netboot.tftp.datapath import TransferResult
from netboot.tftp.handoff import MAX_MESSAGE, AddTransfer, Message, RemoveTransfer, TransferDone, decode, encode
from netboot.tftp.session import SessionLimits
from netboot.tftp.sharedfiles import SharedFiles

log = logging.getLogger("rackboot.tftp")

Done = Callable[[TransferResult], None]
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where `netboot` is importable from, for the workers
_CONTROL_BUFFER = 4 << 20  # queued messages to and from a worker: a boot storm's RRQs arrive in bursts


@dataclass
class _Handoff:
    """A transfer given to a worker: what to call when it ends, the file it holds a memfd of."""

    done: Done
    data: bytes


@dataclass(eq=False)
class _Worker:
    """One worker process and the service's end of its control socket."""

    proc: subprocess.Popen[bytes]
    control: socket.socket
    transfers: dict[int, _Handoff] = field(default_factory=dict)
    outbox: collections.deque[tuple[bytes, list[int], socket.socket | None]] = field(default_factory=collections.deque)
    writing: bool = False

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.proc.pid


class WorkerPool:
    """count data-plane worker processes, started by start() and ended by close() (or with this process)."""

    def __init__(self, count: int, busy_poll: float = 0.0, max_restarts: int = 5) -> None:
        self.count = count
        self.busy_poll = busy_poll
        self.max_restarts = max_restarts
        self.restarts = 0
        self.shared = SharedFiles()
        self._workers: list[_Worker] = []
        self._where: dict[int, _Worker] = {}  # transfer id -> the worker running it
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    @property
    def usable(self) -> bool:
        """True while at least one worker runs and the pool is not closing."""
        return bool(self._workers) and not self._closing

    @property
    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [w.pid for w in self._workers]

    def start(self) -> None:
        """Start the worker processes (from the event loop's thread); with none started, the pool is not usable."""
        self._loop = asyncio.get_running_loop()
        for _ in range(self.count):
            try:
                self._spawn()
            except OSError as exc:
                log.error("tftp: cannot start a data-plane worker (%s); transfers run in the service's own thread", exc)
                break

    def _spawn(self) -> None:
        assert self._loop is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for end in (ours, theirs):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _CONTROL_BUFFER)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CONTROL_BUFFER)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "netboot.tftp.dataworker", str(theirs.fileno()), str(os.getpid()),
                 repr(self.busy_poll)],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = _Worker(proc, ours)
        self._workers.append(worker)
        self._loop.add_reader(ours.fileno(), self._readable, worker)
        log.debug("tftp: data-plane worker %d started", proc.pid)

    def add(self, sock: socket.socket, client: tuple[str, int], data: bytes, options: dict[str, str],
            limits: SessionLimits, done: Done) -> int:
        """Hand a transfer to the least busy worker (its socket is closed here once sent); return its id."""
        worker = min(self._workers, key=lambda w: len(w.transfers))
        transfer_id = next(self._ids)
        fd = self.shared.acquire(data)
        worker.transfers[transfer_id] = _Handoff(done, data)
        self._where[transfer_id] = worker
        self._post(worker, AddTransfer(transfer_id, client, options, limits), [sock.fileno(), fd], sock)
        return transfer_id

    def remove(self, transfer_id: int) -> None:
        """Stop a transfer without an outcome (superseded, or the service closing); no-op once it ended."""
        worker = self._where.pop(transfer_id, None)
        if worker is None:
            return
        handoff = worker.transfers.pop(transfer_id, None)
        if handoff is not None:
            self.shared.release(handoff.data)
        self._post(worker, RemoveTransfer(transfer_id), [], None)

    def _post(self, worker: _Worker, message: Message, fds: list[int], sock: socket.socket | None) -> None:
        worker.outbox.append((encode(message), fds, sock))
        if not worker.writing:
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        """Send queued messages; wait for the socket to drain when the worker is behind."""
        assert self._loop is not None
        while worker.outbox:
            payload, fds, sock = worker.outbox[0]
            try:
                socket.send_fds(worker.control, [payload], fds)
            except (BlockingIOError, InterruptedError):
                if not worker.writing:
                    worker.writing = True
                    self._loop.add_writer(worker.control.fileno(), self._flush, worker)
                return
            except OSError as exc:
                self._lost(worker, f"control socket: {exc}")
                return
            worker.outbox.popleft()
            if sock is not None:
                sock.close()  # the worker holds the transfer socket now
        if worker.writing:
            worker.writing = False
            self._loop.remove_writer(worker.control.fileno())

    def _readable(self, worker: _Worker) -> None:
        """Apply the worker's reports: each ended transfer's result goes to its done callback."""
        while True:
            try:
                data = worker.control.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(worker, f"control socket: {exc}")
                return
            if not data:
                self._lost(worker, "exited")
                return
            try:
                message = decode(data)
            except MalformedPacket as exc:
                log.warning("tftp: data-plane worker %d: %s", worker.pid, exc)
                continue
            if not isinstance(message, TransferDone):
                continue
            handoff = worker.transfers.pop(message.transfer_id, None)
            if handoff is None:
                continue  # removed meanwhile
            self._where.pop(message.transfer_id, None)
            self.shared.release(handoff.data)
            handoff.done(message.result)

    def _detach(self, worker: _Worker) -> None:
        """Stop watching a worker's control socket, close it (the worker sees EOF) and the sockets not yet sent."""
        assert self._loop is not None
        if worker in self._workers:
            self._workers.remove(worker)
        self._loop.remove_reader(worker.control.fileno())
        if worker.writing:
            self._loop.remove_writer(worker.control.fileno())
            worker.writing = False
        worker.control.close()
        for _, _, sock in worker.outbox:
            if sock is not None:
                sock.close()
        worker.outbox.clear()

    def _lost(self, worker: _Worker, why: str) -> None:
        """A worker is gone: fail its transfers, reap it, start another (up to max_restarts)."""
        assert self._loop is not None
        if worker not in self._workers:
            return
        self._detach(worker)
        try:
            code = worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            code = worker.proc.wait()
        reason = f"data-plane worker {worker.pid} {why} (exit status {code})"
        log.warning("tftp: %s with %d transfers", reason, len(worker.transfers))
        handoffs, worker.transfers = worker.transfers, {}
        for transfer_id, handoff in handoffs.items():
            self._where.pop(transfer_id, None)
            self.shared.release(handoff.data)
            failed = TransferResult(outcome=None, reason=reason, size=len(handoff.data), blksize=0, windowsize=0)
            self._loop.call_soon(handoff.done, failed)  # not from inside add(), whose caller is not done yet
        if self._closing:
            return
        if self.restarts < self.max_restarts:
            self.restarts += 1
            try:
                self._spawn()
            except OSError as exc:
                log.error("tftp: cannot start a data-plane worker: %s", exc)
        if not self._workers:
            log.error("tftp: no data-plane worker left; transfers run in the service's own thread")

    async def close(self, timeout: float = 2.0) -> None:
        """End every worker (their transfers end without an outcome) and release the memfds."""
        if self._closing or self._loop is None:
            return
        self._closing = True
        workers = list(self._workers)
        for worker in workers:
            self._detach(worker)  # EOF on the control socket: the worker closes its transfers and exits
        self._where.clear()
        deadline = time.monotonic() + timeout
        for worker in workers:
            while worker.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if worker.proc.poll() is None:
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait)
        self.shared.close()

"""A data-plane worker process: runs the DATA/ACK exchange of the transfers the TFTP service hands it.

Started by the service's WorkerPool (workers.py) as `python -P -m netboot.tftp.dataworker FD PARENT_PID BUSY_POLL` (-P: not
the working directory's checkout), FD being its end of a SOCK_SEQPACKET socketpair. Each AddTransfer comes with the transfer's socket and the file's memfd
(SCM_RIGHTS); the transfer runs in this process's DataPlane (datapath.py: the same loop, session and RTO as the
service's own thread) and its end goes back as TransferDone. The process ends when the service closes its end of
the socketpair, or dies (the same EOF; and PR_SET_PDEATHSIG as a second guard).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from typing import Callable

from domain.errors import MalformedPacket
from netboot.tftp.datapath import DataPlane, TransferResult, TransferWorker
from netboot.tftp.handoff import ADD_FDS, MAX_MESSAGE, AddTransfer, RemoveTransfer, TransferDone, decode, encode
from netboot.tftp.session import ReadSession
from netboot.tftp.sharedfiles import MappedFiles

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill this process when its parent ends; exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the control socket's EOF still ends the process
    if os.getppid() != parent_pid:
        sys.exit(0)


class WorkerProcess:
    """The worker's state: its data plane, the mapped files, the transfers running, the control socket."""

    def __init__(self, control: socket.socket, busy_poll: float = 0.0) -> None:
        self.control = control
        self.plane = DataPlane(spin=busy_poll)
        self.files = MappedFiles()
        self.running: dict[int, tuple[TransferWorker, int]] = {}  # transfer id -> (worker, mapped file key)
        self.lock = threading.Lock()  # running and files: the control thread and the plane's thread use them

    def _report(self, transfer_id: int, result: TransferResult) -> None:
        try:
            self.control.send(encode(TransferDone(transfer_id, result)))
        except OSError:
            pass  # the service is gone: this process ends on the control socket's EOF

    def _done_for(self, transfer_id: int) -> Callable[[TransferWorker], None]:
        def done(worker: TransferWorker) -> None:
            with self.lock:
                found = self.running.pop(transfer_id, None)
                if found is not None:
                    self.files.release(found[1])
            self._report(transfer_id, worker.result())
        return done

    def add(self, message: AddTransfer, fds: list[int]) -> None:
        """Start one transfer from its message and its two descriptors (taken over here)."""
        sock = socket.socket(fileno=fds[0])
        with self.lock:
            key, contents, shared = self.files.open(fds[1])
        try:
            session = ReadSession(contents, message.options, message.limits, shared)  # type: ignore[arg-type]
        except Exception as exc:  # never lose a transfer silently
            sock.close()
            with self.lock:
                self.files.release(key)
            self._report(message.transfer_id, TransferResult(None, f"data-plane worker: {exc!r}", 0, 0, 0))
            return
        worker = TransferWorker(sock, message.client, session, self._done_for(message.transfer_id))
        with self.lock:
            self.running[message.transfer_id] = (worker, key)
        self.plane.add(worker)

    def remove(self, transfer_id: int) -> None:
        """Stop one transfer without reporting it (the service no longer wants it)."""
        with self.lock:
            found = self.running.pop(transfer_id, None)
            if found is not None:
                self.files.release(found[1])
        if found is not None:
            self.plane.remove(found[0])

    def serve(self) -> None:
        """Apply the service's messages until its end of the socketpair closes."""
        try:
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, ADD_FDS)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return  # EOF: the service closed or died
                try:
                    message = decode(data)
                except MalformedPacket:
                    message = None
                if isinstance(message, AddTransfer) and len(fds) == ADD_FDS:
                    self.add(message, fds)
                    continue
                for fd in fds:
                    os.close(fd)
                if isinstance(message, RemoveTransfer):
                    self.remove(message.transfer_id)
        finally:
            self.plane.close()
            self.control.close()


def main(argv: list[str]) -> int:
    """Entry point: `python -m netboot.tftp.dataworker CONTROL_FD PARENT_PID [BUSY_POLL_SECONDS]`."""
    control_fd, parent_pid = int(argv[0]), int(argv[1])
    busy_poll = float(argv[2]) if len(argv) > 2 else 0.0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the service's to handle; it closes us
    die_with_parent(parent_pid)
    WorkerProcess(socket.socket(fileno=control_fd), busy_poll).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

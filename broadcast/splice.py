"""Kernel pipes for relays: splice(2) and tee(2) move the stream socket -> pipe -> child sockets without copies.

A relay splices the stream from its upstream socket into a pipe, duplicates it into one pipe per child
with tee(2) and splices those into the child sockets, so the bytes sent downstream are never copied
into Python; it still reads its own pipe once, because the sink hashes and decompresses every byte.
Python has os.splice but no os.tee: tee is called from libc through ctypes. Linux only.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import sys
import termios
from typing import Any

from broadcast.loopfd import forget_fd


# errno values by which splice(2) says an fd type cannot do it (the copy path takes over)
SPLICE_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})


class SplicePipe:
    """A non-blocking kernel pipe that splice(2) and tee(2) move page references through."""

    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass  # above fs.pipe-max-size or the user's pipe quota: keep the default (64 KiB)
        self.size = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def read(self, count: int) -> bytes:
        """Read exactly count bytes the caller knows are in the pipe."""
        data = os.read(self.r, count)
        while len(data) < count:
            more = os.read(self.r, count - len(data))
            if not more:
                raise AssertionError(f"pipe held {len(data)} bytes, expected {count}")
            data += more
        return data

    def pending(self) -> int:
        """Bytes in the pipe (FIONREAD)."""
        buf = bytearray(4)
        fcntl.ioctl(self.r, termios.FIONREAD, buf)
        return int.from_bytes(buf, sys.byteorder)

    def close(self) -> None:
        """Close both ends (idempotent)."""
        for fd in (self.r, self.w):
            if fd >= 0:
                forget_fd(fd)
                os.close(fd)
        self.r = self.w = -1


class KernelSplice:
    """splice(2) through os.splice and tee(2) through libc with ctypes (Python has no os.tee); Linux only.

    One per Receiver (no module state). `available` is False, with `reason`, where either is missing;
    relays then copy through Python. Tests subclass it to play an fd type that refuses splice.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.reason = ""
        self._tee: Any = None
        if not enabled:
            self.reason = "disabled"
        elif not sys.platform.startswith("linux") or not hasattr(os, "splice"):
            self.reason = "splice(2) needs Linux (and Python >= 3.10)"
        else:
            try:
                # PyDLL: the call keeps the GIL (a non-blocking tee only links pages: releasing the GIL for it
                # would invite a hand-off to the sink threads and back)
                fn = ctypes.PyDLL(None, use_errno=True).tee
            except (OSError, AttributeError):
                self.reason = "the C library has no tee(2)"
            else:
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
                fn.restype = ctypes.c_ssize_t
                self._tee = fn

    @property
    def available(self) -> bool:
        """True when both splice and tee can be called."""
        return self._tee is not None

    def splice(self, src: int, dst: int, count: int) -> int:
        """Move up to count bytes between a pipe and a socket; BlockingIOError when it would block, 0 at end of stream."""
        return os.splice(src, dst, count, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)

    def tee(self, src: int, dst: int, count: int) -> int:
        """Duplicate up to count bytes of pipe src into pipe dst without consuming them; 0 when dst is full."""
        n = int(self._tee(src, dst, count, os.SPLICE_F_NONBLOCK))
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return 0
            raise OSError(err, os.strerror(err))
        return n



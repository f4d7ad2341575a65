"""The serve command's logging: levels from the config (at start and at each reload) and, under systemd, records
sent to the journal with fields of their own (NODE=, MAC=, DEPLOYMENT=, STEP=).

The journal's native protocol (systemd-journald.service(8), "Native Journal Protocol"): one datagram per record
to /run/systemd/journal/socket holding `FIELD=value\\n` for each field, or, for a value with a newline,
`FIELD\\n`, its length as a little-endian 64-bit integer, the value and `\\n`. A record too large for a datagram
goes in a sealed memfd passed with SCM_RIGHTS. Written here (a few lines) rather than depending on python-systemd.
"""
from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import sys

from appliance.config import LogConfig
from domain.logfields import JOURNAL_FIELDS
from netboot.httplog import ACCESS_LOGGER

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "rackboot"
# syslog(3) priorities of the logging levels (the journal's PRIORITY=)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class LogLevels:
    """Applies a config's log levels; loggers a previous config named and this one does not go back to their
    parent's level (and the root to the command line's)."""

    def __init__(self) -> None:
        self.root = logging.getLogger()
        self.base = self.root.level  # the command line's: info for serve, debug with -vv
        self.named: set[str] = set()

    def apply(self, config: LogConfig) -> None:
        """Set the root level, each named logger's, and the HTTP access log's (info when on, else warning)."""
        self.root.setLevel(config.level.upper() if config.level else self.base)
        levels = dict(config.levels)
        levels.setdefault(ACCESS_LOGGER, "info" if config.http_access else "warning")
        for name in self.named - set(levels):
            logging.getLogger(name).setLevel(logging.NOTSET)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level.upper())
        self.named = set(levels)


def journal_fields(record: logging.LogRecord, message: str) -> list[tuple[str, str]]:
    """The journal fields of one record: MESSAGE, PRIORITY, where it was logged, and the node's fields it carries."""
    out = [("MESSAGE", message), ("PRIORITY", str(_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3))),
           ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER), ("LOGGER", record.name), ("CODE_FILE", record.pathname),
           ("CODE_LINE", str(record.lineno)), ("CODE_FUNC", record.funcName or "")]
    out += [(name, str(getattr(record, attribute, "") or "")) for attribute, name in JOURNAL_FIELDS.items()]
    return [(name, value) for name, value in out if value]


def encode_journal(items: list[tuple[str, str]]) -> bytes:
    """Encode fields in the journal's native protocol (a value with a newline in its length-prefixed form)."""
    parts = []
    for name, value in items:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalHandler(logging.Handler):
    """Sends each record to the journal as a datagram of fields; when the journal cannot take it, to stderr."""

    def __init__(self, path: str = JOURNAL_SOCKET, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.setFormatter(logging.Formatter("%(message)s"))  # time, level and logger are fields of their own

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record; a failure sends it to stderr (which systemd also gives the journal) instead."""
        try:
            data = encode_journal(journal_fields(record, self.format(record)))
            try:
                self.sock.sendto(data, self.path)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(data)
        except OSError:
            self.fallback.handle(record)
        except Exception:  # noqa: BLE001 - logging must not raise (logging.Handler.handleError reports it)
            self.handleError(record)

    def _send_memfd(self, data: bytes) -> None:
        """Send a record too large for a datagram: in a sealed memfd, passed with SCM_RIGHTS."""
        fd = os.memfd_create("rackboot-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
        super().close()


def under_journal(stream: int = 2, socket_path: str = JOURNAL_SOCKET) -> bool:
    """True when `stream` (stderr) is systemd's journal stream ($JOURNAL_STREAM names its device and inode,
    systemd.exec(5)) and the journal's socket is there."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream)
    except OSError:
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}" and os.path.exists(socket_path)


def setup_serve_logging(config: LogConfig) -> LogLevels:
    """At serve start: records to the journal when systemd runs us, and the config's levels; return the levels,
    which a reload applies again."""
    if under_journal():
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr:
                root.removeHandler(handler)
        root.addHandler(JournalHandler())
    levels = LogLevels()
    levels.apply(config)
    return levels

"""The JSON-lines control schema shared by the broadcast relays, the star client and tree exec.

Every control message is one JSON object on one line (UTF-8, '\n'-terminated) with a "type" and the
fields its schema names; anything else (unknown type, missing or mistyped field, line too long, not
JSON) raises domain.errors.MalformedPacket. Image bytes never travel as JSON: after a broadcast
handshake the downstream direction of the connection is the raw image stream (so it can be sent with
sendfile), the upstream direction stays JSON lines. Nothing is ever unpickled.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, Callable

from domain.errors import MalformedPacket
from domain.aio import within
from broadcast.loopfd import close_socket

VERSION = 1
SocketFactory = Callable[[tuple[Any, ...]], socket.socket]  # aiohappyeyeballs' signature: addr_info -> socket
ListenFactory = Callable[[str, int], socket.socket]  # (host, port) -> bound, listening socket
MAX_LINE = 1 << 20  # a hello carries a subtree: up to ~10k nodes fit

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_LIST = (list,)
_DICT = (dict,)
_BOOL = (bool,)

# type -> {field: allowed python types}; every listed field is required, extra fields are refused.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    # parent -> child, opens a data connection (broadcast)
    "hello": {"v": _INT, "session": _STR, "token": _STR, "from": _STR, "ancestors": _LIST, "tree": _LIST,
              "size": _INT, "sha256": _OPT_STR, "report": _LIST, "params": _DICT},
    # child -> parent
    "ready": {"offset": _INT},
    "ack": {"offsets": _LIST, "blocked": _BOOL, "reported": _BOOL},  # reported: its own result is on its way to the source
    "superseded": {"by": _STR},
    "error": {"reason": _STR},
    # relay -> source, on the report channel
    "report_hello": {"v": _INT, "session": _STR, "token": _STR, "node": _STR},
    "result": {"node": _STR, "ok": _BOOL, "reason": _STR, "bytes_received": _INT, "bytes_written": _INT,
               "sha256": _STR, "written_sha256": _STR, "durations": _DICT},
    "failed": {"node": _STR, "reason": _STR, "by": _STR},
    "orphan": {"node": _STR, "offset": _INT},
    "bypassed": {"node": _STR, "reason": _STR, "by": _STR},  # a suspect whose children its parent took over
    # coordinator -> node (star): fetch the image over HTTP into the armed sink
    "fetch": {"v": _INT, "session": _STR, "token": _STR, "url": _STR, "size": _OPT_INT, "sha256": _OPT_STR,
              "params": _DICT},
    "progress": {"offset": _INT},
    # tree exec (texec.py)
    "texec": {"v": _INT, "id": _STR, "command": _STR, "timeout": _NUM, "fanout": _INT, "connect_timeout": _NUM,
              "tree": _LIST, "max_output": _INT},
    "xresult": {"node": _STR, "status": _OPT_INT, "stdout": _STR, "stderr": _STR, "timed_out": _BOOL,
                "error": _OPT_STR, "duration": _NUM, "via": _STR},
    "xdone": {"node": _STR},
    # an agent that cannot open the next level (no tree key) hands its children back to its parent
    "xadopt": {"node": _STR, "trees": _LIST},
}

# The kinds a relay sends the source on the report channel (everything after its report_hello).
REPORT_KINDS = frozenset({"result", "failed", "orphan", "bypassed"})


def encode(kind: str, **fields: Any) -> bytes:
    """Return one JSON line for a message of the given type; raise ValueError when it breaks the schema."""
    msg = {"type": kind, **fields}
    check(msg)
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def check(msg: Any) -> dict[str, Any]:
    """Validate a decoded message against SCHEMA; raise MalformedPacket when it does not fit."""
    if not isinstance(msg, dict):
        raise MalformedPacket("control message: expected a JSON object")
    kind = msg.get("type")
    fields = SCHEMA.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise MalformedPacket(f"control message: unknown type {kind!r}")
    for name, types in fields.items():
        if name not in msg:
            raise MalformedPacket(f"{kind}: missing field {name!r}")
        value = msg[name]
        if isinstance(value, bool) and bool not in types:
            raise MalformedPacket(f"{kind}: field {name!r} has type bool")
        if not isinstance(value, types):
            raise MalformedPacket(f"{kind}: field {name!r} has type {type(value).__name__}")
    extra = set(msg) - set(fields) - {"type"}
    if extra:
        raise MalformedPacket(f"{kind}: unknown fields {sorted(extra)}")
    return msg


def decode(line: bytes) -> dict[str, Any]:
    """Decode and validate one JSON line; raise MalformedPacket on anything else."""
    if len(line) > MAX_LINE:
        raise MalformedPacket("control message: line too long")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"control message: not JSON: {exc}") from exc
    return check(msg)


class LineSocket:
    """JSON lines over a non-blocking socket, read with loop.sock_recv (no StreamReader copies).

    One task may read and another write at the same time; the image stream on a data connection
    uses the same socket through loop.sock_sendall / sock_sendfile / sock_recv.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self.closed = False

    async def send(self, kind: str, **fields: Any) -> None:
        """Send one message (messages from concurrent tasks never interleave)."""
        async with self._send_lock:
            await self._loop.sock_sendall(self.sock, encode(kind, **fields))

    async def recv(self) -> dict[str, Any] | None:
        """Return the next message, or None at end of stream; raise MalformedPacket on a bad one."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return decode(line)
            if len(self._buf) > MAX_LINE:
                raise MalformedPacket("control message: line too long")
            data = await self._loop.sock_recv(self.sock, 65536)
            if not data:
                return None
            self._buf += data

    def take_buffered(self) -> bytes:
        """Return (and forget) bytes read past the last line: the start of a raw stream."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def close(self, reset: bool = False) -> None:
        """Close the socket; reset=True sends an RST (a crash, as a peer sees it)."""
        if self.closed:
            return
        self.closed = True
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        close_socket(self.sock)  # unregistered first: a reader or writer cancelled meanwhile cleans up a loop turn later


async def open_connection(host: str, port: int, timeout: float,
                          socket_factory: SocketFactory | None = None) -> LineSocket:
    """Connect a non-blocking TCP socket within timeout; socket_factory (aiohappyeyeballs' signature,
    addr_info -> socket) lets the vm-testbed open it inside a node's network namespace."""
    loop = asyncio.get_running_loop()
    addr_info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))
    sock = socket_factory(addr_info) if socket_factory is not None else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await within(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        close_socket(sock)
        raise
    return LineSocket(sock)

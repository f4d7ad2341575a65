"""A node's data endpoint for image broadcast: accepts the connections of armed sessions (chain, tree, star).

The controller arms a session over SSH (the deploy agent's `arm` operation); a parent's `hello` then
starts a `Relay` (chain, tree) and a coordinator's `fetch` starts a `StarDownload` (star). Connections
without an armed session's token are refused.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket

from domain.errors import BindError, MalformedPacket
from domain.aio import within
from broadcast.errors import ProtocolError, describe_error
from broadcast.image import SinkSpec
from broadcast.loopfd import close_socket
from broadcast.relay import Relay
from broadcast.result import NodeResult
from broadcast.session import ArmedSession
from broadcast.splice import KernelSplice
from broadcast.star import StarDownload
from broadcast.wire import LineSocket, ListenFactory, SocketFactory

log = logging.getLogger("rackboot.broadcast")


class Receiver:
    """A node's data endpoint: accepts broadcast connections for armed sessions (chain, tree, star).

    One per deploy agent; many in one process in the vm-testbed (no globals). `listen_factory` and
    `socket_factory` let the testbed open the sockets inside the node's network namespace; `kernel`
    is how relays reach splice/tee (probed here by default).
    """

    def __init__(self, name: str, host: str, port: int = 0, *, listen_factory: ListenFactory | None = None,
                 socket_factory: SocketFactory | None = None, kernel: KernelSplice | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.listen_factory = listen_factory
        self.socket_factory = socket_factory
        self.kernel = kernel if kernel is not None else KernelSplice()
        self._armed: dict[str, ArmedSession] = {}
        self.relays: dict[str, Relay] = {}
        self._results: dict[str, asyncio.Future[NodeResult]] = {}
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.counters = {"connections": 0, "refused": 0, "dropped_malformed": 0}
        self.downloads: dict[str, StarDownload] = {}  # star sessions, by session id

    async def start(self) -> None:
        """Bind and listen (raise domain.errors.BindError when the address is unusable)."""
        try:
            if self.listen_factory is not None:
                sock = self.listen_factory(self.host, self.port)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(512)
        except OSError as exc:
            raise BindError(f"broadcast receiver {self.name}: cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept(), name=f"receiver:{self.name}")

    def arm(self, session: str, token: str, sink: SinkSpec) -> None:
        """Expect a session: only connections carrying its token are accepted; the stream goes to sink."""
        self._armed[session] = ArmedSession(session, token, sink)
        self._results.setdefault(session, asyncio.get_running_loop().create_future())

    async def wait_result(self, session: str, timeout: float | None = None) -> NodeResult:
        """Wait for this node's own result for an armed session."""
        fut = self._results.get(session)
        if fut is None:
            raise ProtocolError(f"session {session} is not armed on {self.name}")
        return await within(asyncio.shield(fut), timeout)

    def session_result(self, session: str, result: NodeResult) -> None:
        """Record this node's result (called by the relay or the star client)."""
        fut = self._results.get(session)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def progress(self, session: str) -> int:
        """Bytes of the session's stream received so far."""
        relay = self.relays.get(session)
        if relay is not None:
            return relay.received
        download = self.downloads.get(session)
        return download.offset if download is not None else 0

    async def _accept(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                log.warning("%s: accept failed: %s", self.name, describe_error(exc))
                await asyncio.sleep(0.1)
                continue
            self.counters["connections"] += 1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._handle(LineSocket(sock)), name=f"conn:{self.name}")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, conn: LineSocket) -> None:
        try:
            msg = await within(conn.recv(), 30.0)
        except MalformedPacket:
            self.counters["dropped_malformed"] += 1
            conn.close()
            return
        except (OSError, asyncio.TimeoutError):
            conn.close()
            return
        if msg is None:
            conn.close()
            return
        armed = self._armed.get(msg.get("session", ""))
        if msg["type"] not in ("hello", "fetch") or armed is None or not hmac.compare_digest(armed.token, msg.get("token", "")):
            self.counters["refused"] += 1
            try:
                await conn.send("error", reason="unknown session or bad token")
            except OSError:
                pass
            conn.close()
            return
        try:
            if msg["type"] == "hello":
                relay = self.relays.get(armed.session)
                if relay is None:
                    relay = Relay(self.name, armed, msg, kernel=self.kernel, on_result=self.session_result,
                                  socket_factory=self.socket_factory)
                    self.relays[armed.session] = relay
                    await relay.begin()
                await relay.attach(conn, msg)
            else:
                download = StarDownload(self.name, armed, on_result=self.session_result, socket_factory=self.socket_factory)
                self.downloads[armed.session] = download
                await download.serve(conn, msg)
        except (MalformedPacket, ProtocolError) as exc:
            self.counters["dropped_malformed"] += 1
            try:
                await conn.send("error", reason=str(exc))
            except OSError:
                pass
            conn.close()
        except OSError:
            conn.close()

    def tasks(self) -> list[asyncio.Task[None]]:
        """The tasks serving connections, and the star downloads running."""
        return list(self._handlers) + [d.task for d in self.downloads.values() if d.task is not None]

    def stop_listening(self) -> None:
        """Stop accepting connections (those accepted go on)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._sock is not None:
            close_socket(self._sock)  # unregistered now: the cancelled accept's clean-up comes a loop turn later

    async def close(self) -> None:
        """Stop listening and end every session."""
        self.stop_listening()
        self._sock = None
        for t in self.tasks():
            t.cancel()
        for relay in self.relays.values():
            relay.stop()
            if relay.sink.report is None:
                await relay.sink.abort("receiver closed")
        await asyncio.sleep(0)

    def stats(self) -> dict[str, int]:
        """Counters: connections, refused, dropped_malformed, sessions, and the relays' bytes by path."""
        out = {**self.counters, "sessions": len(self.relays)}
        for relay in self.relays.values():
            for k, v in relay.counters.items():
                out[k] = out.get(k, 0) + v
        return out

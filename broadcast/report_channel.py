"""A relay's report channel to the source (chain, tree): result, failed and orphan reports as JSON lines.

The channel opens with `report_hello {session, token, node}`; the source (broadcast.source.Source) serves the other end.
Reports are queued and written in the background, reconnecting a few times, so they never block the stream.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from broadcast.errors import describe_error
from broadcast.wire import VERSION, LineSocket, SocketFactory, encode, open_connection

log = logging.getLogger("rackboot.broadcast")


class ReportClient:
    """A relay's JSON-lines channel to the source: queued, reconnecting a few times, never blocking the stream."""

    def __init__(self, node: str, session: str, token: str, address: tuple[str, int], connect_timeout: float,
                 socket_factory: SocketFactory | None = None) -> None:
        self.node = node
        self.session = session
        self.token = token
        self.address = address
        self.connect_timeout = connect_timeout
        self.socket_factory = socket_factory
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    def send(self, kind: str, **fields: Any) -> None:
        """Queue one report (none once the channel is closed)."""
        if self.closed:
            return
        self._queue.put_nowait(encode(kind, **fields))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"report:{self.node}")

    async def _run(self) -> None:
        conn: LineSocket | None = None
        failures = 0
        backlog: list[bytes] = []
        loop = asyncio.get_running_loop()
        while failures < 5:
            if not backlog:
                backlog.append(await self._queue.get())
            while not self._queue.empty():
                backlog.append(self._queue.get_nowait())
            try:
                if conn is None:
                    conn = await open_connection(self.address[0], self.address[1], self.connect_timeout,
                                                 socket_factory=self.socket_factory)
                    await conn.send("report_hello", v=VERSION, session=self.session, token=self.token, node=self.node)
                await loop.sock_sendall(conn.sock, b"".join(backlog))
                backlog.clear()
                failures = 0
            except (OSError, asyncio.TimeoutError) as exc:
                failures += 1
                log.debug("%s: report channel: %s", self.node, describe_error(exc))
                if conn is not None:
                    conn.close()
                    conn = None
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
        if conn is not None:
            conn.close()

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until queued reports are written."""
        end = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)

    def close(self) -> None:
        """Stop the channel."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()

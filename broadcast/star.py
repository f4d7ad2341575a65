"""Star broadcast: every node downloads the image from the appliance's HTTP server, a bounded number at once.

The coordinator (appliance side) opens a control connection to each node's Receiver, at most
`concurrency` at a time, and sends `fetch {url, size, sha256}`; the node GETs the URL with aiohttp
(resuming with a Range request after an error), writes through its sink, sends `progress {offset}`
every ack_interval and finally `result {...}` on the same connection. A node that sends nothing for
stall_timeout is failed; closing the control connection makes the node abort its download.
`StarDownload` is the node side (the node's Receiver runs one per `fetch`), `star_broadcast` the coordinator.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import aiohttp

from domain.errors import MalformedPacket
from domain.aio import within
from broadcast.errors import describe_error
from broadcast.image import AsyncImageSink
from broadcast.params import ChainParams
from broadcast.result import SOURCE_NAME, BroadcastResult, NodeResult
from broadcast.session import ArmedSession, StreamClock, node_result
from broadcast.topology import Target
from broadcast.wire import VERSION, LineSocket, SocketFactory, open_connection

ResultCallback = Callable[[str, NodeResult], None]  # (session, this node's result)


class StarDownload:
    """Node side of one star session: download the image over HTTP into the armed sink, reporting on the control connection."""

    def __init__(self, node: str, armed: ArmedSession, *, on_result: ResultCallback,
                 socket_factory: SocketFactory | None = None) -> None:
        self.node = node
        self.armed = armed
        self.on_result = on_result
        self.socket_factory = socket_factory
        self.offset = 0  # bytes of the image received so far
        self.task: asyncio.Task[None] | None = None  # the HTTP download, while it runs
        self.clock = StreamClock()

    async def serve(self, conn: LineSocket, msg: dict[str, Any]) -> None:
        """Download msg['url'] (a `fetch` request) into the sink; report progress and the result on conn."""
        params = ChainParams.from_json(msg["params"])
        sink = AsyncImageSink(self.armed.sink_for(msg["size"], msg["sha256"]), max_queued=params.sink_queue)
        await sink.start()
        self.clock = StreamClock()

        async def progress() -> None:
            while True:
                await conn.send("progress", offset=self.offset)
                await asyncio.sleep(params.ack_interval)

        async def watch_coordinator() -> None:
            while (await conn.recv()) is not None:
                pass  # the coordinator sends nothing more; EOF means it gave up on us

        tasks = [asyncio.create_task(progress()), asyncio.create_task(watch_coordinator())]
        fetch = self.task = asyncio.create_task(self._download(msg["url"], msg["size"], sink, params))
        try:
            done, _ = await asyncio.wait([fetch, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
            if fetch in done and fetch.exception() is None:
                report = await sink.close()
            else:
                reason = "coordinator went away" if fetch not in done else f"download failed: {describe_error(fetch.exception())}"  # type: ignore[arg-type]
                fetch.cancel()
                report = await sink.abort(reason)
        except asyncio.CancelledError:
            fetch.cancel()
            await sink.abort("cancelled")
            raise
        finally:
            for t in tasks:
                t.cancel()
            self.task = None
        result = node_result(self.node, report, self.clock)
        self.on_result(self.armed.session, result)
        try:
            await conn.send("result", **result.report_fields())
        except OSError:
            pass
        conn.close()

    async def _download(self, url: str, size: int | None, sink: AsyncImageSink, params: ChainParams) -> None:
        """GET url into sink, resuming with a Range request after an error (up to 3 retries)."""
        connector = aiohttp.TCPConnector(limit=1, socket_factory=self.socket_factory) if self.socket_factory \
            else aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=None, connect=params.connect_timeout, sock_read=params.stall_timeout)
        attempts = 0
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            while True:
                headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
                try:
                    async with http.get(url, headers=headers) as resp:
                        if resp.status not in ((206,) if self.offset else (200,)):
                            raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status,
                                                              message=f"HTTP {resp.status}")
                        async for chunk in resp.content.iter_chunked(params.chunk):
                            self.clock.data()
                            self.offset += len(chunk)
                            await sink.put(chunk)
                    if size is None or self.offset >= size:
                        return
                    raise aiohttp.ClientPayloadError(f"short body: {self.offset} of {size} bytes")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    attempts += 1
                    if attempts > 3:
                        raise
                    await asyncio.sleep(0.2 * 2**attempts)


async def _fetch_one(target: Target, url: str, size: int | None, sha256: str | None, session: str, token: str,
                     params: ChainParams, socket_factory: SocketFactory | None) -> NodeResult:
    try:
        conn = await open_connection(target.host, target.port, params.connect_timeout, socket_factory=socket_factory)
    except (OSError, asyncio.TimeoutError) as exc:
        return NodeResult(name=target.name, reason=f"unreachable: {describe_error(exc)}", reported_by=SOURCE_NAME)
    offset = 0
    try:
        await conn.send("fetch", v=VERSION, session=session, token=token, url=url, size=size, sha256=sha256,
                        params=params.to_json())
        while True:
            msg = await within(conn.recv(), params.stall_timeout)
            if msg is None:
                return NodeResult(name=target.name, reason=f"connection lost at offset {offset}", reported_by=SOURCE_NAME)
            if msg["type"] == "progress":
                offset = msg["offset"]
            elif msg["type"] == "error":
                return NodeResult(name=target.name, reason=f"refused: {msg['reason']}", reported_by=SOURCE_NAME)
            elif msg["type"] == "result":
                return NodeResult.from_report(msg, target.name)
            else:
                raise MalformedPacket(f"unexpected {msg['type']}")
    except asyncio.TimeoutError:
        return NodeResult(name=target.name, reason=f"stalled: nothing heard for {params.stall_timeout:g} s at offset {offset}",
                          reported_by=SOURCE_NAME)
    except (OSError, MalformedPacket) as exc:
        return NodeResult(name=target.name, reason=f"connection lost at offset {offset}: {describe_error(exc)}", reported_by=SOURCE_NAME)
    finally:
        conn.close()


async def star_broadcast(url: str, targets: Sequence[Target], *, session: str, token: str, size: int | None,
                         sha256: str | None, concurrency: int = 32, params: ChainParams = ChainParams(),
                         deadline: float | None = None, socket_factory: SocketFactory | None = None) -> BroadcastResult:
    """Have every target download url (at most `concurrency` at once); return per-node results."""
    sem = asyncio.Semaphore(max(1, concurrency))
    t0 = time.monotonic()

    async def one(t: Target) -> NodeResult:
        async with sem:
            return await _fetch_one(t, url, size, sha256, session, token, params, socket_factory)

    tasks = {t.name: asyncio.create_task(one(t), name=f"star:{t.name}") for t in targets}
    done, pending = await asyncio.wait(tasks.values(), timeout=deadline) if tasks else (set(), set())
    for p in pending:
        p.cancel()
    nodes: dict[str, NodeResult] = {}
    for name, task in tasks.items():
        if task in done and not task.cancelled() and task.exception() is None:
            r = task.result()
            if r.ok and sha256 and r.sha256 != sha256:
                r.ok, r.reason = False, f"sha256 mismatch: {r.sha256} != {sha256}"
        else:
            r = NodeResult(name=name, reason=f"no result within {deadline:g} s" if task in pending else f"error: {task.exception()!r}",
                           reported_by=SOURCE_NAME)
        nodes[name] = r
    return BroadcastResult(method="star", size=size or 0, sha256=sha256, nodes=nodes, seconds=time.monotonic() - t0)

"""Star broadcast: every node downloads the image from the appliance's HTTP server, a bounded number at once.

The coordinator (appliance side) opens a control connection to each node's Receiver, at most
`concurrency` at a time, and sends `fetch {url, size, sha256}`; the node GETs the URL with aiohttp
(resuming with a Range request after an error), writes through its sink, sends `progress {offset}`
every ack_interval and finally `result {...}` on the same connection. A node that sends nothing for
stall_timeout is failed; closing the control connection makes the node abort its download.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Sequence

import aiohttp

from domain.errors import MalformedPacket
from broadcast.chain import ChainParams, _err
from broadcast.image import AsyncImageSink, SinkSpec
from broadcast.result import BroadcastResult, NodeResult
from broadcast.topology import Target
from broadcast.wire import VERSION, LineSocket, open_connection

if TYPE_CHECKING:
    from broadcast.chain import ArmedSession, Receiver, SocketFactory


async def serve_fetch(receiver: "Receiver", armed: "ArmedSession", conn: LineSocket, msg: dict[str, Any]) -> None:
    """Node side: download msg['url'] into the armed sink, reporting progress and the result on conn."""
    params = ChainParams.from_json(msg["params"])
    spec = armed.sink
    sink = AsyncImageSink(SinkSpec(**{**spec.to_json(),
                                      "expected_sha256": spec.expected_sha256 or msg["sha256"],
                                      "expected_size": spec.expected_size if spec.expected_size is not None else msg["size"]}),
                          max_queued=params.sink_queue)
    await sink.start()
    session = armed.session
    state = {"offset": 0, "first": 0.0, "last": 0.0}
    t0 = time.monotonic()

    async def progress() -> None:
        while True:
            await conn.send("progress", offset=state["offset"])
            await asyncio.sleep(params.ack_interval)

    async def watch_coordinator() -> None:
        while (await conn.recv()) is not None:
            pass  # the coordinator sends nothing more; EOF means it gave up on us

    async def download() -> None:
        connector = aiohttp.TCPConnector(limit=1, socket_factory=receiver.socket_factory) if receiver.socket_factory \
            else aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=None, connect=params.connect_timeout, sock_read=params.stall_timeout)
        attempts = 0
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            while True:
                headers = {"Range": f"bytes={state['offset']}-"} if state["offset"] else {}
                try:
                    async with http.get(msg["url"], headers=headers) as resp:
                        if resp.status not in ((206,) if state["offset"] else (200,)):
                            raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status,
                                                              message=f"HTTP {resp.status}")
                        async for chunk in resp.content.iter_chunked(params.chunk):
                            now = time.monotonic()
                            state["first"] = state["first"] or now
                            state["last"] = now
                            state["offset"] += len(chunk)
                            receiver._star_progress[session] = state["offset"]
                            await sink.put(chunk)
                    if msg["size"] is None or state["offset"] >= msg["size"]:
                        return
                    raise aiohttp.ClientPayloadError(f"short body: {state['offset']} of {msg['size']} bytes")
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    attempts += 1
                    if attempts > 3:
                        raise
                    await asyncio.sleep(0.2 * 2**attempts)

    tasks = [asyncio.create_task(progress()), asyncio.create_task(watch_coordinator())]
    fetch = asyncio.create_task(download())
    receiver._star_tasks[session] = fetch
    try:
        done, _ = await asyncio.wait([fetch, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
        if fetch in done and fetch.exception() is None:
            report = await sink.close()
        else:
            reason = "coordinator went away" if fetch not in done else f"download failed: {_err(fetch.exception())}"  # type: ignore[arg-type]
            fetch.cancel()
            report = await sink.abort(reason)
    except asyncio.CancelledError:
        fetch.cancel()
        await sink.abort("cancelled")
        raise
    finally:
        for t in tasks:
            t.cancel()
        receiver._star_tasks.pop(session, None)
    now = time.monotonic()
    first, last = state["first"] or now, state["last"] or now
    durations = {"wait": round(first - t0, 6), "transfer": round(last - first, 6), "write_tail": round(now - last, 6),
                 "total": round(now - t0, 6)}
    result = NodeResult(name=receiver.name, ok=report.ok, reason=report.reason, bytes_received=report.bytes_received,
                        bytes_written=report.bytes_written, sha256=report.sha256, written_sha256=report.written_sha256,
                        durations=durations, reported_by=receiver.name)
    receiver.session_result(session, result)
    try:
        await conn.send("result", node=receiver.name, ok=report.ok, reason=report.reason, bytes_received=report.bytes_received,
                        bytes_written=report.bytes_written, sha256=report.sha256, written_sha256=report.written_sha256,
                        durations=durations)
    except OSError:
        pass
    conn.close()


async def _fetch_one(target: Target, url: str, size: int | None, sha256: str | None, session: str, token: str,
                     params: ChainParams, socket_factory: "SocketFactory | None") -> NodeResult:
    try:
        conn = await open_connection(target.host, target.port, params.connect_timeout, socket_factory=socket_factory)
    except (OSError, asyncio.TimeoutError) as exc:
        return NodeResult(name=target.name, reason=f"unreachable: {_err(exc)}", reported_by="@source")
    offset = 0
    try:
        await conn.send("fetch", v=VERSION, session=session, token=token, url=url, size=size, sha256=sha256,
                        params=params.to_json())
        while True:
            msg = await asyncio.wait_for(conn.recv(), params.stall_timeout)
            if msg is None:
                return NodeResult(name=target.name, reason=f"connection lost at offset {offset}", reported_by="@source")
            if msg["type"] == "progress":
                offset = msg["offset"]
            elif msg["type"] == "error":
                return NodeResult(name=target.name, reason=f"refused: {msg['reason']}", reported_by="@source")
            elif msg["type"] == "result":
                return NodeResult(name=target.name, ok=msg["ok"], reason=msg["reason"], bytes_received=msg["bytes_received"],
                                  bytes_written=msg["bytes_written"], sha256=msg["sha256"], written_sha256=msg["written_sha256"],
                                  durations={k: float(v) for k, v in msg["durations"].items() if isinstance(v, (int, float))},
                                  reported_by=target.name)
            else:
                raise MalformedPacket(f"unexpected {msg['type']}")
    except asyncio.TimeoutError:
        return NodeResult(name=target.name, reason=f"stalled: nothing heard for {params.stall_timeout:g} s at offset {offset}",
                          reported_by="@source")
    except (OSError, MalformedPacket) as exc:
        return NodeResult(name=target.name, reason=f"connection lost at offset {offset}: {_err(exc)}", reported_by="@source")
    finally:
        conn.close()


async def star_broadcast(url: str, targets: Sequence[Target], *, session: str, token: str, size: int | None,
                         sha256: str | None, concurrency: int = 32, params: ChainParams = ChainParams(),
                         deadline: float | None = None, socket_factory: "SocketFactory | None" = None) -> BroadcastResult:
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
                           reported_by="@source")
        nodes[name] = r
    return BroadcastResult(method="star", size=size or 0, sha256=sha256, nodes=nodes, seconds=time.monotonic() - t0)

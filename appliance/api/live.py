"""GET /api/v1/live: what the web dashboard watches, as server-sent events (text/event-stream).

Events, each `event: NAME` with one JSON `data:` line:
- `hello` first: {user, admin}; a client (re)loads its snapshot from the REST API when it gets it, so nothing
  between its snapshot and the stream is lost;
- `node`: a boot record of an inventory node, {node, rack, event} (the Event of GET /api/v1/nodes: no secret);
- `deployment`: one log entry of a deployment the user may see (their own, or any for an admin), {id, user,
  entry}, the entries of GET /api/v1/deployments/ID/events;
- `resync`: records were dropped (a slow client): reload the snapshot.
A comment line every STREAM_KEEPALIVE_S keeps proxies from closing an idle stream. The stream ends when the
client goes away, when the appliance shuts down, or after ?seconds= when given.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from appliance.api.base import Call
from appliance.api.deps import ApiDeps, EventFeed
from appliance.api.nodes import event_view
from domain.progress import NodeEvent
from domain.aio import within

STREAM_KEEPALIVE_S = 15.0
POLL_S = 0.25  # how often the deployments' logs are looked at when no boot record arrives
QUEUE = 2000   # boot records queued per client before the oldest are dropped (and the client told to resync)


def frame(name: str, data: Any) -> bytes:
    """One server-sent event: its name and one line of JSON."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _Deployments:
    """The new log entries of the deployments a user may see, since the stream began."""

    def __init__(self, deps: ApiDeps, user: str, admin: bool) -> None:
        self.deps, self.user, self.admin = deps, user, admin
        # entries already there are in the client's snapshot; deployments started later are followed from their start
        self.seen: dict[str, int] = {dep_id: len(dep.log) for dep_id, dep in deps.controller.deployments.items()}

    def frames(self) -> list[bytes]:
        """Frames of the entries added since the last call."""
        out: list[bytes] = []
        for dep_id, dep in list(self.deps.controller.deployments.items()):
            log, seen = dep.log, self.seen.get(dep_id, 0)
            if len(log) <= seen:
                continue
            self.seen[dep_id] = len(log)
            if self.admin or dep.user == self.user:
                out += [frame("deployment", {"id": dep_id, "user": dep.user, "entry": entry}) for entry in log[seen:]]
        return out


async def live(deps: ApiDeps, call: Call) -> web.StreamResponse:
    """GET /api/v1/live: node records and deployment progress as server-sent events, until the client goes away."""
    me = call.me
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(call.request)
    inventory = deps.inventory
    deployments = _Deployments(deps, me.name, me.admin)
    end = time.monotonic() + call.query.seconds if call.query.seconds is not None else None
    with deps.events.subscribe(QUEUE, lambda e: e.mac in inventory.by_mac) as sub:
        try:
            await resp.write(frame("hello", {"user": me.name, "admin": me.admin}))
            dropped, idle_since = 0, time.monotonic()
            while not deps.closing.is_set() and (end is None or time.monotonic() < end):
                out = [_node_frame(deps, e) for e in await _next_records(sub)]
                out = [f for f in out if f] + deployments.frames()
                if sub.dropped != dropped:
                    dropped = sub.dropped
                    out.append(frame("resync", {"dropped": dropped}))
                if not out and time.monotonic() - idle_since >= STREAM_KEEPALIVE_S:
                    out.append(b": keepalive\n\n")
                if out:
                    await resp.write(b"".join(out))
                    idle_since = time.monotonic()
        except ConnectionResetError:
            pass  # the client went away
    return resp


async def _next_records(sub: EventFeed) -> list[NodeEvent]:
    """The boot records queued now, waiting up to POLL_S for the first one."""
    try:
        first = await within(sub.get(), POLL_S)
    except asyncio.TimeoutError:
        return []
    records = [first]
    while (more := sub.get_nowait()) is not None:
        records.append(more)
    return records


def _node_frame(deps: ApiDeps, event: NodeEvent) -> bytes:
    """The `node` frame of a boot record (empty when its MAC left the inventory meanwhile)."""
    node = deps.inventory.by_mac.get(event.mac)
    if node is None:
        return b""
    return frame("node", {"node": node.name, "rack": node.rack, "event": event_view(event).model_dump(mode="json")})

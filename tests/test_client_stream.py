"""The CLI's client reads a streaming endpoint's JSON lines whatever their length (a deployment of thousands of nodes)."""
from __future__ import annotations

import json

from aiohttp import web

from appliance.client import Api


async def test_stream_yields_lines_longer_than_aiohttps_line_limit() -> None:
    big = {"what": "result", "result": {"ok": [f"node-{i}" for i in range(60_000)]}}  # ~0.8 MB on one line
    body = (json.dumps({"what": "state", "n": 1}) + "\n" + json.dumps(big) + "\n" + json.dumps({"what": "end"})).encode()

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(0, len(body), 70_000):  # lines cut across writes, the last without its newline
            await resp.write(body[i:i + 70_000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with Api(f"http://127.0.0.1:{port}", "") as api:
            got = [msg async for msg in api.stream("/events")]
    finally:
        await runner.cleanup()
    assert len(body) > 524288
    assert got == [{"what": "state", "n": 1}, big, {"what": "end"}]

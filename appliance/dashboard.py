"""The web dashboard at `/`: three static files (appliance/web/) whose JavaScript reads the REST API and its live
stream (GET /api/v1/live) with the user's API token, which it keeps in the tab's sessionStorage (docs/dashboard.md).

What is served here carries no data at all, so it needs no token: without one, the page shows its login form
and nothing else. Every answer forbids inline scripts, framing, sniffing and referrers (CSP and friends).
"""
from __future__ import annotations

from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).parent / "web"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
HEADERS = {
    # Only this appliance's own files; no inline script or style, no plugin, no frame, no form posted elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def _index(request: web.Request) -> web.Response:
    return web.Response(body=(WEB_DIR / "index.html").read_bytes(), content_type="text/html", charset="utf-8",
                        headers=HEADERS)


async def _asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(body=(WEB_DIR / name).read_bytes(), content_type=ASSETS[name], charset="utf-8", headers=HEADERS)


def add_dashboard(app: web.Application) -> None:
    """Serve the dashboard on app: GET / (the page) and GET /ui/NAME (its script and style sheet)."""
    app.router.add_get("/", _index)
    app.router.add_get("/ui/{name}", _asset)

"""The HTTP service: per-MAC iPXE scripts, iPXE binaries, static files and progress callbacks.

aiohttp on the appliance's loop. Later code (deployment controller, REST API) adds routes to `.app`
before start(). Per-node connections are kept short (KEEPALIVE_TIMEOUT_S): iPXE EFI starts every boot
with the same TCP source port and initial sequence number, and a connection the server still holds from
the previous boot makes the new SYN fail once (field notes).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from pathlib import Path
from typing import Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from appliance.config import ApplianceConfig
from domain.errors import BindError
from appliance.events import EventBus, EventKind
from domain.nodes import Node, normalize_mac
from domain.profiles import BootProfile
from appliance.profiles import ProfileStore
from ipxe import callback_path, nbp_path, script_path
from ipxe.script import BOOTING_KINDS, ScriptTiming, boot_images, render_script, render_unknown_script, url_path

log = logging.getLogger("rackboot.http")

KEEPALIVE_TIMEOUT_S = 1.0
SHUTDOWN_TIMEOUT_S = 2.0
LISTEN_BACKLOG = 1024
FILE_CHUNK_SIZE = 256 * 1024

# What a node outside the inventory boots when dhcp.unknown_macs is 'discovery' and nobody set another
# profile: files laid out under the HTTP files root by convention.
DEFAULT_DISCOVERY_PROFILE = BootProfile(
    kind="discovery",
    kernel="discovery/vmlinuz",
    initrds=("discovery/initrd.img",),
    cmdline="console=ttyS0 rackboot.mac={mac} rackboot.callback={callback}",
    env="discovery",
)

_COUNTERS = (
    "received", "sent", "scripts", "script_polls_quiet", "nbps", "files", "files_anonymous", "files_aborted",
    "callbacks", "not_found", "forbidden", "bad_request", "dropped_malformed",
)


class _ReportingFileResponse(web.FileResponse):
    """A FileResponse that reports once the whole body went out (sendfile, Range handled by aiohttp)."""

    def __init__(self, path: Path, on_sent: Callable[[web.StreamResponse], None], on_aborted: Callable[[], None]) -> None:
        super().__init__(path, chunk_size=FILE_CHUNK_SIZE)
        self._on_sent = on_sent
        self._on_aborted = on_aborted

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the file, then report it (aiohttp calls this once, after the handler returned)."""
        try:
            writer = await super().prepare(request)
        except (ConnectionError, asyncio.CancelledError):
            self._on_aborted()
            raise
        self._on_sent(self)
        return writer


class HttpService:
    """aiohttp application serving what iPXE, the deploy environment and operators fetch over HTTP."""

    name = "http"

    def __init__(
        self,
        config: ApplianceConfig,
        events: EventBus,
        profiles: ProfileStore,
        mac_for_ip: Callable[[ipaddress.IPv4Address], str | None],
        *,
        discovery: BootProfile = DEFAULT_DISCOVERY_PROFILE,
        timing: ScriptTiming = ScriptTiming(),
    ) -> None:
        self._config = config
        self._events = events
        self._profiles = profiles
        self._mac_for_ip = mac_for_ip
        self.discovery = discovery
        self._timing = timing
        self._base_url = config.http_base
        self._files_root = config.http.files
        self._nbp_names = {n for n in (config.boot.bios_nbp, config.boot.uefi_nbp, config.boot.arm64_nbp) if n}
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._count_middleware])
        r = self.app.router
        r.add_get(script_path("{mac}"), self._script)
        r.add_get(nbp_path("{name}"), self._nbp)
        r.add_get("/files/{path:.+}", self._file)
        r.add_post(callback_path("{mac}"), self._callback)
        # iPXE cannot POST (PARAM_CMD is off in the 2019 build): scripts report with a GET and a query.
        r.add_get(callback_path("{mac}"), self._callback)

    # -- Service contract ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the HTTP port on the appliance address; raise BindError when that fails."""
        self._files_root = self._config.http.files.resolve()
        runner = web.AppRunner(
            self.app,
            access_log=None,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            handle_signals=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, str(self._config.ip), self._config.http.port, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BindError(
                f"http: cannot listen on {self._config.ip}:{self._config.http.port}: {exc.strerror or exc}"
                " (is another server using the port, or is the address not configured on "
                f"{self._config.interface}?)"
            ) from exc
        http = self._config.http
        if http.tls_cert is not None and http.tls_key is not None:
            # Optional HTTPS for the API and operators; nodes keep plain HTTP (iPXE has no CA for our certificate).
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(str(http.tls_cert), str(http.tls_key))
                await web.TCPSite(runner, str(self._config.ip), http.tls_port, ssl_context=context, backlog=LISTEN_BACKLOG).start()
            except (OSError, ssl.SSLError) as exc:
                await runner.cleanup()
                raise BindError(f"http: cannot serve HTTPS on {self._config.ip}:{http.tls_port}: {exc}") from exc
            log.info("http: serving https://%s:%d/", self._config.ip, http.tls_port)
        self._runner = runner
        log.info("http: serving %s/ (files %s)", self._base_url, self._files_root)

    async def serve(self) -> None:
        """Serve until cancelled (aiohttp serves from the listening socket bound in start())."""
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        """Stop listening and close connections; safe to call twice and after a failed start."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def stats(self) -> dict[str, int]:
        """Return request counters."""
        return dict(self._counters)

    # -- helpers -----------------------------------------------------------------------------------

    @web.middleware
    async def _count_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        self._counters["received"] += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            key = {404: "not_found", 403: "forbidden", 400: "bad_request"}.get(exc.status)
            if key:
                self._counters[key] += 1
            raise
        self._counters["sent"] += 1
        return response

    def _profile_for(self, mac: str, node: Node | None) -> BootProfile | None:
        """Return what a MAC boots, or None for a MAC outside the inventory that is ignored."""
        if node is not None:
            return self._profiles.get(mac)
        explicit = self._profiles.all().get(mac)
        if explicit is not None:
            return explicit
        if self._config.dhcp.unknown_macs == "discovery":
            return self.discovery
        return None

    def _requester_mac(self, request: web.Request) -> str | None:
        """Return the MAC of the node making a request: ?mac= first, else its address."""
        if "mac" in request.query:
            try:
                return normalize_mac(request.query["mac"])
            except ValueError:
                return None
        try:
            addr = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is None:
                return None
            addr = addr.ipv4_mapped
        mac = self._mac_for_ip(addr)
        return mac.lower() if mac else None

    @staticmethod
    def _mac_param(request: web.Request) -> str:
        try:
            return normalize_mac(request.match_info["mac"])
        except ValueError:
            raise web.HTTPNotFound(text="not a MAC address\n") from None

    def _safe_file(self, relative: str) -> Path:
        """Return the file under the files root named by a request path; refuse any escape from the root."""
        root = self._files_root
        try:
            path = (root / relative).resolve()
        except (ValueError, OSError):
            raise web.HTTPNotFound() from None
        if not path.is_relative_to(root):
            raise web.HTTPForbidden(text="outside the files root\n")
        if not path.is_file():
            raise web.HTTPNotFound()
        return path

    # -- iPXE ---------------------------------------------------------------------------------------

    async def _script(self, request: web.Request) -> web.Response:
        """GET /boot/MAC.ipxe: the node's iPXE script for its current boot profile."""
        mac = self._mac_param(request)
        node = self._config.inventory.by_mac.get(mac)
        profile = self._profile_for(mac, node)
        if profile is None:
            text, kind = render_unknown_script(mac), "unknown"
        else:
            text, kind = render_script(profile, node, mac, self._base_url, timing=self._timing), profile.kind
        self._counters["scripts"] += 1
        error = request.query.get("error")
        if error:
            self._events.publish(mac, EventKind.CALLBACK, stage="ipxe", status="failed",
                                 message=f"{error} failed after {self._timing.tries} tries", remote=request.remote or "")
        last = self._events.last(mac, 1)
        if "poll" in request.query and last and last[0].kind == EventKind.SCRIPT_FETCHED and last[0].detail.get("profile") == kind:
            # A node waiting without a profile polls every few seconds: record the first poll only, so
            # its DHCP/TFTP events stay in the per-MAC history.
            self._counters["script_polls_quiet"] += 1
        else:
            self._events.publish(mac, EventKind.SCRIPT_FETCHED, profile=kind, node=node.name if node else "",
                                 env=profile.env if profile else "", remote=request.remote or "")
        return web.Response(text=text, content_type="text/plain")

    async def _nbp(self, request: web.Request) -> web.StreamResponse:
        """GET /nbp/NAME: an iPXE binary, for UEFI HTTP boot; only the configured NBP names."""
        name = request.match_info["name"]
        path = self._config.boot.ipxe_dir / name
        if name not in self._nbp_names or not path.is_file():
            raise web.HTTPNotFound()
        self._counters["nbps"] += 1
        return _ReportingFileResponse(path, lambda response: self._publish_nbp(request, name, response), self._aborted)

    def _publish_nbp(self, request: web.Request, name: str, response: web.StreamResponse) -> None:
        mac = self._requester_mac(request)
        if mac is not None and request.method == "GET" and response.status == 200:
            self._events.publish(mac, EventKind.NBP_SENT, file=name, transport="http", remote=request.remote or "")

    def _aborted(self) -> None:
        self._counters["files_aborted"] += 1

    # -- files --------------------------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        """GET /files/PATH: a file under the files root, with Range and sendfile; publishes who fetched what."""
        relative = request.match_info["path"]
        path = self._safe_file(relative)
        if request.method != "GET":
            return web.FileResponse(path, chunk_size=FILE_CHUNK_SIZE)
        return _ReportingFileResponse(path, lambda response: self._publish_fetch(request, relative, response), self._aborted)

    def _publish_fetch(self, request: web.Request, relative: str, response: web.StreamResponse) -> None:
        self._counters["files"] += 1
        if response.status not in (200, 206):
            return
        mac = self._requester_mac(request)
        if mac is None:
            self._counters["files_anonymous"] += 1
            return
        kind = EventKind.FILE_FETCHED
        node = self._config.inventory.by_mac.get(mac)
        profile = self._profile_for(mac, node)
        if profile is not None and profile.kind in BOOTING_KINDS:
            images = boot_images(profile, node, mac, self._base_url)
            if url_path(images.kernel_url, self._base_url) == request.path:
                kind = EventKind.KERNEL_FETCHED
            elif any(url_path(url, self._base_url) == request.path for url, _ in images.initrds):
                kind = EventKind.INITRD_FETCHED
        detail: dict[str, object] = {"file": relative, "status": response.status, "remote": request.remote or ""}
        if response.content_length is not None:
            detail["bytes"] = response.content_length
        if "Range" in request.headers:
            detail["range"] = request.headers["Range"]
        self._events.publish(mac, kind, **detail)

    # -- callbacks ----------------------------------------------------------------------------------

    async def _callback(self, request: web.Request) -> web.Response:
        """POST /callback/MAC with JSON {stage, status, message, ...} (or GET with a query, from iPXE)."""
        mac = self._mac_param(request)
        if request.method == "POST":
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                body = None
            if not isinstance(body, dict):
                self._counters["dropped_malformed"] += 1
                raise web.HTTPBadRequest(text="expected a JSON object {stage, status, message, ...}\n")
        else:
            body = dict(request.query)
        detail = {
            str(k): (v if isinstance(v, str) else json.dumps(v))
            for k, v in body.items()
            if k not in ("mac", "kind")  # the event's own fields
        }
        detail.setdefault("remote", request.remote or "")
        self._counters["callbacks"] += 1
        event = self._events.publish(mac, EventKind.CALLBACK, **detail)
        return web.json_response({"ok": True, "event": event.to_json()})

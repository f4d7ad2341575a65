"""The HTTP service: the node-facing routes: per-MAC iPXE scripts, iPXE binaries, files, images and callbacks.

aiohttp on the appliance's loop. The REST API (`appliance/api/`) adds its routes to `.app` before start().
Per-node connections are kept short (KEEPALIVE_TIMEOUT_S): iPXE EFI starts every boot with the same TCP
source port and initial sequence number, and a connection the server still holds from the previous boot
makes the new SYN fail once, for 0.24 s (field notes).

One node record per thing served: `ScriptServed`, `NbpSent`, `KernelFetched`, `InitrdFetched`, `FileSent`,
and for callbacks `AgentUp`/`OsUp` (after the node's one-time token is checked here, the one place it
is), `NodeReport` or `BootFailed`. Records carry no token.
"""
from __future__ import annotations

import asyncio
import time
import ipaddress
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from domain.latency import Latency
from domain.errors import BindError
from domain.logfields import fields
from domain.nodes import normalize_mac
from domain.progress import (
    AGENT_STAGES,
    CLAIMED_STAGES,
    AgentUp,
    BootFailed,
    EventSink,
    FileSent,
    InitrdFetched,
    KernelFetched,
    NbpSent,
    NodeEvent,
    NodeReport,
    OsUp,
    ScriptServed,
    Via,
    event_json,
)
from ipxe import callback_path, nbp_path, script_path
from netboot.httplog import ACCESS_LOGGER, AccessLog
from netboot.fileresponse import PlaneFileResponse
from netboot.sendfile import SendfilePlane
from ipxe.script import ScriptRenderer

log = logging.getLogger("rackboot.http")

# aiohttp (3.10 and later) arms this timer when a connection is made, not only after a response: a client that sends
# its request later than this is disconnected. At 1 s, 4000 nodes whose (virtual) clients were slow between their
# connect and their request saw 332 callbacks end in "Server disconnected", and 28 installed systems failed their
# callback altogether. 5 s costs a node rebooting within 5 s of its last request (iPXE EFI) one SYN retry, 0.24 s.
KEEPALIVE_TIMEOUT_S = 5.0
SHUTDOWN_TIMEOUT_S = 2.0
LISTEN_BACKLOG = 1024
# Connections asyncio accepts per wake-up of the listening socket (it takes its listen backlog as this count):
# 200 at once made one loop iteration set up 200 connections and the next parse and answer 200 requests,
# tens of milliseconds during which DHCP waited. The kernel's queue stays LISTEN_BACKLOG long.
ACCEPT_BATCH = 16



class NodeTokenAuthority(Protocol):
    """The per-node tokens of running deployments (appliance.auth.NodeTokens): bound at first use."""

    def claim(self, mac: str, remote: str) -> tuple[str, str] | None:
        """An expected node's first callback, from its own address: (deployment, its new token), once."""

    def check(self, mac: str, token: str | None, remote: str) -> str | None:
        """The deployment a node's bound token belongs to, or None."""

    def redeem(self, mac: str, token: str | None, remote: str) -> str | None:
        """Like check, and the token cannot be used again."""

# image token -> the file a running broadcast offers behind it (star), or None.
SharedImages = Callable[[str], "Path | None"]

_COUNTERS = (
    "received", "sent", "scripts", "script_polls_quiet", "nbps", "files", "files_anonymous", "files_aborted",
    "callbacks", "callbacks_refused", "images", "not_found", "forbidden", "bad_request", "dropped_malformed",
)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP service's own settings."""

    address: ipaddress.IPv4Address
    port: int = 8080
    files: Path = Path("/var/lib/rackboot/files")
    ipxe_dir: Path = Path("/usr/lib/ipxe")
    nbp_names: tuple[str, ...] = ("undionly.kpxe", "snponly.efi")
    interface: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int = 8443

    @property
    def base_url(self) -> str:
        """The URL nodes reach this server at."""
        return f"http://{self.address}:{self.port}"


class _ReportingFileResponse(PlaneFileResponse):
    """A PlaneFileResponse that reports once the whole body went out."""

    def __init__(self, path: Path, plane: SendfilePlane, on_sent: Callable[[web.StreamResponse], None],
                 on_aborted: Callable[[], None]) -> None:
        super().__init__(path, plane)
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
    """aiohttp application serving what iPXE, the deploy environment and installed systems fetch and report."""

    name = "http"

    def __init__(
        self,
        settings: HttpSettings,
        emit: EventSink,
        scripts: ScriptRenderer,
        mac_for_ip: Callable[[ipaddress.IPv4Address], str | None],
        *,
        tokens: NodeTokenAuthority | None = None,
        shared_images: SharedImages = lambda token: None,
        max_tracked_macs: int = 65536,
    ) -> None:
        self._settings = settings
        self._emit = emit
        self._scripts = scripts
        self._mac_for_ip = mac_for_ip
        self._tokens = tokens
        self._shared_images = shared_images
        self._files_root = settings.files
        self._nbp_names = frozenset(n for n in settings.nbp_names if n)
        self._counters = dict.fromkeys(_COUNTERS, 0)
        # Handler time of the small answers nodes wait on (files stream for as long as the client reads).
        self.latency = {"script": Latency(), "callback": Latency()}
        # mac -> profile of the last script served (quiet polls); any host can ask for any MAC's script, so the
        # MAC heard from longest ago is forgotten first, as in the event bus and the DHCP policy
        self._last_script: dict[str, str] = {}
        self._max_tracked_macs = max_tracked_macs
        self._runner: web.AppRunner | None = None
        self._sender = SendfilePlane()  # file bodies go out from its thread
        self.app = web.Application(middlewares=[self._count_middleware])
        r = self.app.router
        r.add_get(script_path("{mac}"), self._script)
        r.add_get(nbp_path("{name}"), self._nbp)
        r.add_get("/files/{path:.+}", self._file)
        r.add_get("/images/{token}", self._image)
        r.add_post(callback_path("{mac}"), self._callback)
        # iPXE cannot POST (PARAM_CMD is off in the 2019 build): scripts report with a GET and a query.
        r.add_get(callback_path("{mac}"), self._callback)

    # -- Service contract ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the HTTP port on the appliance address; raise BindError when that fails."""
        settings = self._settings
        self._files_root = settings.files.resolve()
        runner = web.AppRunner(
            self.app,
            access_log=logging.getLogger(ACCESS_LOGGER),  # off until log.http_access turns it on (httplog.py)
            access_log_class=AccessLog,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            handle_signals=False,
        )
        await runner.setup()
        host = str(settings.address)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, settings.port))
                await web.SockSite(runner, sock, backlog=ACCEPT_BATCH).start()
                sock.listen(LISTEN_BACKLOG)  # the kernel's queue; asyncio keeps accepting ACCEPT_BATCH at a time
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            await runner.cleanup()
            raise BindError(
                f"http: cannot listen on {host}:{settings.port}: {exc.strerror or exc}"
                " (is another server using the port, or is the address not configured on "
                f"{settings.interface or 'the interface'}?)"
            ) from exc
        if settings.tls_cert is not None and settings.tls_key is not None:
            # Optional HTTPS for the API and operators; nodes keep plain HTTP (iPXE has no CA for our certificate).
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
                await web.TCPSite(runner, host, settings.tls_port, ssl_context=context, backlog=LISTEN_BACKLOG).start()
            except (OSError, ssl.SSLError) as exc:
                await runner.cleanup()
                raise BindError(f"http: cannot serve HTTPS on {host}:{settings.tls_port}: {exc}") from exc
            log.info("http: serving https://%s:%d/", host, settings.tls_port)
        self._runner = runner
        log.info("http: serving %s/ (files %s)", settings.base_url, self._files_root)

    async def serve(self) -> None:
        """Serve until cancelled (aiohttp serves from the listening socket bound in start())."""
        await asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        """Stop listening and close connections; safe to call twice and after a failed start."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._sender.close()

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
        try:
            found = path.is_file()
        except OSError:  # e.g. ENAMETOOLONG: a name no file can have
            found = False
        if not found:
            raise web.HTTPNotFound()
        return path

    def _aborted(self) -> None:
        self._counters["files_aborted"] += 1

    # -- iPXE ---------------------------------------------------------------------------------------

    async def _script(self, request: web.Request) -> web.Response:
        """GET /boot/MAC.ipxe: the node's iPXE script for its current boot profile."""
        started = time.perf_counter()
        try:
            return self._script_answer(request)
        finally:
            self.latency["script"].observe(time.perf_counter() - started)

    def _script_answer(self, request: web.Request) -> web.Response:
        mac = self._mac_param(request)
        script = self._scripts.render(mac)
        self._counters["scripts"] += 1
        error = request.query.get("error")
        if error:
            self._emit(BootFailed(mac, error, f"{error} failed after {self._scripts.timing.tries} tries"))
        if "poll" in request.query and not error and self._last_script.get(mac) == script.profile:
            # A node waiting without a profile polls every few seconds: record the first poll only.
            self._counters["script_polls_quiet"] += 1
        else:
            self._last_script.pop(mac, None)
            if len(self._last_script) >= self._max_tracked_macs:
                del self._last_script[next(iter(self._last_script))]
            self._last_script[mac] = script.profile
            self._emit(ScriptServed(mac, script.profile, Via.HTTP, script.env))
        return web.Response(text=script.text, content_type="text/plain")

    async def _nbp(self, request: web.Request) -> web.StreamResponse:
        """GET /nbp/NAME: an iPXE binary, for UEFI HTTP boot; only the configured NBP names."""
        name = request.match_info["name"]
        path = self._settings.ipxe_dir / name
        if name not in self._nbp_names or not path.is_file():
            raise web.HTTPNotFound()
        self._counters["nbps"] += 1
        return _ReportingFileResponse(path, self._sender, lambda response: self._publish_nbp(request, name, response),
                                      self._aborted)

    def _publish_nbp(self, request: web.Request, name: str, response: web.StreamResponse) -> None:
        mac = self._requester_mac(request)
        if mac is not None and request.method == "GET" and response.status == 200:
            self._emit(NbpSent(mac, name, Via.HTTP))

    # -- files --------------------------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.StreamResponse:
        """GET /files/PATH: a file under the files root, with Range and sendfile; reports who fetched what."""
        relative = request.match_info["path"]
        path = self._safe_file(relative)
        if request.method != "GET":
            return PlaneFileResponse(path, self._sender)
        return _ReportingFileResponse(path, self._sender, lambda response: self._publish_fetch(request, relative, response),
                                      self._aborted)

    def _publish_fetch(self, request: web.Request, relative: str, response: web.StreamResponse) -> None:
        self._counters["files"] += 1
        if response.status not in (200, 206):
            return
        mac = self._requester_mac(request)
        if mac is None:
            self._counters["files_anonymous"] += 1
            return
        image = self._scripts.image_kind(mac, request.path)
        event: NodeEvent
        if image == "kernel":
            event = KernelFetched(mac, relative)
        elif image == "initrd":
            event = InitrdFetched(mac, relative)
        else:
            event = FileSent(mac, relative, Via.HTTP)
        self._emit(event)

    async def _image(self, request: web.Request) -> web.StreamResponse:
        """GET /images/TOKEN: nodes download the image of a running broadcast (star) behind that attempt's token."""
        path = self._shared_images(request.match_info["token"])
        if path is None:
            raise web.HTTPForbidden(text="no image behind this token\n")
        self._counters["images"] += 1
        return PlaneFileResponse(path, self._sender)

    # -- callbacks ----------------------------------------------------------------------------------

    async def _callback(self, request: web.Request) -> web.Response:
        """A node's callback (see _callback_answer), timed."""
        started = time.perf_counter()
        try:
            return await self._callback_answer(request)
        finally:
            self.latency["callback"].observe(time.perf_counter() - started)

    async def _callback_answer(self, request: web.Request) -> web.Response:
        """POST /callback/MAC with JSON {stage, status, message, token, ...} (or GET with a query, from iPXE).

        The body is read and decoded once, here (JSON in UTF-8, RFC 8259 8.1). A stage that claims a deployment
        step is checked here and nowhere else: the deploy agent's first callback, without a token, from the
        node's own address, claims the node's token and gets it in this answer only; the installed system
        redeems the token the post-install wrote into it, once.
        """
        mac = self._mac_param(request)
        body = await self._callback_body(request)
        stage = str(body.get("stage", ""))
        event: NodeEvent
        granted = ""
        if stage in CLAIMED_STAGES:
            token = body.get("token") if isinstance(body.get("token"), str) else None
            remote = request.remote or ""
            deployment: str | None = None
            if self._tokens is not None:
                if stage in AGENT_STAGES:
                    if token:
                        deployment = self._tokens.check(mac, token, remote)
                    elif (claimed := self._tokens.claim(mac, remote)) is not None:
                        deployment, granted = claimed
                else:
                    deployment = self._tokens.redeem(mac, token, remote)
            if deployment is None:
                self._counters["callbacks_refused"] += 1
                log.warning("http: callback %r for %s from %s refused: no claim expected from there, or a wrong, "
                            "used or missing token", stage, mac, remote, extra=fields(mac=mac))
                raise web.HTTPForbidden(text=f"callback for {mac}: not expected from this address, or a wrong, "
                                             "used or missing token\n")
            if stage in AGENT_STAGES:
                try:
                    event = AgentUp(mac, deployment, int(body.get("ssh_port", 22)), int(body.get("data_port", 7070)))
                except (TypeError, ValueError):
                    self._counters["dropped_malformed"] += 1
                    raise web.HTTPBadRequest(text="ssh_port and data_port must be integers\n") from None
            else:
                event = OsUp(mac, deployment, str(body.get("env", "")))
        else:
            event = NodeReport(mac, stage, str(body.get("status", "")), str(body.get("message", "")))
        self._counters["callbacks"] += 1
        self._emit(event)
        answer: dict[str, Any] = {"ok": True, "event": event_json(event)}
        if granted:
            answer["token"] = granted  # the only time the token is served: to the node that claimed it
        return web.json_response(answer)

    async def _callback_body(self, request: web.Request) -> dict[str, Any]:
        if request.method != "POST":
            return dict(request.query)
        try:
            body = json.loads((await request.read()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self._counters["dropped_malformed"] += 1
            raise web.HTTPBadRequest(text="expected a JSON object in UTF-8 {stage, status, message, ...}\n")
        return body

"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol with aiohttp's websocket client.

Loopback only: the browser's DevTools port is bound on 127.0.0.1, every host name but 127.0.0.1 (and the
addresses a test allows: an appliance inside the test's own namespace) resolves to nothing, background networking
is off. Its profile is a temporary directory, removed afterwards. The browser
runs in a process group of its own that is killed on success, failure and Ctrl-C (and by the kernel if the test
process itself dies: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import asyncio
import base64
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

PR_SET_PDEATHSIG = 1
FLAGS = ("--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--disable-sync", "--disable-component-update", "--disable-default-apps",
         "--disable-breakpad", "--disable-crash-reporter", "--metrics-recording-only", "--mute-audio", "--no-proxy-server",
         "--password-store=basic", "--use-mock-keychain", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "--window-size=1280,900")
RESOLVE_NOTHING = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"  # every host name resolves to nothing, but loopback


def executable() -> str | None:
    """Debian's chromium, if installed."""
    return shutil.which("chromium")


def _die_with_parent() -> None:
    """In the child before exec: a session of its own, killed when the test process dies."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Page:
    """One tab, over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method; return its result (raise on a protocol error)."""
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def js(self, expression: str) -> Any:
        """Evaluate an expression in the page (promises awaited); return its value."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 10.0) -> None:
        """Wait until an expression is truthy in the page."""
        deadline = time.monotonic() + timeout
        while True:
            if await self.js(f"Boolean({expression})"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout} s: {expression}")
            await asyncio.sleep(0.05)

    async def goto(self, url: str) -> None:
        """Load a URL and wait for its DOM."""
        await self.send("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'")

    async def screenshot(self, path: Path, selector: str | None = None) -> None:
        """Write a PNG of the whole page, or of the element a CSS selector picks."""
        height = await self.js("Math.ceil(document.documentElement.scrollHeight)")
        await self.send("Emulation.setDeviceMetricsOverride", width=1280, height=int(height), deviceScaleFactor=1, mobile=False)
        clip: dict[str, Any] = {}
        if selector is not None:
            box = await self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                                " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()")
            clip = {"clip": {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, **clip)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        """Close the websocket."""
        await self.ws.close()
        self._reader.cancel()


class Chromium:
    """A headless browser for one test: `async with Chromium() as browser: page = await browser.page()`."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        self.allow = allow  # addresses the browser may reach besides loopback (an appliance in a test's namespace)
        self.profile = Path(tempfile.mkdtemp(prefix="rackboot-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.pages: list[Page] = []

    async def __aenter__(self) -> "Chromium":
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stop()

    async def _start(self) -> None:
        exe = executable()
        assert exe is not None, "no chromium"
        rules = ", ".join([RESOLVE_NOTHING, *(f"EXCLUDE {a}" for a in self.allow)])
        args = [exe, *FLAGS, f"--host-resolver-rules={rules}", f"--user-data-dir={self.profile}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        args.append("about:blank")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port within 30 s")
            await asyncio.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        self.session = aiohttp.ClientSession()

    async def page(self) -> Page:
        """The browser's tab."""
        assert self.session is not None
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
            targets = await resp.json()
        target = next(t for t in targets if t["type"] == "page")
        page = Page(await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))
        self.pages.append(page)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def _stop(self) -> None:
        for page in self.pages:
            await page.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # what the browser forked and left behind, if anything
            except ProcessLookupError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

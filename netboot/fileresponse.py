"""A file response whose body goes out from a SendfilePlane's threads, with no default-executor hops.

aiohttp's FileResponse stats and opens the file in the default executor, then closes it there too: two
thread hand-offs per request, each waiting for a GIL the lanes and the loop also want, and 200 downloads
starting at once queue 400 of them (docs/benchmarks.md, "HTTP downloads"). The files served here are local
and their metadata cached by the kernel, so this response opens and fstat()s the file on the loop (a few
microseconds), writes the status line and headers from the loop, and hands the body to the plane.

Semantics follow aiohttp's FileResponse: the same strong ETag (mtime in ns and size, hex), Last-Modified,
If-Match / If-Unmodified-Since (412), If-None-Match / If-Modified-Since (304), Range parsed by aiohttp
(one range; 416 with `Content-Range: bytes */size` when unsatisfiable), HEAD with the headers only, 403 for
what is not a regular file or cannot be read, 404 for what is missing. Two differences: an If-Range with an
ETag is compared (aiohttp reads only dates there, so it honoured any Range behind an ETag); and no
pre-compressed sibling (.gz, .br) is ever served in place of the file asked for.
"""
from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY, ETag, parse_http_date
from aiohttp.web_fileresponse import CONTENT_TYPES, FALLBACK_CONTENT_TYPE  # aiohttp's guesses: .gz is application/gzip

from netboot.sendfile import SendfilePlane

FALLBACK_CHUNK = 256 * 1024  # what one read moves when the body cannot go through sendfile (TLS)


def _etag_match(value: str, etags: tuple[ETag, ...], *, weak: bool) -> bool:
    if len(etags) == 1 and etags[0].value == ETAG_ANY:
        return True
    return any(e.value == value for e in etags if weak or not e.is_weak)


def _read_at(fd: int, offset: int, count: int) -> bytes:
    return os.pread(fd, count, offset)


class PlaneFileResponse(web.StreamResponse):
    """The file at path (GET and HEAD, conditional requests, one Range), its body sent by a SendfilePlane."""

    def __init__(self, path: Path, plane: SendfilePlane | None) -> None:
        super().__init__()
        self._path = path
        self._plane = plane
        self.sent = False  # True once the whole body (or a body-less answer) went out

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Answer the request: headers from the loop, the body from the plane."""
        if self.prepared:  # answered already: never the body twice
            return await super().prepare(request)
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            return await self._empty(request, web.HTTPForbidden.status_code)
        except OSError:
            return await self._empty(request, web.HTTPNotFound.status_code)
        try:
            return await self._answer(request, fd, os.fstat(fd))
        finally:
            os.close(fd)

    async def _empty(self, request: web.BaseRequest, status: int) -> AbstractStreamWriter | None:
        self.set_status(status)
        self.content_length = 0
        writer = await super().prepare(request)
        self.sent = True
        return writer

    async def _answer(self, request: web.BaseRequest, fd: int, st: os.stat_result) -> AbstractStreamWriter | None:
        if not stat.S_ISREG(st.st_mode):
            return await self._empty(request, web.HTTPForbidden.status_code)
        size, mtime = st.st_size, st.st_mtime
        etag = f"{st.st_mtime_ns:x}-{size:x}"
        if_match = request.if_match
        if (if_match is not None and not _etag_match(etag, if_match, weak=False)) or (
                if_match is None and (since := request.if_unmodified_since) is not None and mtime > since.timestamp()):
            return await self._empty(request, web.HTTPPreconditionFailed.status_code)
        if_none_match = request.if_none_match
        if (if_none_match is not None and _etag_match(etag, if_none_match, weak=True)) or (
                if_none_match is None and (since := request.if_modified_since) is not None and mtime <= since.timestamp()):
            self.set_status(web.HTTPNotModified.status_code)
            self.etag, self.last_modified = etag, mtime
            writer = await super().prepare(request)
            self.sent = True
            return writer

        start, count = 0, size
        if request.headers.get(hdrs.RANGE) is not None and self._range_applies(request, etag, mtime):
            try:
                rng = request.http_range  # aiohttp's parser: one range, bytes=a-b, a- or -n
            except ValueError:
                return await self._unsatisfiable(request, size)
            if rng.start is not None:
                if rng.start < 0 and rng.stop is None:
                    start = max(rng.start + size, 0)
                    count = size - start
                else:
                    start = rng.start
                    count = min(rng.stop if rng.stop is not None else size, size) - start
                if start >= size:
                    return await self._unsatisfiable(request, size)
                self.set_status(web.HTTPPartialContent.status_code)
                self._headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{start + count - 1}/{size}"

        if hdrs.CONTENT_TYPE not in self._headers:
            self.content_type = CONTENT_TYPES.guess_type(self._path.name)[0] or FALLBACK_CONTENT_TYPE
        self.etag, self.last_modified = etag, mtime
        self.content_length = count
        self._headers[hdrs.ACCEPT_RANGES] = "bytes"
        # As nginx's tcp_nopush: the socket corked while the headers and a sendfile'd body go out, so the headers
        # share the first full segment with the body and no partial segment leaves between two sendfile calls.
        target = self._sendfile_socket(request)
        cork = target if count and request.method != hdrs.METH_HEAD and target is not None and \
            target.family in (socket.AF_INET, socket.AF_INET6) else None
        if cork is not None:
            cork.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            writer = await super().prepare(request)
            if count and request.method != hdrs.METH_HEAD:
                await self._body(request, fd, start, count, target)
        finally:
            if cork is not None and request.transport is not None and not request.transport.is_closing():
                try:
                    cork.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # out goes the last partial segment
                except OSError:
                    pass
        await super().write_eof()
        self.sent = True
        return writer

    def _sendfile_socket(self, request: web.BaseRequest) -> Any:
        """The socket the body will be sendfile'd to by the plane (a plane, a socket, no TLS), or None."""
        transport = request.transport
        if self._plane is None or transport is None or transport.get_extra_info("sslcontext") is not None:
            return None
        return transport.get_extra_info("socket")

    @staticmethod
    def _range_applies(request: web.BaseRequest, etag: str, mtime: float) -> bool:
        """Whether a Range is honoured: no If-Range, or one naming this file's ETag or a date not before its mtime."""
        if_range = request.headers.get(hdrs.IF_RANGE)
        if if_range is None:
            return True
        if if_range.lstrip().startswith(('"', "W/")):
            return if_range.strip() == f'"{etag}"'  # If-Range compares strongly (RFC 9110 13.1.5)
        date = parse_http_date(if_range)
        return date is not None and mtime <= date.timestamp()

    async def _unsatisfiable(self, request: web.BaseRequest, size: int) -> AbstractStreamWriter | None:
        self._headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
        return await self._empty(request, web.HTTPRequestRangeNotSatisfiable.status_code)

    async def _body(self, request: web.BaseRequest, fd: int, offset: int, count: int, target: Any) -> None:
        """count bytes of the file from offset: sendfile to target from the plane, or, without one (TLS, no plane),
        reads and writes."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Connection lost")
        if target is None or self._plane is None or target.fileno() < 0:
            loop = asyncio.get_running_loop()
            while count > 0:
                chunk = await loop.run_in_executor(None, _read_at, fd, offset, min(count, FALLBACK_CHUNK))
                if not chunk:
                    raise ConnectionResetError("the file ended before the body did")
                await super().write(chunk)
                offset += len(chunk)
                count -= len(chunk)
            return
        while transport.get_write_buffer_size():  # rare: the headers did not fit the socket at once
            if transport.is_closing():
                raise ConnectionResetError("Connection lost")
            await asyncio.sleep(0.001)
        reading = transport.is_reading()
        transport.pause_reading()
        try:
            await self._plane.send(target.fileno(), fd, offset, count)
        finally:
            if reading and not transport.is_closing():
                transport.resume_reading()

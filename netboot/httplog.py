"""The HTTP access log: one line per request in the Common Log Format, with no secret in it.

aiohttp calls `AccessLog.log` after each response. The line is NCSA's common format
(`host ident authuser [time] "request line" status bytes`), with ident and authuser always '-': no
header is logged (Authorization, cookies, Referer), the values of query parameters whose name says
token, password or secret are replaced by '<redacted>', and the token that is the path of
`/images/TOKEN` too. The logger, `rackboot.http.access`, is off (WARNING) until the config's
`log.http_access` (or `log.levels`) sets it to info; aiohttp asks `enabled` once per connection.
"""
from __future__ import annotations

import logging
import time
from urllib.parse import unquote_plus

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from domain.logfields import fields
from domain.nodes import normalize_mac

ACCESS_LOGGER = "rackboot.http.access"
REDACTED = "<redacted>"
_SECRET_WORDS = ("token", "password", "secret", "key")
_SECRET_PATHS = ("/images/",)  # the rest of the path is a token

logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)  # off unless the config turns it on


def redact_target(path: str, query_string: str) -> str:
    """The request target for the log: secret path segments and secret query values replaced by '<redacted>'."""
    for prefix in _SECRET_PATHS:
        if path.startswith(prefix) and len(path) > len(prefix):
            path = prefix + REDACTED
    if not query_string:
        return path
    parts = []
    for part in query_string.split("&"):
        name = part.partition("=")[0]
        secret = any(word in unquote_plus(name).lower() for word in _SECRET_WORDS)  # also 'to%6Ben'
        parts.append(f"{name}={REDACTED}" if secret else part)
    return f"{path}?{'&'.join(parts)}"


class AccessLog(AbstractAccessLogger):
    """aiohttp's access logger for the appliance: common log format, secrets redacted, the node's MAC as a field."""

    @property
    def enabled(self) -> bool:
        """Whether the access logger is on (at info); aiohttp checks it for each new connection."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time_taken: float) -> None:
        """Log one request, as `host - - [time] "METHOD target HTTP/x.y" status bytes`."""
        version = request.version
        target = redact_target(request.rel_url.raw_path, request.rel_url.raw_query_string)  # as sent, as CLF has it
        for name, value in request.match_info.items():  # a route's own secret parameter, however it was spelt
            if value and any(word in name.lower() for word in _SECRET_WORDS):
                target = target.replace(value, REDACTED)
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(time.time() - time_taken))
        extra: dict[str, str] = {}
        if mac := request.match_info.get("mac"):
            try:
                extra = fields(mac=normalize_mac(mac))
            except ValueError:
                pass
        self.logger.info('%s - - [%s] "%s %s HTTP/%d.%d" %d %s', request.remote or "-", stamp, request.method, target,
                         version.major, version.minor, response.status, response.body_length or "-", extra=extra)

"""The HTTP connections: aiohttp's protocol with the limits a public server needs.

aiohttp parses HTTP (body limits, negative or malformed Content-Length, header sizes) and keeps
its own keep-alive timer; on top of it, for every aiohttp version from 3.9:
  - a connection cap: past `max_connections`, a new connection gets a 503 and is closed;
  - a read timeout: a request whose head has not fully arrived `read_timeout` seconds after the
    connection became ready (slowloris) gets a 408 and is closed; an idle keep-alive connection
    is closed after `keepalive_timeout`;
  - half-close: a client that shuts down its sending side after its request still gets the
    answer (asyncio's default closes the connection on EOF);
  - parse errors answered as OpenAI-shaped JSON (400, 414 for a long request line, 431 for long
    headers), logged in one line, never with a traceback.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time

from aiohttp import web

from .api import ApiError

log = logging.getLogger("prefix_kernels.serve")


def raw_response(err: ApiError) -> bytes:
    """A whole HTTP/1.1 response for an error, written straight to a transport."""
    body = err.json_bytes()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(err.status, "Error")
    head = (f"HTTP/1.1 {err.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    for key, value in err.headers.items():
        head += f"{key}: {value}\r\n"
    return head.encode() + b"\r\n" + body


def _line_too_long_status(text: str) -> int:
    """414 when the request line was too long, 431 when a header was (aiohttp raises LineTooLong
    for both; its C parser quotes an excerpt that starts with the path for the request line)."""
    low = text.lower()
    if "status line" in low or "request line" in low:       # aiohttp's pure-Python parser says which
        return 414
    if "header" in low:
        return 431
    excerpt = text.split("reading:", 1)[-1].strip()
    excerpt = re.sub(r"^(bytearray\()?b?['\"]", "", excerpt)
    return 414 if excerpt.startswith("/") or re.match(r"[A-Z]+ \S", excerpt) else 431


class Connection(web.RequestHandler):
    """One client connection (aiohttp's RequestHandler, plus the registry's bookkeeping)."""

    def __init__(self, manager, registry: "Registry", **kwargs):
        super().__init__(manager, **kwargs)
        self.registry = registry
        self.busy = 0                   # requests of this connection in our handlers
        self.idle_since = time.monotonic()
        self.got_bytes = False          # bytes of a next request arrived since idle_since
        self.eof = False                # the client half-closed (or closed)
        self.rejected = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        reg = self.registry
        if reg.closing or len(reg.connections) >= reg.max_connections:
            why = "the server is shutting down" if reg.closing else \
                f"too many connections ({reg.max_connections}, --max-connections)"
            self.refuse(ApiError(503, f"{why}; retry later", code="overloaded", headers={"Retry-After": "1"}))
            return
        reg.connections.add(self)

    def refuse(self, err: ApiError) -> None:
        """Answer err and close, reading (and dropping) what the client still sends for a moment,
        so that closing with unread bytes does not reset the connection before the answer is read."""
        self.rejected = True
        self.registry.connections.discard(self)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(raw_response(err))
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def connection_lost(self, exc) -> None:
        self.registry.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if not self.busy:
            self.got_bytes = True
        super().data_received(data)

    def eof_received(self) -> bool:
        self.eof = True
        return not self.rejected     # True keeps the transport open: the answer can still be written

    def begin(self) -> None:
        self.busy += 1

    def end(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle_since, self.got_bytes = time.monotonic(), False

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        """aiohttp's answer to a request it could not parse (or a handler's unhandled error)."""
        text = str(getattr(exc, "message", None) or message or exc or "")
        if type(exc).__name__ == "LineTooLong":
            status = _line_too_long_status(text)
            text = {414: "the request line is too long", 431: "a request header is too long"}[status]
        elif status == 500:
            log.error("unhandled error while serving %s: %r", getattr(request, "path", "?"), exc)
            text = "internal server error"
        else:
            text = text.splitlines()[0][:200] if text else "bad request"
            log.info("bad HTTP request from %s: %s", self.peer(), text)
        resp = web.Response(status=status, body=ApiError(status, text).json_bytes(), content_type="application/json")
        resp.force_close()
        return resp

    def peer(self) -> str:
        transport = self.transport
        info = transport.get_extra_info("peername") if transport is not None else None
        return str(info[0]) if info else "?"

    def check(self, now: float) -> None:
        """Close the connection when it waited too long for (the rest of) a request head."""
        if self.busy or self.transport is None or self.rejected:
            return
        reg = self.registry
        if self.got_bytes and now - self.idle_since > reg.read_timeout:
            self.refuse(ApiError(408, f"the request was not received within {reg.read_timeout:g} s (--read-timeout)",
                                 code="timeout"))
        elif (not self.got_bytes and now - self.idle_since > reg.keepalive_timeout) or (self.eof and not self.got_bytes):
            self.transport.close()


class Registry:
    """The open connections, their cap and the timer that enforces the timeouts."""

    def __init__(self, *, max_connections: int, read_timeout: float, keepalive_timeout: float):
        self.max_connections = int(max_connections)
        self.read_timeout, self.keepalive_timeout = float(read_timeout), float(keepalive_timeout)
        self.connections: set[Connection] = set()
        self.closing = False
        self._task = None

    def factory(self, manager: web.Server, loop, **kwargs):
        """The protocol factory for loop.create_server. aiohttp's own keep-alive timer (which
        closes a half-received request without a word) is only a backstop behind ours."""
        backstop = 2 * max(self.read_timeout, self.keepalive_timeout) + 1
        return lambda: Connection(manager, self, loop=loop, keepalive_timeout=backstop, **kwargs)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._reap(), name="prefix-kernels-reaper")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _reap(self) -> None:
        period = max(0.05, min(self.read_timeout, self.keepalive_timeout) / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check(now)

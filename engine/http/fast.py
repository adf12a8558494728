"""The HTTP listener's connections: ``POST /api/v1/messages`` answered without aiohttp's
per-request machinery, everything else handed to aiohttp.

aiohttp spends about 70 µs of CPU on each request (the request, payload, task, writer and
response objects, the router, the middleware chain): as much as the injection's own
handler.  A connection of an ``[http] listen`` socket (over TLS or not) starts here
(:class:`Connection`): every request on it in the **plain form** of an injection is
parsed, authenticated (engine.http.api.authorized), served (engine.http.inject.inject, the
route's own handler) and answered here, with the answer aiohttp would write, byte for
byte but the Date.  The first request that is anything else is handed, with every byte
not yet answered, to an aiohttp connection (``web.Server``'s ``RequestHandler``) that
keeps the connection for the rest of its life: other routes, the limits and error answers
of the HTTP layer, bodies that take time to arrive (408), all stay aiohttp's.

The plain form, checked on the whole request before anything is done with it: the line
``POST /api/v1/messages HTTP/1.1``; fields of printable ASCII, each name once; one
``Content-Length`` no larger than ``max_body_size`` and the whole body received;
``Content-Type: application/json``; a ``Host``; no ``Transfer-Encoding``,
``Content-Encoding``, ``Expect``, ``Upgrade``, ``Connection`` (nor the old WebSocket
key); fewer fields and a shorter head than aiohttp's limits; no ``Idempotency-Key`` on a
worker of a node (engine.http.forward sends those on).

Like aiohttp's: one request at a time per connection, in order (pipelined ones wait in
the buffer; reading pauses when it grows), an idle connection is closed after
``[http] idle_timeout``, a request being served runs to its end when the client goes
away, and at :meth:`Front.close` requests in progress are waited for.  This module must
never answer a request aiohttp would answer differently, and never decide delivery.
"""

from __future__ import annotations

import asyncio
import http
import logging
import re
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast

import orjson
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from engine.http.api import Problem, Scope, authorized, decode_json
from engine.http.forward import transport_tls
from engine.http.inject import PATH, idempotency_key, inject

if TYPE_CHECKING:
    from engine.app import App
    from engine.http.server import Tokens

log = logging.getLogger("ferry.http")

#: A field name (RFC 9110 §5.6.2 token) and a value of printable ASCII and tabs.
_FIELD: Final = rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([\x20-\x7e\t]*)\r\n"
#: The head of a request in the plain form (its fields as group 1); linear to match.
_HEAD: Final = re.compile(rb"POST " + PATH.encode() + rb" HTTP/1\.1\r\n((?:" + _FIELD.replace(
    b"(", b"(?:") + rb")*)\r\n")
_FIELDS: Final = re.compile(_FIELD)
#: aiohttp's max_line_size: a longer head is aiohttp's to judge.
_MAX_HEAD: Final = 8190
#: Fields whose presence makes a request aiohttp's.
_NOT_PLAIN: Final = frozenset((b"transfer-encoding", b"content-encoding", b"expect",
                               b"upgrade", b"connection", b"sec-websocket-key1"))
#: Fewer fields than aiohttp's max_headers (128).
_MAX_FIELDS: Final = 100
#: Unanswered bytes a connection holds before it stops reading (pipelined requests).
_BUFFER_LIMIT: Final = 1 << 16
_REASONS: Final = {s.value: s.phrase for s in http.HTTPStatus}
_JSON: Final = "application/json"
_PROBLEM: Final = "application/problem+json"
#: How long :meth:`Front.close` waits for requests in progress (aiohttp's shutdown_timeout).
SHUTDOWN_TIMEOUT: Final = 60.0


def answer(status: int, content_type: str, body: bytes,
           headers: Mapping[str, str] | None = None, close: bool = False) -> bytes:
    """An HTTP/1.1 answer as aiohttp writes it: the route's own headers, then
    Content-Type, Content-Length, Date, Server (and ``Connection: close``)."""
    head = f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
    if headers:
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
             f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n")
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body


class Front:
    """What the connections of one listener share: the running server, its tokens, the
    aiohttp server that takes the connections handed over, the connections alive."""

    def __init__(self, app: App, tokens: Tokens, aiohttp_server: web.Server, *,
                 max_body_size: int, idle_timeout: float, forwarding: bool) -> None:
        self.app = app
        self.tokens = tokens
        self.aiohttp_server = aiohttp_server
        # aiohttp's client_max_size and keepalive_timeout, fixed when it started (a
        # reload does not change them either).
        self.max_body_size = max_body_size
        self.idle_timeout = idle_timeout
        #: A worker of a node: keyed injections are engine.http.forward's (aiohttp's).
        self.forwarding = forwarding
        self.connections: set[Connection] = set()
        self.serving: set[asyncio.Task[None]] = set()

    def __call__(self) -> Connection:
        return Connection(self)

    async def respond(self, fields: dict[bytes, bytes], body: bytes, remote: str | None,
                      tls_info: str) -> tuple[bytes, bool]:
        """The answer to one request in the plain form (what engine.http.server's
        middleware and the route's handler answer), and whether to close after it."""
        try:
            header = fields.get(b"authorization")
            who = authorized(self.tokens.principal_of("" if header is None else header.decode(),
                                                      remote),
                             header is not None, Scope.INJECT)
            raw_key = fields.get(b"idempotency-key")
            key = idempotency_key(self.app, who, None if raw_key is None else raw_key.decode())
            doc, headers = await inject(
                self.app, who, decode_json(body), key=key, raw=body if key else b"",
                remote=remote or "127.0.0.1", tls_info=tls_info,
                authorization=header is not None,
                ident=id(fields))
            return answer(200, _JSON, orjson.dumps(doc), headers), False
        except Problem as problem:
            return answer(problem.status, _PROBLEM, problem.document(), problem.headers,
                          problem.close), problem.close
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away: nobody to answer
        except Exception as exc:
            log.exception("HTTP %s %s failed", "POST", PATH)
            return answer(500, _PROBLEM, Problem(
                500, "Internal server error",
                f"{type(exc).__name__} (logged by the server)").document()), False

    async def close(self) -> None:
        """Close the idle connections, wait (bounded) for the requests in progress, close
        the rest."""
        for conn in list(self.connections):
            if conn.task is None:
                conn.transport.close()
        if self.serving:
            await asyncio.wait(self.serving, timeout=SHUTDOWN_TIMEOUT)
        for conn in list(self.connections):
            conn.transport.close()


class Connection(asyncio.Protocol):
    """One client connection while its requests are in the plain form."""

    __slots__ = ("buffer", "front", "idle_at", "paused", "remote", "task", "timer",
                 "tls_info", "transport", "writable")

    def __init__(self, front: Front) -> None:
        self.front = front
        self.buffer = b""
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle_at = 0.0
        self.writable = True
        self.paused = False
        #: The client's address, as aiohttp's request.remote tells it.
        self.remote: str | None = None
        #: Its TLS as the Received field names it ("" for none; after the handshake).
        self.tls_info = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, only alike)
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # What aiohttp's connections set: TCP keep-alive, no Nagle delay on answers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple | list) else None
        self.tls_info = transport_tls(transport)
        self.front.connections.add(self)
        # As aiohttp's: a connection that never sends a request is closed when idle.
        self._idle_from(asyncio.get_running_loop())

    def connection_lost(self, exc: BaseException | None) -> None:
        self.front.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # A request in progress runs to its end (its answer goes nowhere), as aiohttp's.

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.task is None:
            self._next()
        if len(self.buffer) > _BUFFER_LIMIT and not self.paused:
            # Requests waiting for their turn (or for the client to read its answers).
            self.paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self.task is None:
            self._next()

    def _next(self) -> None:
        """Serve the request at the head of the buffer, or hand the connection over."""
        buf = self.buffer
        if not buf or not self.writable or self.transport.is_closing():
            return
        head = _HEAD.match(buf, 0, _MAX_HEAD)
        if head is None:
            self._hand_over()
            return
        fields: dict[bytes, bytes] = {}
        for name, value in _FIELDS.findall(head.group(1)):
            name = name.lower()
            if name in fields or name in _NOT_PLAIN:
                self._hand_over()
                return
            fields[name] = value.strip(b" \t")
        length = fields.get(b"content-length", b"")
        end = head.end()
        size = int(length) if length.isdigit() and len(length) < 19 else -1
        if (size < 0 or size > self.front.max_body_size or len(fields) > _MAX_FIELDS
                or b"host" not in fields  # aiohttp's 400 for HTTP/1.1
                or len(buf) < end + size or fields.get(b"content-type") != b"application/json"
                or (self.front.forwarding and b"idempotency-key" in fields)):
            self._hand_over()
            return
        self.buffer = buf[end + size:]
        task = self.task = asyncio.get_running_loop().create_task(
            self._serve(fields, buf[end:end + size]))
        self.front.serving.add(task)
        task.add_done_callback(self.front.serving.discard)

    async def _serve(self, fields: dict[bytes, bytes], body: bytes) -> None:
        transport = self.transport
        try:
            data, close = await self.front.respond(fields, body, self.remote, self.tls_info)
        except ConnectionError:
            transport.close()
            return
        finally:
            self.task = None
        if transport.is_closing():
            return  # the client went away: nobody to answer
        transport.write(data)
        if close:
            transport.close()
            return
        self._idle_from(asyncio.get_running_loop())
        if self.paused and len(self.buffer) <= _BUFFER_LIMIT:
            self.paused = False
            transport.resume_reading()
        if self.buffer:
            self._next()

    def _idle_from(self, loop: asyncio.AbstractEventLoop) -> None:
        self.idle_at = loop.time() + self.front.idle_timeout
        if self.timer is None:
            self.timer = loop.call_at(self.idle_at, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if self.task is not None:
            return  # serving: the timer starts again with its answer
        loop = asyncio.get_running_loop()
        if loop.time() < self.idle_at:
            self.timer = loop.call_at(self.idle_at, self._idle)
            return
        self.transport.close()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, from the first byte not answered."""
        self.front.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        handler = self.front.aiohttp_server()
        transport = self.transport
        transport.set_protocol(handler)
        handler.connection_made(transport)
        buf, self.buffer = self.buffer, b""
        if buf:
            handler.data_received(buf)
        if self.paused:
            transport.resume_reading()

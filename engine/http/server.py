"""The HTTP listener: sockets bound as root (like the receive connectors'), an aiohttp
application on the server's own loop, who may do what, and the error every bad request gets.

Every request passes one middleware (one, not two: it runs for every injected message)
that does two things before and around its handler:

1. **authentication**: a client on the loopback is trusted with every scope when
   ``trust_loopback`` is on; any other needs ``Authorization: Bearer <token>`` of a
   ``[http.tokens.NAME]`` entry whose scopes include the one the route requires (RFC 6750:
   401 without a valid token, 403 when its scopes do not cover the route).
2. **problems**: whatever goes wrong becomes an RFC 9457 ``application/problem+json``
   answer: a :class:`~engine.http.api.Problem` the handler (or the authentication)
   raised, aiohttp's own errors (404, 405, 413 for a body over ``[http] max_body_size``),
   a body that does not arrive within ``request_timeout`` (408,
   :func:`engine.http.api.json_body`), and any other exception (500, logged with its
   traceback): nothing a client sends can stop the listener or reach the SMTP side.

A connection of the listener starts in engine.http.fast, which answers
injections in their common form itself (the same authentication and problems, through
:func:`~engine.http.api.authorized` and the route's own handler) and hands the
connection to this application at its first other request.

It must never block the loop (handlers that read many records do it in a thread) and never
decide delivery.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from engine.config import HttpConfig
from engine.http import admin, health, inject, metrics
from engine.http.api import (
    APP,
    PRINCIPAL,
    Handler,
    Principal,
    Problem,
    Scope,
    authorized,
    required_scope,
)
from engine.http.fast import Front
from engine.http.forward import PRINCIPAL_HEADER, Forwarder, from_worker, private_path
from engine.ops.control import listen_private, remove_if_ours
from engine.server.service import address_of, bind_listeners, tls_context

if TYPE_CHECKING:
    from engine.app import App

log = logging.getLogger("ferry.http")

#: Every scope: what a trusted loopback client may do.
ALL_SCOPES: Final = frozenset(Scope)
#: Who a trusted loopback client is: one value, not one built per request.
LOOPBACK: Final = Principal("loopback", ALL_SCOPES, trusted=True)

#: The route tables of every area, added in this order.
ROUTE_TABLES: Final = (health.routes, metrics.routes, inject.routes, admin.routes)


def http_tls(config: HttpConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (None for plain HTTP), loaded as root before the switch
    of user, like the receive connectors' (engine.server.service.receive_tls)."""
    if config.cert_file is None or config.key_file is None:
        return None
    try:
        return tls_context(str(config.cert_file), str(config.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise OSError(f"http: cert_file/key_file {config.cert_file} with {config.key_file}: "
                      f"{getattr(exc, 'reason', None) or exc}") from None


class Tokens:
    """The bearer tokens of ``[http.tokens]``, looked up in constant time per token (a
    timing side channel must not tell how much of a guess was right)."""

    def __init__(self, config: HttpConfig) -> None:
        self.load(config)

    def load(self, config: HttpConfig) -> None:
        """Take the tokens of ``config`` (at start and at a reload)."""
        self._tokens = [(t.token.encode(), Principal(name, frozenset(Scope(s) for s in t.scopes),
                                                     trusted=t.trusted))
                        for name, t in config.tokens.items()]
        self._named = {who.name: who for _, who in self._tokens}
        self.trust_loopback = config.trust_loopback

    def forwarded(self, request: web.Request) -> Principal | None:
        """Who sent a request another worker of the node forwarded (engine.http.forward:
        it checked the token; only the name comes along), None for a name unknown here."""
        name = request.headers.get(PRINCIPAL_HEADER, "")
        return LOOPBACK if name == LOOPBACK.name else self._named.get(name)

    def principal(self, request: web.Request) -> Principal | None:
        return self.principal_of(request.headers.get("Authorization", ""), request.remote)

    def principal_of(self, header: str, remote: str | None) -> Principal | None:
        """Who presents the Authorization ``header`` ("" for none) from ``remote``."""
        kind, _, credentials = header.partition(" ")
        if kind.lower() == "bearer" and credentials.strip():
            given = credentials.strip().encode()
            found = None
            for token, who in self._tokens:
                if hmac.compare_digest(token, given):
                    found = who
            return found
        if self.trust_loopback and _loopback(remote):
            return LOOPBACK
        return None


@functools.lru_cache(maxsize=4096)  # a client sends many requests: parse its address once
def _loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        scope = required_scope(request.match_info.route.handler)
        if scope is not None:  # None: public, or aiohttp's own 404/405
            request[PRINCIPAL] = _authenticate(request, scope)
        return await handler(request)
    except Problem as problem:
        return problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are answers, not problems
        # aiohttp's texts are "404: Not Found" (nothing more to say) or a sentence (413).
        text = exc.text or ""
        return Problem(exc.status, exc.reason, "" if text.startswith(f"{exc.status}:") else text,
                       headers={k: v for k, v in exc.headers.items()
                                if k.lower() in ("allow", "retry-after")}).response()
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away: nobody to answer
    except Exception as exc:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return Problem(500, "Internal server error",
                       f"{type(exc).__name__} (logged by the server)").response()


def _authenticate(request: web.Request, scope: Scope) -> Principal:
    """Who sent the request, when it may use ``scope``; else a 401/403 Problem."""
    return authorized(request.app[IDENTIFY](request), "Authorization" in request.headers,
                      scope)


#: How an application tells who sent a request: the bearer token or the loopback
#: (``Tokens.principal``), or the name another worker forwarded (``Tokens.forwarded``).
Identify = Callable[[web.Request], Principal | None]
IDENTIFY: Final = web.AppKey[Identify]("ferry.identify")


class HttpServer:
    """The ``[http]`` listener of one running server.  :meth:`bind` (as root) and
    :meth:`start` (once the rest of the server runs), :meth:`stop` first at shutdown."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.config = app.config.http
        self.sockets: list[socket.socket] = []
        self.tls: ssl.SSLContext | None = None
        #: "HOST:PORT" of each bound socket
        self.addresses: list[str] = []
        self._runner: web.AppRunner | None = None
        self._front: Front | None = None
        #: The listeners (engine.http.fast's connections, aiohttp's after a hand-over).
        self._listening: list[asyncio.Server] = []
        self.tokens = Tokens(self.config)
        #: A worker of a node: keyed injections go to the worker that owns the key, which
        #: serves them on its private socket (engine.http.forward).
        role = app.role
        self.forwarder = (Forwarder(role, self.config.request_timeout)
                          if role is not None and role.count > 1 else None)
        self._private: web.AppRunner | None = None
        self._private_inode = 0

    def bind(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind ``[http] listen``, or serve ``sockets`` a node's supervisor bound."""
        self.tls = http_tls(self.config)
        self.sockets = bind_listeners(self.config.listen) if sockets is None else sockets
        self.addresses = [address_of(s) for s in self.sockets]

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    def web_app(self, private: bool = False) -> web.Application:
        """The application of the listener, or (``private``) of a worker's private socket,
        which serves the requests the node's other workers forward to it."""
        middlewares: list[Middleware] = [_guard]
        if private:
            middlewares.insert(0, from_worker)
        elif self.forwarder is not None:
            middlewares.append(self.forwarder.middleware)
        webapp = web.Application(middlewares=middlewares,
                                 client_max_size=self.config.max_body_size)
        webapp[APP] = self.app
        webapp[IDENTIFY] = self.tokens.forwarded if private else self.tokens.principal
        for table in ROUTE_TABLES:
            webapp.add_routes(table)
        return webapp

    def reconfigure(self, config: HttpConfig) -> None:
        """Take new tokens (a reload); the listen addresses and TLS stay until a restart."""
        self.tokens.load(config)
        self.config = config

    async def start(self) -> None:
        self._runner = runner = web.AppRunner(
            self.web_app(), access_log=None, handle_signals=False,
            keepalive_timeout=self.config.idle_timeout)
        await runner.setup()
        assert runner.server is not None  # made by setup()
        # Connections start on the injection route's own path (engine.http.fast), which
        # hands any other request to the runner's aiohttp server (as aiohttp's SockSite
        # would serve the socket: the same create_server call).
        front = self._front = Front(self.app, self.tokens, runner.server,
                                    max_body_size=self.config.max_body_size,
                                    idle_timeout=self.config.idle_timeout,
                                    forwarding=self.forwarder is not None)
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            self._listening.append(await loop.create_server(front, sock=sock, ssl=self.tls,
                                                            backlog=128))
        scheme = "https" if self.tls else "http"
        log.info("http listening on %s", ", ".join(f"{scheme}://{a}" for a in self.addresses))
        if self.forwarder is not None and self.app.role is not None:
            self._private = private = web.AppRunner(
                self.web_app(private=True), access_log=None, handle_signals=False,
                keepalive_timeout=self.config.idle_timeout)
            await private.setup()

            async def serve(sock: socket.socket) -> web.SockSite:
                site = web.SockSite(private, sock)
                await site.start()
                return site

            path = private_path(self.app.role)
            _, self._private_inode = await listen_private(path, None, serve)

    def serving(self) -> bool:
        """Whether every listen address takes connections (for ``/readyz``)."""
        listening = sum(len(server.sockets) for server in self._listening
                        if server.is_serving())
        return self._runner is not None and listening >= len(self.sockets)

    async def stop(self) -> None:
        for server in self._listening:
            server.close()
        self._listening.clear()
        if self._front is not None:
            await self._front.close()
            self._front = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.forwarder is not None:
            await self.forwarder.close()
        if self._private is not None and self.app.role is not None:
            await self._private.cleanup()
            self._private = None
            remove_if_ours(private_path(self.app.role), self._private_inode)
        self.close_sockets()

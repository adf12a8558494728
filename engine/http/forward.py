"""Idempotent injection on a node of several workers (``[server] workers``).

Every accepting worker of a node serves the ``[http]`` listener (SO_REUSEPORT copies, as
the receive connectors'), and the kernel picks the worker by the client's address and
port: a retry on a new connection may reach another worker than the first try.  An
``Idempotency-Key`` is kept in the queue shard of the worker that stored the message, so
a keyed ``POST /api/v1/messages`` is handled by the worker that **owns** the key,
``crc32(principal, key) % workers``, wherever it arrived: the owner's one queue commit
decides whether it is new, as in a server of one process.  Requests without a key are
served where they arrive.

Each accepting worker also serves its HTTP application on a private Unix socket
(``<spool>/workers/http-<i>.sock``: 0600, the server's user, so only the node's own
processes reach it).  The worker a keyed request reaches authenticates it, then sends it
there with who sent it (the principal's name), the client's address and its TLS; the
owner believes those headers on that socket alone and serves the request as if it had
come to it.  While the owner is restarting the answer is 503 with ``Retry-After``: a
retry then reaches it.

It must never forward a request twice (what comes on the private socket is served there)
and never forward anything but keyed injections.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web

from engine.cluster.shards import worker_http_path
from engine.http.api import PRINCIPAL, Handler, Principal, Problem

if TYPE_CHECKING:
    from engine.cluster.role import WorkerRole

#: What the worker a request reached tells the owner (believed on the private socket only).
PRINCIPAL_HEADER: Final = "X-Ferry-Principal"
CLIENT_HEADER: Final = "X-Ferry-Client"
TLS_HEADER: Final = "X-Ferry-TLS"
#: The route that is forwarded, and the header that makes it so.
INJECT_PATH: Final = "/api/v1/messages"
KEY_HEADER: Final = "Idempotency-Key"
#: Request headers the owner needs besides ours (the body's type; the key itself).
_PASSED: Final = ("Content-Type", KEY_HEADER)
#: Answer headers given back to the client as the owner wrote them.
_RETURNED: Final = ("Content-Type", "Retry-After", "Idempotent-Replayed", "Location")


def owner(principal: str, key: str, workers: int) -> int:
    """The worker that keeps ``key`` of ``principal`` (keys are per principal)."""
    return zlib.crc32(f"{principal}\0{key}".encode()) % workers


class Forwarder:
    """The keyed injections of this worker's listener that another worker owns."""

    def __init__(self, role: WorkerRole, timeout: float) -> None:
        self.index = role.index
        self.workers = role.count
        self.spool = role.spool
        self.timeout = timeout
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get(KEY_HEADER)
        if key is None or request.method != "POST" or request.path != INJECT_PATH:
            return await handler(request)
        who = request.get(PRINCIPAL)
        if who is None:  # not authenticated: the handler's own answer says why
            return await handler(request)
        target = owner(who.name, key, self.workers)
        if target == self.index:
            return await handler(request)
        return await self._forward(request, who, target)

    async def _forward(self, request: web.Request, who: Principal,
                       target: int) -> web.Response:
        body = await request.read()
        headers = {name: value for name in _PASSED
                   if (value := request.headers.get(name)) is not None}
        headers[PRINCIPAL_HEADER] = who.name
        headers[CLIENT_HEADER] = request.remote or ""
        headers[TLS_HEADER] = tls_of(request)
        try:
            async with self._session(target).post(
                    f"http://worker-{target}{request.path_qs}", data=body,
                    headers=headers) as answer:
                text = await answer.read()
                returned = {name: value for name in _RETURNED
                            if (value := answer.headers.get(name)) is not None}
                return web.Response(status=answer.status, body=text, headers=returned)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Problem(503, "Service unavailable",
                          f"worker {target}, which keeps this Idempotency-Key, does not "
                          f"answer ({type(exc).__name__}); try again",
                          headers={"Retry-After": "1"}) from None

    def _session(self, target: int) -> aiohttp.ClientSession:
        session = self._sessions.get(target)
        if session is None or session.closed:
            session = self._sessions[target] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(worker_http_path(self.spool,
                                                                          target))),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                auto_decompress=False)
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def tls_of(request: web.Request) -> str:
    """The TLS of the client's connection ("" for none), as the Received field names it:
    the owner of a forwarded request takes the first worker's word for it."""
    forwarded: str | None = request.get(FORWARDED_TLS)
    if forwarded is not None:
        return forwarded
    return transport_tls(request.transport)


def transport_tls(transport: asyncio.BaseTransport | None) -> str:
    """The TLS of a connection ("" for none): "version=... cipher=..."."""
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return ""
    return f"version={ssl_object.version()} cipher={ssl_object.cipher()[0]}"


#: A forwarded request's TLS, set on the owner from :data:`TLS_HEADER`.
FORWARDED_TLS: Final = web.RequestKey[str]("ferry.forwarded_tls")


@web.middleware
async def from_worker(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On the private socket, before authentication: the request as the client sent it
    to the first worker (its address and TLS)."""
    client = request.headers.get(CLIENT_HEADER)
    if client:
        request = request.clone(remote=client)
    request[FORWARDED_TLS] = request.headers.get(TLS_HEADER, "")
    return await handler(request)


def private_path(role: WorkerRole) -> Path:
    path: Path = worker_http_path(role.spool, role.index)
    return path

"""What every HTTP route shares: the scopes a token grants, who is asking, and the RFC 9457
problem-details error every bad request gets.

A route module declares its routes on its own ``aiohttp.web.RouteTableDef`` and marks each
handler with :func:`requires`; ``engine.http.server`` checks the mark before the handler
runs.  A handler reaches the running server's parts through ``request.app[APP]`` (the
composition root, ``engine.app.App``) and raises :class:`Problem` for anything the client
did wrong.  This module must never touch the queue or the scheduler itself.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from engine.app import App  # noqa: F401  (named by APP's type, as a string)


class Scope(enum.StrEnum):
    """What a bearer token may do (``[http.tokens.NAME] scopes``)."""

    INJECT = "inject"
    READ = "read"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: a token's name, or "loopback" for a trusted local client."""

    name: str
    scopes: frozenset[Scope]
    #: A loopback client or a token's holder; untrusted injectors are held to the
    #: accepted domains (engine.http.inject).
    trusted: bool = False


#: The composition root, for handlers: ``request.app[APP].scheduler`` and so on.
APP: Final = web.AppKey["App"]("ferry")
#: The request's principal, set by the authentication middleware before any handler.
PRINCIPAL: Final = web.RequestKey["Principal"]("ferry.principal")

PROBLEM_TYPE: Final = "application/problem+json"


@dataclass(slots=True)
class Problem(Exception):
    """An error answer, RFC 9457 problem details: ``status``, a short ``title`` that is the
    same for every occurrence of the problem, the ``detail`` of this one, and members of
    its own (``extra``, e.g. the offending field).  ``headers`` go on the response
    (``Retry-After`` with a 429/503, ``WWW-Authenticate`` with a 401)."""

    status: int
    title: str
    detail: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Close the connection after the answer: what is left of the request on it cannot be
    #: told from the next request (a body that stopped half way).
    close: bool = False

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"

    def document(self) -> bytes:
        """The answer's body (the aiohttp response's, and engine.http.fast's)."""
        doc: dict[str, Any] = {"type": "about:blank", "title": self.title,
                               "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        doc.update(self.extra)
        return orjson.dumps(doc)

    def response(self) -> web.Response:
        response = web.Response(status=self.status, body=self.document(),
                                content_type=PROBLEM_TYPE, headers=dict(self.headers))
        if self.close:
            response.force_close()
        return response


def _challenge(error: str = "") -> Mapping[str, str]:
    # RFC 6750 §3: the scheme and realm, and why a presented token was refused.
    value = 'Bearer realm="ferry"' + (f', error="{error}"' if error else "")
    return {"WWW-Authenticate": value}


def authorized(who: Principal | None, presented: bool, scope: Scope) -> Principal:
    """``who`` (None: nobody the credentials name; ``presented``: an Authorization header
    came), when it may use ``scope``; else a 401/403 Problem."""
    if who is None:
        raise Problem(401, "Unauthorized",
                      "the bearer token is not valid" if presented else
                      "this needs Authorization: Bearer <token> (http.tokens)",
                      headers=_challenge("invalid_token" if presented else ""))
    if scope not in who.scopes:
        raise Problem(403, "Forbidden", f"token {who.name!r} lacks the {scope.value!r} scope",
                      extra={"scope": scope.value},
                      headers=_challenge("insufficient_scope"))
    return who


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_H = TypeVar("_H", bound=Handler)

#: Attribute :func:`requires` sets on a handler.
SCOPE_ATTRIBUTE: Final = "__ferry_scope__"


def requires(scope: Scope) -> Callable[[_H], _H]:
    """Mark a handler as needing ``scope``; a handler without a mark is public (health)."""

    def mark(handler: _H) -> _H:
        setattr(handler, SCOPE_ATTRIBUTE, scope)
        return handler

    return mark


def required_scope(handler: object) -> Scope | None:
    return getattr(handler, SCOPE_ATTRIBUTE, None)


def json_response(doc: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json",
                        headers=headers)


async def json_body(request: web.Request) -> Any:
    """The request's JSON document; 415 when it is not JSON, 400 when it does not parse
    (the body size limit is aiohttp's, raised as 413 while reading), 408 when the body does
    not arrive within ``[http] request_timeout``."""
    if request.content_type not in ("application/json", ""):
        raise Problem(415, "Unsupported media type",
                      f'send "Content-Type: application/json", not {request.content_type!r}')
    # Only the reading is timed (RFC 9110 §15.5.9: 408 is the server giving up waiting for
    # the request): once a request is read, its work runs to its end, so a client never
    # gets a 408 for messages that were queued meanwhile.
    timeout = request.app[APP].config.http.request_timeout
    if request.content.is_eof():
        # The whole body came with the request's first reads (a small request, the
        # common case): nothing to wait for, so no timer to arm and cancel.
        return decode_json(await request.read())
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise Problem(408, "Request timeout", f"the request body did not arrive within "
                      f"{timeout:g} s (http.request_timeout)", close=True) from None
    return decode_json(raw)


def decode_json(raw: bytes) -> Any:
    """A request's JSON document; 400 when it does not parse."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "Malformed JSON", str(exc)) from None

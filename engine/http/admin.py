"""The admin API under ``/api/v1/``: the queue viewer's views and verbs and tracking search,
with the semantics of ``ferry queue`` and ``ferry track`` (docs/admin-api.md).

One implementation behind both front doors: every route parses its request into the
values ``engine.ops.operations`` takes and answers what it returns, the documents the
control channel sends (without its ``"ok"``).  Read views need the ``read`` scope, verbs
``admin``; the events a verb emits name the token (``by``: its name, or "loopback").
Bad ids, filters and bodies are 400 problem documents; a message that is not queued is
404.  ``POST /api/v1/messages`` is the injection API's (``engine.http.inject``): only GET
is registered here on that path (aiohttp resolves a path's methods across tables).

It must never read many records on the event loop (the operations run those reads in a
thread) nor decide anything about delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from engine.http.api import APP, PRINCIPAL, Problem, Scope, json_body, json_response, requires
from engine.ops import suppressions
from engine.ops.operations import (
    FILTERS,
    CorruptRecord,
    NotFound,
    OperationError,
    Operations,
    parse_filter,
    parse_id,
    parse_ids,
    parse_limit,
    quote,
    tracking_query,
)
from engine.queue.suppression import normalize

log = logging.getLogger("ferry.http")
routes = web.RouteTableDef()

#: The query parameters of ``GET /api/v1/tracking`` (``ferry track``'s options).
TRACKING_PARAMETERS: Final = ("message_id", "queue_id", "sender", "recipient", "event",
                              "start", "end", "limit")
#: What the verbs on one message answer with when it is not queued.
_NOT_QUEUED: Final = "Not queued"


def _operations(request: web.Request) -> Operations:
    """The server's operations; on a node of several workers, the node's (every shard's
    views, every worker's verbs: engine.cluster.nodeview)."""
    app = request.app[APP]
    ops = app.node_operations or app.operations
    if ops is None:
        raise Problem(503, "Service unavailable", "the server is still starting",
                      headers={"Retry-After": "1"})
    return ops


def _by(request: web.Request) -> str:
    return request[PRINCIPAL].name


def _bad(exc: OperationError) -> Problem:
    if isinstance(exc, NotFound):
        return Problem(404, "Not found", str(exc))
    if isinstance(exc, CorruptRecord):
        return Problem(409, "Corrupt record", str(exc))
    return Problem(400, "Bad request", str(exc))


def _single(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each given at most once and each one of ``names``."""
    query = request.query
    unknown = sorted(set(query) - set(names))
    if unknown:
        raise OperationError(f"unknown query parameter {quote(unknown[0])}; one of "
                             f"{', '.join(names)}")
    out = {}
    for name in set(query):
        values = query.getall(name)
        if len(values) > 1 and name != "event":
            raise OperationError(f"query parameter {quote(name)} given more than once")
        out[name] = values[0]
    return out


def _message_id(request: web.Request) -> bytes:
    return parse_id(request.match_info["id"])


def _report(text: str | None) -> bool:
    if text is None:
        return False
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise OperationError(f'"report" must be true or false, not {quote(text)}')
    return value in ("true", "1", "yes")


# --- views (scope read) -------------------------------------------------------------------


@routes.get("/api/v1/queues")
@requires(Scope.READ)
async def queues(request: web.Request) -> web.Response:
    """The queues per next hop (``ferry queue queues``, Get-Queue)."""
    return json_response(await _operations(request).queues())


@routes.get("/api/v1/stats")
@requires(Scope.READ)
async def stats(request: web.Request) -> web.Response:
    """The scheduler's figures (``ferry queue`` over the control channel: ``stats``)."""
    return json_response(await _operations(request).stats_view())


@routes.get("/api/v1/messages")
@requires(Scope.READ)
async def messages(request: web.Request) -> web.Response:
    """``ferry queue list --json``'s objects for the filters of the query, oldest first,
    with how many are shown of how many match."""
    ops = _operations(request)
    try:
        query = _single(request, (*FILTERS, "limit"))
        limit = parse_limit(query.pop("limit", None))
        filt = parse_filter(query)
    except OperationError as exc:
        raise _bad(exc) from None
    return json_response(await ops.messages(filt, limit))


@routes.get("/api/v1/messages/{id}")
@requires(Scope.READ)
async def message(request: web.Request) -> web.Response:
    """One message (``ferry queue show --json``)."""
    ops = _operations(request)
    try:
        return json_response(await ops.message(_message_id(request)))
    except OperationError as exc:
        raise _bad(exc) from None


@routes.get("/api/v1/messages/{id}/content")
@requires(Scope.READ)
async def content(request: web.Request) -> web.Response:
    """The message as the next hop receives it (``ferry queue export``)."""
    ops = _operations(request)
    try:
        qid = _message_id(request)
        body = await ops.content(qid)
    except OperationError as exc:
        raise _bad(exc) from None
    return web.Response(body=body, content_type="message/rfc822")


@routes.get("/api/v1/destinations/suspended")
@requires(Scope.READ)
async def suspended(request: web.Request) -> web.Response:
    return json_response({"destinations": await _operations(request).suspended_view()})


@routes.get("/api/v1/tracking")
@requires(Scope.READ)
async def tracking(request: web.Request) -> web.Response:
    """The tracking records that match ``ferry track``'s filters (``event`` repeatable),
    oldest first, at most ``limit`` (1000 unless said; 0: all)."""
    ops = _operations(request)
    try:
        query = _single(request, TRACKING_PARAMETERS)
        limit = parse_limit(query.pop("limit", None), default=1000)
        search = tracking_query(
            message_id=query.get("message_id"), queue_id=query.get("queue_id"),
            sender=query.get("sender"), recipient=query.get("recipient"),
            events=[e for value in request.query.getall("event", [])
                    for e in value.split(",") if e],
            start=query.get("start"), end=query.get("end"))
        return json_response(await ops.track(search, limit))
    except OperationError as exc:
        raise _bad(exc) from None


# --- verbs (scope admin) ------------------------------------------------------------------


async def _one(request: web.Request, verb: str, report: bool = False) -> web.Response:
    """``verb`` on the message of the path: the verb's document; 404 when not queued."""
    ops = _operations(request)
    try:
        qid = _message_id(request)
    except OperationError as exc:
        raise _bad(exc) from None
    doc = await ops.verb(verb, [qid], _by(request), report)
    if doc["missing"]:
        raise Problem(404, _NOT_QUEUED, f"no message {doc['missing'][0]}", extra=doc)
    return json_response(doc)


@routes.post(r"/api/v1/messages/{id}/{verb:hold|release|retry}")
@requires(Scope.ADMIN)
async def message_verb(request: web.Request) -> web.Response:
    return await _one(request, request.match_info["verb"])


@routes.delete("/api/v1/messages/{id}")
@requires(Scope.ADMIN)
async def remove(request: web.Request) -> web.Response:
    """Remove one message; ``?report=true``: a non-delivery report to its sender."""
    try:
        report = _report(_single(request, ("report",)).get("report"))
    except OperationError as exc:
        raise _bad(exc) from None
    return await _one(request, "remove", report)


@routes.post(r"/api/v1/queue/{verb:hold|release|retry|remove}")
@requires(Scope.ADMIN)
async def bulk(request: web.Request) -> web.Response:
    """A verb on many messages: ``{"ids": [...]}`` or ``{"filter": {...}}`` (``ferry queue
    list``'s filters); ``"report": true`` with ``remove``.  Answers ``changed``,
    ``unchanged`` and ``missing`` like the control channel."""
    verb = request.match_info["verb"]
    ops = _operations(request)
    doc = await json_body(request)
    try:
        if not isinstance(doc, dict):
            raise OperationError('the body must be a JSON object: {"ids": [...]} or '
                                 '{"filter": {...}}')
        allowed = {"ids", "filter"} | ({"report"} if verb == "remove" else set())
        extra = sorted(set(doc) - allowed)
        if extra:
            raise OperationError(f"{verb}: unknown field {quote(extra[0])}")
        report = doc.get("report", False)
        if not isinstance(report, bool):
            raise OperationError(f'{verb}: "report" must be true or false')
        if ("ids" in doc) == ("filter" in doc):
            raise OperationError(f'{verb}: "ids" or "filter", one of the two')
        if "ids" in doc:
            ids: list[bytes] = list(parse_ids(doc["ids"]))
        else:
            if not isinstance(doc["filter"], Mapping):
                raise OperationError(f'{verb}: "filter" must be an object of filters: '
                                     f"{', '.join(FILTERS)}")
            ids = await ops.matching(parse_filter(doc["filter"]))
    except OperationError as exc:
        raise _bad(exc) from None
    answer: dict[str, Any] = await ops.verb(verb, ids, _by(request), report)
    return json_response(answer)


@routes.post(r"/api/v1/destinations/{destination}/{action:suspend|resume|retry}")
@requires(Scope.ADMIN)
async def destination(request: web.Request) -> web.Response:
    """Suspend, resume or retry a destination (a domain, ``local:<domain>`` or an address
    literal, as ``ferry queue queues`` names it)."""
    ops = _operations(request)
    name, by = request.match_info["destination"], _by(request)
    action = request.match_info["action"]
    try:
        if action == "suspend":
            return json_response(await ops.suspend(name, by))
        if action == "resume":
            return json_response(await ops.resume(name, by))
        return json_response(await ops.retry_destination(name, by))
    except OperationError as exc:
        raise _bad(exc) from None


# --- the suppression list (engine.ops.suppressions) ---------------------------------------


@routes.get("/api/v1/suppressions")
@requires(Scope.READ)
async def suppression_list(request: web.Request) -> web.Response:
    """``ferry suppress list --json``: entries in address order; ``category``, ``after``
    (paging: the previous answer's ``next``), ``limit`` (1000 unless said)."""
    ops = _operations(request)
    try:
        query = _single(request, ("category", "after", "limit"))
        return json_response(suppressions.listing(ops, query.get("category", ""),
                                                  query.get("after", ""),
                                                  query.get("limit")))
    except OperationError as exc:
        raise _bad(exc) from None


@routes.get("/api/v1/suppressions/{address}")
@requires(Scope.READ)
async def suppression_entry(request: web.Request) -> web.Response:
    """One entry; 404 when the address is not suppressed."""
    ops = _operations(request)
    try:
        entry = suppressions.suppression_of(ops).entry(
            normalize(request.match_info["address"]))
    except (OperationError, ValueError) as exc:
        raise Problem(400, "Bad request", str(exc)) from None
    if entry is None:
        raise Problem(404, "Not found", "the address is not suppressed")
    return json_response(entry.to_json())


@routes.post("/api/v1/suppressions")
@requires(Scope.ADMIN)
async def suppression_add(request: web.Request) -> web.Response:
    """Add (or replace) an entry: ``{"address": ..., "reason": ..., "category": ...}``."""
    ops = _operations(request)
    doc = await json_body(request)
    try:
        if not isinstance(doc, dict):
            raise OperationError('the body must be a JSON object: {"address": ...}')
        extra = sorted(set(doc) - {"address", "reason", "category"})
        if extra:
            raise OperationError(f"unknown field {quote(extra[0])}")
        return json_response(await ops.suppress(doc.get("address"), doc.get("reason"),
                                                doc.get("category"), _by(request)))
    except OperationError as exc:
        raise _bad(exc) from None


@routes.delete("/api/v1/suppressions/{address}")
@requires(Scope.ADMIN)
async def suppression_remove(request: web.Request) -> web.Response:
    """Remove an entry; 404 when the address was not suppressed."""
    ops = _operations(request)
    try:
        doc = await ops.unsuppress(request.match_info["address"], _by(request))
    except (OperationError, ValueError) as exc:
        raise Problem(400, "Bad request", str(exc)) from None
    if not doc["removed"]:
        raise Problem(404, "Not found", "the address is not suppressed", extra=doc)
    return json_response(doc)


@routes.post("/api/v1/reload")
@requires(Scope.ADMIN)
async def reload(request: web.Request) -> web.Response:
    """``ferry reload`` over HTTP (engine.ops.reload): 200 with the keys applied and those
    that wait for a restart; 422 with every problem when the configuration is refused
    (the running one stays)."""
    log.info("%s asked for a reload of the configuration over HTTP", _by(request))
    node = request.app[APP].node_operations
    if node is not None:  # the supervisor reloads the node: every worker
        reply = await node.reload_node()
        if not reply.get("ok"):
            raise Problem(422, "Configuration refused", "the running configuration stays",
                          extra={"errors": list(reply.get("errors") or [reply.get("error")])})
        return json_response({k: v for k, v in reply.items() if k != "ok"})
    result = await request.app[APP].reload()
    if not result.ok:
        raise Problem(422, "Configuration refused", "the running configuration stays",
                      extra={"errors": list(result.errors)})
    return json_response(result.to_json())

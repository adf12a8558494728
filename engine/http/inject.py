"""``POST /api/v1/messages``: the injection API (docs/inject.md).

A request is a JSON object: ``from``, ``recipients`` (addresses, or objects ``{"email",
"substitutions"}``), and either ``content`` (a whole RFC 5322 message) or the structured
form (``subject``, ``text``, ``html``, ``headers``, ``attachments``, with ``{{name}}``
placeholders filled per recipient from ``substitutions``; engine.message.compose).
Recipients whose values differ get messages of their own; those that share them share one.

Every message goes through the receive side's ingest (engine.server.ingest: the Received
field, the hop count, the long-line policy, the envelope, RECEIVE after the commit) under
the rules of ``[http]`` (a receive connector named ``http.connector``), and all of a
request's messages are stored in ONE write of the queue's group commit
(``QueueStore.inject``), with the request's ``Idempotency-Key`` when it has one: the 200
is sent only after that commit returned, and a retry with the key gets the first answer
and queues nothing, across a crash or a restart too.  Back pressure answers 429 (the
writer is behind) or 503 (storage), with ``Retry-After``; never a 200 that is not durable.

An untrusted principal (a token without ``trusted = true``) may only send to the accepted
domains (engine.agents.relay, the SMTP side's rules).  Recipients on the suppression list
(engine.queue.suppression) are failed before anything is queued and named in the answer's
``suppressed``; the others are queued.  This module must never write the
queue but through ``QueueStore.inject``, nor emit events itself (ingest does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import ipaddress
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from engine.agents.api import Effects, Stage, Transaction, refusal
from engine.agents.api import Session as AgentSession
from engine.agents.chain import Chain
from engine.agents.relay import RelayPolicy
from engine.agents.suppress import CODE as SUPPRESSED_CODE
from engine.agents.suppress import ENHANCED as SUPPRESSED_ENHANCED
from engine.agents.suppress import suppressed_text
from engine.config import HttpConfig, ReceiveConfig
from engine.http.api import (
    APP,
    PRINCIPAL,
    Principal,
    Problem,
    Scope,
    json_body,
    json_response,
    requires,
)
from engine.http.forward import tls_of
from engine.message.compose import (
    Attachment,
    ComposeError,
    Composer,
    Structured,
    base64_content,
    canonical,
    complete,
)
from engine.ops import maillog
from engine.protocol.command import Command, parse_command
from engine.protocol.errors import CommandError
from engine.queue.api import BackPressure, Idempotency, QueueClosed, QueueStore
from engine.routing.router import accepted_domains
from engine.server.ingest import Arrival, Ingest, Prepared

if TYPE_CHECKING:
    from engine.app import App

routes = web.RouteTableDef()

PATH: Final = "/api/v1/messages"

#: Retry-After seconds: the writer catches up in moments; storage takes an operator.
RETRY_BEHIND: Final = "1"
RETRY_STORAGE: Final = "30"
#: From this many distinct messages, a request is built in a thread: the loop keeps
#: serving SMTP sessions meanwhile (DESIGN.md: never block the loop).
THREAD_AT: Final = 64
#: Messages per write of a request stored in parts (:func:`_pipelined`).
CHUNK: Final = 500
#: The Idempotency-Key header (draft-ietf-httpapi-idempotency-key-header): a string of
#: printable ASCII.
_KEY: Final = re.compile(r"[\x20-\x7e]{1,255}")
#: The To: of a message shared by several recipients (RFC 5322 §3.6.3: an empty group).
UNDISCLOSED: Final = "undisclosed-recipients:;"
_STRUCTURED: Final = ("subject", "text", "html", "headers", "attachments")
_KNOWN: Final = frozenset(("from", "recipients", "content", "substitutions", *_STRUCTURED))
_RCPT_MEMBERS: Final = frozenset(("email", "substitutions"))


def _invalid(where: str, detail: str, status: int = 400) -> Problem:
    title = "Content too large" if status == 413 else "Invalid request"
    return Problem(status, title, f"{where}: {detail}" if where else detail,
                   extra={"field": where})


def _string(doc: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise _invalid(key, "is required")
        return None
    if not isinstance(value, str):
        raise _invalid(key, f"must be a string, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", bool: "a boolean", int: "a number",
            float: "a number", str: "a string"}.get(type(value), "null")


def _values(value: object, where: str, index: int = -1) -> dict[str, str]:
    """A substitutions object: names to strings (numbers are written as text).  It is
    request field ``where``, or recipient ``index``'s member ``where``: that field's name
    is written only for an answer that names it, never once per recipient."""
    if isinstance(value, dict):
        for v in value.values():
            if type(v) is not str:
                break
        else:
            return value  # all strings, the common case: the decoded document's own object
    return _typed(value, _rcpt_field(index, where) if index >= 0 else where)


def _typed(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _invalid(where, f"must be an object, not {_kind(value)}")
    out: dict[str, str] = {}
    for name, v in value.items():
        if isinstance(v, str):
            out[name] = v
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = str(v)
        else:
            raise _invalid(f"{where}.{name}", f"must be a string or a number, not {_kind(v)}")
    return out


def _rcpt_field(index: int, member: str = "") -> str:
    """The request field of recipient ``index`` (or its ``member``), for an answer that
    names it: written only then, never once per recipient of a bulk request."""
    return f"recipients[{index}]{member}"


def _address(value: object, index: int, member: str = "") -> Command:
    """A recipient as the SMTP side parses RCPT TO (engine.protocol: one grammar):
    ``recipients[index]`` or its ``member``."""
    if not isinstance(value, str) or not value:
        raise _invalid(_rcpt_field(index, member), "must be an e-mail address")
    try:
        cmd = parse_command(b"RCPT TO:<" + value.encode() + b">", not value.isascii())
    except (CommandError, UnicodeEncodeError) as exc:
        raise _invalid(_rcpt_field(index, member),
                       f"is not an e-mail address ({exc})") from None
    if not cmd.domain:
        raise _invalid(_rcpt_field(index, member), "must be an address with a domain")
    return cmd


def _sender(value: str, utf8: bool, eight_bit: bool) -> Command:
    """The MAIL command of the transaction, with SMTPUTF8 (RFC 6531) and BODY=8BITMIME
    (RFC 6152) when the message needs them."""
    line = b"MAIL FROM:<" + value.encode() + b">"
    line += b" BODY=8BITMIME" if eight_bit else b""
    line += b" SMTPUTF8" if utf8 else b""
    try:
        cmd = parse_command(line, utf8)
    except (CommandError, UnicodeEncodeError) as exc:
        raise _invalid("from", f"is not an e-mail address ({exc})") from None
    if not cmd.domain:
        raise _invalid("from", "must be an address with a domain")
    return cmd


@dataclass(slots=True)
class _Rcpt:
    cmd: Command
    #: this recipient's substitutions (None: none given)
    values: dict[str, str] | None
    #: its index in the request's recipients
    index: int

    @property
    def where(self) -> str:
        """The request field it came from (written only for an answer that names it)."""
        return _rcpt_field(self.index)


def _recipients(doc: Mapping[str, Any], limit: int) -> list[_Rcpt]:
    items = doc.get("recipients")
    if items is None:
        raise _invalid("recipients", "is required")
    if not isinstance(items, list) or not items:
        raise _invalid("recipients", "must be a non-empty array of addresses")
    if len(items) > limit:
        raise _invalid("recipients", f"has {len(items)} recipients, more than "
                                     f"http.max_recipients ({limit})")
    out: list[_Rcpt] = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if not item.keys() <= _RCPT_MEMBERS:  # once per recipient: no set built
                unknown = set(item) - _RCPT_MEMBERS
                raise _invalid(_rcpt_field(i, f".{min(unknown)}"),
                               'is not a recipient member ("email", "substitutions")')
            subs = item.get("substitutions")
            out.append(_Rcpt(_address(item.get("email"), i, ".email"),
                             None if subs is None
                             else _values(subs, ".substitutions", i), i))
        else:
            out.append(_Rcpt(_address(item, i), None, i))
    return out


def _structured(doc: Mapping[str, Any], sender: str) -> Structured:
    headers = doc.get("headers", {})
    if not isinstance(headers, dict):
        raise _invalid("headers", f"must be an object, not {_kind(headers)}")
    for name, value in headers.items():
        if not isinstance(value, str):
            raise _invalid(f"headers.{name}", f"must be a string, not {_kind(value)}")
    attachments: list[Attachment] = []
    given = doc.get("attachments", [])
    if not isinstance(given, list):
        raise _invalid("attachments", f"must be an array, not {_kind(given)}")
    for i, item in enumerate(given):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise _invalid(where, f"must be an object, not {_kind(item)}")
        filename = _string(item, "filename", required=True)
        content = _string(item, "content", required=True)
        content_type = _string(item, "content_type") or "application/octet-stream"
        assert filename is not None and content is not None
        try:
            data = base64_content(content, f"{where}.content")
        except ComposeError as exc:
            raise _invalid(exc.field, exc.detail) from None
        attachments.append(Attachment(filename, content_type, data))
    text, html = _string(doc, "text"), _string(doc, "html")
    if text is None and html is None:
        raise _invalid("text", 'is required (or "html", or a raw "content")')
    return Structured(sender=sender, subject=_string(doc, "subject") or "", text=text,
                      html=html, headers=tuple(headers.items()),
                      attachments=tuple(attachments))


_cached: tuple[HttpConfig, ReceiveConfig] | None = None


def http_connector(config: HttpConfig) -> ReceiveConfig:
    """The receive connector injected mail arrives through: ``[http]``'s rules in the
    shape ingest reads (name, hop count, long lines, limits)."""
    global _cached
    if _cached is None or _cached[0] is not config:
        _cached = (config, dataclasses.replace(
            ReceiveConfig(), name=config.connector, listen=(),
            max_message_size=config.max_message_size, max_recipients=config.max_recipients,
            bare_eol=config.bare_eol, long_lines=config.long_lines,
            max_received_headers=config.max_received_headers))
    return _cached[1]


_screens: tuple[Chain, bool] | None = None


def _screening(chain: Chain) -> bool:
    """Whether ``chain`` has an end of data for injected mail (data or sign stage agents),
    asked once per chain (it is built at start and kept across reloads), not per request."""
    global _screens
    if _screens is None or _screens[0] is not chain:
        _screens = (chain, chain.wants(Stage.DATA) or chain.wants(Stage.SIGN))
    return _screens[1]


@dataclass(slots=True)
class _Plan:
    """What one request will queue, before anything is built: the messages as
    (recipients, values) groups and how each becomes bytes.  ``checked``: no message can
    fail a limit or ingest's checks (its size bound fits), so it may be stored in parts
    as it is built (:func:`_pipelined`)."""

    groups: list[tuple[list[_Rcpt], dict[str, str]]]
    render: Callable[[dict[str, str], str], bytes]
    where: str
    checked: bool = False


def _plan(doc: Mapping[str, Any], rcpts: list[_Rcpt], http: HttpConfig,
          hostname: str) -> _Plan:
    defaults = _values(doc["substitutions"], "substitutions") if "substitutions" in doc else {}
    content = _string(doc, "content")
    if content is not None:
        extra = [k for k in _STRUCTURED if k in doc]
        if extra:
            raise _invalid(extra[0], 'cannot be given with a raw "content"')
        if defaults or any(r.values for r in rcpts):
            raise _invalid("substitutions", 'need the structured form (a raw "content" is '
                                            "queued as it is)")
        try:
            data = complete(canonical(content.encode(), http.bare_eol), hostname)
        except ComposeError as exc:
            raise _invalid(exc.field, exc.detail) from None
        except UnicodeEncodeError:
            raise _invalid("content", "is not valid Unicode text") from None
        return _Plan([(rcpts, {})], lambda values, to: data, "content")
    spec = _structured(doc, str(doc["from"]))
    try:
        composer = Composer(spec, hostname)
    except ComposeError as exc:
        raise _invalid(exc.field, exc.detail) from None
    names = sorted(composer.names)
    # Recipients with the same values share one message (the composer fills it once).
    # Per recipient of a bulk request: a set test and a tuple of look-ups.
    groups: dict[tuple[str, ...], tuple[list[_Rcpt], dict[str, str]]] = {}
    needed = composer.names
    for r in rcpts:
        # (the recipient's own object when there are no defaults: read, never changed)
        values = ({**defaults, **r.values} if defaults else r.values) if r.values else defaults
        if not values.keys() >= needed:
            missing = composer.missing(values)
            raise _invalid(f"{r.where}.substitutions.{missing[0]}",
                           f"has no value for {{{{{missing[0]}}}}} (give it in the "
                           "recipient's or the top-level substitutions)")
        key = tuple(map(values.__getitem__, names))
        group = groups.get(key)
        if group is None:
            groups[key] = ([r], values)
        else:
            group[0].append(r)
    longest = max((len(v) for _, values in groups.values() for v in values.values()),
                  default=0)
    bound = composer.size_bound(longest)
    # A Received field in headers counts against the hop limit, and "reject" could refuse
    # a long line: such requests are built whole before anything is stored.
    checked = (bound <= http.max_message_size
               and bound * len(groups) <= http.max_request_queued_size
               and http.long_lines == "wrap" and not spec.header("Received"))
    return _Plan(list(groups.values()), composer.render,
                 "text" if spec.text is not None else "html", checked)


@dataclass(slots=True)
class _Built:
    prepared: list[Prepared]
    size: int


#: The policy agents' end of data for one injected message (:func:`_screener`): the
#: arrival to store (its body changed, maybe held), or None when an agent discarded it.
Screen = Callable[[Arrival], "Arrival | None"]
#: Where the transaction and the body are in an Arrival (:func:`_build` replaces them).
_MAIL: Final = Arrival._fields.index("mail")
_BODY: Final = Arrival._fields.index("body")
assert Arrival._fields[_MAIL:_BODY + 1] == ("mail", "recipients", "body")


def _build(plan: _Plan, ingest: Ingest, arrival: Arrival, http: HttpConfig,
           doc_from: str, hand: Callable[[list[Prepared]], None] | None = None,
           screen: Screen | None = None) -> _Built:
    """Every message of the plan, through the agents (``screen``) and ingest.prepare (may
    run in a thread: it touches nothing but its arguments, and ``screen`` runs the agents
    on the loop); ``hand`` gets them :data:`CHUNK` at a time as they are built."""
    prepared: list[Prepared] = []
    total = handed = 0
    ascii_from = doc_from.isascii()
    # The MAIL command by (SMTPUTF8, 8BITMIME): parsed once per request, not per message;
    # the request's arrival holds the one its sender was checked with.
    senders: dict[tuple[bool, bool], Command] = {(not ascii_from, False): arrival.mail}
    # Each message's Arrival is the request's with its own transaction and body, built
    # from these parts (a tuple, not namedtuple._replace's keyword work per message).
    before, after = arrival[:_MAIL], arrival[_BODY + 1:]
    for rcpts, values in plan.groups:
        if len(rcpts) == 1:
            commands: tuple[Command, ...] = (rcpts[0].cmd,)
            to = commands[0].mailbox
            utf8 = not ascii_from or not to.isascii()
        else:
            commands = tuple(r.cmd for r in rcpts)
            to = UNDISCLOSED
            utf8 = not ascii_from or not all(c.mailbox.isascii() for c in commands)
        data = plan.render(values, to)
        if len(data) > http.max_message_size:
            raise _invalid(plan.where, f"the message is {len(data)} bytes, more than "
                                       f"http.max_message_size ({http.max_message_size})", 413)
        total += len(data)
        if total > http.max_request_queued_size:
            raise _invalid("recipients", "the personalised messages come to more than "
                           f"http.max_request_queued_size ({http.max_request_queued_size} "
                           "bytes)", 413)
        eight_bit = not data.isascii()
        # RFC 6532: a UTF-8 header section needs SMTPUTF8 from every hop.
        if eight_bit and not utf8:
            end = data.find(b"\r\n\r\n")
            utf8 = not data[:end].isascii()
        mail = senders.get((utf8, eight_bit))
        if mail is None:
            mail = senders[utf8, eight_bit] = _sender(doc_from, utf8, eight_bit)
        one: Arrival | None = Arrival._make((*before, mail, commands, data, *after))
        if screen is not None:
            one = screen(one)  # type: ignore[arg-type]
            if one is None:
                continue
        result = ingest.prepare(one)  # type: ignore[arg-type]
        if not isinstance(result, Prepared):
            raise _invalid(plan.where, f"{result[2]} ({result[0]} {result[1]})")
        prepared.append(result)
        if hand is not None and len(prepared) - handed >= CHUNK:
            hand(prepared[handed:])
            handed = len(prepared)
    if hand is not None and handed < len(prepared):
        hand(prepared[handed:])
    return _Built(prepared, total)


def _screener(chain: Chain, view: AgentSession) -> Screen:
    """The end of data of the policy agents (engine.agents.chain.Chain.screen) for the
    messages of one request, called from the thread that builds them: the agents run on
    the loop, as for SMTP; a refusal becomes the request's problem document."""
    loop = asyncio.get_running_loop()

    def screen(arrival: Arrival) -> Arrival | None:
        tx = Transaction(arrival.mail, arrival.recipients)
        screened = asyncio.run_coroutine_threadsafe(
            chain.screen(view, tx, arrival.body), loop).result()
        refused = screened.refused
        if refused is not None:
            code, enhanced, text = refusal(refused)
            extra = {"reply": f"{code} {enhanced} {text}".replace("  ", " "),
                     "by": refused.reason}
            if code < 500:
                raise Problem(503, "Service unavailable", text, extra=extra,
                              headers={"Retry-After": RETRY_BEHIND})
            raise Problem(422, "Rejected by policy", text, extra=extra)
        if screened.discarded:
            maillog.discarded(screened.discarded, client=arrival.client_address,
                              sender=arrival.mail.mailbox,
                              recipients=[r.mailbox for r in arrival.recipients],
                              connector=view.connector)
            return None
        return arrival._replace(body=screened.data, held=screened.held)

    return screen


async def _pipelined(plan: _Plan, ingest: Ingest, arrival: Arrival, http: HttpConfig,
                     sender: str, store: QueueStore, screen: Screen | None) -> list[Prepared]:
    """Build a large request in a thread and store it in parts as they are built: the
    writer commits one part while the next is built (two CPUs at work).  Only for a
    ``checked`` plan without an Idempotency-Key: nothing can be refused after the first
    part is stored; back pressure may still stop it, and the 429/503 then lists the ids
    already queued (``queued``)."""
    loop = asyncio.get_running_loop()
    writes: list[concurrent.futures.Future[list[Prepared]]] = []

    async def store_part(chunk: list[Prepared]) -> list[Prepared]:
        await store.inject([p.message for p in chunk])
        ingest.committed(chunk)  # each part's RECEIVEs while the next parts are built
        return chunk

    def hand(chunk: list[Prepared]) -> None:  # in the builder's thread
        writes.append(asyncio.run_coroutine_threadsafe(store_part(chunk), loop))

    try:
        await loop.run_in_executor(None, _build, plan, ingest, arrival, http, sender, hand,
                                   screen)
    finally:
        # Every part handed over is waited for, whatever happened after it.
        results = await asyncio.gather(*map(asyncio.wrap_future, writes),
                                       return_exceptions=True)
    queued = [p for result in results if not isinstance(result, BaseException)
              for p in result]
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        if not isinstance(failed, BackPressure | QueueClosed):
            raise failed
        problem = _backpressure(failed)
        problem.extra = {"queued": [p.ident for p in queued]}
        raise problem
    return queued


def _unsuppressed(app: App, rcpts: list[_Rcpt]) -> tuple[list[_Rcpt], dict[str, Any]]:
    """The recipients not on the suppression list, and the answer's ``suppressed`` member
    for the others (each failed here, with the reply an SMTP client would get at RCPT:
    engine.agents.suppress; never queued, so no DSN).  422 when every one is."""
    suppression = app.suppression
    if suppression is None or not suppression.settings.enabled or not suppression.entries:
        return rcpts, {}
    kept: list[_Rcpt] = []
    failed: list[dict[str, str]] = []
    for r in rcpts:
        entry = suppression.check(r.cmd.mailbox)
        if entry is None:
            kept.append(r)
        else:
            failed.append({"recipient": r.cmd.mailbox, "field": r.where,
                           "reply": f"{SUPPRESSED_CODE} {SUPPRESSED_ENHANCED} "
                                    f"{suppressed_text(entry)}"})
    if not failed:
        return rcpts, {}
    if not kept:
        raise Problem(422, "Recipients suppressed", "every recipient is on the suppression "
                      "list", extra={"suppressed": failed})
    return kept, {"suppressed": failed}


def _backpressure(exc: BackPressure | QueueClosed) -> Problem:
    if isinstance(exc, BackPressure) and exc.reason == "queue writer is behind":
        return Problem(429, "Too many requests", exc.reason,
                       headers={"Retry-After": RETRY_BEHIND})
    reason = exc.reason if isinstance(exc, BackPressure) else "queue database is closed"
    return Problem(503, "Service unavailable", reason, headers={"Retry-After": RETRY_STORAGE})


#: An answer of the route: its JSON document (200) and the headers it needs besides.
Answer = tuple[Any, Mapping[str, str] | None]
_REPLAYED: Final = {"Idempotent-Replayed": "true"}


def _replay(stored: bytes, fingerprint: str) -> Answer:
    """The answer of the request that first used the key (same key, same body)."""
    earlier = orjson.loads(stored)
    if earlier.get("fingerprint") != fingerprint:
        raise Problem(422, "Idempotency-Key reused",
                      "this Idempotency-Key was used for a different request",
                      extra={"field": "Idempotency-Key"})
    return earlier["answer"], _REPLAYED


@routes.post(PATH)
@requires(Scope.INJECT)
async def post_messages(request: web.Request) -> web.Response:
    app: App = request.app[APP]
    who: Principal = request[PRINCIPAL]
    key = idempotency_key(app, who, request.headers.get("Idempotency-Key"))
    doc = await json_body(request)
    # A keyed retry must be the same request (the body read above is kept by aiohttp).
    raw = await request.read() if key and isinstance(doc, dict) else b""
    answer, headers = await inject(
        app, who, doc, key=key, raw=raw, remote=request.remote or "127.0.0.1",
        tls_info=tls_of(request), authorization="Authorization" in request.headers,
        ident=id(request))
    return json_response(answer, headers=headers)


def idempotency_key(app: App, who: Principal, raw_key: str | None) -> bytes:
    """What a request is checked for before its body is read: a server that takes
    injections (503 while it starts), and the store's key of its ``Idempotency-Key``
    header (b"" without one; 400 for a key that is not one)."""
    if app.store is None or app.ingest is None:
        raise Problem(503, "Service unavailable", "the server is starting",
                      headers={"Retry-After": RETRY_BEHIND})
    if raw_key is None:
        return b""
    if not _KEY.fullmatch(raw_key):
        raise _invalid("Idempotency-Key", "must be 1 to 255 printable ASCII characters")
    # Keys are per principal: two clients never see each other's answers.
    return who.name.encode() + b"\0" + raw_key.encode()


async def inject(app: App, who: Principal, doc: Any, *, key: bytes, raw: bytes, remote: str,
                 tls_info: str, authorization: bool, ident: int) -> Answer:
    """Queue the messages of one request whose body decoded to ``doc`` (its bytes ``raw``
    when it is ``key``ed: the fingerprint), from the client at ``remote`` over ``tls_info``
    (``authorization``: it presented a token; ``ident`` names its agents' session): the
    route's answer once they are committed, or a :class:`Problem`.  Both doors call it:
    :func:`post_messages` and engine.http.fast."""
    store, ingest = app.store, app.ingest
    assert store is not None and ingest is not None  # idempotency_key() checked them
    http = app.config.http
    if not isinstance(doc, dict):
        raise _invalid("", f"The request must be a JSON object, not {_kind(doc)}")
    fingerprint = ""
    if key:
        fingerprint = hashlib.sha256(raw).hexdigest()
        stored = store.idempotent_answer(key)
        if stored is not None:
            return _replay(stored, fingerprint)
    if not doc.keys() <= _KNOWN:  # once per request: no set built when all are known
        raise _invalid(min(set(doc) - _KNOWN), "is not a member of a message request")
    sender = _string(doc, "from", required=True)
    assert sender is not None
    mail = _sender(sender, not sender.isascii(), False)  # its errors before the recipients'
    rcpts = _recipients(doc, http.max_recipients)
    if not who.trusted:
        # The SMTP side's open-relay rules, for a client outside every relay network.
        relay = RelayPolicy(accepted_domains(app.config), ())
        ip = ipaddress.ip_address(remote)
        for r in rcpts:
            if relay.check_rcpt(r.cmd.local, r.cmd.domain, ip, False) is not None:
                raise Problem(403, "Relay access denied",
                              f"{r.where}: {r.cmd.domain} is not an accepted domain, and "
                              f"{who.name!r} may not relay (http.tokens.NAME.trusted)",
                              extra={"field": r.where})
    rcpts, suppressed = _unsuppressed(app, rcpts)
    pressure = store.pressure()
    if pressure is not None:
        raise _backpressure(pressure)
    plan = _plan(doc, rcpts, http, app.config.hostname)
    arrival = Arrival(
        connector=http_connector(http), client_address=remote, helo="", esmtp=True,
        tls=bool(tls_info), tls_info=tls_info,
        auth_user=who.name if authorization else "",
        mail=mail, recipients=(), body=b"",
        protocol="HTTPS" if tls_info else "HTTP")
    chain = app.http_chain
    screen: Screen | None = None
    # Without [http] agents and [[dkim_sign]] the chain is empty: nothing to build per
    # request (the agents' view of the client parses its address).
    if chain is not None and _screening(chain):
        view = AgentSession(f"http-{ident:x}", http.connector, ipaddress.ip_address(remote),
                            esmtp=True, tls=bool(tls_info), tls_info=tls_info,
                            auth_user=who.name, may_relay=who.trusted, door="HTTP")
        if chain.screens(view, Effects()):
            screen = _screener(chain, view)
    if (len(plan.groups) >= THREAD_AT and plan.checked and not key
            and (chain is None or not chain.wants(Stage.DATA))):
        queued = await _pipelined(plan, ingest, arrival, http, sender, store, screen)
        ids = [p.ident for p in queued]
        return {"id": ids[0] if ids else None, "ids": ids, "recipients": len(rcpts),
                **suppressed}, None
    if len(plan.groups) >= THREAD_AT or screen is not None:
        # A thread: the agents' end of data waits for the loop, which must stay free.
        built = await asyncio.get_running_loop().run_in_executor(
            None, _build, plan, ingest, arrival, http, sender, None, screen)
    else:
        built = _build(plan, ingest, arrival, http, sender)
    ids = [p.ident for p in built.prepared]
    answer = {"id": ids[0] if ids else None, "ids": ids, "recipients": len(rcpts),
              **suppressed}
    idempotency = None
    if key:
        idempotency = Idempotency(
            key, orjson.dumps({"fingerprint": fingerprint, "answer": answer}),
            time.time() + http.idempotency_window)
    try:
        earlier = await store.inject([p.message for p in built.prepared], idempotency)
    except (BackPressure, QueueClosed) as exc:
        raise _backpressure(exc) from None
    if earlier is not None:
        return _replay(earlier, fingerprint)  # the same key raced in: nothing was stored
    ingest.committed(built.prepared)
    return answer, None

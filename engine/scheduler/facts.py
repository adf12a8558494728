"""The scheduler's tracking events: what its outcomes say, as records of the event hub.

The scheduler builds these only when a sink listens (``Events.on``) and hands them to
the hub only after the commit of the outcomes they describe has returned
(``engine.ops.events``): a :data:`Fact` waits with its batch until then, and is dropped
with it when that commit fails.  Field names are the contract documented in
``docs/tracking.md``.  This module decides nothing and does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from engine.client.api import LOCAL, Peer, RcptResult
from engine.message.dsn import Failure, reported
from engine.ops.events import Events, Kind, bare_message_id, iso_time
from engine.queue.api import Outcome
from engine.queue.records import Envelope, RcptState, id_text
from engine.routing.api import Route
from engine.scheduler.bounces import classify
from engine.scheduler.shaping import site_key

#: One event waiting for its commit: kind, queue id, Message-ID, fields.
Fact = tuple[Kind, bytes, str, dict[str, Any]]

_NOWHERE = Peer("")
# RFC 3463 §2: class.subject.detail, after the reply code ("550 5.1.1 No such user").
_ENHANCED = re.compile(r"\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced(reply: str) -> str:
    """The enhanced status code of a reply, "" when it has none."""
    match = _ENHANCED.match(reply)
    return match.group(1) if match else ""


def outcomes(env: Envelope, results: Sequence[RcptResult], recorded: Sequence[Outcome],
             route: Route | None, now: float) -> list[Fact]:
    """DELIVER, DEFER and FAIL for the recipients of ``results``, EXPIRE for the other
    recipients that ``recorded`` fails (expired in the queue)."""
    by_index = {r.index: r for r in results}
    mid = bare_message_id(env.message_id)
    qid = env.queue_id
    delay = round(now - env.arrival, 3)
    local = route is not None and route.protocol == "maildir"
    # with an egress source, its queue's name "source@site" (engine.scheduler.shaping)
    site = site_key(route.site, route.source) if route is not None else ""
    facts: list[Fact] = []
    for o in recorded:
        rcpt = env.recipients[o.recipient]
        result = by_index.get(o.recipient)
        if result is None:
            if o.state is RcptState.FAILED:
                facts.append((Kind.EXPIRE, qid, mid, {"recipient": rcpt.address,
                                                      "reply": rcpt.last_reply,
                                                      "category": "expired",
                                                      "delay": delay, "site": site,
                                                      "destination": rcpt.next_hop}))
            continue
        peer = result.peer or (LOCAL if local else _NOWHERE)
        fields: dict[str, Any] = {"recipient": rcpt.address, "host": peer.host,
                                  "address": peer.address, "reply": o.reply, "site": site,
                                  "destination": rcpt.next_hop}
        attempt = rcpt.attempts + (1 if o.attempted else 0)
        if o.state is RcptState.DELIVERED:
            fields.update(tls=peer.tls, tls_verified=peer.tls_verified, attempt=attempt,
                          delay=delay,
                          connector=route.connector if route is not None else "")
            facts.append((Kind.DELIVER, qid, mid, fields))
        elif o.state is RcptState.DEFERRED:
            fields.update(attempt=attempt, delay=delay, retry=iso_time(o.due),
                          category=classify(o.reply))
            facts.append((Kind.DEFER, qid, mid, fields))
        elif o.state is RcptState.FAILED:
            fields.update(enhanced=enhanced(o.reply), attempt=attempt, delay=delay,
                          category=classify(o.reply))
            facts.append((Kind.FAIL, qid, mid, fields))
    return facts


def deferred(env: Envelope, recorded: Sequence[Outcome], now: float,
             site: str = "") -> list[Fact]:
    """DEFER for recipients put off without a try (their ``site`` is down, a local error:
    no site)."""
    mid = bare_message_id(env.message_id)
    delay = round(now - env.arrival, 3)
    return [(Kind.DEFER, env.queue_id, mid, {
        "recipient": env.recipients[o.recipient].address, "host": "", "address": "",
        "reply": o.reply, "site": site, "destination": env.recipients[o.recipient].next_hop,
        "attempt": env.recipients[o.recipient].attempts, "delay": delay,
        "retry": iso_time(o.due), "category": classify(o.reply)}) for o in recorded]


def dsn(env: Envelope, failures: Sequence[Failure], dsn_id: bytes) -> list[Fact]:
    """DSN, one per action the report gives (it may report failures and delays at once),
    naming the recipients it reports on."""
    actions: dict[str, list[str]] = {}
    for failure in failures:
        if reported(env, failure):
            actions.setdefault(failure.action, []).append(
                env.recipients[failure.index].address)
    mid = bare_message_id(env.message_id)
    return [(Kind.DSN, env.queue_id, mid, {"dsn_id": id_text(dsn_id), "action": action,
                                           "recipients": rcpts})
            for action, rcpts in actions.items()]


def parked(kind: Kind, env: Envelope, destination: str, count: int, by: str) -> Fact:
    """SUSPEND or RESUME of ``count`` recipients of ``env`` for ``destination``, by the
    operator ``by`` (or the server: mail that came due for a suspended destination)."""
    return (kind, env.queue_id, bare_message_id(env.message_id),
            {"destination": destination, "recipients": count, "by": by})


def emit(events: Events, facts: Iterable[Fact]) -> None:
    for kind, qid, mid, fields in facts:
        events.emit(kind, qid, mid, **fields)


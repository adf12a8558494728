"""The queue viewer's views, once for every front door (``ferry queue`` on a stopped spool,
the control channel of a running server, an HTTP admin API): a message as JSON, the
message as it will be delivered (``export``), and the queues per next hop (``queues``,
Exchange's Get-Queue).

Typed on the ``QueueStore`` interface and the scheduler's snapshot; plain values out.
It must never change the queue or the scheduler, print, or block an event loop (the
control channel runs :func:`queue_rows` in a worker thread: it reads every queued record).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.ops.events import iso_time
from engine.ops.select import Filter, Selection, matches
from engine.protocol.wire import BARE_NORMALIZE, DataDecoder, dot_stuff
from engine.queue.api import QueueStore
from engine.queue.records import (
    FINAL_STATES,
    PARKED_STATES,
    Envelope,
    RcptState,
    Recipient,
    id_text,
)
from engine.scheduler.snapshot import SchedulerSnapshot

#: A message's state is its most telling recipient's (final ones only when all are).
_MESSAGE_STATES = ("poison", "held", "suspended", "deferred", "pending", "failed", "delivered")

#: A routing failure as the scheduler records it for the recipients it defers: RFC 3463
#: X.4.4 "unable to route" (no send connector matches, every one failed) and X.4.3
#: "directory server failure" (the DNS, a smarthost name that does not resolve).
_ROUTING_FAILURE = re.compile(r"4\d\d 4\.4\.[34] ")


def _when(epoch: float) -> str | None:
    return iso_time(epoch) if epoch else None


def message_state(env: Envelope) -> str:
    states = {r.state.value for r in env.recipients}
    for state in _MESSAGE_STATES:
        if state in states:
            return state
    return min(states) if states else "delivered"


def last_error(env: Envelope) -> str:
    """The last reply of the waiting recipient tried most recently (the one due last),
    "" when none has one."""
    tried = [r for r in env.recipients if r.last_reply and r.state not in FINAL_STATES]
    return max(tried, key=lambda r: r.due).last_reply if tried else ""


def recipient_view(r: Recipient) -> dict[str, Any]:
    waiting = r.state in (RcptState.PENDING, RcptState.DEFERRED)
    return {"address": r.address, "destination": r.next_hop, "state": r.state.value,
            "attempts": r.attempts, "last_reply": r.last_reply,
            "next_retry": _when(r.due) if waiting else None}


def message_view(env: Envelope) -> dict[str, Any]:
    """One message as ``ferry queue list --json`` prints it (one object per line)."""
    return {"id": id_text(env.queue_id), "sender": env.sender,
            "recipients": [recipient_view(r) for r in env.recipients],
            "state": message_state(env), "size": env.size, "arrived": iso_time(env.arrival),
            "expires": _when(env.expires), "message_id": env.message_id,
            "last_error": last_error(env), "client": env.client_address,
            "connector": env.receive_connector, "auth_user": env.auth_user}


def corrupt_view(queue_id: bytes, reason: str) -> dict[str, Any]:
    """A record that does not decode, as a listing shows it (never hidden)."""
    return {"id": id_text(queue_id), "state": "corrupt", "error": reason}


def listing(found: Selection) -> list[dict[str, Any]]:
    """What ``ferry queue list --json`` prints for a selection, one object per message:
    the messages oldest first, then the records that do not decode."""
    return ([message_view(env) for env in found.envelopes]
            + [corrupt_view(qid, reason) for qid, reason in found.corrupt])


def header_text(body: bytes) -> str:
    """The header section of a stored message, as text (``show``)."""
    return body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")


def message_detail(env: Envelope, body: bytes) -> dict[str, Any]:
    """One message as ``ferry queue show --json`` prints it: the listing's object (each
    recipient's state, attempts, last reply and next retry) and the header section."""
    return {**message_view(env), "headers": header_text(body)}


def as_delivered(body: bytes) -> bytes:
    """The message a next hop receives for the stored ``body``: what the SMTP client sends
    after the 354 (``dot_stuff``: canonical CRLF, a final CRLF, dots doubled), decoded
    as a receiver decodes it (RFC 5321 §4.5.2), here by Ferry's own DATA decoder.  The
    trace fields are in the stored body already (ingest prepends its Received field)."""
    decoder = DataDecoder(bare_eol=BARE_NORMALIZE)
    decoder.feed(dot_stuff(body))
    return decoder.body()


# --- queues (Get-Queue) --------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    """One destination's queued mail, as read from the queue."""

    messages: int = 0
    recipients: int = 0
    #: waiting recipients due now, and those deferred whose last reply is a routing failure
    due_now: int = 0
    deferred: int = 0
    unrouted: int = 0
    #: recipients held or poisoned (never due until released)
    parked: int = 0
    next_retry: float = 0.0
    #: the due time and last reply of the recipient tried last
    error_due: float = -1.0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One next hop's queue: what ``ferry queue queues`` prints per line."""

    destination: str
    state: str
    messages: int
    recipients: int
    #: the site (server set) it goes to now, "" when the server does not know (not routed
    #: lately, or no server runs)
    site: str = ""
    #: messages per minute entering and leaving the queue; None without a running server
    in_per_minute: float | None = None
    out_per_minute: float | None = None
    last_error: str = ""
    #: the earliest retry of a deferred recipient (epoch s), 0: none
    next_retry: float = 0.0
    #: the due time of the recipient ``last_error`` is from (the one tried last), 0: none;
    #: how a node's view picks the latest error of its workers (engine.cluster.fanout)
    error_due: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "state": self.state,
                "messages": self.messages, "recipients": self.recipients, "site": self.site,
                "in_per_minute": self.in_per_minute, "out_per_minute": self.out_per_minute,
                "last_error": self.last_error, "next_retry": _when(self.next_retry),
                "last_error_due": self.error_due or None}


@dataclass(slots=True)
class QueuesView:
    rows: list[QueueRow] = field(default_factory=list)
    #: whether the figures of a running server are in (rates, active, down)
    live: bool = False


def _tally(store: QueueStore, now: float) -> dict[str, _Tally]:
    tallies: dict[str, _Tally] = {}
    for env in matches(store, Filter(), now):
        if not isinstance(env, Envelope):
            continue  # a corrupt record: `ferry queue stats` lists those
        seen: set[str] = set()
        for r in env.recipients:
            if r.state in FINAL_STATES:
                continue
            t = tallies.get(r.next_hop)
            if t is None:
                t = tallies[r.next_hop] = _Tally()
            if r.next_hop not in seen:
                seen.add(r.next_hop)
                t.messages += 1
            t.recipients += 1
            if r.state in PARKED_STATES:
                t.parked += 1
            if r.state is RcptState.DEFERRED:
                t.deferred += 1
                if _ROUTING_FAILURE.match(r.last_reply):
                    t.unrouted += 1
            if r.state in (RcptState.PENDING, RcptState.DEFERRED):
                if r.due <= now:
                    t.due_now += 1
                elif not t.next_retry or r.due < t.next_retry:
                    t.next_retry = r.due
            if r.last_reply and r.due > t.error_due:
                t.error_due, t.last_error = r.due, r.last_reply
    return tallies


#: How a webhook's queue of events is named among the next hops.
WEBHOOK_PREFIX = "webhook:"


def webhook_row(name: str, pending: int, state: str = "ready", last_error: str = "",
                next_retry: float = 0.0) -> QueueRow:
    """A webhook's events as a queue (``engine.ops.webhooks``): ``messages`` counts the
    events waiting, ``recipients`` is 0 (they have none)."""
    return QueueRow(WEBHOOK_PREFIX + name, state, pending, 0, last_error=last_error,
                    next_retry=next_retry)


def queue_rows(store: QueueStore, snapshot: SchedulerSnapshot | None,
               suspended: Iterable[str] = (), now: float | None = None,
               hooks: Iterable[QueueRow] | None = None) -> QueuesView:
    """The queues per next hop: from the queue alone (``snapshot`` None: no server runs;
    ``suspended`` as saved with the queue), or with the running scheduler's figures;
    then a row per webhook, ``hooks`` from the running server, or (None) the events
    waiting in the queue database, state ``ready``.

    The state, first that applies: ``suspended`` (the operator holds it), ``held`` (every
    message waiting there is held or poisoned: nothing to deliver), ``unreachable``
    (the last routing failed: no send connector matches, or the DNS could not say; on a
    stopped spool, every deferred recipient's last reply is such a failure), ``down``
    (its site took no connection lately), ``active`` (deliveries in flight), ``retry``
    (nothing due before the next retry), else ``ready``."""
    now = time.time() if now is None else now
    tallies = _tally(store, now)
    held = set(snapshot.suspended if snapshot is not None else suspended)
    live = {} if snapshot is None else {d.name: d for d in snapshot.destinations}
    down = {} if snapshot is None else {d.name: d.until for d in snapshot.down}
    busy = {} if snapshot is None else {s.name: s.workers for s in snapshot.sites}
    rows = []
    for name in sorted(set(tallies) | set(live) | held):
        t = tallies.get(name) or _Tally()
        d = live.get(name)
        site = d.site if d is not None else ""
        if name in held:
            state = "suspended"
        elif t.recipients and t.parked == t.recipients:
            state = "held"
        elif (d.unreachable if d is not None and (d.unreachable or d.site)
              else t.deferred and t.unrouted == t.deferred and not t.due_now):
            state = "unreachable"
        elif site and any(down.get(s, 0.0) > now for s in site.split(" ")):
            state = "down"  # (with egress sources: one "source@site" each, by spaces)
        elif site and any(busy.get(s, 0) for s in site.split(" ")):
            state = "active"
        elif t.next_retry and not t.due_now:
            state = "retry"
        else:
            state = "ready"
        last = (d.unreachable if d is not None and d.unreachable else "") or t.last_error
        rates: tuple[float | None, float | None] = (None, None)
        if snapshot is not None:
            rates = (d.in_per_minute, d.out_per_minute) if d is not None else (0.0, 0.0)
        rows.append(QueueRow(name, state, t.messages, t.recipients, site, *rates, last,
                             t.next_retry, max(t.error_due, 0.0)))
    if hooks is None:
        hooks = [webhook_row(name, count) for name, count in sorted(store.hook_counts().items())]
    rows.extend(hooks)
    return QueuesView(rows, live=snapshot is not None)

"""Ingest: turn an accepted SMTP transaction into a durable queued message.

The session (or the injection API, engine.http.inject, for a message posted over HTTP)
describes what arrived and how in one frozen :class:`Arrival`.  Ingest checks
what needs the whole message (the hop count of RFC 5321 §6.3, text lines over 1,000
octets, §4.5.3.1.6), prepends the Received field (§4.4), builds the envelope record with
the DSN parameters (RFC 3461), rewrites a bare <Postmaster> to the configured postmaster
address (§4.5.1), and hands it to the queue; the reply is 250 only after the queue's
commit returned, 451 when the queue pushes back.  :meth:`Ingest.accept` is that whole
path for one message; the injection API runs its two halves itself, :meth:`Ingest.prepare`
for each message and :meth:`Ingest.committed` after the one commit that stores them all,
so both doors build the same records and report the same RECEIVE.  It must never block
the loop, touch sockets, or read the session: everything it knows of the arrival is in the
Arrival.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from engine.message.headers import scan_headers
from engine.message.lines import MAX_LINE, has_long_line, wrap_long_lines
from engine.message.trace import received_stamp, with_protocol
from engine.ops.events import Events, Kind, bare_message_id, iso_time
from engine.ops.maillog import clean
from engine.protocol.command import Command
from engine.queue.api import BackPressure, NewMessage, QueueStore
from engine.queue.records import Envelope, RcptState, Recipient, id_text, new_id

if TYPE_CHECKING:
    from engine.config import ReceiveConfig

Reply = tuple[int, str, str]

S554_HOPS = (554, "5.4.6", "Too many Received fields, probably a mail loop")
S451_STORAGE = (451, "4.3.1", "Insufficient system storage, try again later")
# RFC 5321 §4.5.3.1.6: a text line is at most 1,000 octets with its CRLF, so it could not
# be relayed as it is; RFC 3463 §3.7: X.6.0, a problem with the content (like bare CR/LF).
S554_LONG_LINE = (554, "5.6.0",
                  f"Message has a line longer than {MAX_LINE} octets (RFC 5321 4.5.3.1.6)")


class Arrival(NamedTuple):
    """One message as received: the connector, the client, the session's state, the
    transaction and the body (what the session knows, handed over as a value).  A named
    tuple: immutable, and the cheapest value to build once per message."""

    #: The receive connector it came through (its name and its per-message rules).
    connector: ReceiveConfig
    client_address: str
    #: The HELO/EHLO argument, "" if none; ``esmtp`` when it was EHLO.
    helo: str
    esmtp: bool
    tls: bool
    #: "version=... cipher=..." of the TLS session, "" without TLS.
    tls_info: str
    #: The authenticated user, "" when the client did not authenticate.
    auth_user: str
    #: The transaction: its MAIL command and the RCPT commands that got a 2xx.
    mail: Command
    recipients: tuple[Command, ...]
    #: Canonical CRLF text, not dot-stuffed.
    body: bytes
    #: The Received field's WITH keyword; "" = from ``esmtp``, ``tls`` and AUTH
    #: (:func:`with_protocol`).  The injection API says "HTTP" or "HTTPS".
    protocol: str = ""
    #: A policy agent's hold (quarantine): "agent: reason"; the message is stored with
    #: every recipient HELD (engine.agents.api.Action.HOLD).  "" = not held.
    held: str = ""


class Prepared(NamedTuple):
    """A message ready for the queue (:meth:`Ingest.prepare`): the envelope, the bytes to
    store (the Received field, then the body), and what RECEIVE needs after the commit."""

    arrival: Arrival
    envelope: Envelope
    #: The Received field; kept apart from ``body`` so that a bulk injection hands both
    #: to the queue as they are (engine.queue.api.NewMessage.head) and its writer joins
    #: them: one copy of each message fewer in the server.
    field: bytes
    #: The body as stored (long lines wrapped): ``arrival.body`` or its wrapped copy.
    body: bytes
    subject: tuple[int, int] | None
    #: The queue id as text (id_text), as the Received field and the answers name it.
    ident: str

    @property
    def data(self) -> bytes:
        """The bytes stored: the Received field and the body."""
        return self.field + self.body

    @property
    def message(self) -> NewMessage:
        """What the queue stores, the field and the body handed over apart (joined by
        the writer): a bulk injection's messages."""
        return NewMessage(self.envelope, self.body, self.field)


#: Envelope and Recipient built with positional arguments, once per message and per
#: recipient (a bulk injection's thousands): half the time of keywords.  Their fields
#: must stay in this order (checked when the module loads).
_ENVELOPE_ORDER: Final = ("sender", "recipients", "arrival", "size", "ret", "envid",
                          "smtputf8", "body_type", "receive_connector", "client_address",
                          "auth_user", "message_id", "expires", "queue_id")
_RECIPIENT_ORDER: Final = ("address", "next_hop", "state", "attempts", "due", "last_reply",
                           "notify", "orcpt")
assert tuple(f.name for f in fields(Envelope))[:len(_ENVELOPE_ORDER)] == _ENVELOPE_ORDER
assert tuple(f.name for f in fields(Recipient)) == _RECIPIENT_ORDER

#: A RECEIVE record's "event" (engine.ops.events.record).
_RECEIVE: Final = Kind.RECEIVE.value

#: A new recipient's state, looked up once (an enum member through its class is a tenth
#: of a microsecond, once per recipient of a bulk injection).
_PENDING: Final = RcptState.PENDING

#: A Prepared built with tuple.__new__ (no arity check): its fields in this order.
_new_tuple: Final = tuple.__new__
assert Prepared._fields == ("arrival", "envelope", "field", "body", "subject", "ident")

#: The next hop for a recipient domain (the router replaces the placeholder).
Route = Callable[[str], str]

log = logging.getLogger("ferry.server")


def _header_value(body: bytes, span: tuple[int, int] | None, limit: int = 998) -> str:
    if span is None:
        return ""
    raw = body[span[0] : span[1]][:limit].decode("ascii", "replace")
    if raw.isprintable():
        return raw.strip()
    # unfold and drop controls: the value ends up in records, logs and DSNs
    return "".join(c if c.isprintable() else " " for c in raw).strip()


def _recipient(cmd: Command, route: Route, now: float, postmaster: tuple[str, str]) -> Recipient:
    notify = cmd.params.get("NOTIFY")
    # RFC 5321 §4.5.1: only <Postmaster> has no domain, and it means this server's
    # postmaster; an unqualified address must never reach a next hop.
    address, domain = (cmd.mailbox, cmd.domain) if cmd.domain else postmaster
    # (address, next_hop, state, attempts, due, last_reply, notify, orcpt): due at
    # arrival, new mail sorts after what the active window has scanned
    return Recipient(address, route(domain), _PENDING, 0, now, "",
                     tuple(notify.split(",")) if notify else (), cmd.params.get("ORCPT") or "")


class Ingest:
    def __init__(self, store: QueueStore, hostname: str, route: Route, *,
                 lifetime: float = 5 * 86400.0,
                 queued: Callable[[], None] | None = None, postmaster: str = "",
                 events: Events | None = None, subject: bool = False) -> None:
        self.store = store
        #: RECEIVE goes here after the commit (engine.ops.events)
        self.events = events or Events()
        #: [tracking] subject: RECEIVE names the message's Subject: too
        self.subject = subject
        self.hostname = hostname
        self.route = route
        #: Where a bare <Postmaster> goes (address, domain): ``postmaster``, by default
        #: postmaster@hostname.
        self._postmaster = self._postmaster_of(postmaster)
        #: the maximum queue lifetime: a message expires this long after arrival
        self.lifetime = lifetime
        #: told after each commit (the scheduler looks at the due index at once)
        self.queued = queued

    def _postmaster_of(self, postmaster: str) -> tuple[str, str]:
        postmaster = postmaster or f"postmaster@{self.hostname}"
        return postmaster, postmaster.rpartition("@")[2]

    def reconfigure(self, route: Route, *, lifetime: float, postmaster: str,
                    subject: bool) -> None:
        """A reload (engine.ops.reload): messages accepted from now on are routed by
        ``route`` and take the new lifetime, postmaster and [tracking] subject."""
        self.route = route
        self.lifetime = lifetime
        self._postmaster = self._postmaster_of(postmaster)
        self.subject = subject

    def prepare(self, arrival: Arrival) -> Prepared | Reply:
        """Check what needs the whole message and build its envelope and stored bytes:
        a :class:`Prepared`, or the reply that refuses it.  Nothing is stored yet."""
        body = arrival.body
        connector = arrival.connector
        scan = scan_headers(body)
        if scan.received >= connector.max_received_headers:
            return S554_HOPS
        if has_long_line(body):
            # Never relay a line the next hop may refuse or cut (§4.5.3.1.6): fold it
            # once here, so the stored body is always sendable, or refuse the message.
            if connector.long_lines == "reject":
                return S554_LONG_LINE
            body = wrap_long_lines(body)
        mail = arrival.mail
        now = time.time()
        qid = new_id(now)
        utf8 = "SMTPUTF8" in mail.params
        auth_user = arrival.auth_user
        recipients = arrival.recipients
        ident = id_text(qid)
        # The session's (or request's) part of the field is cached (engine.message.trace).
        field = received_stamp(
            arrival.helo or "unknown", arrival.client_address, None, self.hostname,
            arrival.protocol or with_protocol(arrival.esmtp, arrival.tls, bool(auth_user), utf8),
            arrival.tls_info, auth_user,
        ).field(ident, recipients[0].mailbox if len(recipients) == 1 else None, now)
        params = mail.params
        envelope = Envelope(  # the fields in _ENVELOPE_ORDER's order
            mail.mailbox,
            [_recipient(r, self.route, now, self._postmaster) for r in recipients],
            now,
            len(field) + len(body),
            params.get("RET") or "",
            params.get("ENVID") or "",
            utf8,
            params.get("BODY") or "",
            connector.name,
            arrival.client_address,
            auth_user,
            _header_value(arrival.body, scan.message_id),  # scanned before any wrap
            now + self.lifetime if self.lifetime else 0.0,
            qid,
        )
        if arrival.held:
            # Parked from the start: never tried, never expired until released.
            for r in envelope.recipients:
                r.state = RcptState.HELD
            envelope.parked_since = now
        # (tuple.__new__: the named tuple's own __new__ is a Python function, a third of
        # a microsecond of a bulk injection's every message)
        return _new_tuple(Prepared, (arrival, envelope, field, body, scan.subject, ident))

    async def accept(self, arrival: Arrival) -> Reply:
        prepared = self.prepare(arrival)
        if not isinstance(prepared, Prepared):
            return prepared
        envelope = prepared.envelope
        try:
            await self.store.enqueue(envelope, prepared.data)
        except BackPressure as exc:
            # The body came and could not be stored (the disk or the map filled since
            # MAIL was admitted): the client retries, the operator must know why.
            log.error("message from <%s> [%s] not stored, answered 451 %s: %s",
                      clean(envelope.sender), arrival.client_address, S451_STORAGE[1],
                      exc.describe())
            return S451_STORAGE
        self.committed((prepared,))
        return (250, "2.0.0", f"Ok: queued as {id_text(envelope.queue_id)}")

    def committed(self, messages: Sequence[Prepared]) -> None:
        """After the commit that holds ``messages``: wake the scheduler once, and report
        RECEIVE for each (engine.ops.events), all at the commit's time."""
        if self.queued is not None:
            self.queued()
        events = self.events
        if not events.on:
            return
        when = iso_time(time.time())
        records: list[dict[str, Any]] = []
        # The fields a request's (or a session's) messages share, worked out once for a
        # run of messages from one client and sender: a bulk injection's thousands.
        shared: tuple[Any, ...] = ()
        connector = client = helo = tls = auth = ""
        for prepared in messages:
            arrival, envelope = prepared.arrival, prepared.envelope
            key = (envelope.receive_connector, arrival.client_address, arrival.helo,
                   arrival.tls_info, arrival.auth_user)
            if key != shared:
                shared = key
                connector, client, helo, tls, auth = (key[0], key[1], key[2],
                                                      tls_text(key[3]), key[4])
            # record()'s four fields, then RECEIVE's in emit's order, as one dict display
            # (not record() and an update with keywords: a bulk injection's thousands).
            received = {"time": when, "event": _RECEIVE, "id": prepared.ident,
                        "message_id": bare_message_id(envelope.message_id),
                        "connector": connector, "client": client, "helo": helo, "tls": tls,
                        "auth": auth, "size": envelope.size, "sender": envelope.sender,
                        "recipients": [r.address for r in envelope.recipients]}
            if self.subject:
                received["subject"] = _header_value(arrival.body, prepared.subject)
            records.append(received)
            if arrival.held:
                events.extend(records)  # RECEIVE before its HOLD
                records = []
                agent, _, why = arrival.held.partition(": ")
                events.emit(Kind.HOLD, envelope.queue_id,
                            bare_message_id(envelope.message_id), by=f"agent {agent}",
                            reason=why or agent)
        events.extend(records)


def tls_text(tls_info: str) -> str:
    """ "TLSv1.3 TLS_AES_256_GCM_SHA384" from the session's "version=... cipher=..."."""
    if not tls_info:
        return ""
    return " ".join(part.partition("=")[2] for part in tls_info.split())

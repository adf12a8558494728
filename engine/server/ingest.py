"""Ingest: turn an accepted SMTP transaction into a durable queued message.

Checks what needs the whole message (the hop count of RFC 5321 §6.3), prepends the
Received field (§4.4), builds the envelope record with the DSN parameters (RFC 3461),
and hands it to the queue; the reply is 250 only after the queue's commit returned, 451
when the queue pushes back.  It must never block the loop or touch sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.message.headers import scan_headers
from engine.message.trace import received_field, with_protocol
from engine.protocol.command import Command
from engine.protocol.server import MessageReceived
from engine.queue.api import BackPressure, QueueStore
from engine.queue.records import Envelope, Recipient, id_text, new_id

if TYPE_CHECKING:
    from engine.server.session import SmtpSession

Reply = tuple[int, str, str]

S554_HOPS = (554, "5.4.6", "Too many Received fields, probably a mail loop")
S451_STORAGE = (451, "4.3.1", "Insufficient system storage, try again later")

#: The next hop for a recipient domain (the router replaces the placeholder).
Route = Callable[[str], str]


def _header_value(body: bytes, span: tuple[int, int] | None, limit: int = 998) -> str:
    if span is None:
        return ""
    raw = body[span[0] : span[1]][:limit].decode("ascii", "replace")
    # unfold and drop controls: the value ends up in records, logs and DSNs
    return "".join(c if c.isprintable() else " " for c in raw).strip()


def _recipient(cmd: Command, route: Route, now: float) -> Recipient:
    notify = cmd.params.get("NOTIFY")
    return Recipient(
        address=cmd.mailbox,
        next_hop=route(cmd.domain),
        # due at arrival: new mail sorts after what the active window has scanned
        due=now,
        notify=tuple(notify.split(",")) if notify else (),
        orcpt=cmd.params.get("ORCPT") or "",
    )


class Ingest:
    def __init__(self, store: QueueStore, hostname: str, route: Route, *,
                 lifetime: float = 5 * 86400.0,
                 queued: Callable[[], None] | None = None) -> None:
        self.store = store
        self.hostname = hostname
        self.route = route
        #: the maximum queue lifetime: a message expires this long after arrival
        self.lifetime = lifetime
        #: told after each commit (the scheduler looks at the due index at once)
        self.queued = queued

    async def accept(self, session: SmtpSession, event: MessageReceived) -> Reply:
        body = event.body
        scan = scan_headers(body)
        if scan.received >= session.config.max_received_headers:
            return S554_HOPS
        mail = event.mail
        now = time.time()
        qid = new_id(now)
        utf8 = "SMTPUTF8" in mail.params
        conn = session.conn
        field = received_field(
            helo=conn.helo or "unknown",
            client_ip=session.client,
            client_name=None,
            hostname=self.hostname,
            protocol=with_protocol(conn.esmtp, conn.tls, bool(session.auth_user), utf8),
            queue_id=id_text(qid),
            tls=session.tls_info or None,
            auth_user=session.auth_user or None,
            recipient=event.recipients[0].mailbox if len(event.recipients) == 1 else None,
            when=now,
        )
        envelope = Envelope(
            sender=mail.mailbox,
            recipients=[_recipient(r, self.route, now) for r in event.recipients],
            arrival=now,
            size=len(field) + len(body),
            ret=mail.params.get("RET") or "",
            envid=mail.params.get("ENVID") or "",
            smtputf8=utf8,
            body_type=mail.params.get("BODY") or "",
            receive_connector=session.connector.name,
            client_address=session.client,
            auth_user=session.auth_user,
            message_id=_header_value(body, scan.message_id),
            expires=now + self.lifetime if self.lifetime else 0.0,
            queue_id=qid,
        )
        try:
            await self.store.enqueue(envelope, field + body)
        except BackPressure:
            return S451_STORAGE
        if self.queued is not None:
            self.queued()
        return (250, "2.0.0", f"Ok: queued as {id_text(qid)}")

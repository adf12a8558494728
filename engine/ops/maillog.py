"""The mail log: one INFO line per message event on the ``ferry.mail`` logger.

A sink of the event hub (``engine.ops.events``): every record of a batch becomes one line
in the style of Postfix's maillog, so an operator reads what happened to a message in the
process log without the tracking log::

    4TQ2K9M1XJ3C0: from=<app@example.com>, size=1234, nrcpt=1, client=[192.0.2.7],
        helo=<app.example.com>, auth=app, connector=default, message-id=<x@example.com>
    4TQ2K9M1XJ3C0: to=<bob@example.org>, relay=mx.example.org[198.51.100.2:25],
        delay=0.41, attempt=1, status=sent (250 2.0.0 Ok)

(one line each in the log).  The reply of the other side, when there is one, is the last
field, in parentheses, as Postfix writes it.  Each log record also carries the event
record itself as its ``fields`` attribute, so the JSON format (``engine.ops.logfmt``)
writes the fields as keys and a log shipper needs no pattern to read them.

Cost: nothing is formatted unless ``ferry.mail`` is enabled for INFO, asked once per
batch.  When the lines go only to the server's own text log (``engine.ops.logfmt``'s
installed handlers, no filter on the way: :func:`engine.ops.logfmt.text_handlers`), the
batch is one log record whose formatted time, level and logger prefix every line of the
batch shares, written in one write; otherwise (the JSON format, which carries each
record's fields, or other handlers) the records are made with ``Logger.makeRecord`` and
``Logger.handle`` (no caller lookup, no per-line level test).  This module must never
block the loop beyond handing lines to the logging handlers, never change a record (the
hub's other sinks share them), and never decide anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from engine.ops.events import Event
from engine.ops.logfmt import batched, text_handlers

log = logging.getLogger("ferry.mail")


def clean(value: object) -> str:
    """``value`` as text with no control character: a reply, a HELO or an address came from
    the wire, and nothing from the wire reaches a log line with a raw CR, LF or NUL."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _relay(r: Event) -> str:
    host, address = r.get("host") or "", r.get("address") or ""
    if address:
        return f"{host}[{address}]" if host else f"[{address}]"
    return host if host else "none"


def _seconds(value: Any) -> str:
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return str(value)


def _addresses(values: Any) -> str:
    if isinstance(values, str):
        return f"<{values}>"
    if isinstance(values, Iterable):
        return ",".join(f"<{v}>" for v in values)
    return str(values)


def _optional(r: Event, *keys: str) -> str:
    """``, key=value`` for each of ``keys`` that has a non-empty value."""
    # A loop, not a generator joined: once or twice per message event.
    text = ""
    for key in keys:
        value = r.get(key)
        if value:
            text += f", {key}={value}"
    return text


def _received(r: Event) -> str:
    # Once per message received (a bulk injection's thousands in one batch): each field
    # looked up once, the line one f-string (not a string grown by each optional field).
    get = r.get
    helo, tls, auth = get("helo"), get("tls"), get("auth")
    connector, message_id = get("connector"), get("message_id")
    return (f"from=<{get('sender', '')}>, size={get('size', 0)}, "
            f"nrcpt={len(get('recipients') or ())}, client=[{get('client', '')}]"
            f"{f', helo=<{helo}>' if helo else ''}{f', tls={tls}' if tls else ''}"
            f"{f', auth={auth}' if auth else ''}"
            f"{f', connector={connector}' if connector else ''}"
            f"{f', message-id=<{message_id}>' if message_id else ''}")


def _attempt(r: Event, status: str, *extra: str) -> str:
    """A delivery attempt to one recipient: where, how long, which try, the outcome."""
    line = (f"to=<{r.get('recipient', '')}>, relay={_relay(r)}, "
            f"delay={_seconds(r.get('delay', 0))}, attempt={r.get('attempt', 0)}")
    line += _optional(r, *extra)
    return f"{line}, status={status} ({r.get('reply', '')})"


def _delivered(r: Event) -> str:
    return _attempt(r, "sent", "tls", "connector")


def _deferred(r: Event) -> str:
    return _attempt(r, "deferred", "retry")


def _failed(r: Event) -> str:
    return _attempt(r, "bounced", "enhanced")


def _expired(r: Event) -> str:
    return (f"to=<{r.get('recipient', '')}>, delay={_seconds(r.get('delay', 0))}, "
            f"status=expired ({r.get('reply', '')})")


#: RFC 3464 §2.3.3 action → the words of Postfix's line ("sender non-delivery
#: notification: ID").
_DSN_WORDS = {"failed": "non-delivery", "delayed": "delay", "delivered": "delivery",
              "relayed": "relay", "expanded": "expansion"}


def _dsn(r: Event) -> str:
    action = str(r.get("action", ""))
    words = _DSN_WORDS.get(action, action)
    return (f"sender {words} notification: {r.get('dsn_id', '')}, "
            f"recipients={_addresses(r.get('recipients', ()))}")


def _destination(verb: str) -> Callable[[Event], str]:
    def line(r: Event) -> str:
        return (f"destination={r.get('destination', '')}, {verb}, "
                f"recipients={r.get('recipients', 0)}")
    return line


def _by(verb: str, *extra: str) -> Callable[[Event], str]:
    def line(r: Event) -> str:
        text = f"{verb}, by={r.get('by', '')}" + _optional(r, *extra)
        if r.get("reason"):
            text += f" ({r['reason']})"
        return text
    return line


def _removed(r: Event) -> str:
    return (f"removed, by={r.get('by', '')}, "
            f"report={'yes' if r.get('report') else 'no'}")


def _poison(r: Event) -> str:
    return f"poison ({r.get('reason', '')})"


#: The line of each kind of event (engine.ops.events.Kind), after "<queue id>: ".
LINES: dict[str, Callable[[Event], str]] = {
    "RECEIVE": _received,
    "DELIVER": _delivered,
    "DEFER": _deferred,
    "FAIL": _failed,
    "EXPIRE": _expired,
    "DSN": _dsn,
    "SUSPEND": _destination("suspended"),
    "RESUME": _destination("resumed"),
    "HOLD": _by("held"),
    "RELEASE": _by("released"),
    "RETRY": _by("retry", "destination"),
    "REMOVE": _removed,
    "POISON": _poison,
}

#: Fields every record has; a kind this module does not know lists the others.
_COMMON = frozenset({"time", "event", "id", "message_id"})


def _other(r: Event) -> str:
    return str(r.get("event", "?")).lower() + "".join(
        f", {k}={v}" for k, v in r.items() if k not in _COMMON)


def _line(record: Event) -> str:
    """:func:`line`, or a line saying the record could not be read: a malformed record
    must not hide the others of its batch."""
    try:
        return line(record)
    except Exception:
        return f"{record.get('id', '')}: unreadable event record {record!r:.200}"


def line(record: Event) -> str:
    """The mail log line of one event record (without time, level and logger)."""
    text = LINES.get(record.get("event", ""), _other)(record)
    queue_id = record.get("id")
    if queue_id:
        text = f"{queue_id}: {text}"
    # Replies, HELO names and addresses came from the wire: escaped once, for the line.
    return text if text.isprintable() else clean(text)


class MailLog:
    """The sink: ``Events.add(MailLog())``."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger

    def write(self, batch: list[Event]) -> None:
        logger = self.logger
        # Once per batch: with the mail log off, a batch costs one test.
        if not logger.isEnabledFor(logging.INFO):
            return
        name, make, handle = logger.name, logger.makeRecord, logger.handle
        direct = text_handlers(logger)
        if direct is not None:
            # The server's own text log: the lines of the batch share one log record's
            # time and prefix (one turn of the event loop), formatted once.
            texts = [_line(record) for record in batch]
            entry = make(name, logging.INFO, "", 0, "", (), None)
            for handler in direct:
                handler.write_texts(entry, texts)
            return
        with batched():  # one write for the batch's lines, not one (and a flush) each
            for record in batch:
                # No path: LogRecord would split one for every line.
                entry = make(name, logging.INFO, "", 0, _line(record), (), None)
                entry.fields = record
                handle(entry)

    def close(self) -> None:
        """Nothing buffered here: the logging handlers write each line."""


# --- refusals: no queue id yet, so no hub event; the receive session calls these ----------

Reply = tuple[int, str, str]


def _answer(reply: Reply) -> str:
    return " ".join(str(part) for part in reply if part)


def refused(command: str, reply: Reply, *, client: str, helo: str, sender: str,
            recipient: str = "", connector: str = "", by: str = "") -> None:
    """One INFO line for a MAIL or RCPT refused with ``reply`` (Postfix's ``NOQUEUE:
    reject:``): who, what they asked for, and the answer they got."""
    if not log.isEnabledFor(logging.INFO):
        return
    answer = _answer(reply)
    text = (f"NOQUEUE: reject: {command} from [{clean(client)}]: {clean(answer)}; "
            f"from=<{clean(sender)}>")
    if recipient:
        text += f" to=<{clean(recipient)}>"
    text += f" helo=<{clean(helo)}> connector={clean(connector)}"
    fields = {"event": "REJECT", "command": command, "client": client, "helo": helo,
              "sender": sender, "recipient": recipient, "reply": answer,
              "connector": connector}
    if by:
        # The policy agent that refused, and why (engine.agents.chain).
        text += f" by=<{clean(by)}>"
        fields["by"] = by
    log.info("%s", text, extra={"fields": fields})


def discarded(reason: str, *, client: str, sender: str, recipients: list[str],
              connector: str = "") -> None:
    """One INFO line for a message a policy agent discarded (answered 250, never stored:
    this line is all that is left of it)."""
    text = (f"NOQUEUE: discard: from [{clean(client)}]: from=<{clean(sender)}> "
            f"to=<{clean(','.join(recipients))}> connector={clean(connector)} "
            f"by=<{clean(reason)}>")
    log.info("%s", text, extra={"fields": {
        "event": "DISCARD", "client": client, "sender": sender, "recipients": recipients,
        "connector": connector, "by": reason}})


def auth_failed(mechanism: str, user: str, reply: Reply, *, client: str, helo: str,
                connector: str = "") -> None:
    """One INFO line for a failed AUTH: the mechanism, the user name if the client gave
    one, and the reply; the password is never handed here."""
    if not log.isEnabledFor(logging.INFO):
        return
    answer = _answer(reply)
    text = (f"AUTH failed from [{clean(client)}]: mechanism={clean(mechanism)}, "
            f"user={clean(user) if user else '(none)'}, helo=<{clean(helo)}>, "
            f"connector={clean(connector)} ({clean(answer)})")
    log.info("%s", text, extra={"fields": {
        "event": "AUTHFAIL", "mechanism": mechanism, "user": user, "client": client,
        "helo": helo, "reply": answer, "connector": connector}})

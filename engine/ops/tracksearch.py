"""Tracking search: which records of the message tracking log match an operator's filters
(Exchange's Get-MessageTrackingLog), for every front door: ``ferry track``
(``engine.cli.track``) and the admin API's ``GET /api/v1/tracking`` (``engine.http.admin``,
through ``engine.ops.operations``).

Fast on large logs: each filter that can be is turned into bytes the raw line must
contain (the Message-ID or queue id as JSON text, an address as a case-insensitive
pattern), searched in the mapped file (``engine.ops.tracking.read_records``) before any
line is parsed; only the lines that contain it are decoded and checked field by field.

It only reads files: it must never write, print, or run on an event loop (a search of a
large log takes seconds; the admin API runs it in a thread).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from engine.ops.events import Event, Kind, bare_message_id, iso_time
from engine.ops.tracking import Needle, read_records

#: The event names a search can ask for (``--event``, ``event=``).
EVENTS: tuple[str, ...] = tuple(k.value for k in Kind)


def unknown_events(events: Iterable[str]) -> list[str]:
    """The names in ``events`` that are no event kind, sorted."""
    return sorted(set(events) - set(EVENTS))


class Query:
    """The filters of one search, checked on decoded records."""

    def __init__(self, *, message_id: str | None = None, queue_id: str | None = None,
                 sender: str | None = None, recipient: str | None = None,
                 events: list[str] | None = None, start: float | None = None,
                 end: float | None = None) -> None:
        self.message_id = bare_message_id(message_id) if message_id is not None else None
        self.queue_id = queue_id.strip().upper() if queue_id is not None else None
        self.sender = sender.lower() if sender is not None else None
        self.recipient = recipient.lower() if recipient is not None else None
        self.events = frozenset(events or ())
        # The records' times are ISO text of one width: compared as text (the microsecond
        # keeps a time given to the millisecond from being cut to the one before).
        self.since = start
        self.start = iso_time(start + 1e-6) if start is not None else None
        self.end = iso_time(end + 1e-6) if end is not None else None
        #: Queue ids of the messages from ``sender`` (found by a first pass).
        self.ids: frozenset[str] | None = None

    def needles(self) -> tuple[Needle, ...]:
        """What a matching raw line must contain, rarest first."""
        out: list[Needle] = []
        if self.message_id is not None:
            out.append(b'"message_id":' + orjson.dumps(self.message_id))
        if self.queue_id is not None:
            out.append(orjson.dumps(self.queue_id))
        if self.ids is not None:
            out.append(_any_of(orjson.dumps(i) for i in sorted(self.ids)))
        if self.recipient is not None:
            out.append(_any_of([orjson.dumps(self.recipient)]))
        return tuple(out)

    def matches(self, r: Event) -> bool:
        if self.events and r.get("event") not in self.events:
            return False
        when = r.get("time", "")
        if (self.start is not None and when < self.start) or (
                self.end is not None and when >= self.end):
            return False
        if self.message_id is not None and r.get("message_id") != self.message_id:
            return False
        if self.queue_id is not None and self.queue_id not in (r.get("id"), r.get("dsn_id")):
            return False
        if self.ids is not None and r.get("id") not in self.ids:
            return False
        if self.recipient is not None:
            one = r.get("recipient")
            many = r.get("recipients")
            if not (isinstance(one, str) and one.lower() == self.recipient) and not (
                    isinstance(many, list)
                    and any(isinstance(a, str) and a.lower() == self.recipient
                            for a in many)):
                return False
        return True


def _any_of(texts: Any) -> re.Pattern[bytes]:
    return re.compile(b"|".join(re.escape(t) for t in texts), re.IGNORECASE)


def search(directory: Path, query: Query) -> Iterator[Event]:
    """The records of ``directory``'s tracking files that match ``query``, in order."""
    if query.sender is not None:
        # Only RECEIVE names the sender: first the ids of its messages, then their events.
        sender = query.sender
        needle = _any_of([b'"sender":' + orjson.dumps(sender)])
        query.ids = frozenset(
            str(r.get("id")) for r in read_records(directory, (needle,))
            if r.get("event") == Kind.RECEIVE and str(r.get("sender", "")).lower() == sender)
        if not query.ids:
            return
    for record in read_records(directory, query.needles(), query.since):
        if query.matches(record):
            yield record

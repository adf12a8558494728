"""The event stream of a message's life: one record per fact, handed to every sink.

Producers (the receive side, the scheduler, the operator's verbs) call
:meth:`Events.emit` once the commit that made the event true has returned, never
before: an event in a sink is a promise that the queue database says the same thing.
The hub gathers the records of one turn of the event loop and hands them to each sink
as one batch after that turn, so a producer pays for a dict and a list append, and a
hub with no sink costs a producer one attribute test (:attr:`Events.on`).

A record is a plain dict, the shape every sink writes or reads::

    {"time": "2026-12-06T10:02:03.412Z", "event": "DELIVER", "id": "<queue id>",
     "message_id": "<Message-ID header without angle brackets, or ''>", ...fields}

Per-recipient events carry ``recipient``; the other fields are each kind's own and are
documented in ``docs/tracking.md``.  Sinks: the message tracking log
(``engine.ops.tracking``), the log lines for operators, and later metrics and webhooks.

This module must never block the event loop or do I/O itself, and a sink's failure must
never reach a producer: it is logged and the other sinks go on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from engine.ops.protolog import format_timestamp
from engine.queue.records import id_text

log = logging.getLogger("ferry.events")

Event = dict[str, Any]


class Kind(enum.StrEnum):
    """What happened.  Later capabilities add kinds here, never elsewhere."""

    RECEIVE = "RECEIVE"
    DEFER = "DEFER"
    DELIVER = "DELIVER"
    FAIL = "FAIL"
    EXPIRE = "EXPIRE"
    DSN = "DSN"
    SUSPEND = "SUSPEND"
    RESUME = "RESUME"
    HOLD = "HOLD"
    RELEASE = "RELEASE"
    RETRY = "RETRY"
    REMOVE = "REMOVE"
    POISON = "POISON"
    #: A connection did not get the TLS its route asks for (no queue change: told when it
    #: happens, with empty ``id`` and ``message_id``); engine.client.smtp.
    TLS_FAIL = "TLS_FAIL"
    #: An alert rule fired or cleared (``state``); engine.ops.alerts.
    ALERT = "ALERT"
    #: A shaping automation rule began or ended (``state`` "on"/"off") suspending or
    #: throttling a (source, site); engine.scheduler.scheduler, docs/shaping.md.
    THROTTLE = "THROTTLE"


class Sink(Protocol):
    def write(self, batch: list[Event]) -> None:
        """Take one batch, on the event loop: hand it off (a thread, a buffer), never
        wait for I/O here.  The list is the sink's to keep."""
        ...

    def close(self) -> None:
        """Write what is buffered and release the files; called once, at shutdown."""
        ...


#: UTC, ISO 8601 with milliseconds and ``Z``: sortable as text, one zone everywhere; the
#: protocol logs' formatter, so every log of Ferry writes time the same way.
iso_time = format_timestamp


def bare_message_id(header: str) -> str:
    """The Message-ID as records carry it: the header's value without its angle brackets
    (``ferry track --message-id`` takes it with or without them)."""
    return header.strip().removeprefix("<").removesuffix(">")


def record(kind: Kind, queue_id: bytes, message_id: str, time_text: str) -> Event:
    """A record's first four fields, in the order every record has them ("time" as
    :data:`iso_time` writes it): its kind's fields follow."""
    return {"time": time_text, "event": kind.value, "id": id_text(queue_id),
            "message_id": message_id}


class Events:
    """The hub.  ``emit`` may be called from coroutines and callbacks on the loop."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self._sinks: list[Sink] = list(sinks)
        self._pending: list[Event] = []
        #: True when some sink listens; producers test it before building costly fields.
        self.on = bool(self._sinks)

    def add(self, sink: Sink) -> None:
        self._sinks.append(sink)
        self.on = True

    def emit(self, kind: Kind, queue_id: bytes, message_id: str, when: float | None = None,
             **fields: Any) -> None:
        if not self.on:
            return
        event = record(kind, queue_id, message_id,
                       iso_time(time.time() if when is None else when))
        event.update(fields)
        self.extend((event,))

    def extend(self, records: Iterable[Event]) -> None:
        """Records a producer built itself, each a :func:`record` and then its kind's
        fields (:meth:`emit`'s shape): a batch of one kind costs one call
        (engine.server.ingest: the RECEIVEs of one commit)."""
        if not self.on:
            return
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a CLI verb on a stopped spool): write now
                self._pending.extend(records)
                self.flush()
                return
        self._pending.extend(records)

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        for sink in self._sinks:
            try:
                sink.write(batch if len(self._sinks) == 1 else list(batch))
            except Exception:
                log.exception("event sink %r failed; its events of this batch are lost",
                              sink)

    def close(self) -> None:
        self.flush()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing event sink %r failed", sink)

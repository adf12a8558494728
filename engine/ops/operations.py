"""The operator's views and verbs on a running server, once for every front door: the
control channel (``engine.ops.control``, which ``ferry queue`` talks to) and the HTTP
admin API (``engine.http.admin``).  Each front door parses its own transport (a JSON line,
an HTTP request) into the values these take, and turns what they return (plain values
and dicts, the documents both send) into its own answer; so a filter, a state, a verb's
``changed`` / ``unchanged`` / ``missing`` answer and the events it emits (``by`` = who
asked: the peer's user name on the control socket, the token's name or "loopback" over
HTTP) are the same whichever door the operator used.

- Views: the queues per next hop (Get-Queue), the list of messages with ``ferry queue
  list``'s filters and "N of M", one message (show), the message as it will be delivered
  (export), the scheduler's figures, tracking search (``ferry track``'s filters).  They
  read through the ``QueueStore`` interface and the tracking files; every read of many
  records runs in a worker thread (``run_in_executor``), never on the event loop.
- Verbs: suspend, resume, retry a destination; hold, release, remove, retry messages
  (named by id or by a filter).  The scheduler does the work and emits the events after
  its commits; this module decides nothing about delivery.

Bad input raises :class:`OperationError` (its text is the answer: an error reply on the
control channel, a 400 problem document over HTTP); :class:`NotFound` for a message that
is not queued or a log that is not there (404 over HTTP), :class:`CorruptRecord` for a
message whose record does not decode (409).  It must never know a
transport: no sockets, no HTTP, no printing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

from engine.cluster.suspensions import SuspensionSync
from engine.ops.select import STATES, Filter, select, select_ids
from engine.ops.tracksearch import EVENTS, Query, search, unknown_events
from engine.ops.views import (
    QueueRow,
    as_delivered,
    corrupt_view,
    listing,
    message_detail,
    queue_rows,
)
from engine.queue.api import QueueStore
from engine.queue.records import RecordError, id_bytes, id_text
from engine.queue.suppression import SuppressionList
from engine.scheduler.scheduler import Scheduler, VerbResult
from engine.scheduler.snapshot import SchedulerSnapshot

log = logging.getLogger("ferry.control")

#: Most queue ids in one request (a bulk tool sends several); a verb on a filter's
#: matches hands them to the scheduler in pieces this size.
MAX_IDS: Final = 5000
#: A destination is a domain (at most 255 octets, RFC 5321 §4.5.3.1.2) with a prefix.
MAX_DESTINATION: Final = 300
#: The messages a listing shows when the request does not say (``ferry queue list``'s).
DEFAULT_LIMIT: Final = 100
#: The filters of a listing and of the verbs on many messages (``ferry queue list``'s).
FILTERS: Final = ("sender", "recipient", "destination", "state", "older_than",
                  "larger_than", "error")
#: The verbs on messages, and what each does.
MESSAGE_VERBS: Final = ("hold", "release", "remove", "retry")

_T = TypeVar("_T")


class OperationError(ValueError):
    """A request that cannot be served as asked; ``str()`` says why, for the operator."""


class NotFound(OperationError):
    """What the request names is not there: a message not queued, no tracking log."""


class CorruptRecord(OperationError):
    """The message's record does not decode (it is listed in the corrupt state)."""


# --- the values a request names ------------------------------------------------------------


def quote(value: str) -> str:
    """A value from a request, safe to echo: JSON-quoted (no control characters) and cut
    short."""
    text = orjson.dumps(value[:60]).decode()
    return text if len(value) <= 60 else text[:-1] + '..."'


def parse_destination(value: object) -> str:
    """A destination as the operator typed it (checked, not yet normalised)."""
    if not isinstance(value, str):
        raise OperationError('"destination" must be a string')
    text = value.strip()
    if not text:
        raise OperationError('"destination" must not be empty')
    if len(text) > MAX_DESTINATION:
        raise OperationError(f'"destination" is longer than {MAX_DESTINATION} characters')
    if any(c.isspace() or not c.isprintable() for c in text):
        raise OperationError('"destination" must not hold spaces or control characters')
    return text


def parse_id(value: object) -> bytes:
    """A queue id as ``ferry queue list`` prints it."""
    if not isinstance(value, str):
        raise OperationError('"ids" must be a list of queue ids')
    try:
        return id_bytes(value.strip())
    except ValueError:
        raise OperationError(f"not a queue id: {quote(value)}") from None


def parse_ids(value: object) -> tuple[bytes, ...]:
    """A list of queue ids, each once, at most :data:`MAX_IDS`."""
    if not isinstance(value, list) or not value:
        raise OperationError('"ids" must be a list of queue ids')
    if len(value) > MAX_IDS:
        raise OperationError(f'"ids": at most {MAX_IDS} per request')
    return tuple(dict.fromkeys(parse_id(item) for item in value))


def parse_filter(values: Mapping[str, object]) -> Filter:
    """``ferry queue list``'s filters from a request: text (a query string) or JSON values
    (a filter object).  Unknown names and bad values are refused, naming them."""
    unknown = sorted(set(values) - set(FILTERS))
    if unknown:
        raise OperationError(f"unknown filter {quote(unknown[0])}; the filters are "
                             f"{', '.join(FILTERS)}")
    text: dict[str, str] = {}
    for name in ("sender", "recipient", "destination", "state", "error"):
        value = values.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise OperationError(f'filter "{name}" must be a string')
        text[name] = value
    state = text.get("state")
    if state is not None and state not in STATES:
        raise OperationError(f'filter "state": {quote(state)} is not one of '
                             f"{', '.join(STATES)}")
    older = _number(values.get("older_than"), "older_than", "seconds", whole=False)
    larger = _number(values.get("larger_than"), "larger_than", "bytes", whole=True)
    return Filter.of(sender=text.get("sender"), recipient=text.get("recipient"),
                     destination=text.get("destination"), state=state, older_than=older,
                     larger_than=int(larger) if larger is not None else None,
                     error=text.get("error"))


def _number(value: object, name: str, unit: str, whole: bool) -> float | None:
    """A filter's number: text (a query string) or a JSON number, not negative, finite;
    ``whole``: an integer."""
    if value is None:
        return None
    bad = OperationError(f'filter "{name}": not a number of {unit}: {quote(str(value))}')
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise bad
    try:
        number = (int(value) if whole else float(value)) if isinstance(value, str) else value
    except ValueError:
        raise bad from None
    if not number >= 0 or math.isinf(number) or (
            whole and isinstance(number, float) and not number.is_integer()):
        raise bad
    return float(number)


def parse_limit(value: object, default: int = DEFAULT_LIMIT) -> int | None:
    """How many to show: a number ≥ 0 (0: all, as ``ferry queue list --limit 0``)."""
    if value is None:
        return default
    try:
        number = int(value) if isinstance(value, str | int) and not isinstance(
            value, bool) else -1
    except ValueError:
        number = -1
    if number < 0:
        raise OperationError(f'"limit" must be a whole number, 0 or more (0: all), not '
                             f"{quote(str(value))}")
    return number or None


def tracking_query(*, message_id: str | None = None, queue_id: str | None = None,
                   sender: str | None = None, recipient: str | None = None,
                   events: Sequence[str] = (), start: str | None = None,
                   end: str | None = None) -> Query:
    """``ferry track``'s filters from a request (times as ISO 8601 text)."""
    from engine.ops.tracking import parse_time

    kinds = [e.upper() for e in events]
    unknown = unknown_events(kinds)
    if unknown:
        raise OperationError(f"unknown event {', '.join(map(quote, unknown))} (one of "
                             f"{', '.join(EVENTS)})")
    times: dict[str, float | None] = {}
    for name, text in (("start", start), ("end", end)):
        try:
            times[name] = parse_time(text) if text is not None else None
        except ValueError:
            raise OperationError(f'"{name}": not an ISO 8601 time: {quote(text or "")}'
                                 ) from None
    return Query(message_id=message_id, queue_id=queue_id, sender=sender,
                 recipient=recipient, events=kinds, start=times["start"], end=times["end"])


# --- the documents -------------------------------------------------------------------------


def verb_document(done: VerbResult) -> dict[str, Any]:
    """What a verb on messages did: the ids it changed, left alone, did not find (and,
    for ``remove`` with a report, the non-delivery reports queued)."""
    doc: dict[str, Any] = {"changed": [id_text(q) for q in done.changed],
                           "unchanged": [id_text(q) for q in done.unchanged],
                           "missing": [id_text(q) for q in done.missing]}
    if done.reports:
        doc["reports"] = [id_text(q) for q in done.reports]
    return doc


def stats_document(snap: SchedulerSnapshot) -> dict[str, Any]:
    """The scheduler's snapshot as JSON (``down``: seconds left per site, ``down_until``:
    until when, epoch seconds)."""
    return {
        "messages": snap.messages,
        "delivered": snap.delivered,
        "paused": snap.paused,
        "window": snap.window,
        "sites": [{"site": site.name, "workers": site.workers,
                   "max_connections": site.max_connections, "max_rate": site.max_rate,
                   "waiting": site.waiting} for site in snap.sites],
        "down": {down.name: round(down.until - snap.taken, 1) for down in snap.down},
        "down_until": {down.name: down.until for down in snap.down},
        "suspended": list(snap.suspended),
        "commits": snap.queue.commits,
        "queue": dataclasses.asdict(snap.queue),
    }


# --- the operations --------------------------------------------------------------------------


class Operations:
    """The views and verbs of the running server whose scheduler is ``scheduler``.

    ``normalize`` turns what the operator typed into the queue's destination name
    (``Router.destination``: the same rule as for recipients' domains); ``tracking`` is
    the tracking log's directory (None when ``[tracking]`` is off)."""

    def __init__(self, scheduler: Scheduler, normalize: Callable[[str], str],
                 tracking: Path | None = None) -> None:
        self.scheduler = scheduler
        self.store: QueueStore = scheduler.store
        self.normalize = normalize
        self.tracking = tracking
        #: The running webhooks' rows for ``queues`` (engine.ops.webhooks), set by the
        #: composition root; None: the webhook events waiting in the queue, as read.
        self.hooks: Callable[[], list[QueueRow]] | None = None
        #: The suppression list (engine.queue.suppression; engine.ops.suppressions serves
        #: it), set by the composition root; None: none kept.
        self.suppression: SuppressionList | None = None
        #: The cluster's shared suspensions (engine.cluster.suspensions), set by the
        #: composition root; None: no [cluster], suspensions are this node's.
        self.cluster: SuspensionSync | None = None

    async def _in_thread(self, work: Callable[[], _T]) -> _T:
        # LMDB readers do not block the writer, and a thread keeps the loop serving.
        return await asyncio.get_running_loop().run_in_executor(None, work)

    def hop(self, destination: object) -> str:
        """The queue's name for the destination the operator named."""
        hop = self.normalize(parse_destination(destination))
        if not hop:
            raise OperationError('"destination" must name a destination')
        return hop

    # --- destinations ----------------------------------------------------------------

    async def suspend(self, destination: object, by: str) -> dict[str, Any]:
        hop = self.hop(destination)
        count = await self.scheduler.suspend(hop, by)
        log.info("%s suspended %s (%d recipients parked)", by, hop, count)
        if self.cluster is not None:
            await self.cluster.suspended(hop, by)
        return {"destination": hop, "recipients": count}

    async def resume(self, destination: object, by: str) -> dict[str, Any]:
        hop = self.hop(destination)
        was_suspended = hop in self.scheduler.snapshot().suspended
        count = await self.scheduler.resume(hop, by)
        log.info("%s resumed %s (%d recipients back in the queue)", by, hop, count)
        if self.cluster is not None:
            await self.cluster.resumed(hop)
        return {"destination": hop, "recipients": count, "was_suspended": was_suspended}

    async def retry_destination(self, destination: object, by: str) -> dict[str, Any]:
        hop = self.hop(destination)
        count = await self.scheduler.retry_destination(hop, by)
        log.info("%s retried %s (%d recipients due now)", by, hop, count)
        return {"destination": hop, "recipients": count}

    def suspended(self) -> list[str]:
        return list(self.scheduler.snapshot().suspended)

    async def suspended_view(self) -> list[str]:
        """:meth:`suspended` for a front door that may answer for a whole node (which
        asks its workers: engine.cluster.nodeview)."""
        return self.suspended()

    # --- views -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return stats_document(self.scheduler.snapshot())

    async def stats_view(self) -> dict[str, Any]:
        """:meth:`stats` for a front door that may answer for a whole node."""
        return self.stats()

    async def queues(self) -> dict[str, Any]:
        """The queues per next hop (Get-Queue), with the running scheduler's figures."""
        snap = self.scheduler.snapshot()
        hooks = self.hooks() if self.hooks is not None else None
        view = await self._in_thread(partial(queue_rows, self.store, snap, hooks=hooks))
        return {"taken": snap.taken, "queues": [r.to_json() for r in view.rows]}

    async def messages(self, filt: Filter, limit: int | None) -> dict[str, Any]:
        """The messages ``filt`` matches, oldest first, at most ``limit`` (None: all):
        ``ferry queue list --json``'s objects, how many are shown and how many match."""
        found = await self._in_thread(partial(select, self.store, filt, limit))
        docs = listing(found)
        return {"messages": docs, "shown": len(docs), "total": found.total}

    def _load(self, queue_id: bytes) -> tuple[dict[str, Any], bytes | None]:
        """(the message's detail, its body); a corrupt record's listing object and None."""
        try:
            env, body = self.store.get_with_body(queue_id)
        except KeyError:
            raise NotFound(f"no message {id_text(queue_id)}") from None
        except RecordError as exc:
            return corrupt_view(queue_id, str(exc)), None
        return message_detail(env, body), body

    async def message(self, queue_id: bytes) -> dict[str, Any]:
        """One message (``ferry queue show --json``): envelope, each recipient's state,
        attempts, last reply and next retry, the header section."""
        return (await self._in_thread(partial(self._load, queue_id)))[0]

    async def content(self, queue_id: bytes) -> bytes:
        """The message as the next hop receives it (``ferry queue export``)."""
        def read() -> bytes:
            doc, body = self._load(queue_id)
            if body is None:
                raise CorruptRecord(f"{doc['id']}: corrupt record: {doc['error']}")
            return as_delivered(body)

        return await self._in_thread(read)

    async def matching(self, filt: Filter) -> list[bytes]:
        """The ids of every message ``filt`` matches (for a verb on many); an empty
        filter is refused: it would act on the whole queue."""
        if filt == Filter():
            raise OperationError("give queue ids, or filters (as for a listing) to act on "
                                 "every message they match")
        return await self._in_thread(partial(select_ids, self.store, filt))

    async def track(self, query: Query, limit: int | None) -> dict[str, Any]:
        """The tracking records ``query`` matches, oldest first, at most ``limit``."""
        directory = self.tracking
        if directory is None:
            raise NotFound("the message tracking log is off (tracking.enabled)")

        def read() -> dict[str, Any]:
            return tracking_page(search(directory, query) if directory.is_dir() else (),
                                 limit)

        return await self._in_thread(read)

    # --- verbs on messages -----------------------------------------------------------

    async def verb(self, verb: str, ids: Sequence[bytes], by: str,
                   report: bool = False) -> dict[str, Any]:
        """``verb`` (one of :data:`MESSAGE_VERBS`) on the messages ``ids``, by ``by``;
        any number of ids, handed to the scheduler :data:`MAX_IDS` at a time."""
        done = VerbResult()
        for start in range(0, len(ids), MAX_IDS):
            part = ids[start:start + MAX_IDS]
            if verb == "hold":
                some = await self.scheduler.hold(part, by)
            elif verb == "release":
                some = await self.scheduler.release(part, by)
            elif verb == "remove":
                some = await self.scheduler.remove(part, report, by)
            elif verb == "retry":
                some = await self.scheduler.retry_messages(part, by)
            else:
                raise OperationError(f"unknown verb {quote(verb)}; one of "
                                     f"{', '.join(MESSAGE_VERBS)}")
            for name in ("changed", "unchanged", "missing", "reports"):
                getattr(done, name).extend(getattr(some, name))
        if verb == "remove":
            log.info("%s removed %d messages (%d non-delivery reports)", by,
                     len(done.changed), len(done.reports))
        else:
            log.info("%s %s %d messages", by, _DONE[verb], len(done.changed))
        return verb_document(done)


    # --- the suppression list (engine.ops.suppressions) ----------------------------------

    async def suppress(self, address: object, reason: object, category: object,
                       by: str) -> dict[str, Any]:
        """Add (or replace) an entry of the suppression list."""
        from engine.ops import suppressions

        return await suppressions.add(self, address, reason, category, by)

    async def unsuppress(self, address: object, by: str) -> dict[str, Any]:
        """Remove an entry; ``removed``: whether there was one."""
        from engine.ops import suppressions

        return await suppressions.remove(self, address, by)


def tracking_page(found: Iterable[dict[str, Any]], limit: int | None) -> dict[str, Any]:
    """The answer of a tracking search: the first ``limit`` records found (None: all),
    and how many were found in all."""
    records: list[dict[str, Any]] = []
    total = 0
    for record in found:
        total += 1
        if limit is None or len(records) < limit:
            records.append(record)
    return {"records": records, "shown": len(records), "total": total}


_DONE: Final = {"hold": "held", "release": "released", "retry": "retried"}

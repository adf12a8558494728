"""Delivery webhooks: the tracking log's events, queued durably and POSTed in signed batches.

Each ``[[webhook]]`` entry names a receiver (``url``) and the event kinds it wants
(``events``).  :class:`Webhooks` is a sink of the event hub (``engine.ops.events``): in
:meth:`Webhooks.write` (on the event loop) it keeps the records of those kinds, gives each
an ``event_id``, serialises it the way the tracking log does
(``engine.ops.tracking.record_json``) and hands them all, one write per batch of the hub,
to the queue database's writer: they go into the ``webhooks`` table in the next group
commit (``LmdbQueue.hooks_soon``).  A sender task per webhook reads the oldest events
(up to ``batch_size``, in a worker thread), POSTs them as one JSON array with an
HMAC-SHA256 signature of the body (``X-Ferry-Signature: sha256=<hex>``), and deletes them
from the database only after a 2xx answer; on any other answer, a timeout or a refused
connection it waits (``retry_interval``, doubled after each failure up to
``max_retry_interval``) and sends them again.  At start the events still in the database
are sent again: delivery is at least once, the receiver deduplicates on ``event_id``.

The window.  An event is emitted after the commit that made it true has returned, and its
webhook record is committed by the group commit after that (the next transaction of the
writer, a few milliseconds later at most under load): a ``kill -9`` between the two loses
that event for the webhook, never more, and never an event whose record was committed.
The tracking log has the same window (longer: half a second).

A dead receiver cannot fill the disk: past ``max_backlog`` events waiting for one webhook,
the oldest are deleted in the commit that adds the new ones, with an ERROR in the log and
the count in :attr:`Hook.dropped`.  Under back pressure (the queue database full, the disk
low) new events are refused like new mail, and counted and logged the same way.

This module observes; it must never change delivery decisions, block the event loop (it
reads the database in a worker thread), or let a receiver's failure reach a producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import ssl
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from engine import __version__
from engine.config import WebhookConfig
from engine.ops.events import Event
from engine.ops.tracking import record_json
from engine.ops.views import QueueRow, webhook_row
from engine.queue.api import BackPressure, QueueClosed
from engine.queue.lmdb_store import hook_prefix
from engine.queue.records import id_text, new_id

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("ferry.webhooks")

#: The header of the body's signature, and its value's prefix (the algorithm).
SIGNATURE_HEADER: Final = "X-Ferry-Signature"
SIGNATURE_PREFIX: Final = "sha256="
#: The field each record gets: the same id however often the event is sent.
EVENT_ID: Final = "event_id"
#: A sender that wakes to fewer than ``batch_size`` events waits this long for more
#: before it reads them: fuller batches, fewer POSTs and commits (bench_webhooks.py), at
#: the price of this much more delay for a receiver of a trickle of events.
GATHER_SECONDS: Final = 0.05
#: What of a failed answer's body goes into the log and ``ferry queue queues``.
_ERROR_TEXT: Final = 200


# --- the parts without I/O ------------------------------------------------------------------


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Ferry-Signature`` value of ``body``: HMAC-SHA256 (RFC 2104) under the
    secret, in hex."""
    key = secret.encode() if isinstance(secret, str) else secret
    return SIGNATURE_PREFIX + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(secret: str | bytes, body: bytes, signature: str) -> bool:
    """Whether ``signature`` (the header's value) signs ``body``: a receiver's check, in
    constant time."""
    return hmac.compare_digest(sign(secret, body), signature)


def with_event_id(event_id: str, record: bytes) -> bytes:
    """A serialised record (a JSON object) with ``event_id`` as its first field, without
    serialising it again (every webhook that wants the event stores the same bytes)."""
    return b'{"' + EVENT_ID.encode() + b'":"' + event_id.encode() + b'",' + record[1:]


def batch_body(events: Iterable[bytes]) -> bytes:
    """The POST body: the serialised records as one JSON array."""
    return b"[" + b",".join(events) + b"]"


def backoff(failures: int, first: float, most: float) -> float:
    """Seconds to wait after ``failures`` failed POSTs in a row (1 or more): ``first``,
    doubled after each further failure, never more than ``most``."""
    return min(most, first * 2.0 ** min(failures - 1, 62))


def shown_url(url: str) -> str:
    """``url`` for a log line: without a user name and password written into it."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _one_line(text: str) -> str:
    """A receiver's text fit for a log line: no CR, LF or other control characters."""
    return "".join(c if c.isprintable() else " " for c in text)[:_ERROR_TEXT]


# --- the store it needs ---------------------------------------------------------------------


class HookStore(Protocol):
    """What the webhooks ask of the queue database (``engine.queue.lmdb_store``)."""

    def hooks_soon(self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes] = (),
                   trims: Sequence[tuple[bytes, int]] = ()) -> asyncio.Future[Any]: ...

    def hook_events(self, name: str, limit: int) -> list[tuple[bytes, bytes]]: ...

    def hook_counts(self) -> dict[str, int]: ...


@dataclass(eq=False)
class Hook:
    """One webhook's state: its events waiting, what its sender is doing, its figures."""

    config: WebhookConfig
    prefix: bytes
    #: events committed to the database and not yet deleted (exact: corrected by what
    #: each commit reports), and events handed to the writer, not yet committed
    stored: int = 0
    adding: int = 0
    #: "ready" (nothing to send, or about to), "active" (a POST is out), "retry" (the
    #: last POST failed: waiting until ``next_retry``)
    state: str = "ready"
    last_error: str = ""
    next_retry: float = 0.0
    failures: int = 0
    #: events POSTed and acknowledged (2xx), in how many POSTs, and events dropped
    #: (backlog over its maximum, or refused by the queue under back pressure)
    posted: int = 0
    posts: int = 0
    dropped: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.config.name

    def row(self) -> QueueRow:
        return webhook_row(self.name, self.stored, self.state, self.last_error,
                           self.next_retry if self.state == "retry" else 0.0)


class Webhooks:
    """The ``[[webhook]]`` entries of one running server: the hub's sink and the senders
    (see the module docstring).  :meth:`start` once the queue is open, :meth:`stop` before
    it closes; the sink (:meth:`write`) takes events until the hub closes."""

    def __init__(self, configs: Sequence[WebhookConfig], store: HookStore) -> None:
        self.store = store
        self.hooks = {c.name: Hook(c, hook_prefix(c.name)) for c in configs}
        #: event kind → the hooks that want it
        self._by_kind: dict[str, list[Hook]] = {}
        self._index()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        #: events not yet handed to the writer (one write is in flight), and per hook
        self._puts: list[tuple[bytes, bytes]] = []
        self._added: Counter[Hook] = Counter()
        self._in_flight = False
        self._closing = False

    # --- figures -------------------------------------------------------------------------

    def backlog(self) -> Mapping[str, int]:
        """Events waiting per webhook (committed, not yet acknowledged by the receiver)."""
        return {name: hook.stored for name, hook in self.hooks.items()}

    def rows(self) -> list[QueueRow]:
        """A ``ferry queue queues`` row per webhook (``engine.ops.views.webhook_row``)."""
        return [hook.row() for hook in self.hooks.values()]

    # --- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Count the events left in the database (they are sent again), drop those of
        webhooks no longer configured, and start a sender per webhook."""
        loop = asyncio.get_running_loop()
        counts = await loop.run_in_executor(None, self.store.hook_counts)
        for name, count in counts.items():
            hook = self.hooks.get(name)
            if hook is not None:
                hook.stored = count
                continue
            log.warning("webhook %s is no longer configured: its %d waiting events are "
                        "dropped", name, count)
            await self.store.hooks_soon((), (), ((hook_prefix(name), count),))
        for hook in self.hooks.values():
            if hook.stored:
                log.info("webhook %s: %d events waiting from before, sending them again",
                         hook.name, hook.stored)
            self._start_sender(hook)

    def _index(self) -> None:
        self._by_kind = {}
        for hook in self.hooks.values():
            for kind in hook.config.events:
                self._by_kind.setdefault(kind, []).append(hook)

    def _start_sender(self, hook: Hook) -> None:
        if self._session is None:
            import aiohttp  # here: `ferry queue` and the tools never need it

            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"ferry/{__version__}"},
                # Nothing from the environment: no proxy settings, no .netrc credentials.
                trust_env=False)
        hook.wake.set()  # look at the database once
        self._tasks[hook.name] = asyncio.get_running_loop().create_task(
            self._send(hook, _tls(hook.config)), name=f"ferry-webhook-{hook.name}")

    async def _stop_sender(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reconfigure(self, configs: Sequence[WebhookConfig]) -> None:
        """Take the ``[[webhook]]`` entries of a reload: a new entry gets its sender, a
        changed one's sender starts again with its new settings (a POST in flight is
        abandoned and sent again: at least once), and a removed one's sender stops and its
        waiting events are dropped, with a WARNING (the events of a write in flight then
        are dropped at the next start).  The composition root adds this sink to the hub
        when the first webhook appears."""
        wanted = {c.name: c for c in configs}
        removed = [self.hooks.pop(n) for n in list(self.hooks) if n not in wanted]
        self._index()  # the sink takes no more events for them from here
        for gone in removed:
            await self._stop_sender(gone.name)
            self._puts = [(k, v) for k, v in self._puts if not k.startswith(gone.prefix)]
            self._added.pop(gone, None)
            log.warning("webhook %s is no longer configured: its %d waiting events are "
                        "dropped", gone.name, gone.stored)
            await self.store.hooks_soon((), (), ((gone.prefix, gone.stored + gone.adding),))
        for name, config in wanted.items():
            hook = self.hooks.get(name)
            if hook is None:
                hook = self.hooks[name] = Hook(config, hook_prefix(name))
            elif hook.config == config:
                continue
            else:
                await self._stop_sender(name)
                hook.config, hook.failures, hook.state = config, 0, "ready"
            self._start_sender(hook)
        self._index()

    async def stop(self) -> None:
        """Stop the senders (a POST in flight is abandoned: its events stay in the
        database and are sent again at the next start); the sink keeps taking events."""
        for name in list(self._tasks):
            await self._stop_sender(name)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the sink (on the event loop) ----------------------------------------------------

    def write(self, batch: list[Event]) -> None:
        puts = self._puts
        added = self._added
        by_kind = self._by_kind
        for record in batch:
            hooks = by_kind.get(record.get("event", ""))
            if not hooks:
                continue
            try:
                line = record_json(record)
            except TypeError as exc:
                log.error("webhooks: an event does not serialise, not sent: %s", exc)
                continue
            event_id = new_id()
            value = with_event_id(id_text(event_id), line)
            for hook in hooks:
                puts.append((hook.prefix + event_id, value))
                added[hook] += 1
        # One write in flight at a time: what comes meanwhile goes in the next one, handed
        # over when it commits (group commit, one level up: a write per commit of the
        # writer, not one per batch of the hub; an event waits for one commit at most).
        if puts and (not self._in_flight or self._closing):
            self._hand_over()

    def close(self) -> None:
        """Hand over what waits now (the queue's writer commits it before it stops)."""
        self._closing = True
        if self._puts:
            self._hand_over()

    def _hand_over(self) -> None:
        puts, added = self._puts, self._added
        self._puts, self._added = [], Counter()
        trims: list[tuple[bytes, int]] = []
        trimmed: dict[Hook, int] = {}
        for hook, count in added.items():
            over = hook.stored + hook.adding + count - hook.config.max_backlog
            if over > 0:
                trims.append((hook.prefix, over))
                trimmed[hook] = over
            hook.adding += count
        try:
            future = self.store.hooks_soon(puts, (), trims)
        except QueueClosed as exc:
            self._refused(added, exc)
            return
        self._in_flight = True
        future.add_done_callback(lambda f: self._stored(f, added, trimmed))

    def _stored(self, future: asyncio.Future[Any], added: Counter[Hook],
                trimmed: Mapping[Hook, int]) -> None:
        self._in_flight = False
        if self._puts:
            self._hand_over()
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._refused(added, error)
            return
        _, dropped = future.result()
        for hook, count in added.items():
            hook.adding -= count
            hook.stored += count
        for (hook, _wanted), count in zip(trimmed.items(), dropped, strict=True):
            hook.stored -= count
            hook.dropped += count
            if count:
                log.error("webhook %s: more than max_backlog %d events waiting: the %d "
                          "oldest are dropped (%d in all)", hook.name,
                          hook.config.max_backlog, count, hook.dropped)
        for hook in added:
            hook.wake.set()

    def _refused(self, added: Counter[Hook], error: BaseException) -> None:
        why = error.describe() if isinstance(error, BackPressure) else str(error)
        for hook, count in added.items():
            hook.adding -= count
            hook.dropped += count
            log.error("webhook %s: %d events not queued (%s); %d dropped in all", hook.name,
                      count, why, hook.dropped)

    # --- a sender ------------------------------------------------------------------------

    async def _send(self, hook: Hook, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        config = hook.config  # a changed config starts a new sender (reconfigure)
        gathered = False
        while True:
            if hook.stored <= 0:
                hook.state = "ready"
                hook.wake.clear()
                await hook.wake.wait()
                continue
            if hook.stored < config.batch_size and not gathered and not hook.failures:
                gathered = True
                await asyncio.sleep(GATHER_SECONDS)
                continue
            gathered = False
            # Cleared before the read: a commit of new events while it runs wakes us.
            hook.wake.clear()
            events = await loop.run_in_executor(None, self.store.hook_events, hook.name,
                                                config.batch_size)
            if not events:
                # Counted but gone: a trim, or the deletion by a sender stopped by a
                # reload, is being committed (its count follows): wait for new events.
                await hook.wake.wait()
                continue
            hook.state = "active"
            error = await self._post(hook, batch_body(value for _, value in events), tls)
            if error is None:
                try:
                    deleting = self.store.hooks_soon((), [key for key, _ in events])
                except QueueClosed:
                    return  # shutting down: they are sent again at the next start
                # Counted when the commit returns, even if this sender is stopped
                # meanwhile (a reload): the count stays exact.
                deleting.add_done_callback(functools.partial(self._deleted, hook))
                with contextlib.suppress(QueueClosed):
                    await asyncio.shield(deleting)
                hook.posted += len(events)
                hook.posts += 1
                hook.failures = 0
                continue
            hook.failures += 1
            delay = backoff(hook.failures, config.retry_interval, config.max_retry_interval)
            hook.state, hook.last_error = "retry", error
            hook.next_retry = time.time() + delay
            log.warning("webhook %s: POST of %d events to %s failed (%s); %d waiting, next "
                        "try in %.3g s", hook.name, len(events), shown_url(config.url), error,
                        hook.stored, delay)
            await asyncio.sleep(delay)

    @staticmethod
    def _deleted(hook: Hook, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            hook.stored -= future.result()[0]

    async def _post(self, hook: Hook, body: bytes, tls: ssl.SSLContext | None) -> str | None:
        """POST one batch; None when the receiver answered 2xx, else what went wrong."""
        import aiohttp

        assert self._session is not None
        config = hook.config
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(config.secret, body)}
        try:
            async with self._session.post(
                    config.url, data=body, headers=headers, allow_redirects=False,
                    ssl=tls if tls is not None else True,
                    timeout=aiohttp.ClientTimeout(total=config.timeout)) as answer:
                text = await answer.content.read(_ERROR_TEXT)
                if 200 <= answer.status < 300:
                    return None
                detail = _one_line(text.decode("utf-8", "replace"))
                return f"HTTP {answer.status} {answer.reason or ''}".rstrip() + (
                    f": {detail}" if detail else "")
        except TimeoutError:
            return f"no answer within {config.timeout:g} s (timeout)"
        except (aiohttp.ClientError, OSError) as exc:
            return _one_line(f"{type(exc).__name__}: {exc}")


def _tls(config: WebhookConfig) -> ssl.SSLContext | None:
    """The context that verifies an https receiver against ``ca_file`` (None: the
    system's CA certificates, or plain http)."""
    if config.ca_file is None:
        return None
    return ssl.create_default_context(cafile=str(config.ca_file))

"""The queue database's interface: what the server, the scheduler and the viewer may ask.

``QueueStore`` is a typing Protocol so the scheduler, the receive service, the control
channel and the queue viewer depend on the contract, not on LMDB.  The one implementation
is ``engine.queue.lmdb_store.LmdbQueue``.

The promise (RFC 5321 §6.1): ``enqueue`` returns only after the commit that holds the
message has returned, so a 250 sent after it is never a lie.  When the database cannot
make that promise quickly (map full, disk low, writer behind) it raises
:class:`BackPressure`, which the server turns into a 4xx, never a 250.
"""

from __future__ import annotations

import asyncio
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from engine.queue.records import Envelope, RcptState, init_fields


class BackPressure(Exception):
    """The queue cannot take new mail right now; it clears by itself when the cause goes.

    ``reason`` names the threshold (it stays the same while the cause lasts); ``figures``
    says how far past it the queue is, for the operator's log line."""

    def __init__(self, reason: str, figures: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.figures = figures

    def __reduce__(self) -> tuple[type[BackPressure], tuple[str, str]]:
        # Both values cross from the writer process (Exception pickles args only).
        return (BackPressure, (self.reason, self.figures))

    def describe(self) -> str:
        return f"{self.reason} ({self.figures})" if self.figures else self.reason


class QueueClosed(RuntimeError):
    """The store is closed (shutdown); nothing more is accepted."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt did to one recipient.

    ``state`` DELIVERED or FAILED is final; DEFERRED needs ``due`` (when to try again);
    SUSPENDED parks the recipient (no due entry) until an Outcome sets it PENDING again.
    ``attempted`` False records a state change that was not a delivery attempt.
    ``delay_notified`` marks the message as having had its delay notice (it rides on the
    outcomes recorded with that notice, so both are in one commit).

    A HELD or POISON recipient keeps its state over any outcome but a final one: the
    outcome of an attempt in flight when the operator held it (or when it was poisoned)
    must not put it back in the queue; DELIVERED and FAILED stand, the mail went (or
    failed) whatever was decided meanwhile.  Its reply and attempt are recorded.  An
    attempted outcome resets the message's fault and crash counts (it completed).
    """

    queue_id: bytes
    recipient: int
    state: RcptState
    reply: str = ""
    due: float = 0.0
    attempted: bool = True
    delay_notified: bool = False

    def __reduce__(self) -> tuple[type[Outcome], tuple[Any, ...]]:
        return Outcome, _OUTCOME_FIELDS(self)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store: ``head + body`` (the stored bytes, :attr:`data`)."""

    envelope: Envelope
    body: bytes
    #: Stored before ``body`` (ingest's Received field): the two are joined by the writer,
    #: so a bulk injection's caller never copies a message once more only to prepend it.
    head: bytes = b""

    @property
    def data(self) -> bytes:
        return self.head + self.body if self.head else self.body

    @property
    def size(self) -> int:
        return len(self.head) + len(self.body)

    def __reduce__(self) -> tuple[type[NewMessage], tuple[Any, ...]]:
        return NewMessage, (self.envelope, self.body, self.head)


# Both cross the queue writer's pipe by the thousand (engine.queue.writer_process): their
# fields as one tuple pickle in about half the time of a frozen slots dataclass's
# default (a state dict per object), on the server's side and the writer's
# (engine.queue.records.init_fields: a field added later crosses too).
_OUTCOME_FIELDS: Final = init_fields(Outcome)


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An idempotency key stored with the messages of one injection, in their commit
    (engine.http.inject): a retry with the same ``key`` within the window gets ``answer``
    and stores nothing, even after a crash between the commit and the first answer.

    ``key`` is opaque here (the caller puts who asked into it); ``answer`` is what the
    first request was answered; the key is forgotten after ``expires`` (POSIX time)."""

    key: bytes
    answer: bytes
    expires: float


#: What a :class:`Change` does to a message (see there).
CHANGE_ACTIONS = ("hold", "release", "remove", "poison", "fault", "crash")


@dataclass(frozen=True, slots=True)
class Change:
    """A change to a whole message, applied by the writer to the record as it stands in
    the commit (so it cannot race a delivery outcome: both go through the one writer).

    - ``hold``: every open recipient that is not parked becomes HELD; the parked time
      starts (``Envelope.parked_since``) at ``now``.
    - ``poison``: every open recipient becomes POISON, ``reason`` is kept.
    - ``release``: HELD and POISON recipients become PENDING, due ``now``; the time
      parked is added to ``Envelope.parked`` (the lifetime counts from here); the fault
      and crash counts start again.
    - ``remove``: the message is deleted; ``new_messages`` (a non-delivery report) are
      stored in the same commit, and only if ``expect`` (when given) still names exactly
      the open recipients (else nothing is done and the result is -1: the caller looks
      again).
    - ``fault`` / ``crash``: one more unexpected error / crash in flight; at
      ``poison_at`` the message is poisoned as above, with ``reason``.

    The result of each change: how many recipients it changed (for ``fault`` and ``crash``,
    how many it poisoned; for ``remove``, how many were open), None when the message is
    not in the queue, -1 for a stale ``remove``.
    """

    queue_id: bytes
    action: str
    now: float
    reason: str = ""
    poison_at: int = 2
    expect: tuple[int, ...] | None = None
    new_messages: tuple[NewMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class DueEntry:
    """One (message, next hop) group that is due; ``key`` orders entries for paging."""

    due: float
    queue_id: bytes
    next_hop: str
    key: bytes

    @property
    def group(self) -> bytes:
        """The group's identity in the due index (queue id + next hop), whatever its time."""
        return self.key[8:]


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The writer's figures since the store opened, as of its last commit."""

    #: write transactions committed (one per group of writes: group commit)
    commits: int = 0
    #: messages stored (mail and the DSNs riding on outcomes)
    enqueued: int = 0
    #: recipient outcomes applied
    outcomes: int = 0
    last_commit_seconds: float = 0.0
    #: times the map was grown, and its size now (bytes)
    map_grown: int = 0
    map_size: int = 0
    #: (state, messages with a recipient in it) for each state present, and ``corrupt``:
    #: the state index's counts, kept by the writer as it changes the index
    states: tuple[tuple[str, int], ...] = ()

    def __reduce__(self) -> tuple[type[QueueStats], tuple[Any, ...]]:
        # The writer process sends these after every commit: the fields as one tuple
        # pickle in a fraction of a frozen slots dataclass's default (engine.queue.records).
        return QueueStats, (self.commits, self.enqueued, self.outcomes,
                            self.last_commit_seconds, self.map_grown, self.map_size,
                            self.states)


class QueueStore(Protocol):
    async def enqueue(self, envelope: Envelope, body: bytes) -> bytes:
        """Store durably, return the queue id; raise BackPressure or QueueClosed."""
        ...

    async def record(
        self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
    ) -> None:
        """Apply outcomes (and enqueue e.g. DSNs) in one commit."""
        ...

    def record_soon(
        self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
    ) -> asyncio.Future[None]:
        """``record`` without waiting: the returned future is done with the commit."""
        ...

    async def change(self, changes: Sequence[Change]) -> list[int | None]:
        """Apply whole-message changes (:class:`Change`) in one commit; one result each."""
        ...

    async def inject(self, messages: Sequence[NewMessage],
                     idempotency: Idempotency | None = None) -> bytes | None:
        """Store ``messages`` in one commit (their envelopes carry their queue ids) and
        return None; with ``idempotency`` whose key is already stored and not expired,
        store nothing and return that key's answer.  BackPressure, QueueClosed."""
        ...

    def idempotent_answer(self, key: bytes) -> bytes | None:
        """The answer stored with an idempotency key that has not expired; None: none."""
        ...

    async def quarantine(self, queue_id: bytes, reason: str, due_key: bytes = b"") -> None:
        """Move a record that failed to decode to the corrupt state."""
        ...

    def pressure(self) -> BackPressure | None: ...

    def get(self, queue_id: bytes) -> Envelope:
        """The envelope; KeyError when absent, RecordError when it does not decode."""
        ...

    def body(self, queue_id: bytes) -> bytes:
        """The body; KeyError when absent."""
        ...

    def get_with_body(self, queue_id: bytes) -> tuple[Envelope, bytes]:
        """``get`` and ``body`` in one read (the delivery hot path); KeyError, RecordError."""
        ...

    def due(self, until: float, limit: int, after: bytes = b"") -> list[DueEntry]: ...

    def due_scan(
        self, until: float, limit: int, after: bytes, held: Container[bytes]
    ) -> tuple[list[DueEntry], bytes]:
        """``due`` leaving out the groups in ``held`` (``DueEntry.group``); also the last
        key looked at, to go on after next time."""
        ...

    def take_due_low(self) -> bytes | None:
        """The lowest due-index key committed since the last call (None: none): where
        the due index changed behind a reader that pages through it."""
        ...

    def ids_for_hop(self, next_hop: str, limit: int, after: bytes = b"") -> list[bytes]: ...

    def ids_in_state(self, state: str, limit: int, after: bytes = b"") -> list[bytes]: ...

    def corrupt(self) -> list[tuple[bytes, str]]:
        """The records moved to the corrupt state, and why."""
        ...

    def scan_corrupt(self) -> list[tuple[bytes, str]]:
        """Decode every record (a full check): the ones that do not decode, and why."""
        ...

    def count(self) -> int:
        """Messages in the queue (any state, corrupt ones included)."""
        ...

    def setting(self, name: str) -> bytes | None:
        """A value another part keeps with the queue (:meth:`save_setting`); None: none."""
        ...

    async def save_setting(self, name: str, value: bytes) -> None:
        """Store ``value`` under ``name`` durably (through the writer, like every write);
        the bytes mean nothing to the queue."""
        ...

    def hook_counts(self) -> dict[str, int]:
        """The webhook events waiting per webhook name (``engine.ops.webhooks``)."""
        ...

    @property
    def stats(self) -> QueueStats: ...

    def describe(self) -> str:
        """The startup log line: where, which durability mode and what it means."""
        ...

    async def close(self) -> None: ...

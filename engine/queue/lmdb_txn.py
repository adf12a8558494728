"""The queue database's write transactions on LMDB: the layout, and what one commit does.

Layout (one LMDB environment, named databases):

- ``bodies``     id → message body (stored once per message)
- ``envelopes``  id → envelope record (orjson, version first; ``records.py``)
- ``due``        due ms (8 bytes BE) + id + next hop → ""   one per (message, hop) with
                 recipients waiting to be tried, ordered by due time
                 (none for HELD and POISON recipients: only a release brings them back)
- ``hops``       next hop + NUL + id → ""                    one per (message, hop) not final
- ``states``     state + NUL + id → ""                       one per recipient state present
- ``corrupt``    id → why the record did not decode
- ``meta``       the schema version, and ``setting:<name>`` → a value another part keeps
                 with the queue (e.g. the suspended destinations), opaque bytes here
- ``idempotency`` ``k`` + key → expiry ms (8 bytes BE) + the answer; ``t`` + expiry ms +
                 key → "" (oldest first, for pruning): the idempotency keys of injections
                 (``api.Idempotency``), written in the commit of their messages
- ``webhooks``   webhook name + NUL + event id (12 bytes, time-ordered) → the event as
                 its receiver gets it (opaque bytes here; ``engine.ops.webhooks``)
- ``suppressed`` address (lower case) → the entry of the suppression list (opaque bytes
                 here; ``engine.queue.suppression``)

Every index entry is derived from the envelope (:func:`index_keys`), and every write
replaces the old entries of a message with the new ones in the same transaction, so the
indexes cannot drift from the records.

:class:`Committer` applies a batch of writes (new messages, outcomes and the DSNs riding on
them, whole-message changes such as holds and removals, quarantines, settings, webhook
events queued and sent, suppression entries) in one
write transaction, grows the map before it can fill,
and refuses the writes that add bytes when it cannot grow or the disk is low (back
pressure); outcomes alone always commit (they free space).  Both writers run it the same
way (``engine.queue.writer``: a thread of the server; ``engine.queue.writer_process``: a
process of its own), so the commit is one piece of code whoever calls it.

This module must never know SMTP, wake a caller (the writers settle their callers, after
the commit), or keep per-message state between commits.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import lmdb

from engine.queue.api import BackPressure, Change, Idempotency, NewMessage, Outcome, QueueStats
from engine.queue.records import (
    CORRUPT,
    FINAL_STATES,
    ID_LEN,
    PARKED_STATES,
    Envelope,
    RcptState,
    RecordError,
    decode,
    encode,
    new_id,
)

DURABILITY_MODES: Final = {
    "fsync": "every commit synced to disk: acknowledged mail survives power loss",
    "os": "no fsync: acknowledged mail survives a process crash, not power loss",
}

DB_NAMES: Final = (b"bodies", b"envelopes", b"due", b"hops", b"states", b"corrupt", b"meta",
                   b"idempotency", b"webhooks", b"suppressed")
SCHEMA: Final = b"1"
SEP: Final = b"\x00"
#: Prefix of the settings in ``meta`` (apart from the schema key the store owns).
SETTING: Final = b"setting:"
DUE: Final = struct.Struct(">Q")
#: Most expired idempotency keys one injection deletes (each adds one: pruning keeps up).
PRUNE_KEYS: Final = 64
#: Grow the map when the data would pass this share of it.
_GROW_AT: Final = 0.75
#: Where the state ends in a ``states`` index key (state + SEP + id).
_STATE_END: Final = -(ID_LEN + len(SEP))


def due_key(due: float, queue_id: bytes, hop: str) -> bytes:
    return DUE.pack(max(0, int(due * 1000))) + queue_id + hop.encode()


IndexKeys = tuple[set[bytes], set[bytes], set[bytes]]
_NO_KEYS: Final[IndexKeys] = (set(), set(), set())


#: A state's prefix in the states index (its value + SEP): a dict look-up per recipient,
#: not the enum's ``value`` property and an encode.
_STATE_PREFIX: Final = {state: state.value.encode() + SEP for state in RcptState}


def index_keys(env: Envelope) -> IndexKeys:
    """The due, hop and state index entries an envelope needs."""
    qid = env.queue_id
    due: set[bytes] = set()
    hops: set[bytes] = set()
    recipients = env.recipients
    states = {_STATE_PREFIX[r.state] + qid for r in recipients}
    groups: dict[str, float] = {}
    for r in recipients:
        state = r.state
        if state in FINAL_STATES:
            continue
        hop = r.next_hop
        hops.add(hop.encode() + SEP + qid)
        if state in PARKED_STATES:
            continue  # held or poisoned: never tried, never expired until released
        # Suspended recipients wait for a resume, not for a time, except the expiry that
        # holds in every state: they come due when the message expires.
        when = r.due if state is not RcptState.SUSPENDED else env.expiry(0.0)
        if when or state is not RcptState.SUSPENDED:
            earlier = groups.get(hop)
            groups[hop] = when if earlier is None or when < earlier else earlier
    for hop, when in groups.items():
        due.add(due_key(when, qid, hop))
    return due, hops, states


def completed(message: NewMessage) -> tuple[Envelope, bytes, bytes]:
    """``message`` with its queue id and size set on the caller's side (an ``inject``
    caller reads its ids from its envelopes), as (envelope, head, body) for the writer,
    which encodes it and joins the two: the writer process has a core of its own, and an
    Envelope crosses the pipe at about the cost of its encoded record
    (records.Envelope.__reduce__)."""
    env = message.envelope
    if not env.queue_id:
        env.queue_id = new_id()
    if not env.size:
        env.size = message.size
    return env, message.head, message.body


def _park(env: Envelope, state: RcptState, now: float, replace: frozenset[RcptState]) -> int:
    """Every open recipient in ``replace`` or not parked → ``state``; how many changed."""
    count = 0
    for r in env.recipients:
        if not r.final and r.state is not state and (
                r.state not in PARKED_STATES or r.state in replace):
            r.state = state
            count += 1
    if count and not env.parked_since:
        env.parked_since = now
    return count


def _change(env: Envelope, change: Change) -> int:
    """Apply one change other than ``remove`` to ``env`` (see :class:`Change`)."""
    action, now = change.action, change.now
    if action == "hold":
        return _park(env, RcptState.HELD, now, frozenset())
    if action == "release":
        count = 0
        for r in env.recipients:
            if r.state in PARKED_STATES:
                r.state = RcptState.PENDING
                r.due = now
                count += 1
        if env.parked_since:
            env.parked += max(0.0, now - env.parked_since)
            env.parked_since = 0.0
        env.faults = env.crashes = 0
        env.poisoned = ""
        return count
    if action == "fault":
        env.faults += 1
        if env.faults < change.poison_at:
            return 0
    elif action == "crash":
        env.crashes += 1
        if env.crashes < change.poison_at:
            return 0
    elif action != "poison":
        raise ValueError(f"unknown change {action!r}")
    env.poisoned = change.reason
    return _park(env, RcptState.POISON, now, PARKED_STATES)


#: ``[queue] commit_linger``'s default (seconds).
COMMIT_LINGER: Final = 0.005


@dataclass(frozen=True, slots=True)
class WriterParams:
    """How the queue database is opened and written: what both writers need (plain
    values: the writer process gets them as JSON on its command line)."""

    path: str
    durability: str = "fsync"
    map_size: int = 256 << 20
    max_map_size: int = 64 << 30
    min_free_disk: int = 512 << 20
    #: most writes, and most bytes of new messages, in one transaction
    batch_limit: int = 2_000
    batch_bytes: int = 64 << 20
    disk_check_interval: float = 1.0
    #: the writer process's wait for a fuller group (engine.queue.writer_process._Grouping)
    commit_linger: float = COMMIT_LINGER

    def __post_init__(self) -> None:
        if self.durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {sorted(DURABILITY_MODES)}")
        if self.map_size > self.max_map_size:
            raise ValueError("map_size is larger than max_map_size")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiskSpace:
    """Whether free disk under the queue is below ``min_free`` (statvfs at most once an
    ``interval``, unless forced)."""

    def __init__(self, path: str | os.PathLike[str], min_free: int, interval: float) -> None:
        self.path = path
        self.min_free = min_free
        self.interval = interval
        self.is_low = False
        #: free bytes at the last check (for the operator's log line)
        self.free = 0
        self._checked = 0.0

    def low(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._checked >= self.interval:
            st = os.statvfs(self.path)
            self.free = st.f_bavail * st.f_frsize
            self.is_low = self.free < self.min_free
            self._checked = now
        return self.is_low

    def figures(self) -> str:
        """How low: the free space and the floor, for the operator."""
        return (f"{mib(self.free)} free in {self.path}, below queue.min_free_disk "
                f"{mib(self.min_free)}")


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class Database:
    """An open queue database: the environment, its tables, and the lock readers hold
    (``set_mapsize`` needs no transaction open in this process).  Open an environment
    once per process: LMDB's locks are per process, so a writer thread shares its
    caller's."""

    def __init__(self, params: WriterParams) -> None:
        path = Path(params.path)
        path.mkdir(parents=True, exist_ok=True)
        sync = params.durability == "fsync"
        # Typed Any: py-lmdb's stubs type every read as bytes | memoryview whatever
        # `buffers=` says, and the store always reads with buffers=False (bytes).
        self.env: Any = lmdb.open(
            str(path), map_size=params.map_size, max_dbs=len(DB_NAMES), sync=sync,
            metasync=sync, readahead=False, max_readers=512,
        )
        # A crashed process may have left reader slots behind (py-lmdb: reader_check()).
        self.env.reader_check()
        with self.env.begin(write=True) as txn:
            tables = {name.decode(): self.env.open_db(name, txn=txn) for name in DB_NAMES}
            meta = tables["meta"]
            schema = txn.get(b"schema", db=meta)
            if schema is None:
                txn.put(b"schema", SCHEMA, db=meta)
            elif schema != SCHEMA:
                self.env.close()
                raise RuntimeError(f"queue database schema {schema!r}, expected {SCHEMA!r}")
        self.tables: dict[str, Any] = tables
        self.resize_lock = threading.Lock()
        self.disk = DiskSpace(path, params.min_free_disk, params.disk_check_interval)

    def close(self) -> None:
        self.env.close()


class Write(Protocol):
    """One write handed to the committer: ``enqueue`` (envelope, body), ``record``
    (outcomes, new messages), ``change`` (whole-message changes, ``api.Change``),
    ``quarantine`` (id, reason, due key), ``setting`` (name, value), ``inject`` (new
    messages, ``api.Idempotency`` or None), ``hooks`` (webhook events:
    :meth:`Committer._apply_hooks`) or ``suppress`` (suppression entries:
    :meth:`Committer._apply_suppress`); ``size`` is the bytes of new messages (or events) it
    adds (0: it adds none)."""

    @property
    def kind(self) -> str: ...

    @property
    def args(self) -> tuple[Any, ...]: ...

    @property
    def size(self) -> int: ...


W = TypeVar("W", bound=Write)
#: A write, what it returned (the queue id of an enqueue, else None) and its error.
Result = tuple[W, Any, BaseException | None]


@dataclass(frozen=True, slots=True)
class Report:
    """What the committer tells the caller side after a commit: whether new bytes are
    refused (the map is full), the lowest due key written since the last report (None:
    none), and the figures."""

    map_full: bool
    due_low: bytes | None
    stats: QueueStats

    def __reduce__(self) -> tuple[type[Report], tuple[Any, ...]]:
        return Report, (self.map_full, self.due_low, self.stats)  # (as QueueStats)


class Committer:
    """Runs batches of writes, one write transaction each (see the module docstring).
    Called from one thread only: LMDB write transactions are bound to their thread."""

    def __init__(self, db: Database, params: WriterParams) -> None:
        self._env = db.env
        self._db = db.tables
        self._resize_lock = db.resize_lock
        self._disk = db.disk
        self.max_map_size = params.max_map_size
        self._map_size: int = self._env.info()["map_size"]
        self._psize: int = self._env.stat()["psize"]
        self._map_full = False
        self._refused_size = 0
        #: The lowest due key committed since the last report, and in the batch being
        #: applied.
        self._due_low: bytes | None = None
        self._batch_due_low: bytes | None = None
        self._commits = self._enqueued = self._outcomes = self._map_grown = 0
        self._last_commit_seconds = 0.0
        #: Messages per state (the ``states`` index's entries per state), counted once
        #: here and then kept up as commits change the index; the changes of the batch
        #: being applied join them only once its transaction has committed.
        self._states: dict[bytes, int] = defaultdict(int)
        self._batch_states: dict[bytes, int] = defaultdict(int)
        with self._env.begin() as txn:
            for key in txn.cursor(self._db["states"]).iternext(values=False):
                self._states[bytes(key[:_STATE_END])] += 1

    def report(self) -> Report:
        """The state now; the due low is handed over once (the next report starts anew)."""
        low, self._due_low = self._due_low, None
        return Report(self._map_full, low, QueueStats(
            self._commits, self._enqueued, self._outcomes, self._last_commit_seconds,
            self._map_grown, self._map_size,
            tuple((state.decode(), n) for state, n in self._states.items() if n)))

    def commit(self, batch: Sequence[W], size: int) -> list[Result[W]]:
        """Apply ``batch`` in one transaction; every write gets its result.  ``size`` is
        the sum of the writes' sizes.  Nothing is returned before the commit has returned
        (and synced, in fsync mode)."""
        started = time.monotonic()
        refused: BackPressure | None = None
        # New bytes (mail, or DSNs riding on outcomes) need room; outcomes alone free it.
        if size and (self._disk.low(force=True) or not self._make_room(size)):
            refused = (BackPressure("disk space low", self._disk.figures())
                       if self._disk.is_low else self._full())
        results: list[Result[W]] = []
        try:
            results = self._apply(batch, refused)
        except lmdb.MapFullError:
            # The estimate missed: refuse what adds bytes, keep what frees space.
            self._map_full = True
            refused = self._full()
            try:
                results = self._apply(batch, refused)
            except lmdb.Error as exc:
                results = [(write, None, exc) for write in batch]
        except lmdb.Error as exc:
            results = [(write, None, exc) for write in batch]
        if refused is not None:
            self._refused_size = max(size, 1)
        elif self._map_full:
            # Delivered mail frees pages: look again, so "full" clears without a restart
            # once a batch like the refused one would fit (no flapping at the edge).
            self._make_room(self._refused_size)
        self._commits += 1
        self._last_commit_seconds = time.monotonic() - started
        return results

    def _full(self) -> BackPressure:
        return BackPressure("queue database is full",
                            f"map {mib(self._map_size)}, queue.max_map_size "
                            f"{mib(self.max_map_size)}")

    def _apply(self, batch: Sequence[W], refused: BackPressure | None) -> list[Result[W]]:
        """Run the batch in one write transaction; ``refused`` fails every write that adds
        bytes (enqueues, and outcomes that carry new messages) and nothing else."""
        results: list[Result[W]] = []
        self._batch_due_low = None
        self._batch_states.clear()
        with self._env.begin(write=True) as txn:
            for write in batch:
                kind, args = write.kind, write.args
                if refused is not None and write.size:
                    results.append((write, None, refused))
                elif kind == "enqueue":
                    results.append((write, self._put_new(txn, *args), None))
                elif kind == "record":
                    self._apply_outcomes(txn, *args)
                    results.append((write, None, None))
                elif kind == "change":
                    results.append((write, self._apply_changes(txn, *args), None))
                elif kind == "setting":
                    self._put_setting(txn, *args)
                    results.append((write, None, None))
                elif kind == "inject":
                    results.append((write, self._inject(txn, *args), None))
                elif kind == "hooks":
                    results.append((write, self._apply_hooks(txn, *args), None))
                elif kind == "suppress":
                    results.append((write, self._apply_suppress(txn, *args), None))
                else:
                    self._quarantine(txn, *args)
                    results.append((write, None, None))
        # Leaving the with-block committed the transaction (and synced, in fsync mode).
        for state, change in self._batch_states.items():
            self._states[state] += change
        low = self._batch_due_low
        if low is not None and (self._due_low is None or low < self._due_low):
            self._due_low = low
        return results

    def _put_new(self, txn: Any, env: Envelope, body: bytes) -> bytes:
        # The receive service may pick the id first (it goes into the Received field).
        qid = env.queue_id or new_id()
        env.queue_id = qid
        if not env.size:
            env.size = len(body)
        self._put_record(txn, qid, encode(env), body, index_keys(env))
        return qid

    def _put_record(self, txn: Any, qid: bytes, record: bytes, body: bytes,
                    keys: IndexKeys) -> None:
        """Store a new message: its body, its encoded envelope and its index entries."""
        db = self._db
        # append=True: ids grow with time, so the new key goes at the end of the B-tree.
        if not txn.put(qid, body, db=db["bodies"], append=True, overwrite=False):
            txn.put(qid, body, db=db["bodies"], overwrite=False)
        txn.put(qid, record, db=db["envelopes"])
        self._replace_indexes(txn, _NO_KEYS, keys)
        self._enqueued += 1

    def _inject(self, txn: Any, messages: tuple[tuple[Envelope, bytes, bytes], ...],
                idempotency: Idempotency | None) -> bytes | None:
        """Store ``messages`` (:func:`completed` by the caller) unless ``idempotency``
        names a key already stored (then its answer); the key goes into this transaction
        with them."""
        if idempotency is not None:
            db = self._db["idempotency"]
            now = DUE.pack(int(time.time() * 1000))
            found = txn.get(b"k" + idempotency.key, db=db)
            if found is not None:
                if found[:8] > now:
                    return bytes(found[8:])  # a retry: the first answer, nothing stored
                txn.delete(b"t" + found[:8] + idempotency.key, db=db)
            self._prune_keys(txn, db, now)
            expires = DUE.pack(max(0, int(idempotency.expires * 1000)))
            txn.put(b"k" + idempotency.key, expires + idempotency.answer, db=db)
            txn.put(b"t" + expires + idempotency.key, b"", db=db)
        for env, head, body in messages:
            self._put_record(txn, env.queue_id, encode(env), head + body if head else body,
                             index_keys(env))
        return None

    @staticmethod
    def _prune_keys(txn: Any, db: Any, now: bytes) -> None:
        """Forget up to :data:`PRUNE_KEYS` expired idempotency keys, oldest first."""
        cursor = txn.cursor(db)
        ok = cursor.set_range(b"t")
        for _ in range(PRUNE_KEYS):
            if not ok:
                break
            entry = cursor.key()
            if not entry.startswith(b"t") or entry[1:9] > now:
                break
            txn.delete(b"k" + entry[9:], db=db)
            ok = cursor.delete()

    def _apply_outcomes(
        self, txn: Any, outcomes: tuple[Outcome, ...],
        new_messages: tuple[NewMessage, ...],
    ) -> None:
        by_message: dict[bytes, list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            by_message[outcome.queue_id].append(outcome)
        for qid, items in by_message.items():
            new = self._load(txn, qid)
            if new is None:
                continue  # already final and gone (a duplicate report after a retry)
            before = index_keys(new)
            for o in items:
                if o.delay_notified:
                    new.delay_notified = True
                if not 0 <= o.recipient < len(new.recipients):
                    continue  # not a recipient of this message: nothing to record
                r = new.recipients[o.recipient]
                if r.final:
                    continue
                # A hold or poison outlives an attempt in flight; a final outcome does
                # not (the mail went): see Outcome.
                if r.state not in PARKED_STATES or o.state in FINAL_STATES:
                    r.state = o.state
                    r.due = o.due if o.state is RcptState.DEFERRED else r.due
                r.last_reply = o.reply or r.last_reply
                if o.attempted:
                    r.attempts += 1
                    new.faults = new.crashes = 0
            self._store(txn, new, before)
            self._outcomes += len(items)
        for message in new_messages:
            self._put_new(txn, message.envelope, message.data)

    def _apply_changes(self, txn: Any, changes: tuple[Change, ...]) -> list[int | None]:
        results: list[int | None] = []
        for change in changes:
            env = self._load(txn, change.queue_id)
            if env is None:
                results.append(None)
                continue
            before = index_keys(env)
            if change.action == "remove":
                open_now = tuple(i for i, r in enumerate(env.recipients) if not r.final)
                if change.expect is not None and open_now != change.expect:
                    results.append(-1)
                    continue
                self._store(txn, env, before, remove=True)
                for message in change.new_messages:
                    self._put_new(txn, message.envelope, message.data)
                results.append(len(open_now))
                continue
            results.append(_change(env, change))
            self._store(txn, env, before)
        return results

    def _load(self, txn: Any, qid: bytes) -> Envelope | None:
        """A message's record as this transaction sees it; None when it is gone, or when
        it does not decode (then it is moved to the corrupt state)."""
        raw = txn.get(qid, db=self._db["envelopes"])
        if raw is None:
            return None
        try:
            return decode(qid, raw)
        except RecordError as exc:
            self._quarantine(txn, qid, str(exc), b"")
            return None

    def _store(self, txn: Any, env: Envelope, before: IndexKeys, *,
               remove: bool = False) -> None:
        """Write a changed record and its index entries (``before``: those it had); a
        message whose recipients are all final, or one to ``remove``, is deleted with its
        body."""
        db = self._db
        if not (remove or env.final):
            txn.put(env.queue_id, encode(env), db=db["envelopes"])
            self._write_indexes(txn, before, env)
            return
        self._write_indexes(txn, before, None)
        txn.delete(env.queue_id, db=db["envelopes"])
        txn.delete(env.queue_id, db=db["bodies"])

    def _write_indexes(self, txn: Any, before: IndexKeys, new: Envelope | None) -> None:
        """Replace a message's index entries (``before``) with those ``new`` needs."""
        self._replace_indexes(txn, before, index_keys(new) if new is not None else _NO_KEYS)

    def _replace_indexes(self, txn: Any, before: IndexKeys, after: IndexKeys) -> None:
        for name, was, now in zip(("due", "hops", "states"), before, after, strict=True):
            db = self._db[name]
            gone = was - now
            for key in gone:
                txn.delete(key, db=db)
            added = now - was
            for key in added:
                txn.put(key, b"", db=db)
            if name == "states":
                # The messages per state (see __init__), an increment per entry changed.
                counts = self._batch_states
                for key in gone:
                    counts[key[:_STATE_END]] -= 1
                for key in added:
                    counts[key[:_STATE_END]] += 1
            elif added and name == "due":
                low = min(added)
                if self._batch_due_low is None or low < self._batch_due_low:
                    self._batch_due_low = low

    def _quarantine(self, txn: Any, qid: bytes, reason: str, dkey: bytes) -> None:
        db = self._db
        if dkey:
            txn.delete(dkey, db=db["due"])
        txn.put(qid, reason.encode(errors="replace")[:2000], db=db["corrupt"])
        if txn.put(CORRUPT.encode() + SEP + qid, b"", db=db["states"], overwrite=False):
            self._batch_states[CORRUPT.encode()] += 1

    def _put_setting(self, txn: Any, name: str, value: bytes) -> None:
        txn.put(SETTING + name.encode(), value, db=self._db["meta"])

    def _apply_hooks(self, txn: Any, puts: tuple[tuple[bytes, bytes], ...],
                     deletes: tuple[bytes, ...],
                     trims: tuple[tuple[bytes, int], ...]) -> tuple[int, tuple[int, ...]]:
        """Webhook events: store ``puts`` (key, event), delete the ``deletes`` keys (sent),
        then delete the ``count`` oldest keys under each ``prefix`` of ``trims`` (a backlog
        over its maximum).  The result: how many of ``deletes`` were there, and how many
        each trim deleted (the caller keeps exact counts with them)."""
        db = self._db["webhooks"]
        for key, value in puts:
            # append=True: event ids grow with time, so a key usually goes at the end.
            if not txn.put(key, value, db=db, append=True):
                txn.put(key, value, db=db)
        deleted = sum(1 for key in deletes if txn.delete(key, db=db))
        trimmed: list[int] = []
        for prefix, count in trims:
            cur = txn.cursor(db)
            done = 0
            ok = cur.set_range(prefix)
            while ok and done < count and cur.key().startswith(prefix):
                ok = cur.delete()  # moves to the next key
                done += 1
            trimmed.append(done)
        return deleted, tuple(trimmed)

    def _apply_suppress(self, txn: Any, puts: tuple[tuple[bytes, bytes], ...],
                        deletes: tuple[bytes, ...]) -> tuple[bool, ...]:
        """Suppression entries: store ``puts`` (address, entry), then delete ``deletes``;
        the result says which of ``deletes`` were there."""
        db = self._db["suppressed"]
        for key, value in puts:
            txn.put(key, value, db=db)
        return tuple(bool(txn.delete(key, db=db)) for key in deletes)

    # --- capacity --------------------------------------------------------------------

    def _used_bytes(self) -> int:
        with self._env.begin() as txn:
            pages: int = sum(
                s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                for s in [txn.stat(db) for db in self._db.values()] + [self._env.stat()]
            )
        return pages * self._psize

    def _make_room(self, incoming: int) -> bool:
        """Grow the map before it can fill; False when it is at its maximum."""
        # Records and index entries add to the bodies; 2x keeps the estimate safe.
        needed = self._used_bytes() + 2 * incoming + (1 << 20)
        if needed <= self._map_size * _GROW_AT:
            self._map_full = False
            return True
        if self._map_size >= self.max_map_size:
            self._map_full = True
            return False
        new_size = min(self.max_map_size, max(self._map_size * 2, int(needed / _GROW_AT) + 1))
        with self._resize_lock:
            self._env.set_mapsize(new_size)
        self._map_size = new_size
        self._map_grown += 1
        return self._make_room(incoming)

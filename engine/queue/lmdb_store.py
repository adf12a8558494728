"""The queue database on LMDB, with group commit.

Layout (one LMDB environment, named databases):

- ``bodies``     id → message body (stored once per message)
- ``envelopes``  id → envelope record (orjson, version first; ``records.py``)
- ``due``        due ms (8 bytes BE) + id + next hop → ""   one per (message, hop) with
                 recipients waiting to be tried, ordered by due time
- ``hops``       next hop + NUL + id → ""                    one per (message, hop) not final
- ``states``     state + NUL + id → ""                       one per recipient state present
- ``corrupt``    id → why the record did not decode
- ``meta``       the schema version, and ``setting:<name>`` → a value another part keeps
                 with the queue (e.g. the suspended destinations), opaque bytes here

Every index entry is derived from the envelope (:func:`index_keys`), and every write
replaces the old entries of a message with the new ones in the same transaction, so the
indexes cannot drift from the records.

Group commit: one writer owns every write transaction (LMDB write transactions are bound
to their thread).  Callers hand operations over and wait; the writer takes everything
waiting, applies it in one transaction, commits (one fsync in ``fsync`` mode), and only
then resolves the callers, one wake-up per event loop per batch.  Nothing is acknowledged
before the commit that holds it has returned.

The writer is a thread (``writer="thread"``, tools and tests) or a process of its own
(``writer="process"``, the server: ``engine.queue.writer_process``).  py-lmdb releases the
GIL around every put, get and delete, so a writer thread hands the GIL back and forth with
the event loop several times per message; with thousands of deliveries a second that
ping-pong (futex wake-ups, the loop waiting for the GIL at every callback) cost more than
the writes.  In a process, the writer's LMDB calls contend with nothing: the server's
side only pickles batches to a pipe and reads results back, one GIL hand-over per batch.
Reads (``get``, ``body``, the indexes) stay in the caller's process: LMDB readers never
block the writer, across processes too.

Durability modes: ``fsync`` (default) syncs every commit: an acknowledged message survives
power loss.  ``os`` leaves the flush to the OS: it survives a crash of the process, not of
the machine.

Back pressure: the map grows (doubling, up to ``max_map_size``) before it can fill; at the
maximum, with free disk below ``min_free_disk``, or with more than ``max_pending`` writes
waiting, ``enqueue`` raises BackPressure.  Outcomes are still applied (they free space).

This module must never know SMTP, and never hold per-message state in memory.
"""

from __future__ import annotations

import asyncio
import os
import queue as thread_queue
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Container, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import lmdb

if TYPE_CHECKING:
    from engine.queue.writer_process import WriterProcess

from engine.queue.api import BackPressure, DueEntry, NewMessage, Outcome, QueueClosed
from engine.queue.records import (
    CORRUPT,
    ID_LEN,
    Envelope,
    RcptState,
    RecordError,
    decode,
    encode,
    id_text,
    new_id,
)

DURABILITY_MODES: Final = {
    "fsync": "every commit synced to disk: acknowledged mail survives power loss",
    "os": "no fsync: acknowledged mail survives a process crash, not power loss",
}

_DB_NAMES: Final = (b"bodies", b"envelopes", b"due", b"hops", b"states", b"corrupt", b"meta")
_SCHEMA: Final = b"1"
_SEP: Final = b"\x00"
#: Prefix of the settings in ``meta`` (apart from the schema key the store owns).
_SETTING: Final = b"setting:"
_DUE: Final = struct.Struct(">Q")
#: Grow the map when the data would pass this share of it.
_GROW_AT: Final = 0.75


def due_key(due: float, queue_id: bytes, hop: str) -> bytes:
    return _DUE.pack(max(0, int(due * 1000))) + queue_id + hop.encode()


IndexKeys = tuple[set[bytes], set[bytes], set[bytes]]
_NO_KEYS: Final[IndexKeys] = (set(), set(), set())


def index_keys(env: Envelope) -> IndexKeys:
    """The due, hop and state index entries an envelope needs."""
    qid = env.queue_id
    due: set[bytes] = set()
    hops: set[bytes] = set()
    states = {r.state.value.encode() + _SEP + qid for r in env.recipients}
    groups: dict[str, float] = {}
    for r in env.recipients:
        if r.final:
            continue
        hops.add(r.next_hop.encode() + _SEP + qid)
        # Suspended recipients wait for a resume, not for a time, except the expiry that
        # holds in every state: they come due when the message expires.
        when = r.due if r.state is not RcptState.SUSPENDED else env.expires
        if when or r.state is not RcptState.SUSPENDED:
            groups[r.next_hop] = min(groups.get(r.next_hop, when), when)
    for hop, when in groups.items():
        due.add(due_key(when, qid, hop))
    return due, hops, states


@dataclass(slots=True)
class _Op:
    """One unit of work for the writer, and how to tell its caller (in the writer
    process, ``ident`` names the caller's op instead)."""

    kind: str
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | Future[Any] | None
    size: int = 0
    ident: int = 0


@dataclass(slots=True)
class _Stats:
    commits: int = 0
    enqueued: int = 0
    outcomes: int = 0
    last_commit_seconds: float = 0.0
    map_grown: int = 0


class LmdbQueue:
    """The LMDB queue database (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "fsync",
        map_size: int = 256 << 20,
        max_map_size: int = 64 << 30,
        min_free_disk: int = 512 << 20,
        max_pending: int = 10_000,
        batch_limit: int = 2_000,
        batch_bytes: int = 64 << 20,
        disk_check_interval: float = 1.0,
        writer: str = "thread",
    ) -> None:
        if writer not in ("thread", "process", "none"):
            raise ValueError("writer must be thread, process or none")
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {sorted(DURABILITY_MODES)}")
        if map_size > max_map_size:
            raise ValueError("map_size is larger than max_map_size")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.durability = durability
        self.max_map_size = max_map_size
        self.min_free_disk = min_free_disk
        self.max_pending = max_pending
        self.batch_limit = max(1, batch_limit)
        self.batch_bytes = batch_bytes
        self.disk_check_interval = disk_check_interval
        self.stats = _Stats()
        sync = durability == "fsync"
        # Typed Any: py-lmdb's stubs type every read as bytes | memoryview whatever
        # `buffers=` says, and the store always reads with buffers=False (bytes).
        self._env: Any = lmdb.open(
            str(self.path), map_size=map_size, max_dbs=len(_DB_NAMES), sync=sync,
            metasync=sync, readahead=False, max_readers=512,
        )
        # A crashed process may have left reader slots behind (py-lmdb: reader_check()).
        self._env.reader_check()
        with self._env.begin(write=True) as txn:
            dbs = {name.decode(): self._env.open_db(name, txn=txn) for name in _DB_NAMES}
            meta = dbs["meta"]
            schema = txn.get(b"schema", db=meta)
            if schema is None:
                txn.put(b"schema", _SCHEMA, db=meta)
            elif schema != _SCHEMA:
                raise RuntimeError(f"queue database schema {schema!r}, expected {_SCHEMA!r}")
        self._db = dbs
        self._map_size: int = self._env.info()["map_size"]
        self._psize: int = self._env.stat()["psize"]
        # set_mapsize needs no transaction open in this process: readers take this lock.
        self._resize_lock = threading.Lock()
        self._ops: thread_queue.SimpleQueue[_Op | None] = thread_queue.SimpleQueue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._map_full = False
        self._refused_size = 0
        self._disk_checked = 0.0
        self._disk_low = False
        self._closed = False
        self._writer_lost = False
        #: The lowest due key committed since take_due_low() last looked, and the lowest
        #: of the batch being applied (writer thread only).
        self._due_low: bytes | None = None
        self._due_low_lock = threading.Lock()
        self._batch_due_low: bytes | None = None
        self._writer: threading.Thread | None = None
        self._process: WriterProcess | None = None
        if writer == "thread":
            self._writer = threading.Thread(target=self._run_writer,
                                            name="ferry-queue-writer", daemon=True)
            self._writer.start()
        elif writer == "process":
            from engine.queue.writer_process import WriterProcess

            self._process = WriterProcess(self, {
                "path": str(self.path), "durability": durability, "map_size": map_size,
                "max_map_size": max_map_size, "min_free_disk": min_free_disk,
                "batch_limit": batch_limit, "batch_bytes": batch_bytes,
                "disk_check_interval": disk_check_interval})
        # writer="none": the writer process's own store; its loop calls _commit_batch.

    # --- the caller's side -----------------------------------------------------------

    def describe(self) -> str:
        """The startup log line: where, which durability mode and what it means."""
        return (f"queue database {self.path} (LMDB, durability={self.durability}: "
                f"{DURABILITY_MODES[self.durability]}; map {self._map_size >> 20} MiB, "
                f"{self.count()} messages)")

    def pressure(self) -> BackPressure | None:
        if self._closed:
            return BackPressure("queue database is shutting down")
        if self._writer_lost:
            return BackPressure("queue writer is gone")
        if self._map_full:
            return BackPressure("queue database is full")
        if self._pending >= self.max_pending:
            return BackPressure("queue writer is behind")
        if self._check_disk():
            return BackPressure("disk space low")
        return None

    async def enqueue(self, envelope: Envelope, body: bytes) -> bytes:
        self._admit(envelope, body)
        result: bytes = await self._submit_async("enqueue", (envelope, body), len(body))
        envelope.queue_id = result  # as the writer did (it may run in another process)
        return result

    def enqueue_sync(self, envelope: Envelope, body: bytes) -> bytes:
        """``enqueue`` for threads without an event loop (tools, the crash test)."""
        self._admit(envelope, body)
        result: bytes = self._submit_sync("enqueue", (envelope, body), len(body))
        envelope.queue_id = result
        return result

    def _admit(self, envelope: Envelope, body: bytes) -> None:
        """Refuse new mail under back pressure; otherwise complete the envelope."""
        problem = self.pressure()
        if problem is not None:
            raise problem
        if not envelope.size:
            envelope.size = len(body)

    async def record(
        self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
    ) -> None:
        await self.record_soon(outcomes, new_messages)

    def record_soon(
        self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
    ) -> asyncio.Future[None]:
        """``record`` handed to the writer now, for a caller that hangs work on the commit
        instead of waiting in a task; QueueClosed is raised at once."""
        size = sum(len(m.body) for m in new_messages)
        return self._submit_soon("record", (tuple(outcomes), tuple(new_messages)), size)

    def record_sync(
        self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
    ) -> None:
        size = sum(len(m.body) for m in new_messages)
        self._submit_sync("record", (tuple(outcomes), tuple(new_messages)), size)

    async def quarantine(self, queue_id: bytes, reason: str, due_key: bytes = b"") -> None:
        await self._submit_async("quarantine", (queue_id, reason, due_key), 0)

    async def close(self) -> None:
        """Finish every write handed over, stop the writer, close the environment."""
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ops.put(None)
        if self._writer is not None:
            self._writer.join()
        if self._process is not None:
            self._process.join()
        self._env.close()

    # --- reads (any thread) ----------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._resize_lock, self._begin() as txn:
            yield txn

    def _begin(self) -> Any:
        """A read transaction (the caller holds ``_resize_lock``)."""
        try:
            return self._env.begin(buffers=False)
        except lmdb.MapResizedError:
            # The writer process grew the map: adopt its size (LMDB: set_mapsize(0)).
            self._env.set_mapsize(0)
            self._map_size = self._env.info()["map_size"]
            return self._env.begin(buffers=False)

    def _get(self, key: bytes, *dbs: str) -> list[bytes | None]:
        """``key``'s value in each table, in one short read transaction (the delivery hot
        path: without _read()'s generator-based context manager)."""
        with self._resize_lock:
            txn = self._begin()
            try:
                found: list[bytes | None] = [txn.get(key, db=self._db[db]) for db in dbs]
            finally:
                txn.abort()
        return found

    def get(self, queue_id: bytes) -> Envelope:
        """The envelope; KeyError when absent, RecordError when it does not decode."""
        (raw,) = self._get(queue_id, "envelopes")
        if raw is None:
            raise KeyError(id_text(queue_id))
        return decode(queue_id, raw)

    def get_with_body(self, queue_id: bytes) -> tuple[Envelope, bytes]:
        """``get`` and ``body`` in one read transaction (the delivery hot path)."""
        raw, body = self._get(queue_id, "envelopes", "bodies")
        if raw is None or body is None:
            raise KeyError(id_text(queue_id))
        return decode(queue_id, raw), body

    def body(self, queue_id: bytes) -> bytes:
        (raw,) = self._get(queue_id, "bodies")
        if raw is None:
            raise KeyError(id_text(queue_id))
        return bytes(raw)

    def due(self, until: float, limit: int, after: bytes = b"") -> list[DueEntry]:
        """Up to ``limit`` (message, hop) groups due by ``until``, after key ``after``."""
        return self.due_scan(until, limit, after, ())[0]

    def due_scan(
        self, until: float, limit: int, after: bytes, held: Container[bytes]
    ) -> tuple[list[DueEntry], bytes]:
        """``due`` without the groups in ``held``, and the last key looked at.

        Held groups are skipped on the raw key, before anything is decoded: the active
        window starts over past tens of thousands of them."""
        stop = _DUE.pack(max(0, int(until * 1000)))
        found: list[DueEntry] = []
        last = after
        with self._read() as txn:
            cur = txn.cursor(self._db["due"])
            ok = cur.set_range(after) if after else cur.first()
            if ok and after and cur.key() == after:
                ok = cur.next()
            while ok and len(found) < limit:
                key = cur.key()
                if key[:8] > stop:
                    break
                last = key
                if key[8:] not in held:
                    found.append(DueEntry(_DUE.unpack(key[:8])[0] / 1000, key[8:8 + ID_LEN],
                                          key[8 + ID_LEN:].decode(), key))
                ok = cur.next()
        return found, last

    def take_due_low(self) -> bytes | None:
        with self._due_low_lock:
            low, self._due_low = self._due_low, None
        return low

    def _prefixed(self, db: str, prefix: bytes, limit: int, after: bytes) -> list[bytes]:
        found: list[bytes] = []
        with self._read() as txn:
            cur = txn.cursor(self._db[db])
            start = prefix + after if after else prefix
            ok = cur.set_range(start)
            if ok and after and cur.key() == start:
                ok = cur.next()
            while ok and len(found) < limit:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                found.append(key[len(prefix):])
                ok = cur.next()
        return found

    def ids_for_hop(self, next_hop: str, limit: int, after: bytes = b"") -> list[bytes]:
        return self._prefixed("hops", next_hop.encode() + _SEP, limit, after)

    def ids_in_state(self, state: str, limit: int, after: bytes = b"") -> list[bytes]:
        return self._prefixed("states", state.encode() + _SEP, limit, after)

    def corrupt(self) -> list[tuple[bytes, str]]:
        with self._read() as txn:
            items = [(bytes(k), bytes(v).decode(errors="replace"))
                     for k, v in txn.cursor(self._db["corrupt"])]
        return items

    def count(self) -> int:
        with self._read() as txn:
            n: int = txn.stat(self._db["envelopes"])["entries"]
        return n

    def scan_corrupt(self) -> list[tuple[bytes, str]]:
        """Decode every record (a full check, for ``ferry queue check``): the bad ones."""
        bad: list[tuple[bytes, str]] = []
        with self._read() as txn:
            for key, raw in txn.cursor(self._db["envelopes"]):
                try:
                    decode(bytes(key), raw)
                except RecordError as exc:
                    bad.append((bytes(key), str(exc)))
        return bad

    # --- handing work to the writer --------------------------------------------------

    def _submit(self, op: _Op) -> None:
        if self._closed or self._writer_lost:
            raise QueueClosed("queue database is closed")
        with self._pending_lock:
            self._pending += 1
        self._ops.put(op)

    def _submit_soon(self, kind: str, args: tuple[Any, ...], size: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submit(_Op(kind, args, loop, future, size))
        return future

    async def _submit_async(self, kind: str, args: tuple[Any, ...], size: int) -> Any:
        return await self._submit_soon(kind, args, size)

    def _submit_sync(self, kind: str, args: tuple[Any, ...], size: int) -> Any:
        future: Future[Any] = Future()
        self._submit(_Op(kind, args, None, future, size))
        return future.result()

    # --- the writer thread -----------------------------------------------------------

    def _run_writer(self) -> None:
        for batch, size in self.batches():
            self.settle(self._commit_batch(batch, size))

    def batches(self) -> Iterator[tuple[list[_Op], int]]:
        """What callers handed over, a batch at a time (everything waiting, up to the
        batch limits), until close."""
        stop = False
        while not stop:
            first = self._ops.get()
            batch: list[_Op] = []
            size = 0
            item: _Op | None = first
            while item is not None:
                batch.append(item)
                size += item.size
                if len(batch) >= self.batch_limit or size >= self.batch_bytes:
                    break
                try:
                    item = self._ops.get_nowait()
                except thread_queue.Empty:
                    break
            else:
                stop = True
            if batch:
                yield batch, size

    # --- the writer process's reports (engine.queue.writer_process) --------------------

    @property
    def closing(self) -> bool:
        return self._closed

    def writer_lost(self) -> None:
        """The writer process died: refuse new work (nothing acknowledged depends on it)."""
        self._writer_lost = True

    def state(self) -> dict[str, Any]:
        """What the writer process reports with every answer (see ``absorb``)."""
        st = self.stats
        return {"map_full": self._map_full, "map_size": self._map_size,
                "due_low": self.take_due_low(),
                "stats": (st.commits, st.enqueued, st.outcomes, st.last_commit_seconds,
                          st.map_grown)}

    def absorb(self, state: dict[str, Any]) -> None:
        """The writer process's report, taken in on the server's side."""
        self._map_full = state["map_full"]
        self._map_size = state["map_size"]
        self.stats = _Stats(*state["stats"])
        low = state["due_low"]
        if low is not None:
            with self._due_low_lock:
                if self._due_low is None or low < self._due_low:
                    self._due_low = low

    def settle(self, results: list[tuple[_Op, Any, BaseException | None]]) -> None:
        """The writer is done with these: wake their callers."""
        with self._pending_lock:
            self._pending -= len(results)
        self._resolve(results)

    def _commit_batch(
        self, batch: list[_Op], size: int
    ) -> list[tuple[_Op, Any, BaseException | None]]:
        started = time.monotonic()
        refused: BackPressure | None = None
        # New bytes (mail, or DSNs riding on outcomes) need room; outcomes alone free it.
        if size and (self._check_disk(force=True) or not self._make_room(size)):
            refused = BackPressure("disk space low" if self._disk_low
                                   else "queue database is full")
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            results = self._apply(batch, refused)
        except lmdb.MapFullError:
            # The estimate missed: refuse what adds bytes, keep what frees space.
            self._map_full = True
            refused = BackPressure("queue database is full")
            try:
                results = self._apply(batch, refused)
            except lmdb.Error as exc:
                results = [(op, None, exc) for op in batch]
        except lmdb.Error as exc:
            results = [(op, None, exc) for op in batch]
        if refused is not None:
            self._refused_size = max(size, 1)
        elif self._map_full:
            # Delivered mail frees pages: look again, so "full" clears without a restart
            # once a batch like the refused one would fit (no flapping at the edge).
            self._make_room(self._refused_size)
        self.stats.commits += 1
        self.stats.last_commit_seconds = time.monotonic() - started
        return results

    def _apply(
        self, batch: list[_Op], refused: BackPressure | None
    ) -> list[tuple[_Op, Any, BaseException | None]]:
        """Run the batch in one write transaction; ``refused`` fails every op that adds
        bytes (enqueues, and outcomes that carry new messages) and nothing else."""
        results: list[tuple[_Op, Any, BaseException | None]] = []
        self._batch_due_low = None
        with self._env.begin(write=True) as txn:
            for op in batch:
                if refused is not None and op.size:
                    results.append((op, None, refused))
                elif op.kind == "enqueue":
                    env, body = op.args
                    results.append((op, self._put_new(txn, env, body), None))
                elif op.kind == "record":
                    self._apply_outcomes(txn, *op.args)
                    results.append((op, None, None))
                elif op.kind == "setting":
                    self._put_setting(txn, *op.args)
                    results.append((op, None, None))
                else:
                    self._quarantine(txn, *op.args)
                    results.append((op, None, None))
        # Leaving the with-block committed the transaction (and synced, in fsync mode).
        low = self._batch_due_low
        if low is not None:
            with self._due_low_lock:
                if self._due_low is None or low < self._due_low:
                    self._due_low = low
        return results

    def _put_new(self, txn: Any, env: Envelope, body: bytes) -> bytes:
        # The receive service may pick the id first (it goes into the Received field).
        qid = env.queue_id or new_id()
        env.queue_id = qid
        if not env.size:
            env.size = len(body)
        db = self._db
        # append=True: ids grow with time, so the new key goes at the end of the B-tree.
        if not txn.put(qid, body, db=db["bodies"], append=True, overwrite=False):
            txn.put(qid, body, db=db["bodies"], overwrite=False)
        txn.put(qid, encode(env), db=db["envelopes"])
        self._write_indexes(txn, _NO_KEYS, env)
        self.stats.enqueued += 1
        return qid

    def _apply_outcomes(
        self, txn: Any, outcomes: tuple[Outcome, ...],
        new_messages: tuple[NewMessage, ...],
    ) -> None:
        by_message: dict[bytes, list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            by_message[outcome.queue_id].append(outcome)
        db = self._db
        for qid, items in by_message.items():
            raw = txn.get(qid, db=db["envelopes"])
            if raw is None:
                continue  # already final and gone (a duplicate report after a retry)
            try:
                new = decode(qid, raw)
            except RecordError as exc:
                self._quarantine(txn, qid, str(exc), b"")
                continue
            before = index_keys(new)
            for o in items:
                if o.delay_notified:
                    new.delay_notified = True
                if not 0 <= o.recipient < len(new.recipients):
                    continue  # not a recipient of this message: nothing to record
                r = new.recipients[o.recipient]
                if r.final:
                    continue
                r.state = o.state
                r.last_reply = o.reply or r.last_reply
                r.due = o.due if o.state is RcptState.DEFERRED else r.due
                if o.attempted:
                    r.attempts += 1
            if new.final:
                self._write_indexes(txn, before, None)
                txn.delete(qid, db=db["envelopes"])
                txn.delete(qid, db=db["bodies"])
            else:
                txn.put(qid, encode(new), db=db["envelopes"])
                self._write_indexes(txn, before, new)
            self.stats.outcomes += len(items)
        for message in new_messages:
            self._put_new(txn, message.envelope, message.body)

    def _write_indexes(self, txn: Any, before: IndexKeys, new: Envelope | None) -> None:
        """Replace a message's index entries (``before``) with those ``new`` needs."""
        after = index_keys(new) if new is not None else _NO_KEYS
        for name, was, now in zip(("due", "hops", "states"), before, after, strict=True):
            db = self._db[name]
            for key in was - now:
                txn.delete(key, db=db)
            added = now - was
            for key in added:
                txn.put(key, b"", db=db)
            if added and name == "due":
                low = min(added)
                if self._batch_due_low is None or low < self._batch_due_low:
                    self._batch_due_low = low

    def _quarantine(self, txn: Any, qid: bytes, reason: str, dkey: bytes) -> None:
        db = self._db
        if dkey:
            txn.delete(dkey, db=db["due"])
        txn.put(qid, reason.encode(errors="replace")[:2000], db=db["corrupt"])
        txn.put(CORRUPT.encode() + _SEP + qid, b"", db=db["states"])

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
        self.stats.map_grown += 1
        return self._make_room(incoming)

    def _check_disk(self, force: bool = False) -> bool:
        """True when free disk is below ``min_free_disk`` (statvfs at most once an interval)."""
        now = time.monotonic()
        if force or now - self._disk_checked >= self.disk_check_interval:
            st = os.statvfs(self.path)
            self._disk_low = st.f_bavail * st.f_frsize < self.min_free_disk
            self._disk_checked = now
        return self._disk_low

    # --- waking the callers ----------------------------------------------------------

    @staticmethod
    def _resolve(results: list[tuple[_Op, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, Any, BaseException | None]]]
        by_loop = defaultdict(list)
        for item in results:
            op, value, error = item
            if op.loop is None:
                future = op.future
                if future is None:
                    continue
                assert isinstance(future, Future)
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
            else:
                by_loop[op.loop].append(item)
        for loop, items in by_loop.items():
            # One wake-up per loop per commit, not one per message.
            with suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, items)

    # --- settings kept with the queue --------------------------------------------------

    def setting(self, name: str) -> bytes | None:
        """A value stored with :meth:`save_setting`, None when there is none."""
        (value,) = self._get(_SETTING + name.encode(), "meta")
        return value

    async def save_setting(self, name: str, value: bytes) -> None:
        """Store ``value`` under ``name`` durably (through the writer, like every write);
        the bytes mean nothing to the queue."""
        await self._submit_async("setting", (name, value), 0)

    def _put_setting(self, txn: Any, name: str, value: bytes) -> None:
        txn.put(_SETTING + name.encode(), value, db=self._db["meta"])


def _settle(items: list[tuple[_Op, Any, BaseException | None]]) -> None:
    for op, value, error in items:
        future = op.future
        if future is None or future.done():
            continue  # the caller was cancelled; the commit stands (at-least-once)
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


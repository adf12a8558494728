"""The queue database on LMDB, the caller's side: what the rest of the engine holds.

``LmdbQueue`` implements ``engine.queue.api.QueueStore``.  Reads (``get``, ``body``, the
indexes) run here, in the caller's thread, in short read transactions: LMDB readers never
block the writer, across processes too.  Writes are handed to the store's one
``engine.queue.writer.Writer`` (a thread, or the process ``ferry serve`` uses), which
commits them in groups (``engine.queue.lmdb_txn``: the layout, the index keys, what one
commit does) and settles each caller only after the commit that holds its write.

Durability modes: ``fsync`` (default) syncs every commit: an acknowledged message survives
power loss.  ``os`` leaves the flush to the OS: it survives a crash of the process, not of
the machine.

Back pressure: the map grows (doubling, up to ``max_map_size``) before it can fill; at the
maximum, with free disk below ``min_free_disk``, or with more than ``max_pending`` writes
waiting, ``enqueue`` raises BackPressure.  Outcomes are still applied (they free space).

This module must never know SMTP, write outside the writer, or hold per-message state in
memory.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Container, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from engine.ops.figures import Histogram
from engine.queue.api import (
    BackPressure,
    Change,
    DueEntry,
    Idempotency,
    NewMessage,
    Outcome,
    QueueStats,
)
from engine.queue.lmdb_txn import (
    COMMIT_LINGER,
    DUE,
    DURABILITY_MODES,
    SEP,
    SETTING,
    Database,
    WriterParams,
    completed,
    mib,
)
from engine.queue.records import ID_LEN, Envelope, RecordError, decode, id_text
from engine.queue.writer import Pending, Writer, WriterKind, start_writer


class LmdbQueue:
    """The LMDB queue database (see the module docstring).  ``writer`` is ``thread``
    (tools and tests) or ``process`` (the server: ``engine.queue.writer_process``)."""

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
        commit_linger: float = COMMIT_LINGER,
        writer: WriterKind = "thread",
    ) -> None:
        params = WriterParams(
            str(path), durability=durability, map_size=map_size, max_map_size=max_map_size,
            min_free_disk=min_free_disk, batch_limit=batch_limit, batch_bytes=batch_bytes,
            disk_check_interval=disk_check_interval, commit_linger=commit_linger)
        self.path = Path(path)
        self.durability = durability
        self.max_pending = max_pending
        self.max_map_size = max_map_size
        self._database = db = Database(params)
        self._env = db.env
        self._db = db.tables
        # set_mapsize needs no transaction open in this process: readers take this lock.
        self._resize_lock = db.resize_lock
        self._disk = db.disk
        self._closed = False
        try:
            self._writer: Writer = start_writer(writer, db, params)
        except BaseException:
            db.close()
            raise

    @property
    def writer_pid(self) -> int:
        """The process the commits run in (this one, with a writer thread)."""
        return self._writer.pid

    @property
    def pending(self) -> int:
        """Writes handed to the writer and not yet settled (back pressure counts them)."""
        return self._writer.pending

    @property
    def min_free_disk(self) -> int:
        return self._database.disk.min_free

    @min_free_disk.setter
    def min_free_disk(self, value: int) -> None:
        """A new floor (the writer thread shares it; a writer process keeps its own)."""
        self._database.disk.min_free = value

    @property
    def disk_check_interval(self) -> float:
        return self._database.disk.interval

    @disk_check_interval.setter
    def disk_check_interval(self, value: float) -> None:
        self._database.disk.interval = value

    @property
    def stats(self) -> QueueStats:
        return self._writer.report.stats

    @property
    def commit_figures(self) -> tuple[Histogram, Histogram]:
        """The writer's commit round trips (seconds) and writes per commit, for metrics."""
        return self._writer.commit_seconds, self._writer.commit_writes

    def describe(self) -> str:
        """The startup log line: where, which durability mode and what it means."""
        return (f"queue database {self.path} (LMDB, durability={self.durability}: "
                f"{DURABILITY_MODES[self.durability]}; map {self.stats.map_size >> 20} MiB, "
                f"{self.count()} messages)")

    def pressure(self) -> BackPressure | None:
        if self._closed:
            return BackPressure("queue database is shutting down")
        writer = self._writer
        if writer.lost is not None:
            return BackPressure("queue writer is gone")
        # The figures are worked out only here, on the refusing side.
        if writer.report.map_full:
            return BackPressure("queue database is full",
                                f"map {mib(writer.report.stats.map_size)}, "
                                f"queue.max_map_size {mib(self.max_map_size)}")
        if writer.pending >= self.max_pending:
            return BackPressure("queue writer is behind",
                                f"{writer.pending} writes waiting, queue.max_pending "
                                f"{self.max_pending}")
        if self._disk.low():
            return BackPressure("disk space low", self._disk.figures())
        return None

    async def enqueue(self, envelope: Envelope, body: bytes) -> bytes:
        self._admit(envelope, body)
        result: bytes = await self._submit_soon("enqueue", (envelope, body), len(body))
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
        size = sum(m.size for m in new_messages)
        return self._submit_soon("record", (tuple(outcomes), tuple(new_messages)), size)

    def record_sync(
        self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
    ) -> None:
        size = sum(m.size for m in new_messages)
        self._submit_sync("record", (tuple(outcomes), tuple(new_messages)), size)

    async def change(self, changes: Sequence[Change]) -> list[int | None]:
        """Whole-message changes (hold, release, remove, poison...) in one commit."""
        result: list[int | None] = await self._submit_soon(
            "change", (tuple(changes),), _change_size(changes))
        return result

    def change_sync(self, changes: Sequence[Change]) -> list[int | None]:
        """``change`` for threads without an event loop (tools, tests)."""
        result: list[int | None] = self._submit_sync(
            "change", (tuple(changes),), _change_size(changes))
        return result

    async def inject(self, messages: Sequence[NewMessage],
                     idempotency: Idempotency | None = None) -> bytes | None:
        """Store ``messages`` in one write (one commit), with ``idempotency``'s key; the
        key's earlier answer instead when it is stored already (see QueueStore)."""
        problem = self.pressure()
        if problem is not None:
            raise problem
        entries = tuple(map(completed, messages))
        answer: bytes | None = await self._submit_soon(
            "inject", (entries, idempotency), sum(m.size for m in messages))
        return answer

    def idempotent_answer(self, key: bytes) -> bytes | None:
        (found,) = self._get(b"k" + key, "idempotency")
        if found is None or DUE.unpack(found[:8])[0] <= int(time.time() * 1000):
            return None
        return bytes(found[8:])

    async def quarantine(self, queue_id: bytes, reason: str, due_key: bytes = b"") -> None:
        await self._submit_soon("quarantine", (queue_id, reason, due_key), 0)

    async def close(self) -> None:
        """Finish every write handed over, stop the writer, close the environment."""
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._database.close()

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
        stop = DUE.pack(max(0, int(until * 1000)))
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
                    found.append(DueEntry(DUE.unpack(key[:8])[0] / 1000, key[8:8 + ID_LEN],
                                          key[8 + ID_LEN:].decode(), key))
                ok = cur.next()
        return found, last

    def take_due_low(self) -> bytes | None:
        return self._writer.take_due_low()

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
        return self._prefixed("hops", next_hop.encode() + SEP, limit, after)

    def hop_depth(self, next_hop: str) -> tuple[int, bytes | None]:
        """Messages with a recipient waiting for ``next_hop`` (any state but final), and
        the oldest one's id (ids are time-ordered; None when there is none): the hops
        index's keys under it, no record decoded.  It walks them all: call it from a
        thread when there may be many (engine.ops.alerts)."""
        prefix = next_hop.encode() + SEP
        count, oldest = 0, None
        with self._read() as txn:
            cur = txn.cursor(self._db["hops"])
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    if oldest is None:
                        oldest = key[-ID_LEN:]
                    count += 1
        return count, oldest

    def hop_depths(self) -> dict[str, tuple[int, bytes]]:
        """:meth:`hop_depth` of every next hop with mail waiting, in one walk of the whole
        hops index (one key per message and next hop): from a thread."""
        found: dict[str, tuple[int, bytes]] = {}
        hop, count, oldest = b"", 0, b""
        with self._read() as txn:
            for key in txn.cursor(self._db["hops"]).iternext(keys=True, values=False):
                name = key[:-ID_LEN - len(SEP)]
                if name != hop:
                    if count:
                        found[hop.decode()] = (count, oldest)
                    hop, count, oldest = name, 0, key[-ID_LEN:]
                count += 1
        if count:
            found[hop.decode()] = (count, oldest)
        return found

    def oldest(self) -> bytes | None:
        """The id of the oldest message in the queue (the first key: ids are time-ordered),
        None when it is empty; one cursor step."""
        with self._read() as txn:
            cur = txn.cursor(self._db["envelopes"])
            return bytes(cur.key()) if cur.first() else None

    def ids_in_state(self, state: str, limit: int, after: bytes = b"") -> list[bytes]:
        return self._prefixed("states", state.encode() + SEP, limit, after)

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

    def _submit_soon(self, kind: str, args: tuple[Any, ...], size: int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # The writer refuses (QueueClosed) once the store is closing.
        self._writer.submit(Pending(kind, args, size, loop, future))
        return future

    def _submit_sync(self, kind: str, args: tuple[Any, ...], size: int) -> Any:
        future: Future[Any] = Future()
        self._writer.submit(Pending(kind, args, size, None, future))
        return future.result()

    # --- settings kept with the queue --------------------------------------------------

    def setting(self, name: str) -> bytes | None:
        """A value stored with :meth:`save_setting`, None when there is none."""
        (value,) = self._get(SETTING + name.encode(), "meta")
        return value

    async def save_setting(self, name: str, value: bytes) -> None:
        """Store ``value`` under ``name`` durably (through the writer, like every write);
        the bytes mean nothing to the queue."""
        await self._submit_soon("setting", (name, value), 0)

    # --- webhook events kept with the queue (engine.ops.webhooks) ----------------------

    def hooks_soon(self, puts: Sequence[tuple[bytes, bytes]], deletes: Sequence[bytes] = (),
                   trims: Sequence[tuple[bytes, int]] = ()) -> asyncio.Future[Any]:
        """Store webhook events (key, bytes), delete sent ones, drop the oldest of a
        backlog, in the next group commit (see ``lmdb_txn.Committer._apply_hooks``); the
        future is done with the commit (BackPressure when new events find no room)."""
        size = sum(len(k) + len(v) for k, v in puts)
        return self._submit_soon("hooks", (tuple(puts), tuple(deletes), tuple(trims)), size)

    def hook_events(self, name: str, limit: int) -> list[tuple[bytes, bytes]]:
        """The oldest ``limit`` events waiting for webhook ``name``: (key, event)."""
        prefix = hook_prefix(name)
        found: list[tuple[bytes, bytes]] = []
        with self._read() as txn:
            cur = txn.cursor(self._db["webhooks"])
            ok = cur.set_range(prefix)
            while ok and len(found) < limit:
                key = cur.key()
                if not key.startswith(prefix):
                    break
                found.append((key, cur.value()))
                ok = cur.next()
        return found

    def hook_counts(self) -> dict[str, int]:
        """The events waiting per webhook name (reads every key: at start, and for
        ``ferry queue queues`` on a stopped spool; not on the event loop)."""
        counts: dict[str, int] = {}
        with self._read() as txn:
            for key in txn.cursor(self._db["webhooks"]).iternext(values=False):
                name = key[:key.index(SEP)].decode(errors="replace")
                counts[name] = counts.get(name, 0) + 1
        return counts


    # --- the suppression list kept with the queue (engine.queue.suppression) -----------

    def suppress_soon(self, puts: Sequence[tuple[bytes, bytes]],
                      deletes: Sequence[bytes] = ()) -> asyncio.Future[tuple[bool, ...]]:
        """Store suppression entries (address, bytes) and delete others in the next group
        commit; the future is done with the commit, with which deletes found an entry
        (BackPressure when new entries find no room)."""
        size = sum(len(k) + len(v) for k, v in puts)
        return self._submit_soon("suppress", (tuple(puts), tuple(deletes)), size)

    def suppress_sync(self, puts: Sequence[tuple[bytes, bytes]],
                      deletes: Sequence[bytes] = ()) -> tuple[bool, ...]:
        """:meth:`suppress_soon` for a tool on a stopped spool: returns after the commit."""
        size = sum(len(k) + len(v) for k, v in puts)
        result: tuple[bool, ...] = self._submit_sync("suppress", (tuple(puts), tuple(deletes)),
                                                     size)
        return result

    def suppressed(self) -> list[tuple[bytes, bytes]]:
        """Every suppression entry (address, bytes), in address order (read in one
        transaction: at start, and by the tools; not on the event loop)."""
        with self._read() as txn:
            return list(txn.cursor(self._db["suppressed"]).iternext())

    def suppressed_entry(self, address: bytes) -> bytes | None:
        (value,) = self._get(address, "suppressed")
        return value


def hook_prefix(name: str) -> bytes:
    """Where the events of webhook ``name`` are in the ``webhooks`` table."""
    return name.encode() + SEP


def _change_size(changes: Sequence[Change]) -> int:
    """The bytes the changes add (the reports riding on removals): back pressure may
    refuse those, never the changes that add none."""
    return sum(m.size for c in changes for m in c.new_messages)

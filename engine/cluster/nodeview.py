"""The queue viewer and the admin API over every shard of a node (``engine.cluster.shards``).

- :class:`ShardedQueue`: the read side of the ``QueueStore`` interface over several
  shards' queue databases, so every reader written for one queue (``engine.ops.select``,
  ``engine.ops.views``, ``ferry queue list / show / stats / export``) reads the node's.
  A message lives in exactly one shard (the worker that took it queued it there); ids are
  time-ordered and unique across workers (``engine.queue.records.new_id``: a per-process
  tag), so the shards' index pages merge by id into one order, as one database's would.
  Its writing methods raise :class:`ReadOnly`: a shard is written by its own worker only.
- :func:`open_shards`: every shard of a spool, opened to read (``ferry queue`` on a
  running node or a stopped one).
- :class:`NodeOperations`: ``engine.ops.operations.Operations`` for a worker's admin API
  on a node of several workers: the views read every shard (:class:`ShardedQueue`, the
  tracking logs of every shard), the verbs and the scheduler's views go through the
  node's control channel (``engine.cluster.fanout.NodeControl``, the supervisor's
  socket), so they act on and answer for every worker as ``ferry queue`` does.

It must never write a shard nor decide anything about delivery.
"""

from __future__ import annotations

import asyncio
import heapq
import threading
from collections.abc import Callable, Container, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Final, TypeVar

from engine.cluster.shards import shard_indexes, shard_spool
from engine.ops import control
from engine.ops.operations import (
    MAX_IDS,
    NotFound,
    OperationError,
    Operations,
    tracking_page,
)
from engine.ops.tracksearch import Query, search
from engine.queue.api import (
    BackPressure,
    Change,
    DueEntry,
    Idempotency,
    NewMessage,
    Outcome,
    QueueStats,
)
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, id_text

_T = TypeVar("_T")

#: How long the admin API waits for the node's control channel (a verb on many messages
#: waits for every worker's commits).
NODE_TIMEOUT: Final = 300.0


class ReadOnly(RuntimeError):
    """A write asked of a :class:`ShardedQueue`: each shard is written by its worker."""


class ShardedQueue:
    """The read side of ``QueueStore`` over ``shards`` (index, store), in shard order;
    :meth:`close` closes those of ``owned`` (the ones it opened)."""

    def __init__(self, shards: Sequence[tuple[int, LmdbQueue]],
                 owned: Container[int] = ()) -> None:
        self.shards = list(shards)
        self._owned = owned

    def _first(self, read: Callable[[LmdbQueue], _T], queue_id: bytes) -> _T:
        """``read`` of the shard that holds ``queue_id`` (KeyError in every other)."""
        for _, store in self.shards:
            try:
                return read(store)
            except KeyError:
                continue
        raise KeyError(queue_id)

    # --- reads -----------------------------------------------------------------------

    def get(self, queue_id: bytes) -> Envelope:
        return self._first(lambda s: s.get(queue_id), queue_id)

    def body(self, queue_id: bytes) -> bytes:
        return self._first(lambda s: s.body(queue_id), queue_id)

    def get_with_body(self, queue_id: bytes) -> tuple[Envelope, bytes]:
        return self._first(lambda s: s.get_with_body(queue_id), queue_id)

    def ids_for_hop(self, next_hop: str, limit: int, after: bytes = b"") -> list[bytes]:
        return _merged([s.ids_for_hop(next_hop, limit, after) for _, s in self.shards], limit)

    def ids_in_state(self, state: str, limit: int, after: bytes = b"") -> list[bytes]:
        return _merged([s.ids_in_state(state, limit, after) for _, s in self.shards], limit)

    def due(self, until: float, limit: int, after: bytes = b"") -> list[DueEntry]:
        entries = heapq.merge(*(s.due(until, limit, after) for _, s in self.shards),
                              key=lambda e: e.key)
        return list(islice(entries, limit))

    def corrupt(self) -> list[tuple[bytes, str]]:
        return [c for _, s in self.shards for c in s.corrupt()]

    def scan_corrupt(self) -> list[tuple[bytes, str]]:
        return [c for _, s in self.shards for c in s.scan_corrupt()]

    def count(self) -> int:
        return sum(s.count() for _, s in self.shards)

    def setting(self, name: str) -> bytes | None:
        """Shard 0's (the node's settings, e.g. the suspended destinations, are the same
        in every shard: each worker is told each change)."""
        return self.shards[0][1].setting(name) if self.shards else None

    def hook_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, store in self.shards:
            for name, n in store.hook_counts().items():
                counts[name] = counts.get(name, 0) + n
        return counts

    def oldest(self) -> bytes | None:
        return min((o for _, s in self.shards if (o := s.oldest()) is not None), default=None)

    def hop_depth(self, next_hop: str) -> tuple[int, bytes | None]:
        depths = [s.hop_depth(next_hop) for _, s in self.shards]
        return (sum(n for n, _ in depths),
                min((o for _, o in depths if o is not None), default=None))

    def hop_depths(self) -> dict[str, tuple[int, bytes]]:
        depths: dict[str, tuple[int, bytes]] = {}
        for _, store in self.shards:
            for hop, (n, oldest) in store.hop_depths().items():
                have = depths.get(hop)
                depths[hop] = (n, oldest) if have is None else (have[0] + n,
                                                                min(have[1], oldest))
        return depths

    @property
    def stats(self) -> QueueStats:
        """Shard 0's writer figures (a node's are in its control channel's ``stats``)."""
        return self.shards[0][1].stats if self.shards else QueueStats()

    def pressure(self) -> BackPressure | None:
        return None

    def describe(self) -> str:
        return "shards " + ", ".join(f"{i}: {s.path}" for i, s in self.shards)

    def idempotent_answer(self, key: bytes) -> bytes | None:
        return None

    def due_scan(self, until: float, limit: int, after: bytes, held: Container[bytes]
                 ) -> tuple[list[DueEntry], bytes]:
        raise ReadOnly("the node's view does not schedule")

    def take_due_low(self) -> bytes | None:
        return None

    # --- writes: never (each shard's worker writes it) --------------------------------

    async def enqueue(self, envelope: Envelope, body: bytes) -> bytes:
        raise ReadOnly("a node's shards are written by their workers")

    async def record(self, outcomes: Sequence[Outcome],
                     new_messages: Sequence[NewMessage] = ()) -> None:
        raise ReadOnly("a node's shards are written by their workers")

    def record_soon(self, outcomes: Sequence[Outcome], new_messages: Sequence[NewMessage] = ()
                    ) -> asyncio.Future[None]:
        raise ReadOnly("a node's shards are written by their workers")

    async def change(self, changes: Sequence[Change]) -> list[int | None]:
        raise ReadOnly("a node's shards are written by their workers")

    async def inject(self, messages: Sequence[NewMessage],
                     idempotency: Idempotency | None = None) -> bytes | None:
        raise ReadOnly("a node's shards are written by their workers")

    async def quarantine(self, queue_id: bytes, reason: str, due_key: bytes = b"") -> None:
        raise ReadOnly("a node's shards are written by their workers")

    async def save_setting(self, name: str, value: bytes) -> None:
        raise ReadOnly("a node's shards are written by their workers")

    # --- closing -----------------------------------------------------------------------

    def close_sync(self) -> None:
        for index, store in self.shards:
            if index in self._owned:
                store.close_sync()

    async def close(self) -> None:
        self.close_sync()


def _merged(pages: Sequence[list[bytes]], limit: int) -> list[bytes]:
    """Index pages of several shards (each in id order, after the same key) as one page."""
    return list(islice(heapq.merge(*pages), limit))


def open_store(spool: Path) -> LmdbQueue | None:
    """The queue database of one shard's spool, opened to read; None when it has none."""
    path = Path(spool) / "queue"
    if not (path / "data.mdb").exists():
        return None
    return LmdbQueue(path, min_free_disk=0)


def open_shards(spool: Path, have: Sequence[tuple[int, LmdbQueue]] = ()) -> ShardedQueue:
    """Every shard of ``spool`` with a queue database (``shard_indexes``), those of
    ``have`` as given (already open in this process: LMDB opens an environment once per
    process) and the others opened here.  OSError or lmdb.Error when one cannot be
    opened (the ones opened so far are closed)."""
    given = dict(have)
    shards: list[tuple[int, LmdbQueue]] = []
    owned: set[int] = set()
    try:
        for index in shard_indexes(Path(spool)):
            store = given.get(index) or open_store(shard_spool(Path(spool), index))
            if store is None:
                continue
            if index not in given:
                owned.add(index)
            shards.append((index, store))
    except BaseException:
        for index, store in shards:
            if index in owned:
                store.close_sync()
        raise
    return ShardedQueue(shards, owned)


def tracking_records(directories: Sequence[Path], query: Query) -> Iterator[dict[str, Any]]:
    """The records ``query`` matches in every shard's tracking log, oldest first (each
    log is in time order; ISO 8601 UTC times of one format sort as text)."""
    found = [search(d, query) for d in directories if d.is_dir()]
    return heapq.merge(*found, key=lambda r: str(r.get("time", "")))


class NodeFigures:
    """What the ``[[alert]]`` rules read (``engine.ops.alerts.QueueFigures``) for a whole
    node, in the worker that evaluates them: the queue figures of every shard (``view``,
    :meth:`NodeOperations.view`), back pressure and the disk of its own (``local``)."""

    def __init__(self, local: LmdbQueue, view: Callable[[], ShardedQueue]) -> None:
        self.local = local
        self.view = view
        self.path = local.path

    def count(self) -> int:
        return self.view().count()

    def oldest(self) -> bytes | None:
        return self.view().oldest()

    def hop_depth(self, next_hop: str) -> tuple[int, bytes | None]:
        return self.view().hop_depth(next_hop)

    def hop_depths(self) -> dict[str, tuple[int, bytes]]:
        return self.view().hop_depths()

    def pressure(self) -> BackPressure | None:
        return self.local.pressure()


class NodeOperations(Operations):
    """The operations of a whole node for a worker's admin API (see the module
    docstring): ``local`` is the worker's own (of shard ``index``); ``node`` the node's
    control socket; ``spool`` the node's spool; ``tracking`` says every shard's tracking
    log directory at the time of asking (``engine.cluster.shards.tracking_dirs``: a shard may appear
    after the start; None: tracking is off).  The events of its verbs name the token
    (``by``, which the node's control channel takes from a worker of the node)."""

    def __init__(self, local: Operations, store: LmdbQueue, node: Path, spool: Path,
                 tracking: Callable[[], Sequence[Path]] | None = None,
                 timeout: float = NODE_TIMEOUT, *, index: int = 0) -> None:
        super().__init__(local.scheduler, local.normalize, local.tracking)
        self.local = local
        #: The shards open in this process already, by index (this worker's own, shard
        #: ``index``; LMDB opens an environment once per process, so two workers run in
        #: one process, as tests do, add the other's here); the others are opened to read.
        self.open_here: dict[int, LmdbQueue] = {index: store}
        self.node = node
        self.spool = Path(spool)
        self.tracking_dirs = tracking
        self.timeout = timeout
        self.suppression = local.suppression
        self.hooks = local.hooks
        #: the other shards, opened here at the first read after they appeared
        self._opened: dict[int, LmdbQueue] = {}
        # Two reads in two threads must not open a shard twice (LMDB: once a process).
        self._opening = threading.Lock()

    # --- the stores of every shard -----------------------------------------------------

    def view(self) -> ShardedQueue:
        """Every shard; one opened here stays open until :meth:`close` (a read in
        another thread may be using it)."""
        with self._opening:
            for index in shard_indexes(self.spool):
                if index not in self.open_here and index not in self._opened:
                    store = open_store(shard_spool(self.spool, index))
                    if store is not None:
                        self._opened[index] = store
            return ShardedQueue(sorted({**self._opened, **self.open_here}.items()))

    def close(self) -> None:
        with self._opening:
            for store in self._opened.values():
                store.close_sync()
            self._opened.clear()

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """The node's reply to ``message``; OperationError with its text when refused,
        when no worker answers, or when the supervisor does not."""
        try:
            reply = await control.ask(self.node, message, self.timeout)
        except TimeoutError:
            raise OperationError(f"the node did not answer in {self.timeout:g} s") from None
        except (OSError, ValueError) as exc:
            raise OperationError(f"the node's control channel: {exc}") from None
        if not reply.get("ok"):
            raise OperationError(str(reply.get("error")))
        return {k: v for k, v in reply.items() if k != "ok"}

    # --- destinations ------------------------------------------------------------------

    async def suspend(self, destination: object, by: str) -> dict[str, Any]:
        return await self._ask({"command": "suspend", "destination": self.hop(destination),
                                "by": by})

    async def resume(self, destination: object, by: str) -> dict[str, Any]:
        return await self._ask({"command": "resume", "destination": self.hop(destination),
                                "by": by})

    async def retry_destination(self, destination: object, by: str) -> dict[str, Any]:
        return await self._ask({"command": "retry", "destination": self.hop(destination),
                                "by": by})

    async def suspended_view(self) -> list[str]:
        destinations: list[str] = (await self._ask({"command": "suspended"}))["destinations"]
        return destinations

    # --- views -------------------------------------------------------------------------

    async def stats_view(self) -> dict[str, Any]:
        return await self._ask({"command": "stats"})

    async def queues(self) -> dict[str, Any]:
        return await self._ask({"command": "queues"})

    async def messages(self, filt: Any, limit: int | None) -> dict[str, Any]:
        self.store = await self._in_thread(self.view)
        return await super().messages(filt, limit)

    async def message(self, queue_id: bytes) -> dict[str, Any]:
        self.store = await self._in_thread(self.view)
        return await super().message(queue_id)

    async def content(self, queue_id: bytes) -> bytes:
        self.store = await self._in_thread(self.view)
        return await super().content(queue_id)

    async def matching(self, filt: Any) -> list[bytes]:
        self.store = await self._in_thread(self.view)
        return await super().matching(filt)

    async def track(self, query: Query, limit: int | None) -> dict[str, Any]:
        directories = self.tracking_dirs
        if directories is None:
            raise NotFound("the message tracking log is off (tracking.enabled)")

        def read() -> dict[str, Any]:
            return tracking_page(tracking_records(directories(), query), limit)

        return await self._in_thread(read)

    # --- verbs on messages ---------------------------------------------------------------

    async def verb(self, verb: str, ids: Sequence[bytes], by: str,
                   report: bool = False) -> dict[str, Any]:
        done: dict[str, list[Any]] = {"changed": [], "unchanged": [], "missing": [],
                                      "reports": []}
        for start in range(0, len(ids), MAX_IDS):
            message: dict[str, Any] = {"command": verb, "ids": [
                id_text(q) for q in ids[start:start + MAX_IDS]], "by": by}
            if verb == "remove":
                message["report"] = report
            reply = await self._ask(message)
            for name in done:
                done[name] += reply.get(name, [])
            for name in ("not_answering", "warnings"):  # the node names silent workers
                notes = done.setdefault(name, [])
                notes += [n for n in reply.get(name, []) if n not in notes]
        return {name: value for name, value in done.items()
                if value or name in ("changed", "unchanged", "missing")}

    async def reload_node(self) -> dict[str, Any]:
        """The node's reload (the supervisor's, engine.ops.reload's reply): as answered,
        ``ok`` false with ``error`` when the node did not answer."""
        try:
            return await control.ask(self.node, {"command": "reload"}, self.timeout)
        except (OSError, ValueError) as exc:  # TimeoutError, ControlUnavailable
            return {"ok": False, "error": f"the node's control channel: {exc}"}

    # --- the suppression list: every shard keeps its own ---------------------------------

    async def suppress(self, address: object, reason: object, category: object,
                       by: str) -> dict[str, Any]:
        message = {"command": "suppress", "address": address, "reason": reason,
                   "category": category, "by": by}
        return await self._ask({k: v for k, v in message.items() if v is not None})

    async def unsuppress(self, address: object, by: str) -> dict[str, Any]:
        return await self._ask({"command": "unsuppress", "address": address, "by": by})


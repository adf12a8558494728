"""The queue's figures for metrics, on a real LMDB with both writers: the messages per state
the writer keeps (they match the state index after every kind of write, after a reopen,
and after a commit refused and retried), the oldest message, the commit histograms."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.ops.figures import Histogram
from engine.queue.api import BackPressure, Change, NewMessage, Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient
from engine.queue.writer import WriterKind

STATES = ("pending", "deferred", "suspended", "held", "poison", "delivered", "failed",
          "corrupt")


def envelope(*hops: str) -> Envelope:
    return Envelope("a@b.test", [Recipient(f"r{i}@{hop}", hop) for i, hop in enumerate(hops)])


def indexed(store: LmdbQueue) -> dict[str, int]:
    """The messages per state as the state index says (a scan: what the figures spare)."""
    return {s: n for s in STATES if (n := len(store.ids_in_state(s, 100_000)))}


def counted(store: LmdbQueue) -> dict[str, int]:
    return dict(store.stats.states)


@pytest.fixture(params=["thread", "process"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LmdbQueue]:
    q = LmdbQueue(tmp_path / "spool", min_free_disk=0, writer=request.param)
    yield q
    q.close_sync()


def test_state_counts_follow_every_write(store: LmdbQueue, tmp_path: Path) -> None:
    assert counted(store) == {} and store.oldest() is None
    ids = [store.enqueue_sync(envelope("one.test", "two.test"), b"x\r\n") for _ in range(5)]
    assert counted(store) == indexed(store) == {"pending": 5}
    assert store.oldest() == ids[0]
    # A deferral (one recipient of two), a delivery that ends one message, a failure.
    store.record_sync([Outcome(ids[0], 0, RcptState.DEFERRED, "451 later", time.time() + 60),
                       Outcome(ids[1], 0, RcptState.DELIVERED, "250 ok"),
                       Outcome(ids[1], 1, RcptState.DELIVERED, "250 ok"),
                       Outcome(ids[2], 0, RcptState.FAILED, "550 no")],
                      [NewMessage(envelope("b.test"), b"dsn\r\n")])
    assert counted(store) == indexed(store) == {
        "pending": 5, "deferred": 1, "failed": 1}
    store.record_sync([Outcome(ids[3], 0, RcptState.SUSPENDED, attempted=False)])
    store.change_sync([Change(ids[4], "hold", time.time()),
                       Change(ids[2], "poison", time.time(), "bad"),
                       Change(ids[0], "remove", time.time())])
    assert counted(store) == indexed(store)
    assert counted(store)["held"] == 1 and counted(store)["poison"] == 1
    assert store.oldest() == ids[2]  # ids[0] removed, ids[1] delivered
    store.change_sync([Change(ids[4], "release", time.time())])
    assert counted(store) == indexed(store)
    kind: WriterKind = "process" if store.writer_pid != os.getpid() else "thread"
    store.close_sync()
    # Reopened: counted once from the index, then kept up again.
    again = LmdbQueue(tmp_path / "spool", min_free_disk=0, writer=kind)
    try:
        assert counted(again) == indexed(again) != {}
        again.record_sync([Outcome(ids[4], i, RcptState.DELIVERED, "250 ok")
                           for i in range(2)])
        assert counted(again) == indexed(again)
    finally:
        again.close_sync()


def test_a_refused_commit_counts_nothing(tmp_path: Path) -> None:
    """A commit refused by back pressure (the map full) leaves the counts as the database
    is: the writes that were refused changed no index."""
    store = LmdbQueue(tmp_path / "spool", min_free_disk=0, map_size=4 << 20,
                      max_map_size=4 << 20)
    try:
        store.enqueue_sync(envelope("one.test"), b"x\r\n")
        with pytest.raises(BackPressure, match="full"):
            store.enqueue_sync(envelope("one.test"), b"y" * (3 << 20))
        assert counted(store) == indexed(store) == {"pending": 1}
    finally:
        store.close_sync()


def test_commit_histograms_count_each_commit(store: LmdbQueue) -> None:
    seconds, writes = store.commit_figures
    store.enqueue_sync(envelope("one.test"), b"x\r\n")
    store.enqueue_sync(envelope("one.test"), b"x\r\n")
    assert sum(seconds.counts) == sum(writes.counts) == 2
    assert writes.sum == 2 and seconds.sum > 0


def test_histogram_buckets_are_prometheus_le() -> None:
    h = Histogram((1, 5))
    for v in (0.5, 1, 3, 5, 7):
        h.observe(v)
    assert h.cumulative() == [(1, 2), (5, 4), (float("inf"), 5)]
    assert h.sum == 16.5

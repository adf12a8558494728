"""The queue viewer's selection and queues over a real LMDB queue, with the scheduler's
snapshot as the plain value the running server hands over."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.ops.select import Filter, select, select_ids
from engine.ops.views import queue_rows
from engine.queue.api import Change, Outcome, QueueStats
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient
from engine.scheduler.snapshot import DestinationView, DownSite, SchedulerSnapshot, SiteView
from tests.queue.test_lmdb_store import corrupt_record

NOW = time.time()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbQueue]:
    s = LmdbQueue(tmp_path / "queue", min_free_disk=0)
    yield s
    s.close_sync()


def put(store: LmdbQueue, *hops: str) -> bytes:
    return store.enqueue_sync(Envelope("a@app.test", [Recipient(f"u{i}@{h}", h)
                                                      for i, h in enumerate(hops)]), b"x\r\n")


def snapshot(**fields: object) -> SchedulerSnapshot:
    base: dict[str, object] = dict(taken=NOW, messages=0, delivered=0, paused=False, window=0,
                                   sites=(), down=(), suspended=(), queue=QueueStats())
    base.update(fields)
    return SchedulerSnapshot(**base)  # type: ignore[arg-type]


def test_an_index_alone_counts_every_match_and_returns_the_limit(store: LmdbQueue) -> None:
    ids = [put(store, "many.test") for _ in range(5)]
    put(store, "other.test")
    found = select(store, Filter(destination="many.test"), limit=2)
    assert [e.queue_id for e in found.envelopes] == ids[:2] and found.total == 5
    everything = select(store, Filter(), limit=None)
    assert everything.total == 6 and len(everything.envelopes) == 6
    assert select_ids(store, Filter(destination="many.test")) == ids


def test_queue_states_from_the_running_scheduler(store: LmdbQueue) -> None:
    _busy, down, lost, held, waiting = (put(store, h) for h in (
        "busy.test", "down.test", "lost.test", "held.test", "wait.test"))
    store.record_sync([
        Outcome(down, 0, RcptState.DEFERRED, "451 4.4.1 mx:down is down, not tried",
                due=NOW + 60),
        Outcome(lost, 0, RcptState.DEFERRED, "451 4.4.4 no send connector's address space "
                "matches lost.test", due=NOW + 300),
        Outcome(held, 0, RcptState.SUSPENDED, attempted=False),
        Outcome(waiting, 0, RcptState.DEFERRED, "452 4.2.2 mailbox full", due=NOW + 120)])
    snap = snapshot(
        sites=(SiteView("mx:busy", 2, 10, 0.0, 0),),
        down=(DownSite("mx:down", NOW + 30),), suspended=("held.test",),
        destinations=(
            DestinationView("busy.test", "mx:busy", 4.0, 3.0),
            DestinationView("down.test", "mx:down", 1.0, 0.0),
            DestinationView("lost.test", "", 1.0, 0.0,
                            "451 4.4.4 no send connector's address space matches lost.test"),
            DestinationView("gone.test", "mx:gone", 0.0, 2.0)))
    rows = {r.destination: r for r in queue_rows(store, snap, now=NOW).rows}
    assert {d: r.state for d, r in rows.items()} == {
        "busy.test": "active", "down.test": "down", "lost.test": "unreachable",
        "held.test": "suspended", "wait.test": "retry", "gone.test": "ready"}
    assert (rows["busy.test"].in_per_minute, rows["busy.test"].out_per_minute) == (4.0, 3.0)
    assert rows["wait.test"].in_per_minute == 0.0  # the server runs, saw none lately
    assert rows["wait.test"].last_error == "452 4.2.2 mailbox full"
    assert rows["wait.test"].next_retry == pytest.approx(NOW + 120)
    assert (rows["gone.test"].messages, rows["gone.test"].out_per_minute) == (0, 2.0)

    # The same queue with no server: no rates; suspended as saved, unreachable by reply.
    alone = {r.destination: r for r in queue_rows(store, None, ["held.test"], NOW).rows}
    assert {d: r.state for d, r in alone.items()} == {
        "busy.test": "ready", "down.test": "retry", "lost.test": "unreachable",
        "held.test": "suspended", "wait.test": "retry"}
    assert alone["busy.test"].in_per_minute is None


def test_a_destination_with_only_held_or_poisoned_mail_is_held(store: LmdbQueue) -> None:
    held, poisoned, mixed_held, _mixed_waiting = (put(store, h) for h in (
        "held.test", "poison.test", "mixed.test", "mixed.test"))
    store.change_sync([Change(held, "hold", NOW), Change(mixed_held, "hold", NOW),
                       Change(poisoned, "poison", NOW, reason="a test")])
    for snap in (None, snapshot()):
        rows = {r.destination: r.state for r in queue_rows(store, snap, now=NOW).rows}
        assert rows == {"held.test": "held", "poison.test": "held", "mixed.test": "ready"}


def test_a_route_found_again_is_not_unreachable(store: LmdbQueue) -> None:
    """The scheduler's memory wins over an old reply: it routed the destination since."""
    lost = put(store, "back.test")
    store.record_sync([Outcome(lost, 0, RcptState.DEFERRED, "451 4.4.3 DNS lookup for "
                               "back.test failed temporarily (SERVFAIL)", due=NOW + 60)])
    snap = snapshot(destinations=(DestinationView("back.test", "mx:back", 1.0, 0.0),))
    (row,) = queue_rows(store, snap, now=NOW).rows
    assert row.state == "retry"


def test_a_corrupt_record_is_listed_and_counted_never_hidden(tmp_path: Path) -> None:
    store = LmdbQueue(tmp_path / "queue", min_free_disk=0)
    good, bad = put(store, "d.test"), put(store, "d.test")
    store.close_sync()
    corrupt_record(tmp_path / "queue", bad, b"{not json")
    store = LmdbQueue(tmp_path / "queue", min_free_disk=0)
    try:
        found = select(store, Filter(destination="d.test"))
        assert [e.queue_id for e in found.envelopes] == [good]
        assert [q for q, _ in found.corrupt] == [bad] and found.total == 2
        asyncio.run(store.quarantine(bad, "did not decode"))
        corrupt = select(store, Filter(state="corrupt"))
        assert [q for q, _ in corrupt.corrupt] == [bad] and corrupt.total == 1
        assert corrupt.envelopes == []
        assert select_ids(store, Filter(state="corrupt")) == [bad]
        # A filter that needs the record cannot match one that does not decode.
        assert select(store, Filter(sender="a@app.test")).total == 1
    finally:
        store.close_sync()

"""The active window: bounded, earliest first, never hands a group out twice."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.queue.api import Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient
from engine.queue.window import DueWindow


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbQueue]:
    q = LmdbQueue(tmp_path, min_free_disk=0)
    yield q
    q.close_sync()


def fill(store: LmdbQueue, n: int) -> list[bytes]:
    return [store.enqueue_sync(Envelope("a@b.test", [Recipient("c@d.test", "d.test"),
                                                      Recipient("e@f.test", "f.test")]), b"x")
            for _ in range(n)]


def test_window_is_bounded_and_ordered(store: LmdbQueue) -> None:
    ids = fill(store, 10)
    window = DueWindow(store, capacity=5)
    assert window.refill() == 5 and len(window) == 5
    taken = [window.take() for _ in range(5)]
    assert window.take() is None
    assert [(e.queue_id, e.next_hop) for e in taken if e] == [
        (ids[0], "d.test"), (ids[0], "f.test"), (ids[1], "d.test"), (ids[1], "f.test"),
        (ids[2], "d.test")]
    assert window.refill() == 0  # everything held is in flight


def test_released_groups_make_room_and_are_not_handed_out_twice(store: LmdbQueue) -> None:
    ids = fill(store, 3)
    window = DueWindow(store, capacity=2)
    window.refill()
    first, second = window.take(), window.take()
    assert first is not None and second is not None
    store.record_sync([Outcome(first.queue_id, 0, RcptState.DELIVERED)])
    window.release(first)
    assert window.refill() == 1
    nxt = window.take()
    assert nxt is not None and (nxt.queue_id, nxt.next_hop) == (ids[1], "d.test")
    # a deferred group comes back only when it is due
    store.record_sync([Outcome(second.queue_id, 1, RcptState.DEFERRED, due=time.time() + 60)])
    window.release(second)
    window.refill()
    assert all(e.queue_id != second.queue_id or e.next_hop != "f.test"
               for e in iter(window.take, None))
    window2 = DueWindow(store, capacity=100)
    window2.refill(now=time.time() + 120)
    assert (second.queue_id, "f.test") in {(e.queue_id, e.next_hop)
                                          for e in iter(window2.take, None)}


def test_capacity_must_be_positive(store: LmdbQueue) -> None:
    with pytest.raises(ValueError, match="capacity"):
        DueWindow(store, capacity=0)


def test_retries_that_come_due_are_found_after_a_rescan(store: LmdbQueue) -> None:
    now = time.time()
    first = store.enqueue_sync(Envelope("a@b.test", [Recipient("c@d.test", "d.test", due=now)]),
                               b"x")
    window = DueWindow(store, capacity=10, rescan_interval=0.0)
    window.refill(now + 1)
    entry = window.take()
    assert entry is not None and entry.queue_id == first
    store.record_sync([Outcome(first, 0, RcptState.DEFERRED, due=now + 5)])
    window.release(entry)
    later = store.enqueue_sync(Envelope("a@b.test", [Recipient("e@f.test", "f.test",
                                                               due=now + 2)]), b"y")
    window.refill(now + 3)  # the new one, found after the cursor
    got = window.take()
    assert got is not None and got.queue_id == later and window.take() is None
    window.refill(now + 6)  # the retry sorts before the cursor: found by starting over
    again = window.take()
    assert again is not None and again.queue_id == first


def test_writes_behind_the_cursor_are_found_without_a_full_rescan(store: LmdbQueue) -> None:
    now = time.time()
    ids = [store.enqueue_sync(Envelope("a@b.test", [Recipient(f"c@d{i}.test", f"d{i}.test",
                                                              due=now + i)]), b"x")
           for i in range(3)]
    window = DueWindow(store, capacity=10, rescan_interval=3600.0)
    window.refill(now + 10)
    first, *others = iter(window.take, None)
    assert [first.queue_id] + [e.queue_id for e in others] == ids
    store.take_due_low()  # what the enqueues wrote is behind us: forget it
    # A retry due before the cursor (the cursor is at the third group by now).
    store.record_sync([Outcome(ids[0], 0, RcptState.DEFERRED, due=now + 1.5)])
    window.release(first)
    assert window.refill(now + 10) == 1
    again = window.take()
    assert again is not None and again.queue_id == ids[0]
    assert abs(again.due - (now + 1.5)) < 0.002
    # The low key was consumed: the next refill neither finds nor re-reads anything.
    assert store.take_due_low() is None and window.refill(now + 10) == 0


def test_a_due_entry_no_write_announced_is_found_by_the_periodic_rescan(
    store: LmdbQueue,
) -> None:
    now = time.time()
    qid = store.enqueue_sync(Envelope("a@b.test", [Recipient("c@d.test", "d.test", due=now)]),
                             b"x")
    store.take_due_low()
    window = DueWindow(store, capacity=10, rescan_interval=3600.0)
    window.refill(now + 1)
    entry = window.take()
    assert entry is not None
    window.release(entry)  # given up without a commit: its due entry is unchanged
    assert window.refill(now + 1) == 0  # behind the cursor, and nothing announced it
    window.rescan_interval = 0.0
    window._rescan_at = 0.0  # the interval has passed
    assert window.refill(now + 1) == 1
    got = window.take()
    assert got is not None and got.queue_id == qid

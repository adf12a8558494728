"""HELD and POISON in the queue database (real LMDB, both writers): no due entry, the
writer's rule against outcomes of attempts in flight, release and the time parked,
removal with its report in one commit, the fault and crash counts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.queue.api import Change, NewMessage, Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient, decode, encode

H, P, D, F = RcptState.HELD, RcptState.POISON, RcptState.DELIVERED, RcptState.FAILED
DEF, PEND = RcptState.DEFERRED, RcptState.PENDING


@pytest.fixture(params=["thread", "process"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LmdbQueue]:
    q = LmdbQueue(tmp_path / "spool", min_free_disk=0, writer=request.param)
    yield q
    q.close_sync()


def queued(store: LmdbQueue, *hops: str) -> bytes:
    env = Envelope("a@b.test", [Recipient(f"r{i}@{hop}", hop) for i, hop in enumerate(hops)])
    env.expires = time.time() + 3600
    return store.enqueue_sync(env, b"Subject: x\r\n\r\nx\r\n")


def states(store: LmdbQueue, qid: bytes) -> list[RcptState]:
    return [r.state for r in store.get(qid).recipients]


def test_a_held_message_has_no_due_entry_even_at_expiry(store: LmdbQueue) -> None:
    qid = queued(store, "one.test", "two.test")
    store.record_sync([Outcome(qid, 1, D, "250 ok")])
    assert store.change_sync([Change(qid, "hold", 1000.0)]) == [1]
    assert states(store, qid) == [H, D]
    assert store.due(time.time() + 10 * 86400, 10) == []  # not even when it would expire
    assert store.ids_in_state("held", 10) == [qid]
    assert store.ids_for_hop("one.test", 10) == [qid]  # still the destination's mail
    assert store.get(qid).parked_since == 1000.0
    assert store.change_sync([Change(qid, "hold", 2000.0)]) == [0]  # already held
    assert store.get(qid).parked_since == 1000.0


def test_release_makes_it_due_now_and_adds_the_time_parked(store: LmdbQueue) -> None:
    qid = queued(store, "one.test")
    expires = store.get(qid).expires
    store.change_sync([Change(qid, "hold", 1000.0)])
    assert store.change_sync([Change(qid, "release", 1600.0)]) == [1]
    env = store.get(qid)
    assert [r.state for r in env.recipients] == [PEND] and env.recipients[0].due == 1600.0
    assert (env.parked, env.parked_since) == (600.0, 0.0)
    assert env.expiry(0.0) == expires + 600.0
    (entry,) = store.due(1600.0, 10)
    assert entry.queue_id == qid
    store.change_sync([Change(qid, "hold", 2000.0)])
    store.change_sync([Change(qid, "release", 2050.0)])
    assert store.get(qid).parked == 650.0  # the holds add up


@pytest.mark.parametrize("outcome", [DEF, PEND, RcptState.SUSPENDED])
def test_an_outcome_in_flight_does_not_undo_a_hold(store: LmdbQueue,
                                                   outcome: RcptState) -> None:
    """The operator held the message while an attempt was on the wire: the attempt's
    deferral (or any state that is not final) leaves it held, with its reply noted."""
    qid = queued(store, "one.test")
    store.change_sync([Change(qid, "hold", time.time())])
    store.record_sync([Outcome(qid, 0, outcome, "451 4.3.0 later", due=time.time())])
    env = store.get(qid)
    assert env.recipients[0].state is H
    assert env.recipients[0].last_reply == "451 4.3.0 later"
    assert env.recipients[0].attempts == 1
    assert store.due(time.time() + 86400, 10) == []


@pytest.mark.parametrize("final", [D, F])
def test_a_final_outcome_ends_a_hold(store: LmdbQueue, final: RcptState) -> None:
    qid = queued(store, "one.test", "two.test")
    store.change_sync([Change(qid, "hold", time.time())])
    store.record_sync([Outcome(qid, 0, final, "250 ok")])
    assert states(store, qid) == [final, H]
    store.record_sync([Outcome(qid, 1, final, "250 ok")])
    assert store.count() == 0  # all final: gone, as always


def test_remove_deletes_and_stores_its_report_in_the_same_commit(store: LmdbQueue) -> None:
    qid = queued(store, "one.test", "two.test")
    store.record_sync([Outcome(qid, 0, D, "250 ok")])
    report = NewMessage(Envelope("", [Recipient("a@b.test", "b.test")]), b"report\r\n")
    # The report was built for the wrong recipients: nothing happens.
    assert store.change_sync([Change(qid, "remove", 0.0, expect=(0, 1),
                                     new_messages=(report,))]) == [-1]
    assert store.count() == 1
    assert store.change_sync([Change(qid, "remove", 0.0, expect=(1,),
                                     new_messages=(report,))]) == [1]
    (dsn,) = store.ids_in_state("pending", 10)
    assert dsn != qid and store.body(dsn) == b"report\r\n"
    assert store.ids_for_hop("two.test", 10) == [] and store.count() == 1
    with pytest.raises(KeyError):
        store.get(qid)
    assert store.change_sync([Change(qid, "remove", 0.0)]) == [None]
    assert store.change_sync([Change(qid, "hold", 0.0)]) == [None]


@pytest.mark.parametrize("action", ["fault", "crash"])
def test_the_second_fault_or_crash_poisons(store: LmdbQueue, action: str) -> None:
    qid = queued(store, "one.test")
    assert store.change_sync([Change(qid, action, 10.0, "boom")]) == [0]
    assert states(store, qid) == [PEND]
    assert store.change_sync([Change(qid, action, 20.0, "boom")]) == [1]
    env = store.get(qid)
    assert [r.state for r in env.recipients] == [P] and env.poisoned == "boom"
    assert store.ids_in_state("poison", 10) == [qid]
    assert store.due(time.time() + 86400, 10) == []
    assert store.change_sync([Change(qid, "release", 30.0)]) == [1]
    env = store.get(qid)
    assert [r.state for r in env.recipients] == [PEND]
    assert (env.faults, env.crashes, env.poisoned, env.parked) == (0, 0, "", 10.0)


def test_a_completed_attempt_resets_the_counts(store: LmdbQueue) -> None:
    qid = queued(store, "one.test")
    store.change_sync([Change(qid, "fault", 0.0), Change(qid, "crash", 0.0)])
    assert (store.get(qid).faults, store.get(qid).crashes) == (1, 1)
    store.record_sync([Outcome(qid, 0, DEF, "451 later", due=time.time() + 60,
                               attempted=False)])
    assert (store.get(qid).faults, store.get(qid).crashes) == (1, 1)  # not an attempt
    store.record_sync([Outcome(qid, 0, DEF, "451 later", due=time.time() + 60)])
    assert (store.get(qid).faults, store.get(qid).crashes) == (0, 0)
    store.change_sync([Change(qid, "crash", 0.0)])
    assert states(store, qid) == [DEF]  # one crash since: not poisoned


def test_hold_leaves_poison_alone_and_poison_takes_held() -> None:
    """Unit rules on the record (no database): a hold does not hide why it is poisoned."""
    from engine.queue.lmdb_txn import _change

    env = Envelope("a@b.test", [Recipient("x@one.test", "one.test", P),
                                Recipient("y@one.test", "one.test", H),
                                Recipient("z@one.test", "one.test", D)])
    assert _change(env, Change(b"", "hold", 5.0)) == 0
    assert [r.state for r in env.recipients] == [P, H, D]
    assert _change(env, Change(b"", "poison", 5.0, "why")) == 1
    assert [r.state for r in env.recipients] == [P, P, D] and env.poisoned == "why"


def test_old_records_decode_without_the_new_fields() -> None:
    env = Envelope("a@b.test", [Recipient("x@one.test", "one.test")], expires=100.0)
    raw = encode(env)
    for key in (b"parked", b"faults", b"crashes", b"poisoned"):
        assert key not in raw  # optional fields only when set
    back = decode(b"x" * 12, raw)
    assert (back.parked, back.parked_since, back.faults, back.crashes) == (0, 0, 0, 0)
    assert back.expiry(0.0) == 100.0
    env.parked, env.parked_since, env.faults, env.crashes, env.poisoned = 5.0, 7.0, 1, 1, "x"
    back = decode(b"x" * 12, encode(env))
    assert (back.parked, back.parked_since, back.faults, back.crashes, back.poisoned) == (
        5.0, 7.0, 1, 1, "x")
    assert back.expiry(0.0) == 105.0
    assert Envelope("a@b.test", [], arrival=50.0).expiry(10.0) == 60.0
    assert Envelope("a@b.test", [], arrival=50.0).expiry(0.0) == 0.0

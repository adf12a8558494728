"""The LMDB queue database, on a real LMDB in a temp dir: records, indexes, outcomes,
reopening, corrupt records, and back pressure that clears by itself."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from engine.queue.api import BackPressure, NewMessage, Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import (
    Envelope,
    RcptState,
    Recipient,
    RecordError,
    id_bytes,
    id_text,
    id_time,
)
from engine.queue.writer import WRITER_KINDS, WriterKind
from tests.queue.locking import write_lock

D = RcptState.DELIVERED
F = RcptState.FAILED


def envelope(*rcpts: tuple[str, str], sender: str = "a@b.test") -> Envelope:
    return Envelope(sender, [Recipient(addr, hop) for addr, hop in rcpts],
                    client_address="127.0.0.1", message_id="<m@b.test>")


@pytest.fixture(params=["thread", "process"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LmdbQueue]:
    """Each test runs against both writers: a thread, and the process the server uses."""
    q = LmdbQueue(tmp_path / "spool", min_free_disk=0, writer=request.param)
    yield q
    q.close_sync()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_enqueue_get_body_and_time_ordered_ids(store: LmdbQueue) -> None:
    async def go() -> list[bytes]:
        return [await store.enqueue(envelope(("c@d.test", "d.test")), b"body %d\r\n" % i)
                for i in range(20)]

    ids = run(go())
    assert ids == sorted(ids) and len(set(ids)) == 20
    assert abs(id_time(ids[0]) - time.time()) < 60
    assert id_bytes(id_text(ids[3])) == ids[3]
    env = store.get(ids[3])
    assert env.sender == "a@b.test" and env.recipients[0].address == "c@d.test"
    assert env.size == len(b"body 3\r\n") and env.message_id == "<m@b.test>"
    assert store.body(ids[3]) == b"body 3\r\n"
    assert store.count() == 20
    assert "durability=fsync" in store.describe() and "power loss" in store.describe()


def test_concurrent_producers_share_commits(store: LmdbQueue) -> None:
    async def go() -> list[bytes]:
        return await asyncio.gather(*(store.enqueue(envelope(("c@d.test", "d.test")), b"x")
                                      for _ in range(500)))

    ids = run(go())
    assert len(set(ids)) == 500 and store.count() == 500
    assert store.stats.commits < 500  # group commit: fewer commits than messages


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_reopen_after_clean_shutdown(tmp_path: Path, writer: WriterKind) -> None:
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    qid = q.enqueue_sync(envelope(("c@d.test", "d.test"), ("e@f.test", "f.test")), b"hello")
    q.record_sync([Outcome(qid, 1, RcptState.DEFERRED, "451 later", due=time.time() + 60)])
    q.close_sync()
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    try:
        env = q.get(qid)
        assert [r.state for r in env.recipients] == [RcptState.PENDING, RcptState.DEFERRED]
        assert env.recipients[1].last_reply == "451 later" and env.recipients[1].attempts == 1
        assert q.body(qid) == b"hello"
        assert [e.next_hop for e in q.due(time.time(), 10)] == ["d.test"]
        assert [e.next_hop for e in q.due(time.time() + 120, 10)] == ["d.test", "f.test"]
    finally:
        q.close_sync()


def test_outcomes_update_indexes_and_free_the_body_at_the_last_final(store: LmdbQueue) -> None:
    qid = store.enqueue_sync(envelope(("c@d.test", "d.test"), ("e@d.test", "d.test"),
                                      ("g@h.test", "h.test")), b"body")
    assert store.ids_for_hop("d.test", 10) == [qid] == store.ids_for_hop("h.test", 10)
    assert store.ids_in_state("pending", 10) == [qid]

    store.record_sync([Outcome(qid, 0, D, "250 ok"), Outcome(qid, 1, F, "550 no")])
    env = store.get(qid)
    assert [r.state for r in env.recipients] == [D, F, RcptState.PENDING]
    assert store.ids_for_hop("d.test", 10) == []  # all of d.test is final
    assert store.ids_for_hop("h.test", 10) == [qid]
    assert store.ids_in_state("delivered", 10) == [qid] == store.ids_in_state("failed", 10)
    assert store.body(qid) == b"body"

    # a repeated report of a final recipient changes nothing (at-least-once reporting)
    store.record_sync([Outcome(qid, 0, F, "550 late")])
    assert store.get(qid).recipients[0].state is D

    store.record_sync([Outcome(qid, 2, D, "250 ok")])
    with pytest.raises(KeyError):
        store.get(qid)
    with pytest.raises(KeyError):
        store.body(qid)
    assert store.count() == 0 and store.due(time.time() + 1e6, 10) == []
    for state in ("pending", "delivered", "failed"):
        assert store.ids_in_state(state, 10) == []
    # a report for a message already gone is ignored
    store.record_sync([Outcome(qid, 2, D)])
    assert store.count() == 0


def test_due_order_paging_and_deferral(store: LmdbQueue) -> None:
    now = time.time()
    ids = [store.enqueue_sync(envelope(("c@d.test", "d.test")), b"x") for _ in range(5)]
    store.record_sync([Outcome(ids[0], 0, RcptState.DEFERRED, "421 busy", due=now + 100)])
    due_now = store.due(now + 1, 10)
    assert [e.queue_id for e in due_now] == ids[1:]
    first = store.due(now + 1, 2)
    rest = store.due(now + 1, 10, after=first[-1].key)
    assert [e.queue_id for e in first + rest] == ids[1:]
    later = store.due(now + 200, 10)
    assert later[-1].queue_id == ids[0] and later[-1].due == pytest.approx(now + 100, abs=0.01)


def test_suspend_and_resume(store: LmdbQueue) -> None:
    qid = store.enqueue_sync(envelope(("c@d.test", "d.test")), b"x")
    store.record_sync([Outcome(qid, 0, RcptState.SUSPENDED, attempted=False)])
    assert store.due(time.time() + 1e6, 10) == []
    assert store.ids_in_state("suspended", 10) == [qid]
    assert store.ids_for_hop("d.test", 10) == [qid]
    store.record_sync([Outcome(qid, 0, RcptState.PENDING, attempted=False)])
    assert [e.queue_id for e in store.due(time.time(), 10)] == [qid]
    assert store.get(qid).recipients[0].attempts == 0


def test_new_messages_commit_with_outcomes(store: LmdbQueue) -> None:
    qid = store.enqueue_sync(envelope(("c@d.test", "d.test")), b"original")
    dsn = NewMessage(Envelope("", [Recipient("a@b.test", "b.test")]), b"bounce")
    store.record_sync([Outcome(qid, 0, F, "550 no")], [dsn])
    assert store.count() == 1
    (entry,) = store.due(time.time(), 10)
    assert entry.next_hop == "b.test" and store.body(entry.queue_id) == b"bounce"
    assert store.get(entry.queue_id).sender == ""


def corrupt_record(path: Path, qid: bytes, raw: bytes) -> None:
    """Overwrite an envelope record behind the store's back (as disk damage would)."""
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(qid, raw, db=env.open_db(b"envelopes", txn=txn))
    env.close()


@pytest.mark.parametrize("raw", [b"{not json", b"[1,2]", b'{"v":99}', b'{"v":1,"sender":1}'])
@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_corrupt_record_is_listed_never_dropped(
    tmp_path: Path, raw: bytes, writer: WriterKind
) -> None:
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    good = q.enqueue_sync(envelope(("c@d.test", "d.test")), b"good")
    bad = q.enqueue_sync(envelope(("c@d.test", "d.test")), b"bad")
    q.close_sync()
    corrupt_record(tmp_path, bad, raw)
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    try:
        entries = q.due(time.time(), 10)
        assert [e.queue_id for e in entries] == [good, bad]
        with pytest.raises(RecordError):
            q.get(bad)
        assert [qid for qid, _ in q.scan_corrupt()] == [bad]
        run(quarantine(q, bad, entries[1].key))
        assert [e.queue_id for e in q.due(time.time(), 10)] == [good]
        ((qid, reason),) = q.corrupt()
        assert qid == bad and reason
        assert q.ids_in_state("corrupt", 10) == [bad]
        assert q.body(bad) == b"bad"  # the body stays for an operator to look at
        assert q.count() == 2
    finally:
        q.close_sync()


async def quarantine(q: LmdbQueue, qid: bytes, key: bytes) -> None:
    await q.quarantine(qid, "did not decode", key)


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_outcome_for_a_corrupt_record_quarantines_it(tmp_path: Path, writer: WriterKind) -> None:
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    bad = q.enqueue_sync(envelope(("c@d.test", "d.test")), b"bad")
    q.close_sync()
    corrupt_record(tmp_path, bad, b"\xff\xfe")
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    try:
        q.record_sync([Outcome(bad, 0, D)])
        assert q.ids_in_state("corrupt", 10) == [bad]
    finally:
        q.close_sync()


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_map_grows_as_needed(tmp_path: Path, writer: WriterKind) -> None:
    q = LmdbQueue(tmp_path, map_size=1 << 20, max_map_size=256 << 20, min_free_disk=0,
                  writer=writer)
    try:
        for _ in range(40):
            q.enqueue_sync(envelope(("c@d.test", "d.test")), b"x" * 100_000)
        assert q.stats.map_grown > 0 and q.count() == 40
        assert q.pressure() is None
    finally:
        q.close_sync()


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_map_full_is_back_pressure_then_recovers_without_restart(
    tmp_path: Path, writer: WriterKind
) -> None:
    q = LmdbQueue(tmp_path, map_size=4 << 20, max_map_size=4 << 20, min_free_disk=0,
                  writer=writer)
    try:
        ids: list[bytes] = []
        with pytest.raises(BackPressure, match="full"):
            for _ in range(200):
                ids.append(q.enqueue_sync(envelope(("c@d.test", "d.test")), b"x" * 50_000))
        assert 10 < len(ids) < 200
        assert q.count() == len(ids)  # everything acknowledged is there
        pressure = q.pressure()
        assert pressure is not None and "full" in pressure.reason
        q.record_sync([Outcome(i, 0, D) for i in ids])  # delivering frees the space
        q.enqueue_sync(envelope(("c@d.test", "d.test")), b"x" * 50_000)
        assert q.pressure() is None and q.count() == 1
    finally:
        q.close_sync()


def test_low_disk_is_back_pressure_and_clears(tmp_path: Path) -> None:
    q = LmdbQueue(tmp_path, min_free_disk=1 << 62, disk_check_interval=0)
    try:
        pressure = q.pressure()
        assert pressure is not None and "disk" in pressure.reason
        with pytest.raises(BackPressure, match="disk"):
            q.enqueue_sync(envelope(("c@d.test", "d.test")), b"x")
        q.min_free_disk = 1 << 20  # the operator freed space
        assert q.pressure() is None
        q.enqueue_sync(envelope(("c@d.test", "d.test")), b"x")
    finally:
        q.close_sync()


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_writer_behind_is_back_pressure(tmp_path: Path, writer: WriterKind) -> None:
    q = LmdbQueue(tmp_path, min_free_disk=0, max_pending=3, writer=writer)

    async def go() -> list[Any]:
        with write_lock(tmp_path):  # the writer cannot commit: it falls behind
            tasks = [asyncio.create_task(q.enqueue(envelope(("c@d.test", "d.test")), b"x"))
                     for _ in range(10)]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            assert q.pressure() is not None
            # Refused at once; the three handed over wait for their commit.
            assert sum(t.done() for t in tasks) == 7 and q.count() == 0
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = run(go())
        accepted = [r for r in results if isinstance(r, bytes)]
        refused = [r for r in results if isinstance(r, BackPressure)]
        assert len(accepted) == 3 and len(refused) == 7
        assert "behind" in refused[0].reason
        assert q.count() == 3 and q.pressure() is None
    finally:
        q.close_sync()


def test_durability_os_mode_is_reported(tmp_path: Path) -> None:
    q = LmdbQueue(tmp_path, durability="os", min_free_disk=0)
    try:
        assert "durability=os" in q.describe() and "not power loss" in q.describe()
    finally:
        q.close_sync()
    with pytest.raises(ValueError, match="durability"):
        LmdbQueue(tmp_path, durability="never")


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_outcomes_carrying_new_messages_grow_the_map(
    tmp_path: Path, writer: WriterKind
) -> None:
    """DSNs ride on outcomes: they add bytes and must grow the map like enqueues do."""
    q = LmdbQueue(tmp_path, map_size=1 << 20, max_map_size=64 << 20, min_free_disk=0,
                  writer=writer)
    try:
        for _ in range(100):
            bounce = NewMessage(Envelope("", [Recipient("a@b.test", "b.test")]), b"x" * 20_000)
            q.record_sync([], [bounce])
        assert q.count() == 100 and q.stats.map_grown > 0
    finally:
        q.close_sync()


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_full_map_refuses_new_bytes_but_keeps_outcomes(
    tmp_path: Path, writer: WriterKind
) -> None:
    q = LmdbQueue(tmp_path, map_size=4 << 20, max_map_size=4 << 20, min_free_disk=0,
                  writer=writer)
    try:
        ids: list[bytes] = []
        with pytest.raises(BackPressure):
            for _ in range(200):
                ids.append(q.enqueue_sync(envelope(("c@d.test", "d.test")), b"x" * 50_000))
        bounce = NewMessage(Envelope("", [Recipient("a@b.test", "b.test")]), b"x" * 50_000)
        with pytest.raises(BackPressure):
            q.record_sync([Outcome(ids[0], 0, F, "550 no")], [bounce])
        assert q.get(ids[0]).recipients[0].state is RcptState.PENDING  # all or nothing
        q.record_sync([Outcome(i, 0, D) for i in ids[1:]])  # plain outcomes still commit
        assert q.count() == 1
    finally:
        q.close_sync()


def test_suspended_recipients_come_due_at_expiry(store: LmdbQueue) -> None:
    """The maximum queue lifetime holds in every state, suspended included."""
    env = envelope(("c@d.test", "d.test"))
    env.expires = time.time() + 3600
    qid = store.enqueue_sync(env, b"x")
    store.record_sync([Outcome(qid, 0, RcptState.SUSPENDED, attempted=False)])
    assert store.due(time.time() + 60, 10) == []
    (entry,) = store.due(time.time() + 7200, 10)
    assert entry.queue_id == qid and entry.due == pytest.approx(env.expires, abs=0.01)


@pytest.mark.parametrize("writer", WRITER_KINDS)
def test_settings_are_kept_across_a_reopen(tmp_path: Path, writer: WriterKind) -> None:
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)
    assert q.setting("suspended") is None
    run(q.save_setting("suspended", b'["two.test"]'))
    run(q.save_setting("suspended", b'["one.test","two.test"]'))  # the last one stands
    q.close_sync()
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=writer)  # the schema key is not a setting
    try:
        assert q.setting("suspended") == b'["one.test","two.test"]'
        assert q.setting("schema") is None
    finally:
        q.close_sync()


def test_the_delay_notice_flag_commits_with_its_outcome(store: LmdbQueue) -> None:
    qid = store.enqueue_sync(envelope(("c@d.test", "d.test")), b"hello")
    assert store.get(qid).delay_notified is False
    store.record_sync([Outcome(qid, 0, RcptState.DEFERRED, "451 later", due=time.time() + 60)])
    assert store.get(qid).delay_notified is False
    store.record_sync([Outcome(qid, 0, RcptState.DEFERRED, "451 later", due=time.time() + 60,
                               delay_notified=True)])
    assert store.get(qid).delay_notified is True
    store.record_sync([Outcome(qid, 0, RcptState.DEFERRED, "451 later", due=time.time() + 60)])
    assert store.get(qid).delay_notified is True  # once set, it stays


def test_records_from_before_delay_notices_still_decode() -> None:
    from engine.queue.records import decode, encode

    env = envelope(("c@d.test", "d.test"))
    old = encode(env)
    assert b"delay_notified" not in old  # unset flags are not written
    assert decode(b"x" * 12, old).delay_notified is False
    env.delay_notified = True
    assert decode(b"x" * 12, encode(env)).delay_notified is True


def test_an_envelope_crosses_the_writer_pipe_whole() -> None:
    # The writer process gets envelopes pickled (records.Envelope.__reduce__: every field
    # as one tuple): each field set to a value that is not its default comes back.
    rcpt = Recipient("x@example.net", "example.net", RcptState.HELD, 3, 5.5, "451 later",
                     ("SUCCESS", "DELAY"), "rfc822;x@example.net")
    env = Envelope("a@example.org", [rcpt, Recipient("y@example.com", "example.com")],
                   arrival=1.5, size=7, ret="HDRS", envid="e1", smtputf8=True,
                   body_type="8BITMIME", receive_connector="in", client_address="192.0.2.1",
                   auth_user="u", message_id="<m@x>", expires=9.5, queue_id=b"q" * 12,
                   delay_notified=True, parked=2.5, parked_since=3.5, faults=1, crashes=1,
                   poisoned="why")
    defaults = Envelope("", [])
    assert all(getattr(env, f.name) != getattr(defaults, f.name)
               for f in dataclasses.fields(Envelope))
    back = pickle.loads(pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == env
    assert back.recipients[0].state is RcptState.HELD


def test_outcomes_and_new_messages_cross_the_writer_pipe_whole() -> None:
    # Their __reduce__ (every field as one tuple): each field not at its default comes back.
    outcome = Outcome(b"q" * 12, 2, RcptState.DEFERRED, "451 later", 9.5, attempted=False,
                      delay_notified=True)
    defaults = Outcome(b"", 0, RcptState.PENDING)
    assert all(getattr(outcome, f.name) != getattr(defaults, f.name)
               for f in dataclasses.fields(Outcome))
    message = NewMessage(Envelope("a@example.org", [], queue_id=b"q" * 12), b"body\r\n",
                         b"Received: by x; Mon, 7 Dec 2026 19:00:00 +0000\r\n")
    back = pickle.loads(pickle.dumps((outcome, message), protocol=pickle.HIGHEST_PROTOCOL))
    assert back == (outcome, message)
    assert back[0].state is RcptState.DEFERRED

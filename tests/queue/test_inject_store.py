"""``QueueStore.inject``: a request's messages in one write, with its idempotency key in the
same commit (engine.queue.lmdb_txn ``idempotency``), on a real LMDB with both writers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from engine.queue.api import BackPressure, Idempotency, NewMessage
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.lmdb_txn import PRUNE_KEYS
from engine.queue.records import Envelope, Recipient


@pytest.fixture(params=["thread", "process"])
def store(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LmdbQueue]:
    q = LmdbQueue(tmp_path / "spool", min_free_disk=0, writer=request.param)
    yield q
    q.close_sync()


def _messages(n: int) -> list[NewMessage]:
    return [NewMessage(Envelope("a@b.test", [Recipient(f"r{i}@c.test", "c.test")]),
                       b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(n)]


def test_messages_are_stored_with_their_indexes(store: LmdbQueue) -> None:
    messages = _messages(3)
    assert asyncio.run(store.inject(messages)) is None
    ids = [m.envelope.queue_id for m in messages]
    assert store.count() == 3 and len(set(ids)) == 3
    assert store.body(ids[1]) == b"Subject: 1\r\n\r\nx\r\n"
    assert store.get(ids[2]).recipients[0].address == "r2@c.test"
    assert sorted(e.queue_id for e in store.due(time.time() + 1, 10)) == sorted(ids)
    assert store.ids_for_hop("c.test", 10) == sorted(ids)
    assert store.stats.enqueued == 3


def test_a_key_stored_once_answers_every_retry(store: LmdbQueue) -> None:
    key = Idempotency(b"app\0k1", b"first answer", time.time() + 60)

    async def go() -> list[bytes | None]:
        # Two requests with one key in flight together: one commit or two, the second
        # finds the first's key and stores nothing.
        return list(await asyncio.gather(
            store.inject(_messages(2), key),
            store.inject(_messages(2), Idempotency(key.key, b"second", key.expires))))

    assert asyncio.run(go()) == [None, b"first answer"]
    assert store.count() == 2
    assert store.idempotent_answer(b"app\0k1") == b"first answer"
    assert store.idempotent_answer(b"other\0k1") is None


def test_an_expired_key_is_forgotten_and_pruned(store: LmdbQueue, tmp_path: Path) -> None:
    past = time.time() - 1
    for i in range(PRUNE_KEYS + 5):
        asyncio.run(store.inject([], Idempotency(b"k%d" % i, b"old", past)))
    assert store.idempotent_answer(b"k0") is None  # expired: no answer
    # An expired key is a new request again: its messages are stored.
    assert asyncio.run(store.inject(_messages(1), Idempotency(b"k0", b"new",
                                                              time.time() + 60))) is None
    assert store.idempotent_answer(b"k0") == b"new"
    # Each write with a key deletes up to PRUNE_KEYS expired ones, oldest first.
    asyncio.run(store.inject([], Idempotency(b"fresh", b"x", time.time() + 60)))
    store.close_sync()  # one environment per process (LMDB): look after the store closed
    env = lmdb.open(str(tmp_path / "spool"), readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin() as txn:
            db = env.open_db(b"idempotency", txn=txn, create=False)
            keys = {bytes(k) for k, _ in txn.cursor(db) if bytes(k).startswith(b"k")}
    finally:
        env.close()
    assert keys == {b"kk0", b"kfresh"}


def test_back_pressure_refuses_the_whole_write(tmp_path: Path) -> None:
    store = LmdbQueue(tmp_path / "spool", min_free_disk=1 << 60, writer="thread")
    try:
        with pytest.raises(BackPressure):
            asyncio.run(store.inject(_messages(2), Idempotency(b"k", b"a", time.time() + 60)))
        assert store.count() == 0 and store.idempotent_answer(b"k") is None
    finally:
        store.close_sync()


def test_a_head_is_stored_before_its_body(store: LmdbQueue) -> None:
    # Ingest hands the Received field apart from the body (NewMessage.head): the writer
    # stores the two joined, and the size counts both.
    head = b"Received: from x by y id Q; Mon, 7 Dec 2026 19:00:00 +0000\r\n"
    apart = NewMessage(Envelope("a@b.test", [Recipient("r@c.test", "c.test")]),
                       b"Subject: s\r\n\r\nx\r\n", head)
    sized = NewMessage(Envelope("a@b.test", [Recipient("r@c.test", "c.test")], size=7),
                       b"Subject: s\r\n\r\nx\r\n", head)
    assert apart.data == head + b"Subject: s\r\n\r\nx\r\n" and apart.size == len(apart.data)
    asyncio.run(store.inject([apart, sized]))
    got = store.get(apart.envelope.queue_id)
    assert store.body(got.queue_id) == apart.data
    assert got.size == len(apart.data)
    assert store.get(sized.envelope.queue_id).size == 7  # a size given is kept
    assert store.body(sized.envelope.queue_id) == apart.data

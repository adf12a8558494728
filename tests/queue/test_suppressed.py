"""The suppression list's table in the queue database (real LMDB, both writers): entries
stored and deleted through the writer, in one commit with outcomes, read back after the
store is opened again; the in-memory list over it (engine.queue.suppression)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import SuppressionConfig
from engine.queue.api import Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient
from engine.queue.suppression import Entry, SuppressionList
from engine.scheduler.bounces import classify
from engine.testing.wait import until


@pytest.fixture(params=["thread", "process"])
def path(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    yield tmp_path / "queue", request.param


def test_entries_are_stored_deleted_and_read_back(path: tuple[Path, str]) -> None:
    where, writer = path
    store = LmdbQueue(where, min_free_disk=0, writer=writer)  # type: ignore[arg-type]
    try:
        a = Entry("a@x.test", "asked", "", 1.0, "operator").encode()
        assert store.suppress_sync([(b"a@x.test", a), (b"b@x.test", a)]) == ()
        assert store.suppress_sync((), (b"b@x.test", b"nobody@x.test")) == (True, False)
    finally:
        store.close_sync()
    store = LmdbQueue(where, min_free_disk=0, writer=writer)  # type: ignore[arg-type]
    try:
        assert store.suppressed() == [(b"a@x.test", a)]
        assert store.suppressed_entry(b"a@x.test") == a
    finally:
        store.close_sync()


def test_a_hard_failure_is_added_after_its_outcome(path: tuple[Path, str]) -> None:
    where, writer = path

    async def run() -> tuple[list[str], bytes | None]:
        store = LmdbQueue(where, min_free_disk=0, writer=writer)  # type: ignore[arg-type]
        try:
            qid = await store.enqueue(Envelope("s@client.test", [
                Recipient("Gone@x.test", "x.test"), Recipient("full@x.test", "x.test"),
                Recipient("late@x.test", "x.test")]), b"Subject: x\r\n\r\nx\r\n")
            env = store.get(qid)
            listing = SuppressionList(store, SuppressionConfig(), classify)
            await listing.load()
            outcomes = [Outcome(qid, 0, RcptState.FAILED, "550 5.1.1 No such user"),
                        Outcome(qid, 1, RcptState.FAILED, "552 5.2.2 Mailbox full"),
                        Outcome(qid, 2, RcptState.FAILED, "451 4.4.1 refused",
                                attempted=False)]  # expired: not a verdict
            listing.failed(env, outcomes)
            await store.record(outcomes)
            assert listing.check("gone@x.test") is not None  # in memory at once
            # The entries' write is handed over on the next turn and committed after it.
            stored = await until(lambda: store.suppressed_entry(b"gone@x.test"),
                                 what="the automatic entry stored")
            return sorted(listing.entries), stored
        finally:
            await store.close()

    entries, stored = asyncio.run(run())
    assert entries == ["gone@x.test"]
    assert stored is not None
    entry = Entry.decode(b"gone@x.test", stored)
    assert (entry.category, entry.source, entry.reason) == (
        "bad-mailbox", "auto", "550 5.1.1 No such user")

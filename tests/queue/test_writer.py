"""The queue's writer behind its one interface (``engine.queue.writer.Writer``): the same
tests against the writer thread and the writer process ``ferry serve`` uses, on a real
LMDB in a temp dir.  What the caller's side promises (250 only after the commit, group
commit, back pressure) rests on these."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from engine.queue.api import (
    BackPressure,
    NewMessage,
    Outcome,
    QueueClosed,
    QueueStats,
    QueueStore,
)
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.lmdb_txn import Database, Report, WriterParams
from engine.queue.records import Envelope, RcptState, Recipient
from engine.queue.writer import WRITER_KINDS, Pending, Writer, WriterKind, start_writer
from engine.queue.writer_process import (
    BUSY,
    LINGER,
    _Grouping,
    pack_frame,
    read_frame,
    take_frames,
    widen,
    write_frame,
)
from engine.testing.wait import until, wait_for
from tests.queue.locking import write_lock


def envelope() -> Envelope:
    return Envelope("a@b.test", [Recipient("c@d.test", "d.test")])


def enqueue(body: bytes) -> Pending:
    return Pending("enqueue", (envelope(), body), len(body), None, Future())


def result(write: Pending, timeout: float = 30) -> Any:
    """What the writer settled ``write`` with (a thread's future: these callers have no
    event loop)."""
    assert isinstance(write.future, Future)
    return write.future.result(timeout)


class Opened:
    """A database opened as the store opens it, with a writer of one kind."""

    def __init__(self, path: Path, kind: WriterKind, **params: Any) -> None:
        self.params = WriterParams(str(path), min_free_disk=0, **params)
        self.db = Database(self.params)
        self.writer: Writer = start_writer(kind, self.db, self.params)

    def stored(self, qid: bytes) -> bytes | None:
        """The body committed under ``qid``, read in a fresh transaction."""
        with self.db.env.begin(buffers=False) as txn:
            body: bytes | None = txn.get(qid, db=self.db.tables["bodies"])
        return body

    def close(self) -> None:
        self.writer.close()
        self.db.close()


@pytest.fixture(params=WRITER_KINDS)
def opened(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Opened]:
    o = Opened(tmp_path, request.param)
    yield o
    o.close()


def test_a_write_is_settled_only_once_its_commit_can_be_read(opened: Opened) -> None:
    seen: list[bytes | None] = []

    def settled(future: Future[Any]) -> None:
        # Runs as the writer settles: the commit must already be there for a reader.
        seen.append(opened.stored(future.result()))

    writes = [enqueue(b"body %d" % i) for i in range(30)]
    for write in writes:
        assert isinstance(write.future, Future)
        write.future.add_done_callback(settled)
        opened.writer.submit(write)
    ids = [result(write) for write in writes]
    assert len(set(ids)) == 30
    wait_for(lambda: len(seen) == 30, 10)
    assert sorted(body or b"" for body in seen) == sorted(b"body %d" % i for i in range(30))
    assert opened.writer.pending == 0


def test_writes_waiting_for_a_commit_share_it(opened: Opened, tmp_path: Path) -> None:
    commits = opened.writer.report.stats.commits
    writes = [enqueue(b"x") for _ in range(50)]
    with write_lock(tmp_path):  # the writer is held up: everything handed over waits
        for write in writes:
            opened.writer.submit(write)
        assert opened.writer.pending == 50
        assert not any(write.future.done() for write in writes)
    for write in writes:
        assert isinstance(result(write), bytes)
    # The first write may have gone alone; every later one waited for the same commit.
    stats = opened.writer.report.stats
    assert stats.commits - commits <= 2 and stats.enqueued == 50
    assert opened.writer.pending == 0


def test_close_commits_everything_handed_over(tmp_path: Path) -> None:
    for kind in WRITER_KINDS:
        path = tmp_path / kind
        o = Opened(path, kind)
        writes = [enqueue(b"late %d" % i) for i in range(20)]
        for write in writes:
            o.writer.submit(write)
        o.close()  # at once: the writes are still on their way
        ids = [result(write, 0) for write in writes]
        again = Opened(path, kind)
        try:
            assert [again.stored(qid) for qid in ids] == [b"late %d" % i for i in range(20)]
        finally:
            again.close()
        with pytest.raises(QueueClosed):
            o.writer.submit(enqueue(b"after"))


def test_the_report_says_where_the_due_index_changed(opened: Opened) -> None:
    first = enqueue(b"x")
    opened.writer.submit(first)
    qid = result(first)
    low = opened.writer.take_due_low()
    assert low is not None and low[8:20] == qid
    assert opened.writer.take_due_low() is None  # handed over once
    record = Pending("record", ((Outcome(qid, 0, RcptState.DELIVERED),), ()), 0, None, Future())
    opened.writer.submit(record)
    assert result(record) is None
    assert opened.stored(qid) is None and opened.writer.report.stats.outcomes == 1


def test_a_full_map_refuses_only_the_writes_that_add_bytes(tmp_path: Path) -> None:
    for kind in WRITER_KINDS:
        o = Opened(tmp_path / kind, kind, map_size=4 << 20, max_map_size=4 << 20)
        try:
            ids: list[bytes] = []
            while not o.writer.report.map_full:
                write = enqueue(b"x" * 50_000)
                o.writer.submit(write)
                try:
                    ids.append(result(write))
                except BackPressure as exc:
                    assert "full" in exc.reason
            assert 10 < len(ids) < 200
            bounce = NewMessage(envelope(), b"x" * 50_000)
            both = [Pending("record", ((Outcome(ids[0], 0, RcptState.FAILED),), (bounce,)),
                            50_000, None, Future()),
                    Pending("record", (tuple(Outcome(i, 0, RcptState.DELIVERED)
                                             for i in ids[1:]), ()), 0, None, Future())]
            for write in both:
                o.writer.submit(write)
            with pytest.raises(BackPressure):
                result(both[0])
            assert result(both[1]) is None  # outcomes alone commit: they free space
            assert o.stored(ids[0]) is not None and o.stored(ids[1]) is None
        finally:
            o.close()


def test_the_loop_never_blocks_on_the_pipe_while_the_writer_process_is_behind(
    tmp_path: Path,
) -> None:
    """The loop writes a turn's frame itself only while the pipe has room for it: with the
    writer held (as by a slow disk), more than a pipe's worth handed over one turn at a
    time, and a frame larger than the pipe, the loop keeps running, and every message
    commits once the writer goes on."""
    q = LmdbQueue(tmp_path, min_free_disk=0, writer="process")
    bodies = [bytes([65 + i]) * (600 << 10) for i in range(4)] + [b"z" * (3 << 20)]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async def go() -> list[bytes]:
        ticker = asyncio.create_task(tick())
        with write_lock(tmp_path):
            waiting = []
            for body in bodies:  # one a turn: each its own frame
                waiting.append(asyncio.create_task(q.enqueue(envelope(), body)))
                await until(lambda: q.pending == len(waiting), 10, "the write handed over")
            assert q.pending == len(bodies)
            now = ticks
            await until(lambda: ticks > now + 5, 10, "the loop runs while the writer waits")
            assert not any(task.done() for task in waiting)
        ids = await asyncio.gather(*waiting)
        ticker.cancel()
        return ids

    try:
        ids = asyncio.run(go())
        assert [q.body(qid) for qid in ids] == bodies
    finally:
        q.close_sync()


def test_a_writer_process_that_dies_fails_what_waits_and_the_store_refuses_mail(
    tmp_path: Path,
) -> None:
    """Only a process can die under the store; a thread goes with it."""
    q = LmdbQueue(tmp_path, min_free_disk=0, writer="process")

    async def go() -> None:
        with write_lock(tmp_path):  # the writer holds the message, uncommitted
            waiting = asyncio.create_task(q.enqueue(envelope(), b"x"))
            await until(lambda: q.pending == 1, 10, "the write handed to the writer")
            os.kill(q.writer_pid, signal.SIGKILL)
            with pytest.raises(QueueClosed):
                await waiting
        pressure = q.pressure()
        assert pressure is not None and "gone" in pressure.reason
        with pytest.raises(BackPressure, match="gone"):
            await q.enqueue(envelope(), b"y")

    try:
        asyncio.run(go())
        assert q.count() == 0  # nothing acknowledged, nothing stored
    finally:
        q.close_sync()


def test_the_writer_process_imports_no_part_of_the_callers_side() -> None:
    """The program the server starts loads the commit code and nothing of the store that
    starts it (no import cycle, nothing private shared)."""
    code = ("import sys, engine.queue.writer_process; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('engine.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         text=True).stdout.split()
    assert "engine.queue.lmdb_txn" in out
    assert "engine.queue.lmdb_store" not in out and "engine.queue.writer" not in out


@pytest.mark.parametrize("kind", WRITER_KINDS)
def test_the_store_serves_the_queue_store_interface(tmp_path: Path, kind: WriterKind) -> None:
    """What the scheduler, the control channel, the viewer and ingest use, through the
    protocol they are typed on."""
    q = LmdbQueue(tmp_path, min_free_disk=0, writer=kind)
    store: QueueStore = q

    async def go() -> bytes:
        qid = await store.enqueue(envelope(), b"body")
        await store.save_setting("suspended", b'["d.test"]')
        return qid

    try:
        qid = asyncio.run(go())
        env, body = store.get_with_body(qid)
        assert env.queue_id == qid and body == b"body" == store.body(qid)
        assert store.setting("suspended") == b'["d.test"]' and store.setting("none") is None
        assert store.count() == 1 and store.corrupt() == [] == store.scan_corrupt()
        stats = store.stats
        assert stats.enqueued == 1 and stats.commits == 2 and stats.map_size >= 256 << 20
        assert f"map {stats.map_size >> 20} MiB, 1 messages" in store.describe()
        assert store.pressure() is None
    finally:
        q.close_sync()


@pytest.mark.parametrize("size", [10, 3 << 20])
def test_a_frame_crosses_the_pipe_whole_whatever_its_size(size: int) -> None:
    # One writev while the pipe has room; larger than the pipe (3 MiB against at most
    # 1 MiB), the rest follows in writes as the reader drains it.
    read_fd, write_fd = os.pipe()
    widen(write_fd)
    frame = [(1, "inject", (os.urandom(size),), size)]
    got: Future[Any] = Future()

    def reader() -> None:
        got.set_result((read_frame(read_fd), read_frame(read_fd)))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        write_frame(write_fd, frame)
        write_frame(write_fd, "next")
    finally:
        os.close(write_fd)
        thread.join(timeout=30)
        os.close(read_fd)
    assert got.result(timeout=0) == (frame, "next")


def test_frames_read_in_any_pieces_come_out_whole() -> None:
    """The event loop reads the answers as they come (non-blocking): a frame may end in
    the next read, several may come in one."""
    frames = [("a", 1), list(range(300)), None, b"x" * 70_000]
    stream = b"".join(b"".join(pack_frame(f)) for f in frames)
    for piece in (1, 7, 8, 9, 4096, len(stream)):
        buffer = bytearray()
        got: list[Any] = []
        for start in range(0, len(stream), piece):
            buffer += stream[start:start + piece]
            got += take_frames(buffer)
        assert got == frames and not buffer


def test_the_answers_reach_threads_and_loops_whoever_reads_them(tmp_path: Path) -> None:
    """A writer process answers a tool's thread (no loop), then the event loops that
    hand writes over, one after another (the first closed before the second), then a
    thread again, and closes with a write of a closed loop still unanswered."""
    q = LmdbQueue(tmp_path, min_free_disk=0, writer="process")

    async def from_loop() -> list[bytes]:
        ids = list(await asyncio.gather(*(q.enqueue(envelope(), b"loop") for _ in range(3))))
        # a thread's write while the loop reads the answers: the loop settles it too
        ids.append(await asyncio.get_running_loop().run_in_executor(
            None, q.enqueue_sync, envelope(), b"thread"))
        return ids

    async def left_unanswered() -> None:
        task = asyncio.create_task(q.enqueue(envelope(), b"last"))
        await until(lambda: q.pending == 1, 10, "the write handed over")
        task.cancel()  # never awaited: its answer comes after the loop's end

    try:
        ids = [q.enqueue_sync(envelope(), b"first")]
        ids += asyncio.run(from_loop())
        ids += asyncio.run(from_loop())
        ids.append(q.enqueue_sync(envelope(), b"after"))
        with write_lock(tmp_path):  # the writer holds "last" until its loop has closed
            asyncio.run(left_unanswered())
    finally:
        q.close_sync()
    q = LmdbQueue(tmp_path, min_free_disk=0)
    try:
        assert [q.body(qid) for qid in ids] == (
            [b"first"] + [b"loop"] * 3 + [b"thread"] + [b"loop"] * 3 + [b"thread", b"after"])
        assert q.count() == len(ids) + 1  # and "last": closing committed it
    finally:
        q.close_sync()


def test_the_report_crosses_the_pipe_unchanged() -> None:
    """The committer's report goes over the pipe after every commit (as its fields)."""
    report = Report(True, b"\x00due", QueueStats(3, 2, 1, 0.25, 1, 512 << 20,
                                                  (("queued", 2), ("deferred", 1))))
    frame = b"".join(pack_frame(report))
    assert take_frames(bytearray(frame)) == [report]
    assert take_frames(bytearray(b"".join(pack_frame(Report(False, None, QueueStats()))))) \
        == [Report(False, None, QueueStats())]


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_writer_commits_a_lone_write_at_once() -> None:
    clock = _Clock()
    group = _Grouping(clock=clock)
    group.arrived()
    assert group.wait(1) == 0.0
    group.committed(1)
    # A burst committed, then nothing for a while: the next lone write does not wait.
    group.arrived()
    group.committed(40)
    clock.now += 10 * BUSY
    group.arrived()
    assert group.wait(1) == 0.0


def test_under_load_a_smaller_batch_waits_at_most_the_linger_for_the_last_size() -> None:
    clock = _Clock()
    group = _Grouping(clock=clock)
    group.arrived()
    group.committed(10)
    clock.now += BUSY / 2  # the next writes came soon after the commit: busy
    group.arrived()
    assert group.wait(3) == pytest.approx(LINGER)
    assert group.wait(10) == 0.0  # as large as the last group: at once
    clock.now += LINGER / 2
    assert group.wait(3) == pytest.approx(LINGER / 2)
    clock.now += LINGER
    assert group.wait(3) == 0.0  # the linger has passed: whatever has come commits
    group.committed(3)
    clock.now += BUSY / 2
    group.arrived()
    assert group.wait(3) == 0.0  # the size followed the last group down


def test_a_linger_of_zero_commits_every_batch_at_once() -> None:
    clock = _Clock()
    group = _Grouping(0.0, clock=clock)  # [queue] commit_linger = 0
    group.arrived()
    group.committed(10)
    clock.now += BUSY / 2
    group.arrived()
    assert group.wait(3) == 0.0

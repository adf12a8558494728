"""The queue's writer: one per store, behind one interface, in a thread or in a process.

:class:`Writer` is what the caller's side (``engine.queue.lmdb_store``) may ask of it:
take a write (:meth:`Writer.submit`), say how many are waiting (back pressure), report
the committer's state (map full, statistics, the lowest due key written), say whether it
is gone, and close (commit everything handed over, then stop).

Group commit (both implementations, :class:`_Inbox`): callers hand writes over and wait;
the writer takes everything waiting (up to ``batch_limit`` writes and ``batch_bytes`` of
new messages), commits it in one transaction (``engine.queue.lmdb_txn.Committer``: one
fsync in ``fsync`` mode), and only then settles the callers, one wake-up per event loop
per batch.  Nothing is settled before the commit that holds it has returned.

- :class:`ThreadWriter` commits in a thread of this process, on the caller's open
  environment (LMDB's locks are per process: one environment per process).  Tools and
  tests use it.
- :class:`ProcessWriter` commits in a child process (``engine.queue.writer_process``):
  ``ferry serve`` uses it, see that module for why.  The writes an event loop hands over
  in one turn go down the pipe as one frame from the loop itself, at the end of the turn,
  when the pipe has room for it (it then cannot block); a light thread frames the rest
  (writes from threads, and a frame the pipe has no room for).  The answers are read by
  that event loop too (the pipe watched with ``add_reader``), which settles its callers
  at once; by a thread only when no loop can (tools' writes, a close after the loop's
  end).  When the child dies, every waiting write fails with ``QueueClosed`` and the
  writer is lost (the store refuses new mail).

It must never know SMTP, read the queue for a caller, or settle a write before its commit.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import queue as thread_queue
import subprocess
import sys
import termios
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast

import orjson

from engine.ops.figures import COMMIT_SECONDS, COMMIT_WRITES, Histogram
from engine.queue.api import QueueClosed
from engine.queue.lmdb_txn import Committer, Database, Report, Result, WriterParams
from engine.queue.writer_process import pack_frame, read_frame, take_frames, widen, write_parts

log = logging.getLogger("ferry.queue")

WriterKind = Literal["thread", "process"]
WRITER_KINDS: Final[tuple[WriterKind, ...]] = ("thread", "process")


@dataclass(slots=True)
class Pending:
    """A write handed to the writer, and how to tell its caller: a future of the caller's
    event loop (``loop``), or a thread's future (``loop`` None)."""

    kind: str
    args: tuple[Any, ...]
    size: int
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | Future[Any]


class Writer(Protocol):
    """The queue's writer, whichever runs it (see the module docstring)."""

    #: commit round trips (seconds) and writes per commit, measured in this process
    commit_seconds: Histogram
    commit_writes: Histogram

    def submit(self, write: Pending) -> None:
        """Hand a write over (any thread; one with a ``loop``, on that loop's thread); its
        future is settled after its commit."""
        ...

    @property
    def pending(self) -> int:
        """Writes handed over and not settled yet."""
        ...

    @property
    def report(self) -> Report:
        """The committer's state as of the last commit (its ``due_low`` is that commit's
        alone: a reader paging the due index takes them all with :meth:`take_due_low`)."""
        ...

    def take_due_low(self) -> bytes | None:
        """The lowest due-index key committed since the last call; None: none."""
        ...

    @property
    def lost(self) -> str | None:
        """Why the writer can take no more (it died), or None."""
        ...

    @property
    def pid(self) -> int:
        """The process the commits run in."""
        ...

    def close(self) -> None:
        """Commit and settle everything handed over, then stop (blocking)."""
        ...


class _Inbox:
    """What both writers share: the hand-over queue with its batches, and settling."""

    def __init__(self, params: WriterParams, report: Report) -> None:
        self.batch_limit = max(1, params.batch_limit)
        self.batch_bytes = params.batch_bytes
        self._ops: thread_queue.SimpleQueue[Pending | None] = thread_queue.SimpleQueue()
        # Plain attributes, not properties: the store reads them for every message it
        # admits (back pressure).
        self.pending = 0
        self._pending_lock = threading.Lock()
        self.report = report
        self._due_low: bytes | None = report.due_low
        self._due_low_lock = threading.Lock()
        self.lost: str | None = None
        self._closing = False
        #: For metrics, measured in this process: seconds from handing a batch to the
        #: committer until its commit returned, and the writes each commit held.
        self.commit_seconds = Histogram(COMMIT_SECONDS)
        self.commit_writes = Histogram(COMMIT_WRITES)

    def submit(self, write: Pending) -> None:
        if self._closing or self.lost is not None:
            raise QueueClosed("queue database is closed")
        with self._pending_lock:
            self.pending += 1
        self._ops.put(write)

    def take_due_low(self) -> bytes | None:
        with self._due_low_lock:
            low, self._due_low = self._due_low, None
        return low

    def _end_input(self) -> None:
        """No more writes: the batches end after the ones already handed over."""
        self._closing = True
        self._ops.put(None)

    def _batches(self) -> Iterator[tuple[list[Pending], int]]:
        """What callers handed over, a batch at a time (everything waiting, up to the
        batch limits) with its size, until close."""
        stop = False
        while not stop:
            first = self._ops.get()
            batch: list[Pending] = []
            size = 0
            item: Pending | None = first
            while item is not None:
                batch.append(item)
                size += item.size
                if len(batch) >= self.batch_limit or size >= self.batch_bytes:
                    break
                try:
                    item = self._ops.get_nowait()
                except thread_queue.Empty:
                    break
            else:
                stop = True
            if batch:
                yield batch, size

    def _absorb(self, report: Report) -> None:
        """Take in the committer's report (before settling: a caller woken by its commit
        sees the state that commit left)."""
        self.report = report
        low = report.due_low
        if low is not None:
            with self._due_low_lock:
                if self._due_low is None or low < self._due_low:
                    self._due_low = low

    def _settle(self, results: list[Result[Pending]],
                here: asyncio.AbstractEventLoop | None = None) -> None:
        """The writer is done with these: wake their callers.  ``here``: the event loop
        this runs on (its callers are settled at once, without a wake-up)."""
        with self._pending_lock:
            self.pending -= len(results)
        by_loop: dict[asyncio.AbstractEventLoop, list[Result[Pending]]] = defaultdict(list)
        for item in results:
            write, value, error = item
            if write.loop is None:
                future = write.future
                assert isinstance(future, Future)
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
            else:
                by_loop[write.loop].append(item)
        for loop, items in by_loop.items():
            if loop is here:
                _settle_in_loop(items)
                continue
            # One wake-up per loop per commit, not one per message.
            with suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_settle_in_loop, items)


def _settle_in_loop(items: list[Result[Pending]]) -> None:
    for write, value, error in items:
        future = write.future
        if future.done():
            continue  # the caller was cancelled; the commit stands (at-least-once)
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class ThreadWriter(_Inbox):
    """Commits in a thread of this process, on the caller's environment ``db``."""

    def __init__(self, db: Database, params: WriterParams) -> None:
        self._committer = Committer(db, params)
        super().__init__(params, self._committer.report())
        self._thread = threading.Thread(target=self._run, name="ferry-queue-writer",
                                        daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return os.getpid()

    def _run(self) -> None:
        committer = self._committer
        for batch, size in self._batches():
            started = time.monotonic()
            results = committer.commit(batch, size)
            self.commit_seconds.observe(time.monotonic() - started)
            self.commit_writes.observe(len(results))
            self._absorb(committer.report())
            self._settle(results)

    def close(self) -> None:
        self._end_input()
        self._thread.join()


#: The kind of a frame the loop packed and handed to the courier thread to write.
_FRAMED: Final = "framed"


class ProcessWriter(_Inbox):
    """Commits in a child process (``engine.queue.writer_process``), which opens the
    database on its own; hands it batches and settles its answers.

    Writes from an event loop are gathered for the turn of the loop and written as one
    frame by the loop (:meth:`_ship`): waking the courier thread for each took a futex
    wake, a GIL hand-over and about two context switches of the loop's thread per message
    (measured on 2026-12-07, benchmarks/README.md), more than framing costs the loop."""

    def __init__(self, params: WriterParams) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.queue.writer_process",
             orjson.dumps(params.as_dict()).decode()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out = self.proc.stdout.fileno()
        widen(self._in.fileno())
        widen(self._out)
        ready = read_frame(self._out)
        if not isinstance(ready, Report):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the queue writer process did not start: {ready!r}")
        super().__init__(params, ready)
        self._waiting: dict[int, Pending] = {}
        #: Writes of each event loop's current turn, framed at its end (_ship).
        self._outbox: dict[asyncio.AbstractEventLoop, list[Pending]] = {}
        #: Held while a frame is written: frames never interleave in the pipe; the pipe
        #: is closed under it, so nothing writes to a closed (or reused) descriptor.
        self._pipe_lock = threading.Lock()
        try:
            self._capacity = fcntl.fcntl(self._in.fileno(), fcntl.F_GETPIPE_SZ)
        except (OSError, AttributeError):
            self._capacity = 0  # unknown: every frame goes through the courier
        #: (last ident, monotonic time sent, bytes) of each frame not answered yet: the
        #: commit round trip of an answer is from its oldest frame's sending.
        self._frames: deque[tuple[int, float, int]] = deque()
        #: Their bytes: at least the pipe's capacity less this is free (a frame leaves
        #: the pipe before its answer comes), known without asking the kernel.
        self._unanswered = 0
        self._lock = threading.Lock()
        self._next = 0
        self._courier = threading.Thread(target=self._send, name="ferry-queue-courier",
                                         daemon=True)
        self._courier.start()
        #: Who reads the answers (see :meth:`_answers_to`): the event loop that handed
        #: writes over (``_reader``, the pipe watched with add_reader), or, with no loop
        #: to do it, a thread (``_receiver``).  Answers read, not yet whole, in ``_inbuf``.
        self._reader: asyncio.AbstractEventLoop | None = None
        self._receiver: threading.Thread | None = None
        self._inbuf = bytearray()
        #: Held while the reader changes and while a loop reads and takes answers in: a
        #: reader, once replaced, reads no more.
        self._read_lock = threading.Lock()
        #: Set once the end of the answers has been read (the writer exited).
        self._answered = threading.Event()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def submit(self, write: Pending) -> None:
        loop = write.loop
        if loop is None:
            super().submit(write)  # a thread's write: the courier frames it
            self._answers_to(None)
            return
        if self._closing or self.lost is not None:
            raise QueueClosed("queue database is closed")
        if self._reader is not loop:
            self._answers_to(loop)
        with self._pending_lock:
            self.pending += 1
        box = self._outbox.get(loop)
        if box is None:
            box = self._outbox[loop] = []
            loop.call_soon(self._ship, loop)
        box.append(write)

    def _pack(self, batch: list[Pending]) -> tuple[bytes, bytes]:
        """The frame of ``batch``; its writes now wait for their answers."""
        frame = []
        with self._lock:
            for write in batch:
                self._next += 1
                self._waiting[self._next] = write
                frame.append((self._next, write.kind, write.args, write.size))
            last = self._next
        packed = pack_frame(frame)
        size = len(packed[0]) + len(packed[1])
        with self._lock:
            self._frames.append((last, time.monotonic(), size))
            self._unanswered += size
        return packed

    def _ship(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the turn's writes of ``loop`` as one frame, from the loop when the pipe
        has room for all of it (so the write cannot block the loop) and the writer keeps
        up; else they go through the courier thread."""
        batch = self._outbox.pop(loop, None)
        if not batch:
            return
        if self._in.closed or self.lost is not None:
            # Closed since they were handed over: nothing will take them.
            self._settle([(w, None, QueueClosed(self.lost or "queue database is closed"))
                          for w in batch])
            return
        if self._pipe_lock.acquire(blocking=False):
            try:
                # What the unanswered frames leave free is free for sure (most turns:
                # no system call); when that says too little, the kernel says how much.
                known = self._capacity - self._unanswered
                room = 0 if self._in.closed else known if known > self._capacity // 2 \
                    else self._room()
                # Half the pipe free: the writer keeps up.  Otherwise the writes wait
                # for the courier as they are, not pickled beside themselves.
                if room > self._capacity // 2:
                    frame = self._pack(batch)
                    size = len(frame[0]) + len(frame[1])
                    if size > room and room == known:
                        room = self._room()
                    if size <= room:
                        write_parts(self._in.fileno(), frame)
                    else:  # larger than the room: the courier writes it as it drains
                        self._ops.put(Pending(_FRAMED, frame, 0, None, Future()))
                    return
            except OSError as exc:
                self._fail(f"queue writer process gone: {exc}")
                return
            finally:
                self._pipe_lock.release()
        for write in batch:  # (the courier is writing, or the writer is behind)
            self._ops.put(write)

    def _room(self) -> int:
        """Bytes the pipe to the writer takes now without blocking."""
        queued = array.array("i", [0])
        fcntl.ioctl(self._in.fileno(), termios.FIONREAD, queued)
        return self._capacity - queued[0]

    def _send(self) -> None:
        fd = self._in.fileno()
        try:
            for batch, _size in self._batches():
                frames = [cast(tuple[bytes, bytes], w.args) for w in batch
                          if w.kind == _FRAMED]
                writes = [w for w in batch if w.kind != _FRAMED]
                if writes:
                    frames.append(self._pack(writes))
                try:
                    with self._pipe_lock:
                        for frame in frames:
                            write_parts(fd, frame)
                except OSError as exc:
                    self._fail(f"queue writer process gone: {exc}")
        finally:
            with self._pipe_lock:
                self._in.close()  # the writer commits what it has and exits

    # --- the answers ---------------------------------------------------------------
    #
    # Read by the event loop that hands writes over, not by a thread: a thread woke for
    # every answer, took the GIL from the loop and woke the loop again with
    # call_soon_threadsafe, ~50 µs of CPU a message and two GIL hand-overs (measured
    # on 2026-12-07, benchmarks/README.md).  The loop reads the pipe when it is readable
    # and settles its own callers at once.  A thread reads them only when no loop can:
    # writes from threads with no loop reading (tools), and the end of a close whose loop
    # no longer runs.

    def _answers_to(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Make sure someone reads the answers to a write just handed over: ``loop`` (the
        caller's, on its thread), or for a thread's write (``loop`` None) the loop that
        reads them already if it still runs, else a thread."""
        current = self._reader
        if self._receiver is not None or (
                loop is None and current is not None and current.is_running()):
            return  # (the common case of a thread's write, without the lock)
        with self._read_lock:
            current = self._reader
            if self._receiver is not None or self._answered.is_set():
                return
            if current is not None and not current.is_closed() and (
                    loop is None or current.is_running()):
                return  # (a loop running elsewhere answers this one's writes too)
            self._detach()
            if loop is None:
                self._receiver = threading.Thread(target=self._receive,
                                                  name="ferry-queue-receiver", daemon=True)
                self._receiver.start()
            else:
                os.set_blocking(self._out, False)
                loop.add_reader(self._out, self._readable, loop)
                self._reader = loop

    def _detach(self) -> None:
        """The loop reading the answers stops (it is closed, or does not run: no callback
        of it runs meanwhile); ``_read_lock`` held."""
        loop, self._reader = self._reader, None
        if loop is not None and not loop.is_closed():
            with suppress(Exception):  # (gone with its loop's end, or the pipe's)
                loop.remove_reader(self._out)

    def _readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """The answer pipe is readable (on ``loop``, the reader)."""
        with self._read_lock:
            if self._reader is not loop:
                return  # the reading passed to someone else meanwhile
            try:
                chunk = os.read(self._out, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._detach()
                self._end_of_answers()
                return
            self._take_in(chunk, loop)

    def _receive(self) -> None:
        """The answers, read by a thread (blocking) until the writer's end; it is
        ``_receiver`` already, so no loop reads any more."""
        os.set_blocking(self._out, True)
        while chunk := os.read(self._out, 1 << 16):
            with self._read_lock:
                self._take_in(chunk, None)
        self._end_of_answers()

    def _take_in(self, chunk: bytes, here: asyncio.AbstractEventLoop | None) -> None:
        """Answers read (``chunk``): each whole frame taken in, a partial one kept for
        the next read (``_read_lock`` held); ``here``: the loop reading, if any."""
        self._inbuf += chunk
        for message in take_frames(self._inbuf):
            self._answer(message, here)

    def _answer(self, message: Any, here: asyncio.AbstractEventLoop | None) -> None:
        """Take in one answer frame (``_read_lock`` held); ``here``: the loop reading."""
        results, report = message
        with self._lock:
            waiting = self._waiting
            items = [(waiting.pop(ident), value, error) for ident, value, error in results
                     if ident in waiting]
            self._timed(results[-1][0] if results else 0, len(results))
        self._absorb(report)
        self._settle(items, here)

    def _end_of_answers(self) -> None:
        self._answered.set()
        self._fail("queue writer process exited")

    def _timed(self, last: int, writes: int) -> None:
        """The frames up to ident ``last`` are answered (the writer answers in order):
        observe the round trip from the oldest of them (``_lock`` held)."""
        frames = self._frames
        sent = 0.0
        while frames and frames[0][0] <= last:
            sent = sent or frames[0][1]
            self._unanswered -= frames.popleft()[2]
        if sent:
            self.commit_seconds.observe(time.monotonic() - sent)
            self.commit_writes.observe(writes)

    def _fail(self, why: str) -> None:
        with self._lock:
            items: list[Result[Pending]] = [
                (write, None, QueueClosed(why)) for write in self._waiting.values()]
            self._waiting.clear()
        if items or not self._closing:
            log.critical("%s; the queue refuses new mail", why)
            self.lost = why
        self._settle(items)

    def close(self) -> None:
        for loop in list(self._outbox):
            self._ship(loop)  # a turn's writes whose loop has stopped go too
        self._end_input()
        self._courier.join()
        self._wait_answers()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.wait()

    def _wait_answers(self) -> None:
        """Until every answer is read (the writer, its input closed, commits what it has,
        answers and exits): by whoever reads them; by this thread when no loop will."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        while not self._answered.is_set():
            with self._read_lock:
                receiver, loop = self._receiver, self._reader
                if receiver is None and (loop is None or loop is here or loop.is_closed()
                                         or not loop.is_running()):
                    self._detach()  # its loop cannot read them: this thread does
                    receiver = self._receiver = threading.current_thread()
                    take_over = True
                else:
                    take_over = False
            if take_over:
                self._receive()
            elif receiver is not None:
                receiver.join()
            else:
                # The loop reads them, while it runs: look again now and then (a loop
                # that stops meanwhile leaves them to this thread).
                self._answered.wait(0.05)


def start_writer(kind: WriterKind, db: Database, params: WriterParams) -> Writer:
    """A running writer of ``kind`` for the database ``db`` (opened by the caller)."""
    if kind == "thread":
        return ThreadWriter(db, params)
    if kind == "process":
        return ProcessWriter(params)
    raise ValueError(f"writer must be one of {', '.join(WRITER_KINDS)}, not {kind!r}")


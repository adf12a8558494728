"""The queue's writer process: the program ``python -m engine.queue.writer_process``.

It is the far end of ``engine.queue.writer.ProcessWriter`` (``LmdbQueue(writer="process")``,
what ``ferry serve`` uses).  Why a process: py-lmdb releases the GIL around every put, get
and delete, so a writer *thread* and the event loop hand the GIL back and forth several
times per message.  Here the writer's LMDB calls run under a GIL of their own; the server
hands whole batches over a pipe (its event loop writes a turn's batch itself; a light
thread writes the rest) and its event loop reads whole batches of results.  The commit
itself is ``engine.queue.lmdb_txn``'s ``Committer``, the same code a writer thread runs;
this module imports nothing else of the queue (never the caller's side).

Protocol, over the child's stdin and stdout: frames of an 8-byte big-endian length and a
pickle (both ends are this module, started by the same interpreter: never fed from
anywhere else).  The child first sends its first ``Report`` (the database is open) or an
error text.  Server → writer: one batch, a list of ``(ident, kind, args, size)``.  Writer
→ server: ``(results, report)``, results ``[(ident, value, error)]`` for every write of
the batches it committed together, report the committer's ``Report`` (map full, the
lowest due key written, statistics).

Group commit holds across the pipe: the writer takes every batch already waiting into one
transaction.  Nothing is answered before the commit that holds it has returned, and the
server acknowledges nothing before the answer arrives.  When the server dies, the
writer's input ends: it commits what it has (never acknowledged: at-least-once allows
that) and exits.  When the writer dies, every waiting caller gets ``QueueClosed`` and the
store refuses new mail; nothing acknowledged depends on it.

The writer ignores SIGINT and SIGTERM: a Ctrl-C or a group kill reaches the server,
which stops cleanly and closes the pipe; the writer must finish the commits still
handed to it, not die first.  It must never write anything but frames to stdout.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from engine.queue.lmdb_txn import COMMIT_LINGER, Committer, Database, WriterParams

_HEADER: Final = struct.Struct("!Q")
#: The pipes' capacity asked for (Linux's default is 64 KiB; an unprivileged process may
#: ask up to /proc/sys/fs/pipe-max-size, 1 MiB by default): a frame of a few hundred
#: messages then goes in one write.  In 64 KiB pieces, each piece is an os.write that
#: releases the GIL and must take it back from the loop or a thread building messages,
#: up to a switch interval (5 ms) each time, while the writer process waits for the rest.
PIPE_SIZE: Final = 1 << 20


def widen(fd: int) -> None:
    """Ask for a :data:`PIPE_SIZE` buffer on the pipe ``fd`` (Linux); a smaller one (the
    system's limit, another platform) only means more writes per frame."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def pack_frame(obj: object) -> tuple[bytes, bytes]:
    """The frame of ``obj``: its length header and its pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)), data


def write_parts(fd: int, frame: tuple[bytes, bytes]) -> None:
    """Write a :func:`pack_frame` frame whole (blocking until the pipe takes it all)."""
    head, data = frame
    # One system call and no copy of the frame while the pipe has room for it.
    sent = os.writev(fd, frame)
    if sent < len(head) + len(data):
        view = memoryview(head + data)[sent:]
        while view:
            view = view[os.write(fd, view):]


def write_frame(fd: int, obj: object) -> None:
    write_parts(fd, pack_frame(obj))


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """The next frame's object; None at the end of the input."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    data = _read_exact(fd, _HEADER.unpack(head)[0])
    return None if data is None else pickle.loads(data)


def take_frames(buffer: bytearray) -> list[Any]:
    """The objects of the whole frames at the start of ``buffer`` (what non-blocking
    reads gathered), taken out of it; a partial frame stays for the next read."""
    objects = []
    start, end = 0, len(buffer)
    while end - start >= _HEADER.size:
        stop = start + _HEADER.size + _HEADER.unpack_from(buffer, start)[0]
        if stop > end:
            break
        objects.append(pickle.loads(buffer[start + _HEADER.size:stop]))
        start = stop
    if start:
        del buffer[:start]
    return objects


def _portable(error: BaseException | None) -> BaseException | None:
    """An error the other side can unpickle (LMDB's may not survive the trip)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


@dataclass(slots=True)
class _Handed:
    """A write as it came over the pipe (``ident`` names the server's waiting caller)."""

    ident: int
    kind: str
    args: tuple[Any, ...]
    size: int


#: Under load, a batch smaller than the last commit's waits at most this long (seconds,
#: ``[queue] commit_linger``, WriterParams.commit_linger) for more writes before its
#: commit.  Why: a commit costs the writer about as much as the
#: writes of ten messages (its fsyncs and their I/O submissions, LMDB's copy of each
#: tree's upper pages; benchmarks/README.md, issue 12's group commit).  Committing
#: whatever has arrived the moment the last commit returns lets the group size follow
#: the server's speed from turn to turn: a server made slightly slower (its logs on, a
#: busier machine) hands over less per commit, pays more per message, and is slower
#: still.  Holding the size a moment keeps one fsync per group of that size; it adds at
#: most this to an acknowledgement, and nothing when the writer was idle.
LINGER: Final = COMMIT_LINGER
#: "Under load": the batch's first write came within this long of the last commit's
#: end (an idle writer commits a lone message at once).
BUSY: Final = 0.005


class _Grouping:
    """When a gathered batch commits (``linger``, :data:`LINGER` by default): at once,
    unless the writer is busy and the batch is smaller than the last group, then when it
    has grown to that size or the linger has passed, whichever comes first."""

    __slots__ = ("_clock", "_deadline", "_ended", "_gathering", "_last", "_linger")

    def __init__(self, linger: float = LINGER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._linger = linger
        self._clock = clock
        self._last = 0  # writes in the last commit
        self._ended = -math.inf  # when it ended
        self._gathering = False  # the batch being gathered has writes
        self._deadline = -math.inf  # when it commits, whatever its size

    def arrived(self) -> None:
        """Writes came in (the batch being gathered has some now)."""
        if not self._gathering:
            self._gathering = True
            now = self._clock()
            self._deadline = now + self._linger if now - self._ended <= BUSY else now

    def wait(self, size: int) -> float:
        """Seconds to wait for more writes before committing a batch of ``size``."""
        if size >= self._last:
            return 0.0
        return max(0.0, self._deadline - self._clock())

    def committed(self, size: int) -> None:
        """A batch of ``size`` writes was committed."""
        self._last = size
        self._ended = self._clock()
        self._gathering = False


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    params = WriterParams(**json.loads((argv or sys.argv[1:])[0]))
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        db = Database(params)
        committer = Committer(db, params)
    except Exception as exc:
        write_frame(wfd, f"{type(exc).__name__}: {exc}")
        return 1
    write_frame(wfd, committer.report())
    # Whatever the pipe holds is read at once (one read for the frames of several turns
    # of the server's loop, not two a frame and a select between them); its whole frames
    # wait in ``frames`` for a commit, a partial one in ``buffer`` for its rest.
    buffer = bytearray()
    space = bytearray(PIPE_SIZE)
    frames: deque[list[Any]] = deque()
    ended = False
    group = _Grouping(params.commit_linger)
    while True:
        batch: list[Any] = []
        while True:
            while frames and len(batch) < params.batch_limit:
                batch += frames.popleft()
            # Group commit across the pipe: batches already waiting join this one, and
            # under load a small one waits a moment for more (_Grouping).
            if ended or len(batch) >= params.batch_limit or (
                    batch and not select.select([rfd], [], [], group.wait(len(batch)))[0]):
                break
            got = os.readv(rfd, [space])  # blocks while the pipe is empty
            if not got:
                ended = True  # (a partial frame left is nobody's: never acknowledged)
            buffer += memoryview(space)[:got]
            frames += take_frames(buffer)
            group.arrived()
        if not batch:
            break
        writes = [_Handed(*item) for item in batch]
        results = committer.commit(writes, sum(w.size for w in writes))
        write_frame(wfd, ([(w.ident, value, _portable(error)) for w, value, error in results],
                          committer.report()))
        group.committed(len(batch))
    db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

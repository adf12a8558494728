"""The queue's writer in a process of its own (``LmdbQueue(writer="process")``).

Why a process: py-lmdb releases the GIL around every put, get and delete, so a writer
*thread* and the event loop hand the GIL back and forth several times per message (see
``engine.queue.lmdb_store``).  Here the writer's LMDB calls run under a GIL of their own;
the server keeps two light threads that hand whole batches over a pipe and settle whole
batches of results, one GIL hand-over per batch.

Protocol, over the child's stdin and stdout: frames of an 8-byte big-endian length and a
pickle (both ends are this module, started by the same interpreter: never fed from
anywhere else).  The child first sends ``"ready"`` (the database is open) or an error
text.  Server → writer: one batch, a list of ``(ident, kind, args, size)``.  Writer →
server: ``(results, state)``, results ``[(ident, value, error)]`` for every op of the
batches it committed together, state the flags and numbers the server's side reports
(map full, map size, the lowest due key written, statistics).

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

import json
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any, Final

from engine.queue.api import QueueClosed

if TYPE_CHECKING:
    from engine.queue.lmdb_store import LmdbQueue, _Op

log = logging.getLogger("ferry.queue")

_HEADER: Final = struct.Struct("!Q")
_READY: Final = "ready"


def _write_frame(fd: int, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


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


def _read_frame(fd: int) -> Any:
    """The next frame's object; None at the end of the input."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    data = _read_exact(fd, _HEADER.unpack(head)[0])
    return None if data is None else pickle.loads(data)


def _portable(error: BaseException | None) -> BaseException | None:
    """An error the other side can unpickle (LMDB's may not survive the trip)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


class WriterProcess:
    """The server's side: starts the writer, hands it batches, settles its answers."""

    def __init__(self, store: LmdbQueue, params: dict[str, Any]) -> None:
        self.store = store
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.queue.writer_process", json.dumps(params)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin
        self._out = self.proc.stdout.fileno()
        ready = _read_frame(self._out)
        if ready != _READY:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the queue writer process did not start: {ready!r}")
        self._waiting: dict[int, _Op] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._courier = threading.Thread(target=self._send, name="ferry-queue-courier",
                                         daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="ferry-queue-receiver",
                                          daemon=True)
        self._courier.start()
        self._receiver.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self) -> None:
        fd = self._in.fileno()
        try:
            for batch, _size in self.store.batches():
                frame = []
                with self._lock:
                    for op in batch:
                        self._next += 1
                        op.ident = self._next
                        self._waiting[op.ident] = op
                        frame.append((op.ident, op.kind, op.args, op.size))
                try:
                    _write_frame(fd, frame)
                except OSError as exc:
                    self._fail(f"queue writer process gone: {exc}")
        finally:
            self._in.close()  # the writer commits what it has and exits

    def _receive(self) -> None:
        while (message := _read_frame(self._out)) is not None:
            results, state = message
            with self._lock:
                items = [(self._waiting.pop(ident), value, error)
                         for ident, value, error in results]
            self.store.absorb(state)
            self.store.settle(items)
        self._fail("queue writer process exited")

    def _fail(self, why: str) -> None:
        with self._lock:
            items: list[tuple[_Op, Any, BaseException | None]] = [
                (op, None, QueueClosed(why)) for op in self._waiting.values()]
            self._waiting.clear()
        if items or not self.store.closing:
            log.critical("%s; the queue refuses new mail", why)
            self.store.writer_lost()
        self.store.settle(items)

    def join(self) -> None:
        self._courier.join()
        self._receiver.join()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    from engine.queue.lmdb_store import LmdbQueue, _Op

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    params = json.loads((argv or sys.argv[1:])[0])
    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        store = LmdbQueue(params.pop("path"), writer="none", **params)
    except Exception as exc:
        _write_frame(wfd, f"{type(exc).__name__}: {exc}")
        return 1
    _write_frame(wfd, _READY)
    ended = False
    while not ended:
        frame = _read_frame(rfd)
        if frame is None:
            break
        batch = list(frame)
        # Group commit across the pipe: batches already waiting join this transaction.
        while len(batch) < store.batch_limit and select.select([rfd], [], [], 0)[0]:
            more = _read_frame(rfd)
            if more is None:
                ended = True
                break
            batch += more
        ops = [_Op(kind, args, None, None, size, ident) for ident, kind, args, size in batch]
        results = store._commit_batch(ops, sum(op.size for op in ops))
        _write_frame(wfd, ([(op.ident, value, _portable(error)) for op, value, error in results],
                           store.state()))
    store.close_sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

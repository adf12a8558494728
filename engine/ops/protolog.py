"""The protocol log: one line per SMTP command, reply line and session event, per connector.

This is the Exchange "protocol log" idea (Postfix calls it verbose smtpd logging): an
operator switches it on for one receive connector, or one send connector, and sees the
conversation of every session.  A :class:`ProtocolLog` owns one file: for the receive side
``<directory>/protocol-<connector>.log``, for the send side (``side="send"``, the outbound
connections of ``engine.client.smtp``) ``<directory>/send-protocol-<connector>.log``; the
prefixes differ, so no pair of connector names can share a file.  Each session (or
outbound connection) writes through the :class:`SessionLog` handle that
:meth:`ProtocolLog.session` returns.

Line format (UTF-8, fields separated by one TAB, ended by LF)::

    2024-05-01T12:34:56.789Z  <session id>  <peer>  <direction>  <text>

``<peer>`` is the other end: the client's address on the receive side, the next hop's
``address:port`` on the send side (its host name is in the ``connecting to`` event and
Ferry's local address in ``connected from``).  ``<`` is a line received from the peer,
``>`` a line sent to it (a reply on the receive side, a command on the send side), ``*``
an event (connect, TLS established, a message body and its size, disconnect, ...).  Every
field is sanitised (:func:`sanitise`): C0 controls (TAB, CR, LF, NUL included), DEL, C1
controls, the Unicode line and paragraph separators, bidirectional overrides, the
backslash itself and bytes that are not UTF-8 are written as backslash escapes, and the
text is cut at :data:`MAX_TEXT` characters ending in ``…``.  Nothing a client sends can
therefore split a log line, forge a field or a line, or disguise itself in a terminal
(DESIGN.md "Wire rules": nothing from the wire reaches a log line with a raw CR, LF or
NUL).  The escaping is lossless and unambiguous: ``\\xNN`` is the raw byte NN, ``\\uNNNN``
the code point, ``\\\\`` a backslash, and a literal ``…`` is escaped so the marker means
truncation.

AUTH payloads are never written.  The caller marks them (``recv(line, secret=True)``,
:meth:`SessionLog.redact_next`, or ``send(data, secret=True)`` for what the send side
writes): an ``AUTH`` command keeps its verb and a known SASL mechanism name and shows
``****`` for the rest; any other secret line is ``****``.

Each call renders its line(s) at once into the log's buffer (``Lines`` of
engine.ops.logline: compiled, a copy of the bytes for a line that needs no escape), on the
event loop; :class:`SessionLog` is engine.ops.logline's too, so when compiled a line's
whole path (the clock, the rendering, the test for a hand-over) is one call into C.  The
buffer is handed to the writer thread (:class:`_Writer`, one for every log of the process)
as one bytes when :meth:`ProtocolLog.flush` runs (from a periodic task such as
:meth:`ProtocolLog.run_flusher`), when it passes :data:`FLUSH_BYTES`, or when a line is
logged ``flush_interval`` seconds after the last flush; the thread appends it with one
``write``, at most :data:`GATHER_SECONDS` later.  The file is rotated to ``.1`` .. ``.5``
when the next write would take it past ``max_bytes``.
:meth:`ProtocolLog.sync` and :meth:`ProtocolLog.close` wait until the lines are written.

Rendering costs little: a chunk of lines that need no escape and no cut (printable ASCII
without a backslash: SMTP commands and replies) is copied as the bytes it already is, its
line ends replaced by the next line's stamp and fields, and a time stamp is formatted
once per second, its milliseconds written in place.  The bytes written are the same as
stamping and sanitising line by line (benchmarks/README.md, "the protocol logs made
cheap" and issue 12's last point: rendering raw entries later in the writer thread cost
more than rendering them at once in C, the thread holding the GIL to walk entries long
gone from the CPU's caches).

This module observes; it must never change what the server does.  It never raises into
its caller on a full disk, a removed or unwritable directory or a failed rotation: lines
that cannot be written are counted in :attr:`ProtocolLog.dropped` and logging carries on
(reopening the file when the path comes back); nor does it make the event loop wait for
the disk: past :data:`MAX_PENDING` bytes not yet written, lines are dropped and counted.
It must never write an AUTH secret (secrets are masked before they are buffered), nor a
raw control character from the wire.  A :class:`ProtocolLog` and its sessions belong to
one event loop (not thread-safe); only the writer thread touches its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Final, Literal

from engine.ops._logline_py import MAX_TEXT, format_timestamp, sanitise
from engine.ops.logline import Lines, SessionLog

__all__ = [
    "FLUSH_BYTES",
    "GATHER_SECONDS",
    "GENERATIONS",
    "MAX_TEXT",
    "ProtocolLog",
    "SessionLog",
    "Side",
    "format_timestamp",
    "sanitise",
]

_log = logging.getLogger("ferry.protolog")

#: The buffer is flushed as soon as its rendered lines are this many bytes.  Large, so that
#: under load the writer thread makes one write a log per round (each system call hands
#: the GIL back and forth with the event loop), not one per 64 KiB.
FLUSH_BYTES: Final = 1 << 20
#: The writer thread gathers this long after each round of writes: a line reaches the file
#: within about this long of its flush.
GATHER_SECONDS: Final = 0.2
#: Bytes handed to the writer thread and not written yet beyond which lines are dropped.
MAX_PENDING: Final = 32 << 20
#: Rotated generations kept: ``.1`` (newest) .. ``.5`` (oldest).
GENERATIONS: Final = 5
#: The two sides a log can belong to, and the prefix of their file names.
Side = Literal["receive", "send"]
_PREFIX: Final[dict[str, str]] = {"receive": "protocol-", "send": "send-protocol-"}

_CONNECTOR_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ProtocolLog:
    """The protocol log of one connector (``directory=None``: switched off); ``side``
    says whether it is a receive connector's or a send connector's.

    Switched off, every call is a cheap no-op and no file is created.  Switched on, the
    file is opened (created with mode 0o640, less what the umask removes) at once; if
    that fails the error is kept in :attr:`last_error`, lines are counted in
    :attr:`dropped`, and each flush tries again.  ``clock`` (seconds since the epoch)
    stamps the lines and decides when ``flush_interval`` has passed.
    """

    def __init__(
        self,
        directory: Path | None,
        connector: str,
        *,
        side: Side = "receive",
        max_bytes: int = 100 << 20,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The name becomes part of a path: no separators, no "..", no hidden files.
        if _CONNECTOR_NAME.fullmatch(connector) is None:
            raise ValueError(f"connector name not usable in a file name: {connector!r}")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if not flush_interval > 0:
            raise ValueError("flush_interval must be positive")
        self.connector: Final = connector
        self.max_bytes: Final = max_bytes
        self.flush_interval: Final = flush_interval
        self.path: Final = (
            None if directory is None else Path(directory) / f"{_PREFIX[side]}{connector}.log"
        )
        #: Lines that could not be written (disk full, directory gone, log closed).
        self.dropped = 0
        #: The last OS error met while opening, writing or rotating, for the operator.
        self.last_error: str | None = None
        #: Lines rendered and not handed to the writer yet; its ``add`` says when they
        #: are due to be (FLUSH_BYTES, or its ``due`` time: the flush interval after the
        #: last flush, at once once closed: the flush counts the lines as dropped).
        self._buf = Lines(FLUSH_BYTES)
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._size = 0
        # The file does not end in LF (a write cut short): start the next write with one,
        # so half a line can never be glued to the next.
        self._torn = False
        self._closed = self.path is None
        self._clock = clock
        self._buf.due = clock() + flush_interval
        if self.path is not None:
            self._open()

    # --- public ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when this log is switched on and not closed."""
        return not self._closed

    def session(self, session_id: str, client: str) -> SessionLog:
        """A handle for one SMTP session; ``client`` is the peer address as shown."""
        if self.path is None:
            return SessionLog(None, session_id, client)
        return SessionLog(self, session_id, client)

    def flush(self) -> None:
        """Hand the buffered lines to the writer thread, which writes them with one append
        within :data:`GATHER_SECONDS`; never blocks, never raises ``OSError``."""
        now = self._clock()
        buf = self._buf
        buf.due = now + self.flush_interval if not self._closed else -math.inf
        if not buf.size:
            return
        lines = buf.lines
        chunk = buf.take()
        if self._closed:
            self.dropped += lines
            return
        _WRITER.hand_over(self, chunk, lines)

    def sync(self) -> None:
        """:meth:`flush`, then wait until every line handed over so far is in the file (or
        counted in :attr:`dropped`).  Blocks: for tests, tools and :meth:`close`, never
        for the event loop's turns."""
        self.flush()
        if self.path is not None:
            _WRITER.sync()

    async def run_flusher(self) -> None:
        """Flush every ``flush_interval`` seconds until cancelled, and once on the way out."""
        if self.path is None:
            return
        try:
            while not self._closed:
                await asyncio.sleep(self.flush_interval)
                self.flush()
        finally:
            self.flush()

    def close(self) -> None:
        """Write what is buffered and close the file (blocks until written).  Lines logged
        afterwards are counted as dropped."""
        if self._closed:
            return
        self.sync()
        self._closed = True
        self._buf.due = -math.inf
        self._close_fd()

    def __enter__(self) -> ProtocolLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the file -------------------------------------------------------------------------

    def _note(self, err: OSError) -> None:
        self.last_error = f"{self.path}: {err.strerror or err}"

    def _open(self) -> None:
        assert self.path is not None
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o640)
        except OSError as err:
            self._note(err)
            return
        try:
            st = os.fstat(fd)
            # A previous run cut short by a full disk may have left half a line.
            self._torn = st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n"
        except OSError as err:
            self._note(err)
            os.close(fd)
            return
        self._fd = fd
        self._ino = (st.st_dev, st.st_ino)
        self._size = st.st_size

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._ino = self._fd, None, None
            try:
                os.close(fd)
            except OSError as err:
                self._note(err)

    def _current(self) -> bool:
        """Make sure ``_fd`` is the file at ``path`` (it may have been removed, renamed
        away by an outside rotation, or never opened); True when there is one."""
        assert self.path is not None
        if self._fd is not None:
            try:
                st = os.stat(self.path)
            except OSError:
                pass
            else:
                if (st.st_dev, st.st_ino) == self._ino:
                    self._size = st.st_size
                    return True
            self._close_fd()
        self._open()
        return self._fd is not None

    def _rotate(self) -> None:
        assert self.path is not None
        self._close_fd()
        name = self.path.name
        try:
            for i in range(GENERATIONS - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(
                        self.path.with_name(f"{name}.{i}"), self.path.with_name(f"{name}.{i + 1}")
                    )
            os.replace(self.path, self.path.with_name(f"{name}.1"))
        except OSError as err:
            # Rotation failed: keep appending to the big file rather than lose lines.
            self._note(err)
        self._open()

    def _write(self, chunk: bytes) -> None:
        lines = chunk.count(b"\n")
        if self.path is None or not self._current():
            self.dropped += lines
            return
        if self._size > 0 and self._size + len(chunk) > self.max_bytes:
            self._rotate()
            if self._fd is None:
                self.dropped += lines
                return
        assert self._fd is not None
        # The LF that ends a torn line is ours, not one of the chunk's lines.
        prefix = 1 if self._torn else 0
        if prefix:
            chunk = b"\n" + chunk
        start = self._size
        view = memoryview(chunk)
        done = 0
        try:
            while done < len(chunk):
                n = os.write(self._fd, view[done:])
                if n <= 0:  # pragma: no cover - regular files report ENOSPC instead
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as err:
            self._note(err)
            if done:
                try:
                    # Take back the partial write so no half line stays in the file.
                    os.ftruncate(self._fd, start)
                    done = 0
                except OSError:
                    pass
            if done:
                written = chunk[:done]
                self.dropped += lines - (written.count(b"\n") - prefix)
                self._torn = not written.endswith(b"\n")
            else:
                self.dropped += lines
            self._size = start + done
            return
        self._torn = False
        self._size = start + done


class _Writer:
    """The one thread that writes every protocol log's lines.

    The event loop hands over a log's rendered lines (:meth:`ProtocolLog.flush`: one
    bytes and a queue put) and never writes a line itself: the ``write`` system call
    happens here, where a slow disk delays only the log.  After
    each round of writes the thread sleeps :data:`GATHER_SECONDS` (unless a
    :meth:`sync` wakes it), so it takes the GIL from the loop a few times a second, not
    once per buffer (each wake-up costs the loop more than the writing; see
    engine.ops.tracking).  Buffers are written in the order handed over, one write each.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[ProtocolLog, bytes, int] | threading.Event] = (
            queue.SimpleQueue())
        self._wake = threading.Event()
        #: Bytes handed over and not written yet, under its lock (two threads change it).
        self._pending = 0
        self._count = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def hand_over(self, log: ProtocolLog, chunk: bytes, lines: int) -> None:
        """Queue ``chunk`` (``lines`` lines) for ``log``; past :data:`MAX_PENDING` bytes
        not yet written (a disk that stopped answering) they are counted as dropped
        instead: the loop never waits for the disk, and memory stays bounded."""
        size = len(chunk)
        with self._count:
            if self._pending + size > MAX_PENDING:
                log.dropped += lines
                return
            self._pending += size
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ferry-protolog",
                                                    daemon=True)
                    self._thread.start()
        self._jobs.put((log, chunk, lines))

    def sync(self) -> None:
        """Wait until everything handed over so far is written."""
        if self._thread is None:
            return
        done = threading.Event()
        self._jobs.put(done)
        self._wake.set()
        done.wait()

    def _run(self) -> None:
        get, get_nowait = self._jobs.get, self._jobs.get_nowait
        while True:
            jobs = [get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    jobs.append(get_nowait())
            done: list[threading.Event] = []
            for job in jobs:
                if isinstance(job, threading.Event):
                    done.append(job)
                    continue
                # One write per buffer handed over, as the loop would have written it:
                # rotation by max_bytes sees the same writes.
                log, chunk, lines = job
                try:
                    log._write(chunk)
                except Exception:  # a bug: lose these lines, say so, keep on writing
                    _log.exception("protocol log %s: lines lost", log.path)
                    log.dropped += lines
                with self._count:
                    self._pending -= len(chunk)
            for event in done:
                event.set()
            if not done:
                self._wake.wait(GATHER_SECONDS)
            self._wake.clear()


_WRITER: Final = _Writer()

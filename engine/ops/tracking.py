"""The message tracking log: every event of the hub (``engine.ops.events``) as one JSON line.

Exchange's message tracking log (Get-MessageTrackingLog), Postfix's maillog read by
machines: one file, ``<dir>/tracking.log``, one JSON object (orjson) per line, one line
per event, in the order the hub handed them out.  ``ferry track`` (``engine.cli.track``)
searches it with :func:`read_records`.

How it is written.  :meth:`TrackingLog.write` runs on the event loop: it serialises the
batch (orjson, about a microsecond a record: cheaper there than handing the work and the
GIL to another thread) and puts the bytes on a queue (``queue.SimpleQueue``); one writer
thread appends what has gathered with ONE ``os.write`` on a descriptor opened with
``O_APPEND`` (no Python buffered file), so batches never interleave and a write ends on
a line feed unless it is cut short.  Two things cut one short: a full disk, and SIGKILL
arriving while the kernel copies a write of several pages (Linux checks for a fatal
signal between pages, ``generic_perform_write``), so a killed process may leave the
tail of its last batch unwritten.  Either way the file ends in half a line: the next
write (this run's, or the next run's when it opens the file) begins with a line feed, so
the half line stays a line of its own, and the reader skips any line that is not a
JSON object.  What is lost is the tail of the last batch: events of messages already
committed, never an event of one that is not.

Rotation: when a write would take the file past ``max_file_size``, or the file's first
record is older than ``max_file_age``, it is renamed to ``tracking-<UTC time>.log`` (the
time of the rotation, so names sort in time order) and a new file is started.
Retention: rotated files whose last write is older than ``max_age`` are deleted, then the
oldest rotated files until all of them and the current file fit in ``max_total_size``
(0 turns either limit off).  Both are checked by the writer thread, at each rotation and
at least once a minute.

This module observes; it must never change what the server does: it never blocks the
event loop, and an I/O error (a full disk, a removed directory) is logged at most once a
minute with the count of records lost, never raised to a producer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import orjson

from engine.ops.events import Event

log = logging.getLogger("ferry.tracking")

#: The current file's name, and the rotated files' names (the UTC time of the rotation).
CURRENT: Final = "tracking.log"
_ROTATED: Final = re.compile(r"tracking-(\d{8}T\d{6}\.\d{6})Z\.log")
#: Seconds between two error lines in the process log, and between retention checks.
ERROR_INTERVAL: Final = 60.0
HOUSEKEEPING_INTERVAL: Final = 60.0
#: The writer gathers batches this long after each write: it wakes (and takes the GIL
#: from the event loop) at most this often under load, not once per turn of the loop.
#: Measured (bench_relay, 1 KiB, 100 messages a connection, 3,000 msg/s): every wake-up
#: of this thread costs the event loop far more than the writing itself: at 0.05 s the
#: log took 70 µs of CPU per message (+18 %), at 0.5 s nothing measurable.  A record
#: reaches the file within this long of its commit; a kill -9 loses at most this much
#: of the log, never a record of a commit that did not happen.
GATHER_SECONDS: Final = 0.5

_LF: Final = b"\n"
_DUMPS_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE


def record_json(record: Event, option: int = 0) -> bytes:
    """A record as the tracking log writes it (without its line feed unless ``option``
    says so): the one serialisation of events, shared with the webhooks
    (``engine.ops.webhooks``), so both carry the same field names and values.  TypeError
    for a record a producer built wrong."""
    return orjson.dumps(record, option=option, default=str)


def rotated_name(when: float) -> str:
    whole = int(when)
    micros = int((when - whole) * 1_000_000)
    return time.strftime("tracking-%Y%m%dT%H%M%S", time.gmtime(whole)) + f".{micros:06d}Z.log"


def log_files(directory: Path) -> list[Path]:
    """The tracking files of ``directory`` in time order: rotated ones, then the current."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    files = sorted(directory / n for n in names if _ROTATED.fullmatch(n))
    if CURRENT in names:
        files.append(directory / CURRENT)
    return files


class TrackingLog:
    """A sink of the event hub (``Events.add``) writing ``<directory>/tracking.log``.

    The limits are in bytes and seconds; 0 turns one off.  ``clock`` (seconds since the
    epoch) decides rotation and retention; tests pass their own.
    """

    def __init__(self, directory: Path, *, max_file_size: int = 100 << 20,
                 max_file_age: float = 86400.0, max_age: float = 30 * 86400.0,
                 max_total_size: int = 1 << 30,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CURRENT
        self.max_file_size = max_file_size
        self.max_file_age = max_file_age
        self.max_age = max_age
        self.max_total_size = max_total_size
        self._clock = clock
        #: Records that could not be written (I/O errors), for the operator and tests.
        self.dropped = 0
        self.last_error: str | None = None
        self._dropped_reported = 0
        self._error_logged = 0.0
        self._fd: int | None = None
        self._size = 0
        #: When the current file's first record was written (its age for rotation).
        self._born = 0.0
        self._torn = False
        self._housekept = 0.0
        self._closed = False
        #: Set by ``close`` and ``drain``: the writer stops gathering and writes now.
        self._wake = threading.Event()
        #: Serialised batches (the lines, how many records) and the thread's orders.
        self._queue: queue.SimpleQueue[tuple[bytes, int] | threading.Event | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name="ferry-tracking", daemon=True)
        self._thread.start()

    # --- the Sink protocol (on the event loop) --------------------------------------------

    def write(self, batch: list[Event]) -> None:
        if self._closed:
            self.dropped += len(batch)
            return
        dumps = record_json
        count = len(batch)
        try:
            data = b"".join([dumps(r, _DUMPS_OPTIONS) for r in batch])
        except TypeError:  # a record a producer built wrong: lose it alone, say so
            lines = []
            for record in batch:
                try:
                    lines.append(dumps(record, _DUMPS_OPTIONS))
                except TypeError as exc:
                    self._failed(1, f"a record does not serialise: {exc}")
            data, count = b"".join(lines), len(lines)
        if data:
            self._queue.put((data, count))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every batch handed over so far is written (False on timeout).  For
        tests and tools: never called on the event loop."""
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        """Write every batch handed over so far, then close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._wake.set()
        self._thread.join()

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        get = self._queue.get
        try:
            self._housekeeping()
            while True:
                try:
                    batch = get(timeout=HOUSEKEEPING_INTERVAL)
                except queue.Empty:
                    self._housekeeping()
                    continue
                if batch is None:
                    break
                if isinstance(batch, threading.Event):
                    batch.set()
                    continue
                # Whatever else is waiting goes in the same write: batches stay whole.
                batches = [batch]
                marker: threading.Event | None = None
                stop = False
                with contextlib.suppress(queue.Empty):
                    while True:
                        more = self._queue.get_nowait()
                        if more is None:
                            stop = True
                            break
                        if isinstance(more, threading.Event):
                            marker = more
                            break
                        batches.append(more)
                self._write(batches)
                if marker is not None:
                    marker.set()
                if stop:
                    break
                if self._clock() - self._housekept >= HOUSEKEEPING_INTERVAL:
                    self._housekeeping()
                # Gathering, unless close() or drain() wants what is queued written now.
                if self._wake.wait(GATHER_SECONDS):
                    self._wake.clear()
        except Exception:  # a bug: never silently stop writing
            log.exception("the tracking log writer stopped; tracking records are lost")
        finally:
            self._close_fd()

    def _write(self, batches: list[tuple[bytes, int]]) -> None:
        """Append the batches, as few writes as rotation allows (a batch is never split
        across two files; one larger than max_file_size gets a file of its own)."""
        now = self._clock()
        if self._fd is None:
            try:
                self._open(now)
            except OSError as exc:
                self._close_fd()
                self._failed(sum(n for _, n in batches), f"{self.path}: {exc.strerror or exc}")
                return
        chunk: list[bytes] = []
        size = count = 0
        for data, records in batches:
            limit = self.max_file_size
            if chunk and limit and self._size + size + len(data) > limit:
                self._append(b"".join(chunk), count, now)
                chunk, size, count = [], 0, 0
            chunk.append(data)
            size += len(data)
            count += records
        if chunk:
            self._append(b"".join(chunk), count, now)

    def _append(self, data: bytes, count: int, now: float) -> None:
        """One write of whole lines, after a rotation if one is due."""
        try:
            if self._fd is None:
                self._open(now)
            if self._due(now, len(data)):
                self._rotate(now)
            assert self._fd is not None
            if self._torn:
                data = _LF + data
            written = os.write(self._fd, data)
            if written < len(data):
                # Cut short (the disk filled): never glue the next batch to half a line.
                self._torn = True
                self._size += written
                raise OSError(errno.ENOSPC, "short write")
            self._torn = False
            self._size += written
            if not self._born:
                self._born = now
        except OSError as exc:
            self._close_fd()
            self._failed(count, f"{self.path}: {exc.strerror or exc}")

    def _failed(self, count: int, why: str) -> None:
        self.dropped += count
        self.last_error = why
        now = time.monotonic()
        if now - self._error_logged >= ERROR_INTERVAL or not self._error_logged:
            self._error_logged = now
            lost, self._dropped_reported = self.dropped - self._dropped_reported, self.dropped
            log.error("tracking log: %s (%d records lost since the last report)", why, lost)

    def _open(self, now: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            st = os.fstat(fd)
            self._size = st.st_size
            # Left by an earlier run: its age counts from its first record (or its change
            # time when that cannot be read); a torn end gets its line feed.
            self._born = _first_time(self.path) or st.st_mtime if st.st_size else 0.0
            self._torn = st.st_size > 0 and _last_byte(self.path) != _LF
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _due(self, now: float, adding: int) -> bool:
        if not self._size:
            return False
        if self.max_file_size and self._size + adding > self.max_file_size:
            return True
        return bool(self.max_file_age) and now - self._born >= self.max_file_age

    def _rotate(self, now: float) -> None:
        self._close_fd()
        when = now
        while (target := self.directory / rotated_name(when)).exists():
            when += 1e-6
        os.rename(self.path, target)
        self._open(now)
        self._retain(now)

    def _housekeeping(self) -> None:
        """Rotate an idle file that is too old, and apply retention."""
        now = self._clock()
        self._housekept = now
        try:
            if self._fd is None and self.path.exists():
                self._open(now)
            if self._fd is not None and self._due(now, 0):
                self._rotate(now)
            else:
                self._retain(now)
        except OSError as exc:
            self._close_fd()
            self._failed(0, f"{self.path}: {exc.strerror or exc}")

    def _retain(self, now: float) -> None:
        rotated: list[tuple[Path, os.stat_result]] = []
        for path in log_files(self.directory)[:-1] if self.path.exists() else (
                log_files(self.directory)):
            with contextlib.suppress(FileNotFoundError):
                rotated.append((path, path.stat()))
        keep: list[tuple[Path, os.stat_result]] = []
        for path, st in rotated:
            if self.max_age and now - st.st_mtime > self.max_age:
                _remove(path)
            else:
                keep.append((path, st))
        if self.max_total_size:
            total = self._size + sum(st.st_size for _, st in keep)
            for path, st in keep:  # oldest first
                if total <= self.max_total_size:
                    break
                _remove(path)
                total -= st.st_size


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _first_time(path: Path) -> float:
    """The time of the first record of a tracking file, 0.0 when it has none readable."""
    with open(path, "rb") as f:
        line = f.readline(64 << 10)
    try:
        stamp = orjson.loads(line)["time"]
        return parse_time(stamp)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0.0


def parse_time(text: str) -> float:
    """Seconds since the epoch from an ISO 8601 time (``Z``, an offset, or none = UTC)."""
    from datetime import UTC, datetime

    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# --- reading ---------------------------------------------------------------------------------


#: What a line must contain: bytes found as they are, or a pattern (case-insensitive text).
Needle = bytes | re.Pattern[bytes]


def raw_lines(path: Path, needles: tuple[Needle, ...] = ()) -> Iterator[bytes]:
    """The complete lines of one tracking file (a last line without its line feed is
    being written, or was cut: left out) that contain every one of ``needles``.

    The file is mapped and searched for the first needle (``find`` for bytes: give the
    rarest first), so the lines that cannot match are never split or decoded."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the mapping
    except FileNotFoundError:
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            end = m.rfind(_LF) + 1  # the complete lines end here
            if not end:
                return
            if not needles:
                start = 0
                while start < end:
                    stop = m.find(_LF, start, end)
                    yield m[start:stop]
                    start = stop + 1
                return
            first, rest = needles[0], needles[1:]
            search = first.search if isinstance(first, re.Pattern) else None
            pos = 0
            find, rfind = m.find, m.rfind
            while True:
                if search is None:
                    hit = find(first, pos, end)  # type: ignore[arg-type]
                else:
                    found = search(m, pos, end)
                    hit = -1 if found is None else found.start()
                if hit < 0:
                    return
                start = rfind(_LF, 0, hit) + 1
                stop = find(_LF, hit, end)
                line = m[start:stop]
                pos = stop + 1
                if all(_contains(line, n) for n in rest):
                    yield line


def _contains(line: bytes, needle: Needle) -> bool:
    return needle in line if isinstance(needle, bytes) else needle.search(line) is not None


def read_records(directory: Path, needles: tuple[Needle, ...] = (),
                 since: float | None = None) -> Iterator[Event]:
    """Every record of the tracking files of ``directory``, oldest file first, whose raw
    line contains all of ``needles`` (a pre-filter: the caller checks the fields), from
    the files written to at or after ``since`` (the others hold only older records).  A
    line that is not a JSON object (half a line left by a full disk) is skipped."""
    loads = orjson.loads
    for path in log_files(directory):
        if since is not None:
            try:
                if path.stat().st_mtime < since:
                    continue
            except FileNotFoundError:
                continue
        for line in raw_lines(path, needles):
            try:
                record = loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record

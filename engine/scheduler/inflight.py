"""The in-flight journal: which (message, destination) groups were being delivered when
the server last died, so a message that crashes the server is not taken again forever.

A file in the spool (``<spool>/inflight``) of lines ``+<group>`` (its delivery starts)
and ``-<group>`` (its outcome is committed, or it was given up), the group in hex (queue
id and next hop, ``DueEntry.group``).  The lines of one turn of the event loop go out in
one ``os.write``, scheduled with ``call_soon`` when a delivery starts: it runs before
the loop looks at any socket again, so before the next hop's first reply is read and the
body is sent.  Never fsync'd: the page cache outlives a ``kill -9`` or a crash of the
process, which is what this is for (after a power loss the journal may be short, and a
message is only not counted).  When the file passes ``compact_at`` bytes it is rewritten
with the groups in flight alone (a new file renamed over it).

At start the scheduler reads what the last run left (:meth:`recover`): a clean stop
leaves nothing (:meth:`close` removes the file), a crash leaves the groups in flight.
Each such message gets one more crash in its envelope record; at the second crash in a
row it is moved to POISON (``Scheduler``; the count resets when an attempt completes).

It must never decide anything itself or read the queue: it only remembers group keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Final

from engine.queue.records import ID_LEN

log = logging.getLogger("ferry.scheduler")

FILE_NAME: Final = "inflight"
#: Bytes the journal may grow to before it is rewritten with the groups in flight alone.
COMPACT_AT: Final = 1 << 20


class InFlightJournal:
    """See the module docstring.  ``started``/``ended`` are called on the event loop."""

    def __init__(self, path: str | os.PathLike[str], compact_at: int = COMPACT_AT) -> None:
        self.path = Path(path)
        self.compact_at = compact_at
        self._live: set[bytes] = set()
        self._buffer = bytearray()
        self._fd = -1
        self._size = 0
        self._scheduled = False

    # --- start ------------------------------------------------------------------------

    def recover(self) -> list[bytes]:
        """The queue ids that were in flight when the last run died (none after a clean
        stop).  The file stays as it is until :meth:`open` (after the crashes are
        counted: a crash meanwhile must not lose them)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        live: set[bytes] = set()
        for line in data.split(b"\n"):
            # A line cut short by a lost page (power loss) is not hex: skipped.
            try:
                group = bytes.fromhex(line[1:].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                continue
            if len(group) <= ID_LEN:
                continue
            if line[:1] == b"+":
                live.add(group)
            elif line[:1] == b"-":
                live.discard(group)
        return sorted({group[:ID_LEN] for group in live})

    def open(self) -> None:
        """Start a new journal (what the last run left is forgotten)."""
        self._open(truncate=True)

    def _open(self, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._size = os.fstat(self._fd).st_size

    # --- while running ------------------------------------------------------------------

    def started(self, group: bytes) -> None:
        """A delivery of ``group`` starts (noted before the loop turns)."""
        if group not in self._live:
            self._live.add(group)
            self._note(b"+", group)

    def ended(self, group: bytes) -> None:
        """``group``'s outcome is committed, or it was given up."""
        if group in self._live:
            self._live.discard(group)
            self._note(b"-", group)

    def _note(self, op: bytes, group: bytes) -> None:
        self._buffer += op + group.hex().encode() + b"\n"
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (tests of the journal alone): write now
                self.flush()

    def flush(self) -> None:
        """Write what this turn of the loop noted, in one ``os.write``."""
        self._scheduled = False
        if self._fd < 0 or not self._buffer:
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._size += len(data)
            if self._size > self.compact_at:
                self._compact()
        except OSError as exc:
            # Only the crash count is lost; delivery goes on.
            log.warning("in-flight journal %s: %s", self.path, exc)

    def _compact(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.new")
        data = b"".join(b"+" + group.hex().encode() + b"\n" for group in self._live)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        os.close(self._fd)
        self._open(truncate=False)

    # --- stop ---------------------------------------------------------------------------

    def close(self) -> None:
        """A clean stop: nothing is in flight any more; the file goes."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

"""The protocol log's line rendering: sanitising a field, formatting a time stamp, and
turning each line logged into the bytes of the file (:class:`Lines`; pure Python).

The format is engine.ops.protolog's (its module docstring and docs/ say it): this module
holds the code that decides each byte of it, so that ``ext/logline.pyx`` (the compiled
:class:`Lines` and :func:`render`, selected by ``engine.ops.logline``) has one twin to
agree with byte for byte (tests/unit/test_protolog.py).  It never does I/O, and never
raises on any text.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable
from typing import Final, Protocol

__all__ = ["CRLF_LINES", "KNOWN_MECHANISMS", "LF_LINES", "MAX_TEXT", "ONE", "REDACTED", "Entry",
           "Lines", "SessionLog", "format_timestamp", "heads", "redact", "render", "sanitise",
           "split_lines", "stamp_end"]

#: Longest text field, in characters, "…" marker included.
MAX_TEXT: Final = 1000

_ELLIPSIS: Final = "\u2026"
_CR: Final = b"\r"


def _escape_tables() -> tuple[dict[int, str], dict[int, str]]:
    """The escapes for text from bytes and for text given as str."""
    table: dict[int, str] = {c: f"\\x{c:02x}" for c in range(0x20)}
    table.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x7F: "\\x7f", 0x5C: "\\\\"})
    # C1 controls (NEL among them) and the separators str.splitlines() and some viewers
    # break lines at; bidi controls that can make a line display as something else.
    specials = [*range(0x80, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029]
    specials += [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2026]
    table.update({c: f"\\u{c:04x}" for c in specials})
    # A str may hold lone surrogates, which UTF-8 cannot encode: show their code point.
    for_str = table | {c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)}
    # Bytes that are not UTF-8, smuggled through decode(errors="surrogateescape") as
    # U+DC80..U+DCFF, come back as the raw byte they were.
    for_bytes = table | {0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)}
    return for_bytes, for_str


_TABLE_B, _TABLE_S = _escape_tables()
# Printable ASCII without the backslash needs no work (the common case: SMTP commands).
_NEEDS_ESCAPE_B: Final = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")
_NEEDS_ESCAPE_S: Final = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def sanitise(text: bytes | str) -> str:
    """Return ``text`` as one safe log field: escaped (see the module docstring), and cut
    to at most :data:`MAX_TEXT` characters ending in "…" when it was longer.  Bytes are
    read as UTF-8; bytes that are not UTF-8 become ``\\xNN``.  Never raises."""
    if isinstance(text, bytes):
        # A character takes at most 4 bytes and yields at least 1 output character, so
        # this prefix is always enough to fill MAX_TEXT (and to know the text was longer).
        raw = text[: 4 * MAX_TEXT + 4]
        if _NEEDS_ESCAPE_B.search(raw) is None:
            s = raw.decode("ascii")
            return s if len(s) <= MAX_TEXT else s[: MAX_TEXT - 1] + _ELLIPSIS
        s = raw.decode("utf-8", "surrogateescape")
        table = _TABLE_B
    else:
        s = text[: MAX_TEXT + 1]
        if _NEEDS_ESCAPE_S.search(s) is None:
            return s if len(s) <= MAX_TEXT else s[: MAX_TEXT - 1] + _ELLIPSIS
        table = _TABLE_S
    out = s.translate(table)
    if len(out) <= MAX_TEXT:
        return out
    # Too long: keep the longest prefix of whole escapes that leaves room for the marker.
    room = MAX_TEXT - 1
    used = 0
    cut = 0
    for ch in s:
        piece = table.get(ord(ch))
        width = 1 if piece is None else len(piece)
        if used + width > room:
            break
        used += width
        cut += 1
    return s[:cut].translate(table) + _ELLIPSIS


#: The last second formatted and its text: every log stamps thousands of lines a second,
#: and the date and time of day change once a second.
_second: tuple[int, str] = (-1, "")


def format_timestamp(t: float) -> str:
    """``t`` (seconds since the epoch) as ISO 8601 UTC with milliseconds:
    ``2024-05-01T12:34:56.789Z``.  Milliseconds are truncated, never rounded up into the
    next second.  The one formatter of every log's time (protocol logs, the tracking log
    and its events, the JSON log lines)."""
    global _second
    sec = math.floor(t)
    cached, text = _second
    if sec != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second = (sec, text)
    return f"{text}.{min(999, int((t - sec) * 1000)):03d}Z"


#: What a line adds to its head and text in the file: the time stamp and the LF.
_STAMPED: Final = len("2024-05-01T12:34:56.789Z\n")
_LF: Final = b"\n"
_CRLF: Final = b"\r\n"
#: What a buffered entry holds (its fourth item): one line (bytes from the wire, or an
#: event's str); the bytes of one write, lines ended by CRLF (the last one may lack it);
#: bytes as received, every line ended by LF (a CR before it is not shown).
ONE: Final = 0
CRLF_LINES: Final = 1
LF_LINES: Final = 2
#: Printable ASCII but the backslash, and LF: a chunk of such lines is written as it is,
#: its line ends replaced.
_NEEDS_ESCAPE_LF: Final = re.compile(rb"[^\x20-\x5b\x5d-\x7e\n]")

Entry = tuple[float, bytes, bytes | str, int]


def stamp_end(t: float) -> float:
    """The first time after ``t`` that :func:`format_timestamp` shows differently (its
    millisecond, truncated, or its second changes).  Found on the floats themselves, not
    by arithmetic that could round across the boundary."""
    sec = math.floor(t)
    ms = min(999, int((t - sec) * 1000))
    if ms == 999:
        return float(sec + 1)
    end = sec + (ms + 1) / 1000
    # (x - sec) * 1000 grows with x, so the boundary is where the truncation first moves.
    while int((end - sec) * 1000) <= ms:
        end = math.nextafter(end, math.inf)
    while int((math.nextafter(end, -math.inf) - sec) * 1000) > ms:
        end = math.nextafter(end, -math.inf)
    return end


def split_lines(data: bytes, kind: int) -> list[bytes]:
    """The lines of a chunk, as the protocol log shows them one by one."""
    if kind == CRLF_LINES:
        lines = data.split(_CRLF)
        if not lines[-1]:
            lines.pop()
        return lines
    return [line.removesuffix(_CR) for line in data[:-1].split(_LF)]


class Lines:
    """Rendered protocol-log lines not yet written: :meth:`add` renders one buffered entry
    as the file gets it, ``<stamp><head><sanitised text>LF`` a line; :meth:`take` hands
    over (and forgets) what was added.  :attr:`size` is its bytes, :attr:`lines` its
    lines.  :meth:`add` says whether the buffer is due to be handed over: it holds
    ``limit`` bytes or more, or the entry's time is at or past :attr:`due` (which the
    owner sets), so the caller's hot path is one call and one test.

    The same bytes as stamping and sanitising each line alone (:func:`format_timestamp`,
    :func:`sanitise`), for less: a chunk of lines that need no escape and no cut (SMTP
    commands and replies) is its own output with each line end replaced by LF and the
    next line's stamp and head, and a stamp is formatted only when the time's
    millisecond changes."""

    __slots__ = ("_hi", "_lo", "_out", "_stamp", "due", "limit", "lines", "size")

    def __init__(self, limit: int = sys.maxsize) -> None:
        self._out: list[bytes] = []
        self.size = 0
        self.lines = 0
        self.limit = limit
        #: The time from which :meth:`add` says the buffer is due (never, at first).
        self.due = math.inf
        # The stamp of every time in [lo, hi): entries come in time order, so most lines
        # test two floats instead of formatting a time.
        self._lo = self._hi = 0.0
        self._stamp = b""

    def add(self, t: float, head: bytes, data: bytes | str, kind: int) -> bool:
        """Render one entry: at time ``t``, ``head`` the session's fields after the stamp
        (TAB first and last), ``data`` as it came, ``kind`` how it divides into lines.
        True: the buffer is due to be handed over (see the class)."""
        if not self._lo <= t < self._hi:
            self._stamp = format_timestamp(t).encode("ascii")
            self._lo, self._hi = t, stamp_end(t)
        stamp = self._stamp
        needs_escape = _NEEDS_ESCAPE_B.search
        out: list[bytes] = []
        if kind == ONE:
            if (data.__class__ is not bytes or len(data) > MAX_TEXT
                    or needs_escape(data) is not None):
                # sanitise() removed lone surrogates; backslashreplace is a last guard so
                # encode() can never raise.
                data = sanitise(data).encode("utf-8", "backslashreplace")
            assert isinstance(data, bytes)
            out += (stamp, head, data, _LF)
            return self._keep(out, 1, t)
        if not isinstance(data, bytes):
            raise TypeError(f"a chunk of lines must be bytes, not {type(data).__name__}")
        if len(data) <= MAX_TEXT:
            if kind == CRLF_LINES:
                # Clean once the CRLF pairs that end lines are taken out: no other CR or
                # LF (str.split and str.replace find the same pairs).
                body = data.removesuffix(_CRLF)
                clean = needs_escape(body.replace(_CRLF, b"")) is None
                sep = _CRLF
            else:
                body = data[:-1].replace(_CRLF, _LF).removesuffix(_CR)
                clean = _NEEDS_ESCAPE_LF.search(body) is None
                sep = _LF
            if clean:
                prefix = stamp + head
                out += (prefix, body.replace(sep, _LF + prefix), _LF)
                return self._keep(out, body.count(sep) + 1, t)
        lines = split_lines(data, kind)
        for line in lines:
            if len(line) > MAX_TEXT or needs_escape(line) is not None:
                line = sanitise(line).encode("utf-8", "backslashreplace")
            out += (stamp, head, line, _LF)
        return self._keep(out, len(lines), t)

    def _keep(self, out: list[bytes], lines: int, t: float) -> bool:
        self._out += out
        self.size += sum(map(len, out))
        self.lines += lines
        return self.size >= self.limit or t >= self.due

    def take(self) -> bytes:
        """Everything added since the last take, as one bytes."""
        data = b"".join(self._out)
        self._out = []
        self.size = self.lines = 0
        return data


def render(entries: list[Entry]) -> bytes:
    """The entries, rendered one by one (:class:`Lines`), as one bytes."""
    lines = Lines()
    for t, head, data, kind in entries:
        lines.add(t, head, data, kind)
    return lines.take()


#: What a hidden secret is written as.
REDACTED: Final = "****"

# SASL mechanism names that may be shown after a redacted AUTH verb (IANA "SASL Mechanisms"
# registry, the ones seen on submission ports).  A name not listed here is hidden too: a
# broken client may put its credentials where the mechanism belongs ("AUTH dGVzdA").
KNOWN_MECHANISMS: Final = frozenset(
    {
        "ANONYMOUS",
        "CRAM-MD5",
        "DIGEST-MD5",
        "EXTERNAL",
        "GS2-KRB5",
        "GS2-KRB5-PLUS",
        "GSSAPI",
        "LOGIN",
        "NTLM",
        "OAUTHBEARER",
        "PLAIN",
        "SCRAM-SHA-1",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256",
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-512",
        "SCRAM-SHA-512-PLUS",
        "XOAUTH2",
    }
)


def redact(line: bytes) -> bytes:
    """The loggable form of a secret line: "AUTH <MECH> ****" or "****"."""
    parts = line.split(None, 2)
    if not parts or parts[0].upper() != b"AUTH":
        return REDACTED.encode()
    if len(parts) == 1:
        return b"AUTH"
    mech = parts[1].upper().decode("ascii", "replace")
    if mech not in KNOWN_MECHANISMS:
        return f"AUTH {REDACTED}".encode()
    # RFC 4954 §4: anything after the mechanism is the initial response ("=" for empty).
    return (f"AUTH {mech} {REDACTED}" if len(parts) == 3 else f"AUTH {mech}").encode("ascii")


def heads(session_id: str, client: str) -> tuple[bytes, bytes, bytes]:
    """A session's fields after the stamp, for a line received, sent, and an event."""
    head = f"\t{sanitise(session_id)}\t{sanitise(client)}\t".encode("utf-8", "backslashreplace")
    return head + b"<\t", head + b">\t", head + b"*\t"


def _off() -> None:
    """A switched-off session's flush (never called)."""


class _Owner(Protocol):
    """What a :class:`SessionLog` needs of its log (engine.ops.protolog.ProtocolLog)."""

    @property
    def _buf(self) -> Lines: ...

    @property
    def _clock(self) -> Callable[[], float]: ...

    def flush(self) -> None: ...


class SessionLog:
    """One session's view of a protocol log (engine.ops.protolog.ProtocolLog): each
    call renders its line(s) into the log's :class:`Lines` at once, and hands them over
    (``log.flush()``) when the buffer says they are due.  ``log=None``: switched off,
    every method is a no-op.

    On the event loop for every line: a time, the rendering and one test.  The log's
    buffer, clock and flush are kept here, so a line costs one call into the buffer;
    the compiled twin does the whole line path in C (benchmarks/README.md, issue 12's
    compiled session log)."""

    __slots__ = ("_add", "_clock", "_event", "_flush", "_partial", "_recv", "_redact", "_send",
                 "client", "on", "session_id")

    def __init__(self, log: _Owner | None, session_id: str, client: str) -> None:
        self.session_id = session_id
        self.client = client
        self._redact = False
        #: An unfinished line of :meth:`recv_data`, kept until its LF arrives.
        self._partial = b""
        #: False: switched off (every method a no-op), so a caller can skip its own work.
        self.on = log is not None
        if log is None:
            self._recv = self._send = self._event = b""
            self._add: Callable[[float, bytes, bytes | str, int], bool] | None = None
            self._clock: Callable[[], float] = time.time
            self._flush: Callable[[], None] = _off
            return
        self._recv, self._send, self._event = heads(session_id, client)
        self._add, self._clock, self._flush = log._buf.add, log._clock, log.flush

    def recv(self, line: bytes, *, secret: bool = False) -> None:
        """Log one line received from the client (its CRLF, if present, is not shown).

        ``secret=True`` (or a preceding :meth:`redact_next`) hides it: ``AUTH PLAIN xyz``
        is written as ``AUTH PLAIN ****``, any other line as ``****``.
        """
        add = self._add
        if add is None:
            return
        if line.endswith(_CRLF):
            line = line[:-2]
        if secret or self._redact:
            self._redact = False
            # Masked here, before anything is buffered: the secret never leaves the call.
            line = redact(line)
        if add(self._clock(), self._recv, line, ONE):
            self._flush()

    def redact_next(self) -> None:
        """Hide the next received line (e.g. after a 334, the next line is a SASL response)."""
        if self.on:
            self._redact = True

    def recv_data(self, data: bytes) -> None:
        """Log bytes as they arrive from the peer, one log line per line of the stream
        (the send side: the server's replies as they came, wrong line endings included).

        A line ends at LF; a CR before it is not shown.  A line without its LF yet waits
        for the next call (or :meth:`recv_end`); only its first bytes are kept, enough to
        show :data:`MAX_TEXT` characters and the truncation mark.
        """
        add = self._add
        if add is None:
            return
        if self._partial:
            data = self._partial + data
        end = data.rfind(_LF) + 1
        if end < len(data):
            self._partial = data[end: end + 4 * MAX_TEXT + 8]
            data = data[:end]
        else:
            self._partial = b""
        if data and add(self._clock(), self._recv, data, LF_LINES):
            self._flush()

    def recv_end(self) -> None:
        """The peer's stream ended: log a last line that never got its LF."""
        add = self._add
        if add is not None and self._partial:
            line, self._partial = self._partial, b""
            if add(self._clock(), self._recv, line, ONE):
                self._flush()

    def send(self, data: bytes, *, secret: bool = False) -> None:
        """Log what was sent to the peer: one log line per CRLF-ended line.

        ``secret=True`` hides every line as :meth:`recv` does: ``AUTH PLAIN ****`` for an
        AUTH command with its initial response, ``****`` for a SASL response.
        """
        add = self._add
        if add is None or not data:
            return
        if secret:
            for line in split_lines(data, CRLF_LINES):
                if add(self._clock(), self._send, redact(line), ONE):
                    self._flush()
        elif add(self._clock(), self._send, data, CRLF_LINES):
            self._flush()

    def event(self, text: str) -> None:
        """Log a session event: "connect", "TLS TLSv1.3 TLS_AES_256_GCM_SHA384",
        "disconnect: timeout", ..."""
        add = self._add
        if add is not None and add(self._clock(), self._event, text, ONE):
            self._flush()

"""Pure-Python twin of ``ext/reply.pyx``: SMTP replies, parsed (client side) and formatted
(server side).

Owns the reply grammar of RFC 5321 §4.2 (three-digit code, "-" on every line but the last,
one code for all lines), the enhanced status code of RFC 3463 / RFC 2034 §3, and the
limits on reply size.  It never imports asyncio, holds a transport or logs, and nothing it
returns carries a raw CR, LF, NUL or other control character from the wire.

Keep it behaving exactly like the compiled module: same names, same results, same
exception classes, codes and texts for every input and every way of cutting it.
"""

from __future__ import annotations

import re
from collections import deque

from engine.protocol._tables import REPLY_MALFORMED as MALFORMED
from engine.protocol._tables import REPLY_MAX_LINE, REPLY_MAX_LINES
from engine.protocol._tables import REPLY_MISMATCH as MISMATCH
from engine.protocol._tables import REPLY_TOO_LONG as TOO_LONG
from engine.protocol._tables import REPLY_TOO_MANY as TOO_MANY
from engine.protocol._twin import Result as _Result
from engine.protocol.errors import ReplyError

__all__ = ["Reply", "ReplyParser", "format_reply"]

# Every C0 control but TAB, and DEL, becomes "?": reply text goes to logs and DSNs and
# must never carry a raw CR, LF or NUL from the wire (DESIGN.md, wire rules).
_SANITIZE = bytes((0x3F if (b < 0x20 and b != 0x09) or b == 0x7F else b) for b in range(256))
_HAS_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search

# An RFC 3463 status code at the start of a reply text: class "." subject "." detail,
# subject and detail 1-3 digits (§2), then a space or the end of the line (RFC 2034 §3).
# The class digit is checked against the reply code separately.
_ENHANCED = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |\Z)").match

class Reply(_Result):
    """One complete SMTP reply: code, RFC 3463 status ("" if none) and the text lines.

    ``astuple()`` order: (code, enhanced, tuple(lines)).
    """

    __slots__ = ("code", "enhanced", "lines")

    def __init__(self, code: int, enhanced: str, lines: list[str]) -> None:
        self.code = code
        self.enhanced = enhanced
        self.lines = lines

    @property
    def text(self) -> str:
        """The lines joined with "\\n" (lossless, unlike a space)."""
        return "\n".join(self.lines)

    def astuple(self) -> tuple[int, str, tuple[str, ...]]:
        return (self.code, self.enhanced, tuple(self.lines))

    def __repr__(self) -> str:
        return f"Reply({self.code!r}, {self.enhanced!r}, {self.lines!r})"


def _text(raw: bytes) -> str:
    """Wire text → str: UTF-8 (RFC 6531 §3.7.4) with replacement, controls made "?"."""
    if _HAS_CONTROL(raw) is not None:
        raw = raw.translate(_SANITIZE)
    return raw.decode("utf-8", "replace")


class ReplyParser:
    """Turns the bytes a server sends into :class:`Reply` objects (RFC 5321 §4.2).

    ``push`` frames and checks lines as they arrive and holds finished replies until
    ``pop_reply`` takes them; the first broken line makes the parser dead, and once the
    replies before it are taken every ``pop_reply`` raises the same ReplyError (421 4.5.0).
    A line ends at LF; a CR right before it is dropped (lenient on the client side).
    """

    __slots__ = (
        "_code",
        "_enhanced",
        "_error",
        "_lines",
        "_max_line",
        "_max_lines",
        "_partial",
        "_ready",
        "_ready_bytes",
        "_reply_bytes",
    )

    def __init__(self, max_line: int = REPLY_MAX_LINE, max_lines: int = REPLY_MAX_LINES) -> None:
        if max_line < 0 or max_lines < 0:
            raise ValueError("max_line and max_lines must not be negative")
        self._max_line = max_line
        self._max_lines = max_lines
        self._partial = b""  # the line being received, never longer than max_line + 1
        self._ready: deque[tuple[Reply, int]] = deque()  # (reply, its wire length)
        self._ready_bytes = 0  # wire length of the replies in self._ready
        self._lines: list[str] = []  # lines of the reply being received
        self._reply_bytes = 0  # their wire length
        self._code = 0
        self._enhanced = b""
        self._error: str | None = None  # text of the error, once one is found

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a returned reply.

        After an error it stays at what was held when the error was found (a line that
        was too long counts as max_line + 1); later pushes are discarded.
        """
        return self._ready_bytes + self._reply_bytes + len(self._partial)

    def push(self, data: bytes) -> None:
        """Take bytes from the server; after an error they are discarded."""
        if not isinstance(data, bytes):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        if self._error is not None or not data:
            return
        find = data.find
        max_line = self._max_line
        start = 0
        end = len(data)
        while True:
            lf = find(b"\n", start)
            if lf < 0:
                break
            partial = self._partial
            # The line's length without its ending; a CR right before the LF is part of
            # the ending.  Checked before the line is sliced (RFC 5321 §4.5.3.1.5).
            length = len(partial) + lf - start
            if (data[lf - 1] if lf > start else partial[-1] if partial else 0) == 13:
                length -= 1
            if length > max_line:
                self._fail(TOO_LONG, max_line + 1)
                return
            line = partial + data[start:lf] if partial else data[start:lf]
            self._partial = b""
            if len(line) > length:
                line = line[:-1]
            if not self._line(line, len(partial) + lf + 1 - start):
                return
            start = lf + 1
        if start < end:
            # A partial line: refused as soon as it cannot fit, without holding more.
            size = len(self._partial) + end - start
            if size > max_line + 1 or (size == max_line + 1 and data[-1] != 13):
                self._fail(TOO_LONG, max_line + 1)
                return
            self._partial += data[start:]

    def _fail(self, text: str, line_bytes: int) -> None:
        """The parser is dead: keep the error, drop the broken reply, freeze buffered."""
        self._error = text
        self._lines = []
        self._partial = b""
        self._reply_bytes += line_bytes

    def _line(self, line: bytes, wire: int) -> bool:
        """Check one complete line and add it to the reply; False once the parser failed."""
        n = len(line)
        # Reply-code = %x32-35 %x30-35 %x30-39 (RFC 5321 §4.2), then "-", SP or the end.
        if (
            n < 3
            or not 50 <= line[0] <= 53
            or not 48 <= line[1] <= 53
            or not 48 <= line[2] <= 57
            or (n > 3 and line[3] != 45 and line[3] != 32)
        ):
            self._fail(MALFORMED, wire)
            return False
        code = (line[0] - 48) * 100 + (line[1] - 48) * 10 + (line[2] - 48)
        text = line[4:]
        lines = self._lines
        if not lines:
            self._code = code
            # The enhanced status comes from the first line only, and its class must be
            # the reply's class (RFC 3463 §2, RFC 2034 §3).
            m = _ENHANCED(text)
            self._enhanced = m.group() if m is not None and text[0] == line[0] else b""
        elif code != self._code:
            # All lines of a multi-line reply carry the same code (RFC 5321 §4.2.1).
            self._fail(MISMATCH, wire)
            return False
        if len(lines) >= self._max_lines:
            self._fail(TOO_MANY, wire)
            return False
        enhanced = self._enhanced
        if enhanced and text.startswith(enhanced):
            size = len(enhanced)
            if len(text) == size:
                text = b""
            elif text[size] == 32:
                text = text[size + 1 :]
        lines.append(_text(text))
        self._reply_bytes += wire
        if n == 3 or line[3] == 32:
            self._ready.append((Reply(code, enhanced.decode("ascii"), lines), self._reply_bytes))
            self._ready_bytes += self._reply_bytes
            self._lines = []
            self._reply_bytes = 0
        return True

    def pop_reply(self) -> Reply | None:
        """The next complete reply, or None when more data is needed.

        Raises ReplyError once the replies before a broken line have been taken.
        """
        if self._ready:
            reply, size = self._ready.popleft()
            self._ready_bytes -= size
            return reply
        if self._error is not None:
            raise ReplyError(self._error)
        return None


def format_reply(code: int, enhanced: str, lines: list[str]) -> bytes:
    """The wire form of a reply: "250-first\\r\\n250 last\\r\\n" (RFC 5321 §4.2.1).

    A non-empty ``enhanced`` follows the code on every line (RFC 2034 §3).  ValueError if
    ``code`` is not an int in 200-599 with a second digit 0-5, ``enhanced`` is neither ""
    nor a status of the code's class, ``lines`` is empty, or a line holds CR, LF or NUL.
    """
    # Reply-code = %x32-35 %x30-35 %x30-39 (RFC 5321 §4.2): what our own parser accepts.
    if (
        not isinstance(code, int)
        or isinstance(code, bool)
        or not 200 <= code <= 599
        or code // 10 % 10 > 5
    ):
        raise ValueError(f"reply code must be 200-599 with a second digit 0-5, got {code!r}")
    if not isinstance(enhanced, str):
        raise TypeError(f"enhanced must be str, got {type(enhanced).__name__}")
    if enhanced:
        raw = enhanced.encode("ascii", "replace")
        m = _ENHANCED(raw)
        if m is None or m.end() != len(raw) or raw[0] - 48 != code // 100:
            raise ValueError(f"enhanced status {enhanced!r} does not fit reply code {code}")
    if not lines:
        raise ValueError("a reply has at least one line")
    head = f"{code:d}"
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise TypeError(f"reply lines must be str, got {type(line).__name__}")
        if "\r" in line or "\n" in line or "\0" in line:
            raise ValueError(f"reply line holds CR, LF or NUL: {line!r}")
        out.append(head)
        out.append(" " if i == last else "-")
        if enhanced:
            out.append(enhanced)
            if line:
                out.append(" ")
        out.append(line)
        out.append("\r\n")
    # UTF-8 text is for SMTPUTF8 sessions (RFC 6531 §3.7.4.2); a lone surrogate cannot be
    # encoded and raises UnicodeEncodeError, a ValueError.
    return "".join(out).encode("utf-8")

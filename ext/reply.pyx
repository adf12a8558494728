# cython: language_level=3
"""Compiled SMTP reply parser and formatter (engine._ext.reply).

Owns the reply grammar of RFC 5321 §4.2 (three-digit code, "-" on every line but the last,
one code for all lines), the enhanced status code of RFC 3463 / RFC 2034 §3, and the
limits on reply size.  It never imports asyncio, holds a transport or logs, and nothing it
returns carries a raw CR, LF, NUL or other control character from the wire.

Its twin is engine/protocol/_reply_py.py; both must give the same results and raise the
same exception classes, codes and texts for every input and every way of cutting it.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp, memcpy

from engine.protocol import _tables
from engine.protocol.errors import ReplyError

include "_buffer.pxi"
include "_result.pxi"

__all__ = ["Reply", "ReplyParser", "format_reply"]

# ReplyError texts and default caps: engine/protocol/_tables.py holds them.
cdef str MALFORMED = _tables.REPLY_MALFORMED
cdef str MISMATCH = _tables.REPLY_MISMATCH
cdef str TOO_LONG = _tables.REPLY_TOO_LONG
cdef str TOO_MANY = _tables.REPLY_TOO_MANY


@cython.final
@cython.freelist(32)
cdef class Reply:
    """One complete SMTP reply: code, RFC 3463 status ("" if none) and the text lines.

    ``astuple()`` order: (code, enhanced, tuple(lines)).
    """

    cdef public object code
    cdef public object enhanced
    cdef public object lines

    def __init__(self, code, enhanced, lines):
        self.code = code
        self.enhanced = enhanced
        self.lines = lines

    @property
    def text(self):
        """The lines joined with "\\n" (lossless, unlike a space)."""
        return "\n".join(self.lines)

    def astuple(self):
        return (self.code, self.enhanced, tuple(self.lines))

    def __eq__(self, other):
        return _astuple_eq(self, other)

    __hash__ = None  # mutable

    def __repr__(self):
        return f"Reply({self.code!r}, {self.enhanced!r}, {self.lines!r})"


cdef inline bint _is_control(unsigned char c) noexcept:
    # Every C0 control but TAB, and DEL (wire text must never reach a log raw).
    return (c < 0x20 and c != 0x09) or c == 0x7F


cdef str _text(const unsigned char* p, Py_ssize_t n):
    """Wire text → str: UTF-8 (RFC 6531 §3.7.4) with replacement, controls made "?"."""
    cdef Py_ssize_t i
    cdef unsigned char* copy
    for i in range(n):
        if _is_control(p[i]):
            break
    else:
        return PyUnicode_DecodeUTF8(<const char*>p, n, "replace")
    copy = <unsigned char*>PyMem_Malloc(<size_t>n)
    if copy == NULL:
        raise MemoryError()
    try:
        memcpy(copy, p, <size_t>n)
        for i in range(i, n):
            if _is_control(copy[i]):
                copy[i] = 0x3F
        return PyUnicode_DecodeUTF8(<const char*>copy, n, "replace")
    finally:
        PyMem_Free(copy)


cdef inline Py_ssize_t _digits(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Index after a run of 1-3 digits at ``p[i]``, or -1 when there is no such run."""
    cdef Py_ssize_t j = i
    while j < n and j - i < 3 and 48 <= p[j] <= 57:
        j += 1
    if j == i or (j < n and 48 <= p[j] <= 57):
        return -1
    return j


cdef Py_ssize_t _enhanced_len(const unsigned char* t, Py_ssize_t n, unsigned char cls) noexcept:
    """Length of an RFC 3463 status of class ``cls`` opening ``t[:n]``, else 0.

    class "." 1*3digit "." 1*3digit (RFC 3463 §2), then SP or the end (RFC 2034 §3).
    """
    cdef Py_ssize_t j
    if n < 5 or t[0] != cls or (cls != 50 and cls != 52 and cls != 53) or t[1] != 46:
        return 0
    j = _digits(t, 2, n)
    if j < 0 or j >= n or t[j] != 46:
        return 0
    j = _digits(t, j + 1, n)
    if j < 0 or (j < n and t[j] != 32):
        return 0
    return j


@cython.final
cdef class ReplyParser:
    """Turns the bytes a server sends into :class:`Reply` objects (RFC 5321 §4.2).

    ``push`` frames and checks lines as they arrive and holds finished replies until
    ``pop_reply`` takes them; the first broken line makes the parser dead, and once the
    replies before it are taken every ``pop_reply`` raises the same ReplyError (421 4.5.0).
    A line ends at LF; a CR right before it is dropped (lenient on the client side).
    """

    cdef Py_ssize_t _max_line
    cdef Py_ssize_t _max_lines
    # The line being received (never longer than max_line + 1), in a buffer that grows.
    cdef Buf _partial
    # Finished replies with their wire lengths, taken from _ready[_head:].
    cdef list _ready
    cdef Py_ssize_t _head
    cdef Py_ssize_t _ready_bytes
    # The reply being received.
    cdef list _lines
    cdef Py_ssize_t _reply_bytes
    cdef int _code
    cdef unsigned char _enh[12]
    cdef Py_ssize_t _enh_len
    cdef str _enhanced
    cdef object _error

    def __init__(self, max_line=_tables.REPLY_MAX_LINE, max_lines=_tables.REPLY_MAX_LINES):
        if max_line < 0 or max_lines < 0:
            raise ValueError("max_line and max_lines must not be negative")
        self._max_line = max_line
        self._max_lines = max_lines
        self._partial.len = 0
        self._ready = []
        self._head = 0
        self._ready_bytes = 0
        self._lines = []
        self._reply_bytes = 0
        self._code = 0
        self._enh_len = 0
        self._enhanced = ""
        self._error = None

    def __dealloc__(self):
        buf_free(&self._partial)

    @property
    def buffered(self):
        """Bytes held that are not yet part of a returned reply.

        After an error it stays at what was held when the error was found (a line that
        was too long counts as max_line + 1); later pushes are discarded.
        """
        return self._ready_bytes + self._reply_bytes + self._partial.len

    cdef void _fail(self, str text, Py_ssize_t line_bytes) noexcept:
        """The parser is dead: keep the error, drop the broken reply, freeze buffered."""
        self._error = text
        self._lines = []
        self._partial.len = 0
        self._reply_bytes += line_bytes

    def push(self, data):
        """push(data: bytes) -> None

        Take bytes from the server; after an error they are discarded.
        """
        if not isinstance(data, bytes):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        if self._error is not None:
            return
        cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t start = 0, lf, length, size, wire
        cdef const unsigned char* hit
        cdef unsigned char last
        while start < end:
            hit = <const unsigned char*>memchr(buf + start, 10, <size_t>(end - start))
            if hit == NULL:
                # A partial line: refused as soon as it cannot fit, without holding more.
                size = self._partial.len + end - start
                if size > self._max_line + 1 or (
                    size == self._max_line + 1 and buf[end - 1] != 13
                ):
                    self._fail(TOO_LONG, self._max_line + 1)
                    return
                buf_append(&self._partial, buf + start, end - start)
                return
            lf = hit - buf
            # The line's length without its ending; a CR right before the LF is part of
            # the ending.  Checked before the line is copied (RFC 5321 §4.5.3.1.5).
            length = self._partial.len + lf - start
            if lf > start:
                last = buf[lf - 1]
            elif self._partial.len:
                last = self._partial.data[self._partial.len - 1]
            else:
                last = 0
            if last == 13:
                length -= 1
            if length > self._max_line:
                self._fail(TOO_LONG, self._max_line + 1)
                return
            wire = self._partial.len + lf + 1 - start
            if self._partial.len:
                buf_append(&self._partial, buf + start, lf - start)
                self._partial.len = 0
                if not self._line(self._partial.data, length, wire):
                    return
            elif not self._line(buf + start, length, wire):
                return
            start = lf + 1

    cdef bint _line(self, const unsigned char* p, Py_ssize_t n, Py_ssize_t wire) except -1:
        """Check one complete line and add it to the reply; False once the parser failed."""
        cdef int code
        cdef const unsigned char* t
        cdef Py_ssize_t tn
        cdef Reply reply
        # Reply-code = %x32-35 %x30-35 %x30-39 (RFC 5321 §4.2), then "-", SP or the end.
        if (
            n < 3
            or not (50 <= p[0] <= 53)
            or not (48 <= p[1] <= 53)
            or not (48 <= p[2] <= 57)
            or (n > 3 and p[3] != 45 and p[3] != 32)
        ):
            self._fail(MALFORMED, wire)
            return False
        code = (p[0] - 48) * 100 + (p[1] - 48) * 10 + (p[2] - 48)
        if n > 4:
            t = p + 4
            tn = n - 4
        else:
            t = p
            tn = 0
        if not self._lines:
            self._code = code
            # The enhanced status comes from the first line only, and its class must be
            # the reply's class (RFC 3463 §2, RFC 2034 §3).
            self._enh_len = _enhanced_len(t, tn, p[0])
            if self._enh_len:
                memcpy(self._enh, t, <size_t>self._enh_len)
                self._enhanced = (<const char*>t)[:self._enh_len].decode("ascii")
            else:
                self._enhanced = ""
        elif code != self._code:
            # All lines of a multi-line reply carry the same code (RFC 5321 §4.2.1).
            self._fail(MISMATCH, wire)
            return False
        if len(self._lines) >= self._max_lines:
            self._fail(TOO_MANY, wire)
            return False
        # Each line that opens with the reply's own status loses it and its space.
        if (
            self._enh_len
            and tn >= self._enh_len
            and memcmp(t, self._enh, <size_t>self._enh_len) == 0
        ):
            if tn == self._enh_len:
                tn = 0
            elif t[self._enh_len] == 32:
                t += self._enh_len + 1
                tn -= self._enh_len + 1
        self._lines.append(_text(t, tn))
        self._reply_bytes += wire
        if n == 3 or p[3] == 32:
            reply = Reply.__new__(Reply)
            reply.code = code
            reply.enhanced = self._enhanced
            reply.lines = self._lines
            self._ready.append((reply, self._reply_bytes))
            self._ready_bytes += self._reply_bytes
            self._lines = []
            self._reply_bytes = 0
        return True

    def pop_reply(self):
        """pop_reply() -> Reply | None

        The next complete reply, or None when more data is needed.
        Raises ReplyError once the replies before a broken line have been taken.
        """
        cdef tuple item
        cdef Py_ssize_t size
        if self._head < len(self._ready):
            item = <tuple>self._ready[self._head]
            self._ready[self._head] = None
            self._head += 1
            if self._head == len(self._ready):
                self._ready = []
                self._head = 0
            size = item[1]
            self._ready_bytes -= size
            return item[0]
        if self._error is not None:
            raise ReplyError(self._error)
        return None


def format_reply(code, enhanced, lines):
    """format_reply(code: int, enhanced: str, lines: list[str]) -> bytes

    The wire form of a reply: "250-first\\r\\n250 last\\r\\n" (RFC 5321 §4.2.1).
    A non-empty ``enhanced`` follows the code on every line (RFC 2034 §3).  ValueError if
    ``code`` is not an int in 200-599 with a second digit 0-5, ``enhanced`` is neither ""
    nor a status of the code's class, ``lines`` is empty, or a line holds CR, LF or NUL.
    """
    cdef bytes raw
    cdef Py_ssize_t i, last
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
        raw = (<str>enhanced).encode("ascii", "replace")
        if (
            _enhanced_len(<const unsigned char*>PyBytes_AS_STRING(raw), len(raw),
                          <unsigned char>(48 + code // 100)) != len(raw)
        ):
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

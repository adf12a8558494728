# cython: language_level=3
"""Compiled protocol-log renderer (engine._ext.logline): each line logged → file bytes.

Owns nothing of the format: its ``Lines`` and ``render`` write what engine/ops/
_logline_py.py's write, byte for byte (tests/unit/test_protolog.py compares the two on
any entries), doing in C the common case, lines of printable ASCII without a backslash
(SMTP commands and replies), and calling the twin's ``sanitise``, ``split_lines`` and
``format_timestamp`` for the rest (an escape, a cut, a new second; a new millisecond is
written into the second's stamp in place).  It runs on the event loop, once per line
logged: it must stay a copy of bytes for the common case.  It never does I/O.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.math cimport INFINITY, NAN, floor, isfinite
from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

import time as _time

from engine.ops import _logline_py

include "_buffer.pxi"

__all__ = ["Lines", "SessionLog", "render"]

cdef Py_ssize_t MAX_TEXT = _logline_py.MAX_TEXT
cdef int ONE = _logline_py.ONE
cdef int CRLF_LINES = _logline_py.CRLF_LINES
cdef int LF_LINES = _logline_py.LF_LINES
cdef object sanitise = _logline_py.sanitise
cdef object split_lines = _logline_py.split_lines
cdef object format_timestamp = _logline_py.format_timestamp


cdef inline bint _plain(unsigned char c) noexcept:
    # Printable ASCII but the backslash: written as it is (the twin's _NEEDS_ESCAPE_B).
    return 0x20 <= c <= 0x7E and c != 0x5C


cdef bint _clean(bytes data) noexcept:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(data)
    for i in range(n):
        if not _plain(p[i]):
            return False
    return True


cdef struct Stamp:
    # format_timestamp() of the last time seen, and its second and millisecond; sec is
    # NaN when nothing is kept (none yet, or a stamp not of the usual 24 characters).
    unsigned char text[24]
    double sec
    long ms


cdef object _stamp(Stamp* st, double t):
    """Make ``st`` the stamp of ``t``, the text of format_timestamp(t) (whose millisecond
    is the fraction truncated, at most 999); return that text instead when it is not of
    the usual 24 characters (None otherwise)."""
    cdef double sec = floor(t)
    cdef long ms = <long>((t - sec) * 1000.0)
    cdef bytes text
    if ms > 999:
        ms = 999
    if sec == st.sec:  # never true when either is NaN
        if ms != st.ms:
            st.text[20] = 48 + ms // 100
            st.text[21] = 48 + ms // 10 % 10
            st.text[22] = 48 + ms % 10
            st.ms = ms
        return None
    # A new second: formatted by the twin (whose exception, for a time it refuses, goes
    # up as the twin's render raises it).
    text = format_timestamp(t).encode("ascii")
    if PyBytes_GET_SIZE(text) == 24 and isfinite(t):
        memcpy(st.text, PyBytes_AS_STRING(text), 24)
        st.sec = sec
        st.ms = ms
        return None
    st.sec = NAN
    return text


cdef inline int _put(Buf* b, bytes data) except -1:
    return buf_append(b, <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef int _line(Buf* b, const unsigned char* stamp, Py_ssize_t slen, bytes head,
               object line) except -1:
    """One line by the slow path: sanitised (and cut) unless plain and short enough."""
    cdef bytes text
    if type(line) is bytes and PyBytes_GET_SIZE(<bytes>line) <= MAX_TEXT and _clean(<bytes>line):
        text = <bytes>line
    elif (type(line) is str and len(<str>line) <= MAX_TEXT and (<str>line).isascii()
            and _clean(text := (<str>line).encode("ascii"))):
        pass  # an event's text: sanitise() would return it as it is
    else:
        # sanitise() removed lone surrogates; backslashreplace is a last guard.
        text = sanitise(line).encode("utf-8", "backslashreplace")
    buf_append(b, stamp, slen)
    _put(b, head)
    _put(b, text)
    buf_append(b, <const unsigned char*>b"\n", 1)
    return 1


cdef Py_ssize_t _chunk(Buf* b, const unsigned char* stamp, Py_ssize_t slen, bytes head,
                       bytes data, int kind) except -1:
    """A chunk of lines by the fast path: how many it wrote; 0 (and nothing kept) when a
    line needs an escape, so the caller takes the slow path.  CRLF_LINES: lines ended by CRLF, the last
    maybe not; LF_LINES: every line ended by LF, a CR before it not shown (the twin's
    ``data[:-1].replace(CRLF, LF).removesuffix(CR)``)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t mark = b.len
    cdef Py_ssize_t i = 0, start, m, end, lines = 1
    cdef unsigned char c
    if kind == CRLF_LINES:
        m = n - 2 if n >= 2 and p[n - 2] == 13 and p[n - 1] == 10 else n
    else:
        m = n - 1 if n else 0  # the twin's data[:-1]: the last LF is not shown
    buf_append(b, stamp, slen)
    _put(b, head)
    start = 0
    while i < m:
        c = p[i]
        if _plain(c):
            i += 1
            continue
        if c == 13 and i + 1 < m and p[i + 1] == 10:
            end = i
            i += 2
        elif kind == LF_LINES and c == 10:
            end = i
            i += 1
        elif kind == LF_LINES and c == 13 and i + 1 == m:
            break  # the last line's CR before its LF
        else:
            b.len = mark
            return 0
        lines += 1
        buf_append(b, p + start, end - start)
        buf_append(b, <const unsigned char*>b"\n", 1)
        buf_append(b, stamp, slen)
        _put(b, head)
        start = i
    end = m if i >= m else i
    buf_append(b, p + start, end - start)
    buf_append(b, <const unsigned char*>b"\n", 1)
    return lines


@cython.final
cdef class Lines:
    """Rendered protocol-log lines not yet written (the twin's ``Lines``): ``add`` renders
    one entry into a C buffer and says whether the buffer is due to be handed over,
    ``take`` hands the buffer over as bytes."""

    cdef Buf buf
    cdef Stamp st
    cdef readonly Py_ssize_t lines
    cdef readonly Py_ssize_t limit
    cdef public double due

    def __cinit__(self, Py_ssize_t limit=PY_SSIZE_T_MAX):
        self.st.sec = NAN
        self.st.ms = -1
        self.limit = limit
        self.due = INFINITY

    def __dealloc__(self):
        buf_free(&self.buf)

    @property
    def size(self):
        return self.buf.len

    cdef inline bint _due(self, double t) noexcept:
        return self.buf.len >= self.limit or t >= self.due

    cpdef bint add(self, double t, bytes head, object data, int kind) except -1:
        cdef object slow = _stamp(&self.st, t)
        cdef const unsigned char* sp
        cdef Py_ssize_t sl, n
        if slow is None:
            sp = self.st.text
            sl = 24
        else:
            sp = <const unsigned char*>PyBytes_AS_STRING(<bytes>slow)
            sl = PyBytes_GET_SIZE(<bytes>slow)
        if kind == ONE:
            self.lines += _line(&self.buf, sp, sl, head, data)
            return self._due(t)
        if type(data) is not bytes:
            raise TypeError(f"a chunk of lines must be bytes, not {type(data).__name__}")
        if PyBytes_GET_SIZE(<bytes>data) <= MAX_TEXT:
            n = _chunk(&self.buf, sp, sl, head, <bytes>data, kind)
            if n:
                self.lines += n
                return self._due(t)
        for line in split_lines(data, kind):
            self.lines += _line(&self.buf, sp, sl, head, line)
        return self._due(t)

    def take(self):
        """Everything added since the last take, as one bytes."""
        data = PyBytes_FromStringAndSize(<char*>self.buf.data, self.buf.len)
        self.buf.len = 0
        self.lines = 0
        return data


def render(list entries):
    """The entries, rendered one by one (:class:`Lines`), as one bytes."""
    cdef Lines lines = Lines()
    cdef tuple entry
    for entry in entries:
        lines.add(entry[0], entry[1], entry[2], entry[3])
    return lines.take()


cdef object redact = _logline_py.redact
cdef object heads = _logline_py.heads
cdef object wall_clock = _time.time


cdef double _wall_time() noexcept:
    """time.time() without its Python call (a third of a line's cost on the loop): the
    same clock (CLOCK_REALTIME) turned into seconds as CPython 3.11+ does it
    (_PyTime_AsSecondsDouble), so a stamp is the one time.time() would have given."""
    cdef timespec ts
    cdef long long ns
    clock_gettime(CLOCK_REALTIME, &ts)
    ns = <long long>ts.tv_sec * 1000000000 + ts.tv_nsec
    if ns % 1000000000 == 0:
        return <double>(ns // 1000000000)
    return <double>ns / 1e9


cdef bytes _head(str field):
    """``field`` as its bytes when sanitise() would return it as it is, else None."""
    cdef bytes raw
    if len(field) > MAX_TEXT or not field.isascii():
        return None
    raw = field.encode("ascii")
    return raw if _clean(raw) else None


@cython.final
cdef class SessionLog:
    """One session's view of a protocol log (the twin's ``SessionLog``, which documents
    the methods): the whole line path in C, a time from the log's clock, the line
    rendered into the log's :class:`Lines`, the log's flush when it says they are due."""

    cdef readonly str session_id
    cdef readonly str client
    cdef Lines _buf  # None: switched off
    cdef object _clock
    cdef object _flush
    cdef bytes _recv
    cdef bytes _send
    cdef bytes _event
    cdef bytes _partial
    cdef bint _redact
    cdef bint _wall  # the clock is time.time: read it in C
    cdef readonly bint on

    cdef inline double _now(self) except? -1.0:
        return _wall_time() if self._wall else self._clock()

    def __init__(self, log, str session_id not None, str client not None):
        cdef bytes sid, peer, head
        self.session_id = session_id
        self.client = client
        self._partial = b""
        self._redact = False
        if log is None:
            self._recv = self._send = self._event = b""
            return
        sid = _head(session_id)
        peer = _head(client)
        if sid is not None and peer is not None:
            head = b"\t" + sid + b"\t" + peer + b"\t"
            self._recv = head + b"<\t"
            self._send = head + b">\t"
            self._event = head + b"*\t"
        else:
            self._recv, self._send, self._event = heads(session_id, client)
        self.on = True
        self._buf = log._buf
        self._clock = log._clock
        self._wall = self._clock is wall_clock
        self._flush = log.flush

    def recv(self, line, *, bint secret=False):
        cdef Py_ssize_t n
        if self._buf is None:
            return
        if type(line) is bytes:
            n = PyBytes_GET_SIZE(<bytes>line)
            if (n >= 2 and PyBytes_AS_STRING(<bytes>line)[n - 2] == b'\r'
                    and PyBytes_AS_STRING(<bytes>line)[n - 1] == b'\n'):
                line = (<bytes>line)[:n - 2]
        elif line.endswith(b"\r\n"):
            line = line[:len(line) - 2]
        if secret or self._redact:
            self._redact = False
            # Masked here, before anything is buffered: the secret never leaves the call.
            line = redact(line)
        if self._buf.add(self._now(), self._recv, line, ONE):
            self._flush()

    def redact_next(self):
        if self._buf is not None:
            self._redact = True

    def recv_data(self, bytes data not None):
        cdef Py_ssize_t end
        if self._buf is None:
            return
        if PyBytes_GET_SIZE(self._partial):
            data = self._partial + data
        end = data.rfind(b"\n") + 1
        if end < PyBytes_GET_SIZE(data):
            self._partial = data[end: end + 4 * MAX_TEXT + 8]
            data = data[:end]
        else:
            self._partial = b""
        if PyBytes_GET_SIZE(data) and self._buf.add(self._now(), self._recv, data, LF_LINES):
            self._flush()

    def recv_end(self):
        cdef bytes line
        if self._buf is not None and PyBytes_GET_SIZE(self._partial):
            line, self._partial = self._partial, b""
            if self._buf.add(self._now(), self._recv, line, ONE):
                self._flush()

    def send(self, bytes data not None, *, bint secret=False):
        if self._buf is None or not PyBytes_GET_SIZE(data):
            return
        if secret:
            for line in split_lines(data, CRLF_LINES):
                if self._buf.add(self._now(), self._send, redact(line), ONE):
                    self._flush()
        elif self._buf.add(self._now(), self._send, data, CRLF_LINES):
            self._flush()

    def event(self, text):
        if self._buf is not None and self._buf.add(self._now(), self._event, text, ONE):
            self._flush()

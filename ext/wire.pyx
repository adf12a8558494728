# cython: language_level=3
"""Compiled SMTP line framing and message-body transfer (engine._ext.wire).

Owns the octet level of SMTP (RFC 5321 §2.3.8, §4.1.1.4, §4.5.2; RFC 3030): splitting
command lines on CRLF with a length limit, decoding a DATA body up to ``<CRLF>.<CRLF>``
(unstuffing, bare CR/LF detection, size and line-length accounting), reading BDAT chunks
by exact octet count, and dot-stuffing an outbound body.  This is where SMTP smuggling is
stopped: only a real CRLF ends a line, and only ``<CRLF>.<CRLF>`` ends a message.

It must never import asyncio, hold a transport, log or parse commands.  Its twin is
engine/protocol/_wire_py.py: same names, signatures, results and exception classes; the
twin's docstrings state the accounting rules both follow.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from libc.string cimport memchr, memcpy, memmove

import operator
import sys

from engine.protocol import _tables
from engine.protocol._tables import BARE_NORMALIZE, BARE_REJECT
from engine.protocol.errors import LineTooLong

include "_buffer.pxi"

__all__ = [
    "BARE_NORMALIZE",
    "BARE_REJECT",
    "BdatReader",
    "DataDecoder",
    "LineReader",
    "dot_stuff",
]

# LineTooLong's text and the default line limit: engine/protocol/_tables.py holds them.
cdef str LINE_TOO_LONG = _tables.LINE_TOO_LONG

ctypedef const unsigned char* cbytes

cdef enum:
    C_CR = 13
    C_LF = 10
    C_DOT = 46

cdef const char* CRLF = b"\r\n"

# DataDecoder states (see the twin): at a line start the decoder also remembers whether it
# follows a real CRLF (or the body start): only then can "." CRLF end the message.
cdef enum:
    S_BOL = 0
    S_MID = 1
    S_DOT = 2
    S_DOTCR = 3
    S_CR = 4


# --- a body buffer that becomes the body -----------------------------------------------
#
# The decoded body is written straight into a bytes object that grows by realloc while we
# hold the only reference, and body() hands out that very object (shrunk to size): no
# second allocation and no copy of a message that may be megabytes.  Once handed out the
# object is never written again; more output goes to a fresh copy.

cdef extern from "Python.h":
    PyObject* bytes_new "PyBytes_FromStringAndSize"(const char* v, Py_ssize_t n) except NULL
    # On failure it frees the object, sets *pv to NULL and sets an exception.
    int bytes_resize "_PyBytes_Resize"(PyObject** pv, Py_ssize_t n) noexcept
    char* bytes_data "PyBytes_AS_STRING"(PyObject* o) noexcept
    Py_ssize_t obj_size "Py_SIZE"(PyObject* o) noexcept
    Py_ssize_t obj_refcnt "Py_REFCNT"(PyObject* o) noexcept
    void obj_xdecref "Py_XDECREF"(PyObject* o) noexcept


cdef struct Out:
    PyObject* obj  # a bytes object, or NULL while nothing is kept
    Py_ssize_t len  # octets written to it


cdef int out_grow(Out* b, Py_ssize_t n) except -1:
    """Make room for n more octets in an object that nobody else holds."""
    cdef Py_ssize_t need = b.len + n
    cdef Py_ssize_t cap = 1024
    cdef PyObject* fresh
    if b.obj != NULL and obj_size(b.obj) > cap // 2:
        cap = obj_size(b.obj) * 2
    while cap < need:
        cap *= 2
    if b.obj != NULL and obj_refcnt(b.obj) == 1:
        if bytes_resize(&b.obj, cap) < 0:
            b.len = 0
            return -1
    else:
        fresh = bytes_new(NULL, cap)
        if b.len:
            memcpy(bytes_data(fresh), bytes_data(b.obj), b.len)
        obj_xdecref(b.obj)
        b.obj = fresh
    return 0


cdef inline int out_append(Out* b, cbytes p, Py_ssize_t n) except -1:
    if b.obj == NULL or b.len + n > obj_size(b.obj) or obj_refcnt(b.obj) != 1:
        out_grow(b, n)
    memcpy(bytes_data(b.obj) + b.len, p, n)
    b.len += n
    return 0


cdef object out_bytes(Out* b):
    cdef PyObject* exact
    if b.len == 0:
        return b""
    if obj_size(b.obj) != b.len:
        if obj_refcnt(b.obj) == 1:
            if bytes_resize(&b.obj, b.len) < 0:
                b.len = 0
                raise MemoryError()
        else:
            exact = bytes_new(bytes_data(b.obj), b.len)
            obj_xdecref(b.obj)
            b.obj = exact
    return <object>b.obj


cdef inline void out_free(Out* b) noexcept:
    obj_xdecref(b.obj)
    b.obj = NULL
    b.len = 0


cdef inline Py_ssize_t find_byte(cbytes d, int c, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Offset of the first ``c`` in d[i:n], or n when there is none."""
    cdef const void* r = memchr(d + i, c, <size_t>(n - i))
    return n if r == NULL else <Py_ssize_t>(<cbytes>r - d)


# --- argument checks (same code as the twin, so the same exceptions) -------------------

cdef bytes as_bytes(object data):
    # Accept any contiguous buffer (bytearray, memoryview) but work on immutable bytes.
    if isinstance(data, bytes):
        return <bytes>data
    return memoryview(data).tobytes()


cdef Py_ssize_t check_size(object value, str name) except -1:
    number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    if number > sys.maxsize:
        raise OverflowError(f"{name} is too large: {number}")
    return number


cdef bint check_policy(object bare_eol) except -1:
    if bare_eol == BARE_REJECT:
        return False
    if bare_eol == BARE_NORMALIZE:
        return True
    raise ValueError(f"bare_eol must be 'reject' or 'normalize', got {bare_eol!r}")


# --- LineReader ------------------------------------------------------------------------


@cython.final
cdef class LineReader:
    """Incremental splitter of command lines: only CRLF ends a line (RFC 5321 §2.3.8).

    ``limit`` counts the CRLF (RFC 5321 §4.5.3.1.4).  A line over it is consumed through
    its CRLF and reported as LineTooLong; until its CRLF arrives every ``pop_line`` that
    finds no complete line drops what it holds of it, except a trailing CR.
    """

    cdef Buf _buf
    cdef Py_ssize_t _pos  # first byte not yet returned
    cdef Py_ssize_t _scan  # no CR of a CRLF lies before this offset
    cdef Py_ssize_t _limit
    cdef bint _skipping  # discarding the rest of an over-long line

    def __init__(self, limit=_tables.COMMAND_LINE_LIMIT):
        self._limit = check_size(limit, "limit")
        self._buf.len = 0
        self._pos = 0
        self._scan = 0
        self._skipping = False

    def __dealloc__(self):
        buf_free(&self._buf)

    @property
    def limit(self):
        return self._limit

    @limit.setter
    def limit(self, value):
        self._limit = check_size(value, "limit")

    @property
    def buffered(self):
        return self._buf.len - self._pos

    def push(self, data):
        """Append bytes received from the peer."""
        cdef bytes b = as_bytes(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
        cdef Py_ssize_t pos = self._pos
        if n == 0:
            return
        # Compact only when the consumed front is at least half the buffer: each consumed
        # byte pays for at most one moved byte, so many pipelined lines stay O(n).
        if pos and pos * 2 >= self._buf.len:
            memmove(self._buf.data, self._buf.data + pos, self._buf.len - pos)
            self._buf.len -= pos
            self._scan -= pos
            self._pos = 0
        buf_append(&self._buf, <cbytes>PyBytes_AS_STRING(b), n)

    def pop_line(self):
        """The next line without its CRLF, None if none is complete; LineTooLong if over."""
        cdef unsigned char* d = self._buf.data
        cdef Py_ssize_t end = self._buf.len
        cdef Py_ssize_t pos = self._pos
        cdef Py_ssize_t i = self._scan + 1
        cdef Py_ssize_t idx = -1
        cdef Py_ssize_t keep
        # The first CRLF whose CR is at or after _scan: memchr for LF, look one back.
        while i < end:
            i = find_byte(d, C_LF, i, end)
            if i == end:
                break
            if d[i - 1] == C_CR:
                idx = i - 1
                break
            i += 1
        if idx < 0:
            if self._skipping or end - pos > self._limit:
                # Over the limit with no CRLF yet: drop it, keep a CR that may pair with
                # the next LF, and remember to refuse the line when its CRLF comes.
                self._skipping = True
                keep = 1 if end > pos and d[end - 1] == C_CR else 0
                if keep:
                    d[0] = C_CR
                self._buf.len = end = keep
                self._pos = pos = 0
            self._scan = pos if pos > end - 1 else end - 1
            return None
        self._pos = idx + 2
        self._scan = idx + 2
        if self._skipping:
            self._skipping = False
            raise LineTooLong(LINE_TOO_LONG)
        if idx + 2 - pos > self._limit:
            raise LineTooLong(LINE_TOO_LONG)
        return PyBytes_FromStringAndSize(<char*>d + pos, idx - pos)

    def take_rest(self):
        """Every byte not yet returned as a line (the start of a body); empties the reader."""
        cdef bytes rest
        if self._buf.len > self._pos:
            rest = PyBytes_FromStringAndSize(<char*>self._buf.data + self._pos,
                                             self._buf.len - self._pos)
        else:
            rest = b""
        if self._buf.cap > 65536:
            buf_free(&self._buf)
        self._buf.len = 0
        self._pos = 0
        self._scan = 0
        self._skipping = False
        return rest

    def __repr__(self):
        skip = " skipping" if self._skipping else ""
        return f"<LineReader limit={self._limit} buffered={self.buffered}{skip}>"


# --- what DataDecoder and BdatReader share ---------------------------------------------


cdef class _BodyReader:
    """The kept body, its size and the bare CR / bare LF counts of a message being received.

    Accounting (see the twin): under "normalize" a bare CR or LF is written and counted as
    the two octets of the CRLF it becomes; under "reject" it counts as one octet and the
    body is no longer kept.  Past ``max_size`` the body is dropped but counting goes on.
    """

    cdef Out _out
    cdef Py_ssize_t _max_size
    cdef bint _normalize
    cdef bint _keep
    cdef bint _discarded  # BdatReader.discard(): keep nothing more, never ``ok``
    cdef readonly bint done
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t bare_cr
    cdef readonly Py_ssize_t bare_lf

    @cython.final
    cdef int _setup(self, object max_size, object bare_eol) except -1:
        self._max_size = check_size(max_size, "max_size")
        self._normalize = check_policy(bare_eol)
        out_free(&self._out)
        self._keep = True
        self._discarded = False
        self.done = False
        self.size = 0
        self.bare_cr = 0
        self.bare_lf = 0
        return 0

    def __dealloc__(self):
        out_free(&self._out)

    @property
    def oversize(self):
        return self._max_size > 0 and self.size > self._max_size

    @property
    def ok(self):
        return self._ok()

    @cython.final
    cdef inline bint _ok(self) noexcept:
        if self._discarded or (self._max_size > 0 and self.size > self._max_size):
            return False
        return self._normalize or not (self.bare_cr or self.bare_lf)

    @cython.final
    cdef inline object _body(self):
        return out_bytes(&self._out) if self._ok() else b""

    @cython.final
    cdef inline int _put(self, cbytes p, Py_ssize_t n) except -1:
        self.size += n
        if self._keep:
            if self._max_size and self.size > self._max_size:
                # Over the limit: stop keeping, but go on reading to the end.
                self._keep = False
                out_free(&self._out)
            else:
                out_append(&self._out, p, n)
        return 0

    @cython.final
    cdef int _bare(self, int c) except -1:
        # DataDecoder flushes its verbatim run first (its output comes before this).
        if c == C_CR:
            self.bare_cr += 1
        else:
            self.bare_lf += 1
        if self._normalize:
            self._put(<cbytes>CRLF, 2)
        else:
            self.size += 1
            if self._keep:
                self._keep = False
                out_free(&self._out)
        return 0


# --- DataDecoder -----------------------------------------------------------------------


@cython.final
cdef class DataDecoder(_BodyReader):
    """Incremental decoder of a DATA body up to ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4).

    Unstuffs (§4.5.2), counts bare CR / bare LF (§2.3.8), octets and over-long lines, and
    keeps the canonical body while it is acceptable.  A bare CR or LF never takes part in
    the end-of-data sequence, whatever the policy.
    """

    # The run of input bytes to emit verbatim; flushed before anything else is emitted
    # and at the end of every feed, so it never outlives the caller's bytes.
    cdef cbytes _rs
    cdef cbytes _re
    cdef Py_ssize_t _max_line
    cdef Py_ssize_t _linelen
    cdef readonly Py_ssize_t long_lines
    cdef int _state
    cdef bint _real

    def __init__(self, max_size=0, bare_eol=BARE_REJECT, max_line=0):
        self._setup(max_size, bare_eol)
        self._max_line = check_size(max_line, "max_line")
        self._rs = self._re = NULL
        self._state = S_BOL
        self._real = True
        self._linelen = 0
        self.long_lines = 0

    # --- results ---------------------------------------------------------------------

    def body(self):
        """The decoded body in canonical CRLF, without the terminator; b"" unless ``ok``."""
        return self._body()

    def __repr__(self):
        return (
            f"<DataDecoder done={self.done} size={self.size} ok={self.ok} "
            f"bare_cr={self.bare_cr} bare_lf={self.bare_lf} long_lines={self.long_lines}>"
        )

    # --- output ----------------------------------------------------------------------

    cdef inline int _flush(self) except -1:
        if self._re != self._rs:
            self._put(self._rs, self._re - self._rs)
        self._rs = self._re = NULL
        return 0

    cdef inline int _take(self, cbytes p, Py_ssize_t n) except -1:
        # Extend the verbatim run when p continues it; otherwise emit it and start anew.
        if p != self._re:
            if self._re != self._rs:
                self._put(self._rs, self._re - self._rs)
            self._rs = p
        self._re = p + n
        return 0

    cdef int _const(self, const char* s, Py_ssize_t n) except -1:
        self._flush()
        self._put(<cbytes>s, n)
        return 0

    cdef inline void _line_end(self) noexcept:
        # RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
        if self._max_line and self._linelen + 2 > self._max_line:
            self.long_lines += 1
        self._linelen = 0

    # --- input -----------------------------------------------------------------------

    def feed(self, data):
        """Decode ``data``; return how many of its bytes belong to the body (to the end)."""
        cdef bytes b
        cdef cbytes d
        cdef Py_ssize_t n, i = 0, ncr = -1, nlf = -1, q, start, clen
        cdef Py_ssize_t max_line = self._max_line
        cdef int state = self._state
        cdef bint real = self._real
        cdef unsigned char c
        if self.done:
            return 0
        b = as_bytes(data)
        d = <cbytes>PyBytes_AS_STRING(b)
        n = PyBytes_GET_SIZE(b)
        while i < n:
            if ncr < i:
                ncr = find_byte(d, C_CR, i, n)
            if nlf < i:
                nlf = find_byte(d, C_LF, i, n)
            if state == S_BOL:
                if nlf < n and ncr + 1 == nlf:
                    # The common case: a whole line ending in a real CRLF, no CR inside.
                    start = i
                    clen = ncr - i
                    if d[i] == C_DOT:
                        if clen == 1:
                            if real:
                                i = nlf + 1  # "." CRLF after CRLF: end of data
                                self.done = True
                                break
                        else:
                            start = i + 1  # RFC 5321 §4.5.2: drop the stuffed dot
                            clen -= 1
                    self._take(d + start, nlf + 1 - start)
                    if max_line and clen + 2 > max_line:
                        self.long_lines += 1
                    real = True
                    i = nlf + 1
                    continue
                c = d[i]
                if c == C_DOT:
                    state = S_DOT
                    i += 1
                elif c == C_CR:
                    state = S_CR
                    i += 1
                elif c == C_LF:
                    self._flush()
                    self._line_end()
                    self._bare(C_LF)
                    real = False
                    i += 1
                else:
                    state = S_MID
            elif state == S_MID:
                q = ncr if ncr < nlf else nlf
                if q > i:
                    self._take(d + i, q - i)
                    self._linelen += q - i
                    i = q
                if i < n:
                    if i == ncr:
                        if i + 1 < n and d[i + 1] == C_LF:
                            self._take(d + i, 2)
                            self._line_end()
                            state = S_BOL
                            real = True
                            i += 2
                        else:
                            state = S_CR
                            i += 1
                    else:
                        self._flush()
                        self._line_end()
                        self._bare(C_LF)
                        state = S_BOL
                        real = False
                        i += 1
            else:
                # Pending states: flush the run first, the next byte decides.
                self._flush()
                c = d[i]
                if state == S_DOT:
                    if c == C_CR:
                        state = S_DOTCR
                        i += 1
                    elif c == C_LF:
                        # "." then bare LF: a lone-dot line that is not a terminator.
                        self._const(b".", 1)
                        self._linelen = 1
                        self._line_end()
                        self._bare(C_LF)
                        state = S_BOL
                        real = False
                        i += 1
                    else:
                        state = S_MID  # the stuffed dot is dropped
                elif state == S_DOTCR:
                    if c == C_LF:
                        i += 1
                        if real:
                            self.done = True
                            break
                        # "." CRLF after a bare line ending: kept, never a terminator.
                        self._const(b".\r\n", 3)
                        self._linelen = 1
                        self._line_end()
                        state = S_BOL
                        real = True
                    else:
                        self._const(b".", 1)
                        self._linelen = 1
                        self._line_end()
                        self._bare(C_CR)
                        state = S_BOL
                        real = False
                else:  # S_CR
                    self._line_end()
                    state = S_BOL
                    if c == C_LF:
                        self._const(b"\r\n", 2)
                        real = True
                        i += 1
                    else:
                        self._bare(C_CR)
                        real = False
        self._flush()
        self._state = state
        self._real = real
        return i


# --- BdatReader ------------------------------------------------------------------------


@cython.final
cdef class BdatReader(_BodyReader):
    """Reader of a CHUNKING body (RFC 3030 §2-§4): exact octet counts, no unstuffing.

    Bare CR / bare LF are detected across chunk and feed boundaries as in DataDecoder.
    """

    cdef Py_ssize_t _remaining
    cdef bint _last
    cdef bint _cr  # a CR ended the octets seen so far; the next octet decides

    def __init__(self, max_size=0, bare_eol=BARE_REJECT):
        self._setup(max_size, bare_eol)
        self._last = False
        self._cr = False
        self._remaining = 0

    @property
    def chunk_done(self):
        return self._remaining == 0

    def body(self):
        """The message received so far (no unstuffing); b"" unless ``ok``."""
        return self._body()

    def __repr__(self):
        return (
            f"<BdatReader done={self.done} remaining={self._remaining} size={self.size} "
            f"ok={self.ok} bare_cr={self.bare_cr} bare_lf={self.bare_lf}>"
        )

    def start_chunk(self, count, last):
        """Expect ``count`` more octets (``BDAT count [LAST]``); ValueError mid-chunk or done."""
        cdef Py_ssize_t n
        if self.done:
            raise ValueError("the message is already complete")
        if self._remaining:
            raise ValueError("the previous chunk is not finished")
        n = check_size(count, "count")
        self._remaining = n
        self._last = bool(last)
        if n == 0 and self._last:
            self._finish()  # BDAT 0 LAST (RFC 3030 §2)

    def discard(self):
        """Keep nothing more of this message (RFC 3030 §4: a refused chunk is still read)."""
        self._discarded = True
        self._keep = False
        out_free(&self._out)

    def feed(self, data):
        """Take at most the rest of the current chunk from ``data``; return how many."""
        cdef bytes b = as_bytes(data)
        cdef Py_ssize_t k = PyBytes_GET_SIZE(b)
        if k > self._remaining:
            k = self._remaining
        if k == 0:
            return 0
        self._scan(<cbytes>PyBytes_AS_STRING(b), k)
        self._remaining -= k
        if self._remaining == 0 and self._last:
            self._finish()
        return k

    cdef int _finish(self) except -1:
        if self._cr:
            self._cr = False
            self._bare(C_CR)
        self.done = True
        return 0

    cdef int _scan(self, cbytes d, Py_ssize_t e) except -1:
        cdef Py_ssize_t i = 0, rs, ncr = -1, nlf = -1
        if self._cr:
            self._cr = False
            if d[0] == C_LF:
                self._put(<cbytes>CRLF, 2)
                i = 1
            else:
                self._bare(C_CR)
        if e > i and d[e - 1] == C_CR:
            self._cr = True
            e -= 1
        rs = i
        while i < e:
            if ncr < i:
                ncr = find_byte(d, C_CR, i, e)
            if nlf < i:
                nlf = find_byte(d, C_LF, i, e)
            if nlf < ncr:
                # An LF before any CR still to be seen: not preceded by CR, so bare.
                if nlf > rs:
                    self._put(d + rs, nlf - rs)
                self._bare(C_LF)
                i = rs = nlf + 1
            elif ncr < e:
                if ncr + 1 < e and d[ncr + 1] == C_LF:
                    i = ncr + 2
                else:
                    if ncr > rs:
                        self._put(d + rs, ncr - rs)
                    self._bare(C_CR)
                    i = rs = ncr + 1
            else:
                break
        if e > rs:
            self._put(d + rs, e - rs)
        return 0


# --- dot_stuff -------------------------------------------------------------------------


cdef Py_ssize_t stuff(cbytes d, Py_ssize_t n, unsigned char* w) noexcept nogil:
    """Write the transfer form of d[:n] to w (when w is not NULL); return its length."""
    cdef Py_ssize_t i = 0, rs = 0, o = 0, ncr = -1, nlf = -1, q
    cdef bint bol = True
    while i < n:
        if bol and d[i] == C_DOT:
            # RFC 5321 §4.5.2: double a leading dot; the original stays in the run.
            if w != NULL:
                memcpy(w + o, d + rs, i - rs)
                w[o + i - rs] = C_DOT
            o += i - rs + 1
            rs = i
        if ncr < i:
            ncr = find_byte(d, C_CR, i, n)
        if nlf < i:
            nlf = find_byte(d, C_LF, i, n)
        q = ncr if ncr < nlf else nlf
        if q == n:
            bol = False
            break
        if q == ncr and q + 1 < n and d[q + 1] == C_LF:
            i = q + 2
        else:
            # A bare CR or bare LF goes out as CRLF (RFC 5321 §2.3.8).
            if w != NULL:
                memcpy(w + o, d + rs, q - rs)
                w[o + q - rs] = C_CR
                w[o + q - rs + 1] = C_LF
            o += q - rs + 2
            i = rs = q + 1
        bol = True
    if w != NULL:
        memcpy(w + o, d + rs, n - rs)
    o += n - rs
    if not bol:
        if w != NULL:
            w[o] = C_CR
            w[o + 1] = C_LF
        o += 2
    if w != NULL:
        w[o] = C_DOT
        w[o + 1] = C_CR
        w[o + 2] = C_LF
    return o + 3


def dot_stuff(body):
    """The DATA transfer form of ``body`` (RFC 5321 §4.5.2), terminator included.

    Bare CR and bare LF become CRLF, a final CRLF is added to a non-empty body lacking
    one, every line starting with "." gets another, and ".\\r\\n" is appended.
    """
    cdef bytes b = as_bytes(body)
    cdef cbytes d = <cbytes>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Py_ssize_t size
    cdef bytes out
    # Two passes over the input (measure, then write) so the result is built in place at
    # its exact size: no worst-case buffer, no final copy.
    size = stuff(d, n, NULL)
    out = PyBytes_FromStringAndSize(NULL, size)
    stuff(d, n, <unsigned char*>PyBytes_AS_STRING(out))
    return out

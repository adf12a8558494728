# cython: language_level=3
"""Compiled header scanner: one pass over a message's header section (engine._ext.headers).

Owns finding where the header section ends and where each field's name and value lie
(RFC 5322 §2.2 fields, §2.2.3 folding, §3.6 the fields worth remembering), as offsets into
the caller's bytes.  It never copies or decodes a value, never raises for any bytes, never
rewrites the message; it never imports asyncio, holds a transport or logs.

Its twin is engine/message/_headers_py.py; both must give the same result for every input.
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memchr

from engine.protocol import _tables

include "_names.pxi"
include "_result.pxi"

__all__ = ["HeaderScan", "scan_headers"]

# Which remembered attribute a field name feeds (RFC 5322 §3.6.1-§3.6.7, RFC 6376 §3.5):
# its kind is 1 + the name's index in _tables.HEADER_FIELDS, 0 for any other name.
cdef NameTable T_FIELDS
names_init(&T_FIELDS, _tables.HEADER_FIELDS)


cdef inline int _kind(const unsigned char* p, Py_ssize_t n) noexcept:
    """The tracked kind of field name ``p[:n]`` (case-insensitive), or K_NONE."""
    return names_find(&T_FIELDS, p, n) + 1


cdef int K_NONE = 0
cdef int K_RECEIVED = names_index(&T_FIELDS, b"received") + 1
cdef int K_MESSAGE_ID = names_index(&T_FIELDS, b"message-id") + 1
cdef int K_FROM = names_index(&T_FIELDS, b"from") + 1
cdef int K_TO = names_index(&T_FIELDS, b"to") + 1
cdef int K_SUBJECT = names_index(&T_FIELDS, b"subject") + 1
cdef int K_DATE = names_index(&T_FIELDS, b"date") + 1
cdef int K_DKIM = names_index(&T_FIELDS, b"dkim-signature") + 1


@cython.final
@cython.freelist(8)
cdef class HeaderScan:
    """Where the header section ends and where its fields lie (offsets into the data).

    ``astuple()`` order: (end, fields as a tuple, received, message_id, from_, to,
    subject, date, dkim_signature, malformed).  ``bare_line_ends`` (not in it): the
    section read, ``data[:end]``, holds a CR or an LF that is not part of a CRLF.
    """

    cdef public Py_ssize_t end
    # The field spans are kept as C integers (4 per field) and turned into the ``fields``
    # list of tuples only when someone asks: most callers want ``end`` and the counts, and
    # building ~120 Python ints per message would cost more than the scan itself.
    cdef Py_ssize_t* _spans
    cdef Py_ssize_t _nfields
    cdef Py_ssize_t _cap
    cdef list _fields
    cdef public Py_ssize_t received
    cdef public object message_id
    cdef public object from_
    cdef public object to
    cdef public object subject
    cdef public object date
    cdef public bint dkim_signature
    cdef public bint malformed
    cdef public bint bare_line_ends

    def __cinit__(self):
        self._spans = NULL
        self._nfields = 0
        self._cap = 0
        self._fields = None
        self.message_id = None
        self.from_ = None
        self.to = None
        self.subject = None
        self.date = None

    def __dealloc__(self):
        PyMem_Free(self._spans)

    @property
    def fields(self):
        """list of (name_start, name_end, value_start, value_end), in order."""
        cdef Py_ssize_t i
        cdef Py_ssize_t* s
        if self._fields is None:
            out = []
            s = self._spans
            for i in range(self._nfields):
                out.append((s[0], s[1], s[2], s[3]))
                s += 4
            self._fields = out
        return self._fields

    @fields.setter
    def fields(self, list value not None):
        self._fields = value

    def astuple(self):
        return (
            self.end,
            tuple(self.fields),
            self.received,
            self.message_id,
            self.from_,
            self.to,
            self.subject,
            self.date,
            self.dkim_signature,
            self.malformed,
        )

    def __eq__(self, other):
        return _astuple_eq(self, other)

    __hash__ = None  # mutable

    def __repr__(self):
        return (
            f"HeaderScan(end={self.end}, fields={len(self.fields)}, received={self.received}, "
            f"message_id={self.message_id}, from_={self.from_}, to={self.to}, "
            f"subject={self.subject}, date={self.date}, "
            f"dkim_signature={self.dkim_signature}, malformed={self.malformed})"
        )


cdef inline bint _bad_name(const unsigned char* p, Py_ssize_t n) noexcept:
    """True when the name has an octet outside ftext (%d33-57 / %d59-126, RFC 5322 §3.6.8)."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c < 33 or c > 126 or c == 58:
            return True
    return False


cdef int _finish(HeaderScan scan, int kind, Py_ssize_t ns, Py_ssize_t ne,
                 Py_ssize_t vs, Py_ssize_t ve) except -1:
    """Record a finished field; the tracked kinds keep only their first value span."""
    cdef Py_ssize_t* grown
    cdef Py_ssize_t* s
    if scan._nfields == scan._cap:
        grown = <Py_ssize_t*>PyMem_Realloc(
            scan._spans, <size_t>(scan._cap * 2 + 32) * 4 * sizeof(Py_ssize_t))
        if grown == NULL:
            raise MemoryError()
        scan._spans = grown
        scan._cap = scan._cap * 2 + 32
    s = scan._spans + 4 * scan._nfields
    s[0] = ns
    s[1] = ne
    s[2] = vs
    s[3] = ve
    scan._nfields += 1
    if kind == K_NONE:
        return 0
    if kind == K_RECEIVED:
        scan.received += 1
    elif kind == K_DKIM:
        scan.dkim_signature = True
    elif kind == K_MESSAGE_ID:
        if scan.message_id is None:
            scan.message_id = (vs, ve)
    elif kind == K_FROM:
        if scan.from_ is None:
            scan.from_ = (vs, ve)
    elif kind == K_TO:
        if scan.to is None:
            scan.to = (vs, ve)
    elif kind == K_SUBJECT:
        if scan.subject is None:
            scan.subject = (vs, ve)
    elif kind == K_DATE:
        if scan.date is None:
            scan.date = (vs, ve)
    return 0


def scan_headers(data, limit=0):
    """scan_headers(data: bytes, limit: int = 0) -> HeaderScan

    Scan the header section at the start of ``data``; never raises for any bytes.
    ``limit`` > 0 scans as if ``data`` were ``data[:limit]`` (a section that does not end
    within it is then ``malformed``, with ``end`` where the scan stopped).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    cdef bytes raw = <bytes>data
    cdef Py_ssize_t n = len(raw)
    if limit > 0 and limit < n:
        n = limit
    cdef const unsigned char* buf = raw
    cdef HeaderScan scan = HeaderScan.__new__(HeaderScan)
    cdef bint open_field = False
    cdef Py_ssize_t name_start = 0, name_end = 0, value_start = 0, value_end = 0
    cdef Py_ssize_t pos = 0, content_end, nxt, stop
    cdef int kind = K_NONE
    cdef const unsigned char* lf
    cdef const unsigned char* colon
    cdef unsigned char first
    cdef bint bare
    while pos < n:
        # A header line ends at LF; a CR right before it belongs to the line ending.  CRLF
        # is the rule (RFC 5322 §2.2) but a bare LF also ends a line so the scan is total.
        lf = <const unsigned char*>memchr(buf + pos, 10, <size_t>(n - pos))
        if lf == NULL:
            content_end = n
            nxt = n
        else:
            nxt = (lf - buf) + 1
            content_end = lf - buf
            if content_end > pos and buf[content_end - 1] == 13:
                content_end -= 1
        first = buf[pos]
        # Checked for every line the section takes (all but one the scan stops at): an LF
        # without its CR, or a CR inside the line (RFC 5322 §2.2: CRLF ends a line).
        bare = ((lf != NULL and content_end == nxt - 1)
                or memchr(buf + pos, 13, <size_t>(content_end - pos)) != NULL)
        if content_end == pos and lf != NULL:
            # The empty line that separates header from body (RFC 5322 §2.1).
            scan.bare_line_ends |= bare
            if open_field:
                _finish(scan, kind, name_start, name_end, value_start, value_end)
            scan.end = nxt
            return scan
        if first == 32 or first == 9:
            # Folded continuation (RFC 5322 §2.2.3): the value runs on to this line's end.
            if open_field:
                value_end = content_end
            else:
                scan.malformed = True  # a continuation with no field: skipped
            scan.bare_line_ends |= bare
            pos = nxt
            continue
        colon = <const unsigned char*>memchr(buf + pos, 58, <size_t>(content_end - pos))
        if colon == NULL:
            break  # neither a field nor a continuation: the section ends here, malformed
        # WSP before the colon is obsolete syntax (RFC 5322 §4.5) and not in the name.
        stop = colon - buf
        while stop > pos and (buf[stop - 1] == 32 or buf[stop - 1] == 9):
            stop -= 1
        if stop == pos:
            break  # an empty name: not a field either
        if open_field:
            _finish(scan, kind, name_start, name_end, value_start, value_end)
        open_field = True
        name_start = pos
        name_end = stop
        value_start = (colon - buf) + 1
        value_end = content_end
        kind = _kind(buf + pos, stop - pos)
        if _bad_name(buf + pos, stop - pos):
            scan.malformed = True
        scan.bare_line_ends |= bare
        pos = nxt
    # Out of data (or limit) inside the header section, or stopped at a non-field line.
    if open_field:
        _finish(scan, kind, name_start, name_end, value_start, value_end)
    scan.end = pos
    scan.malformed = True
    return scan

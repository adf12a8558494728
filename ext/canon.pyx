# cython: language_level=3
"""Compiled DKIM relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4) in one pass
(engine._ext.canon).

Owns the (name, raw, colon) items the field functions take, made from a header scan's
spans, and three byte transformations: a whole body made relaxed (whitespace runs one space,
none at line ends, the empty lines at the end removed, a non-empty body ending in one CRLF),
header fields made relaxed (name lower-cased, value unfolded, runs one space, none around
the value), and a verifier's header data (§3.7: the fields h= selects, then the signature
field with its b= value empty, canonicalised, without the final CRLF), which cost ~7 µs a
signature as three Python functions (benchmarks/README.md, issue 15, fifth pass).  Python's ``bytes`` methods did it in five passes and copies (a 100 KiB body
of "XXX" lines cost 180 µs beyond its hashing, ``b"  " in data`` alone 86 µs); here each
octet is read once.  It never raises for any bytes (only for a field tuple whose colon
offset lies outside it), never imports asyncio and never logs.

Its twin is engine/message/_canon_py.py; both must give the same bytes for every input.
"""

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

__all__ = ["field_items", "header_data", "relaxed_body", "relaxed_fields"]


cdef extern from "Python.h":
    PyObject* bytes_new "PyBytes_FromStringAndSize"(const char* v, Py_ssize_t n) except NULL
    int bytes_resize "_PyBytes_Resize"(PyObject** pv, Py_ssize_t n) except -1
    char* bytes_data "PyBytes_AS_STRING"(PyObject* o) noexcept


cdef object _owned(PyObject* made, Py_ssize_t size):
    """The bytes object ``made`` (a new reference) cut to ``size`` octets, as an object."""
    bytes_resize(&made, size)  # on failure ``made`` is freed and MemoryError raised
    result = <object>made
    Py_DECREF(result)  # the reference bytes_new gave; ``result`` holds its own
    return result


cdef inline bint _wsp(unsigned char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline bint _wsp8(uint64_t x) noexcept nogil:
    """Some octet of the 8 in ``x`` is a space or a tab (the "has zero byte" test on x
    xor each)."""
    cdef uint64_t a = x ^ 0x2020202020202020ULL
    cdef uint64_t b = x ^ 0x0909090909090909ULL
    return ((((a - 0x0101010101010101ULL) & ~a) | ((b - 0x0101010101010101ULL) & ~b))
            & 0x8080808080808080ULL) != 0


cdef Py_ssize_t _body(const unsigned char* p, Py_ssize_t n, unsigned char* out) noexcept nogil:
    """The canonical body of p[:n] written to out (room for n + 2); its length."""
    cdef Py_ssize_t i = 0, j, o = 0
    cdef uint64_t word
    while i < n:
        # Copy up to the next space or tab, eight octets at a time where none is one
        # (o <= i always, so the eight fit in out).
        while i + 8 <= n:
            memcpy(&word, p + i, 8)
            if _wsp8(word):
                break
            memcpy(out + o, &word, 8)
            o += 8
            i += 8
        while i < n and not _wsp(p[i]):
            out[o] = p[i]
            o += 1
            i += 1
        if i == n:
            break
        j = i + 1
        while j < n and _wsp(p[j]):
            j += 1
        # A run before CRLF goes (§3.4.4 a: no whitespace at line ends), and at the end of
        # the body (a last line without CRLF); any other run is one space.
        if j < n and not (p[j] == 13 and j + 1 < n and p[j + 1] == 10):
            out[o] = 32
            o += 1
        i = j
    # §3.4.4 b: the empty lines at the end removed; a non-empty body ends in one CRLF.
    while o >= 2 and out[o - 2] == 13 and out[o - 1] == 10:
        o -= 2
    if o:
        out[o] = 13
        out[o + 1] = 10
        o += 2
    return o


def relaxed_body(const unsigned char[::1] data not None) -> bytes:
    """The relaxed canonical form of the whole body ``data`` (RFC 6376 §3.4.4)."""
    cdef Py_ssize_t n = data.shape[0]
    cdef PyObject* out
    if n == 0:
        return b""
    out = bytes_new(NULL, n + 2)
    return _owned(out, _body(&data[0], n, <unsigned char*>bytes_data(out)))


cdef Py_ssize_t _field(const unsigned char* p, Py_ssize_t n, Py_ssize_t colon,
                       unsigned char* out) noexcept nogil:
    """The relaxed form of one field p[:n] whose value starts at p[colon] (after the
    ":"), with its CRLF, written to out (room for n + 3); its length."""
    cdef Py_ssize_t i = 0, end = colon - 1, o = 0, value
    cdef unsigned char c
    cdef bint pending = False
    # The name: without the whitespace around it (§3.4.2: "Delete any WSP characters
    # remaining before and after the colon"), lower-cased.
    while i < end and _wsp(p[i]):
        i += 1
    while end > i and _wsp(p[end - 1]):
        end -= 1
    while i < end:
        c = p[i]
        out[o] = c + 32 if 65 <= c <= 90 else c
        o += 1
        i += 1
    out[o] = 58  # ":"
    o += 1
    value = o
    # The value: CRLFs removed (unfolding), runs of WSP one space, none at either end.
    i = colon
    while i < n:
        c = p[i]
        if c == 13 and i + 1 < n and p[i + 1] == 10:
            i += 2
            continue
        if _wsp(c):
            pending = o > value  # none before the value's first octet
            i += 1
            continue
        if pending:
            out[o] = 32
            o += 1
            pending = False
        out[o] = c
        o += 1
        i += 1
    out[o] = 13
    out[o + 1] = 10
    return o + 2


def relaxed_fields(fields) -> bytes:
    """The relaxed forms of ``fields`` (RFC 6376 §3.4.2), joined: each item a (name, raw,
    colon) tuple, ``raw`` the field as in the message without its CRLF and ``colon`` the
    offset of its value (after the ":"); None items are skipped (h= names a field the
    message does not have: the null string, §5.4.2)."""
    cdef Py_ssize_t total = 0, o = 0, colon
    cdef list items = [item for item in fields if item is not None]
    cdef list raws = [item[1] for item in items]
    cdef list colons = [item[2] for item in items]
    cdef bytes raw
    cdef Py_ssize_t k
    cdef unsigned char* out
    cdef PyObject* result
    for k in range(len(items)):
        raw = raws[k]
        colon = colons[k]
        if not 1 <= colon <= len(raw):
            raise ValueError("colon is not within the field")
        total += len(raw) + 3
    result = bytes_new(NULL, total)
    out = <unsigned char*>bytes_data(result)
    for k in range(len(items)):
        raw = raws[k]
        o += _field(<const unsigned char*>bytes_data(<PyObject*>raw), len(raw), colons[k],
                    out + o)
    return _owned(result, o)


cdef inline bint _fws(unsigned char c) noexcept nogil:
    return c == 32 or c == 9 or c == 13 or c == 10


cdef Py_ssize_t _b_value(const unsigned char* p, Py_ssize_t n, Py_ssize_t colon,
                         Py_ssize_t* stop) noexcept nogil:
    """Where the value of the first tag named "b" of the tag list p[colon:n] begins (after
    its "="), its end (the next ";", or n) in ``stop``; -1 when there is none.  FWS may
    surround a tag's name (RFC 6376 §3.2); names are case-sensitive ("B=" is not b=)."""
    cdef Py_ssize_t i = colon, j
    while True:
        j = i
        while j < n and _fws(p[j]):
            j += 1
        if j < n and p[j] == 98:  # "b"
            j += 1
            while j < n and _fws(p[j]):
                j += 1
            if j < n and p[j] == 61:  # "="
                i = j + 1
                j = i
                while j < n and p[j] != 59:  # ";"
                    j += 1
                stop[0] = j
                return i
        while i < n and p[i] != 59:
            i += 1
        if i >= n:
            return -1
        i += 1


def header_data(fields, names, signature, bint relaxed) -> bytes:
    """The header data a verifier hashes (RFC 6376 §3.7), without its final CRLF: for each
    name of ``names`` (h=, lower-case) the last field of that name not yet used, from the
    bottom up (§5.4.2; none left: the null string), then ``signature`` with its first b=
    tag's value removed (its name, the blanks around it and the "=" kept), each
    canonicalised relaxed (§3.4.2) or simple (§3.4.1).  ``fields`` and ``signature`` are
    (name lower-case, raw, colon) tuples as :func:`relaxed_fields` takes them."""
    cdef dict by_name = {}
    cdef list stack, chosen = []
    cdef bytes raw, sig_raw = signature[1]
    cdef Py_ssize_t sig_colon = signature[2], start, stop = 0, total = 0, o = 0, colon, k
    cdef unsigned char* out
    cdef PyObject* result
    for item in fields:
        stack = by_name.get(item[0])
        if stack is None:
            by_name[item[0]] = [item]
        else:
            stack.append(item)
    for name in names:
        stack = by_name.get(name)
        if stack:
            chosen.append(stack.pop())
    if not 1 <= sig_colon <= len(sig_raw):
        raise ValueError("colon is not within the field")
    start = _b_value(<const unsigned char*>bytes_data(<PyObject*>sig_raw), len(sig_raw),
                     sig_colon, &stop)
    if start >= 0:
        sig_raw = sig_raw[:start] + sig_raw[stop:]
    chosen.append((None, sig_raw, sig_colon))
    for item in chosen:
        raw = item[1]
        colon = item[2]
        if not 1 <= colon <= len(raw):
            raise ValueError("colon is not within the field")
        total += len(raw) + 3
    result = bytes_new(NULL, total)
    out = <unsigned char*>bytes_data(result)
    for item in chosen:
        raw = item[1]
        if relaxed:
            o += _field(<const unsigned char*>bytes_data(<PyObject*>raw), len(raw), item[2],
                        out + o)
        else:
            memcpy(out + o, bytes_data(<PyObject*>raw), len(raw))
            out[o + len(raw)] = 13
            out[o + len(raw) + 1] = 10
            o += len(raw) + 2
    return _owned(result, o - 2)


def field_items(bytes data not None, spans) -> list:
    """The (name lower-case, raw, colon) item of each header field of ``data`` from its
    (name start, name end, value start, value end) span (engine.message.headers'
    ``HeaderScan.fields``): what :func:`relaxed_fields` and :func:`header_data` take."""
    cdef list out = []
    cdef Py_ssize_t ns, ne, vs, ve, k, n = len(data)
    cdef const unsigned char* p = <const unsigned char*>bytes_data(<PyObject*>data)
    cdef PyObject* name
    cdef unsigned char* q
    cdef unsigned char c
    for ns, ne, vs, ve in spans:
        if not 0 <= ns <= ne <= vs <= ve <= n:
            raise ValueError("a span is not within the data")
        name = bytes_new(NULL, ne - ns)
        q = <unsigned char*>bytes_data(name)
        for k in range(ne - ns):
            c = p[ns + k]
            q[k] = c + 32 if 65 <= c <= 90 else c
        out.append((_owned(name, ne - ns), data[ns:ve], vs - ns))
    return out

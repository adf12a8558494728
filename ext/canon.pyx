# cython: language_level=3
"""Compiled DKIM relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4) in one pass, and a
DKIM-Signature field's tags parsed and checked (§6.1.1) (engine._ext.canon).

Owns the (name, raw, colon) items the field functions take, made from a header scan's
spans, and three byte transformations: a whole body made relaxed (whitespace runs one space,
none at line ends, the empty lines at the end removed, a non-empty body ending in one CRLF),
header fields made relaxed (name lower-cased, value unfolded, runs one space, none around
the value), and a verifier's header data (§3.7: the fields h= selects, then the signature
field with its b= value empty, canonicalised, without the final CRLF), which cost ~7 µs a
signature as three Python functions (benchmarks/README.md, issue 15, fifth pass).  Python's
``bytes`` methods did it in five passes and copies (a 100 KiB body of "XXX" lines cost
180 µs beyond its hashing, ``b"  " in data`` alone 86 µs); here each octet is read once.
Also ``signature_tags``: a usable signature's tags as one tuple in one pass (~1.2 against
~9 µs in Python, issue 15's sixth pass), every other signature handed to the twin, which
says why it is unusable.  It never raises for any bytes (only for a field tuple whose colon
offset lies outside it), never imports asyncio and never logs.

Its twin is engine/message/_canon_py.py; both must give the same values for every input.
"""

from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy, memset, strlen

__all__ = ["field_items", "header_data", "relaxed_body", "relaxed_fields", "signature_tags"]


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


cdef inline bint _same_name(object a, object b) except -1:
    """a == b, without a rich comparison for two bytes objects."""
    if a is b:
        return True
    if type(a) is bytes and type(b) is bytes:
        return (len(<bytes>a) == len(<bytes>b)
                and memcmp(bytes_data(<PyObject*>a), bytes_data(<PyObject*>b), len(<bytes>a)) == 0)
    return a == b


cdef list _selected(list fields, tuple names):
    """§5.4.2: for each name, the last field of that name not yet used, from the bottom up
    (none left: nothing).  A header and h= of ordinary size are searched from the bottom
    for each name (no dict of lists to build: ~1.7 against ~0.5 µs for six names over
    seven fields); a large one through a dict, whose cost grows with their sum, not
    their product."""
    cdef Py_ssize_t nf = len(fields), nn = len(names), k, j
    cdef unsigned char used[64]
    cdef list chosen = [], stack
    cdef dict by_name
    if nf <= 64 and nn <= 64:
        memset(used, 0, nf)
        for j in range(nn):
            name = names[j]
            for k in range(nf - 1, -1, -1):
                if not used[k] and _same_name(fields[k][0], name):
                    used[k] = 1
                    chosen.append(fields[k])
                    break
        return chosen
    by_name = {}
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
    return chosen


def header_data(fields, names, signature, bint relaxed) -> bytes:
    """The header data a verifier hashes (RFC 6376 §3.7), without its final CRLF: for each
    name of ``names`` (h=, lower-case) the last field of that name not yet used, from the
    bottom up (§5.4.2; none left: the null string), then ``signature`` with its first b=
    tag's value removed (its name, the blanks around it and the "=" kept), each
    canonicalised relaxed (§3.4.2) or simple (§3.4.1).  ``fields`` and ``signature`` are
    (name lower-case, raw, colon) tuples as :func:`relaxed_fields` takes them."""
    cdef list chosen
    cdef bytes raw, sig_raw = signature[1]
    cdef Py_ssize_t sig_colon = signature[2], start, stop = 0, total = 0, o = 0, colon, k
    cdef unsigned char* out
    cdef PyObject* result
    chosen = _selected(fields if type(fields) is list else list(fields),
                       names if type(names) is tuple else tuple(names))
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


# --- a DKIM-Signature field's tags (RFC 6376 §3.2, §3.5, §6.1.1) -------------------------
#
# The common signature (ASCII, its tags each once, every value well formed, nothing to
# report) is parsed here in one pass; anything else, and every problem, goes to the twin
# (engine.message._canon_py.signature_tags): each reason is the twin's by construction,
# and only the values of a usable signature are made here.

from engine.message._canon_py import signature_tags as _signature_tags_py

cdef extern from "Python.h":
    object unicode_new "PyUnicode_New"(Py_ssize_t size, Py_UCS4 maxchar)
    void* unicode_data "PyUnicode_DATA"(object o)
    object bytes_sized "PyBytes_FromStringAndSize"(const char* v, Py_ssize_t n)
    object long_of "PyLong_FromLongLong"(long long v)
    void* mem_alloc "PyMem_Malloc"(size_t n)
    void mem_free "PyMem_Free"(void* p)

# The tags the fast path knows, by slot: a letter (A-Z 0-25, a-z 26-51) and "bh".
cdef enum:
    SLOTS = 53
    T_BH = 52
    T_A = 26
    T_B = 27
    T_C = 28
    T_D = 29
    T_H = 33
    T_I = 34
    T_L = 37
    T_Q = 42
    T_S = 44
    T_T = 45
    T_V = 47
    T_X = 49

cdef signed char _B64[256]
cdef int _k
for _k in range(256):
    _B64[_k] = -1
for _k in range(26):
    _B64[65 + _k] = _k
    _B64[97 + _k] = 26 + _k
for _k in range(10):
    _B64[48 + _k] = 52 + _k
_B64[43] = 62
_B64[47] = 63

cdef str _RSA = "rsa-sha256"
cdef str _ED25519 = "ed25519-sha256"
cdef str _SIMPLE = "simple"
cdef str _RELAXED = "relaxed"


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef inline int _slot(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """The slot of the tag named p[:n]; -1 for any other name, valid or not (the twin's)."""
    cdef unsigned char c
    if n == 1:
        c = p[0]
        if 65 <= c <= 90:
            return c - 65
        if 97 <= c <= 122:
            return 26 + c - 97
    elif n == 2 and p[0] == 98 and p[1] == 104:  # "bh"
        return T_BH
    return -1


cdef bint _same(const unsigned char* p, Py_ssize_t n, const unsigned char* q,
                Py_ssize_t m) noexcept nogil:
    """p[:n] and q[:m] are equal but for the case of ASCII letters."""
    cdef Py_ssize_t k
    if n != m:
        return False
    for k in range(n):
        if _lower(p[k]) != _lower(q[k]):
            return False
    return True


cdef inline bint _word(const unsigned char* p, Py_ssize_t n, const char* word) noexcept nogil:
    """p[:n] is the lower-case ``word``, whatever its case."""
    return _same(p, n, <const unsigned char*>word, strlen(word))


cdef inline bint _plain(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """p[:n] is printable ASCII and FWS only."""
    cdef Py_ssize_t k
    cdef unsigned char c
    for k in range(n):
        c = p[k]
        if not (32 <= c <= 126 or c == 9 or c == 10 or c == 13):
            return False
    return True


cdef str _text(const unsigned char* p, Py_ssize_t n, bint lower):
    """p[:n] (ASCII) as a str, lower-cased if ``lower``."""
    cdef object s = unicode_new(n, 127)
    cdef unsigned char* q = <unsigned char*>unicode_data(s)
    cdef Py_ssize_t k
    for k in range(n):
        q[k] = _lower(p[k]) if lower else p[k]
    return s


cdef long long _digits(const unsigned char* p, Py_ssize_t n, Py_ssize_t most) noexcept nogil:
    """The number p[:n] of 1 to ``most`` (18 at most) ASCII digits; -1 for anything else."""
    cdef long long v = 0
    cdef Py_ssize_t k
    if n < 1 or n > most:
        return -1
    for k in range(n):
        if not 48 <= p[k] <= 57:
            return -1
        v = v * 10 + (p[k] - 48)
    return v


cdef object _base64(const unsigned char* p, Py_ssize_t n):
    """p[:n] decoded as base64, FWS ignored, when it is canonical: a non-zero multiple of
    four characters, "=" only as the last one or two (binascii's strict mode accepts
    that, and ignores the unused bits of the last group as this does); None otherwise."""
    cdef Py_ssize_t k, m = 0, pads = 0, o = 0
    cdef unsigned int acc = 0, bits = 0
    cdef signed char v
    cdef unsigned char c
    cdef PyObject* out = bytes_new(NULL, n // 4 * 3 + 3)
    cdef unsigned char* q = <unsigned char*>bytes_data(out)
    for k in range(n):
        c = p[k]
        if _fws(c):
            continue
        m += 1
        if c == 61:  # "="
            pads += 1
            continue
        v = _B64[c]
        if v < 0 or pads:
            break
        acc = ((acc << 6) | <unsigned int>v) & 0xFFFFFF
        bits += 6
        if bits >= 8:
            bits -= 8
            q[o] = (acc >> bits) & 0xFF
            o += 1
    else:
        if m and m % 4 == 0 and pads <= 2:
            return _owned(out, o)
    Py_DECREF(<object>out)
    return None


cdef bint _in_domain(const unsigned char* i, Py_ssize_t n, const unsigned char* d,
                     Py_ssize_t m) noexcept nogil:
    """i[:n] is d[:m] or a name below it (both compared lower-case)."""
    return _same(i, n, d, m) or (n > m and i[n - m - 1] == 46 and _same(i + n - m, m, d, m))


cdef inline Py_ssize_t _colon_item(const unsigned char* p, Py_ssize_t ve, Py_ssize_t* start,
                                   Py_ssize_t* end) noexcept nogil:
    """The item of a ":"-separated list p[...:ve] that begins at start[0], without the FWS
    around it: p[start[0]:end[0]] once moved; returns where its ":" (or ve) is."""
    cdef Py_ssize_t sep = start[0], i = start[0], k
    while sep < ve and p[sep] != 58:
        sep += 1
    k = sep
    while i < k and _fws(p[i]):
        i += 1
    while k > i and _fws(p[k - 1]):
        k -= 1
    start[0] = i
    end[0] = k
    return sep


cdef bint _dns_txt(const unsigned char* p, Py_ssize_t vs, Py_ssize_t ve) noexcept nogil:
    """One of the ":"-separated methods of q= p[vs:ve] is dns/txt (§3.5)."""
    cdef Py_ssize_t start = vs, stop, k
    while True:
        stop = _colon_item(p, ve, &start, &k)
        if _word(p + start, k - start, "dns/txt"):
            return True
        if stop >= ve:
            return False
        start = stop + 1


def signature_tags(bytes raw not None, Py_ssize_t colon, now):
    """§6.1.1: the tags of the DKIM-Signature field ``raw`` (as in the message, without
    its CRLF; its value at ``colon``) parsed and checked at time ``now``: a Signature
    tuple, or the (result, reason) Problem that makes it unusable (see the twin)."""
    cdef const unsigned char* p = <const unsigned char*>bytes_data(<PyObject*>raw)
    cdef Py_ssize_t n = len(raw), i, end, eq, ns, ne, vs, ve, k
    cdef Py_ssize_t starts[SLOTS]
    cdef Py_ssize_t stops[SLOTS]
    cdef int slot
    cdef const unsigned char* hit
    if not 0 <= colon <= n:
        return _signature_tags_py(raw, colon, now)
    for k in range(SLOTS):
        starts[k] = -1
    # §3.2: name=value tags separated by ";", a final ";" allowed, FWS around both.
    i = colon
    while True:
        hit = <const unsigned char*>memchr(p + i, 59, n - i)  # ";"
        end = n if hit == NULL else hit - p
        hit = <const unsigned char*>memchr(p + i, 61, end - i)  # "="
        eq = end if hit == NULL else hit - p
        if eq == end:
            k = i
            while k < end and _fws(p[k]):
                k += 1
            if end == n and k == end:
                break  # the blanks after a final ";", or nothing at all
            return _signature_tags_py(raw, colon, now)
        ns, ne = i, eq
        while ns < ne and _fws(p[ns]):
            ns += 1
        while ne > ns and _fws(p[ne - 1]):
            ne -= 1
        slot = _slot(p + ns, ne - ns)
        if slot < 0 or starts[slot] >= 0:
            return _signature_tags_py(raw, colon, now)
        vs, ve = eq + 1, end
        while vs < ve and _fws(p[vs]):
            vs += 1
        while ve > vs and _fws(p[ve - 1]):
            ve -= 1
        # The values read (all but b= and bh=, which only base64 decodes) must be ASCII,
        # which Python's str methods (lower, strip, isdigit) treat as bytes are here; a
        # value never read may hold anything (";" and "=" split UTF-8 and the twin's
        # surrogate escapes alike).
        if slot != T_B and slot != T_BH and not _plain(p + vs, ve - vs):
            return _signature_tags_py(raw, colon, now)
        starts[slot] = vs
        stops[slot] = ve
        if end == n:
            break
        i = end + 1
    found = _checked(p, starts, stops, now)
    return _signature_tags_py(raw, colon, now) if found is None else found


cdef object _checked(const unsigned char* p, const Py_ssize_t* starts,
                     const Py_ssize_t* stops, now):
    """The Signature tuple of the tags found; None when a check fails (the twin says why)."""
    cdef Py_ssize_t vs, ve, k, j, start, sep, dom_end, d_start = starts[T_D]
    cdef long long limit = -1, signed_at = -1, expires = -1
    cdef bint signs_from = False, subdomain = False
    cdef str algorithm, header_canon = _SIMPLE, body_canon = _SIMPLE, domain, identity
    cdef unsigned char* q
    if (starts[T_V] < 0 or starts[T_A] < 0 or starts[T_B] < 0 or starts[T_BH] < 0
            or d_start < 0 or starts[T_H] < 0 or starts[T_S] < 0):
        return None
    if not (stops[T_V] - starts[T_V] == 1 and p[starts[T_V]] == 49):  # v=1
        return None
    vs, ve = starts[T_A], stops[T_A]
    if _word(p + vs, ve - vs, "rsa-sha256"):
        algorithm = _RSA
    elif _word(p + vs, ve - vs, "ed25519-sha256"):
        algorithm = _ED25519
    else:
        return None
    if starts[T_C] >= 0:
        vs, ve = starts[T_C], stops[T_C]
        sep = vs
        while sep < ve and p[sep] != 47:  # "/"
            sep += 1
        if _word(p + vs, sep - vs, "relaxed"):
            header_canon = _RELAXED
        elif not _word(p + vs, sep - vs, "simple"):
            return None
        if sep + 1 < ve:  # §3.5: "relaxed" alone (or "relaxed/") is relaxed/simple
            if _word(p + sep + 1, ve - sep - 1, "relaxed"):
                body_canon = _RELAXED
            elif not _word(p + sep + 1, ve - sep - 1, "simple"):
                return None
    dom_end = stops[T_D]
    while dom_end > d_start and p[dom_end - 1] == 46:  # its final dots
        dom_end -= 1
    domain = _text(p + d_start, dom_end - d_start, True)
    # h=: the names between ":", without FWS around them, lower-case.
    names = []
    ve = stops[T_H]
    start = starts[T_H]
    while True:
        sep = _colon_item(p, ve, &start, &k)
        name = bytes_sized(NULL, k - start)
        q = <unsigned char*>bytes_data(<PyObject*>name)
        for j in range(k - start):
            q[j] = _lower(p[start + j])
        signs_from = signs_from or _word(p + start, k - start, "from")
        names.append(name)
        if sep >= ve:
            break
        start = sep + 1
    if not signs_from:
        return None
    if starts[T_I] >= 0:
        vs, ve = starts[T_I], stops[T_I]
        start = ve
        while start > vs and p[start - 1] != 64:  # i='s domain: after its last "@"
            start -= 1
        k = ve
        while k > start and p[k - 1] == 46:
            k -= 1
        if not _in_domain(p + start, k - start, p + d_start, dom_end - d_start):
            return None
        # §3.6.1 t=s (checked once the key is known): i='s domain must be d= itself.
        subdomain = not _same(p + start, k - start, p + d_start, stops[T_D] - d_start)
    if starts[T_Q] >= 0 and not _dns_txt(p, starts[T_Q], stops[T_Q]):
        return None
    if starts[T_L] >= 0:
        limit = _digits(p + starts[T_L], stops[T_L] - starts[T_L], 18)
        if limit < 0:
            return None  # not a number, or one of up to 76 digits: the twin's
    if starts[T_T] >= 0:
        signed_at = _digits(p + starts[T_T], stops[T_T] - starts[T_T], 12)
        if signed_at < 0:
            return None
    if starts[T_X] >= 0:
        expires = _digits(p + starts[T_X], stops[T_X] - starts[T_X], 12)
        if expires < 0 or (signed_at >= 0 and expires < signed_at) or now > long_of(expires):
            return None
    bh = _base64(p + starts[T_BH], stops[T_BH] - starts[T_BH])
    if bh is None:
        return None
    b = _base64(p + starts[T_B], stops[T_B] - starts[T_B])
    if b is None:
        return None
    if starts[T_I] >= 0:
        identity = _text(p + starts[T_I], stops[T_I] - starts[T_I], False)
    elif domain:
        identity = "@" + domain
    else:
        identity = ""
    selector = _text(p + starts[T_S], stops[T_S] - starts[T_S], True)
    # header.b (RFC 6008): the first 8 characters of b= without FWS.
    k = starts[T_B]
    j = 0
    while k < stops[T_B] and j < 8:
        if not _fws(p[k]):
            j += 1
        k += 1
    vs = starts[T_B]
    b8 = _text_no_fws(p + vs, k - vs)
    return (algorithm, header_canon, body_canon, tuple(names),
            None if limit < 0 else limit, bh, b, domain, selector, identity, b8,
            selector + "._domainkey." + domain, subdomain)


cdef str _text_no_fws(const unsigned char* p, Py_ssize_t n):
    """p[:n] (ASCII) without its FWS, as a str."""
    cdef Py_ssize_t k, m = 0
    for k in range(n):
        if not _fws(p[k]):
            m += 1
    s = unicode_new(m, 127)
    cdef unsigned char* q = <unsigned char*>unicode_data(s)
    m = 0
    for k in range(n):
        if not _fws(p[k]):
            q[m] = p[k]
            m += 1
    return s

# Included by ext/command.pyx and ext/headers.pyx: ASCII case-insensitive matching of
# protocol names (verbs, ESMTP keywords and values, header field names; RFC 5321 §2.4 and
# RFC 5322 §1.2.2 make them case-insensitive) against the shared tables of
# engine/protocol/_tables.py.  A NameTable is built once at import from a table's names and
# searched in C (no Python object touched), so a hot loop pays no more than a chain of
# literal compares.

from libc.string cimport memcpy

cdef unsigned char LOWER[256]


cdef void _init_lower() noexcept:
    cdef int c
    for c in range(256):
        LOWER[c] = c + 32 if 65 <= c <= 90 else c


_init_lower()


cdef inline bint _eqi(const unsigned char* p, Py_ssize_t n, const char* lit) noexcept nogil:
    """p[:n] equals the lower-case literal ``lit`` (NUL-terminated), ASCII case-insensitively."""
    cdef Py_ssize_t k = 0
    while k < n:
        if lit[k] == 0 or LOWER[p[k]] != <unsigned char>lit[k]:
            return False
        k += 1
    return lit[n] == 0


cdef enum:
    NAMES_MAX = 16  # names in one table
    NAME_MAX = 15  # octets in one name


cdef struct NameTable:
    Py_ssize_t count
    unsigned long long lengths  # bit n set: some name is n octets long (a quick "no")
    Py_ssize_t size[NAMES_MAX]
    unsigned long long word[NAMES_MAX]  # a name of up to 8 octets folded into one integer
    char lower[NAMES_MAX][NAME_MAX + 1]  # lower-cased, NUL-terminated


cdef inline unsigned long long _fold(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """p[:n] (n <= 8) lower-cased into one integer: one compare per candidate name."""
    cdef unsigned long long w = 0
    cdef Py_ssize_t k
    for k in range(n):
        w = (w << 8) | LOWER[p[k]]
    return w


cdef bytes _name_bytes(object name):
    return (name if isinstance(name, bytes) else name.encode("ascii")).lower()


cdef int names_init(NameTable* table, object names) except -1:
    """Fill ``table`` from a sequence of str or bytes names, in order (index = position)."""
    cdef bytes raw
    cdef Py_ssize_t k = 0
    table.lengths = 0
    for name in names:
        raw = _name_bytes(name)
        if k >= NAMES_MAX or len(raw) > NAME_MAX:
            raise ValueError(f"name table too large for {name!r}")
        memcpy(table.lower[k], <const char*>raw, len(raw) + 1)
        table.size[k] = len(raw)
        table.word[k] = _fold(<const unsigned char*><const char*>raw, len(raw)) if len(raw) <= 8 else 0
        table.lengths |= 1ULL << len(raw)
        k += 1
    table.count = k
    return 0


cdef inline int names_find(const NameTable* table, const unsigned char* p,
                           Py_ssize_t n) noexcept nogil:
    """Index of p[:n] in ``table`` (ASCII case-insensitive), or -1."""
    cdef Py_ssize_t k
    cdef unsigned long long w
    if n > NAME_MAX or not (table.lengths >> n) & 1:
        return -1
    if n <= 8:
        w = _fold(p, n)
        for k in range(table.count):
            if table.word[k] == w and table.size[k] == n:
                return <int>k
        return -1
    for k in range(table.count):
        if table.size[k] == n and _eqi(p, n, table.lower[k]):
            return <int>k
    return -1


cdef int names_index(const NameTable* table, object name) except -1:
    """Index of a name the table must hold: binds a constant by name, never by position."""
    cdef bytes raw = _name_bytes(name)
    cdef int k = names_find(table, <const unsigned char*><const char*>raw, len(raw))
    if k < 0:
        raise ImportError(f"engine/protocol/_tables.py lacks {name!r}")
    return k

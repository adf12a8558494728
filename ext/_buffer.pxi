# Included by ext/wire.pyx and ext/reply.pyx: a growable byte buffer in C memory, for bytes
# that arrive in pieces and are parsed in place (a command line, a reply line).  The
# including cdef class holds a Buf by value (zeroed with the object), appends to it and
# frees it in __dealloc__.  Growth doubles, so appending n octets in pieces costs O(n).

from libc.stdlib cimport free, realloc
from libc.string cimport memcpy


cdef struct Buf:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int buf_grow(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap = b.cap * 2 if b.cap else 256
    cdef unsigned char* nd
    while cap < need:
        cap *= 2
    nd = <unsigned char*>realloc(b.data, cap)
    if nd == NULL:
        raise MemoryError()
    b.data = nd
    b.cap = cap
    return 0


cdef inline int buf_append(Buf* b, const unsigned char* p, Py_ssize_t n) except -1:
    if b.len + n > b.cap:
        buf_grow(b, n)
    memcpy(b.data + b.len, p, n)
    b.len += n
    return 0


cdef inline void buf_free(Buf* b) noexcept:
    free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0

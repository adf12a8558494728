# cython: language_level=3
"""Compiled SMTP command parser (engine._ext.command); twin: engine/protocol/_command_py.py.

Owns the RFC 5321 §4.1 command grammar as the server reads it (verbs, paths with the RFC 6531
§3.3 UTF-8 extensions, the ESMTP parameters of RFC 1870, 3030, 3461, 4954, 6152, 6531), the
error reply each mistake maps to, xtext (RFC 3461 §4) and the client-side wire form.

It must never import asyncio, hold a transport, log, or copy a byte of the line into an error
text.  Parsing runs over C pointers with a byte-class table; Python strings are built once per
field.  Every step mirrors the twin in the same order: the twin tests demand identical
results and identical errors, so change both or neither.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr

from engine.protocol import _tables
from engine.protocol.errors import CommandError

include "_names.pxi"
include "_result.pxi"

cdef extern from "Python.h":
    object PyUnicode_FromKindAndData(int kind, const void* buffer, Py_ssize_t size)
    int PyUnicode_4BYTE_KIND

__all__ = ["Command", "format_command", "parse_command", "xtext_decode", "xtext_encode"]

# ---- errors: engine/protocol/_tables.py holds the table ----------------------------------

# The error kinds (indexes into COMMAND_ERRORS) as C ints, bound by name at import.
cdef int E_CTL = _tables.E_CTL, E_UNREC = _tables.E_UNREC
cdef int E_NOTIMPL = _tables.E_NOTIMPL, E_NOARGS = _tables.E_NOARGS
cdef int E_NEEDARG = _tables.E_NEEDARG, E_HELO = _tables.E_HELO
cdef int E_ARGCHARS = _tables.E_ARGCHARS, E_MAIL_KW = _tables.E_MAIL_KW
cdef int E_RCPT_KW = _tables.E_RCPT_KW, E_MAIL_PATH = _tables.E_MAIL_PATH
cdef int E_MAIL_LONG = _tables.E_MAIL_LONG, E_MAIL_UTF8 = _tables.E_MAIL_UTF8
cdef int E_RCPT_PATH = _tables.E_RCPT_PATH, E_RCPT_LONG = _tables.E_RCPT_LONG
cdef int E_RCPT_UTF8 = _tables.E_RCPT_UTF8, E_NONASCII = _tables.E_NONASCII
cdef int E_P_SYNTAX = _tables.E_P_SYNTAX, E_P_UNKNOWN = _tables.E_P_UNKNOWN
cdef int E_P_DUP = _tables.E_P_DUP, E_P_NEEDVAL = _tables.E_P_NEEDVAL
cdef int E_P_NOVAL = _tables.E_P_NOVAL, E_P_CHARS = _tables.E_P_CHARS
cdef int E_SIZE = _tables.E_SIZE, E_BODY = _tables.E_BODY
cdef int E_RET = _tables.E_RET, E_ENVID = _tables.E_ENVID
cdef int E_AUTHP = _tables.E_AUTHP, E_NOTIFY = _tables.E_NOTIFY
cdef int E_ORCPT = _tables.E_ORCPT, E_BDAT = _tables.E_BDAT
cdef int E_AUTH = _tables.E_AUTH, E_X_ESC = _tables.E_X_ESC
cdef int E_X_CTL = _tables.E_X_CTL, E_X_CHAR = _tables.E_X_CHAR

cdef tuple _ERRORS = _tables.COMMAND_ERRORS

# Limits of RFC 5321 §4.5.3.1 and the parameters' RFCs (see _tables).
cdef Py_ssize_t MAX_LOCAL = _tables.MAX_LOCAL
cdef Py_ssize_t MAX_PATH = _tables.MAX_PATH
cdef Py_ssize_t MAX_DOMAIN = _tables.MAX_DOMAIN
cdef Py_ssize_t MAX_LABEL = _tables.MAX_LABEL
cdef Py_ssize_t MAX_ENVID = _tables.MAX_ENVID
cdef Py_ssize_t MAX_SIZE_DIGITS = _tables.MAX_SIZE_DIGITS
cdef Py_ssize_t MAX_MECHANISM = _tables.MAX_MECHANISM
cdef Py_ssize_t MAX_BDAT_DIGITS = _tables.MAX_BDAT_DIGITS


cdef object _err(int kind):
    text, code, enhanced = _ERRORS[kind]
    return CommandError(text, code, enhanced)


# ---- byte classes (RFC 5321 §4.1.2; bytes >= 0x80 stand for RFC 6531 UTF8-non-ascii) -----

cdef enum:
    C_ATEXT = 1        # atext
    C_QTEXT = 2        # qtextSMTP %d32-33 / %d35-91 / %d93-126
    C_LDH = 4          # letter, digit, hyphen
    C_LETDIG = 8       # letter, digit
    C_DCONTENT = 16    # dcontent %d33-90 / %d94-126 (ASCII only)
    C_PVALUE = 32      # esmtp-value %d33-60 / %d62-126
    C_ALNUM = 64       # ASCII letter or digit
    C_HEX = 128        # HEXDIG, either case
    C_B64 = 256        # base64 alphabet without "="
    C_MECH = 512       # SASL mechanism name characters
    C_HIGH = 1024      # >= 0x80
    C_DIGIT = 2048
    C_KEY = 4096       # esmtp-keyword tail: letter, digit, hyphen (ASCII)
    C_AATOM = 8192     # ASCII atext (ORCPT addr-type)

cdef unsigned short CLS[256]


cdef void _init_tables():
    cdef int c, f
    atext = b"!#$%&'*+-/=?^_`{|}~"
    for c in range(256):
        f = 0
        alnum = (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
        if alnum:
            f |= C_ALNUM | C_LETDIG | C_LDH | C_ATEXT | C_B64 | C_MECH | C_KEY | C_AATOM
        if 48 <= c <= 57:
            f |= C_DIGIT | C_HEX
        if (65 <= c <= 70) or (97 <= c <= 102):
            f |= C_HEX
        if c < 128 and c in atext:
            f |= C_ATEXT | C_AATOM
        if c == 45:
            f |= C_LDH | C_MECH | C_KEY
        if c == 95:
            f |= C_MECH
        if c == 43 or c == 47:
            f |= C_B64
        if c == 32 or c == 33 or (35 <= c <= 91) or (93 <= c <= 126):
            f |= C_QTEXT
        if (33 <= c <= 90) or (94 <= c <= 126):
            f |= C_DCONTENT
        if (33 <= c <= 60) or (62 <= c <= 126):
            f |= C_PVALUE
        if c >= 128:
            f |= C_HIGH | C_ATEXT | C_QTEXT | C_LDH | C_LETDIG | C_PVALUE
        CLS[c] = f


_init_tables()


cdef inline bint _has_high(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    while a < b:
        if p[a] >= 0x80:
            return True
        a += 1
    return False


# ---- Command -----------------------------------------------------------------------------

cdef str S_EMPTY = ""

# ---- verbs: engine/protocol/_tables.py holds the table ----------------------------------

cdef tuple VERB_NAMES = _tables.VERBS
cdef NameTable T_VERBS, T_NOTIMPL
names_init(&T_VERBS, VERB_NAMES)
names_init(&T_NOTIMPL, _tables.NOT_IMPLEMENTED)

cdef enum:
    VC_OTHER = 0
    VC_BARE = 1  # no argument allowed
    VC_FREE = 2  # an optional free-text argument

# VERB_CLASS[k]: the class of VERB_NAMES[k].
cdef unsigned char VERB_CLASS[NAMES_MAX]
for _k, _name in enumerate(VERB_NAMES):
    VERB_CLASS[_k] = (VC_BARE if _name in _tables.BARE_VERBS
                      else VC_FREE if _name in _tables.FREE_VERBS else VC_OTHER)


cdef str _verb(str name):
    """The table's own str for ``name``: the parser tells verbs apart by identity."""
    return <str>VERB_NAMES[names_index(&T_VERBS, name)]


cdef str V_HELO = _verb("HELO"), V_EHLO = _verb("EHLO"), V_MAIL = _verb("MAIL")
cdef str V_RCPT = _verb("RCPT"), V_BDAT = _verb("BDAT"), V_VRFY = _verb("VRFY")
cdef str V_EXPN = _verb("EXPN"), V_AUTH = _verb("AUTH")


@cython.final
@cython.freelist(64)
cdef class Command:
    """One parsed SMTP command (or one to format).

    ``astuple()`` order: (verb, arg, local, domain, sorted params items, size, last, initial).
    """

    cdef public str verb
    cdef public str arg
    cdef public str local
    cdef public str domain
    cdef public dict params
    cdef public long long size
    cdef public bint last
    cdef public str initial

    def __init__(self, str verb not None, str arg not None="", str local not None="",
                 str domain not None="", params=None, size=-1, last=False,
                 str initial=None):
        self.verb = verb
        self.arg = arg
        self.local = local
        self.domain = domain
        self.params = {} if params is None else dict(params)
        self.size = PyNumber_Index(size)
        self.last = last
        self.initial = initial

    @property
    def mailbox(self):
        """``local@domain``; the local part alone for <Postmaster>; "" for the null path."""
        if not self.domain:
            return self.local
        return self.local + "@" + self.domain

    def astuple(self):
        return (
            self.verb,
            self.arg,
            self.local,
            self.domain,
            tuple(sorted(self.params.items())),
            self.size,
            self.last,
            self.initial,
        )

    def __eq__(self, other):
        return _astuple_eq(self, other)

    __hash__ = None  # mutable

    def __repr__(self):
        parts = [repr(self.verb)]
        if self.arg:
            parts.append(f"arg={self.arg!r}")
        if self.local or self.domain:
            parts.append(f"local={self.local!r}")
            parts.append(f"domain={self.domain!r}")
        if self.params:
            parts.append(f"params={self.params!r}")
        if self.size != -1:
            parts.append(f"size={self.size!r}")
        if self.last:
            parts.append("last=True")
        if self.initial is not None:
            parts.append(f"initial={self.initial!r}")
        return "Command(" + ", ".join(parts) + ")"


cdef inline Command _new(str verb):
    cdef Command cmd = Command.__new__(Command)
    cmd.verb = verb
    cmd.arg = S_EMPTY
    cmd.local = S_EMPTY
    cmd.domain = S_EMPTY
    cmd.params = {}
    cmd.size = -1
    cmd.last = False
    cmd.initial = None
    return cmd


# ---- grammar helpers: each returns an end offset, or -1 (syntax) / -2 (too long) --------

cdef bint _ipv4_ok(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # IPv4-address-literal = Snum 3("." Snum); Snum = 1*3DIGIT, value 0-255 (§4.1.3).
    cdef int part, digits, value
    for part in range(4):
        digits = 0
        value = 0
        while a < b and (CLS[p[a]] & C_DIGIT) and digits < 4:
            value = value * 10 + (p[a] - 48)
            digits += 1
            a += 1
        if digits == 0 or digits > 3 or value > 255:
            return False
        if part < 3:
            if a >= b or p[a] != 46:
                return False
            a += 1
    return a == b


cdef inline bint _hex_ok(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    if b - a < 1 or b - a > 4:
        return False
    while a < b:
        if not (CLS[p[a]] & C_HEX):
            return False
        a += 1
    return True


cdef int _groups(const unsigned char* p, Py_ssize_t a, Py_ssize_t b, bint allow_v4,
                 bint* v4) noexcept nogil:
    """Count ":"-separated hex groups in [a, b); the last may be IPv4 when allow_v4."""
    cdef int count = 0
    cdef Py_ssize_t s = a, e
    v4[0] = False
    if a == b:
        return 0
    while True:
        e = s
        while e < b and p[e] != 58:
            e += 1
        if e == b:
            if allow_v4 and memchr(p + s, 46, e - s) != NULL:
                if _ipv4_ok(p, s, e):
                    v4[0] = True
                    return count
                return -1
            return count + 1 if _hex_ok(p, s, e) else -1
        if not _hex_ok(p, s, e):
            return -1
        count += 1
        s = e + 1


cdef bint _ipv6_ok(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    # RFC 5321 §4.1.3 IPv6-full / IPv6-comp / IPv6v4-full / IPv6v4-comp.  Unlike RFC 4291,
    # "::" stands for at least two groups: at most 6 (4 with IPv4) groups besides it.
    cdef Py_ssize_t dc = -1, k
    cdef int lg, rg
    cdef bint v4
    k = a
    while k + 1 < b:
        if p[k] == 58 and p[k + 1] == 58:
            dc = k
            break
        k += 1
    if dc < 0:
        rg = _groups(p, a, b, True, &v4)
        if v4:
            return rg == 6
        return rg == 8
    k = dc + 1
    while k + 1 < b:
        if p[k] == 58 and p[k + 1] == 58:
            return False
        k += 1
    lg = _groups(p, a, dc, False, &v4)
    if lg < 0:
        return False
    rg = _groups(p, dc + 2, b, True, &v4)
    if rg < 0:
        return False
    return lg + rg <= (4 if v4 else 6)


cdef bint _literal_ok(const unsigned char* p, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef const unsigned char* colon = <const unsigned char*>memchr(p + a, 58, b - a)
    cdef Py_ssize_t c, k
    if colon == NULL:
        return _ipv4_ok(p, a, b)
    c = colon - p
    if _eqi(p + a, c - a, "ipv6"):
        return _ipv6_ok(p, c + 1, b)
    # General-address-literal = Standardized-tag ":" 1*dcontent (Standardized-tag = Ldh-str).
    if c == a or not (CLS[p[c - 1]] & C_ALNUM):
        return False
    k = a
    while k < c:
        if not (CLS[p[k]] & C_KEY):
            return False
        k += 1
    return c + 1 < b


cdef Py_ssize_t _domain(const unsigned char* p, Py_ssize_t i, Py_ssize_t n,
                        bint literal) noexcept nogil:
    """Domain (or address-literal when ``literal``) starting at ``i``; limits of §4.5.3.1."""
    cdef Py_ssize_t start = i, ls, last, maxlabel = 0
    if literal and i < n and p[i] == 91:  # "["
        i += 1
        while i < n and (CLS[p[i]] & C_DCONTENT):
            i += 1
        if i >= n or p[i] != 93:
            return -1
        if not _literal_ok(p, start + 1, i):
            return -1
        i += 1
        return -2 if i - start > MAX_DOMAIN else i
    if i >= n or not (CLS[p[i]] & C_LETDIG):
        return -1
    while True:
        # Longest Let-dig [Ldh-str] label: the LDH run up to its last letter or digit.
        ls = i
        i += 1
        last = i
        while i < n and (CLS[p[i]] & C_LDH):
            i += 1
            if CLS[p[i - 1]] & C_LETDIG:
                last = i
        i = last
        if i - ls > maxlabel:
            maxlabel = i - ls
        if i + 1 < n and p[i] == 46 and (CLS[p[i + 1]] & C_LETDIG):
            i += 1
            continue
        break
    if i - start > MAX_DOMAIN or maxlabel > MAX_LABEL:
        return -2
    return i


cdef Py_ssize_t _local(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Local-part = Dot-string / Quoted-string starting at ``i``."""
    cdef unsigned char c
    if i < n and p[i] == 34:  # '"'
        i += 1
        while i < n:
            c = p[i]
            if c == 34:
                return i + 1
            if c == 92:  # quoted-pairSMTP = "\" %d32-126
                if i + 1 < n and 32 <= p[i + 1] <= 126:
                    i += 2
                    continue
                return -1
            if not (CLS[c] & C_QTEXT):
                return -1
            i += 1
        return -1
    if i >= n or not (CLS[p[i]] & C_ATEXT):
        return -1
    while True:
        while i < n and (CLS[p[i]] & C_ATEXT):
            i += 1
        if i + 1 < n and p[i] == 46 and (CLS[p[i + 1]] & C_ATEXT):
            i += 1
            continue
        return i


cdef struct Path:
    Py_ssize_t ls, le, ds, de, end


cdef int _path(const unsigned char* p, Py_ssize_t i, Py_ssize_t n, bint rcpt,
               Path* out) noexcept nogil:
    """Reverse-/Forward-path at ``i`` (§4.1.2); 0, or 1 (syntax) / 2 (too long)."""
    cdef Py_ssize_t p0 = i, e, ls, le
    cdef bint route = False
    out.ls = out.le = out.ds = out.de = out.end = 0
    if i >= n or p[i] != 60:  # "<"
        return 1
    i += 1
    if i < n and p[i] == 62:  # "<>": the null reverse-path, never a forward-path
        if rcpt:
            return 1
        out.ls = out.le = out.ds = out.de = i
        out.end = i + 1
        return 0
    if i < n and p[i] == 64:
        # A-d-l source route (§4.1.2, §C): recognised, then ignored.
        route = True
        while True:
            e = _domain(p, i + 1, n, False)
            if e < 0:
                return <int>-e
            i = e
            if i < n and p[i] == 44:  # ","
                i += 1
                if i < n and p[i] == 64:
                    continue
                return 1
            if i < n and p[i] == 58:  # ":"
                i += 1
                break
            return 1
    ls = i
    le = _local(p, i, n)
    if le < 0:
        return 1
    if le - ls > MAX_LOCAL:  # §4.5.3.1.1
        return 2
    i = le
    if (rcpt and not route and i < n and p[i] == 62 and le - ls == 10
            and _eqi(p + ls, 10, "postmaster")):
        out.ls = ls  # <Postmaster> (§4.1.1.3)
        out.le = out.ds = out.de = le
        out.end = i + 1
        return 0
    if i >= n or p[i] != 64:  # "@"
        return 1
    out.ds = i + 1
    e = _domain(p, i + 1, n, True)
    if e < 0:
        return <int>-e
    out.de = i = e
    if i >= n or p[i] != 62:
        return 1
    i += 1
    if i - p0 > MAX_PATH:  # §4.5.3.1.3, counting the angle brackets
        return 2
    out.ls = ls
    out.le = le
    out.end = i
    return 0


cdef bint _mailbox_ok(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """p[:n] is exactly a Mailbox (Local-part "@" domain-or-literal)."""
    cdef Py_ssize_t le = _local(p, 0, n)
    if le < 0 or le > MAX_LOCAL or le >= n or p[le] != 64:
        return False
    return _domain(p, le + 1, n, True) == n


# ---- xtext (RFC 3461 §4) -----------------------------------------------------------------

cdef inline int _hexu(unsigned int c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef int _xtext_bytes(const unsigned char* p, Py_ssize_t a, Py_ssize_t b,
                      unsigned char* out, Py_ssize_t* outlen) noexcept nogil:
    """Decode xtext bytes into ``out``; 0 or an E_X_* kind (same rules as xtext_decode)."""
    cdef Py_ssize_t j = 0
    cdef unsigned char c
    cdef int h1, h2, v
    while a < b:
        c = p[a]
        if c == 43:  # "+"
            if a + 2 >= b:
                return E_X_ESC
            h1 = _hexu(p[a + 1])
            h2 = _hexu(p[a + 2])
            if h1 < 0 or h2 < 0:
                return E_X_ESC
            v = h1 * 16 + h2
            if v >= 0x80:
                return E_X_ESC
            if v < 0x20 or v == 0x7F:
                return E_X_CTL
            out[j] = <unsigned char>v
            j += 1
            a += 3
            continue
        if (0x21 <= c <= 0x7E and c != 0x3D) or c >= 0x80:
            out[j] = c
            j += 1
            a += 1
            continue
        return E_X_CHAR
    outlen[0] = j
    return 0


def xtext_decode(str value not None):
    """Decode xtext: "+" and two upper-case hex digits stand for one octet (RFC 3461 §4).

    Non-ASCII characters pass through (UTF-8 values under SMTPUTF8, RFC 6533 §3).  Raises
    CommandError 501 5.5.4 on a bad or non-ASCII escape, an escaped control character (C0 or
    DEL, so CR/LF/NUL can never come out) or a raw character xtext does not allow.
    """
    # The rules are _xtext_bytes', run over the value's UTF-8 (every non-ASCII character
    # becomes octets >= 0x80, which pass through, and no escape can take one of them).
    cdef bytes raw = value.encode("utf-8", "surrogatepass")
    return _xtext_str(<const unsigned char*>PyBytes_AS_STRING(raw), 0, PyBytes_GET_SIZE(raw),
                      -1, False)


def xtext_encode(str value not None):
    """Encode as xtext: "+", "=", space, C0 and DEL become "+XX"; the rest is kept."""
    cdef Py_ssize_t n = len(value), j = 0
    cdef Py_UCS4 c
    cdef Py_UCS4* buf
    cdef const char* hexd = b"0123456789ABCDEF"
    for c in value:
        if c <= 0x20 or c == 0x2B or c == 0x3D or c == 0x7F:
            break
    else:
        return value
    buf = <Py_UCS4*>PyMem_Malloc((3 * n + 1) * sizeof(Py_UCS4))
    if buf == NULL:
        raise MemoryError()
    try:
        for c in value:
            if c <= 0x20 or c == 0x2B or c == 0x3D or c == 0x7F:
                buf[j] = 43
                buf[j + 1] = hexd[<unsigned int>c >> 4]
                buf[j + 2] = hexd[<unsigned int>c & 15]
                j += 3
            else:
                buf[j] = c
                j += 1
        return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, j)
    finally:
        PyMem_Free(buf)


# ---- parameters: names and values from engine/protocol/_tables.py ----------------------

# A parameter's bit is 1 << its index in MAIL_PARAMS + RCPT_PARAMS.
cdef tuple P_NAMES = tuple(_tables.MAIL_PARAMS) + tuple(_tables.RCPT_PARAMS)
cdef int K_MAIL = (1 << len(_tables.MAIL_PARAMS)) - 1
cdef int K_RCPT = ((1 << len(P_NAMES)) - 1) & ~K_MAIL
cdef tuple BODY_VALUES = _tables.BODY_VALUES
cdef tuple RET_VALUES = _tables.RET_VALUES
cdef tuple NOTIFY_VALUES = _tables.NOTIFY_VALUES
cdef str N_NEVER = _tables.NOTIFY_NEVER
cdef str S_COMMA = ","
cdef NameTable T_PARAMS, T_BODY, T_RET, T_NOTIFY, T_NEVER
names_init(&T_PARAMS, P_NAMES)
names_init(&T_BODY, BODY_VALUES)
names_init(&T_RET, RET_VALUES)
names_init(&T_NOTIFY, NOTIFY_VALUES)
names_init(&T_NEVER, (N_NEVER,))


cdef inline int _key(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """The bit of the parameter named p[:n] (case-insensitive), or 0."""
    cdef int k = names_find(&T_PARAMS, p, n)
    return 0 if k < 0 else 1 << k


cdef int K_SIZE = 1 << names_index(&T_PARAMS, "SIZE")
cdef int K_BODY = 1 << names_index(&T_PARAMS, "BODY")
cdef int K_SMTPUTF8 = 1 << names_index(&T_PARAMS, "SMTPUTF8")
cdef int K_RET = 1 << names_index(&T_PARAMS, "RET")
cdef int K_ENVID = 1 << names_index(&T_PARAMS, "ENVID")
cdef int K_AUTH = 1 << names_index(&T_PARAMS, "AUTH")
cdef int K_NOTIFY = 1 << names_index(&T_PARAMS, "NOTIFY")
cdef int K_ORCPT = 1 << names_index(&T_PARAMS, "ORCPT")
cdef str P_SMTPUTF8 = _key_str(K_SMTPUTF8)


cdef str _key_str(int key):
    cdef int k = 0
    while key > 1:
        key >>= 1
        k += 1
    return <str>P_NAMES[k]


cdef str _decode(const unsigned char* p, Py_ssize_t a, Py_ssize_t b):
    """ASCII or (already validated) UTF-8 bytes to str (surrogates kept: xtext_decode's
    value may hold them, and text from the wire was checked to be strict UTF-8 before)."""
    if _has_high(p, a, b):
        return PyUnicode_DecodeUTF8(<const char*>p + a, b - a, "surrogatepass")
    return PyUnicode_DecodeASCII(<const char*>p + a, b - a, NULL)


cdef str _xtext_str(const unsigned char* p, Py_ssize_t a, Py_ssize_t b, int kind, bint mailbox):
    """xtext [a, b) decoded to str; raises ``kind`` on any xtext fault (or a bad mailbox),
    or with ``kind`` -1 the fault's own kind (E_X_ESC, E_X_CTL, E_X_CHAR)."""
    cdef unsigned char* out = <unsigned char*>PyMem_Malloc(b - a + 1)
    cdef Py_ssize_t m = 0
    cdef int fault
    if out == NULL:
        raise MemoryError()
    try:
        fault = _xtext_bytes(p, a, b, out, &m)
        if fault != 0:
            raise _err(fault if kind < 0 else kind)
        if mailbox and not (m == 2 and out[0] == 60 and out[1] == 62) and not _mailbox_ok(out, m):
            raise _err(kind)
        return _decode(out, 0, m)
    finally:
        PyMem_Free(out)


cdef object _param_value(int key, const unsigned char* p, Py_ssize_t a, Py_ssize_t b):
    """Validate one known parameter value; return it as stored in Command.params."""
    cdef Py_ssize_t k, s, semi
    cdef int seen, bit
    if key == K_SIZE:  # RFC 1870 §3: size-value = 1*20DIGIT
        if b - a > MAX_SIZE_DIGITS:
            raise _err(E_SIZE)
        k = a
        while k < b:
            if not (CLS[p[k]] & C_DIGIT):
                raise _err(E_SIZE)
            k += 1
        return PyUnicode_DecodeASCII(<const char*>p + a, b - a, NULL)
    if key == K_BODY:  # RFC 6152 §2, RFC 3030 §3
        k = names_find(&T_BODY, p + a, b - a)
        if k < 0:
            raise _err(E_BODY)
        return BODY_VALUES[k]
    if key == K_RET:  # RFC 3461 §4.3
        k = names_find(&T_RET, p + a, b - a)
        if k < 0:
            raise _err(E_RET)
        return RET_VALUES[k]
    if key == K_ENVID:  # RFC 3461 §4.4: xtext, at most 100 octets as sent
        if b - a > MAX_ENVID:
            raise _err(E_ENVID)
        return _xtext_str(p, a, b, E_ENVID, False)
    if key == K_AUTH:  # RFC 4954 §5: xtext of a mailbox or "<>"
        return _xtext_str(p, a, b, E_AUTHP, True)
    if key == K_NOTIFY:  # RFC 3461 §4.1: NEVER alone, or a set of SUCCESS/FAILURE/DELAY
        if names_find(&T_NEVER, p + a, b - a) == 0:
            return N_NEVER
        items = []
        seen = 0
        s = a
        while True:
            k = s
            while k < b and p[k] != 44:
                k += 1
            bit = names_find(&T_NOTIFY, p + s, k - s)
            if bit < 0:
                raise _err(E_NOTIFY)
            if seen & (1 << bit):
                raise _err(E_NOTIFY)
            seen |= 1 << bit
            items.append(NOTIFY_VALUES[bit])
            if k == b:
                break
            s = k + 1
        return S_COMMA.join(items)
    # ORCPT, RFC 3461 §4.2: addr-type ";" xtext; addr-type is an atom, kept as sent.
    semi = -1
    k = a
    while k < b:
        if p[k] == 59:
            semi = k
            break
        k += 1
    if semi <= a or semi + 1 >= b:
        raise _err(E_ORCPT)
    k = a
    while k < semi:
        if not (CLS[p[k]] & C_AATOM):
            raise _err(E_ORCPT)
        k += 1
    return (PyUnicode_DecodeASCII(<const char*>p + a, semi + 1 - a, NULL)
            + _xtext_str(p, semi + 1, b, E_ORCPT, False))


# ---- parse -------------------------------------------------------------------------------

cdef enum:
    MAXP = 16  # parameters kept for pass 2; more always hold an unknown or a duplicate


cdef Command _mail_rcpt(str verb, const unsigned char* p, Py_ssize_t i, Py_ssize_t n,
                        bint rcpt, bint utf8):
    cdef Path path
    cdef int r, k, key, seen = 0, count = 0
    cdef Py_ssize_t p0, a, kend, v0, v1
    cdef Py_ssize_t ks[MAXP]
    cdef Py_ssize_t ke[MAXP]
    cdef Py_ssize_t vs[MAXP]
    cdef Py_ssize_t ve[MAXP]
    cdef bint has_utf8 = False
    cdef int syntax = E_RCPT_PATH if rcpt else E_MAIL_PATH
    cdef str local, domain
    cdef dict params
    cdef Command cmd
    if rcpt:
        if n - i < 3 or not _eqi(p + i, 3, "to:"):
            raise _err(E_RCPT_KW)
        i += 3
    else:
        if n - i < 5 or not _eqi(p + i, 5, "from:"):
            raise _err(E_MAIL_KW)
        i += 5
    while i < n and p[i] == 32:  # the common "MAIL FROM: <a@b>"
        i += 1
    p0 = i
    r = _path(p, i, n, rcpt, &path)
    if r:
        raise _err(syntax + r - 1)
    i = path.end
    if i < n and p[i] != 32:
        raise _err(syntax)
    # Parameters, pass 1: syntax only (§4.1.2 Mail-parameters / Rcpt-parameters).
    while True:
        while i < n and p[i] == 32:
            i += 1
        if i >= n:
            break
        a = i
        if not (CLS[p[i]] & C_ALNUM):
            raise _err(E_P_SYNTAX)
        i += 1
        while i < n and (CLS[p[i]] & C_KEY):
            i += 1
        kend = i
        v0 = v1 = -1
        if i < n and p[i] == 61:  # "="
            i += 1
            v0 = i
            while i < n and (CLS[p[i]] & C_PVALUE):
                i += 1
            if i == v0:
                raise _err(E_P_SYNTAX)
            v1 = i
        if i < n and p[i] != 32:
            raise _err(E_P_SYNTAX)
        if kend - a == 8 and _eqi(p + a, 8, "smtputf8"):
            has_utf8 = True
        if count < MAXP:
            ks[count] = a
            ke[count] = kend
            vs[count] = v0
            ve[count] = v1
            count += 1
    # RFC 6531 §3.4: on MAIL the command's own SMTPUTF8 decides; on RCPT, the transaction's.
    if not rcpt:
        utf8 = has_utf8
    if _has_high(p, p0, path.end):
        if not utf8:
            raise _err(E_NONASCII)  # RFC 6531 §3.7.4.1
        try:
            PyUnicode_DecodeUTF8(<const char*>p + p0, path.end - p0, NULL)
        except UnicodeDecodeError:
            raise _err(E_RCPT_UTF8 if rcpt else E_MAIL_UTF8) from None
        local = PyUnicode_DecodeUTF8(<const char*>p + path.ls, path.le - path.ls, NULL)
        domain = PyUnicode_DecodeUTF8(<const char*>p + path.ds, path.de - path.ds, NULL)
    else:
        local = PyUnicode_DecodeASCII(<const char*>p + path.ls, path.le - path.ls, NULL)
        domain = PyUnicode_DecodeASCII(<const char*>p + path.ds, path.de - path.ds, NULL)
    # Parameters, pass 2: known keyword, duplicates, values, left to right.
    params = {}
    for k in range(count):
        key = _key(p + ks[k], ke[k] - ks[k])
        if not (key & (K_RCPT if rcpt else K_MAIL)):
            raise _err(E_P_UNKNOWN)
        if seen & key:
            raise _err(E_P_DUP)
        seen |= key
        v0 = vs[k]
        v1 = ve[k]
        if key == K_SMTPUTF8:
            if v0 >= 0:
                raise _err(E_P_NOVAL)
            PyDict_SetItem(params, P_SMTPUTF8, None)
            continue
        if v0 < 0:
            raise _err(E_P_NEEDVAL)
        if _has_high(p, v0, v1):
            if not utf8:
                raise _err(E_P_CHARS)
            try:
                PyUnicode_DecodeUTF8(<const char*>p + v0, v1 - v0, NULL)
            except UnicodeDecodeError:
                raise _err(E_P_CHARS) from None
        PyDict_SetItem(params, _key_str(key), _param_value(key, p, v0, v1))
    cmd = Command.__new__(Command)
    cmd.verb = verb
    cmd.arg = S_EMPTY
    cmd.local = local
    cmd.domain = domain
    cmd.params = params
    cmd.size = -1
    cmd.last = False
    cmd.initial = None
    return cmd


def parse_command(bytes line not None, bint utf8=False):
    """Parse one command line given WITHOUT its CRLF; raise CommandError with the reply.

    ``utf8``: SMTPUTF8 was declared on this transaction's MAIL (RFC 6531 §3.4).
    """
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line), i, w, k
    cdef const unsigned char* sp
    cdef int vk
    cdef unsigned char vclass
    cdef str verb
    cdef Command cmd
    cdef unsigned char c
    # Bare CR/LF or NUL inside a command line is a smuggling attempt or garbage (§2.3.8).
    if n and (memchr(p, 13, n) != NULL or memchr(p, 10, n) != NULL
              or memchr(p, 0, n) != NULL):
        raise _err(E_CTL)
    while n > 0 and p[n - 1] == 32:
        n -= 1
    sp = <const unsigned char*>memchr(p, 32, n)
    w = n if sp == NULL else sp - p
    i = w
    while i < n and p[i] == 32:
        i += 1
    vk = names_find(&T_VERBS, p, w)
    if vk < 0:
        if names_find(&T_NOTIMPL, p, w) >= 0:
            raise _err(E_NOTIMPL)
        raise _err(E_UNREC)
    verb = <str>VERB_NAMES[vk]
    if verb is V_MAIL:
        return _mail_rcpt(V_MAIL, p, i, n, False, utf8)
    if verb is V_RCPT:
        return _mail_rcpt(V_RCPT, p, i, n, True, utf8)
    cmd = _new(verb)
    vclass = VERB_CLASS[vk]
    if vclass == VC_BARE:
        if i < n:
            raise _err(E_NOARGS)
        return cmd
    if vclass == VC_FREE:
        if i == n:
            if verb is V_VRFY or verb is V_EXPN:
                raise _err(E_NEEDARG)
            return cmd
        if _has_high(p, i, n):
            if not utf8:
                raise _err(E_ARGCHARS)
            try:
                cmd.arg = PyUnicode_DecodeUTF8(<const char*>p + i, n - i, NULL)
            except UnicodeDecodeError:
                raise _err(E_ARGCHARS) from None
        else:
            cmd.arg = PyUnicode_DecodeASCII(<const char*>p + i, n - i, NULL)
        return cmd
    if i == n:  # HELO, EHLO, BDAT, AUTH
        raise _err(E_NEEDARG)
    if verb is V_HELO or verb is V_EHLO:
        k = i
        while k < n:
            c = p[k]
            if c < 33 or c > 126:
                raise _err(E_HELO)
            k += 1
        cmd.arg = PyUnicode_DecodeASCII(<const char*>p + i, n - i, NULL)
        return cmd
    if verb is V_BDAT:  # RFC 3030 §2: bdat-cmd = "BDAT" SP chunk-size [SP end-marker]
        k = i
        cmd.size = 0
        while k < n and (CLS[p[k]] & C_DIGIT):
            cmd.size = cmd.size * 10 + (p[k] - 48)
            k += 1
            if k - i > MAX_BDAT_DIGITS:
                raise _err(E_BDAT)
        if k == i:
            raise _err(E_BDAT)
        if k < n:
            if p[k] != 32:
                raise _err(E_BDAT)
            while k < n and p[k] == 32:
                k += 1
            if n - k != 4 or not _eqi(p + k, 4, "last"):
                raise _err(E_BDAT)
            cmd.last = True
        return cmd
    # AUTH, RFC 4954 §4: AUTH mechanism [initial-response]
    k = i
    while k < n and (CLS[p[k]] & C_MECH):
        k += 1
    if k == i or k - i > MAX_MECHANISM or (k < n and p[k] != 32):
        raise _err(E_AUTH)
    cmd.arg = PyUnicode_DecodeASCII(<const char*>p + i, k - i, NULL).upper()
    if k == n:
        return cmd
    while k < n and p[k] == 32:
        k += 1
    i = k
    if n - i == 1 and p[i] == 61:  # "=": an empty initial response (RFC 4954 §4)
        cmd.initial = "="
        return cmd
    while k < n and (CLS[p[k]] & C_B64):
        k += 1
    if k == i:
        raise _err(E_AUTH)
    w = 0
    while k < n and p[k] == 61 and w < 2:
        k += 1
        w += 1
    if k != n:
        raise _err(E_AUTH)
    cmd.initial = PyUnicode_DecodeASCII(<const char*>p + i, n - i, NULL)
    return cmd


# ---- format (client side) ----------------------------------------------------------------

cdef tuple XTEXT_PARAMS = _tables.XTEXT_PARAMS
cdef tuple BARE_VERBS = _tables.BARE_VERBS
cdef tuple FREE_VERBS = _tables.FREE_VERBS


cdef str _format_params(dict params):
    out = []
    for key, value in params.items():
        if value is None:
            out.append(" " + key)
        elif key in XTEXT_PARAMS:
            out.append(" " + key + "=" + xtext_encode(value))
        elif key == "ORCPT":
            addr_type, semi, addr = value.partition(";")
            out.append(" ORCPT=" + addr_type + semi + xtext_encode(addr))
        else:
            out.append(" " + key + "=" + value)
    return "".join(out)


def format_command(Command cmd not None):
    """The wire form of ``cmd`` with its CRLF (UTF-8), for the client side.

    xtext parameters (ENVID, AUTH, the address of ORCPT) are encoded here.  Raises
    ValueError for an unknown verb or when any field would put CR, LF or NUL on the wire.
    """
    cdef str verb = cmd.verb
    cdef str text
    cdef bytes data
    if verb == "MAIL" or verb == "RCPT":
        path = cmd.mailbox
        head = "MAIL FROM:<" if verb == "MAIL" else "RCPT TO:<"
        text = head + path + ">" + _format_params(cmd.params)
    elif verb in BARE_VERBS:
        text = verb
    elif verb in FREE_VERBS or verb == "HELO" or verb == "EHLO":
        text = verb + " " + cmd.arg if cmd.arg else verb
    elif verb == "BDAT":
        text = "BDAT " + str(cmd.size) + (" LAST" if cmd.last else "")
    elif verb == "AUTH":
        text = "AUTH " + cmd.arg if cmd.initial is None else "AUTH " + cmd.arg + " " + cmd.initial
    else:
        raise ValueError("format_command: unknown verb")
    data = text.encode("utf-8")
    if b"\r" in data or b"\n" in data or b"\0" in data:
        raise ValueError("format_command: CR, LF or NUL in a command field")
    return data + b"\r\n"

"""Pure-Python twin of ``engine._ext.command``: SMTP command lines to Command, and back.

Owns the RFC 5321 §4.1 command grammar as the server reads it: verbs, reverse- and
forward-paths (§4.1.2, with the SMTPUTF8 extensions of RFC 6531 §3.3), the ESMTP parameters
of RFC 1870 (SIZE), 6152/3030 (BODY), 6531 (SMTPUTF8), 3461 (RET, ENVID, NOTIFY, ORCPT) and
4954 (AUTH), BDAT (RFC 3030) and AUTH (RFC 4954) arguments, the error reply each mistake
maps to, xtext (RFC 3461 §4) and the client-side wire form of a command.

It must never do I/O, log, import asyncio, or copy a byte of the command line into an error
text (a reply built from a CommandError can then never carry CR, LF or NUL from the wire).
Every rule here is mirrored step by step, in the same order, by ext/command.pyx: the twin
tests demand identical results and identical errors, so change both or neither.
"""

from __future__ import annotations

import re
from operator import index
from typing import Any, Final

from engine.protocol._tables import (
    BARE_VERBS,
    BODY_VALUES,
    E_ARGCHARS,
    E_AUTH,
    E_AUTHP,
    E_BDAT,
    E_BODY,
    E_CTL,
    E_ENVID,
    E_HELO,
    E_MAIL_KW,
    E_MAIL_PATH,
    E_MAIL_UTF8,
    E_NEEDARG,
    E_NOARGS,
    E_NONASCII,
    E_NOTIFY,
    E_NOTIMPL,
    E_ORCPT,
    E_P_CHARS,
    E_P_DUP,
    E_P_NEEDVAL,
    E_P_NOVAL,
    E_P_SYNTAX,
    E_P_UNKNOWN,
    E_RCPT_KW,
    E_RCPT_PATH,
    E_RCPT_UTF8,
    E_RET,
    E_SIZE,
    E_UNREC,
    E_X_CHAR,
    E_X_CTL,
    E_X_ESC,
    FREE_VERBS,
    MAIL_PARAMS,
    MAX_BDAT_DIGITS,
    MAX_DOMAIN,
    MAX_ENVID,
    MAX_LABEL,
    MAX_LOCAL,
    MAX_MECHANISM,
    MAX_PATH,
    MAX_SIZE_DIGITS,
    NOT_IMPLEMENTED,
    NOTIFY_NEVER,
    NOTIFY_VALUES,
    RCPT_PARAMS,
    RET_VALUES,
    VERBS,
    XTEXT_PARAMS,
)
from engine.protocol._tables import COMMAND_ERRORS as _ERRORS
from engine.protocol._twin import Result as _Result
from engine.protocol.errors import CommandError

__all__ = ["Command", "format_command", "parse_command", "xtext_decode", "xtext_encode"]

def _err(kind: int) -> CommandError:
    text, code, enhanced = _ERRORS[kind]
    return CommandError(text, code, enhanced)


class Command(_Result):
    """One parsed SMTP command (or one to format).

    ``astuple()`` order: (verb, arg, local, domain, sorted params items, size, last, initial).
    """

    __slots__ = ("arg", "domain", "initial", "last", "local", "params", "size", "verb")

    verb: str
    arg: str
    local: str
    domain: str
    params: dict[str, str | None]
    size: int
    last: bool
    initial: str | None

    def __init__(
        self,
        verb: str,
        arg: str = "",
        local: str = "",
        domain: str = "",
        params: dict[str, str | None] | None = None,
        size: int = -1,
        last: bool = False,
        initial: str | None = None,
    ) -> None:
        # Same type rules as the compiled class's typed attributes.
        for value in (verb, arg, local, domain):
            if type(value) is not str:
                raise TypeError("Command text fields must be str")
        if initial is not None and type(initial) is not str:
            raise TypeError("Command.initial must be str or None")
        self.verb = verb
        self.arg = arg
        self.local = local
        self.domain = domain
        self.params = {} if params is None else dict(params)
        self.size = index(size)
        self.last = bool(last)
        self.initial = initial

    @property
    def mailbox(self) -> str:
        """``local@domain``; the local part alone for <Postmaster>; "" for the null path."""
        if not self.domain:
            return self.local
        return self.local + "@" + self.domain

    def astuple(self) -> tuple[Any, ...]:
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

    def __repr__(self) -> str:
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


def _new(verb: str) -> Command:
    cmd = object.__new__(Command)
    cmd.verb = verb
    cmd.arg = ""
    cmd.local = ""
    cmd.domain = ""
    cmd.params = {}
    cmd.size = -1
    cmd.last = False
    cmd.initial = None
    return cmd


# Verbs, by their lower-cased bytes (verbs are case-insensitive, RFC 5321 §2.4).
_VERBS: Final[dict[bytes, str]] = {v.lower().encode(): v for v in VERBS}
# Recognised but not implemented here (RFC 5321 §4.2.4 says 502).
_NOT_IMPLEMENTED: Final = frozenset(v.lower().encode() for v in NOT_IMPLEMENTED)

# RFC 5321 §4.1.2 character classes, widened by RFC 6531 §3.3 to UTF8-non-ascii (any byte
# >= 0x80 here; whether such bytes are allowed and valid UTF-8 is checked after the grammar).
_ATEXT = rb"A-Za-z0-9!#$%&'*+/=?^_`{|}~\x2d\x80-\xff"
_DOT_STRING: Final = re.compile(rb"[%s]+(?:\.[%s]+)*" % (_ATEXT, _ATEXT))
# Quoted-string: qtextSMTP (%d32-33 / %d35-91 / %d93-126) and quoted-pairSMTP (\ %d32-126).
_QUOTED: Final = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"')
# sub-domain = Let-dig [Ldh-str]: letters/digits/hyphens, no hyphen at either end.
_LABEL = rb"[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x2d\x80-\xff]*[A-Za-z0-9\x80-\xff])?"
_DOMAIN: Final = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*")
_LONG_LABEL: Final = re.compile(rb"[^.]{%d}" % (MAX_LABEL + 1))
# address-literal = "[" dcontent "]" with dcontent %d33-90 / %d94-126.
_LITERAL: Final = re.compile(rb"\[[\x21-\x5a\x5e-\x7e]*\]")
_TAG: Final = re.compile(rb"[A-Za-z0-9\x2d]*[A-Za-z0-9]")
_HEX4: Final = re.compile(rb"[0-9A-Fa-f]{1,4}")
# esmtp-param = esmtp-keyword ["=" esmtp-value] (§4.1.2); UTF-8 values per RFC 6531 §3.4.
_PARAM: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9\x2d]*(?:=[\x21-\x3c\x3e-\x7e\x80-\xff]+)?")
_VCHAR_TOKEN: Final = re.compile(rb"[\x21-\x7e]+")
_BDAT: Final = re.compile(rb"([0-9]{1,%d})(?: +([Ll][Aa][Ss][Tt]))?" % MAX_BDAT_DIGITS)
_AUTH: Final = re.compile(
    rb"([A-Za-z0-9_\x2d]{1,%d})(?: +(=|[A-Za-z0-9+/]+={0,2}))?" % MAX_MECHANISM
)
_SIZE: Final = re.compile(rf"[0-9]{{1,{MAX_SIZE_DIGITS}}}")
_ATOM: Final = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x2d]+")
_XTEXT_PLAIN: Final = re.compile("[\x21-\x2a\x2c-\x3c\x3e-\x7e\x80-\U0010ffff]*")
_HEXU: Final = "0123456789ABCDEF"

_MAIL_PARAMS: Final = frozenset(MAIL_PARAMS)
_RCPT_PARAMS: Final = frozenset(RCPT_PARAMS)
_BODY_VALUES: Final = frozenset(BODY_VALUES)
_RET_VALUES: Final = frozenset(RET_VALUES)
_NOTIFY_VALUES: Final = frozenset(NOTIFY_VALUES)


# --- grammar helpers: each returns an end offset, or -1 (syntax) / -2 (too long) ----------


def _ipv4_ok(s: bytes) -> bool:
    # IPv4-address-literal = Snum 3("." Snum); Snum = 1*3DIGIT, value 0-255 (§4.1.3).
    parts = s.split(b".")
    if len(parts) != 4:
        return False
    return all(1 <= len(part) <= 3 and part.isdigit() and int(part) <= 255 for part in parts)


def _hex_ok(s: bytes) -> bool:
    return _HEX4.fullmatch(s) is not None


def _ipv6_ok(s: bytes) -> bool:
    # RFC 5321 §4.1.3 IPv6-full / IPv6-comp / IPv6v4-full / IPv6v4-comp.  Unlike RFC 4291,
    # "::" stands for at least two groups: at most 6 (4 with IPv4) groups besides it.
    dc = s.find(b"::")
    if dc < 0:
        parts = s.split(b":")
        if b"." in parts[-1]:
            return len(parts) == 7 and all(map(_hex_ok, parts[:6])) and _ipv4_ok(parts[-1])
        return len(parts) == 8 and all(map(_hex_ok, parts))
    if s.find(b"::", dc + 1) >= 0:
        return False
    left, right = s[:dc], s[dc + 2 :]
    lparts = left.split(b":") if left else []
    if not all(map(_hex_ok, lparts)):
        return False
    rparts = right.split(b":") if right else []
    limit = 6
    if rparts and b"." in rparts[-1]:
        if not _ipv4_ok(rparts[-1]):
            return False
        rparts.pop()
        limit = 4
    if not all(map(_hex_ok, rparts)):
        return False
    return len(lparts) + len(rparts) <= limit


def _literal_ok(content: bytes) -> bool:
    colon = content.find(b":")
    if colon < 0:
        return _ipv4_ok(content)
    tag = content[:colon]
    if tag.lower() == b"ipv6":
        return _ipv6_ok(content[colon + 1 :])
    # General-address-literal = Standardized-tag ":" 1*dcontent (Standardized-tag = Ldh-str).
    return _TAG.fullmatch(tag) is not None and colon + 1 < len(content)


def _domain(b: bytes, i: int, n: int, literal: bool) -> int:
    """Domain (or address-literal when ``literal``) starting at ``i``; limits of §4.5.3.1."""
    if literal and i < n and b[i] == 0x5B:  # "["
        m = _LITERAL.match(b, i, n)
        if m is None:
            return -1
        e = m.end()
        if not _literal_ok(b[i + 1 : e - 1]):
            return -1
        return -2 if e - i > MAX_DOMAIN else e
    m = _DOMAIN.match(b, i, n)
    if m is None:
        return -1
    e = m.end()
    if e - i > MAX_DOMAIN or _LONG_LABEL.search(b, i, e) is not None:
        return -2
    return e


def _local(b: bytes, i: int, n: int) -> int:
    """Local-part = Dot-string / Quoted-string starting at ``i``."""
    m = (_QUOTED if i < n and b[i] == 0x22 else _DOT_STRING).match(b, i, n)
    return -1 if m is None else m.end()


def _path(b: bytes, i: int, n: int, rcpt: bool) -> tuple[int, int, int, int, int]:
    """Reverse-/Forward-path at ``i`` (§4.1.2): (ls, le, ds, de, end after ">")."""
    syntax = E_RCPT_PATH if rcpt else E_MAIL_PATH
    p0 = i
    if i >= n or b[i] != 0x3C:  # "<"
        raise _err(syntax)
    i += 1
    if i < n and b[i] == 0x3E:  # "<>": the null reverse-path, never a forward-path
        if rcpt:
            raise _err(syntax)
        return (i, i, i, i, i + 1)
    route = False
    if i < n and b[i] == 0x40:
        # A-d-l source route (§4.1.2, §C): recognised, then ignored.
        route = True
        while True:
            e = _domain(b, i + 1, n, False)
            if e < 0:
                raise _err(syntax - e - 1)
            i = e
            if i < n and b[i] == 0x2C:  # ","
                i += 1
                if i < n and b[i] == 0x40:
                    continue
                raise _err(syntax)
            if i < n and b[i] == 0x3A:  # ":"
                i += 1
                break
            raise _err(syntax)
    ls = i
    le = _local(b, i, n)
    if le < 0:
        raise _err(syntax)
    if le - ls > MAX_LOCAL:  # §4.5.3.1.1
        raise _err(syntax + 1)
    i = le
    if (
        rcpt
        and not route
        and i < n
        and b[i] == 0x3E
        and le - ls == 10
        and b[ls:le].lower() == b"postmaster"
    ):
        return (ls, le, le, le, i + 1)  # <Postmaster> (§4.1.1.3)
    if i >= n or b[i] != 0x40:  # "@"
        raise _err(syntax)
    ds = i + 1
    de = _domain(b, ds, n, True)
    if de < 0:
        raise _err(syntax - de - 1)
    i = de
    if i >= n or b[i] != 0x3E:
        raise _err(syntax)
    i += 1
    if i - p0 > MAX_PATH:  # §4.5.3.1.3, counting the angle brackets
        raise _err(syntax + 1)
    return (ls, le, ds, de, i)


def _mailbox_ok(b: bytes) -> bool:
    """``b`` is exactly a Mailbox (Local-part "@" domain-or-literal)."""
    n = len(b)
    le = _local(b, 0, n)
    if le < 0 or le > MAX_LOCAL or le >= n or b[le] != 0x40:
        return False
    return _domain(b, le + 1, n, True) == n


# --- xtext (RFC 3461 §4) -----------------------------------------------------------------


def xtext_decode(value: str) -> str:
    """Decode xtext: "+" and two upper-case hex digits stand for one octet (RFC 3461 §4).

    Non-ASCII characters pass through (UTF-8 values under SMTPUTF8, RFC 6533 §3).  Raises
    CommandError 501 5.5.4 on a bad or non-ASCII escape, an escaped control character (C0 or
    DEL, so CR/LF/NUL can never come out) or a raw character xtext does not allow.
    """
    if "+" not in value:
        if _XTEXT_PLAIN.fullmatch(value) is None:
            raise _err(E_X_CHAR)
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == "+":
            if i + 2 >= n:
                raise _err(E_X_ESC)
            h1 = _HEXU.find(value[i + 1])
            h2 = _HEXU.find(value[i + 2])
            if h1 < 0 or h2 < 0:
                raise _err(E_X_ESC)
            v = h1 * 16 + h2
            if v >= 0x80:
                raise _err(E_X_ESC)
            if v < 0x20 or v == 0x7F:
                raise _err(E_X_CTL)
            out.append(chr(v))
            i += 3
            continue
        o = ord(c)
        if (0x21 <= o <= 0x7E and o != 0x3D) or o >= 0x80:
            out.append(c)
            i += 1
            continue
        raise _err(E_X_CHAR)
    return "".join(out)


def xtext_encode(value: str) -> str:
    """Encode as xtext: "+", "=", space, C0 and DEL become "+XX"; the rest is kept."""
    out: list[str] = []
    for c in value:
        o = ord(c)
        if o <= 0x20 or o == 0x2B or o == 0x3D or o == 0x7F:
            out.append(f"+{o:02X}")
        else:
            out.append(c)
    return "".join(out)


# --- parameters ----------------------------------------------------------------------------


def _param_value(key: str, value: str, raw: bytes, utf8: bool) -> str:
    """Validate one known parameter value; return it as stored in Command.params."""
    if key == "SIZE":  # RFC 1870 §3: size-value = 1*20DIGIT
        if _SIZE.fullmatch(value) is None:
            raise _err(E_SIZE)
        return value
    if key == "BODY":  # RFC 6152 §2, RFC 3030 §3
        up = value.upper()
        if not value.isascii() or up not in _BODY_VALUES:
            raise _err(E_BODY)
        return up
    if key == "RET":  # RFC 3461 §4.3
        up = value.upper()
        if not value.isascii() or up not in _RET_VALUES:
            raise _err(E_RET)
        return up
    if key == "ENVID":  # RFC 3461 §4.4: xtext, at most 100 octets as sent
        if len(raw) > MAX_ENVID:
            raise _err(E_ENVID)
        try:
            return xtext_decode(value)
        except CommandError:
            raise _err(E_ENVID) from None
    if key == "AUTH":  # RFC 4954 §5: xtext of a mailbox or "<>"
        try:
            decoded = xtext_decode(value)
        except CommandError:
            raise _err(E_AUTHP) from None
        if decoded != "<>" and not _mailbox_ok(decoded.encode("utf-8")):
            raise _err(E_AUTHP)
        return decoded
    if key == "NOTIFY":  # RFC 3461 §4.1: NEVER alone, or a set of SUCCESS/FAILURE/DELAY
        if not value.isascii():
            raise _err(E_NOTIFY)
        items = value.upper().split(",")
        if items != [NOTIFY_NEVER] and (
            not all(item in _NOTIFY_VALUES for item in items) or len(set(items)) != len(items)
        ):
            raise _err(E_NOTIFY)
        return ",".join(items)
    # ORCPT, RFC 3461 §4.2: addr-type ";" xtext; addr-type is an atom, kept as sent.
    semi = value.find(";")
    if semi <= 0 or semi + 1 >= len(value) or _ATOM.fullmatch(value, 0, semi) is None:
        raise _err(E_ORCPT)
    try:
        return value[: semi + 1] + xtext_decode(value[semi + 1 :])
    except CommandError:
        raise _err(E_ORCPT) from None


# --- parse -------------------------------------------------------------------------------


def _mail_rcpt(verb: str, rest: bytes, rcpt: bool, utf8: bool) -> Command:
    n = len(rest)
    if rcpt:
        if rest[:3].lower() != b"to:":
            raise _err(E_RCPT_KW)
        i = 3
    else:
        if rest[:5].lower() != b"from:":
            raise _err(E_MAIL_KW)
        i = 5
    while i < n and rest[i] == 0x20:  # the common "MAIL FROM: <a@b>"
        i += 1
    p0 = i
    ls, le, ds, de, pend = _path(rest, i, n, rcpt)
    i = pend
    if i < n and rest[i] != 0x20:
        raise _err(E_RCPT_PATH if rcpt else E_MAIL_PATH)
    # Parameters, pass 1: syntax only (§4.1.2 Mail-parameters / Rcpt-parameters).
    tokens: list[tuple[bytes, bytes | None]] = []
    has_utf8 = False
    while True:
        while i < n and rest[i] == 0x20:
            i += 1
        if i >= n:
            break
        m = _PARAM.match(rest, i, n)
        if m is None:
            raise _err(E_P_SYNTAX)
        e = m.end()
        if e < n and rest[e] != 0x20:
            raise _err(E_P_SYNTAX)
        eq = rest.find(b"=", i, e)
        if eq < 0:
            word, raw = rest[i:e], None
        else:
            word, raw = rest[i:eq], rest[eq + 1 : e]
        if word.lower() == b"smtputf8":
            has_utf8 = True
        tokens.append((word, raw))
        i = e
    # RFC 6531 §3.4: on MAIL the command's own SMTPUTF8 decides; on RCPT, the transaction's.
    if not rcpt:
        utf8 = has_utf8
    span = rest[p0:pend]
    if not span.isascii():
        if not utf8:
            raise _err(E_NONASCII)  # RFC 6531 §3.7.4.1
        try:
            span.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(E_RCPT_UTF8 if rcpt else E_MAIL_UTF8) from None
        local = rest[ls:le].decode("utf-8")
        domain = rest[ds:de].decode("utf-8")
    else:
        local = rest[ls:le].decode("ascii")
        domain = rest[ds:de].decode("ascii")
    # Parameters, pass 2: known keyword, duplicates, values, left to right.
    params: dict[str, str | None] = {}
    known = _RCPT_PARAMS if rcpt else _MAIL_PARAMS
    for kb, raw in tokens:
        key = kb.upper().decode("ascii")
        if key not in known:
            raise _err(E_P_UNKNOWN)
        if key in params:
            raise _err(E_P_DUP)
        if key == "SMTPUTF8":
            if raw is not None:
                raise _err(E_P_NOVAL)
            params[key] = None
            continue
        if raw is None:
            raise _err(E_P_NEEDVAL)
        if raw.isascii():
            value = raw.decode("ascii")
        else:
            if not utf8:
                raise _err(E_P_CHARS)
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _err(E_P_CHARS) from None
        params[key] = _param_value(key, value, raw, utf8)
    cmd = _new(verb)
    cmd.local = local
    cmd.domain = domain
    cmd.params = params
    return cmd


def parse_command(line: bytes, utf8: bool = False) -> Command:
    """Parse one command line given WITHOUT its CRLF; raise CommandError with the reply.

    ``utf8``: SMTPUTF8 was declared on this transaction's MAIL (RFC 6531 §3.4).
    """
    if type(line) is not bytes:
        raise TypeError("parse_command() needs bytes")
    # Bare CR/LF or NUL inside a command line is a smuggling attempt or garbage (§2.3.8).
    if b"\r" in line or b"\n" in line or b"\0" in line:
        raise _err(E_CTL)
    line = line.rstrip(b" ")
    sp = line.find(b" ")
    if sp < 0:
        word, rest = line, b""
    else:
        word, rest = line[:sp], line[sp + 1 :].lstrip(b" ")
    low = word.lower()
    verb = _VERBS.get(low)
    if verb is None:
        if low in _NOT_IMPLEMENTED:
            raise _err(E_NOTIMPL)
        raise _err(E_UNREC)
    if verb == "MAIL" or verb == "RCPT":
        return _mail_rcpt(verb, rest, verb == "RCPT", bool(utf8))
    cmd = _new(verb)
    if verb in _BARE:
        if rest:
            raise _err(E_NOARGS)
        return cmd
    if verb in _FREE:
        if not rest:
            if verb == "VRFY" or verb == "EXPN":
                raise _err(E_NEEDARG)
            return cmd
        if rest.isascii():
            cmd.arg = rest.decode("ascii")
        else:
            if not utf8:
                raise _err(E_ARGCHARS)
            try:
                cmd.arg = rest.decode("utf-8")
            except UnicodeDecodeError:
                raise _err(E_ARGCHARS) from None
        return cmd
    if not rest:  # HELO, EHLO, BDAT, AUTH
        raise _err(E_NEEDARG)
    if verb == "HELO" or verb == "EHLO":
        if _VCHAR_TOKEN.fullmatch(rest) is None:
            raise _err(E_HELO)
        cmd.arg = rest.decode("ascii")
        return cmd
    if verb == "BDAT":  # RFC 3030 §2: bdat-cmd = "BDAT" SP chunk-size [SP end-marker]
        m = _BDAT.fullmatch(rest)
        if m is None:
            raise _err(E_BDAT)
        cmd.size = int(m.group(1))
        cmd.last = m.group(2) is not None
        return cmd
    # AUTH, RFC 4954 §4: AUTH mechanism [initial-response]
    m = _AUTH.fullmatch(rest)
    if m is None:
        raise _err(E_AUTH)
    cmd.arg = m.group(1).decode("ascii").upper()
    initial = m.group(2)
    if initial is not None:
        cmd.initial = initial.decode("ascii")
    return cmd


# --- format (client side) ------------------------------------------------------------------

_XTEXT_PARAMS: Final = frozenset(XTEXT_PARAMS)
_BARE: Final = frozenset(BARE_VERBS)
_FREE: Final = frozenset(FREE_VERBS)


def _format_params(params: dict[str, str | None]) -> str:
    out = []
    for key, value in params.items():
        if value is None:
            out.append(" " + key)
        elif key in _XTEXT_PARAMS:
            out.append(" " + key + "=" + xtext_encode(value))
        elif key == "ORCPT":
            addr_type, semi, addr = value.partition(";")
            out.append(" ORCPT=" + addr_type + semi + xtext_encode(addr))
        else:
            out.append(" " + key + "=" + value)
    return "".join(out)


def format_command(cmd: Command) -> bytes:
    """The wire form of ``cmd`` with its CRLF (UTF-8), for the client side.

    xtext parameters (ENVID, AUTH, the address of ORCPT) are encoded here.  Raises
    ValueError for an unknown verb or when any field would put CR, LF or NUL on the wire.
    """
    verb = cmd.verb
    if verb == "MAIL" or verb == "RCPT":
        path = cmd.mailbox
        head = "MAIL FROM:<" if verb == "MAIL" else "RCPT TO:<"
        text = head + path + ">" + _format_params(cmd.params)
    elif verb in _BARE:
        text = verb
    elif verb in _FREE or verb == "HELO" or verb == "EHLO":
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

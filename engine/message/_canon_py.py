"""The pure-Python twin of engine._ext.canon: DKIM's relaxed canonicalisation (RFC 6376
§3.4.2 header fields, §3.4.4 a whole body), a verifier's header data (§3.7) with ``bytes``
methods, and a DKIM-Signature field's tags parsed and checked (§3.2, §3.5, §6.1.1), the
same values as the compiled module for every input.  It never raises for any bytes (only
for a field tuple whose colon offset lies outside it) and never does I/O."""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal

__all__ = ["field_items", "header_data", "relaxed_body", "relaxed_fields", "select",
           "signature_tags", "squeeze", "tag_list", "trailing_crlfs", "without_b"]

#: A header field as engine.message.dkim makes them: (name lower-case, raw, colon), ``raw``
#: the field as in the message without its CRLF, ``colon`` the offset of its value.
Field = tuple[bytes, bytes, int]


def squeeze(data: bytes) -> bytes:
    """Every run of spaces and tabs made one space (§3.4.2, §3.4.4).  bytes.replace in a
    loop rather than a regular expression: each pass halves the runs at memory speed,
    where ``re.sub(rb"[ \\t]+")`` stops at every space (five to ten times slower on text)."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def trailing_crlfs(data: bytes) -> int:
    """How many CRLF pairs end ``data``."""
    stripped = data.rstrip(b"\r\n")
    tail = len(data) - len(stripped)
    if data[len(stripped):] == b"\r\n" * (tail // 2) and tail % 2 == 0:
        return tail // 2
    # A bare CR or LF among the trailing line ends (not in Ferry's canonical mail): count
    # the pairs one by one from the end.
    count, end = 0, len(data)
    while end >= 2 and data[end - 2 : end] == b"\r\n":
        count, end = count + 1, end - 2
    return count


def relaxed_body(data: bytes | memoryview) -> bytes:
    """The relaxed canonical form of the whole body ``data`` (RFC 6376 §3.4.4)."""
    data = bytes(data)
    cut = data.rfind(b"\n") + 1
    # Whole lines: runs squeezed first, so whitespace at a line's end is one space at most;
    # the last line without CRLF loses its trailing whitespace too.
    out = squeeze(data[:cut]).replace(b" \r\n", b"\r\n") + squeeze(data[cut:]).rstrip(b" ")
    end = len(out) - 2 * trailing_crlfs(out)
    return out[:end] + b"\r\n" if end else b""


def relaxed_fields(fields: Iterable[Any]) -> bytes:
    """The relaxed forms of ``fields`` (RFC 6376 §3.4.2), joined: each item a (name, raw,
    colon) tuple, ``raw`` the field as in the message without its CRLF and ``colon`` the
    offset of its value (after the ":"); None items are skipped (h= names a field the
    message does not have: the null string, §5.4.2)."""
    out: list[bytes] = []
    for item in fields:
        if item is None:
            continue
        raw, colon = item[1], item[2]
        if not 1 <= colon <= len(raw):
            raise ValueError("colon is not within the field")
        value = raw[colon:]
        if b"\r\n" in value:
            value = value.replace(b"\r\n", b"")
        out.append(b"%s:%s\r\n" % (raw[: colon - 1].strip(b" \t").lower(),
                                   squeeze(value).strip(b" \t")))
    return b"".join(out)


def select(fields: Iterable[Field], names: Iterable[bytes]) -> list[Any]:
    """§5.4.2: for each name of h=, the last field of that name not yet used, from the
    bottom up; None (the null string) once none is left."""
    by_name: dict[bytes, list[Field]] = {}
    for f in fields:
        by_name.setdefault(f[0], []).append(f)
    chosen: list[Field | None] = []
    for name in names:
        stack = by_name.get(name)
        chosen.append(stack.pop() if stack else None)
    return chosen


def without_b(field: Field) -> Field:
    """The signature field with the first b= tag's value removed before hashing (§3.7):
    its name, the blanks around it and the "=" kept, its value up to the next ";" gone;
    the field itself when it has no b= tag.  The tags are split at ";" rather than found
    with a regular expression substitution, which tried a match at every octet (3.0 against
    3.5-6.5 µs on a folded 560-octet field; tests/unit/test_dkim.py holds both to the
    same bytes)."""
    name, raw, colon = field
    parts = raw[colon:].split(b";")
    for i, part in enumerate(parts):
        tag = part.lstrip(b" \t\r\n")
        if tag[:1] == b"b" and tag[1:].lstrip(b" \t\r\n")[:1] == b"=":
            parts[i] = part[: part.index(b"=") + 1]
            return (name, raw[:colon] + b";".join(parts), colon)
    return field


def header_data(fields: Sequence[Field], names: Iterable[bytes], signature: Field,
                relaxed: bool) -> bytes:
    """The header data a verifier hashes (RFC 6376 §3.7), without its final CRLF: the
    fields h= (``names``) selects (:func:`select`), then ``signature`` with its b= value
    removed (:func:`without_b`), canonicalised relaxed (§3.4.2) or simple (§3.4.1)."""
    chosen = [f for f in select(fields, names) if f is not None]
    chosen.append(without_b(signature))
    if relaxed:
        return relaxed_fields(chosen)[:-2]
    return b"".join(f[1] + b"\r\n" for f in chosen)[:-2]


def field_items(data: bytes, spans: Iterable[tuple[int, int, int, int]]) -> list[Field]:
    """The (name lower-case, raw, colon) item of each header field of ``data`` from its
    (name start, name end, value start, value end) span (engine.message.headers'
    ``HeaderScan.fields``): what :func:`relaxed_fields` and :func:`header_data` take."""
    n = len(data)
    out: list[Field] = []
    for ns, ne, vs, ve in spans:
        if not 0 <= ns <= ne <= vs <= ve <= n:
            raise ValueError("a span is not within the data")
        out.append((data[ns:ne].lower(), data[ns:ve], vs - ns))
    return out


# --- a DKIM-Signature field's tags (RFC 6376 §3.2, §3.5, §6.1.1) -------------------------

Canon = Literal["simple", "relaxed"]
Result = Literal["pass", "fail", "neutral", "temperror", "permerror", "policy"]

#: A signature's tags parsed and checked (:func:`signature_tags`): a plain tuple, which
#: the compiled module makes at a fraction of an object's cost.
#: (a= lower-case, header canonicalisation, body canonicalisation, the h= names lower-case,
#: l= or None, bh= decoded, b= decoded, d= lower-case without its final dots, s=
#: lower-case, i= or else "@" + d=, the first 8 characters of b= without FWS (RFC 6008),
#: the key's DNS name, whether i= is given and its domain is not exactly d= (§3.6.1 t=s)).
Signature = tuple[str, Canon, Canon, tuple[bytes, ...], "int | None", bytes, bytes, str, str,
                  str, str, str, bool]
#: Why a signature cannot be used: (result, reason), RFC 8601 §2.7.1's result.
Problem = tuple[Result, str]

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
#: The tags of signatures and key records (§3.5, §3.6.1): valid names, no pattern match.
_KNOWN_TAGS: Final = frozenset(("v", "a", "b", "bh", "c", "d", "h", "i", "l", "q", "s", "t",
                                "x", "z", "k", "p", "n", "g"))


def no_fws(value: str) -> str:
    r"""``value`` without spaces, tabs, CRs and LFs: FWS inside values is allowed and is
    not part of the value's meaning for the base64 tags.  str.replace rather than a
    regular expression: 0.7 µs against 4 µs on a folded 344-character b=."""
    for blank in (" ", "\t", "\r", "\n"):
        if blank in value:
            value = value.replace(blank, "")
    return value


def tag_list(text: str) -> dict[str, str] | str:
    """The tags of a tag list, ``name=value; ...``, values with surrounding whitespace
    removed (inner whitespace kept: each tag's reader decides); or why it is not one: a
    tag without "=", an invalid name or a tag given twice (§3.2: "MUST NOT" repeat)."""
    tags: dict[str, str] = {}
    parts = text.split(";")
    if parts and not parts[-1].strip(" \t\r\n"):
        parts.pop()  # a trailing ";" is allowed
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip(" \t\r\n")
        if not eq:
            return f"tag {name or part.strip()!r} has no '='"
        if name not in _KNOWN_TAGS and not _TAG_NAME.fullmatch(name):
            return f"bad tag name {name!r}"
        if name in tags:
            return f"tag {name!r} appears twice"
        tags[name] = value.strip(" \t\r\n")
    return tags


def base64_value(value: str) -> bytes | None:
    """A base64 tag's value decoded, FWS inside it ignored; None when it is not base64
    (what base64.b64decode(validate=True) does, without its two Python-level calls)."""
    try:
        return binascii.a2b_base64(no_fws(value).encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        return None


class _Problem(Exception):
    def __init__(self, result: Result, reason: str) -> None:
        super().__init__(reason)
        self.problem: Problem = (result, reason)


def _number(tags: dict[str, str], name: str, digits: int = 12) -> int | None:
    value = tags.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > digits:
        raise _Problem("permerror", f"bad {name}= value")
    return int(value)


@functools.lru_cache(maxsize=64)
def _canons(value: str) -> tuple[Canon, Canon]:
    header, _, body = value.lower().partition("/")
    body = body or "simple"  # §3.5: "relaxed" alone is relaxed/simple
    if header not in ("simple", "relaxed") or body not in ("simple", "relaxed"):
        raise _Problem("permerror", f"unknown canonicalization {value!r}")
    return header, body  # type: ignore[return-value]


@functools.lru_cache(maxsize=1024)
def _h_names(value: str) -> tuple[bytes, ...]:
    """The field names of an h= value, lower-case (cached: a sender signs the same list).
    Octets that are not UTF-8 come back as they were (surrogate escapes): a strict encode
    raised, and the whole message's DKIM check with it."""
    return tuple(n.strip(" \t\r\n").lower().encode("utf-8", "surrogateescape")
                 for n in value.split(":"))


def signature_tags(raw: bytes, colon: int, now: float) -> Signature | Problem:
    """§6.1.1: the tags of the DKIM-Signature field ``raw`` (as in the message, without its
    CRLF; its value at ``colon``) parsed and checked at time ``now``: a
    :data:`Signature`, or the :data:`Problem` that makes it unusable."""
    try:
        return _signature_tags(raw[colon:].decode("utf-8", "surrogateescape"), now)
    except _Problem as p:
        return p.problem


def _signature_tags(text: str, now: float) -> Signature:
    tags = tag_list(text)
    if isinstance(tags, str):
        raise _Problem("permerror", f"bad signature syntax: {tags}")
    missing = [t for t in ("v", "a", "b", "bh", "d", "h", "s") if t not in tags]
    if missing:
        raise _Problem("permerror", f"signature missing required tag {missing[0]}=")
    if tags["v"] != "1":
        raise _Problem("permerror", f"unknown signature version v={tags['v']}")
    algorithm = tags["a"].lower()
    if algorithm == "rsa-sha1":
        raise _Problem("policy", "rsa-sha1 is not accepted (RFC 8301 §3.1)")
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        raise _Problem("neutral", f"unknown algorithm {tags['a']}")
    header_canon, body_canon = _canons(tags.get("c", "simple/simple"))
    domain = tags["d"].lower().rstrip(".")
    names = _h_names(tags["h"])
    if b"from" not in names:
        raise _Problem("permerror", "From is not signed (RFC 6376 §5.4)")
    identity = tags.get("i")
    if identity is not None:
        i_domain = identity.rpartition("@")[2].lower().rstrip(".")
        if i_domain != domain and not i_domain.endswith("." + domain):
            raise _Problem("permerror", "i= is not in the d= domain")
    if "q" in tags and "dns/txt" not in [q.strip().lower() for q in tags["q"].split(":")]:
        raise _Problem("permerror", f"unknown query method q={tags['q']}")
    limit = _number(tags, "l", 76)
    signed_at = _number(tags, "t")
    expires = _number(tags, "x")
    if expires is not None:
        if signed_at is not None and expires < signed_at:
            raise _Problem("permerror", "x= is before t=")
        if now > expires:
            raise _Problem("policy", "signature expired")
    bh = base64_value(tags["bh"])
    if bh is None:
        raise _Problem("permerror", "bh= is not base64")
    b = base64_value(tags["b"])
    if b is None:
        raise _Problem("permerror", "b= is not base64")
    # §3.6.1 t=s (checked once the key is known): i='s domain must be d= itself.
    subdomain = identity is not None and i_domain != tags["d"].lower()
    return (algorithm, header_canon, body_canon, names, limit, bh, b, domain,
            tags["s"].lower(), tags.get("i", f"@{domain}" if domain else ""),
            no_fws(tags["b"])[:8], f"{tags['s'].strip().lower()}._domainkey.{domain}",
            subdomain)

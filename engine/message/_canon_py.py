"""The pure-Python twin of engine._ext.canon: DKIM's relaxed canonicalisation (RFC 6376
§3.4.2 header fields, §3.4.4 a whole body) and a verifier's header data (§3.7) with
``bytes`` methods, the same bytes as the compiled module for every input.  It never raises
for any bytes (only for a field tuple whose colon offset lies outside it) and never does
I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["field_items", "header_data", "relaxed_body", "relaxed_fields", "select", "squeeze",
           "trailing_crlfs", "without_b"]

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

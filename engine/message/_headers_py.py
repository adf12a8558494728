"""Pure-Python twin of ``ext/headers.pyx``: one pass over a message's header section.

Owns finding where the header section ends and where each field's name and value lie
(RFC 5322 §2.2 fields, §2.2.3 folding, §3.6 the fields worth remembering), as offsets into
the caller's bytes.  It never copies or decodes a value, never raises for any bytes, never
rewrites the message and never does I/O; callers slice what they need.

Keep it behaving exactly like the compiled module: same names, same results for every
input (the twin tests run random bytes through both).
"""

from __future__ import annotations

import re
from typing import Any

from engine.protocol._tables import HEADER_FIELDS
from engine.protocol._twin import Result as _Result

__all__ = ["HeaderScan", "scan_headers"]

# A field name is 1*ftext, ftext = %d33-57 / %d59-126 (RFC 5322 §3.6.8).
_BAD_NAME_OCTET = re.compile(rb"[^\x21-\x39\x3b-\x7e]").search

# Which remembered attribute a (lower-cased) field name feeds (RFC 5322 §3.6.1-§3.6.7,
# RFC 6376 §3.5 for DKIM-Signature): 1 + its index in HEADER_FIELDS, 0 for any other.
_KINDS = {name: kind for kind, name in enumerate(HEADER_FIELDS, 1)}
_LONGEST = max(map(len, HEADER_FIELDS))
_RECEIVED = _KINDS[b"received"]
_MESSAGE_ID = _KINDS[b"message-id"]
_FROM = _KINDS[b"from"]
_TO = _KINDS[b"to"]
_SUBJECT = _KINDS[b"subject"]
_DATE = _KINDS[b"date"]
_DKIM = _KINDS[b"dkim-signature"]

Span = tuple[int, int]
FieldSpan = tuple[int, int, int, int]


class HeaderScan(_Result):
    """Where the header section ends and where its fields lie (offsets into the data).

    ``astuple()`` order: (end, fields as a tuple, received, message_id, from_, to,
    subject, date, dkim_signature, malformed).  ``bare_line_ends`` (not in it): the
    section read, ``data[:end]``, holds a CR or an LF that is not part of a CRLF.
    """

    __slots__ = (
        "bare_line_ends",
        "date",
        "dkim_signature",
        "end",
        "fields",
        "from_",
        "malformed",
        "message_id",
        "received",
        "subject",
        "to",
    )

    def __init__(self) -> None:
        self.end: int = 0
        self.fields: list[FieldSpan] = []
        self.received: int = 0
        self.message_id: Span | None = None
        self.from_: Span | None = None
        self.to: Span | None = None
        self.subject: Span | None = None
        self.date: Span | None = None
        self.dkim_signature: bool = False
        self.malformed: bool = False
        self.bare_line_ends: bool = False

    def astuple(self) -> tuple[Any, ...]:
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

    def __repr__(self) -> str:
        return (
            f"HeaderScan(end={self.end}, fields={len(self.fields)}, received={self.received}, "
            f"message_id={self.message_id}, from_={self.from_}, to={self.to}, "
            f"subject={self.subject}, date={self.date}, "
            f"dkim_signature={self.dkim_signature}, malformed={self.malformed})"
        )


def _finish(scan: HeaderScan, kind: int, ns: int, ne: int, vs: int, ve: int) -> None:
    """Record a finished field; the tracked kinds keep only their first value span."""
    scan.fields.append((ns, ne, vs, ve))
    if not kind:
        return
    span = (vs, ve)
    if kind == _RECEIVED:
        scan.received += 1
    elif kind == _MESSAGE_ID:
        if scan.message_id is None:
            scan.message_id = span
    elif kind == _FROM:
        if scan.from_ is None:
            scan.from_ = span
    elif kind == _TO:
        if scan.to is None:
            scan.to = span
    elif kind == _SUBJECT:
        if scan.subject is None:
            scan.subject = span
    elif kind == _DATE:
        if scan.date is None:
            scan.date = span
    else:
        scan.dkim_signature = True


def scan_headers(data: bytes, limit: int = 0) -> HeaderScan:
    """Scan the header section at the start of ``data``; never raises for any bytes.

    ``limit`` > 0 scans as if ``data`` were ``data[:limit]`` (a section that does not end
    within it is then ``malformed``, with ``end`` where the scan stopped).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    n = len(data)
    if limit > 0 and limit < n:
        n = limit
    scan = HeaderScan()
    find = data.find
    # The field being read: its spans stay open until a line that is not a continuation.
    open_field = False
    name_start = name_end = value_start = value_end = 0
    kind = 0
    pos = 0
    while pos < n:
        # A header line ends at LF; a CR right before it belongs to the line ending.  CRLF
        # is the rule (RFC 5322 §2.2) but a bare LF also ends a line so the scan is total.
        lf = find(b"\n", pos, n)
        if lf < 0:
            content_end = nxt = n
        else:
            nxt = lf + 1
            content_end = lf - 1 if lf > pos and data[lf - 1] == 13 else lf
        first = data[pos]
        # Checked for every line the section takes (all but one the scan stops at): an LF
        # without its CR, or a CR inside the line (RFC 5322 §2.2: CRLF ends a line).
        bare = (lf >= 0 and content_end == lf) or find(b"\r", pos, content_end) >= 0
        if content_end == pos and lf >= 0:
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
        colon = find(b":", pos, content_end)
        stop = colon
        if colon >= 0:
            # WSP before the colon is obsolete syntax (RFC 5322 §4.5) and not in the name.
            while stop > pos and data[stop - 1] in (32, 9):
                stop -= 1
        if colon < 0 or stop == pos:
            # Neither a field nor a continuation: the section ends here, malformed.
            break
        if open_field:
            _finish(scan, kind, name_start, name_end, value_start, value_end)
        open_field = True
        name_start, name_end = pos, stop
        value_start, value_end = colon + 1, content_end
        name = data[pos:stop]
        kind = _KINDS.get(name.lower(), 0) if stop - pos <= _LONGEST else 0
        if _BAD_NAME_OCTET(name) is not None:
            scan.malformed = True
        scan.bare_line_ends |= bare
        pos = nxt
    # Out of data (or limit) inside the header section, or stopped at a non-field line.
    if open_field:
        _finish(scan, kind, name_start, name_end, value_start, value_end)
    scan.end = pos
    scan.malformed = True
    return scan

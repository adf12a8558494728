"""Text lines of a stored message: find and break lines longer than SMTP allows.

RFC 5321 §4.5.3.1.6: a text line is at most 1,000 octets with its CRLF, and a server may
refuse or cut a longer one, so Ferry never sends one.  :func:`wrap_long_lines` breaks such
a line as Postfix does (``smtp_line_length_limit``): it inserts CRLF SPACE, so that a long
header field stays a valid folded field (RFC 5322 §2.2.3) and a continuation never starts
with a dot.  :func:`has_long_line` is the test the receive path runs on every message; it
works at C speed (one ``bytes.rfind`` per 1,000 octets), never octet by octet in Python.

Bodies here are canonical CRLF text (DESIGN.md "Wire rules"): a CR or LF occurs only as
part of a CRLF.  No I/O.
"""

from __future__ import annotations

from typing import Final

#: RFC 5321 §4.5.3.1.6: the longest text line, CRLF included.
MAX_LINE: Final = 1000

_CRLF: Final = b"\r\n"
_FOLD: Final = b"\r\n "


def has_long_line(body: bytes, limit: int = MAX_LINE) -> bool:
    """Whether a line of ``body`` is longer than ``limit`` octets with its CRLF (a last
    line without CRLF counts as if it had one)."""
    # A line starting at ``pos`` is too long when the next ``limit - 1`` octets hold no
    # CR.  Otherwise the next candidate starts after the *last* CR among them (no line
    # between can be long), so each step jumps about ``limit`` octets with one C-speed
    # rfind: a message of n octets costs n / limit steps, and one under limit costs none.
    span = limit - 1
    end = len(body)
    pos = 0
    rfind = body.rfind
    while end - pos >= span:
        cr = rfind(b"\r", pos, pos + span)
        if cr < 0:
            return True
        pos = cr + 2
    return False


def wrap_long_lines(body: bytes, limit: int = MAX_LINE) -> bytes:
    """``body`` with every line longer than ``limit`` octets (CRLF included) broken into
    lines of at most ``limit`` octets by inserting CRLF SPACE (Postfix's
    smtp_line_length_limit); other lines are kept byte for byte."""
    content = limit - 2
    if content < 2:
        raise ValueError("limit must leave room for a space and one octet")
    out: list[bytes] = []
    for line in body.split(_CRLF):
        if len(line) <= content:
            out.append(line)
            continue
        # The first piece fills the line; every continuation is SPACE plus content - 1
        # octets, so no piece, with its CRLF, passes the limit.
        pieces = [line[:content]]
        step = content - 1
        pieces += [line[i : i + step] for i in range(content, len(line), step)]
        out.append(_FOLD.join(pieces))
    return _CRLF.join(out)

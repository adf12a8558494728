"""Pieces shared by the header fields Ferry writes itself (the Received trace, DSNs).

Mailbox syntax for deciding whether an address from the wire may be written as it is,
folding at a width (RFC 5322 §2.2.3), and the RFC 5322 §3.3 date.  No I/O.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Final

#: Line width Ferry folds its own fields at (RFC 5322 §2.1.1 recommends 78).
MAX_LINE: Final = 78

# RFC 5321 §4.1.2 Mailbox with RFC 6531 §3.3 (non-ASCII allowed when SMTPUTF8 is used):
# Dot-string or Quoted-string, "@", a domain or an address literal.
_ATEXT: Final = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff"
_LABEL: Final = (
    r"[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\-\x80-\U0010ffff]*[A-Za-z0-9\x80-\U0010ffff])?"
)
MAILBOX: Final = re.compile(
    rf"(?:[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
    r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*")'
    rf"@(?:{_LABEL}(?:\.{_LABEL})*|\[[\x21-\x5a\x5e-\x7e]+\])"
)
_POSTMASTER: Final = re.compile(r"postmaster", re.IGNORECASE)
# What else may stay in an address that is not a mailbox: atext and the address
# punctuation; every other character (space, quotes, parentheses, "<", ">", ";", "\\"),
# which could end an angle-addr or open a comment or a quoted string, becomes "?".
_ADDRESS_OTHER: Final = re.compile(rf"[^{_ATEXT}.@\[\]:]")


def safe_address(value: str, *, postmaster: bool = False) -> str:
    """``value`` as is when it is a well-formed mailbox (or, with ``postmaster``, the bare
    RCPT TO:<Postmaster> form of RFC 5321 §4.1.1.3); else with the dangerous characters
    replaced by "?"."""
    if MAILBOX.fullmatch(value) or (postmaster and _POSTMASTER.fullmatch(value)):
        return value
    return _ADDRESS_OTHER.sub("?", value)


def fold(first: str, clauses: Sequence[Sequence[str]], *, indent: str,
         width: int = MAX_LINE) -> str:
    """Lay out ``clauses`` (lists of words) after ``first``, each clause starting on its own
    line; words are joined by a space or, where the line would pass ``width``, by CRLF and
    ``indent`` (RFC 5322 §2.2.3).  A word is never split, and no line is white space alone
    (§3.2.2), so only a word longer than a line makes a longer line.  Ends with CRLF."""
    lines: list[str] = []
    for clause in clauses:
        start = first if not lines else indent
        whole = start + " ".join(clause)
        if len(whole) <= width:  # no fold point needed: the loop below would join all
            lines.append(whole)
            continue
        current = start + clause[0]
        for word in clause[1:]:
            if word and len(current) + 1 + len(word) > width and current.strip():
                lines.append(current)
                current = indent + word
            else:
                current += " " + word
        lines.append(current)
    return "\r\n".join(lines) + "\r\n"


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def rfc5322_date(when: float) -> str:
    """RFC 5322 §3.3 date-time of ``when`` in UTC (formatted once per second: every field
    written in one second shares it; the cache is keyed by the whole second, an int, so a
    hit builds no datetime)."""
    second = math.floor(when)
    if when - second >= 0.9999995:
        # datetime rounds to the microsecond (half even): this one may be the next second
        second = math.floor(datetime.fromtimestamp(when, UTC).timestamp())
    return _date(second)

"""The Authentication-Results header field (RFC 8601): writing ours, and recognising a
field that claims to be ours.

:func:`format_field` turns the authentication methods' results (:class:`MethodResult`
values, made by SPF, DKIM and DMARC) into the field's value: the authserv-id, then one
"resinfo" per result, ``method=result (reason) ptype.property=value``, each on its own
line and folded so that no line reaches 78 characters (RFC 5322 §2.1.1), or ``none`` when
nothing was checked (§2.2).  :func:`claims` tells whether a field that arrived with the
message names our authserv-id: such a field is a forgery from outside and must be removed
before ours is added (§5).

Text only: it must never look anything up, never decide a result and never touch the
message (the verify agent hands the field and the removal to the session as header
changes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

from engine.agents.api import MethodResult

__all__ = ["FIELD", "authserv_id_of", "claims", "format_field", "head", "lines"]

FIELD: Final = "Authentication-Results"

#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; we keep every line shorter.
MAX_LINE: Final = 77
#: Continuation lines start with this (folding whitespace, RFC 5322 §3.2.2).
FOLD: Final = "\r\n\t"

# RFC 2045 §5.1: token := 1*<any (US-ASCII) CHAR except SPACE, CTLs, or tspecials>.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
# RFC 8601 §2.2 pvalue: value / [ [ local-part ] "@" ] domain-name.
_ADDRESS: Final = re.compile(r"[!#$%&'*+\-./0-9=?A-Z^_`a-z{|}~]*@[A-Za-z0-9._-]+")
_CTL: Final = re.compile(r"[\x00-\x1f\x7f]+")
_COMMENT_SPECIAL: Final = re.compile(r"[()\\]")


def format_field(authserv_id: str, results: Sequence[MethodResult]) -> str:
    """The value of our Authentication-Results field, folded with CRLF + TAB; the
    session writes it as ``Authentication-Results: <value>`` (HeaderChange "add")."""
    if not results:
        # §2.2 no-result: the authserv-id and "none".
        return _fold([[f"{_value(authserv_id)};", "none"]])
    return head(authserv_id) + lines(results, True)


@lru_cache(maxsize=64)
def head(authserv_id: str) -> str:
    """The field's first line: the authserv-id (what :func:`format_field` starts with
    when there are results)."""
    return _fold([[f"{_value(authserv_id)};"]])


def lines(results: Sequence[MethodResult], last: bool) -> str:
    """The resinfo lines of ``results`` as :func:`format_field` writes them after
    :func:`head`; ``last``: they end the field (else the last of them ends in ";" too).
    Each line is made on its own, so a field's lines may be made in parts and joined:
    ``head(a) + lines(r1, False) + lines(r2, True) == format_field(a, r1 + r2)`` for a
    non-empty ``r2`` (the verify agent keeps a sender's SPF and DMARC lines as text)."""
    if len(results) == 1:  # the common case: one result
        return _line(results[0], last)
    end = len(results) - 1
    return "".join([_line(r, last and i == end) for i, r in enumerate(results)])


@lru_cache(maxsize=4096)
def _line(result: MethodResult, last: bool) -> str:
    """One resinfo on a line of its own (each starts afresh after a fold, so its text does
    not depend on the others).  Cached by the result (a frozen value): a busy MX writes
    the same SPF and DMARC results again and again; only DKIM's header.b differs, and
    its line is made afresh (the steps below keep that cheap: ~2.5 µs)."""
    words = _resinfo(result)
    if not last:
        words[-1] += ";"
    out = [FOLD]  # _fold([[], words]): the line starts after a fold, at width 1
    _place(out, words, 1)
    return "".join(out)


def _resinfo(result: MethodResult) -> list[str]:
    """The words of one resinfo."""
    if not (_is_token(result.method) and _is_token(result.result)):
        word = result.result if _is_token(result.method) else result.method
        raise ValueError(f"method and result must be tokens: {word!r}")
    words = [f"{result.method}={result.result}"]
    if result.reason:
        words.append(_comment(result.reason))
    for name, value in result.props:
        if not _property(name):
            raise ValueError(f"a property must be ptype.property: {name!r}")
        words.append(f"{name}={_pvalue(value)}")
    return words


@lru_cache(maxsize=256)
def _is_token(word: str) -> bool:
    """A method or a result name is a token (a handful of words: cached)."""
    return _TOKEN.fullmatch(word) is not None


@lru_cache(maxsize=256)
def _property(name: str) -> bool:
    """``name`` is ptype.property, both tokens (a handful of names: cached)."""
    ptype, dot, prop = name.partition(".")
    return bool(dot and _TOKEN.fullmatch(ptype) and _TOKEN.fullmatch(prop))


def _fold(lines: list[list[str]]) -> str:
    """Each group of words on its own line (the first after the field name), words
    separated by one space and carried to a new line before a line would reach 78."""
    out: list[str] = []
    width = len(FIELD) + 2  # "Authentication-Results: "
    for n, words in enumerate(lines):
        if n:
            out.append(FOLD)
            width = 1
        width = _place(out, words, width)
    return "".join(out)


def _place(out: list[str], words: list[str], width: int) -> int:
    """``words`` appended to ``out`` on the line that is ``width`` wide so far, separated
    by one space, a fold before a word that would make the line reach 78; the width of
    the last line after them."""
    for i, word in enumerate(words):
        if i and width + 1 + len(word) > MAX_LINE:
            out.append(FOLD)
            width = 1
        elif i:
            out.append(" ")
            width += 1
        out.append(word)
        width += len(word)
    return width


def _value(text: str) -> str:
    """RFC 2045 value: a token as it is, anything else as a quoted-string."""
    return text if _TOKEN.fullmatch(text) else _quoted(text)


@lru_cache(maxsize=1024)
def _pvalue(text: str) -> str:
    """A property's value as written (kept: a sender's header.d, header.s, header.from
    and smtp.mailfrom come again and again)."""
    if _TOKEN.fullmatch(text) or _ADDRESS.fullmatch(text):
        return text
    return _quoted(text)


def _quoted(text: str) -> str:
    text = _CTL.sub(" ", text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """A comment (RFC 5322 §3.2.2): parentheses and backslashes escaped, control
    characters and runs of white space made one space, non-ASCII made "?" (a reason may
    quote DNS text)."""
    text = " ".join(_CTL.sub(" ", text).split())
    if not text.isascii():
        text = "".join(c if c.isascii() else "?" for c in text)
    return "(" + _COMMENT_SPECIAL.sub(r"\\\g<0>", text) + ")"


def authserv_id_of(value: str) -> str | None:
    """The authserv-id a received field's ``value`` starts with (RFC 8601 §2.2: after
    optional CFWS, a token or a quoted-string), or None when it has none."""
    i = _skip_cfws(value, 0)
    if i >= len(value):
        return None
    if value[i] == '"':
        out: list[str] = []
        i += 1
        while i < len(value):
            c = value[i]
            if c == "\\" and i + 1 < len(value):
                out.append(value[i + 1])
                i += 2
                continue
            if c == '"':
                return "".join(out)
            if c not in "\r\n":
                out.append(c)
            i += 1
        return None  # unterminated
    match = _TOKEN.match(value, i)
    return match.group() if match else None


def _skip_cfws(value: str, i: int) -> int:
    """The index after white space, folding and (nested) comments starting at ``i``."""
    depth = 0
    while i < len(value):
        c = value[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def claims(value: str, authserv_id: str) -> bool:
    """Whether a received Authentication-Results field's value names ``authserv_id``
    (compared case-insensitively, as domain names are: RFC 8601 §5 says such a field from
    outside is a forgery and is removed)."""
    found = authserv_id_of(value)
    return found is not None and found.lower() == authserv_id.lower()

"""Trace fields: the Received field this server prepends to every message it accepts
(RFC 5321 §4.4), and the WITH protocol name that goes in it (RFC 3848, RFC 6531 §3.7.3).

Owns the field's wording, its folding (RFC 5322 §2.2.3: CRLF + TAB, lines kept to 78
characters where a fold point allows) and the sanitising of every value that came from the
wire or from DNS: no CR, LF, NUL or other control character ever reaches the header (each
becomes "?"), comments hold only quoted-pairs for "(", ")" and "\\" (RFC 5322 §3.2.2), a
value outside a comment can never open a comment, a quoted string or end the stamp early,
and non-ASCII text appears only when the session is SMTPUTF8.

It must never do I/O, never read the clock (the caller passes ``when``) and never raise
for anything a client can send.
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from typing import Final

from engine.message.fields import MAX_LINE, fold, rfc5322_date, safe_address

__all__ = ["Stamp", "received_field", "received_stamp", "with_protocol"]

#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters, excluding the CRLF.
#: RFC 5321 §4.5.3.1.2: a domain name is at most 255 octets; a longer HELO is cut there.
MAX_HELO: Final = 255
#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its angle brackets.
MAX_RECIPIENT: Final = 254
#: Our own bound for an authentication identity or a TLS description, so that even fully
#: escaped (twice the length) a line stays far below the 998-character limit (§2.1.1).
MAX_COMMENT_VALUE: Final = 255

# Outside a comment a single token must not change how the field parses: whitespace would
# split it, "(" open a comment, '"' a quoted string, ";" end the stamp before the date.
_TOKEN_SPECIALS: Final = frozenset(' ()\\";')
# A host name from DNS never holds brackets: replacing them stops "x [203.0.113.9]" from
# posing as the address literal beside it.
_NAME_SPECIALS: Final = frozenset(' ()\\";[]')



def with_protocol(esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """The Received WITH keyword for a session (RFC 3848 §2, RFC 6531 §3.7.3).

    SMTP for a HELO session (TLS, AUTH and SMTPUTF8 are ESMTP extensions, and the registry
    has no name for HELO over TLS); otherwise ESMTP or UTF8SMTP, then "S" for TLS, then
    "A" for an authenticated client: ESMTPSA, UTF8SMTPS, ...
    """
    if not esmtp:
        return "SMTP"
    return ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + ("A" if auth else "")


def _clean(value: str, utf8: bool, specials: frozenset[str] = frozenset()) -> str:
    """``value`` with every control character (C0, DEL, C1 and the other Unicode control,
    format, separator and unassigned classes) and every character of ``specials`` replaced
    by "?"; non-ASCII characters too unless ``utf8``."""
    if value.isascii():
        # Letters and digits only (a queue id): nothing to replace, one test.
        if value.isalnum() or (value.isprintable() and specials.isdisjoint(value)):
            return value
        return "".join("?" if c < " " or c == "\x7f" or c in specials else c for c in value)
    out: list[str] = []
    for c in value:
        if c < " " or c == "\x7f" or c in specials:
            out.append("?")
        elif c <= "\x7f":
            out.append(c)
        elif not utf8:
            out.append("?")
        else:
            # Cc/Cf/Cs/Co/Cn and Zs/Zl/Zp: controls, invisible format characters, lone
            # surrogates (which UTF-8 cannot encode), line/paragraph separators and
            # non-ASCII spaces have no place in a trace field.
            category = unicodedata.category(c)
            out.append("?" if category[0] in "CZ" else c)
    return "".join(out)


def _comment_text(value: str, utf8: bool) -> str:
    """``value`` made safe inside a comment: cleaned, then "\\", "(" and ")" written as
    quoted-pairs (RFC 5322 §3.2.2) so the comment can neither close early nor nest."""
    value = _clean(value[:MAX_COMMENT_VALUE], utf8)
    if "\\" in value or "(" in value or ")" in value:
        value = value.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return value


def _comment(prefix: str, value: str, utf8: bool) -> list[str]:
    """A comment "(prefix value)" as fold-able words; the value's own spaces are fold points."""
    words = (prefix + _comment_text(value, utf8)).split(" ")
    words[0] = "(" + words[0]
    words[-1] += ")"
    return words


@functools.lru_cache(maxsize=4096)
def _address_literal(client_ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3); an IPv4-mapped IPv6
    address is shown as the IPv4 client it is, and a zone index is dropped."""
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        raise ValueError(f"client_ip {client_ip!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"[{ip.ipv4_mapped}]"
        return f"[IPv6:{ipaddress.IPv6Address(int(ip)).compressed}]"
    return f"[{ip}]"


#: The room of the "for" clause's address and date on one line: "\tfor <" ">; " aside.
_FOR_ROOM: Final = MAX_LINE - len("\tfor <>; ")

#: The printable ASCII characters safe_address replaces in an address that is not a
#: mailbox (engine.message.fields: not atext nor ".@[]:").
_ADDRESS_UNSAFE: Final = frozenset(' "(),;<>\\')


def _recipient(recipient: str, utf8: bool) -> str:
    """The recipient for "for <...>": as written when it is a well-formed mailbox, else
    with every character that could end the path, the stamp or a quoted string as "?"."""
    # Once per message (a bulk injection's thousands): printable ASCII without a character
    # safe_address would replace comes out as it is, mailbox or not, without its regexes.
    if (recipient.isascii() and recipient.isprintable() and len(recipient) <= MAX_RECIPIENT
            and _ADDRESS_UNSAFE.isdisjoint(recipient)):
        return recipient
    return safe_address(_clean(recipient[:MAX_RECIPIENT], utf8), postmaster=True)






def received_field(
    *,
    helo: str,
    client_ip: str,
    client_name: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    tls: str | None,
    auth_user: str | None,
    recipient: str | None,
    when: float,
) -> bytes:
    """The Received field for one accepted message, folded, ending in CRLF (RFC 5321 §4.4).

    ``helo``: the EHLO/HELO argument; ``client_ip``: the peer address as text (raises
    ValueError if it is not one); ``client_name``: its verified reverse-DNS name or None;
    ``hostname``: ours; ``protocol``: from :func:`with_protocol` (a UTF8SMTP* protocol
    lets non-ASCII text through); ``queue_id``: the queue id as text; ``tls``: e.g.
    "version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384" or None; ``auth_user``: the
    authenticated identity or None; ``recipient``: the mailbox (no angle brackets) for a
    single-recipient message, else None; ``when``: a POSIX timestamp, written in UTC.
    Wire values are cut before sanitising: helo and client_name at 255 characters, tls
    and auth_user at 255, recipient at 254; an empty tls or auth_user is left out.
    """
    return received_stamp(helo, client_ip, client_name, hostname, protocol, tls or "",
                          auth_user or "").field(queue_id, recipient, when)


def _fold1(clause: list[str]) -> str:
    """One clause on its own line(s) after the from clause (CRLF + TAB folding)."""
    return fold("\t", [clause], indent="\t")


class Stamp:
    """What a Received field holds but the queue id, the recipient and the date: the same
    for every message of a session or an injection request (one per :func:`received_stamp`), so
    worked out once, not once per message.  Each clause is laid out on lines of its own
    (:func:`engine.message.fields.fold` folds each alone), so a field is the cached lines
    and the lines of the clauses that change: the by clause (its id) and the last one
    (the date after its ";", RFC 5321 §4.4: Stamp = ... Opt-info [CFWS] ";" FWS date-time).
    Made by :func:`received_stamp`."""

    __slots__ = ("by", "by_text", "comments", "head", "last", "utf8")

    def __init__(self, helo: str, client_ip: str, client_name: str | None, hostname: str,
                 protocol: str, tls: str, auth_user: str) -> None:
        utf8 = self.utf8 = protocol.upper().startswith("UTF8")
        literal = _address_literal(client_ip)
        helo_token = _clean(helo[:MAX_HELO], utf8, _TOKEN_SPECIALS) or "?"
        if client_name:
            name = _clean(client_name[:MAX_HELO], utf8, _NAME_SPECIALS)
            from_clause = ["from", helo_token, f"({name}", f"{literal})"]
        else:
            from_clause = ["from", helo_token, f"({literal})"]
        self.head = fold("Received: ", [from_clause], indent="\t")
        by = ["by", _clean(hostname, utf8, _TOKEN_SPECIALS) or "?", "(Ferry)"]
        if protocol:
            by += ["with", _clean(protocol, False, _TOKEN_SPECIALS)]
        #: the by clause's words before "id", and its line before the id when unfolded
        self.by = tuple(by)
        self.by_text = "\t" + " ".join(by) + " id "
        comments = []
        if tls:
            comments.append(_comment("", tls, utf8))
        if auth_user:
            comments.append(_comment("authenticated user ", auth_user, utf8))
        #: the TLS and AUTH comments' lines (with a recipient after them), and the last
        #: comment's words (without one: it takes the date)
        self.comments = "".join(map(_fold1, comments))
        self.last: tuple[str, tuple[str, ...]] | None = None
        if comments:
            self.last = ("".join(map(_fold1, comments[:-1])), tuple(comments[-1]))

    def field(self, queue_id: str, recipient: str | None, when: float) -> bytes:
        """The field for one message (see :func:`received_field`)."""
        date = rfc5322_date(when)
        qid = _clean(queue_id, False, _TOKEN_SPECIALS) if queue_id else ""
        if recipient:
            by = self.by_text + qid
            address = _recipient(recipient, self.utf8)
            # fold's own shortcut: a clause that fits is one line (both, the common case:
            # one f-string, a bulk injection's thousands)
            if qid and len(by) <= MAX_LINE and len(address) + len(date) <= _FOR_ROOM:
                return (f"{self.head}{by}\r\n{self.comments}"
                        f"\tfor <{address}>; {date}\r\n").encode()
            by = by + "\r\n" if qid and len(by) <= MAX_LINE else _fold1(self._by(qid))
            path = f"<{address}>;"
            last = f"\tfor {path} {date}"
            last = last + "\r\n" if len(last) <= MAX_LINE else _fold1(["for", path, date])
            return (self.head + by + self.comments + last).encode("utf-8")
        if self.last is not None:
            before, words = self.last
            tail = before + _fold1([*words[:-1], words[-1] + ";", date])
            return (self.head + _fold1(self._by(qid)) + tail).encode("utf-8")
        by_words = self._by(qid)
        by_words[-1] += ";"
        return (self.head + _fold1([*by_words, date])).encode("utf-8")

    def _by(self, qid: str) -> list[str]:
        return [*self.by, "id", qid] if qid else [*self.by]


@functools.lru_cache(maxsize=1024)
def received_stamp(helo: str, client_ip: str, client_name: str | None, hostname: str,
                   protocol: str, tls: str, auth_user: str) -> Stamp:
    """The Received field of a session or request but for its per-message words:
    ``stamp.field(queue_id, recipient, when)`` is :func:`received_field` with the same
    arguments ("" for no ``tls`` or ``auth_user``), without its per-call keyword work."""
    return Stamp(helo, client_ip, client_name, hostname, protocol, tls, auth_user)

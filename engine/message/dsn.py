"""Delivery status notifications: the RFC 3464 report this server sends back to a message's
sender when recipients fail, are delayed or (when asked) are delivered.

Owns the decision whether a recipient wants a notice (RFC 3461 §4.1 NOTIFY), and the whole
report: the top-level header (RFC 5322 §3.6, Auto-Submitted per RFC 3834 §5), the
multipart/report container (RFC 6522), the human-readable part, the
message/delivery-status part (RFC 3464 §2.2 per-message and §2.3 per-recipient fields,
RFC 6533 §3 for non-ASCII addresses) and the returned original (RFC 3461 §4.3 RET).

Every value that came from the wire or a remote server (addresses, ORCPT, ENVID, replies,
host names) is sanitised before it reaches the report: no CR, LF, NUL or other control
character ever appears (controls become "?", line breaks inside a multi-line reply become
spaces), the delivery-status part is pure ASCII, and fields are folded (RFC 5322 §2.2.3)
so lines stay within 78 characters where a space allows and never pass 998 (§2.1.1).

Policy decided here, on purpose:

* A report is never addressed to the null reverse-path (RFC 5321 §6.1, RFC 3464 §2):
  :func:`build_dsn` returns None for it.  That is the only suppression by sender; a message
  marked "Auto-Submitted" still gets its bounce, because its sender asked for a real
  return path and mailing-list software depends on bounces to prune addresses.
* NOTIFY absent means FAILURE and DELAY (RFC 3461 §4.1 leaves DELAY to the MTA).
* RET absent means headers only (RFC 3461 §4.3 leaves the choice to the MTA): returning
  whole messages by default doubles the traffic of every bulk bounce.  A RET=FULL message
  larger than ``max_return`` is returned as headers only too, and so is every message in
  a report of successes alone ("delivered", "relayed"): RET applies to reports of a
  failure (RFC 3461 §4.3).

It must never do I/O and never read the clock (the caller passes ``now``); it reads the
operating system's random source only for the boundary and the Message-ID.
"""

from __future__ import annotations

import binascii
import re
import secrets
import textwrap
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from engine.message.fields import fold, rfc5322_date, safe_address
from engine.message.headers import scan_headers
from engine.queue.records import Envelope, Recipient

__all__ = [
    "MAX_RETURN",
    "Action",
    "Failure",
    "NoticeKind",
    "build_dsn",
    "dsn_envelope_sender",
    "reply_status",
    "reported",
    "wants_notice",
]

NoticeKind = Literal["failure", "delay", "success"]
Action = Literal["failed", "delayed", "delivered", "expanded", "relayed"]

#: Default cap on a message returned in full (RET=FULL); a larger one is returned as
#: headers only.
MAX_RETURN: Final = 10 * 1024 * 1024

#: RFC 5322 §2.1.1: lines SHOULD be at most 78 characters (excluding CRLF), MUST be <= 998.
#: Longest run without a space we let through in free text; longer runs are cut with a
#: space so a folded line stays far below 998 characters.
MAX_WORD: Final = 900
#: Cap on one address or ORCPT after encoding; RFC 5321 §4.5.3.1.3 allows 256 octets for
#: a whole path, so only a broken record gets near it.  Kept well under 998 with the field
#: name in front.
MAX_ADDRESS: Final = 900
#: Cap on a remote reply kept as the diagnostic (a reply of many lines is joined).
MAX_DIAGNOSTIC: Final = 2000
#: RFC 3461 §4.4: ENVID is at most 100 characters.
MAX_ENVID: Final = 100
#: RFC 5321 §4.5.3.1.2: a domain name is at most 255 octets.
MAX_HOST: Final = 255

# Which NOTIFY keyword an action answers (RFC 3461 §4.1, RFC 3464 §2.3.3): "relayed" and
# "expanded" are reported to a sender who asked for SUCCESS.
_ACTION_KIND: Final[dict[str, NoticeKind]] = {
    "failed": "failure",
    "delayed": "delay",
    "delivered": "success",
    "expanded": "success",
    "relayed": "success",
}
# The status used when the one given is not an RFC 3463 §2 code.
_DEFAULT_STATUS: Final[dict[str, str]] = {
    "failed": "5.0.0",
    "delayed": "4.0.0",
    "delivered": "2.0.0",
    "expanded": "2.0.0",
    "relayed": "2.0.0",
}
_STATUS: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# The status class a reply's code must have to stand for a kind of notice (RFC 3463 §3.1);
# a failure keeps its code whatever the class (an expiry reports the last 4.x.x).
_STATUS_CLASS: Final[dict[str, str]] = {"delay": "4", "success": "2"}
# A reply that starts with an SMTP code is an "smtp" diagnostic (RFC 3464 §2.3.6); our own
# wording (a connection error, an expiry) is marked as ours.
_SMTP_REPLY: Final = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
_WHITESPACE: Final = re.compile(r"[\t\n\v\f\r ]+")
# RFC 6533 §3 QCHAR: printable ASCII except space, "\", "+" and "="; everything else in a
# utf-8-addr-xtext is written as EmbeddedUnicodeChar, "\x{HEX}".
_QCHAR_SPECIALS: Final = frozenset(" \\+=")
# The start of an EmbeddedUnicodeChar that a length cap cut short.
_HALF_ESCAPE: Final = re.compile(r"\\(?:x(?:\{[0-9A-F]*)?)?\Z")
# RFC 3464 §2.3.1 address-type: an RFC 5322 atom.
_ADDR_TYPE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
# RFC 5322 §3.6.4 msg-id as we are willing to copy it into In-Reply-To and References.
_MSG_ID: Final = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")


@dataclass(frozen=True, slots=True)
class Failure:
    """What happened to one recipient, for the report.

    ``index``: position in ``envelope.recipients``; ``action``: RFC 3464 §2.3.3;
    ``status``: RFC 3463 code such as "5.1.1" (an invalid one is replaced by x.0.0 for the
    action); ``diagnostic``: the remote reply as received ("550 5.1.1 No such user") or
    our own words, "" for none; ``remote_mta``: the host that gave it, "" for none;
    ``will_retry_until``: for "delayed", when retrying stops (epoch s), else None.
    """

    index: int
    action: Action
    status: str
    diagnostic: str = ""
    remote_mta: str = ""
    will_retry_until: float | None = None


def dsn_envelope_sender() -> str:
    """The reverse-path a report is sent with: always null (RFC 3464 §2, RFC 5321 §6.1),
    so a report that cannot be delivered never produces another."""
    return ""


def wants_notice(recipient: Recipient, kind: NoticeKind) -> bool:
    """Whether ``recipient`` asked for a notice of ``kind`` (RFC 3461 §4.1).

    NOTIFY absent: failure and delay yes, success no (the delay notice is our choice; the
    RFC leaves it to the MTA).  NOTIFY=NEVER: nothing.  Otherwise exactly the kinds listed.
    """
    notify = {value.upper() for value in recipient.notify}
    if not notify:
        return kind != "success"
    if "NEVER" in notify:
        return False
    return kind.upper() in notify


def reply_status(reply: str, action: Action) -> str:
    """The Status for an item reporting the SMTP reply ``reply``: its enhanced code
    (RFC 2034, "550 5.1.1 No such user" → "5.1.1") when it has one, else the action's
    default ("5.0.0" for failed).  A "delayed" item keeps only a class 4 code: the delay
    is a persistent transient failure (RFC 3463 §3), whatever the reply claimed; a
    "delivered" or "relayed" one only a class 2 code (success, RFC 3463 §3.1)."""
    parts = reply.split(" ", 2)
    code = parts[1] if len(parts) > 1 else ""
    required = _STATUS_CLASS.get(_ACTION_KIND[action])
    if _STATUS.fullmatch(code) and (required is None or code[0] == required):
        return code
    return _DEFAULT_STATUS[action]


# --- sanitising ----------------------------------------------------------------------------


def _clean(value: str, ascii_only: bool) -> str:
    """``value`` on one line: whitespace runs (CR and LF included) become one space and
    other control characters "?"; non-ASCII characters stay (as "?" if ``ascii_only``)
    unless they are controls, invisible format characters, surrogates or separators."""
    value = _WHITESPACE.sub(" ", value).strip(" ")
    if value.isascii():
        if value.isprintable():
            return value
        return "".join("?" if c < " " or c == "\x7f" else c for c in value)
    out: list[str] = []
    for c in value:
        if c < " " or c == "\x7f":
            out.append("?")
        elif c <= "\x7f":
            out.append(c)
        elif ascii_only or unicodedata.category(c)[0] in "CZ":
            out.append("?")
        else:
            out.append(c)
    return "".join(out)


def _cut_words(value: str) -> str:
    """``value`` with any run longer than :data:`MAX_WORD` split by a space, so folding
    always finds a place to break before a line reaches 998 characters."""
    if len(value) <= MAX_WORD:
        return value
    words: list[str] = []
    for word in value.split(" "):
        while len(word) > MAX_WORD:
            words.append(word[:MAX_WORD])
            word = word[MAX_WORD:]
        words.append(word)
    return " ".join(words)


def _utf8_xtext(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: QCHARs as they are, every other character (non-ASCII,
    space, "\\", "+", "=") as "\\x{HEX}" with upper-case digits and no leading zeros."""
    return "".join(
        c if " " < c < "\x7f" and c not in _QCHAR_SPECIALS else f"\\x{{{ord(c):X}}}"
        for c in address
    )


def _typed_address(addr_type: str, address: str) -> str:
    """``type;address`` for Original-Recipient / Final-Recipient (RFC 3464 §2.3.1-2.3.2).

    An rfc822 address with non-ASCII characters becomes the RFC 6533 "utf-8" type, and a
    utf-8 address is written in its 7-bit xtext form: the delivery-status part is ASCII.
    Controls were cleaned before; an address longer than :data:`MAX_ADDRESS` is cut.
    """
    low = addr_type.lower()
    if low == "utf-8" or (low == "rfc822" and not address.isascii()):
        # A utf-8 value may already hold "\x{...}" forms; keep their backslash as is.
        if low == "utf-8":
            value = "".join(c if c.isascii() and c != " " else _utf8_xtext(c) for c in address)
        else:
            value = _utf8_xtext(address)
        # A cut must not leave half an escape behind.
        return "utf-8;" + _HALF_ESCAPE.sub("", value[:MAX_ADDRESS])
    return f"{addr_type};{address[:MAX_ADDRESS]}"


def _orcpt(orcpt: str) -> str | None:
    """The Original-Recipient value from a stored ORCPT ("type;decoded address"), or None
    if there is none or it has no usable type."""
    addr_type, semi, address = orcpt.partition(";")
    addr_type = _clean(addr_type, ascii_only=True)
    if not semi or _ADDR_TYPE.fullmatch(addr_type) is None:
        return None
    address = _clean(address, ascii_only=False)
    if not address:
        return None
    if addr_type.lower() not in ("rfc822", "utf-8"):
        address = _clean(address, ascii_only=True)
    return _typed_address(addr_type, address)


def _sender_for_header(sender: str) -> str:
    """The sender as the To: addr-spec: as is when it is a mailbox (non-ASCII stays, RFC
    6532 §3.2), else with every character that could break the angle-addr as "?"."""
    return safe_address(_clean(sender, ascii_only=False)[:MAX_ADDRESS]) or "?"


def _host(value: str) -> str:
    """A host name for "dns;" fields and the From address: one ASCII token."""
    return _clean(value, ascii_only=True)[:MAX_HOST].replace(" ", "?") or "?"


# --- layout --------------------------------------------------------------------------------


def _field(name: str, value: str, *, folded: bool = True) -> str:
    """``Name: value`` with CRLF, folded before a space (CRLF then the space, so unfolding
    gives the value back, RFC 5322 §2.2.3) where the line would pass :data:`MAX_LINE`."""
    if not folded:
        return f"{name}: {value}\r\n"
    return fold(f"{name}: ", [value.split(" ")], indent=" ")


def _wrap(text: str, indent: str = "") -> list[str]:
    """Plain-text lines of at most 76 characters (a longer word is broken)."""
    return textwrap.wrap(
        text,
        width=76,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


@dataclass(frozen=True, slots=True)
class _Item:
    """One reported recipient with every value already sanitised."""

    action: str
    status: str
    address: str  # for the text part (may hold non-ASCII)
    final: str  # "type;address", ASCII
    original: str | None
    diagnostic: str  # ASCII, one line
    diagnostic_type: str
    remote_mta: str
    retry_until: float | None


def _item(envelope: Envelope, failure: Failure) -> _Item:
    recipient = envelope.recipients[failure.index]
    address = _clean(recipient.address, ascii_only=False)
    status = failure.status if _STATUS.fullmatch(failure.status) else ""
    diagnostic = _cut_words(_clean(failure.diagnostic[: MAX_DIAGNOSTIC * 2], True))
    diagnostic = diagnostic[:MAX_DIAGNOSTIC].rstrip(" ")
    return _Item(
        action=failure.action,
        status=status or _DEFAULT_STATUS[failure.action],
        address=address,
        final=_typed_address("rfc822", address or "?"),
        original=_orcpt(recipient.orcpt) if recipient.orcpt else None,
        diagnostic=diagnostic,
        diagnostic_type="smtp" if _SMTP_REPLY.match(diagnostic) else "X-Ferry",
        remote_mta=_host(failure.remote_mta) if failure.remote_mta.strip() else "",
        retry_until=failure.will_retry_until if failure.action == "delayed" else None,
    )


_ACTION_WORDS: Final[dict[str, str]] = {
    "failed": "delivery failed permanently",
    "delayed": "delivery delayed, still being retried",
    "delivered": "delivered",
    "expanded": "delivered and forwarded to further addresses",
    "relayed": "relayed to a system that sends no further notices",
}


def _subject(items: Iterable[_Item]) -> str:
    actions = {item.action for item in items}
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _text_part(mta: str, items: Sequence[_Item], envelope: Envelope, returned: str) -> bytes:
    actions = {item.action for item in items}
    lines = [f"This is the mail delivery system at {mta}.", ""]
    if "failed" in actions:
        intro = (
            "Your message could not be delivered to one or more of its recipients. "
            "This is a permanent error: the message will not be tried again for them."
        )
    elif "delayed" in actions:
        intro = (
            "Your message has not yet been delivered to one or more of its recipients. "
            "It is still being retried; you do not need to send it again."
        )
    else:
        intro = "Your message was delivered as you asked to be told."
    lines += _wrap(intro)
    message_id = _clean(envelope.message_id, ascii_only=False)
    if message_id:
        lines += ["", *_wrap(f"Message-ID: {_cut_words(message_id)}")]
    for item in items:
        lines += [
            "",
            *_wrap(f"<{_cut_words(item.address)}>: {_ACTION_WORDS[item.action]} ({item.status})"),
        ]
        if item.diagnostic:
            said = f"{item.remote_mta} said: " if item.remote_mta else ""
            lines += _wrap(said + item.diagnostic, "    ")
        if item.retry_until is not None:
            lines += _wrap(f"Will retry until {rfc5322_date(item.retry_until)}", "    ")
    lines += ["", *_wrap(returned)]
    body = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    if body.isascii():
        head = "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        return head.encode("ascii") + b"\r\n" + body
    head = (
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
    )
    # b2a_qp keeps the CRLF line ends (it follows the first one it sees) and soft-breaks
    # at 76 characters (RFC 2045 §6.7).
    return head.encode("ascii") + b"\r\n" + binascii.b2a_qp(body, istext=True)


def _status_part(mta: str, envelope: Envelope, items: Sequence[_Item], now: float) -> bytes:
    # RFC 3464 §2.2 per-message fields, then one block per recipient (§2.3), each block
    # preceded by an empty line.
    out = [_field("Reporting-MTA", f"dns; {mta}")]
    envid = _clean(envelope.envid[: MAX_ENVID * 2], ascii_only=True)[:MAX_ENVID]
    if envid:
        out.append(_field("Original-Envelope-Id", envid))
    out.append(_field("Arrival-Date", rfc5322_date(envelope.arrival)))
    last_attempt = rfc5322_date(now)
    for item in items:
        out.append("\r\n")
        if item.original is not None:
            out.append(_field("Original-Recipient", item.original, folded=False))
        out.append(_field("Final-Recipient", item.final, folded=False))
        out.append(_field("Action", item.action))
        out.append(_field("Status", item.status))
        if item.remote_mta:
            out.append(_field("Remote-MTA", f"dns; {item.remote_mta}"))
        if item.diagnostic:
            out.append(_field("Diagnostic-Code", f"{item.diagnostic_type}; {item.diagnostic}"))
        out.append(_field("Last-Attempt-Date", last_attempt))
        if item.retry_until is not None:
            out.append(_field("Will-Retry-Until", rfc5322_date(item.retry_until)))
    head = "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n"
    return (head + "\r\n" + "".join(out)).encode("ascii")


def _returned_part(envelope: Envelope, original: bytes, max_return: int,
                   success: bool) -> tuple[bytes, str]:
    """The third part (RFC 6522 §3) and a sentence for the text part about it.
    ``success``: the report has only delivered/relayed/expanded items; then RET=FULL
    does not apply and the header alone is returned (RFC 3461 §4.3)."""
    what = "Message" if success else "Undelivered Message"
    if envelope.ret.upper() == "FULL" and len(original) <= max_return and not success:
        cte = "7bit" if original.isascii() else "8bit"
        head = (
            "Content-Description: Undelivered Message\r\n"
            "Content-Type: message/rfc822\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n"
        )
        return head.encode("ascii") + b"\r\n" + original, "Your message is attached."
    if envelope.ret.upper() == "FULL" and not success:
        note = "Your message was too large to return in full; its header is attached."
    else:
        note = "The header of your message is attached."
    headers = original[: scan_headers(original).end]
    if len(headers) > max_return:
        headers = headers[: headers.rfind(b"\n", 0, max_return) + 1]
    if headers and not headers.endswith(b"\n"):
        headers += b"\r\n"
    cte = "7bit" if headers.isascii() else "8bit"
    head = (
        f"Content-Description: {what} Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n"
    )
    return head.encode("ascii") + b"\r\n" + headers, note


def reported(envelope: Envelope, failure: Failure) -> bool:
    """Whether a report about ``envelope`` includes ``failure``: its recipient's NOTIFY
    asks for that kind of notice (:func:`wants_notice`)."""
    return wants_notice(envelope.recipients[failure.index], _ACTION_KIND[failure.action])


def build_dsn(
    *,
    reporting_mta: str,
    envelope: Envelope,
    items: Sequence[Failure],
    original: bytes,
    now: float,
    boundary: str | None = None,
    max_return: int = MAX_RETURN,
) -> bytes | None:
    """The complete report (RFC 5322 message, CRLF line ends) to ``envelope.sender`` about
    ``items``, or None when the sender is the null path or no item is wanted by its
    recipient's NOTIFY (:func:`wants_notice`); items not wanted are left out.

    ``reporting_mta``: our host name; ``original``: the message as queued (for RET);
    ``now``: the report's Date and every Last-Attempt-Date (epoch s); ``boundary``: the
    MIME boundary (random when None; ValueError if the given one occurs in the content);
    ``max_return``: the largest message returned in full under RET=FULL.  An item whose
    index is not a recipient of ``envelope`` raises ValueError (a caller bug).

    The result is 7-bit unless the sender or a returned original holds 8-bit text; then
    it must go out with 8BITMIME / SMTPUTF8 like the original did.
    """
    if envelope.sender in ("", "<>"):
        return None
    for failure in items:
        if not 0 <= failure.index < len(envelope.recipients):
            raise ValueError(f"item index {failure.index} is not a recipient")
    wanted = [_item(envelope, failure) for failure in items if reported(envelope, failure)]
    if not wanted:
        return None
    mta = _host(reporting_mta)
    success = all(_ACTION_KIND[item.action] == "success" for item in wanted)
    returned, note = _returned_part(envelope, original, max_return, success)
    parts = [
        b"Content-Description: Notification\r\n" + _text_part(mta, wanted, envelope, note),
        _status_part(mta, envelope, wanted, now),
        returned,
    ]
    if boundary is None:
        while True:
            boundary = "=_ferry_" + secrets.token_hex(12)
            if not any(b"--" + boundary.encode("ascii") in part for part in parts):
                break
    elif any(b"--" + boundary.encode("ascii") in part for part in parts):
        raise ValueError("boundary occurs in the report's content")

    head = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        _field("To", f"<{_sender_for_header(envelope.sender)}>", folded=False),
        _field("Subject", _subject(wanted)),
        _field("Date", rfc5322_date(now)),
        _field("Message-ID", f"<{int(now * 1000)}.{secrets.token_hex(8)}@{mta}>", folded=False),
    ]
    message_id = envelope.message_id.strip()
    if message_id.isascii() and _MSG_ID.fullmatch(message_id) and len(message_id) <= MAX_WORD:
        # RFC 3834 §3.1.5: a response names the message it answers.
        head.append(_field("In-Reply-To", message_id, folded=False))
        head.append(_field("References", message_id, folded=False))
    head += [
        # RFC 3834 §5: a DSN is an automatic response.
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
    ]
    delimiter = b"\r\n--" + boundary.encode("ascii")
    out = [
        "".join(head).encode("utf-8"),
        b"\r\nThis is a MIME-encapsulated message.\r\n",
    ]
    for part in parts:
        # RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter.
        out.append(delimiter + b"\r\n" + part)
    out.append(delimiter + b"--\r\n")
    return b"".join(out)

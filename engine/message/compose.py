"""Build RFC 5322 / MIME messages for the injection API, and put raw ones in shape.

:func:`compose` builds one message from a :class:`Structured` description with the
standard library's ``email`` package (``EmailMessage``, SMTP policy with 7bit transfer
encodings: RFC 2047 encoded words for non-ASCII header text, quoted-printable or base64
bodies chosen by the package's own rule, multipart/alternative for text + html inside
multipart/mixed when there are attachments).  The result is 7bit-clean, so any next hop
takes it (no 8BITMIME needed).

:class:`Composer` is the same message for many recipients with ``{{name}}`` placeholders
in the subject, text and html.  The package takes about a millisecond per message, too slow
for a request of thousands of personalised recipients, so the composer builds the message
once with markers where the per-recipient pieces go, and per recipient encodes only those
pieces (the subject field, each templated body with its Content-Transfer-Encoding, To:
and Message-ID:) with the package's own encoders, the ones ``EmailMessage`` calls.  The
unit tests hold it to byte equality of the decoded parts against :func:`compose`.

:func:`canonical` turns raw content to CRLF line ends (RFC 5322 §2.3) and
:func:`complete` adds the Date: and Message-ID: a submission server may add (RFC 6409
§8.2, §8.3).

No I/O here; every error is a :class:`ComposeError` naming the request's field.
"""

from __future__ import annotations

import base64
import binascii
import email.contentmanager
import email.policy
import email.utils
import html as html_lib
import os
import random
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Final

from engine.message.fields import rfc5322_date

__all__ = [
    "POLICY", "Attachment", "ComposeError", "Composer", "Structured", "base64_content",
    "canonical", "check_structured", "complete", "compose", "date_value", "message_id",
    "substitute",
]

#: SMTP line ends, and 7bit transfer encodings only (RFC 6152 not needed by the next hop).
POLICY: Final = email.policy.SMTP.clone(cte_type="7bit")

_UTF8_POLICY: Final = POLICY.clone(utf8=True)
#: The policy's line length (RFC 5322 §2.1.1: 78), past which a body is encoded.
_MAX_LINE: Final[int] = POLICY.max_line_length or 78

#: ``{{name}}``, spaces allowed inside the braces.
PLACEHOLDER: Final = re.compile(r"\{\{\s*([A-Za-z0-9_.-]{1,64})\s*\}\}")

#: Fields the composer writes itself: a ``headers`` entry may not set them.
OWN_FIELDS: Final = frozenset({"content-type", "content-transfer-encoding", "mime-version",
                               "content-disposition"})

# RFC 5322 §3.6.5 ftext: printable US-ASCII but ":".
_FIELD_NAME: Final = re.compile(r"[!-9;-~]{1,76}")
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


class ComposeError(ValueError):
    """What is wrong, and the request field it is in (``field``, a dotted path)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    #: "type/subtype", e.g. "application/pdf"
    content_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Structured:
    """A message described by its parts (the structured form of the injection API)."""

    #: The From: field: an address, or "Name <address>".
    sender: str
    subject: str = ""
    text: str | None = None
    html: str | None = None
    #: Other header fields, in order (To:, Cc:, Reply-To:, List-Unsubscribe: ...).
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()

    def placeholders(self) -> frozenset[str]:
        """The names of the placeholders in the subject, text and html."""
        found: set[str] = set()
        for template in (self.subject, self.text, self.html):
            if template:
                found.update(PLACEHOLDER.findall(template))
        return frozenset(found)

    def header(self, name: str) -> bool:
        """Whether ``headers`` sets field ``name``."""
        return any(n.lower() == name.lower() for n, _ in self.headers)


def substitute(template: str, values: Mapping[str, str], escape: bool = False) -> str:
    """``template`` with each ``{{name}}`` replaced by ``values[name]``, HTML-escaped when
    ``escape`` (a value is text, never markup)."""
    if "{{" not in template:
        return template
    if escape:
        return PLACEHOLDER.sub(lambda m: html_lib.escape(values[m.group(1)]), template)
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


#: The msg-id's random bits: a generator seeded from os.urandom once (again in a forked
#: child), not os.urandom per message.  A msg-id must be unique (RFC 5322 §3.6.4), not
#: secret, and os.urandom releases the GIL at every call: a thread building 10,000
#: personalised messages then waits for the loop's thread 10,000 times.
_ID_RANDOM: Final = random.Random()
os.register_at_fork(after_in_child=_ID_RANDOM.seed)


def message_id(hostname: str) -> str:
    """A new msg-id, unique by time and 64 random bits (RFC 5322 §3.6.4)."""
    return f"<{int(time.time() * 1000)}.{_ID_RANDOM.getrandbits(64):016x}@{hostname}>"


def _message_id_field(hostname: bytes) -> bytes:
    """The Message-ID: field with a new :func:`message_id` (``hostname`` encoded), formatted
    as bytes at once: once per recipient of a bulk request."""
    return b"Message-ID: <%d.%016x@%s>\r\n" % (int(time.time() * 1000),
                                                _ID_RANDOM.getrandbits(64), hostname)


def date_value(now: float | None = None) -> str:
    """RFC 5322 §3.3 date-time in UTC, "+0000" (never "-0000": the zone is known);
    formatted once a second (engine.message.fields: the Received field's date)."""
    return rfc5322_date(time.time() if now is None else now)


def check_structured(spec: Structured) -> None:
    """Raise ComposeError for what the package would refuse or silently spoil."""
    for i, (name, value) in enumerate(spec.headers):
        where = f"headers.{name}" if _FIELD_NAME.fullmatch(name) else f"headers[{i}]"
        if not _FIELD_NAME.fullmatch(name):
            raise ComposeError(where, "is not a header field name (RFC 5322 §3.6.8)")
        if name.lower() in OWN_FIELDS:
            raise ComposeError(where, "is written by the composer from text, html and "
                                      "attachments; it cannot be set")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ComposeError(where, "must not hold CR, LF or NUL")
    if any(c in spec.subject for c in "\r\n\0"):
        raise ComposeError("subject", "must not hold CR, LF or NUL")
    for i, attachment in enumerate(spec.attachments):
        main, _, sub = attachment.content_type.partition("/")
        if not (main and sub) or not _FIELD_NAME.fullmatch(main + sub) or "/" in sub:
            raise ComposeError(f"attachments[{i}].content_type",
                               'must be "type/subtype" (e.g. "application/pdf")')
        if main.lower() in ("multipart", "message"):
            raise ComposeError(f"attachments[{i}].content_type",
                               f"{main}/* cannot be attached as content")
        if not attachment.filename or any(c in attachment.filename for c in "\r\n\0/\\"):
            raise ComposeError(f"attachments[{i}].filename",
                               "must be a file name without CR, LF, NUL or slashes")


def _build(spec: Structured, subject: str, text: str | None, html: str | None, to: str,
           msgid: str, date: str) -> EmailMessage:
    # RFC 6532 §3.2: a non-ASCII address cannot be an encoded word; such a message is
    # SMTPUTF8 and its header section UTF-8 (the bodies stay 7bit either way).
    msg = EmailMessage(policy=POLICY if spec.sender.isascii() else _UTF8_POLICY)
    try:
        if not spec.header("From"):
            msg["From"] = spec.sender
        if to:
            msg["To"] = to
        msg["Subject"] = subject
        if not spec.header("Date"):
            msg["Date"] = date
        if not spec.header("Message-ID"):
            msg["Message-ID"] = msgid
        for name, value in spec.headers:
            msg[name] = value
    except (ValueError, TypeError, IndexError) as exc:
        raise ComposeError("headers", f"a header field is not valid: {exc}") from None
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content("")
    for a in spec.attachments:
        main, _, sub = a.content_type.partition("/")
        msg.add_attachment(a.content, maintype=main, subtype=sub, filename=a.filename)
    return msg


def compose(spec: Structured, *, to: str = "", msgid: str = "", date: str = "",
            values: Mapping[str, str] | None = None, hostname: str = "localhost") -> bytes:
    """One whole message (CRLF), built by the ``email`` package; ``to`` "" leaves To: out
    (unless ``headers`` has one), ``values`` fill the placeholders."""
    check_structured(spec)
    values = values or {}
    subject = substitute(spec.subject, values)
    text = substitute(spec.text, values) if spec.text is not None else None
    html = substitute(spec.html, values, escape=True) if spec.html is not None else None
    msg = _build(spec, subject, text, html, to, msgid or message_id(hostname),
                 date or date_value())
    return msg.as_bytes()


def _encoded_body(text: str) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding, body) of a text part, as ``EmailMessage.set_content``
    encodes it under :data:`POLICY`: the package's own choice and encoder."""
    if text.isascii() and "\r" not in text:
        # The package's first choice, without its detour through bytes: ASCII lines of at
        # most max_line_length characters are sent as they are, "7bit", each line ended.
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        if max(map(len, lines), default=0) <= _MAX_LINE:
            return b"7bit", ("\r\n".join(lines) + "\r\n").encode("ascii")
        if _qp_as_is(text):
            return _soft_wrapped(lines)
    return _package_body(text)


def _package_body(text: str) -> tuple[bytes, bytes]:
    # email.contentmanager.set_text_content calls this very function (Python 3.6+).
    cte, data = email.contentmanager._encode_text(  # type: ignore[attr-defined]
        text, "utf-8", None, POLICY)
    return cte.encode("ascii"), data.replace("\n", "\r\n").encode("ascii")


def _qp_as_is(text: str) -> bool:
    """Whether quoted-printable writes ASCII ``text`` as it is but for soft line breaks:
    no "=", no control but TAB and LF, no white space ending a line (RFC 2045 §6.7 rules
    1-3; email.quoprimime's body map).  String methods, not a regular expression: this
    runs for each templated part of each recipient."""
    flat = text.replace("\n", "").replace("\t", " ")
    return ("=" not in flat and flat.isprintable() and " \n" not in text
            and "\t\n" not in text and not text.endswith((" ", "\t")))


def _soft_wrapped(lines: list[str]) -> tuple[bytes, bytes]:
    """What :func:`email.contentmanager._encode_text` makes of ASCII ``lines`` of which
    some are too long and none needs a character quoted (:func:`_qp_as_is`): the same
    bytes (email.quoprimime.body_encode's soft line breaks, "=" after max_line_length - 1
    characters), without its character-by-character work (a bulk request's html part is
    often one long line).  test_compose holds it byte-equal to the package's.

    Always quoted-printable: the package takes base64 when its sniff of the first ten
    lines is longer as quoted-printable, and here it never is: a line of L characters
    gains at most L / 77 "=" and keeps its line end, 78/77 of the text and one octet a
    line, while base64 writes 4/3 of the text and of its CRLFs (binascii.b2a_base64)."""
    return b"quoted-printable", "".join([_soft_line(line) + "\r\n" for line in lines]
                                       ).encode("ascii")


#: Characters a quoted-printable line holds before its soft break "=" (max_line_length
#: less the "="): the first break of a line comes after this many.
_QP_WIDTH: Final = _MAX_LINE - 1


def _soft_line(line: str) -> str:
    """One line of :func:`_soft_wrapped`: with its soft breaks, without its line end."""
    # body_encode's loop: a break while at least max_line_length + 1 characters are left.
    start, last = 0, len(line) - 1 - _MAX_LINE
    if last < 0:
        return line
    out: list[str] = []
    while start <= last:
        out.append(line[start:start + _QP_WIDTH] + "=")
        start += _QP_WIDTH
    out.append(line[start:])
    return "\r\n".join(out)


class _Template:
    """A text cut at its placeholders once, so that filling it is a join."""

    __slots__ = ("names", "pieces")

    def __init__(self, text: str) -> None:
        parts = PLACEHOLDER.split(text)
        #: literal, name, literal, name, ..., literal
        self.pieces = parts[0::2]
        self.names = parts[1::2]

    @classmethod
    def of(cls, pieces: list[str], names: list[str]) -> _Template:
        """A template from its pieces and names (see ``pieces``)."""
        template = cls.__new__(cls)
        template.pieces, template.names = pieces, names
        return template

    def fill(self, values: Mapping[str, str], escape: bool = False) -> str:
        pieces = self.pieces
        if len(pieces) == 2:  # one placeholder, the common template: no list, no loop
            value = values[self.names[0]]
            return pieces[0] + (html_lib.escape(value) if escape else value) + pieces[1]
        out = [pieces[0]]
        for i, name in enumerate(self.names):
            value = values[name]
            out.append(html_lib.escape(value) if escape else value)
            out.append(pieces[i + 1])
        return "".join(out)


#: What html.escape replaces (with quote=True): a value without any is its own escape.
_HTML_SPECIALS: Final = frozenset("&<>\"'")


def _escaped(value: str) -> str:
    """``html.escape(value)``, without its five replacements when none applies (a value
    of a bulk request's html part, once per recipient)."""
    return html_lib.escape(value) if not _HTML_SPECIALS.isdisjoint(value) else value


class _Body:
    """A templated text part whose encoding (:func:`_encoded_body`) is worked out once
    for what does not depend on the values: the template with its line ends already
    CRLF, the length of each line without its values, and whether its literal text lets
    quoted-printable write it as it is (:func:`_qp_as_is`).  Per recipient: the values
    checked, the lines holding one measured, one fill.

    That holds while every value is "plain": non-empty printable ASCII (no CR, LF or TAB:
    the lines stay the template's lines, and an empty value cannot leave an empty last
    line or white space before a line end).  For quoted-printable the values must also
    hold no "=" and not end in a space (RFC 2045 §6.7 rules 1 and 3).  Any other value
    takes :func:`_encoded_body` on the whole filled text; test_compose holds both to the
    same bytes for any template and values."""

    __slots__ = ("crlf", "escape", "longest", "measured", "names", "qp", "qp_lines",
                 "template")

    def __init__(self, text: str, escape: bool) -> None:
        self.template = _Template(text)
        self.escape = escape
        self.names = tuple(dict.fromkeys(self.template.names))
        literal = "x".join(self.template.pieces)  # "x": a plain value
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        #: the text as _encoded_body's 7bit branch writes it (values aside); None: no
        #: shortcut (a placeholder across a line end, or literal text that is not ASCII)
        self.crlf: _Template | None = _Template("\r\n".join(lines) + "\r\n")
        if (not literal.isascii() or "\r" in literal
                or any("\n" in m.group(0) for m in PLACEHOLDER.finditer(text))):
            self.crlf = None
        cut = [_Template(line) for line in lines]
        #: the longest line without a placeholder, and (literal length, names) of the others
        self.longest = max((len(line) for line in lines if not PLACEHOLDER.search(line)),
                           default=0)
        self.measured = [(sum(map(len, t.pieces)), tuple(t.names)) for t in cut if t.names]
        self.qp = _qp_as_is(literal)
        #: each line for quoted-printable as it is: the line up to the end of its last
        #: placeholder (a template; "" for a line without one), the literal text after
        #: it, and that text with its soft breaks by the column it starts at (:meth:`_qp`)
        self.qp_lines: list[tuple[_Template, str, dict[int, str]]] = [
            (_Template.of([*t.pieces[:-1], ""], t.names), t.pieces[-1], {}) for t in cut]

    def encode(self, values: Mapping[str, str]) -> tuple[bytes, bytes]:
        """(Content-Transfer-Encoding, body) of the part filled with ``values``."""
        crlf = self.crlf
        if crlf is None:
            return _encoded_body(self.template.fill(values, self.escape))
        filled = ({name: _escaped(values[name]) for name in self.names}
                  if self.escape else values)
        qp = self.qp  # and no value breaks quoted-printable as it is (RFC 2045 §6.7)
        for name in self.names:
            value = filled[name]
            if not (value and value.isascii() and value.isprintable()):
                return _encoded_body(self.template.fill(values, self.escape))
            if "=" in value or value[-1] == " ":
                qp = False
        longest = self.longest
        for size, names in self.measured:
            for name in names:
                size += len(filled[name])
            if size > longest:
                longest = size
        if longest <= _MAX_LINE:
            return b"7bit", crlf.fill(filled).encode("ascii")
        if qp:
            return b"quoted-printable", self._qp(filled).encode("ascii")
        return _encoded_body(self.template.fill(values, self.escape))

    def _qp(self, filled: Mapping[str, str]) -> str:
        """:func:`_soft_wrapped` of the text filled with ``filled`` (plain values that
        quoted-printable writes as they are), line by line: the soft breaks of a line's
        literal text after its last placeholder depend only on the column it starts at,
        while that is within the line's first break (RFC 2045 §6.7 rule 5; the package
        breaks after :data:`_QP_WIDTH` characters), so they are worked out once per
        column, not per recipient (a bulk request's html part is often one long line, a
        value near its start)."""
        out: list[str] = []
        for head, tail, wrapped in self.qp_lines:
            start = head.fill(filled) if head.names else ""
            column = len(start)
            rest = wrapped.get(column)
            if rest is None:
                if column > _QP_WIDTH:  # a break before the literal text: the whole line
                    out.append(_soft_line(start + tail))
                    continue
                # (at most _QP_WIDTH + 1 columns a line: the cache is bounded)
                rest = wrapped[column] = _soft_line("x" * column + tail)[column:]
            out.append(start + rest)
        out.append("")
        return "\r\n".join(out)


class Composer:
    """One :class:`Structured` message rendered for many recipients (see the module
    docstring): each rendered message gets the To: :meth:`render` is given (unless
    ``headers`` has a To:), a Message-ID: of its own, and the request's Date:."""

    def __init__(self, spec: Structured, hostname: str, *, date: str = "") -> None:
        check_structured(spec)
        self.spec = spec
        self.hostname = hostname
        #: the domain of each message's Message-ID: (as message_id() would encode it)
        self._host = hostname.encode()
        self.date = date or date_value()
        self.names = spec.placeholders()
        mark = "ferry" + secrets.token_hex(8)
        self._marks = {slot: f"{mark}{slot}" for slot in ("s", "t", "h", "to", "id")}
        subject_slot = PLACEHOLDER.search(spec.subject) is not None
        text_slot = spec.text is not None and PLACEHOLDER.search(spec.text) is not None
        html_slot = spec.html is not None and PLACEHOLDER.search(spec.html) is not None
        to_slot = not spec.header("To")
        m = self._marks
        self._part_headers: dict[str, bytes] = {}
        self._templates: dict[str, _Template | _Body] = {
            slot: _Template(text) if slot == "s" else _Body(text, slot == "h")
            for slot, text in (("s", spec.subject), ("t", spec.text), ("h", spec.html))
            if text is not None}
        skeleton = _build(
            spec, m["s"] if subject_slot else spec.subject,
            m["t"] if text_slot else spec.text, m["h"] if html_slot else spec.html,
            f"{m['to']}@ferry.invalid" if to_slot else "",
            f"<{m['id']}@ferry.invalid>", self.date).as_bytes()
        self.boundaries = re.findall(rb'boundary="([^"]+)"', skeleton)
        # The skeleton cut at each slot: pieces[i], slot i, pieces[i+1], ...
        spans: list[tuple[int, int, str]] = []
        for slot, pattern in (
            ("s", rb"Subject: %s\r\n" % m["s"].encode()),
            ("to", rb"To: %s@ferry\.invalid\r\n" % m["to"].encode()),
            ("id", rb"Message-ID: <%s@ferry\.invalid>\r\n" % m["id"].encode()),
            ("t", rb"Content-Transfer-Encoding: 7bit\r\n((?:[^\r\n]+\r\n)*)\r\n%s\r\n"
             % m["t"].encode()),
            ("h", rb"Content-Transfer-Encoding: 7bit\r\n((?:[^\r\n]+\r\n)*)\r\n%s\r\n"
             % m["h"].encode()),
        ):
            found = re.search(pattern, skeleton)
            if found is not None:
                spans.append((found.start(), found.end(), slot))
                if slot in ("t", "h"):
                    self._part_headers[slot] = found.group(1)
        spans.sort()
        self._pieces: list[bytes] = []
        self._slots: list[str] = []
        at = 0
        for start, end, slot in spans:
            self._pieces.append(skeleton[at:start])
            self._slots.append(slot)
            at = end
        self._pieces.append(skeleton[at:])
        #: (literal piece, slot, its template, a body part's other header lines with the
        #: line ends around them) in order
        self._steps: list[tuple[bytes, str, _Template | _Body | None, bytes]] = [
            (self._pieces[i], slot, self._templates.get(slot) if slot in ("s", "t", "h") else None,
             b"\r\n" + self._part_headers.get(slot, b"") + b"\r\n")
            for i, slot in enumerate(self._slots)]

    def size_bound(self, longest_value: int) -> int:
        """An upper bound of a rendered message's size when no value is longer than
        ``longest_value`` characters: a caller checks its limits before rendering any."""
        spec = self.spec
        templated = 0
        for slot in self._slots:
            template = {"s": spec.subject, "t": spec.text, "h": spec.html}.get(slot)
            if template is not None:
                templated += len(template) + longest_value * len(PLACEHOLDER.findall(template))
        # A character becomes at most 12 octets: 6 as an HTML entity, or 4 UTF-8 octets
        # that quoted-printable writes as 12; line breaks and encoded-word framing add
        # less than a tenth.  To: holds one address (RFC 5321 §4.5.3.1.3: 256 octets at
        # most), in UTF-8 at most 4 octets a character; Message-ID: is ours, short.
        return sum(map(len, self._pieces)) + 14 * templated + 2 * 1024

    def missing(self, values: Mapping[str, str]) -> list[str]:
        """The placeholders ``values`` has no value for."""
        return sorted(n for n in self.names if n not in values)

    def render(self, values: Mapping[str, str], to: str) -> bytes:
        """The message for ``values`` (every placeholder's value) and recipient(s) ``to``
        (the To: field's value)."""
        # Once per recipient of a bulk request: every lookup that does not depend on the
        # recipient was made in __init__ (self._steps).
        out: list[bytes] = []
        append = out.append
        for piece, slot, template, part_head in self._steps:
            append(piece)
            if type(template) is _Body:  # a templated body: "t" or "h"
                cte, data = template.encode(values)
                for boundary in self.boundaries:
                    if boundary in data:
                        # A value that holds a boundary line: the package picks another.
                        return compose(self.spec, to=to, date=self.date, values=values,
                                       hostname=self.hostname)
                out += (b"Content-Transfer-Encoding: ", cte, part_head, data)
            elif slot == "id":
                append(_message_id_field(self._host))
            elif slot == "to":
                # A non-ASCII address cannot be an encoded word: UTF-8 (RFC 6532 §3.2).
                append(_UTF8_POLICY.fold_binary("To", to) if not to.isascii()
                       or len(to) > 70 else b"To: %s\r\n" % to.encode())
            else:  # "s"
                assert type(template) is _Template
                subject = template.fill(values)
                if subject.isascii() and subject.isprintable() and len(subject) < 68:
                    append(b"Subject: %s\r\n" % subject.encode())
                else:  # RFC 2047 words, folding: the package's header machinery
                    append(POLICY.header_factory("Subject", subject).fold(
                        policy=POLICY).encode("ascii"))
        append(self._pieces[-1])
        return b"".join(out)


def canonical(content: bytes, bare_eol: str) -> bytes:
    """``content`` with CRLF line ends and a CRLF at its end (RFC 5322 §2.3).

    LF-only text (what JSON carries from a Unix program) becomes CRLF.  A lone CR, or LF
    mixed with CRLF, is what smuggling looks like (DESIGN.md wire rules): ``bare_eol``
    "reject" raises ComposeError, "normalize" makes every CR, LF and CRLF one CRLF."""
    if b"\r" not in content:
        out = content.replace(b"\n", b"\r\n")
    elif b"\r" not in (rest := content.replace(b"\r\n", b"")) and b"\n" not in rest:
        out = content
    elif bare_eol == "reject":
        raise ComposeError("content", "has a bare CR, or LF line ends mixed with CRLF "
                                      '(http.bare_eol = "reject")')
    else:
        out = _LINE_END.sub(b"\r\n", content)
    return out if out.endswith(b"\r\n") else out + b"\r\n"


#: A Date: or Message-ID: field of a header section (canonical CRLF text, so a line
#: starts at its start or after an LF): the name in any case before the colon (RFC 5322
#: §2.2: WSP may precede the colon only in obsolete syntax, §4.5).  One pass finds both.
_DATE_OR_ID: Final = re.compile(rb"^(date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def complete(message: bytes, hostname: str) -> bytes:
    """``message`` (canonical CRLF) with Date: and Message-ID: added on top when it has
    none (RFC 5322 §3.6: both are required or should be; RFC 6409 §8.2, §8.3: the
    submission server may add them)."""
    if message.startswith(b"\r\n"):
        head = b""  # an empty header section: the body starts at once
    else:
        end = message.find(b"\r\n\r\n")
        head = message if end < 0 else message[:end]
    added: list[bytes] = []
    found = {name.lower() for name in _DATE_OR_ID.findall(head)}
    if b"date" not in found:
        added.append(b"Date: %s\r\n" % date_value().encode())
    if b"message-id" not in found:
        added.append(b"Message-ID: %s\r\n" % message_id(hostname).encode())
    return b"".join(added) + message if added else message


def base64_content(value: str, where: str) -> bytes:
    """An attachment's content from its base64 text (RFC 4648 §4, line breaks allowed)."""
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ComposeError(where, "is not base64 (RFC 4648)") from None


"""The hook API for policy agents: the values an agent sees and the verdict it returns.

Policy enters the pipeline only through here (DESIGN.md, "Policy agents").  An agent is an
object with one method per stage it cares about; the stages are:

========  ==================================================  ============================
stage     called                                              with
========  ==================================================  ============================
connect   when a client connects, before the greeting         ``(session)``
helo      at each HELO/EHLO                                   ``(session)``
auth      after each AUTH exchange that gave a user name      ``(session, user, ok)``
mail      at MAIL FROM                                        ``(session, tx)``
rcpt      at each RCPT TO (relay control is the first agent)  ``(session, tx, rcpt)``
data      at the end of DATA/BDAT, the whole message read     ``(session, tx, message)``
sign      before the message is stored, for mail the client   ``(session, tx, message)``
          may relay (an outbound message): DKIM signing
========  ==================================================  ============================

At the auth stage ``ok`` says whether the password was right; a REJECT or TEMPFAIL verdict
ends the session with its reply (421 for a tempfail: a lockout), and the stage may wait
before answering (a delay after a failure slows a password guesser).  ``disconnect(session)``
(plain, returns None) is called once when the connection is gone, for agents that count
what is open.

A method returns a :class:`Verdict`, or an awaitable of one when it has to wait (DNS, a
scanner's socket).  Returning the verdict directly keeps the cheap agents (relay control)
off the task machinery: the chain only becomes async at the first agent that awaits.  An
agent that does not define a stage's method is never called at that stage.

The values handed in are views: :class:`Session` is frozen (the session makes a new one
when its state changes: HELO, STARTTLS, AUTH), :class:`Transaction` lives from MAIL to the
end of the message and carries ``notes``, the one place an agent may keep what it learned
at an earlier stage of the same transaction (SPF at MAIL, used by DMARC at data), keyed by
the agent's name.  :class:`Message` gives the header fields and the body without copying
the body.  An agent never writes to a socket or the queue, never blocks the event loop
(CPU work of more than a fraction of a millisecond goes to a thread), and never raises on
purpose: an exception or a blown time budget is logged by the chain and counts as a
failure, which the agent's ``fail`` setting turns into accept (open) or a temporary
failure (closed).

This module must never import the session, the queue or asyncio's transports: it is the
contract between them and the agents.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

from engine.message.canon import field_items
from engine.message.headers import scan_headers

if TYPE_CHECKING:
    from engine.protocol.command import Command

__all__ = [
    "ACCEPT",
    "STAGES",
    "Action",
    "Agent",
    "Effects",
    "HeaderChange",
    "Message",
    "MethodResult",
    "Reply",
    "Session",
    "Stage",
    "Transaction",
    "Verdict",
    "add_header",
    "discard",
    "hold",
    "refusal",
    "reject",
    "remove_header",
    "replace_header",
    "tempfail",
]

Reply = tuple[int, str, str]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Stage(enum.Enum):
    # Members are singletons compared by identity, so the identity hash serves; Enum's
    # own hashes the name in Python (~0.15 µs: the chain looks a stage up, and checks a
    # verdict's action, several times a message).
    __hash__ = object.__hash__

    CONNECT = "connect"
    HELO = "helo"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    SIGN = "sign"


#: The stages in the order a message meets them.
STAGES: Final = tuple(Stage)


class Action(enum.Enum):
    __hash__ = object.__hash__  # as Stage's

    #: Go on (the header changes of the verdict still apply).
    ACCEPT = "accept"
    #: Refuse with the verdict's 5xx reply; nothing is stored.
    REJECT = "reject"
    #: Refuse with the verdict's 4xx reply: the client tries again later.
    TEMPFAIL = "tempfail"
    #: Answer 250 and drop the message (it is logged, never delivered).
    DISCARD = "discard"
    #: Store the message held (quarantine): never delivered or expired until an operator
    #: releases it (``ferry queue release``).  Later agents still run and may reject.
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """One change to the message's header block, applied at the end of data (changes of
    earlier stages wait in the transaction until then).

    ``add`` puts ``name: value`` at the top of the header (RFC 8601 §5 and RFC 5321 §4.4:
    trace-like fields are prepended); ``replace`` rewrites the first field of that name in
    place and removes the others (or adds it when there is none); ``remove`` removes every
    field of that name whose value ``match`` accepts (every one when ``match`` is None).
    ``value`` is the field body after "name:", unfolded or folded with CRLF + WSP; any
    other CR or LF in it makes the change ignored and logged (DESIGN.md wire rules).
    """

    op: Literal["add", "replace", "remove"]
    name: str
    value: str = ""
    match: Callable[[str], bool] | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an agent decided.  ``reply`` is the SMTP reply for REJECT and TEMPFAIL (the
    chain fills in a default when it is None); ``reason`` goes to the logs and the tracking
    log (DISCARD, HOLD, and every refusal)."""

    action: Action = Action.ACCEPT
    reply: Reply | None = None
    headers: tuple[HeaderChange, ...] = ()
    reason: str = ""


#: The verdict of an agent with nothing to say.
ACCEPT: Final = Verdict()

#: The replies of a refusing verdict that brought none of its own.
DEFAULT_REJECT: Final[Reply] = (550, "5.7.1", "Rejected by policy")
DEFAULT_TEMPFAIL: Final[Reply] = (451, "4.7.1", "Temporarily rejected by policy, try again later")


def refusal(verdict: Verdict) -> Reply:
    """The SMTP reply of a REJECT or TEMPFAIL verdict: its own, else the default."""
    if verdict.reply is not None:
        return verdict.reply
    return DEFAULT_REJECT if verdict.action is Action.REJECT else DEFAULT_TEMPFAIL


def reject(text: str, code: int = 550, enhanced: str = "5.7.1", reason: str = "") -> Verdict:
    """Refuse with a permanent reply (``code`` 5xx)."""
    if not 500 <= code <= 599:
        raise ValueError(f"reject needs a 5xx code, not {code}")
    return Verdict(Action.REJECT, (code, enhanced, text), reason=reason or text)


def tempfail(text: str, code: int = 451, enhanced: str = "4.7.1", reason: str = "") -> Verdict:
    """Refuse with a temporary reply (``code`` 4xx)."""
    if not 400 <= code <= 499:
        raise ValueError(f"tempfail needs a 4xx code, not {code}")
    return Verdict(Action.TEMPFAIL, (code, enhanced, text), reason=reason or text)


def discard(reason: str) -> Verdict:
    return Verdict(Action.DISCARD, reason=reason)


def hold(reason: str, headers: tuple[HeaderChange, ...] = ()) -> Verdict:
    return Verdict(Action.HOLD, headers=headers, reason=reason)


def add_header(name: str, value: str) -> Verdict:
    """Accept, adding ``name: value`` at the top of the header."""
    return Verdict(headers=(HeaderChange("add", name, value),))


def replace_header(name: str, value: str) -> Verdict:
    return Verdict(headers=(HeaderChange("replace", name, value),))


def remove_header(name: str, match: Callable[[str], bool] | None = None) -> Verdict:
    return Verdict(headers=(HeaderChange("remove", name, match=match),))


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One authentication method's result, as RFC 8601 §2.2 writes a "resinfo":
    ``method=result (reason) ptype.property=value ...``.  The verifiers return these and the
    Authentication-Results field is built from them; DMARC reads the identifiers it aligns
    from ``props`` (``smtp.mailfrom``, ``smtp.helo``, ``header.d``)."""

    method: str
    result: str
    reason: str = ""
    #: (ptype.property, value) pairs, e.g. ("smtp.mailfrom", "example.com").
    props: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str:
        """The value of property ``name`` ("" when absent)."""
        for key, value in self.props:
            if key == name:
                return value
        return ""


@dataclass(frozen=True, slots=True)
class Session:
    """What is known of the client connection (frozen; the session hands a new one to
    the agents after HELO, STARTTLS and AUTH)."""

    #: "smtp-1f" for SMTP sessions, "http-…" for an injection request.
    session_id: str
    #: The receive connector's name.
    connector: str
    client_ip: IPAddress
    #: The HELO/EHLO argument as given, "" before it.
    helo: str = ""
    esmtp: bool = False
    tls: bool = False
    #: "version=... cipher=..." of the TLS session, "" without TLS.
    tls_info: str = ""
    #: The authenticated user ("" without AUTH; an injection token's name over HTTP).
    auth_user: str = ""
    #: The client may relay (a relay network, or authenticated and allowed): its mail is
    #: outbound, so it is signed and not verified against its own domain's policies.
    may_relay: bool = False
    #: "SMTP" or "HTTP".
    door: str = "SMTP"


@dataclass(slots=True, kw_only=True)
class Effects:
    """What verdicts before the end of data (connect, HELO, MAIL, RCPT) asked of the
    message: header changes, a hold, a discard.  Kept by the session, not by agents."""

    changes: list[HeaderChange] = field(default_factory=list)
    held: str = ""
    discarded: str = ""

    def note(self, verdict: Verdict) -> None:
        """Keep what an accepting verdict asks of the message."""
        if verdict.headers:
            self.changes.extend(verdict.headers)
        if verdict.action is Action.HOLD and not self.held:
            self.held = verdict.reason or "held"
        elif verdict.action is Action.DISCARD and not self.discarded:
            self.discarded = verdict.reason or "discarded"


@dataclass(slots=True)
class Transaction(Effects):
    """One mail transaction, from MAIL to the end of the message."""

    mail: Command
    #: The RCPT commands accepted so far (at the rcpt stage, not the one being decided).
    recipients: tuple[Command, ...] = ()
    #: Per-agent notes, keyed by the agent's name: what an agent learned at an earlier
    #: stage of this transaction.
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def sender(self) -> str:
        """The reverse path ("" for the null sender <>)."""
        return self.mail.mailbox


class Message:
    """The message at the end of data: canonical CRLF bytes, not dot-stuffed, without
    the Received field this server adds.  ``body`` is the very buffer the session read
    (never copied here: a scanner streams it from a memoryview)."""

    __slots__ = ("_fields", "_items", "_plain", "data", "header_end")

    def __init__(self, data: bytes) -> None:
        self.data = data
        #: Offset of the first octet after the empty line that ends the header (len(data)
        #: when there is no body).
        self.header_end = _header_end(data)
        self._fields: list[tuple[str, str]] | None = None
        self._items: list[tuple[bytes, bytes, int]] | None = None
        self._plain = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header(self) -> bytes:
        return self.data[: self.header_end]

    def body(self) -> memoryview:
        """The body after the header's empty line, as a view of the same buffer."""
        return memoryview(self.data)[self.header_end :]

    def fields(self) -> list[tuple[str, str]]:
        """Every header field as (name, raw value), in order: the value is what follows
        the colon, folding CRLFs kept (DKIM needs them as they are)."""
        if self._fields is None:
            self._fields = _split_fields(self.header)
        return self._fields

    def items(self) -> list[tuple[bytes, bytes, int]]:
        """Every header field as the compiled header scan finds it (engine.message.headers),
        (name lower-case, the field as it is without its CRLF, the offset of its value):
        what DKIM selects and canonicalises (engine.message.canon), made once a message."""
        if self._items is None:
            scan = scan_headers(self.data, self.header_end)
            self._items = field_items(self.data, scan.fields)
            # Where the scan reads the header as fields() does (a Hypothesis test in
            # tests/unit/test_agents_chain.py holds them equal): it ends at header_end,
            # nothing is malformed, and every line ends in CRLF (fields() splits at CRLF
            # only, the scan at a bare LF too): the scan says so, where counting CR, LF
            # and CRLF in the header cost ~1.1 µs a message.
            self._plain = (not scan.malformed and scan.end == self.header_end
                           and not scan.bare_line_ends)
        return self._items

    def get_all(self, name: str) -> list[str]:
        """The raw values of every field called ``name`` (any case), in order."""
        lower = name.lower()
        if self._fields is None and lower.isascii():
            # From the scan's items when the header is plain: DMARC's and the signer's
            # From without splitting every field into text (~4.5 against ~1 µs).
            items = self.items()
            if self._plain:
                key = lower.encode()
                return [raw[colon:].decode("utf-8", "surrogateescape")
                        for field_name, raw, colon in items if field_name == key]
        return [value for key, value in self.fields() if key.lower() == lower]

    def get(self, name: str) -> str | None:
        """The first field called ``name``, unfolded and stripped; None when absent."""
        values = self.get_all(name)
        if not values:
            return None
        return " ".join(values[0].replace("\r\n", " ").split())


def _header_end(data: bytes) -> int:
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


def _split_fields(header: bytes) -> list[tuple[str, str]]:
    text = header.decode("utf-8", "surrogateescape")
    fields: list[tuple[str, str]] = []
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\r\n" + line)
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append((name.rstrip(" \t"), value))
    return fields


class Agent:
    """The base of every agent: subclass it and define the stage methods you need.

    ``name`` is how the configuration lists the agent (``[[receive]] agents``) and how its
    log lines and its notes are keyed.  ``timeout`` is the time budget of one call; when a
    call raises or overruns it, ``fail_open`` decides: True accepts (the mail flows while
    the agent is down), False answers a temporary failure.  Both come from the agent's
    table in the configuration (``[agents.NAME] timeout``, ``fail``).

    Stage methods (define only those you need; see the module docstring)::

        def connect(self, session: Session) -> Verdict | Awaitable[Verdict]
        def helo(self, session: Session) -> Verdict | Awaitable[Verdict]
        def auth(self, session: Session, user: str, ok: bool) -> ...
        def mail(self, session: Session, tx: Transaction) -> Verdict | Awaitable[Verdict]
        def rcpt(self, session: Session, tx: Transaction, rcpt: Command) -> ...
        def data(self, session: Session, tx: Transaction, message: Message) -> ...
        def sign(self, session: Session, tx: Transaction, message: Message) -> ...

    and ``def disconnect(self, session: Session) -> None`` when the connection is gone.

    ``start`` runs once when the server starts (open pools, load files); ``stop`` at
    shutdown.  Neither may block the loop.
    """

    name: ClassVar[str] = "agent"
    #: Header changes made when a call fails and the agent fails open: the fields the agent
    #: would have written or vouched for (its result header, an Authentication-Results
    #: field with our authserv-id) are removed, so a copy the sender forged does not pass
    #: for the agent's word while it is down.
    fail_headers: tuple[HeaderChange, ...] = ()

    def __init__(self, *, timeout: float = 10.0, fail_open: bool = True) -> None:
        self.timeout = timeout
        self.fail_open = fail_open

    async def start(self) -> None:
        """Called once before the first session."""

    async def stop(self) -> None:
        """Called once at shutdown."""

    def stages(self) -> frozenset[Stage]:
        """The stages this agent defines a method for."""
        return frozenset(s for s in STAGES if callable(getattr(self, s.value, None)))


#: The signature of a stage method, for the chain's tables.
StageCall = Callable[..., "Verdict | Awaitable[Verdict]"]

"""Sans-I/O SMTP server connection: the sequencing rules of RFC 5321 and its extensions.

Theory of operation (the h11 shape).  The I/O glue in ``engine/server/`` owns the socket;
this module owns everything about what the bytes mean:

- ``receive_data(data)`` only buffers (``b""`` means the peer closed);
- ``next_event()`` returns the next :class:`Event`, or :data:`NEED_DATA`;
- events marked ``needs_reply`` are decisions for the application (accept this RCPT?
  store this message?): it answers with :meth:`ServerConnection.reply` before asking for
  the next event; every other event has already been answered here (syntax errors,
  commands out of sequence, limits) and is reported so it can be logged and counted;
- ``data_to_send()`` hands over the reply bytes queued so far.  The glue flushes when
  ``next_event`` returns NEED_DATA, which groups the replies of a pipelined command group
  into one write (RFC 2920 §3.2).

Security rules that live here (DESIGN.md "Wire rules"): only CRLF ends a line; DATA ends
only at CRLF.CRLF and bare CR/LF are rejected (or normalised); an oversize message or a
failed BDAT chunk is consumed to its end and never parsed as commands; input before the
greeting is refused; at STARTTLS every byte pipelined after the command is discarded and
the session forgets EHLO, AUTH and the envelope (RFC 3207 §4.2, CVE-2011-0411); a group
ender pipelined with more input is refused (RFC 2920 §3.1).

It must never import asyncio, socket, ssl, lmdb or logging, nor decide policy (who may
relay, which users exist): that is the application's answer to an event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from engine.protocol.command import Command, parse_command
from engine.protocol.errors import CommandError, LineTooLong
from engine.protocol.events import NEED_DATA, NeedData
from engine.protocol.reply import format_reply
from engine.protocol.wire import BARE_REJECT, BdatReader, DataDecoder, LineReader


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What this connection offers and its limits (every limit is a parameter, DESIGN.md)."""

    hostname: str = "localhost"
    #: RFC 5321 §4.5.3.1.4: a command line is 512 octets with its CRLF.
    max_command_line: int = 512
    #: RFC 4954 §4: an AUTH response line may be 12288 octets.
    max_auth_line: int = 12288
    #: RFC 5322 §2.1.1: 998 + CRLF; longer DATA lines are counted, the policy decides.
    max_text_line: int = 1000
    #: 0 = no limit; advertised as SIZE (RFC 1870).
    max_message_size: int = 0
    #: RFC 5321 §4.5.3.1.8 asks for at least 100.
    max_recipients: int = 100
    #: 4xx/5xx replies tolerated before 421 (reset by each accepted message).
    max_errors: int = 20
    bare_eol: str = BARE_REJECT
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    chunking: bool = True
    dsn: bool = True
    enhanced_status_codes: bool = True
    #: STARTTLS is offered (the glue has a certificate).
    starttls: bool = False
    #: MAIL is refused before STARTTLS (RFC 3207 §4: 530 5.7.0).
    require_tls: bool = False
    #: MAIL is refused before a successful AUTH (RFC 6409 §4.3, RFC 4954 §6: 530 5.7.0).
    require_auth: bool = False
    #: SASL mechanisms offered, e.g. ("PLAIN", "LOGIN").
    auth_mechanisms: tuple[str, ...] = ()
    #: AUTH only under TLS (RFC 4954 §4 advice for plaintext mechanisms).
    auth_requires_tls: bool = True
    #: The connection is TLS from the first byte (port 465, RFC 8314).
    implicit_tls: bool = False
    #: Refuse a group-ending command pipelined with more input (RFC 2920 §3.1).
    strict_pipelining: bool = True


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base class.  ``needs_reply`` events wait for :meth:`ServerConnection.reply`."""

    needs_reply = False


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """HELO or EHLO; a 250 reply gets the extension lines appended (EHLO only)."""

    needs_reply = True
    command: Command


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    needs_reply = True
    command: Command


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    needs_reply = True
    command: Command


@dataclass(frozen=True, slots=True)
class DataCommand(Event):
    """DATA with at least one accepted recipient: reply 354 to receive the message."""

    needs_reply = True


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """A whole message (DATA or last BDAT chunk): reply 250 only once it is durable."""

    needs_reply = True
    body: bytes
    size: int
    #: The transaction: its MAIL command and the RCPT commands that got a 2xx.
    mail: Command
    recipients: tuple[Command, ...]
    #: Lines longer than ``max_text_line`` (DATA only; RFC 5322 §2.1.1).
    long_lines: int = 0


@dataclass(frozen=True, slots=True)
class MessageRefused(Event):
    """The message was read to its end and refused here (oversize, bare CR/LF)."""

    reason: str
    code: int
    size: int


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """Reply 220 and then do the handshake and call ``tls_started()``."""

    needs_reply = True
    #: Plaintext bytes pipelined after the command, discarded (RFC 3207 §4.2).
    discarded: int = 0


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    """AUTH: reply 334 with a challenge, 235 on success, 535 on failure (RFC 4954)."""

    needs_reply = True
    mechanism: str
    initial: str | None


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """A client response line during AUTH (base64, not decoded here)."""

    needs_reply = True
    data: str


@dataclass(frozen=True, slots=True)
class Verify(Event):
    """VRFY or EXPN (RFC 5321 §3.5); 252 is the usual answer for a relay."""

    needs_reply = True
    command: Command


@dataclass(frozen=True, slots=True)
class Answered(Event):
    """A command answered here that changes nothing (NOOP, HELP, a non-last BDAT chunk)."""

    verb: str


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """RSET was answered 250; the transaction is gone."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT was answered 221; close after flushing."""


@dataclass(frozen=True, slots=True)
class Rejected(Event):
    """A command refused here (syntax, sequence, limits); the reply is already queued."""

    code: int
    enhanced: str
    text: str


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The session is over (peer EOF, QUIT, too many errors, early talker)."""

    reason: str


class State(enum.Enum):
    S_GREETING = "greeting"  # the 220 is not sent yet
    S_COMMAND = "command"
    S_REPLY = "reply"  # an event waits for the application's reply
    S_DATA = "data"
    S_BDAT = "bdat"
    S_AUTH = "auth"  # waiting for a SASL response line
    S_TLS = "tls"  # 220 to STARTTLS sent, handshake pending
    S_CLOSED = "closed"


#: RFC 2920 §3.1: these end a command group; anything pipelined after them is a violation.
_GROUP_ENDERS: Final = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "NOOP", "STARTTLS"})
_ESMTP_MAIL_PARAMS: Final = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"}

S221_BYE: Final = (221, "2.0.0", "Bye")
S250_OK: Final = (250, "2.0.0", "OK")
S250_RESET: Final = (250, "2.0.0", "Reset state")
S214_HELP: Final = (214, "2.0.0", "See RFC 5321")
S421_TOO_MANY_ERRORS: Final = (421, "4.7.0", "Too many errors, closing connection")
S501_AUTH_CANCELLED: Final = (501, "5.0.0", "Authentication cancelled")
S502_NOT_OFFERED: Final = (502, "5.5.1", "Command not implemented")
S503_HELLO_FIRST: Final = (503, "5.5.1", "Send HELO/EHLO first")
S503_NESTED_MAIL: Final = (503, "5.5.1", "Nested MAIL command")
S503_MAIL_FIRST: Final = (503, "5.5.1", "Need MAIL command")
S503_RCPT_FIRST: Final = (503, "5.5.1", "Need RCPT command")
S503_BDAT_STARTED: Final = (503, "5.5.1", "DATA not allowed after BDAT")
S503_AUTHENTICATED: Final = (503, "5.5.1", "Already authenticated")
S503_AUTH_IN_TRANSACTION: Final = (503, "5.5.1", "AUTH not allowed during a mail transaction")
S503_TLS_ACTIVE: Final = (503, "5.5.1", "TLS already active")
S452_TOO_MANY_RCPTS: Final = (452, "4.5.3", "Too many recipients")
S504_MECHANISM: Final = (504, "5.5.4", "Unrecognized authentication mechanism")
S530_TLS_FIRST: Final = (530, "5.7.0", "Must issue a STARTTLS command first")
S530_AUTH_REQUIRED: Final = (530, "5.7.0", "Authentication required")
# RFC 4954 §6: a response longer than the server's buffer for the exchange.
S500_AUTH_LINE: Final = (500, "5.5.6", "Authentication Exchange line is too long")
S538_ENCRYPTION: Final = (538, "5.7.11", "Encryption required for requested authentication")
S552_SIZE: Final = (552, "5.3.4", "Message size exceeds fixed maximum message size")
S554_NO_VALID_RCPTS: Final = (554, "5.5.1", "No valid recipients")
S554_EARLY_TALKER: Final = (554, "5.5.1", "Input before the greeting is not allowed")
S554_PIPELINING: Final = (554, "5.5.0", "Improper use of SMTP command pipelining")
S555_NOT_OFFERED: Final = (555, "5.5.4", "Parameter not offered")


@dataclass(slots=True)
class _Transaction:
    """One mail transaction (RFC 5321 §3.3); RSET, EHLO and STARTTLS throw it away."""

    mail: Command
    utf8: bool
    rcpts_tried: int = 0
    #: the RCPT commands that got a 2xx reply
    accepted: list[Command] = field(default_factory=list)

    @property
    def rcpts_accepted(self) -> int:
        return len(self.accepted)
    bdat: BdatReader | None = None


class ServerConnection:
    """One SMTP session seen from the server: bytes in, events out, replies in, bytes out."""

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self.settings = s = settings or ServerSettings()
        self.state = State.S_GREETING
        self._reader = LineReader(s.max_command_line)
        self._out: list[bytes] = []
        self._pending: Event | None = None
        self._data: DataDecoder | None = None
        self._eof = False
        self.helo: str | None = None
        self.esmtp = False
        self.tls = s.implicit_tls
        self.authenticated = False
        self.errors = 0
        self.transaction: _Transaction | None = None
        #: The command line behind the latest event, for the protocol log; secret when it
        #: was a SASL response (never logged as sent).
        self.last_line = b""
        self.last_line_secret = False
        # the BDAT chunk being read, and the reply it gets when refused (RFC 3030 §4)
        self._chunk: BdatReader | None = None
        self._chunk_error: tuple[int, str, str] | None = None

    # --- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        elif self.state is State.S_TLS:
            # RFC 3207 §4.2: plaintext after the 220 is not part of the TLS session.
            return
        elif self.state is State.S_DATA and self._data is not None and not self._reader.buffered:
            # The hot path: message bytes go straight to the decoder, no re-buffering.
            self._feed_body(self._data, data)
        elif self.state is State.S_BDAT and self._chunk is not None and not self._reader.buffered:
            self._feed_body(self._chunk, data)
        elif self.state is not State.S_CLOSED:
            self._reader.push(data)

    def send_greeting(self, text: str | None = None) -> None:
        """Queue the 220 greeting; input that came before it is refused."""
        if self.state is not State.S_GREETING:
            raise RuntimeError("greeting already sent")
        self.state = State.S_COMMAND
        if self._reader.buffered:
            self._reader.take_rest()
            self._close_with(*S554_EARLY_TALKER)
            return
        self._queue(220, "", text or f"{self.settings.hostname} ESMTP")

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA when the buffered input holds none."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self._pending).__name__} is waiting for reply()")
        state = self.state
        if state is State.S_CLOSED or state is State.S_TLS:
            return NEED_DATA
        if state is State.S_GREETING:
            return NEED_DATA if not self._eof else self._closed("peer closed")
        if state is State.S_DATA:
            return self._next_data_event()
        if state is State.S_BDAT:
            return self._next_bdat_event()
        try:
            line = self._reader.pop_line()
        except LineTooLong as exc:
            if state is State.S_AUTH:
                # RFC 4954 §4: any error ends the exchange; what follows is a command.
                self._end_auth_exchange()
                return self._reject(*S500_AUTH_LINE)
            return self._reject(exc.code, exc.enhanced, exc.text)
        if line is None:
            return self._closed("peer closed") if self._eof else NEED_DATA
        if state is State.S_AUTH:
            return self._auth_line(line)
        return self._command(line)

    # --- output ----------------------------------------------------------------------

    def reply(self, code: int, enhanced: str = "", text: str | list[str] = "") -> None:
        """Answer the event that waits; the state follows from the code."""
        event = self._pending
        if event is None:
            raise RuntimeError("no event is waiting for a reply")
        self._pending = None
        lines = [text] if isinstance(text, str) else list(text)
        positive = 200 <= code < 400
        self.state = State.S_COMMAND
        if isinstance(event, Hello) and code == 250:
            self._accept_hello(event.command)
            # The HELO/EHLO reply carries no enhanced code: its lines are keywords that
            # clients parse (RFC 5321 §4.1.1.1; RFC 2034 §3 covers only later replies).
            enhanced = ""
            if event.command.verb == "EHLO":
                lines += self.extensions()
        elif isinstance(event, MailFrom) and positive:
            mail = event.command
            self.transaction = _Transaction(mail, "SMTPUTF8" in mail.params)
        elif isinstance(event, RcptTo):
            if positive and self.transaction is not None:
                self.transaction.accepted.append(event.command)
        elif isinstance(event, DataCommand) and code == 354:
            self._data = DataDecoder(
                self.settings.max_message_size, self.settings.bare_eol, self.settings.max_text_line
            )
            self.state = State.S_DATA
            enhanced = ""
        elif isinstance(event, MessageReceived):
            self.transaction = None
            if positive:
                self.errors = 0
        elif isinstance(event, StartTLS) and code == 220:
            self.state = State.S_TLS
        elif isinstance(event, AuthStart | AuthResponse):
            if code == 334:
                self.state = State.S_AUTH
                self._reader.limit = self.settings.max_auth_line
                enhanced = ""
            elif code == 235:
                self.authenticated = True
        self._queue(code, enhanced, *lines)
        if code == 421:
            self.state = State.S_CLOSED
        elif code >= 400:
            self._count_error()

    def data_to_send(self) -> bytes:
        """Every reply queued since the last call, as one write."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The handshake after our 220 succeeded: start afresh (RFC 3207 §4.2)."""
        if self.state is not State.S_TLS:
            raise RuntimeError("tls_started() without a STARTTLS 220")
        self._reader.take_rest()
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.authenticated = False
        self.transaction = None
        self.state = State.S_COMMAND

    @property
    def closed(self) -> bool:
        return self.state is State.S_CLOSED

    def extensions(self) -> list[str]:
        """The EHLO keywords offered in the current state (RFC 5321 §4.1.1.1)."""
        s = self.settings
        ext: list[str] = []
        if s.pipelining:
            ext.append("PIPELINING")
        ext.append(f"SIZE {s.max_message_size}" if s.max_message_size else "SIZE")
        if s.eightbitmime:
            ext.append("8BITMIME")
        if s.smtputf8:
            ext.append("SMTPUTF8")
        if s.enhanced_status_codes:
            ext.append("ENHANCEDSTATUSCODES")
        if s.chunking:
            ext.append("CHUNKING")
        if s.dsn:
            ext.append("DSN")
        if s.starttls and not self.tls:
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(s.auth_mechanisms))
        return ext

    # --- internals -------------------------------------------------------------------

    def _queue(self, code: int, enhanced: str, *lines: str) -> None:
        if not self.settings.enhanced_status_codes:
            enhanced = ""
        self._out.append(format_reply(code, enhanced, list(lines) or [""]))

    def _await(self, event: Event) -> Event:
        self._pending = event
        self.state = State.S_REPLY
        return event

    def _reject(self, code: int, enhanced: str, text: str) -> Event:
        self._queue(code, enhanced, text)
        if code == 421 or self._count_error():
            return Closed("too many errors") if code != 421 else Closed(text)
        return Rejected(code, enhanced, text)

    def _count_error(self) -> bool:
        """Count a 4xx/5xx; at the limit queue 421 and close.  True when closed."""
        self.errors += 1
        if self.errors >= self.settings.max_errors:
            self._close_with(*S421_TOO_MANY_ERRORS)
            return True
        return False

    def _close_with(self, code: int, enhanced: str, text: str) -> None:
        self._queue(code, enhanced, text)
        self.state = State.S_CLOSED

    def _closed(self, reason: str) -> Event:
        self.state = State.S_CLOSED
        return Closed(reason)

    def _auth_offered(self) -> bool:
        s = self.settings
        return bool(s.auth_mechanisms) and (self.tls or not s.auth_requires_tls)

    def _accept_hello(self, command: Command) -> None:
        # RFC 5321 §4.1.4: a second EHLO/HELO resets the transaction like RSET.
        self.helo = command.arg
        self.esmtp = command.verb == "EHLO"
        self.transaction = None

    def _pipelined_after(self, verb: str) -> bool:
        """RFC 2920 §3.1: a group ender, or any command in a HELO session, with input after."""
        if not self.settings.strict_pipelining or not self._reader.buffered:
            return False
        return verb in _GROUP_ENDERS or not (self.esmtp and self.settings.pipelining)

    def _command(self, line: bytes) -> Event | NeedData:
        self.last_line, self.last_line_secret = line, False
        utf8 = self.transaction.utf8 if self.transaction is not None else False
        try:
            cmd = parse_command(line, utf8)
        except CommandError as exc:
            return self._reject(exc.code, exc.enhanced, exc.text)
        verb = cmd.verb
        if verb != "QUIT" and verb != "BDAT" and self._pipelined_after(verb):
            self._reader.take_rest()
            self._close_with(*S554_PIPELINING)
            return Closed("improper pipelining")
        handler = _HANDLERS[verb]
        return handler(self, cmd)

    def _on_hello(self, cmd: Command) -> Event:
        return self._await(Hello(cmd))

    def _on_mail(self, cmd: Command) -> Event:
        s = self.settings
        if self.helo is None:
            return self._reject(*S503_HELLO_FIRST)
        if self.transaction is not None:
            return self._reject(*S503_NESTED_MAIL)
        if s.require_tls and not self.tls:
            return self._reject(*S530_TLS_FIRST)
        if s.require_auth and not self.authenticated:
            # RFC 6409 §4.3: a submission server takes mail from authenticated users only.
            return self._reject(*S530_AUTH_REQUIRED)
        error = self._check_mail_params(cmd)
        if error is not None:
            return self._reject(*error)
        return self._await(MailFrom(cmd))

    def _check_mail_params(self, cmd: Command) -> tuple[int, str, str] | None:
        """Parameters valid in syntax (the parser checked) but not offered here → 555."""
        s = self.settings
        params = cmd.params
        if not self.esmtp and params:
            return S555_NOT_OFFERED
        size = int(params.get("SIZE") or 0)
        if s.max_message_size and size > s.max_message_size:
            return S552_SIZE  # RFC 1870 §6
        body = params.get("BODY")
        # BINARYMIME is not offered: the stored body must be canonical CRLF text.
        if body == "BINARYMIME" or (body == "8BITMIME" and not s.eightbitmime):
            return S555_NOT_OFFERED
        if "SMTPUTF8" in params and not s.smtputf8:
            return S555_NOT_OFFERED
        if not s.dsn and ("RET" in params or "ENVID" in params):
            return S555_NOT_OFFERED
        if "AUTH" in params and not self._auth_offered():
            return S555_NOT_OFFERED
        return None

    def _on_rcpt(self, cmd: Command) -> Event:
        t = self.transaction
        if t is None:
            return self._reject(*S503_MAIL_FIRST)
        if t.bdat is not None:
            return self._reject(*S503_BDAT_STARTED)
        if cmd.params and not self.settings.dsn:
            return self._reject(*S555_NOT_OFFERED)
        t.rcpts_tried += 1
        if t.rcpts_accepted >= self.settings.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452, the client sends the rest in another transaction.
            return self._reject(*S452_TOO_MANY_RCPTS)
        return self._await(RcptTo(cmd))

    def _no_recipients(self) -> tuple[int, str, str] | None:
        t = self.transaction
        if t is None:
            return S503_MAIL_FIRST
        if t.rcpts_accepted == 0:
            # RFC 2920 §3.1: all RCPTs failed → 554 for DATA; none sent → 503.
            return S554_NO_VALID_RCPTS if t.rcpts_tried else S503_RCPT_FIRST
        return None

    def _on_data(self, cmd: Command) -> Event:
        error = self._no_recipients()
        if error is None and self.transaction is not None and self.transaction.bdat is not None:
            error = S503_BDAT_STARTED
        if error is not None:
            return self._reject(*error)
        return self._await(DataCommand())

    def _feed_body(self, body: DataDecoder | BdatReader, data: bytes) -> None:
        """Give ``data`` to the body decoder; what follows the body goes back to the lines."""
        used = body.feed(data)
        if used < len(data):
            self._reader.push(data[used:])

    def _next_data_event(self) -> Event | NeedData:
        decoder = self._data
        assert decoder is not None
        if self._reader.buffered and not decoder.done:
            self._feed_body(decoder, self._reader.take_rest())
        if not decoder.done:
            if self._eof:
                return self._closed("peer closed during DATA")
            return NEED_DATA
        self._data = None
        self.state = State.S_COMMAND
        refused = self._refusal(decoder)
        if refused is not None:
            return refused
        return self._message(decoder.body(), decoder.size, decoder.long_lines)

    def _refusal(self, body: DataDecoder | BdatReader) -> Event | None:
        """Reply for a message read to its end but unacceptable as received."""
        if body.ok:
            return None
        self.transaction = None
        if body.oversize:
            reply = S552_SIZE
        else:
            kinds = [n for n, c in (("CR", body.bare_cr), ("LF", body.bare_lf)) if c]
            # RFC 5321 §2.3.8: CR and LF only as CRLF; a bare one is how smuggling starts.
            reply = (554, "5.6.0", f"Message contains bare {' and '.join(kinds)}; use CRLF")
        event = self._reject(*reply)
        if isinstance(event, Closed):
            return event
        return MessageRefused(reply[2], reply[0], body.size)

    def _on_bdat(self, cmd: Command) -> Event | NeedData:
        # RFC 3030 §4: the chunk is read whatever the verdict, so its octets never reach
        # the command parser; a refused chunk goes to a reader that keeps nothing.
        t = self.transaction
        error = self._no_recipients() if self.settings.chunking else S502_NOT_OFFERED
        if error is None and t is not None:
            if t.bdat is None:
                t.bdat = BdatReader(self.settings.max_message_size, self.settings.bare_eol)
            reader = t.bdat
        else:
            reader = BdatReader()
            reader.discard()
        reader.start_chunk(cmd.size, cmd.last)
        self._chunk_error = error
        self._chunk = reader
        self.state = State.S_BDAT
        return self._next_bdat_event()

    def _next_bdat_event(self) -> Event | NeedData:
        reader = self._chunk
        assert reader is not None
        if self._reader.buffered and not reader.chunk_done:
            self._feed_body(reader, self._reader.take_rest())
        if not reader.chunk_done:
            if self._eof:
                return self._closed("peer closed during BDAT")
            return NEED_DATA
        self.state = State.S_COMMAND
        if self._chunk_error is not None:
            return self._reject(*self._chunk_error)
        if not reader.done:
            if reader.oversize:
                # Known too big already: refuse now, keep consuming later chunks (§4).
                return self._reject(*S552_SIZE)
            self._queue(250, "2.0.0", f"{reader.size} octets received")
            return Answered("BDAT")
        refused = self._refusal(reader)
        if refused is not None:
            return refused
        return self._message(reader.body(), reader.size, 0)

    def _message(self, body: bytes, size: int, long_lines: int) -> Event:
        t = self.transaction
        assert t is not None
        return self._await(MessageReceived(body, size, t.mail, tuple(t.accepted), long_lines))

    def _on_rset(self, cmd: Command) -> Event:
        self.transaction = None
        self._queue(*S250_RESET)
        return Reset()

    def _on_noop(self, cmd: Command) -> Event:
        self._queue(*S250_OK)
        return Answered("NOOP")

    def _on_help(self, cmd: Command) -> Event:
        self._queue(*S214_HELP)
        return Answered("HELP")

    def _on_quit(self, cmd: Command) -> Event:
        self._close_with(*S221_BYE)
        return Quit()

    def _on_verify(self, cmd: Command) -> Event:
        return self._await(Verify(cmd))

    def _on_starttls(self, cmd: Command) -> Event:
        if not self.settings.starttls:
            return self._reject(*S502_NOT_OFFERED)
        if self.tls:
            return self._reject(*S503_TLS_ACTIVE)
        if self.helo is None:
            return self._reject(*S503_HELLO_FIRST)
        # RFC 3207 §4.2 / CVE-2011-0411: nothing pipelined after STARTTLS may be read as if
        # it had come over TLS.
        discarded = len(self._reader.take_rest())
        return self._await(StartTLS(discarded))

    def _on_auth(self, cmd: Command) -> Event:
        s = self.settings
        if not s.auth_mechanisms:
            return self._reject(*S502_NOT_OFFERED)
        if self.helo is None or not self.esmtp:
            return self._reject(*S503_HELLO_FIRST)
        if self.authenticated:
            return self._reject(*S503_AUTHENTICATED)
        if self.transaction is not None:
            return self._reject(*S503_AUTH_IN_TRANSACTION)
        if not self._auth_offered():
            return self._reject(*S538_ENCRYPTION)
        if cmd.arg not in s.auth_mechanisms:
            return self._reject(*S504_MECHANISM)
        return self._await(AuthStart(cmd.arg, cmd.initial))

    def _end_auth_exchange(self) -> None:
        """Back to command state after a SASL response line (read, or refused as too long)."""
        self._reader.limit = self.settings.max_command_line
        self.state = State.S_COMMAND

    def _auth_line(self, line: bytes) -> Event:
        self.last_line, self.last_line_secret = line, True
        self._end_auth_exchange()
        if line == b"*":
            # RFC 4954 §4: the client cancelled the exchange.
            return self._reject(*S501_AUTH_CANCELLED)
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not text or not all(c.isalnum() or c in "+/=" for c in text):
            return self._reject(501, "5.5.2", "Invalid base64 in AUTH response")
        return self._await(AuthResponse(text))


_Handler = Callable[[ServerConnection, Command], Event | NeedData]

#: The command table: one handler per verb the parser can return.
_HANDLERS: Final[dict[str, _Handler]] = {
    "HELO": ServerConnection._on_hello,
    "EHLO": ServerConnection._on_hello,
    "MAIL": ServerConnection._on_mail,
    "RCPT": ServerConnection._on_rcpt,
    "DATA": ServerConnection._on_data,
    "BDAT": ServerConnection._on_bdat,
    "RSET": ServerConnection._on_rset,
    "NOOP": ServerConnection._on_noop,
    "HELP": ServerConnection._on_help,
    "QUIT": ServerConnection._on_quit,
    "VRFY": ServerConnection._on_verify,
    "EXPN": ServerConnection._on_verify,
    "STARTTLS": ServerConnection._on_starttls,
    "AUTH": ServerConnection._on_auth,
}

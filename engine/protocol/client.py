"""Sans-I/O SMTP client connection: commands out, replies in, matched in order.

Theory of operation.  The delivery glue in ``engine/client/`` owns the socket and decides
what to send; this module turns each command into bytes, keeps the queue of commands that
wait for a reply (RFC 2920 pipelining: replies come back in order), parses the replies with
their caps (``engine.protocol.reply``), learns the server's extensions from the EHLO reply,
and refuses what the server did not offer:

- ``send(command)`` → bytes, or :class:`ClientProtocolError` when the command is out of
  order or not offered (pipelining without PIPELINING, a command after a group ender whose
  reply is still due, BDAT without CHUNKING, SMTPUTF8 or 8BITMIME parameters not offered);
- ``send_message(body)`` after a 354: the dot-stuffed body and its terminator;
- ``send_bdat(chunk, last)``: a BDAT command and its octets (RFC 3030);
- ``receive_data(data)`` buffers; ``next_event()`` returns :class:`Greeting` or
  :class:`Response` (the command and its reply) or :data:`NEED_DATA`, and raises
  ``ReplyError`` when the server breaks the reply syntax or its caps.

STARTTLS (RFC 3207 §4.2, the client half of CVE-2011-0411): bytes that arrive with or
after the server's 220 and before the handshake are a protocol error, and after
``tls_started()`` the extensions are forgotten until the next EHLO.

It must never import asyncio, socket, ssl or logging, and never decide what to do with a
reply (retry, bounce): that belongs to the delivery agent.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

from engine.protocol.command import Command, format_command
from engine.protocol.errors import ReplyError
from engine.protocol.events import NEED_DATA, NeedData
from engine.protocol.reply import Reply, ReplyParser
from engine.protocol.wire import dot_stuff


class ClientProtocolError(Exception):
    """Our side asked for something the protocol or the server does not allow."""


#: RFC 2920 §3.1: after these the client waits for the reply before sending more.  Not
#: the message content: it "is explicitly allowed to be the first 'command' in a group",
#: so the next transaction's MAIL, RCPTs and DATA may follow the final dot in one write.
_GROUP_ENDERS: Final = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP",
                                  "STARTTLS", "AUTH", "QUIT", "AUTH-RESPONSE"})


#: Commands that need an extension offered.
_NEEDS: Final = {"BDAT": "CHUNKING", "STARTTLS": "STARTTLS", "AUTH": "AUTH"}


@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server's EHLO reply offered (RFC 5321 §4.1.1.1)."""

    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: Reply) -> Extensions:
        found: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                found[keyword.upper()] = params.strip()
        return cls(found)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def size(self) -> int | None:
        """SIZE limit (RFC 1870); None when unannounced, 0 when announced without a value."""
        value = self.keywords.get("SIZE")
        if value is None:
            return None
        return int(value) if value.isdigit() else 0

    @property
    def auth(self) -> tuple[str, ...]:
        return tuple(self.keywords.get("AUTH", "").upper().split())


@dataclass(frozen=True, slots=True)
class Greeting:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Response:
    """The reply to ``verb`` (a command verb, "MESSAGE" for the end of the data, or
    "AUTH-RESPONSE" for a SASL line); ``command`` is the command sent, if any."""

    verb: str
    reply: Reply
    command: Command | None = None


@dataclass(frozen=True, slots=True)
class ClientSettings:
    #: RFC 5321 §4.5.3.1.5 says 512; servers in the wild send longer, so the cap is higher.
    max_reply_line: int = 2048
    max_reply_lines: int = 100


class ClientConnection:
    """One SMTP session seen from the client."""

    def __init__(self, settings: ClientSettings | None = None) -> None:
        s = settings or ClientSettings()
        self._parser = ReplyParser(s.max_reply_line, s.max_reply_lines)
        self._waiting: deque[tuple[str, Command | None]] = deque()
        self.greeted = False
        self.extensions: Extensions | None = None
        self.tls = False
        self._tls_pending = False
        self._data_ok = False  # a 354 arrived: the body may be sent
        self._eof = False

    # --- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._tls_pending:
            raise ReplyError("Data after the STARTTLS 220 reply")
        self._parser.push(data)

    def next_event(self) -> Greeting | Response | NeedData:
        """The next reply, matched to the command it answers."""
        reply = self._parser.pop_reply()
        if reply is None:
            if self._eof:
                raise ReplyError("Connection closed by the server")
            return NEED_DATA
        if not self.greeted:
            self.greeted = True
            return Greeting(reply)
        if not self._waiting:
            raise ReplyError("Reply without a command")
        verb, command = self._waiting.popleft()
        if verb in ("EHLO", "LHLO") and reply.code == 250:
            self.extensions = Extensions.from_reply(reply)
        elif verb == "HELO" and reply.code == 250:
            self.extensions = Extensions()
        elif verb == "DATA":
            self._data_ok = reply.code == 354
        elif verb == "STARTTLS" and reply.code == 220:
            if self._parser.buffered or self._waiting:
                # RFC 3207 §4.2: anything after the 220 was injected before the handshake.
                raise ReplyError("Data after the STARTTLS 220 reply")
            self._tls_pending = True
        return Response(verb, reply, command)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a reply."""
        return int(self._parser.buffered)

    @property
    def waiting(self) -> int:
        """Commands sent whose replies have not arrived."""
        return len(self._waiting)

    # --- output ----------------------------------------------------------------------

    def send(self, command: Command) -> bytes:
        verb = command.verb
        self._check_can_send(verb)
        ext = self.extensions
        if verb in ("MAIL", "RCPT", "BDAT", "AUTH") and ext is None:
            raise ClientProtocolError(f"{verb} before a successful EHLO/HELO")
        if ext is not None:
            self._check_offered(command, ext)
        if verb in ("EHLO", "HELO", "LHLO"):
            self.extensions = None
        self._waiting.append((verb, command))
        if verb == "LHLO":
            # RFC 2033 §4.1: LHLO takes EHLO's place and syntax in LMTP.
            return b"LHLO" + format_command(Command("EHLO", arg=command.arg))[4:]
        return format_command(command)

    def send_message(self, body: bytes, replies: int = 1) -> bytes:
        """The message after a 354: dot-stuffed, canonical CRLF, with its terminator.

        ``replies`` is how many replies answer it: 1 in SMTP, one per accepted recipient
        in LMTP (RFC 2033 §4.2).
        """
        if not self._data_ok:
            raise ClientProtocolError("message body without a 354 reply to DATA")
        if replies < 1:
            raise ClientProtocolError("a message is answered by at least one reply")
        self._data_ok = False
        self._waiting.extend(("MESSAGE", None) for _ in range(replies))
        return dot_stuff(body)

    def send_bdat(self, chunk: bytes, last: bool) -> bytes:
        """``BDAT n [LAST]`` and the chunk (RFC 3030 §2); pipelined chunks are allowed."""
        command = Command("BDAT", size=len(chunk), last=last)
        return self.send(command) + chunk

    def send_auth_response(self, text: str) -> bytes:
        """A SASL response line (base64, or "*" to cancel; RFC 4954 §4)."""
        self._check_can_send("AUTH-RESPONSE")
        self._waiting.append(("AUTH-RESPONSE", None))
        return text.encode("ascii") + b"\r\n"

    def tls_started(self) -> None:
        """The handshake after the 220 succeeded: EHLO again before anything else."""
        if not self._tls_pending:
            raise ClientProtocolError("tls_started() without a STARTTLS 220")
        self._tls_pending = False
        self.tls = True
        self.extensions = None

    # --- checks ----------------------------------------------------------------------

    def _check_can_send(self, verb: str) -> None:
        if self._tls_pending:
            raise ClientProtocolError("STARTTLS handshake pending")
        if self._waiting:
            last = self._waiting[-1][0]
            ext = self.extensions
            if last in _GROUP_ENDERS or ext is None or "PIPELINING" not in ext:
                raise ClientProtocolError(f"{verb} while the reply to {last} is due")

    @staticmethod
    def _check_offered(command: Command, ext: Extensions) -> None:
        verb = command.verb
        needs = _NEEDS.get(verb)
        if needs is not None and needs not in ext:
            raise ClientProtocolError(f"{verb} but the server does not offer {needs}")
        params = command.params
        if not params:
            return  # most RCPTs: nothing more to check (this runs once per command)
        if verb == "MAIL":
            if "SMTPUTF8" in params and "SMTPUTF8" not in ext:
                raise ClientProtocolError("SMTPUTF8 not offered")
            if params.get("BODY") == "8BITMIME" and "8BITMIME" not in ext:
                raise ClientProtocolError("8BITMIME not offered")
            if "SIZE" in params and "SIZE" not in ext:
                raise ClientProtocolError("SIZE not offered")
        if any(k in params for k in ("RET", "ENVID", "NOTIFY", "ORCPT")) and "DSN" not in ext:
            raise ClientProtocolError("DSN not offered")

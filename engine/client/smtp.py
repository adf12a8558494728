"""Outbound SMTP and LMTP delivery: connections to the next hop, pooled per site.

Owns the asyncio side of the client: dialling the route's hosts in order, the greeting,
EHLO (HELO fallback) or LHLO, STARTTLS per the route's TLS mode, AUTH at smarthosts, the
per-phase timeouts of RFC 5321 §4.5.3.2, and a pool of idle connections per site so
several messages share one connection.  Each message is one
``engine.protocol.transaction.Transaction`` (the order MAIL → RCPT → DATA → body → final
reply, what each reply means for each recipient, 452 rounds, LMTP's reply per recipient),
fed the replies as they arrive by ``_Exchange``, pipelined when the server offers
PIPELINING (RFC 2920) and one command per reply otherwise.  When the caller has a next
message ready in the connection's queue (``follow_ons``, a value: the reads never call
back into the caller), its MAIL, RCPTs and DATA go in the same write as the current body
(RFC 2920 §3.1) and the caller collects its results with ``resume``.  Command formatting,
reply parsing and matching, reply caps and the STARTTLS boundary are
``engine.protocol.client``; this module only pumps bytes, keeps time and pools.

Protocol log (``protocol_logs``, Exchange's send protocol log): a connection opened for a
send connector whose log is on writes every command it sends, every line the server sends
back (the greeting and the EHLO reply included), the STARTTLS outcome and one line per
message body with its size instead of the body, through a
:class:`engine.ops.protolog.SessionLog`; AUTH payloads are masked.  Switched off, a
connection has no log and each write or read costs one test of ``log is None``.

Outcomes: what the transaction says; anything that breaks the connection (loss, timeout,
malformed or oversized replies) → DEFERRED for every recipient without a final answer,
and the connection is dropped, never pooled.  Hosts that refuse, time out or greet with
anything but 220 are skipped; when all fail, every recipient is DEFERRED (RFC 5321 §3.8:
try again later).  A 535 to AUTH is DEFERRED too: it is a configuration problem an
operator can fix.  A connection counts towards its site until its socket is closed: a
new one for the same pool waits for those being closed (``_closed_before``).

TLS policy (engine.tlspolicy): each delivery's :class:`~engine.tlspolicy.policy.Decision`
(the route's security level, a per-domain override, MTA-STS, whether DANE applies) comes
from ``tls_policy`` (a cached dict lookup; a wait only when an MTA-STS record is due for a
look) and is part of the pool key; just before connecting to a host, the decision becomes
that host's :class:`~engine.tlspolicy.policy.HostTls` (TLSA records looked up, MTA-STS
``mx`` patterns applied).  After the handshake, a DANE host's chain is matched against its
TLSA records and an MTA-STS testing policy's checks are made and reported (TLS_FAIL, the
connection goes on).  How the certificate was verified ("ca", "mta-sts", "dane-ee",
"dane-ta", "" for not at all) is the peer's ``tls_verified``, in every DELIVER record.
A route with ``implicit_tls`` connects with TLS from the first byte (RFC 8314 §3.3).

It must never write the queue, never raise for a delivery problem (problems are
results), never block the event loop, and never put a raw CR, LF or NUL from the wire
into a result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from engine.client.api import FollowOn, FollowOns, Peer, RcptResult, Settled
from engine.ops.events import Events, Kind
from engine.ops.figures import LinkFigures
from engine.ops.protolog import ProtocolLog, SessionLog
from engine.protocol.client import (
    ClientConnection,
    ClientProtocolError,
    ClientSettings,
    Extensions,
    Greeting,
    Response,
)
from engine.protocol.command import Command
from engine.protocol.errors import ReplyError
from engine.protocol.events import NEED_DATA, NeedData
from engine.protocol.reply import Reply
from engine.protocol.transaction import END_OF_DATA, RSET, Transaction, cap_text, reply_text
from engine.queue.records import Envelope, RcptState
from engine.routing.api import Host, Route, Source, TlsMode
from engine.tlspolicy.dane import load_anchors, match, verify_chain
from engine.tlspolicy.policy import (
    Decision,
    HostTls,
    TlsPolicy,
    TlsRefusal,
    host_tls,
    report_policy,
    static_decision,
)

# RFC 5321 §4.5.3.2 minimum timeouts (seconds), per phase of a transaction.
T_MAIL: Final = 300.0  # §4.5.3.2.2
T_RCPT: Final = 300.0  # §4.5.3.2.3
T_DATA_INIT: Final = 120.0  # §4.5.3.2.4, the 354
T_DATA_BLOCK: Final = 180.0  # §4.5.3.2.5, each write of the body
T_DATA_END: Final = 600.0  # §4.5.3.2.6, the reply after the final dot
T_QUIT: Final = 10.0  # a polite QUIT is not worth waiting long for

#: Read no more from a server than this while nobody consumes it (an idle pooled
#: connection, a server that floods): reading pauses until the next read.
_READ_HIGH_WATER: Final = 256 * 1024

#: Numbers the outbound connections in protocol logs ("<log name>-<hex>").
_connection_ids = itertools.count(1)

#: (site, LMTP, TLS decision, AUTH, protocol log, egress source): connections are shared
#: only within one.
PoolKey = tuple[str, bool, Decision, tuple[str, str] | None, ProtocolLog | None,
                Source | None]
_NO_DECISION: Final = Decision("none")
TlsContextFactory = Callable[[TlsMode], ssl.SSLContext]


class _Failure(Exception):
    """The session cannot go on; ``text`` is the reason for the recipients left.

    ``stale``: a pooled connection failed before its first reply of this delivery (the
    server closed it while idle): try a fresh one.  ``final``: do not try further hosts.
    ``broken``: the connection is in no state for a polite QUIT (timeout, bad replies).
    """

    def __init__(
        self, text: str, *, stale: bool = False, final: bool = False, broken: bool = False
    ) -> None:
        super().__init__(text)
        self.text = cap_text(text)
        self.stale = stale
        self.final = final
        self.broken = broken


class _Pipe(asyncio.Protocol):
    """The connection's protocol object: bytes go straight into the sans-I/O client's
    reply parser as they arrive (no copy, no wake-up until someone waits), with flow
    control both ways; the transport may be replaced by TLS.

    ``hello`` (EHLO or LHLO) is sent from here the moment a 220 greeting arrives, before
    the connecting task has even resumed: under load a turn of the event loop lasts
    long, and a new connection would otherwise spend one turn reading the greeting and
    another waiting for the EHLO reply before its first MAIL.  Only the greeting is
    waited for (RFC 5321 §3.1: nothing is sent before it); everything after the EHLO
    reply is the session's.
    """

    def __init__(self, conn: ClientConnection, hello: Command | None = None,
                 log: SessionLog | None = None, figures: LinkFigures | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn = conn
        #: the agent's connection counts (metrics), shared by its connections
        self.figures = figures or LinkFigures()
        self._hello = hello
        #: This connection's protocol log, None when its connector's log is off.
        self.log = log
        #: The greeting, once ``hello`` has looked at it (the session reads it from here),
        #: and whether ``hello`` went out (a 220).
        self.greeting: Greeting | None = None
        self.hello_sent = False
        #: A ReplyError from feeding the parser (bytes after a STARTTLS 220), raised by
        #: the next wait: the session sees it where it reads.
        self.error: ReplyError | None = None
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        #: The running wait's deadline, and the one timer that enforces deadlines: it is
        #: armed once and re-arms itself while waits keep ending in time, instead of one
        #: timer per wait (two per delivery otherwise; see ``wait``).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: The pipelined transaction being driven by arriving replies, if any: it is
        #: told of every arrival, of the end of the connection, of a drained write
        #: buffer and of its deadline, instead of a coroutine waking for each reply.
        self.handler: _Exchange | None = None
        self.lost = asyncio.Event()
        #: Called once the connection is closed (the agent counts it closing until then).
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.figures.opened += 1
        if self.log is not None:
            local = transport.get_extra_info("sockname")
            shown = (f"{local[0]}:{local[1]}" if isinstance(local, tuple) and len(local) >= 2
                     else str(local or "?"))
            self.log.event(f"connected from {shown}")

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        log = self.log
        if log is not None:
            log.recv_data(data)
        self._feed(conn, data)
        if self._hello is not None:
            self._greeted(conn)
        if conn.buffered > _READ_HIGH_WATER and not self._read_paused:
            # Nobody consumes (an idle pooled connection, a server that floods): stop
            # reading until the replies held are taken (``consumed``).
            self._read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        handler = self.handler
        if handler is not None:
            handler.advance()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, conn: ClientConnection, data: bytes) -> None:
        try:
            conn.receive_data(data)
        except ReplyError as exc:
            self.error = self.error or exc

    def _greeted(self, conn: ClientConnection) -> None:
        """Take the greeting when it is complete, and answer a 220 with ``hello``."""
        if self.error is not None:
            return
        try:
            event = conn.next_event()
        except ReplyError as exc:
            self.error = exc
            return
        if event is NEED_DATA:
            return
        assert isinstance(event, Greeting), "the first reply is the greeting"
        hello, self._hello = self._hello, None
        assert hello is not None
        self.greeting = event
        if event.reply.code == 220 and self.transport is not None:
            data = conn.send(hello)
            if self.log is not None:
                self.log.send(data)
            self.transport.write(data)
            self.hello_sent = True

    def consumed(self) -> None:
        """Replies were taken from the parser: read again if reading was paused."""
        if (self._read_paused and self.conn.buffered <= _READ_HIGH_WATER
                and self.transport is not None and not self.transport.is_closing()):
            self._read_paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self.figures.closed += 1
        log = self.log
        if log is not None:
            log.recv_end()
            log.event("disconnect" + (f": {exc}" if exc else ""))
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.handler is not None:
            self.handler.drained()

    @property
    def eof(self) -> bool:
        """The server closed its side (the parser has had every byte it will get)."""
        return self._eof

    @property
    def closed(self) -> bool:
        return self._eof or self.transport is None or self.transport.is_closing()

    def set_deadline(self, deadline: float) -> None:
        """The handler's deadline (loop time): its ``expired()`` is called then."""
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = asyncio.get_running_loop().call_at(deadline, self._check_deadline)

    async def wait(self, deadline: float) -> None:
        """Until more bytes (or the end) arrive; TimeoutError at ``deadline`` (loop time),
        and a parser error from the bytes that arrived meanwhile."""
        if self.error is not None:
            raise self.error
        if self._eof:
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.set_deadline(deadline)
        await waiter
        if self.error is not None:
            raise self.error

    def _check_deadline(self) -> None:
        self._timer = None
        waiter, handler = self._waiter, self.handler
        if handler is None and (waiter is None or waiter.done()):
            return  # nobody waits: the next wait arms the timer again
        loop = asyncio.get_running_loop()
        # libuv rounds timers to the millisecond: a timer may fire a little early.
        if loop.time() >= self._deadline - 0.002:
            if handler is not None:
                handler.expired()
            elif waiter is not None:
                self._waiter = None
                waiter.set_exception(TimeoutError())
        else:
            self._timer_at = self._deadline
            self._timer = loop.call_at(self._deadline, self._check_deadline)

    @property
    def write_paused(self) -> bool:
        return self._write_paused


class _Session:
    """One connection to one host: the transport, the sans-I/O client and pool state."""

    def __init__(self, host: Host, pipe: _Pipe, timeouts: dict[str, float]) -> None:
        self.host = host
        self.remote = f"{host.name}[{host.address}]"
        #: Where and how this connection goes, for the results (set once it is ready).
        self.peer: Peer | None = None
        self.pipe = pipe
        self.conn = pipe.conn
        #: The protocol log (the pipe's), None when off.
        self.log = pipe.log
        self.timeouts = timeouts
        self.messages = 0
        self.needs_rset = False
        #: The pool this connection belongs to (set when opened).
        self.key: PoolKey = ("", False, _NO_DECISION, None, None, None)
        #: Messages it carries before it is closed: the route's (a shaping rule's); 0 =
        #: the agent's setting of the moment (a reload changes it for open ones too).
        self.max_messages = 0
        #: The name it gave in EHLO (its source's, else the agent's).
        self.helo_name = ""
        #: What TLS this connection must have, and how its certificate was verified.
        self.need = HostTls()
        self.verified = ""
        #: The TLS mode and implicit TLS of the routes it serves (for follow-ons' checks).
        self.route_tls = "off"
        self.implicit = False
        #: A TLS-RPT failure was counted for this connection (not a success, then).
        self.rpt_failed = False
        #: The newest follow-on transaction in flight, until its caller collects it.
        self.follow_on: _Exchange | None = None
        #: Taken from the pool and not yet answered in this delivery (see _Failure.stale).
        self.pristine = False
        #: Pool expiry: loop time the session went idle (None while in use), and the timer
        #: that checks it.  The timer is not cancelled when the session is taken again: a
        #: busy session keeps one timer that re-arms itself when it fires, instead of a
        #: new timer per message.
        self.idle_since: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    @property
    def transport(self) -> asyncio.Transport:
        assert self.pipe.transport is not None
        return self.pipe.transport

    def write(self, data: bytes, *, secret: bool = False) -> None:
        """Write command lines (``secret``: AUTH payloads, masked in the protocol log)."""
        log = self.log
        if log is not None:
            log.send(data, secret=secret)
        self.transport.write(data)

    def note(self, text: str) -> None:
        """An event for the protocol log, if it is on (why a connection is given up)."""
        if self.log is not None:
            self.log.event(text)

    async def event(self, phase: str) -> Greeting | Reply:
        """The next reply (the greeting first), within the phase's timeout."""
        conn = self.conn
        pipe = self.pipe
        try:
            event = self._next_event()
            if event is NEED_DATA:
                # One deadline for the whole reply, however many reads it takes.
                deadline = asyncio.get_running_loop().time() + self.timeouts[phase]
                while event is NEED_DATA:
                    if pipe.eof:
                        conn.receive_data(b"")
                    else:
                        await pipe.wait(deadline)
                    event = self._next_event()
            pipe.consumed()
        except TimeoutError:
            raise _Failure(
                f"451 4.4.2 Timeout waiting for the {phase} reply from {self.remote}",
                broken=True,
            ) from None
        except ReplyError as exc:
            raise self.broken_reply(exc, phase) from None
        if isinstance(event, Greeting):
            return event
        assert isinstance(event, Response)
        return self.first_checked(event.reply)

    def _next_event(self) -> Greeting | Response | NeedData:
        pipe = self.pipe
        if pipe.greeting is not None:  # taken by the pipe to answer it with EHLO
            greeting, pipe.greeting = pipe.greeting, None
            return greeting
        return self.conn.next_event()

    def broken_reply(self, exc: ReplyError, phase: str) -> _Failure:
        """The failure for a reply that broke the syntax, its caps, or never came."""
        return _Failure(
            f"451 4.4.2 {exc.text} ({self.remote}, waiting for {phase})",
            stale=self.pristine and exc.text == "Connection closed by the server",
            broken=True,
        )

    def first_checked(self, reply: Reply, phase: str = "") -> Reply:
        """The reply, unless it is a pooled connection's first and a 421, or a refused
        RSET: the server closed it or forgot it while idle (``_Failure.stale``: try a
        fresh connection)."""
        if self.pristine:
            self.pristine = False
            if reply.code == 421 or (phase is RSET and reply.code != 250):
                raise _Failure(reply_text(reply), stale=True)
        return reply

    async def reply(self, phase: str) -> Reply:
        event = await self.event(phase)
        if isinstance(event, Greeting):  # pragma: no cover - the greeting is read first
            raise _Failure("451 4.5.0 Unexpected greeting")
        return event

    async def command(self, command: Command, phase: str = "command", *,
                      secret: bool = False) -> Reply:
        self.write(self.conn.send(command), secret=secret)
        return await self.reply(phase)

    async def hello(self, helo_name: str, lmtp: bool) -> Extensions:
        """EHLO, or HELO when EHLO gets a 5xx (RFC 5321 §3.2); LHLO in LMTP."""
        verb = "LHLO" if lmtp else "EHLO"
        if self.pipe.hello_sent:  # sent on the greeting's arrival (see _Pipe)
            self.pipe.hello_sent = False
            reply = await self.reply("command")
        else:
            reply = await self.command(Command(verb, arg=helo_name))
        if reply.code // 100 == 5 and not lmtp and reply.code != 554:
            reply = await self.command(Command("HELO", arg=helo_name))
        if reply.code != 250 or self.conn.extensions is None:
            raise _Failure(reply_text(reply))
        return self.conn.extensions

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        # RFC 3207 §4.2: nothing the server sent after its 220 may be read as TLS data;
        # the state machine checked what came with the 220, this is what came since.
        if self.pipe.error is not None or self.conn.buffered:
            raise _Failure(f"451 4.5.0 Data after the STARTTLS 220 from {self.remote}", broken=True)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts["command"]):
                transport = await loop.start_tls(
                    self.transport, self.pipe, context, server_hostname=server_hostname
                )
        except TimeoutError:
            self.note("TLS handshake timed out")
            raise _Failure(
                f"451 4.7.5 TLS handshake with {self.remote} timed out", broken=True
            ) from None
        except (OSError, ValueError) as exc:
            self.note(f"TLS handshake failed: {exc}")
            raise _Failure(
                f"451 4.7.5 TLS handshake with {self.remote} failed: {exc}", broken=True
            ) from None
        if transport is None:
            self.note("TLS handshake failed")
            raise _Failure(f"451 4.7.5 TLS handshake with {self.remote} failed", broken=True)
        self.pipe.transport = transport
        self.conn.tls_started()
        if self.log is not None:
            version, cipher = _tls(transport) or ("?", "?")
            # The receive side's words (engine.server.session), so one grep finds both.
            self.log.event(f"TLS established: version={version} cipher={cipher}")

    async def quit(self) -> None:
        """QUIT politely, wait briefly for the 221, close; never raises."""
        try:
            if not self.pipe.closed and not self.conn.waiting:
                self.write(self.conn.send(Command("QUIT")))
                deadline = asyncio.get_running_loop().time() + T_QUIT
                while not self.pipe.closed and self.conn.next_event() is NEED_DATA:
                    await self.pipe.wait(deadline)
        except Exception:
            pass
        # A TLS close_notify exchange takes a round trip: wait for it, but not for long.
        self.abort(graceful=True)
        try:
            async with asyncio.timeout(T_QUIT):
                await self.pipe.lost.wait()
        except TimeoutError:
            self.abort()

    def abort(self, graceful: bool = False) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        transport = self.pipe.transport
        if transport is not None and not transport.is_closing():
            if graceful:
                transport.close()
            else:
                transport.abort()


class SmtpAgent:
    """Delivers over SMTP (or LMTP) with a connection pool per site; a DeliveryAgent.

    Timeouts are RFC 5321 §4.5.3.2's per phase times ``timeout_scale``; ``command_timeout``
    (times the scale) covers the greeting, EHLO, STARTTLS, AUTH, RSET and QUIT.
    ``protocol_logs`` maps a send connector's name (``Route.connector``, "" for plain MX
    delivery) to its protocol log; connectors not in it, and logs switched off, log
    nothing.  The caller owns the logs (flushes and closes them).
    """

    def __init__(
        self,
        helo_name: str,
        *,
        lmtp: bool = False,
        connect_timeout: float = 30,
        command_timeout: float = 300,
        timeout_scale: float = 1.0,
        max_messages_per_connection: int = 100,
        idle_timeout: float = 30,
        max_idle_per_site: int = 10,
        max_reply_line: int = 2048,
        max_reply_lines: int = 100,
        tls_context_factory: TlsContextFactory | None = None,
        ca_file: str | None = None,
        pipeline_messages: bool = True,
        protocol_logs: Mapping[str, ProtocolLog] | None = None,
        events: Events | None = None,
        tls_policy: TlsPolicy | None = None,
    ) -> None:
        self.helo_name = helo_name
        #: Per-destination TLS decisions (engine.tlspolicy); None: the route's level alone.
        self.tls_policy = tls_policy
        #: The CA certificates an MTA-STS testing policy's checks use (loaded when needed).
        self._anchors: list[Any] = []
        #: The event hub that hears of failed TLS handshakes (TLS_FAIL; engine.ops.alerts
        #: counts them per destination); None: nobody listens.
        self.events = events
        #: Only the logs that are on: empty (no lookup per delivery) when none is.
        self._logs = {name: log for name, log in (protocol_logs or {}).items() if log.enabled}
        self.lmtp = lmtp
        self.connect_timeout = connect_timeout * timeout_scale
        self.timeouts: dict[str, float] = {
            "command": command_timeout * timeout_scale,
            "greeting": command_timeout * timeout_scale,
            "RSET": command_timeout * timeout_scale,
            "MAIL": T_MAIL * timeout_scale,
            "RCPT": T_RCPT * timeout_scale,
            "DATA": T_DATA_INIT * timeout_scale,
            "body": T_DATA_BLOCK * timeout_scale,
            "end of data": T_DATA_END * timeout_scale,
        }
        self.max_messages_per_connection = max(1, max_messages_per_connection)
        self.idle_timeout = idle_timeout
        self.max_idle_per_site = max_idle_per_site
        self.settings = ClientSettings(
            max_reply_line=max_reply_line, max_reply_lines=max_reply_lines
        )
        #: Send a waiting next message's envelope behind the current body (follow-ons).
        self.pipeline_messages = pipeline_messages
        self._tls_context_factory = tls_context_factory
        self._ca_file = ca_file
        self._contexts: dict[TlsMode, ssl.SSLContext] = {}
        self._pool: dict[PoolKey, list[_Session]] = {}
        self._quitting: set[asyncio.Task[None]] = set()
        #: Connections being closed, per pool, until their sockets are (_closed_before).
        self._closing: dict[PoolKey, set[_Session]] = {}
        self._closed = False
        #: Connections opened so far, and messages sent behind another message's body
        #: (follow-ons), for metrics and tests.
        self.connections_opened = 0
        self.follow_ons = 0
        #: Connections open and STARTTLS handshakes per site, for metrics.
        self.figures = LinkFigures()

    def reconfigure(self, *, max_idle_per_site: int, ca_file: str | None,
                    max_messages_per_connection: int | None = None,
                    pipeline_messages: bool | None = None,
                    tls_policy: TlsPolicy | None = None) -> None:
        """A reload (engine.ops.reload): connections opened or reused from now on follow
        these settings (None: unchanged); a connection already open keeps its TLS."""
        self.max_idle_per_site = max_idle_per_site
        if ca_file != self._ca_file:
            self._ca_file = ca_file
            self._contexts.clear()
            self._anchors = []
        if tls_policy is not None:
            old, self.tls_policy = self.tls_policy, tls_policy
            replaced = [] if old is None else [
                part for part, new in ((old.sts, tls_policy.sts),
                                       (old.reports, tls_policy.reports))
                if part is not None and part is not new]
            for part in replaced:
                # Its fetches, timers and HTTP client end in the background (awaited at
                # close).
                task = asyncio.get_running_loop().create_task(part.close())
                self._quitting.add(task)
                task.add_done_callback(self._quitting.discard)
        if max_messages_per_connection is not None:
            self.max_messages_per_connection = max(1, max_messages_per_connection)
        if pipeline_messages is not None:
            self.pipeline_messages = pipeline_messages

    # --- the DeliveryAgent API -------------------------------------------------------

    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[int], body: bytes,
        follow_ons: FollowOns | None = None,
    ) -> list[RcptResult]:
        indexes = list(recipients)
        if not indexes:
            return []
        lmtp = self.lmtp or route.protocol == "lmtp"
        logs = self._logs
        # A logged connector's connections are its own: another connector's mail never
        # goes over them (into its log), nor its mail over theirs (unlogged).
        plog = logs.get(route.connector) if logs else None
        policy = self.tls_policy
        if policy is None:
            decision = static_decision(route)
        else:
            decision = policy.cached(route) or await policy.decision(route)
        # An egress source's connections are its own (its address, its EHLO name).
        key: PoolKey = (route.site, lmtp, decision, route.auth, plog, route.source)
        if not self.takes_follow_ons(route):
            follow_ons = None  # LMTP answers per recipient: kept out of follow-on chains
        while True:
            session = self._take(key)
            if session is None:
                session, reason = await self._open(route, lmtp, key)
                if session is None:
                    return [RcptResult(i, RcptState.DEFERRED, reason) for i in indexes]
            keep = False
            t = Transaction(session.conn, envelope, indexes, body, lmtp=lmtp,
                            rset=session.needs_rset, remote=session.remote, peer=session.peer)
            try:
                out, keep = await self._transaction(
                    session, t, _Exchange(self, session, t, follow_ons).run())
            except _Failure as failure:
                if failure.stale:
                    continue  # the pooled connection had died while idle: a fresh one
                raise  # pragma: no cover - _transaction turns other failures into results
            finally:
                self._done_with(session, keep)
            return out

    def takes_follow_ons(self, route: Route) -> bool:
        return (self.pipeline_messages and not self._closed and not self.lmtp
                and route.protocol != "lmtp")

    async def resume(self, job: FollowOn) -> list[RcptResult]:
        if job.handle is None:
            raise ValueError("a follow-on message this agent did not take")
        return await job.handle.results()

    def _done_with(self, s: _Session, keep: bool, handle: _Exchange | None = None) -> None:
        """A transaction's caller is done: pool or drop the connection, unless a follow-on
        message is still in flight on it (its ``resume`` decides then)."""
        if handle is not None and s.follow_on is handle:
            s.follow_on = None
        if s.follow_on is not None:
            return
        if keep:
            self._release(s.key, s)
        else:
            self._retire(s)

    @property
    def closing(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """QUIT and close every pooled connection; later deliveries open none to pool."""
        self._closed = True
        sessions = [s for idle in self._pool.values() for s in idle]
        self._pool.clear()
        for s in sessions:
            self._retire(s, polite=True)
        if self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)
        if self.tls_policy is not None:
            await self.tls_policy.close()

    async def retire_idle(self, site: str, source: Source | None) -> None:
        """Close one idle connection to ``site`` from ``source`` (QUIT), if one is pooled,
        and wait until its socket is closed.  A node that shares the site's connection
        limit with other nodes (engine.cluster) holds a lease per connection its workers
        may use: a worker that ends gives its lease back only after this, so the sum of
        every node's open connections, idle ones included, stays within the limit.  Only
        called with a cluster: it looks at every pool."""
        for key, idle in self._pool.items():
            if idle and key[0] == site and key[5] == source:
                session = idle.pop()
                if not idle:
                    del self._pool[key]
                self._retire(session, polite=True)
                await self._closed_before(key)
                return

    # --- the pool --------------------------------------------------------------------

    def _take(self, key: PoolKey) -> _Session | None:
        idle = self._pool.get(key)
        while idle:
            session = idle.pop()
            session.idle_since = None  # its timer, if any, stays (see _Session.idle_since)
            # Closed, or the server spoke while idle (a 421 before closing, or junk).
            if session.pipe.closed or session.conn.buffered:
                self._retire(session)
                continue
            session.pristine = True
            return session
        return None

    def _release(self, key: PoolKey, session: _Session) -> None:
        session.pristine = False
        idle = self._pool.setdefault(key, [])
        if (
            self._closed
            or session.messages >= (session.max_messages or self.max_messages_per_connection)
            or len(idle) >= self.max_idle_per_site
            or session.pipe.closed
        ):
            self._retire(session, polite=True)
            return
        idle.append(session)
        loop = asyncio.get_running_loop()
        session.idle_since = now = loop.time()
        if session.idle_timer is None:
            session.idle_timer = loop.call_at(now + self.idle_timeout, self._expire, key, session)

    def _expire(self, key: PoolKey, session: _Session) -> None:
        session.idle_timer = None
        if session.idle_since is None:
            return  # in use: its next release arms the timer again
        loop = asyncio.get_running_loop()
        until = session.idle_since + self.idle_timeout
        if loop.time() < until:
            # Taken and released again since the timer was set: idle for less time.
            session.idle_timer = loop.call_at(until, self._expire, key, session)
            return
        idle = self._pool.get(key)
        if idle is not None and session in idle:
            idle.remove(session)
            if not idle:
                del self._pool[key]
            self._retire(session, polite=True)

    def _retire(self, session: _Session, polite: bool = False) -> None:
        """Close a connection (after QUIT when ``polite``); it counts towards its pool's
        connections until its socket is closed (see ``_closed_before``)."""
        if not session.pipe.lost.is_set():
            closing = self._closing.setdefault(session.key, set())
            closing.add(session)
            session.pipe.on_lost = functools.partial(closing.discard, session)
        if not polite:
            session.abort()
            return
        task = asyncio.get_running_loop().create_task(session.quit())
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def _closed_before(self, key: PoolKey) -> None:
        """Wait until the connections of ``key`` being closed are closed: a destination's
        connection limit counts sockets, and a retiring connection (QUIT after
        ``max_messages_per_connection``, a broken one) holds its slot until the close is
        done.  Bounded: ``quit`` gives up after its own timeouts."""
        closing = self._closing.get(key)
        if not closing:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * T_QUIT + 1):
                for session in list(closing):
                    await session.pipe.lost.wait()
        if not closing and self._closing.get(key) is closing:
            del self._closing[key]  # (others waiting on it may have removed it already)

    # --- opening a session -----------------------------------------------------------

    async def _open(self, route: Route, lmtp: bool,
                    key: PoolKey) -> tuple[_Session | None, str]:
        """A ready session with the first host that works, or None and the last reason."""
        reason = "451 4.4.4 No host to deliver to"
        loop = asyncio.get_running_loop()
        source = route.source
        helo_name = source.ehlo if source is not None and source.ehlo else self.helo_name
        # Bind the source's address: the receiver sees the connection come from it, and
        # checks its PTR against the EHLO name (RFC 5321 §4.1.4).
        local_addr = (source.address, 0) if source is not None and source.address else None
        hello = Command("LHLO" if lmtp else "EHLO", arg=helo_name)
        plog = key[4]
        decision = key[2]
        policy = self.tls_policy
        log: SessionLog | None = None

        def pipe_factory() -> _Pipe:
            return _Pipe(ClientConnection(self.settings), hello, log, self.figures)

        for host in route.hosts:
            remote = f"{host.name}[{host.address}]:{host.port}"
            if plog is not None:
                log = plog.session(f"{plog.connector}-{next(_connection_ids):x}",
                                   _address(host))
                log.event(f"connecting to {remote}")
            await self._closed_before(key)
            try:
                need = await host_tls(policy, decision, host)
            except TlsRefusal as refusal:
                reason = refusal.text
                if log is not None:
                    log.event(f"not connecting: {reason}")
                self._count(route, decision, HostTls(), host, reason)
                continue
            unlisted = need.report is not None and not need.report.allows(host.name)
            if need.report is not None and unlisted:
                text = (f"{host.name} is not listed by the MTA-STS policy of "
                        f"{need.report.domain} (testing mode: delivered)")
                self._report(route, host, decision.level, text)
                self._count(route, decision, need, host, text)
            implicit: ssl.SSLContext | None = None
            if decision.implicit and not host.address.startswith("/"):
                implicit = self._context("verify" if need.verify in ("ca", "mta-sts")
                                         else "required")
            tls_at_connect: dict[str, Any] = {} if implicit is None else {
                "ssl": implicit, "server_hostname": self._sni(host, need),
                "ssl_handshake_timeout": self.timeouts["command"]}
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if host.address.startswith("/"):
                        _, pipe = await loop.create_unix_connection(pipe_factory, host.address)
                    elif local_addr is not None:
                        sock = await _connect_from(loop, local_addr[0], host)
                        _, pipe = await loop.create_connection(pipe_factory, sock=sock,
                                                               **tls_at_connect)
                    else:
                        _, pipe = await loop.create_connection(pipe_factory, host.address,
                                                               host.port, **tls_at_connect)
            except ssl.SSLError as exc:  # implicit TLS: the handshake is the connect
                reason = cap_text(f"451 4.7.5 TLS handshake with {remote} failed: {exc}"
                                  + (f" (required by {need.why})" if need.why else ""))
                if log is not None:
                    log.event(f"TLS handshake failed: {exc}")
                self._tls_failed(None, route, reason, host, decision.level)
                self._count(route, decision, need, host, reason)
                if policy is not None:
                    policy.failed(host)
                continue
            except TimeoutError:
                reason = f"451 4.4.1 Connection to {remote} timed out"
                if log is not None:
                    log.event("connect timed out")
                continue
            except OSError as exc:
                reason = f"451 4.4.1 Connection to {remote} failed: {exc.strerror or exc}"
                if log is not None:
                    log.event(f"connect failed: {exc.strerror or exc}")
                continue
            self.connections_opened += 1
            session = _Session(host, pipe, self.timeouts)
            session.key = key
            session.helo_name = helo_name
            session.max_messages = route.max_messages
            session.need = need
            session.route_tls, session.implicit = route.tls, route.implicit_tls
            if implicit is not None:
                pipe.conn.tls = True  # RFC 8314 §3.3: the session starts in TLS
                session.verified = need.verify if need.verify in ("ca", "mta-sts") else ""
            try:
                await self._setup(session, route, lmtp)
            except _Failure as failure:
                reason = failure.text
                session.note(f"giving up: {reason}")
                self._retire(session, polite=not failure.broken)
                if failure.final:
                    break
                continue
            except (ClientProtocolError, OSError) as exc:
                reason = cap_text(f"451 4.5.0 {session.remote}: {exc}")
                session.note(f"giving up: {reason}")
                self._retire(session)
                continue
            except BaseException:
                self._retire(session)
                raise
            session.peer = _peer(session)
            if not session.rpt_failed and not unlisted:
                self._count(route, decision, need, host, None)
            return session, ""
        return None, cap_text(reason)

    async def _setup(self, s: _Session, route: Route, lmtp: bool) -> None:
        greeting = await s.event("greeting")
        if not isinstance(greeting, Greeting):  # pragma: no cover - the first event
            raise _Failure("451 4.5.0 No greeting")
        if greeting.reply.code != 220:
            # RFC 5321 §3.1 and §3.8: a 554 (or 4xx) greeting means "not now": next host.
            raise _Failure(reply_text(greeting.reply))
        ext = await s.hello(s.helo_name, lmtp)
        need = s.need
        if need.starttls and not s.conn.tls:
            if "STARTTLS" in ext:
                reply = await s.command(Command("STARTTLS"))
                if reply.code == 220:
                    verify = need.verify in ("ca", "mta-sts")
                    try:
                        await s.start_tls(self._context("verify" if verify else "required"),
                                          self._sni(s.host, need))
                        s.verified = await self._check_peer(s, route, need)
                    except _Failure as failure:
                        if need.why:
                            failure.text = cap_text(f"{failure.text} (required by {need.why})")
                        self._tls_failed(s, route, failure.text)
                        self._count(route, s.key[2], need, s.host, failure.text)
                        if self.tls_policy is not None:
                            self.tls_policy.failed(s.host)
                        raise
                    self.figures.tls_handshakes[route.site] += 1
                    ext = await s.hello(s.helo_name, lmtp)
                elif need.required or reply.code == 421:
                    raise _Failure(reply_text(reply))
                # opportunistic and refused (454): go on in plaintext, as RFC 3207 §4.1
                # leaves the choice to the client.
            elif need.required:
                missing = _Failure(f"451 4.7.10 {s.remote} does not offer STARTTLS "
                                   f"(TLS required by {need.why})")
                self._tls_failed(s, route, missing.text)
                self._count(route, s.key[2], need, s.host, missing.text)
                raise missing
            elif need.report is not None:
                text = (f"{s.remote} does not offer STARTTLS "
                        "(MTA-STS testing mode: delivered in clear)")
                self._report(route, s.host, s.key[2].level, text)
                self._count(route, s.key[2], need, s.host, text)
                s.rpt_failed = True
        if route.auth is not None:
            await self._auth(s, ext, route.auth, route.plaintext_auth)

    def _tls_failed(self, s: _Session | None, route: Route, reason: str,
                    host: Host | None = None, level: str = "") -> None:
        """Report a connection that could not have the TLS its route asks for (a failed
        handshake, no STARTTLS where TLS is required): a fact of a connection, not of a
        message, so it is told when it happens (docs/tracking.md, TLS_FAIL).  ``s`` is
        None for an implicit TLS connection whose handshake failed (``host`` and
        ``level`` say where and what)."""
        events = self.events
        if events is not None and events.on:
            if s is not None:
                host, level = s.host, s.key[2].level
            assert host is not None
            events.emit(Kind.TLS_FAIL, b"", "", destination=route.destination,
                        site=route.site, host=host.name, address=_address(host),
                        tls=route.tls, level=level, reason=reason)

    async def _check_peer(self, s: _Session, route: Route, need: HostTls) -> str:
        """How the certificate of a fresh TLS connection was verified: "ca" or "mta-sts"
        (OpenSSL did it in the handshake), "dane-ee"/"dane-ta" (the chain matched the
        host's TLSA records, RFC 7672 §3), "" (not checked); a _Failure when DANE finds no
        match.  An MTA-STS testing policy's check is reported, never enforced."""
        if need.verify in ("ca", "mta-sts"):
            return need.verify
        if need.verify == "dane":
            how, why = match(need.tlsa, _chain(s.transport), s.host.name)
            if not how:
                s.note(f"DANE: {why}")
                raise _Failure(f"451 4.7.5 DANE authentication of {s.remote} failed: {why}",
                               broken=True)
            return how
        if need.report is not None:
            anchors = self._anchors
            if not anchors:
                anchors = self._anchors = await asyncio.get_running_loop().run_in_executor(
                    None, load_anchors, self._ca_file)
            why = verify_chain(_chain(s.transport), s.host.name, anchors)
            if why:
                text = f"{why} (MTA-STS testing mode: delivered)"
                self._report(route, s.host, s.key[2].level, text)
                self._count(route, s.key[2], need, s.host, text)
                s.rpt_failed = True
        return ""

    def _report(self, route: Route, host: Host, level: str, reason: str) -> None:
        """What an MTA-STS testing policy would have refused (RFC 8461 §5: "testing"
        delivers, and reports): a TLS_FAIL event with ``tls = "mta-sts-testing"``."""
        events = self.events
        if events is not None and events.on:
            events.emit(Kind.TLS_FAIL, b"", "", destination=route.destination,
                        site=route.site, host=host.name, address=_address(host),
                        tls="mta-sts-testing", level=level, reason=cap_text(reason))

    def _count(self, route: Route, decision: Decision, need: HostTls, host: Host,
               failure: str | None) -> None:
        """A session for TLS-RPT (RFC 8460): a success (``failure`` None) or a failure with
        its reason, under the policy it was made under; nothing without reports or when
        no policy applied."""
        policy = self.tls_policy
        reports = policy.reports if policy is not None else None
        if reports is None:
            return
        named = report_policy(route.destination, decision, need)
        if named is None:
            return
        if failure is None:
            reports.success(named)
        else:
            reports.failure(named, failure, host.name, host.address)

    def _sni(self, host: Host, need: HostTls) -> str | None:
        name = host.name.rstrip(".")
        if not name or name.startswith("["):
            return host.address if need.verify in ("ca", "mta-sts") else None
        return name

    def _context(self, mode: TlsMode) -> ssl.SSLContext:
        context = self._contexts.get(mode)
        if context is None:
            if self._tls_context_factory is not None:
                context = self._tls_context_factory(mode)
            elif mode == "verify":
                context = ssl.create_default_context(cafile=self._ca_file)
            else:
                # Opportunistic and "required" TLS protect against passive listening only
                # (RFC 7435): the certificate is not checked.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._contexts[mode] = context
        return context

    async def _auth(self, s: _Session, ext: Extensions, auth: tuple[str, str],
                    plaintext: bool) -> None:
        user, password = auth
        if not s.conn.tls and not plaintext:
            raise _Failure(f"451 4.7.11 Not sending credentials to {s.remote} without TLS")
        mechanisms = ext.auth
        if "PLAIN" in mechanisms:
            # RFC 4616: authzid NUL authcid NUL passwd, as the initial response (RFC 4954).
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            # secret=True: the protocol log shows "AUTH PLAIN ****" and "****" for these.
            reply = await s.command(Command("AUTH", arg="PLAIN", initial=token), secret=True)
            if reply.code == 334:
                s.write(s.conn.send_auth_response(token), secret=True)
                reply = await s.reply("command")
        elif "LOGIN" in mechanisms:
            reply = await s.command(Command("AUTH", arg="LOGIN"))
            for secret in (user, password):
                if reply.code != 334:
                    break
                s.write(s.conn.send_auth_response(base64.b64encode(secret.encode()).decode()),
                        secret=True)
                reply = await s.reply("command")
        else:
            raise _Failure(f"451 4.7.0 {s.remote} offers no AUTH mechanism we support")
        if reply.code != 235:
            # A 5xx here is wrong credentials: the other hosts would say the same, and
            # each try could count towards a lockout.
            raise _Failure(reply_text(reply), final=reply.code // 100 == 5)

    # --- one transaction -------------------------------------------------------------

    async def _transaction(
        self, s: _Session, t: Transaction, exchange: Awaitable[bool],
    ) -> tuple[list[RcptResult], bool]:
        """Results for ``t``'s recipients and whether the session may be pooled again,
        once ``exchange`` (which feeds ``t`` the replies) is over; the answers ``t`` had
        are kept when it failed half-way, the others are DEFERRED with the reason."""
        try:
            keep = await exchange
        except _Failure as failure:
            if failure.stale:
                s.note(f"stale pooled connection: {failure.text}")
                raise
            reason = failure.text
            keep = False
            s.note(f"giving up: {reason}")
        except (ClientProtocolError, OSError) as exc:
            reason = cap_text(f"451 4.5.0 {s.remote}: {exc}")
            keep = False
            s.note(f"giving up: {reason}")
        else:
            reason = "451 4.5.0 No reply"  # every recipient has a result by now
        if not t.done:
            t.lost()
        return t.outcome(reason), keep and not s.pipe.closed


#: Linux's IP_BIND_ADDRESS_NO_PORT (include/uapi/linux/in.h; Python 3.11 lacks the name).
_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def _connect_from(loop: asyncio.AbstractEventLoop, local: str, host: Host) -> socket.socket:
    """A TCP connection to ``host`` from local address ``local``.

    Bound with IP_BIND_ADDRESS_NO_PORT where the system has it: the local port is then
    chosen at connect, unique per (local, remote) pair, as for an unbound socket.  A plain
    bind to port 0 must find a port free for every destination and cannot take one in
    TIME_WAIT: with thousands of connections retired each minute (every
    ``max_messages_per_connection``) each bind scans the port range, milliseconds of
    kernel time per connection, and the range runs out at ~28,000 connections."""
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not Linux: a plain bind
            sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
        sock.bind((local, 0))
        await loop.sock_connect(sock, (host.address, host.port))
    except BaseException:
        sock.close()
        raise
    return sock


def _address(host: Host) -> str:
    """A next hop's "IP:port" ("[IPv6]:port"), or its path for a Unix socket."""
    address = host.address
    if address.startswith("/"):
        return address
    return f"[{address}]:{host.port}" if ":" in address else f"{address}:{host.port}"


def _tls(transport: asyncio.BaseTransport) -> tuple[str, str] | None:
    """The TLS version and cipher of a connection, None in clear."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    return obj.version() or "?", cipher[0] if cipher else "?"


def _chain(transport: asyncio.BaseTransport) -> list[bytes]:
    """The certificates the server presented (DER, its own first), as sent: Python 3.11
    has no public accessor (3.13's ``get_unverified_chain``), the ``_ssl`` object has."""
    obj = transport.get_extra_info("ssl_object")
    inner = getattr(obj, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in getter() or ()]  # type: ignore[attr-defined]
    leaf = obj.getpeercert(binary_form=True) if obj is not None else None
    return [leaf] if leaf else []


def _peer(s: _Session) -> Peer:
    """The peer of a ready session: once per connection, never per message."""
    tls = _tls(s.transport)
    return Peer(s.host.name, _address(s.host), " ".join(tls) if tls else "",
                s.verified if tls else "")


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


class _Exchange:
    """Drives one :class:`Transaction` over a session, reply by reply as they arrive.

    The pipe calls ``advance`` whenever bytes (or the end of the connection) arrive, so
    the replies to MAIL, the RCPTs and DATA, the body write and the replies after it cost
    no coroutine wake-up each: the delivering task waits once, on the future.  The same
    driver serves servers with and without PIPELINING: the transaction says what to
    write after each reply (everything at once, or one command per reply).  Each reply
    has its phase's timeout (RFC 5321 §4.5.3.2), counted from the previous reply; the
    body write has the data block timeout while the transport holds it back.  Failures
    end the future with ``_Failure``.

    Follow-on messages: when the 354 arrives and the caller's queue for this connection
    (``follow_ons``) holds a prepared message, its MAIL, RCPTs and DATA go in the same
    write as this body (RFC 2920 §3.1: the message content may be the first command of a
    group).  That exchange (``next``) takes over the pipe when this one has its final
    reply, and fails with it when the connection breaks first; it is the message's
    ``handle``, and its caller collects it with ``SmtpAgent.resume`` (``results``).  One
    write and one wake-up per message instead of two when messages queue for a site.
    """

    __slots__ = ("agent", "follow_ons", "future", "next", "phase", "s", "t")

    def __init__(self, agent: SmtpAgent, s: _Session, t: Transaction,
                 follow_ons: FollowOns | None) -> None:
        self.agent = agent
        self.s = s
        self.t = t
        self.follow_ons = follow_ons
        self.next: _Exchange | None = None
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        #: The reply awaited, for its timeout: the transaction's phase, or "body" while
        #: the transport holds the body back.
        self.phase = t.phase

    async def run(self) -> bool:
        """Send the first commands and wait for the end; whether the session may be kept."""
        t, s = self.t, self.s
        data = t.start()
        if t.done:
            return True  # refused before anything was sent: the connection is untouched
        s.messages += 1
        s.write(data)
        pipe = s.pipe
        pipe.handler = self
        try:
            self._deadline(t.phase)
            self.advance()  # a closed connection says so now
            return await self.future
        finally:
            if pipe.handler is self:
                pipe.handler = None

    def _deadline(self, phase: str) -> None:
        self.phase = phase
        s = self.s
        s.pipe.set_deadline(asyncio.get_running_loop().time() + s.timeouts[phase])

    def advance(self) -> None:
        future = self.future
        s, t = self.s, self.t
        conn = s.conn
        pipe = s.pipe
        answered = False
        try:
            while not future.done():
                if pipe.error is not None:
                    raise pipe.error
                event = conn.next_event()
                if event is NEED_DATA:
                    if not pipe.eof:
                        # The next reply's timeout runs from the last one answered: armed
                        # once for the replies that came together, not once each.
                        if answered:
                            self._deadline(self.phase)
                        return
                    conn.receive_data(b"")
                    continue
                assert isinstance(event, Response)
                before = t.phase
                data = t.receive(s.first_checked(event.reply, before))
                answered = True
                if t.done:
                    s.needs_rset = not t.clean
                    future.set_result(t.keep)
                    break
                phase = t.phase
                if data:
                    if phase is END_OF_DATA and before is not END_OF_DATA:
                        # The 354: the body, then maybe the next message's commands.
                        follow = self._follow_on()
                        if s.log is not None:
                            s.log.event(f"message body {len(data)} octets sent")
                            if follow:
                                s.log.send(follow)
                        s.transport.write(data + follow if follow else data)
                        if pipe.write_paused:
                            phase = "body"
                    else:
                        s.write(data)
                self.phase = phase
            pipe.consumed()
        except ReplyError as exc:
            self._fail(s.broken_reply(exc, self.phase))
        except _Failure as failure:
            self._fail(failure)
        except (ClientProtocolError, OSError) as exc:
            self._fail(_Failure(f"451 4.5.0 {s.remote}: {exc}", broken=True))
        except Exception as exc:  # a bug: surface it in the delivering task, not the loop
            if not future.done():
                future.set_exception(exc)
        if pipe.handler is self:
            # Done: the follow-on, if any, reads what comes next.
            pipe.handler = nxt = self.next
            if nxt is not None and not nxt.future.done():
                nxt._deadline(nxt.t.phase)
                nxt.advance()

    async def results(self) -> list[RcptResult]:
        """This follow-on message's results, once its transaction is over (its caller's
        ``resume``); the connection goes back to the pool or away after the last one."""
        s, agent = self.s, self.agent
        keep = False
        try:
            out, keep = await agent._transaction(s, self.t, self.future)
        finally:
            agent._done_with(s, keep, self)
        return out

    def _follow_on(self) -> bytes:
        """The next message's MAIL, RCPTs and DATA to send behind this body, if the
        caller has one ready for this connection and it may carry it; b"" otherwise."""
        follow_ons = self.follow_ons
        s, agent, t = self.s, self.agent, self.t
        if (not follow_ons or not t.pipelining or not t.accepted or t.more
                or self.next is not None or s.follow_on not in (None, self)
                or agent.closing
                or s.messages >= (s.max_messages or agent.max_messages_per_connection)):
            return b""
        policy = agent.tls_policy
        if policy is not None:
            # The scheduler matched the site and the route's TLS mode, not the policy: a
            # domain with its own MTA-STS policy (or DNSSEC status) needs a connection
            # made under that policy, never this one.
            job = follow_ons[0]
            destination = job.envelope.recipients[job.recipients[0]].next_hop
            if policy.cached_for(destination, s.route_tls, s.implicit) != s.key[2]:
                return b""
        job = follow_ons.popleft()
        nt = Transaction(s.conn, job.envelope, job.recipients, job.body, remote=s.remote,
                         peer=s.peer)
        data = nt.start()
        if nt.done:  # refused before anything was sent
            job.handle = Settled(nt.outcome(""))
            return b""
        s.messages += 1
        agent.follow_ons += 1
        nxt = _Exchange(agent, s, nt, follow_ons)
        # Its caller may be gone by the time it fails (a stop): never an unretrieved error.
        nxt.future.add_done_callback(_retrieve)
        self.next = s.follow_on = nxt
        job.handle = nxt
        return data

    def drained(self) -> None:
        if self.phase == "body":
            self._deadline(END_OF_DATA)

    def expired(self) -> None:
        text = (f"451 4.4.2 Timeout sending to {self.s.remote}" if self.phase == "body" else
                f"451 4.4.2 Timeout waiting for the {self.phase} reply from {self.s.remote}")
        self._fail(_Failure(text, broken=True))

    def _fail(self, failure: _Failure) -> None:
        if not self.future.done():
            self.future.set_exception(failure)
        if self.next is not None:
            self.next._fail(failure)  # its commands went on the same broken connection

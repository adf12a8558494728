"""One inbound SMTP connection: the asyncio glue around ``engine.protocol.server``.

The protocol object pumps bytes into the sans-I/O ``ServerConnection``, answers the events
that need a decision (relay control, AUTH, storing the message), writes the replies, and
keeps the clocks (idle timeout, whole-message timeout, minimum data rate).  Decisions that
take time (storing a message, checking a password) run as tasks while reading is paused,
so a pipelining client cannot make input pile up, and replies stay in order.  A finished
message goes to ingest as one ``Arrival`` value; a task that raises is answered 451 and
logged with its traceback.  A refused MAIL or RCPT and a failed AUTH get one line each on
the operator's log (``engine.ops.maillog``), written on the refusal path only.

It must never block the event loop (scrypt runs in a thread, LMDB commits in the queue's
writer thread) and never parse SMTP itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from engine.agents.api import ACCEPT, Action, Effects, Stage, Transaction, Verdict, refusal
from engine.agents.api import Session as AgentSession
from engine.agents.chain import Screened
from engine.ops import maillog
from engine.protocol import server as sm
from engine.protocol.events import NEED_DATA
from engine.protocol.reply import format_reply
from engine.protocol.sasl import (
    Challenge,
    Credentials,
    SaslFailure,
    ServerMechanism,
    mechanism,
)
from engine.server.ingest import Arrival

if TYPE_CHECKING:
    from engine.ops.protolog import SessionLog
    from engine.server.service import Connector

Reply = tuple[int, str, str]

S421_SHUTDOWN = (421, "4.3.2", "Service shutting down, closing connection")
S421_IDLE = (421, "4.4.2", "Idle timeout, closing connection")
S421_SLOW = (421, "4.4.2", "Data rate too low, closing connection")
S421_TOO_MANY_MESSAGES = (421, "4.7.0", "Too many messages in one connection, reconnect")
S421_AUTH_FAILURES = (421, "4.7.0", "Too many authentication failures, closing connection")
S452_STORAGE = (452, "4.3.1", "Insufficient system storage, try again later")
S451_LOCAL_ERROR = (451, "4.3.0", "Local error in processing, try again later")
S235_AUTH_OK = (235, "2.7.0", "Authentication successful")
S535_AUTH_FAILED = (535, "5.7.8", "Authentication credentials invalid")
S250_SENDER = (250, "2.1.0", "Sender OK")
S250_RECIPIENT = (250, "2.1.5", "Recipient OK")
S252_VRFY = (252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
S354_DATA = (354, "", "End data with <CR><LF>.<CR><LF>")
S220_TLS = (220, "2.0.0", "Ready to start TLS")
S454_TLS = (454, "4.7.0", "TLS not available due to temporary reason")
S250_DISCARDED = (250, "2.0.0", "Ok: discarded")

_session_ids = itertools.count(1)

log = logging.getLogger("ferry.server")


class SmtpSession(asyncio.Protocol):
    """Serves one client connection for one receive connector."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.config = connector.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn = sm.ServerConnection(connector.settings)
        self.session_id = f"{connector.name}-{next(_session_ids):x}"
        self.client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.client = "?"
        self.log: SessionLog | None = None
        self.auth_user = ""
        self.auth_failures = 0
        #: the mechanism of the AUTH in progress, for the log line of a failure
        self.auth_mechanism = ""
        self.messages = 0
        self._mechanism: ServerMechanism | None = None
        self._busy: asyncio.Task[None] | None = None
        self._last_activity = self.loop.time()
        self._data_started = 0.0
        self._data_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._paused_by_writer = False
        #: Reading was paused while a decision ran (input came, or the client stopped
        #: reading our replies): the decision's end resumes it.
        self._held = False
        self._closing = False
        self.tls_info = ""
        #: What the policy agents see of this connection (engine.agents.api.Session):
        #: made anew when it changes (HELO, STARTTLS, AUTH).
        self.view: AgentSession | None = None
        #: The transaction from MAIL to the end of its message.
        self.tx: Transaction | None = None
        #: What connect- and HELO-stage verdicts asked of every message of the session.
        self._sticky = Effects()

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip, self.client = self.connector.peer(peer[0] if peer else "0.0.0.0")
        self.log = self.connector.protolog.session(self.session_id, self.client)
        refusal = self.connector.admit(self)
        if self.conn.tls:
            self._note_tls()
        self.log.event("connect" + (f" refused: {refusal[2]}" if refusal else ""))
        if refusal is not None:
            # Not admitted: say why once (RFC 5321 §3.1 allows 554 as the greeting).
            self._write_reply(refusal)
            self._close()
            return
        ip = self.client_ip
        self.view = AgentSession(
            self.session_id, self.connector.name, ip, tls=self.conn.tls,
            tls_info=self.tls_info, may_relay=self.connector.relay.may_relay(ip, False))
        chain = self.connector.chain
        if chain.wants(Stage.CONNECT):
            verdict = chain.run(Stage.CONNECT, self.view)
            if isinstance(verdict, Verdict):
                self._connect_verdict(verdict)
            else:
                transport.pause_reading()
                self._busy = self.loop.create_task(self._connect_later(verdict))
            return
        self._start()

    async def _connect_later(self, pending: Awaitable[Verdict]) -> None:
        verdict = await pending
        self._busy = None
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._connect_verdict(verdict)

    def _connect_verdict(self, verdict: Verdict) -> None:
        """Greet, or refuse the connection in place of the greeting: 554 for a refusal
        (RFC 5321 §3.1), 421 for a temporary one (§3.8)."""
        action = verdict.action
        if action is Action.REJECT or action is Action.TEMPFAIL:
            code, enhanced, text = refusal(verdict)
            reply = (554 if code >= 500 else 421, enhanced, text)
            if self.log is not None:
                self.log.event(f"connect refused by {verdict.reason}")
            maillog.refused("CONNECT", reply, client=self.client, helo="", sender="",
                            connector=self.connector.name, by=verdict.reason)
            self._write_reply(reply)
            self._close()
            return
        self._sticky.note(verdict)
        self._start()

    def _start(self) -> None:
        if self.config.greet_delay > 0:
            self._timer = self.loop.call_later(self.config.greet_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        # Input that arrived during greet_delay makes send_greeting answer 554 and close.
        self.conn.send_greeting(self.config.banner(self.connector.hostname))
        if self.conn.closed and self.log is not None:
            self.log.event("early talker refused")
        self._flush()
        if self.conn.closed:
            self._close()
            return
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self._last_activity = self.loop.time()
        if self.conn.state is sm.State.S_DATA or self.conn.state is sm.State.S_BDAT:
            self._data_bytes += len(data)
        self.conn.receive_data(data)
        if self._busy is None:
            self._pump()
        elif not self._held and self.transport is not None:
            # A pipelining client's next commands while a decision runs (see _run): they
            # wait in the buffer, and nothing more is read until the reply is written.
            self._held = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.conn.receive_data(b"")
        if self._busy is None:
            self._pump()
            return None
        # The client closed its side while a decision runs: its reply is still owed, then
        # the pump sees the end and closes.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.view is not None:
            self.connector.chain.disconnect(self.view)
        if self.log is not None:
            self.log.event("disconnect" + (f": {exc}" if exc else ""))
        self.connector.release(self)
        # A commit in flight finishes in the queue's writer (at-least-once): the client
        # saw no 250 and will send again; nothing is lost.

    def pause_writing(self) -> None:
        # The client does not read our replies: stop reading its commands until it does.
        self._paused_by_writer = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_by_writer = False
        if self.transport is not None:
            if self._busy is None:
                self.transport.resume_reading()
            else:
                self._held = True  # the decision's end resumes reading

    # --- the pump --------------------------------------------------------------------

    def _pump(self) -> None:
        conn = self.conn
        while not conn.closed:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, sm.Event)
            self._log_event(event)
            if event.needs_reply:
                answer = self._decide(event)
                if isinstance(answer, tuple):
                    self._reply(event, answer)
                else:
                    self._run(event, answer)
                    break
            elif isinstance(event, sm.Closed):
                break
            elif type(event) is sm.Rejected:
                self._rejected(event)
            elif type(event) is sm.MessageRefused:
                self.connector.refused_messages[event.code // 100] += 1
        self._flush()
        if conn.closed:
            self._close()

    def _run(self, event: sm.Event, work: Awaitable[Reply]) -> None:
        """Answer ``event`` when ``work`` is done; handle nothing the client sends meanwhile
        (what comes is buffered, and reading pauses then: data_received).  Reading is not
        paused up front: a client that waits for the reply sends nothing, and a pause and
        a resume per message cost the event loop two epoll changes."""
        assert self.transport is not None

        async def finish() -> None:
            try:
                answer = await work
            except Exception:
                # A bug or an unexpected failure in ingest or AUTH: the client may retry
                # (a 4xx loses nothing), and the operator needs the traceback to fix it.
                log.exception("session %s [%s]: %s failed; answered 451", self.session_id,
                              self.client, type(event).__name__)
                answer = S451_LOCAL_ERROR
            self._busy = None
            if self.transport is None or self.transport.is_closing():
                return
            self._reply(event, answer)
            if self._held:
                self._held = False
                if not self._paused_by_writer:
                    self.transport.resume_reading()
            self._pump()

        self._busy = self.loop.create_task(finish())

    def _reply(self, event: sm.Event, answer: Reply) -> None:
        code = answer[0]
        self.conn.reply(*answer)
        if code >= 400 and type(event) is sm.MessageReceived:
            self.connector.refused_messages[code // 100] += 1
            self.connector.refused_recipients[code // 100] += len(event.recipients)
        if isinstance(event, sm.StartTLS) and code == 220:
            self._flush()
            self._run_tls()
        elif code == 421:
            self._flush()

    # --- decisions -------------------------------------------------------------------

    def _decide(self, event: sm.Event) -> Reply | Awaitable[Reply]:
        if self._closing:
            return S421_SHUTDOWN
        handler = _DECISIONS.get(type(event))
        if handler is None:
            raise RuntimeError(f"no decision for {type(event).__name__}")
        return handler(self, event)

    def _on_hello(self, event: sm.Event) -> Reply | Awaitable[Reply]:
        assert isinstance(event, sm.Hello) and self.view is not None
        cmd = event.command
        self.view = dataclasses.replace(self.view, helo=cmd.arg, esmtp=cmd.verb == "EHLO")
        ok = (250, "", f"{self.connector.hostname} Hello {cmd.arg} [{self.client}]")
        chain = self.connector.chain
        if not chain.wants(Stage.HELO):
            return ok
        verdict = chain.run(Stage.HELO, self.view)
        if isinstance(verdict, Verdict):
            return self._hello_verdict(verdict, ok)
        return self._later(verdict, self._hello_verdict, ok)

    def _hello_verdict(self, verdict: Verdict, ok: Reply) -> Reply:
        if verdict.action is Action.REJECT or verdict.action is Action.TEMPFAIL:
            return refusal(verdict)
        self._sticky.note(verdict)
        return ok

    async def _later(self, pending: Awaitable[Verdict],
                     then: Callable[[Verdict, Any], Reply], arg: Any) -> Reply:
        return then(await pending, arg)

    def _on_mail(self, event: sm.Event) -> Reply | Awaitable[Reply]:
        if self.messages >= self.config.max_messages_per_connection:
            return self._refused(event, S421_TOO_MANY_MESSAGES)
        # Refuse early (RFC 5321 §4.5.3.1.10 style) rather than take a body we cannot store.
        problem = self.connector.store.pressure()
        if problem is not None:
            self.connector.pressure_refused(problem)
            return self._refused(event, S452_STORAGE)
        assert isinstance(event, sm.MailFrom) and self.view is not None
        sticky = self._sticky
        self.tx = tx = Transaction(event.command, changes=list(sticky.changes),
                                   held=sticky.held, discarded=sticky.discarded)
        chain = self.connector.chain
        if not chain.wants(Stage.MAIL):
            return S250_SENDER
        verdict = chain.run(Stage.MAIL, self.view, tx)
        if isinstance(verdict, Verdict):
            return self._envelope_verdict(verdict, event)
        return self._later(verdict, self._envelope_verdict, event)

    def _envelope_verdict(self, verdict: Verdict, event: sm.Event) -> Reply:
        """A MAIL or RCPT stage verdict as the reply to ``event``."""
        if verdict.action is Action.REJECT or verdict.action is Action.TEMPFAIL:
            return self._refused(event, refusal(verdict), verdict.reason)
        tx = self.tx
        assert tx is not None
        tx.note(verdict)
        if isinstance(event, sm.RcptTo):
            tx.recipients += (event.command,)
            return S250_RECIPIENT
        return S250_SENDER

    def _on_rcpt(self, event: sm.Event) -> Reply | Awaitable[Reply]:
        assert isinstance(event, sm.RcptTo)
        tx = self.tx
        assert tx is not None
        # Relay control is the chain's first agent (engine.agents.relay.RelayAgent).
        verdict = self.connector.chain.run(Stage.RCPT, self.view, tx, event.command)
        if verdict is ACCEPT:
            tx.recipients += (event.command,)
            return S250_RECIPIENT
        if isinstance(verdict, Verdict):
            return self._envelope_verdict(verdict, event)
        return self._later(verdict, self._envelope_verdict, event)

    def _rejected(self, event: sm.Rejected) -> None:
        """A MAIL or RCPT the protocol refused itself (530 before AUTH or STARTTLS, too
        many recipients, a bad address) gets the operator's line too; other commands'
        syntax errors do not."""
        line = self.conn.last_line
        verb = line[:4].upper()
        if verb not in (b"MAIL", b"RCPT"):
            return
        if verb == b"MAIL":
            self.connector.refused_messages[event.code // 100] += 1
        else:
            self.connector.refused_recipients[event.code // 100] += 1
        # The address as written, for the log line only (it may be what was wrong).
        address = line[line.find(b":") + 1:].split(b">", 1)[0].strip().lstrip(b"<")
        written = address[:256].decode("utf-8", "replace")
        transaction = self.conn.transaction
        if verb == b"MAIL":
            sender, recipient = written, ""
        else:
            sender = transaction.mail.mailbox if transaction is not None else ""
            recipient = written or "?"
        maillog.refused(verb.decode(), (event.code, event.enhanced, event.text),
                        client=self.client, helo=self.conn.helo or "", sender=sender,
                        recipient=recipient, connector=self.connector.name)

    def _refused(self, event: sm.Event, reply: Reply, by: str = "") -> Reply:
        """Log a refused MAIL or RCPT (the operator's line, engine.ops.maillog); ``reply``.
        ``by``: the policy agent that refused, and why."""
        assert isinstance(event, (sm.MailFrom, sm.RcptTo))
        transaction = self.conn.transaction
        if isinstance(event, sm.MailFrom):
            command, sender, recipient = "MAIL", event.command.mailbox, ""
            self.connector.refused_messages[reply[0] // 100] += 1
        else:
            command, recipient = "RCPT", event.command.mailbox
            self.connector.refused_recipients[reply[0] // 100] += 1
            sender = transaction.mail.mailbox if transaction is not None else ""
        maillog.refused(command, reply, client=self.client, helo=self.conn.helo or "",
                        sender=sender, recipient=recipient, connector=self.connector.name,
                        by=by)
        return reply

    def _on_data(self, event: sm.Event) -> Reply:
        self._data_started = self.loop.time()
        self._data_bytes = 0
        return S354_DATA

    def _on_message(self, event: sm.Event) -> Awaitable[Reply]:
        assert isinstance(event, sm.MessageReceived)
        self.messages += 1
        self._data_started = 0.0
        tx, self.tx = self.tx, None
        if tx is None:  # (a protocol bug: no MAIL was answered 250)
            tx = Transaction(event.mail, event.recipients)
        return self._message(event, tx)

    async def _message(self, event: sm.MessageReceived, tx: Transaction) -> Reply:
        """The end-of-data and sign stages, then ingest: 250 only after the commit."""
        chain = self.connector.chain
        view = self.view
        assert view is not None
        body = event.body
        held = ""
        if chain.screens(view, tx):
            # At once when no agent waits (Chain.screen_now): no coroutine a message.
            screened = chain.screen_now(view, tx, body)
            if not isinstance(screened, Screened):
                screened = await screened
            if screened.refused is not None:
                return self._message_refused(event, refusal(screened.refused),
                                             screened.refused.reason)
            if screened.discarded:
                maillog.discarded(screened.discarded, client=self.client,
                                  sender=event.mail.mailbox,
                                  recipients=[r.mailbox for r in event.recipients],
                                  connector=self.connector.name)
                return S250_DISCARDED
            body, held = screened.data, screened.held
        conn = self.conn
        return await self.connector.ingest.accept(Arrival(
            connector=self.config, client_address=self.client, helo=conn.helo or "",
            esmtp=conn.esmtp, tls=conn.tls, tls_info=self.tls_info, auth_user=self.auth_user,
            mail=event.mail, recipients=event.recipients, body=body, held=held))

    def _message_refused(self, event: sm.MessageReceived, reply: Reply, by: str) -> Reply:
        """Log a message a policy agent refused at the end of data; ``reply``."""
        maillog.refused("DATA", reply, client=self.client, helo=self.conn.helo or "",
                        sender=event.mail.mailbox,
                        recipient=",".join(r.mailbox for r in event.recipients),
                        connector=self.connector.name, by=by)
        return reply

    def _on_verify(self, event: sm.Event) -> Reply:
        return S252_VRFY

    def _on_starttls(self, event: sm.Event) -> Reply:
        return S220_TLS if self.connector.tls_context is not None else S454_TLS

    def _on_auth_start(self, event: sm.Event) -> Reply | Awaitable[Reply]:
        assert isinstance(event, sm.AuthStart)
        self.auth_mechanism = event.mechanism.upper()
        self._mechanism = mechanism(event.mechanism)
        return self._sasl(self._mechanism.start(event.initial))

    def _on_auth_response(self, event: sm.Event) -> Reply | Awaitable[Reply]:
        assert isinstance(event, sm.AuthResponse) and self._mechanism is not None
        return self._sasl(self._mechanism.step(event.data))

    def _sasl(self, step: object) -> Reply | Awaitable[Reply]:
        if isinstance(step, Challenge):
            return (334, "", step.text)
        self._mechanism = None
        if isinstance(step, Credentials):
            return self._check_credentials(step)
        assert isinstance(step, SaslFailure)
        return self._auth_failed((step.code, step.enhanced, step.text))

    async def _check_credentials(self, creds: Credentials) -> Reply:
        ok = await self.connector.authenticator.check(creds.username, creds.password)
        ok = ok and creds.authzid in ("", creds.username)
        chain = self.connector.chain
        if chain.wants(Stage.AUTH):
            assert self.view is not None
            answer = chain.run(Stage.AUTH, self.view, creds.username, ok)
            verdict = answer if isinstance(answer, Verdict) else await answer
            if verdict.action is Action.REJECT or verdict.action is Action.TEMPFAIL:
                # A lockout: the session ends (the agent's text says why).
                _, enhanced, text = refusal(verdict)
                reply = (421, enhanced, text)
                maillog.auth_failed(self.auth_mechanism, creds.username, reply,
                                    client=self.client, helo=self.conn.helo or "",
                                    connector=self.connector.name)
                return reply
        if ok:
            self.auth_user = creds.username
            assert self.view is not None and self.client_ip is not None
            self.view = dataclasses.replace(
                self.view, auth_user=creds.username,
                may_relay=self.connector.relay.may_relay(self.client_ip, True))
            return S235_AUTH_OK
        return self._auth_failed(S535_AUTH_FAILED, creds.username)

    def _auth_failed(self, reply: Reply, user: str = "") -> Reply:
        self.auth_failures += 1
        if self.auth_failures >= self.config.max_auth_failures:
            reply = S421_AUTH_FAILURES
        # The user name the client gave, never the password (it is not handed here).
        maillog.auth_failed(self.auth_mechanism, user, reply, client=self.client,
                            helo=self.conn.helo or "", connector=self.connector.name)
        return reply

    # --- TLS -------------------------------------------------------------------------

    def _run_tls(self) -> None:
        assert self.transport is not None
        context = self.connector.tls_context
        assert context is not None
        self.transport.pause_reading()

        async def handshake() -> None:
            assert self.transport is not None
            try:
                transport = await self.loop.start_tls(
                    self.transport, self, context, server_side=True,
                    ssl_handshake_timeout=self.config.idle_timeout)
            except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
                self.connector.tls_failures += 1
                if self.log is not None:
                    self.log.event(f"TLS handshake failed: {exc}")
                self._busy = None
                self._close()
                return
            self._busy = None
            if transport is None:
                self._close()
                return
            self.transport = transport
            self.conn.tls_started()
            # RFC 3207 §4.2: what the client told us before TLS is discarded, an AUTH
            # included (tls_started() forgets it in the protocol; the user goes here).
            self.auth_user = ""
            self._note_tls()
            if self.view is not None and self.client_ip is not None:
                self.view = dataclasses.replace(
                    self.view, helo="", esmtp=False, tls=True, tls_info=self.tls_info,
                    auth_user="", may_relay=self.connector.relay.may_relay(self.client_ip,
                                                                            False))
            self._last_activity = self.loop.time()
            transport.resume_reading()

        self._busy = self.loop.create_task(handshake())

    def _note_tls(self) -> None:
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is not None:
            self.connector.tls_handshakes += 1
            cipher = obj.cipher()
            self.tls_info = f"version={obj.version()} cipher={cipher[0] if cipher else '?'}"
            if self.log is not None:
                self.log.event("TLS established: " + self.tls_info)

    # --- output, clocks, closing -----------------------------------------------------

    def _write_reply(self, reply: Reply) -> None:
        assert self.transport is not None
        code, enhanced, text = reply
        data = format_reply(code, enhanced, [text])
        if self.log is not None:
            self.log.send(data)
        self.transport.write(data)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            if self.log is not None:
                self.log.send(data)
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _log_event(self, event: sm.Event) -> None:
        log = self.log
        # (the session's own flag: a property of the connector's log on every SMTP event
        # cost ~0.1 us, logs on or off)
        if log is None or not log.on:
            return
        # a tuple: "A | B" would build a union object for every event
        if isinstance(event, (sm.MessageReceived, sm.MessageRefused)):
            log.event(f"message {event.size} octets")
            return
        line = self.conn.last_line
        if line:
            # (the first byte's test spares most lines a copy to upper-case)
            secret = self.conn.last_line_secret or (
                line[0] in b"Aa" and line[:5].upper() == b"AUTH ")
            log.recv(line, secret=secret)
            self.conn.last_line = b""

    def _arm_timer(self) -> None:
        self._timer = self.loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        """Once a second: idle timeout, whole-DATA timeout, minimum data rate."""
        now = self.loop.time()
        cfg = self.config
        reply: Reply | None = None
        in_body = self.conn.state in (sm.State.S_DATA, sm.State.S_BDAT)
        if self._busy is None and now - self._last_activity >= cfg.idle_timeout:
            reply = S421_IDLE
        elif in_body and self._data_started:
            elapsed = now - self._data_started
            if elapsed >= cfg.data_timeout:
                reply = S421_IDLE
            elif (cfg.min_data_rate and elapsed >= cfg.data_rate_grace
                  and self._data_bytes / elapsed < cfg.min_data_rate):
                reply = S421_SLOW
        if reply is not None:
            if self.log is not None:
                self.log.event(f"closing: {reply[2]}")
            self._write_reply(reply)
            self._close()
            return
        self._arm_timer()

    def shutdown(self) -> None:
        """SIGTERM: an idle session gets 421 now; a busy one after its pending reply."""
        self._closing = True
        if self._busy is None and self.transport is not None:
            self._write_reply(S421_SHUTDOWN)
            self._close()


_Decision = Callable[[SmtpSession, sm.Event], "Reply | Awaitable[Reply]"]

#: The decision table: one method per event type that needs a reply.
_DECISIONS: dict[type[sm.Event], _Decision] = {
    sm.Hello: SmtpSession._on_hello,
    sm.MailFrom: SmtpSession._on_mail,
    sm.RcptTo: SmtpSession._on_rcpt,
    sm.DataCommand: SmtpSession._on_data,
    sm.MessageReceived: SmtpSession._on_message,
    sm.Verify: SmtpSession._on_verify,
    sm.StartTLS: SmtpSession._on_starttls,
    sm.AuthStart: SmtpSession._on_auth_start,
    sm.AuthResponse: SmtpSession._on_auth_response,
}

"""The outbound SMTP/LMTP agent over real sockets on 127.0.0.1.

Well-behaved peers are aiosmtpd servers (in their own thread); pipelining checks, LMTP and
the malicious servers are small raw asyncio servers in the test's uvloop loop, so every
byte the agent sends and every way a reply can be broken is under the test's control.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import smtplib
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from engine.client.api import FollowOn, FollowOns
from engine.client.smtp import SmtpAgent
from engine.queue.records import Envelope, RcptState, Recipient
from engine.routing.api import Host, Route
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

BODY = (
    b"Subject: test\r\nFrom: a@client.test\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n"
    b"middle\r\n. space\r\nlast line\r\n"
)
DELIVERED, DEFERRED, FAILED = RcptState.DELIVERED, RcptState.DEFERRED, RcptState.FAILED


def run(coro: Awaitable[Any], limit: float = 30) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(limit):  # no test may hang
            return await coro

    return uvloop.run(bounded())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def route(*ports: int, tls: str = "off", name: str = "mx.test", **kw: Any) -> Route:
    hosts = tuple(Host(name, "127.0.0.1", p) for p in ports)
    return Route("example.net", "site:example.net", hosts, tls=tls, **kw)  # type: ignore[arg-type]


def envelope(*rcpts: str, sender: str = "a@client.test", **kw: Any) -> Envelope:
    return Envelope(sender, [Recipient(r, "example.net") for r in rcpts], **kw)


def agent(**kw: Any) -> SmtpAgent:
    kw.setdefault("timeout_scale", 0.01)  # RFC minutes become seconds
    kw.setdefault("connect_timeout", 200)  # times 0.01 = 2 s
    return SmtpAgent("client.test", **kw)


# --- aiosmtpd peers --------------------------------------------------------------------


class Handler:
    """Records what arrives; answers RCPT and DATA as the test says."""

    def __init__(
        self,
        rcpt: Callable[[str], str] | None = None,
        data: str = "250 2.0.0 Ok",
        pipelining: bool = False,
    ) -> None:
        self.rcpt = rcpt
        self.data = data
        self.pipelining = pipelining
        self.messages: list[tuple[str, list[str], bytes, list[str], bool]] = []
        self.mail_options: list[list[str]] = []
        self.logins: list[bytes] = []

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.mail_options.append(list(options))
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        answer = self.rcpt(address) if self.rcpt else "250 OK"
        if answer.startswith("2"):
            envelope.rcpt_tos.append(address)
        return answer

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                session.ssl is not None,
            )
        )
        return self.data


class CountingController(Controller):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connections = 0

    def factory(self) -> SMTP:
        self.connections += 1
        return SMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def aiosmtpd_server() -> Iterator[Callable[..., CountingController]]:
    started: list[CountingController] = []

    def start(handler: Handler, **kw: Any) -> CountingController:
        kw.setdefault("enable_SMTPUTF8", True)
        controller = CountingController(
            handler, hostname="127.0.0.1", port=free_port(), server_hostname="mx.test", **kw
        )
        controller.start()
        controller.connections = 0  # start() made one connection of its own
        started.append(controller)
        return controller

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server context for mx.test signed by a test CA, and the CA file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, ca_file


def states(results: list[Any]) -> list[RcptState]:
    return [r.state for r in results]


# --- raw asyncio peers -----------------------------------------------------------------


class Peer:
    """One connection to a raw server: what arrived, chunk by chunk and line by line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""
        self.chunks: list[bytes] = []
        self.lines: list[bytes] = []
        self.messages: list[bytes] = []
        self.eof = asyncio.Event()

    async def _fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            self.eof.set()
            raise EOFError
        self.chunks.append(data)
        self.buf += data

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            await self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.lines.append(line)
        return line

    async def message(self) -> bytes:
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            await self._fill()
        raw, self.buf = (b"\r\n" + self.buf).split(b"\r\n.\r\n", 1)
        lines = raw[2:].split(b"\r\n") if raw else []
        body = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        self.messages.append(body)
        return body

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_eof(self) -> None:
        """Read until the client closes (the test checks that it does)."""
        try:
            while True:
                await self._fill()
        except (EOFError, ConnectionError):
            self.eof.set()


Script = Callable[[Peer], Awaitable[None]]


class RawServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.peers: list[Peer] = []
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for peer in self.peers:
            peer.writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.peers.append(peer)
        try:
            await self.script(peer)
        except (EOFError, ConnectionError):
            peer.eof.set()

    async def dropped(self, index: int = 0, within: float = 5) -> bool:
        """The client closed connection ``index`` within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                await self.peers[index].eof.wait()
        except TimeoutError:
            return False
        return True


def smtp_script(
    ehlo: tuple[str, ...] = ("PIPELINING", "8BITMIME"),
    *,
    lmtp: bool = False,
    rcpt: Callable[[bytes], bytes] = lambda a: b"250 2.1.5 Ok",
    final: Callable[[bytes], bytes] = lambda a: b"250 2.0.0 Ok",
    close_after: int = 0,
    greeting: bytes = b"220 raw.test ESMTP\r\n",
) -> Script:
    """A small well-behaved SMTP (or LMTP) server; replies per recipient as told."""

    async def script(peer: Peer) -> None:
        peer.send(greeting)
        accepted: list[bytes] = []
        while True:
            line = await peer.line()
            verb = line[:4].upper()
            if verb in (b"EHLO", b"LHLO"):
                peer.send(
                    b"".join(b"250-" + k.encode() + b"\r\n" for k in ("raw.test", *ehlo))
                    + b"250 HELP\r\n"
                )
            elif verb == b"MAIL" or verb == b"RSET":
                accepted = []
                peer.send(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                answer = rcpt(line)
                if answer.startswith(b"2"):
                    accepted.append(line)
                peer.send(answer + b"\r\n")
            elif verb == b"DATA":
                peer.send(b"354 go ahead\r\n")
                await peer.message()
                for who in accepted if lmtp else [b""]:
                    peer.send(final(who) + b"\r\n")
                if close_after and len(peer.messages) >= close_after:
                    peer.writer.close()
                    peer.eof.set()
                    return
            elif verb == b"QUIT":
                peer.send(b"221 2.0.0 Bye\r\n")
                await peer.until_eof()
                return
            else:
                peer.send(b"502 5.5.1 No\r\n")

    return script


# --- well-behaved peers ----------------------------------------------------------------


def test_plain_delivery_is_byte_exact(aiosmtpd_server: Callable[..., CountingController]) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port), envelope("u1@example.net", "u2@example.net"), [0, 1], BODY
            )
        finally:
            await a.close()

    results = run(go())
    assert states(results) == [DELIVERED, DELIVERED]
    assert [r.index for r in results] == [0, 1]
    assert results[0].remote == "mx.test[127.0.0.1]" and results[0].reply.startswith("250")
    ((sender, rcpts, content, options, over_tls),) = handler.messages
    assert sender == "a@client.test" and rcpts == ["u1@example.net", "u2@example.net"]
    assert content == BODY  # dot-stuffed on the way, unstuffed identical on arrival
    assert f"SIZE={len(BODY)}" in options and not any(o.startswith("BODY") for o in options)
    assert not over_tls


def test_subset_of_recipients_and_empty_list(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)

    async def go() -> tuple[list[Any], list[Any]]:
        a = agent()
        env = envelope("u1@example.net", "u2@example.net", "u3@example.net")
        try:
            return (
                await a.deliver(route(server.port), env, [2, 0], BODY),
                await a.deliver(route(server.port), env, [], BODY),
            )
        finally:
            await a.close()

    some, none = run(go())
    assert [(r.index, r.state) for r in some] == [(2, DELIVERED), (0, DELIVERED)]
    assert none == [] and handler.messages[0][1] == ["u3@example.net", "u1@example.net"]


@pytest.mark.parametrize("offered", [True, False], ids=["pipelining", "lockstep"])
def test_pipelining_on_and_off(offered: bool) -> None:
    ehlo = ("PIPELINING", "8BITMIME") if offered else ("8BITMIME",)

    async def go() -> tuple[list[Any], list[bytes]]:
        async with RawServer(smtp_script(ehlo)) as server:
            a = agent()
            results = await a.deliver(
                route(server.port), envelope("u1@example.net", "u2@example.net"), [0, 1], BODY
            )
            await a.close()
            return results, server.peers[0].chunks

    results, chunks = run(go())
    assert states(results) == [DELIVERED, DELIVERED]
    mail_chunk = next(c for c in chunks if c.startswith(b"MAIL"))
    if offered:
        # RFC 2920: MAIL, both RCPTs and DATA in one write
        assert mail_chunk == (
            b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u1@example.net>\r\n"
            b"RCPT TO:<u2@example.net>\r\nDATA\r\n"
        )
    else:
        # each command waits for its reply, so each arrives alone
        assert mail_chunk == b"MAIL FROM:<a@client.test>\r\n"
        assert b"RCPT TO:<u1@example.net>\r\n" in chunks and b"DATA\r\n" in chunks


@pytest.mark.parametrize("mode", ["opportunistic", "required", "verify"])
def test_starttls_modes(
    aiosmtpd_server: Callable[..., CountingController], tls: tuple[ssl.SSLContext, Path], mode: str
) -> None:
    context, ca_file = tls
    handler = Handler()
    server = aiosmtpd_server(handler, tls_context=context)

    async def go() -> list[Any]:
        a = agent(ca_file=str(ca_file))
        try:
            return await a.deliver(
                route(server.port, tls=mode), envelope("u@example.net"), [0], BODY
            )
        finally:
            await a.close()

    assert states(run(go())) == [DELIVERED]
    assert handler.messages[0][4] is True  # the message went over TLS
    assert handler.messages[0][2] == BODY


def test_verify_refuses_a_certificate_for_another_name(
    aiosmtpd_server: Callable[..., CountingController], tls: tuple[ssl.SSLContext, Path]
) -> None:
    context, ca_file = tls
    handler = Handler()
    server = aiosmtpd_server(handler, tls_context=context)

    async def go(mode: str) -> list[Any]:
        a = agent(ca_file=str(ca_file))
        try:
            return await a.deliver(
                route(server.port, tls=mode, name="other.test"),
                envelope("u@example.net"),
                [0],
                BODY,
            )
        finally:
            await a.close()

    (refused,) = run(go("verify"))
    assert refused.state is DEFERRED and "4.7.5" in refused.reply and not handler.messages
    assert states(run(go("required"))) == [DELIVERED]  # no verification there


def test_tls_required_but_not_offered_is_deferred_opportunistic_goes_plain(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)

    async def go(mode: str) -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port, tls=mode), envelope("u@example.net"), [0], BODY
            )
        finally:
            await a.close()

    (required,) = run(go("required"))
    assert required.state is DEFERRED and required.reply.startswith("451 4.7.10")
    assert not handler.messages
    assert states(run(go("opportunistic"))) == [DELIVERED]
    assert handler.messages[0][4] is False


def _authenticator(handler: Handler) -> Callable[..., AuthResult]:
    def check(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        handler.logins.append(auth_data.login)
        # handled=False: aiosmtpd then sends its own 535 for a failure
        return AuthResult(success=auth_data == LoginPassword(b"app", b"s3cret"), handled=False)

    return check


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_to_a_smarthost(
    aiosmtpd_server: Callable[..., CountingController],
    tls: tuple[ssl.SSLContext, Path],
    mechanism: str,
) -> None:
    context, _ = tls
    handler = Handler()
    excluded = ["PLAIN"] if mechanism == "LOGIN" else ["LOGIN"]
    server = aiosmtpd_server(
        handler,
        tls_context=context,
        authenticator=_authenticator(handler),
        auth_required=True,
        auth_exclude_mechanism=excluded,
    )

    async def go(password: str) -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port, tls="required", auth=("app", password)),
                envelope("u@example.net"),
                [0],
                BODY,
            )
        finally:
            await a.close()

    assert states(run(go("s3cret"))) == [DELIVERED]
    assert handler.logins == [b"app"] and handler.messages[0][2] == BODY
    (bad,) = run(go("wrong"))
    # RFC 4954 535: a configuration problem, kept for the operator to fix
    assert bad.state is DEFERRED and bad.reply.startswith("535")
    assert len(handler.messages) == 1


def test_auth_is_never_sent_in_plaintext_by_default(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler, authenticator=_authenticator(handler), auth_require_tls=False)

    async def go(allow: bool) -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port, auth=("app", "s3cret"), plaintext_auth=allow),
                envelope("u@example.net"), [0], BODY,
            )
        finally:
            await a.close()

    (refused,) = run(go(False))
    assert refused.state is DEFERRED and "4.7.11" in refused.reply and handler.logins == []
    assert states(run(go(True))) == [DELIVERED] and handler.logins == [b"app"]


def test_8bitmime_and_smtputf8_missing_at_the_next_hop(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler()
    # decode_data=True makes aiosmtpd drop 8BITMIME; enable_SMTPUTF8=False drops SMTPUTF8
    server = aiosmtpd_server(handler, decode_data=True, enable_SMTPUTF8=False)
    body8 = "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode()

    async def go() -> list[list[Any]]:
        a = agent()
        try:
            return [
                await a.deliver(route(server.port), envelope("u@example.net"), [0], body8),
                await a.deliver(
                    route(server.port), envelope("u@example.net", body_type="8BITMIME"), [0], BODY
                ),
                await a.deliver(
                    route(server.port), envelope("u@example.net", smtputf8=True), [0], BODY
                ),
                await a.deliver(route(server.port), envelope("u@example.net"), [0], BODY),
            ]
        finally:
            await a.close()

    eight, declared, utf8, plain = run(go())
    assert eight[0].state is FAILED and eight[0].reply.startswith("554 5.6.3")
    assert declared[0].state is FAILED and declared[0].reply.startswith("554 5.6.3")
    assert utf8[0].state is FAILED and utf8[0].reply.startswith("553 5.6.7")
    assert plain[0].state is DELIVERED and len(handler.messages) == 1
    assert server.connections == 1  # the refusals left the connection clean for reuse


def test_8bit_body_and_smtputf8_when_offered(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)
    body8 = "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode()

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port),
                envelope("j\u00f6rg@example.net", sender="s\u00e9@client.test", smtputf8=True),
                [0],
                body8,
            )
        finally:
            await a.close()

    assert states(run(go())) == [DELIVERED]
    sender, rcpts, content, options, _ = handler.messages[0]
    assert (sender, rcpts, content) == ("s\u00e9@client.test", ["j\u00f6rg@example.net"], body8)
    assert "BODY=8BITMIME" in options and "SMTPUTF8" in options


def test_size_limit_of_the_next_hop(aiosmtpd_server: Callable[..., CountingController]) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler, data_size_limit=len(BODY) - 1)

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(route(server.port), envelope("u@example.net"), [0], BODY)
        finally:
            await a.close()

    (result,) = run(go())
    assert result.state is FAILED and result.reply.startswith("552 5.3.4")
    assert handler.mail_options == []  # refused before MAIL


@pytest.mark.parametrize(("sender", "rcpt"), [
    ("a@client.test", "u@example.net\r\nRSET"),  # command injection
    ("a@client.test", "u\x00@example.net"),
    ("a\tb@client.test", "u@example.net"),  # any control character, not only CR/LF/NUL
])
def test_addresses_with_control_characters_never_reach_the_wire(
    aiosmtpd_server: Callable[..., CountingController], sender: str, rcpt: str
) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(route(server.port), envelope(rcpt, sender=sender), [0], BODY)
        finally:
            await a.close()

    (result,) = run(go())
    assert result.state is FAILED and result.reply == "553 5.1.3 Address cannot be sent"
    assert handler.mail_options == []  # refused before MAIL


@pytest.mark.parametrize("pipelining", [True, False])
def test_one_recipient_refused(
    aiosmtpd_server: Callable[..., CountingController], pipelining: bool
) -> None:
    handler = Handler(
        rcpt=lambda a: "550 5.1.1 No such user" if a.startswith("bad") else "250 OK",
        pipelining=pipelining,
    )
    server = aiosmtpd_server(handler)

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port), envelope("bad@example.net", "good@example.net"), [0, 1], BODY
            )
        finally:
            await a.close()

    bad, good = run(go())
    assert bad.state is FAILED and bad.reply == "550 5.1.1 No such user"
    assert good.state is DELIVERED and handler.messages[0][1] == ["good@example.net"]


def test_temporary_refusal_at_the_end_of_data(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler(
        data="451 4.3.0 Try again later",
        rcpt=lambda a: "450 4.2.1 Busy" if a.startswith("busy") else "250 OK",
    )
    server = aiosmtpd_server(handler)

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(
                route(server.port), envelope("u@example.net", "busy@example.net"), [0, 1], BODY
            )
        finally:
            await a.close()

    u, busy = run(go())
    assert (u.state, u.reply) == (DEFERRED, "451 4.3.0 Try again later")
    assert (busy.state, busy.reply) == (DEFERRED, "450 4.2.1 Busy")


def test_permanent_refusal_at_the_end_of_data(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    server = aiosmtpd_server(Handler(data="554 5.7.1 Rejected as spam"))

    async def go() -> list[Any]:
        a = agent()
        try:
            return await a.deliver(route(server.port), envelope("u@example.net"), [0], BODY)
        finally:
            await a.close()

    (result,) = run(go())
    assert (result.state, result.reply) == (FAILED, "554 5.7.1 Rejected as spam")


def test_fallback_to_the_second_host(aiosmtpd_server: Callable[..., CountingController]) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)
    dead = free_port()  # nothing listens there: connection refused

    async def go() -> tuple[list[Any], list[Any]]:
        a = agent()
        hosts = (Host("dead.test", "127.0.0.1", dead), Host("mx.test", "127.0.0.1", server.port))
        try:
            good = await a.deliver(
                Route("example.net", "s1", hosts), envelope("u@example.net"), [0], BODY
            )
            bad = await a.deliver(
                Route("example.net", "s2", hosts[:1]), envelope("u@example.net"), [0], BODY
            )
            return good, bad
        finally:
            await a.close()

    good, bad = run(go())
    assert good[0].state is DELIVERED and good[0].remote == "mx.test[127.0.0.1]"
    assert bad[0].state is DEFERRED and bad[0].reply.startswith("451 4.4.1")
    assert "dead.test" in bad[0].reply


def test_bad_greetings_skip_the_host_and_defer() -> None:
    async def greet_554(peer: Peer) -> None:
        # RFC 5321 §3.1: after a 554 greeting the server waits for QUIT, answers anything
        # else with 503, and QUIT with 221 (so the client's polite QUIT ends at once).
        peer.send(b"554 5.3.2 Not now\r\n")
        while (await peer.line()).upper() != b"QUIT":
            peer.send(b"503 5.5.1 Bad sequence of commands\r\n")
        peer.send(b"221 2.0.0 Bye\r\n")
        await peer.until_eof()

    async def go() -> tuple[list[Any], list[Any], bool, list[bytes]]:
        async with RawServer(greet_554) as b1, RawServer(smtp_script()) as good:
            a = agent()
            hosts = (Host("b1", "127.0.0.1", b1.port), Host("good", "127.0.0.1", good.port))
            fallback = await a.deliver(
                Route("example.net", "s", hosts), envelope("u@x.test"), [0], BODY
            )
            only_bad = await a.deliver(
                Route("example.net", "s2", hosts[:1]), envelope("u@x.test"), [0], BODY
            )
            await a.close()
            return fallback, only_bad, await b1.dropped(1), b1.peers[1].chunks

    fallback, only_bad, closed, received = run(go())
    assert fallback[0].state is DELIVERED and fallback[0].remote == "good[127.0.0.1]"
    # RFC 5321 §3.8: a 554 greeting from every host still means "try later"
    assert only_bad[0].state is DEFERRED and only_bad[0].reply == "554 5.3.2 Not now"
    assert closed
    # EHLO answers only a 220: after a 554 the client says QUIT, or nothing.
    assert all(not chunk.upper().startswith((b"EHLO", b"HELO")) for chunk in received)


def test_ehlo_waits_for_the_whole_greeting() -> None:
    """EHLO goes out as the greeting arrives, but never before its last line (RFC 5321
    §3.1): a client talking early is taken for spamware by servers that check."""

    async def slow_greeting(peer: Peer) -> None:
        peer.send(b"220-raw.test ESMTP\r\n")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):
                await peer.until_eof()  # whatever the client sends now is too early
        if peer.chunks:
            peer.send(b"554 5.5.1 You talked before the greeting\r\n")
            return
        peer.send(b"220 ready\r\n")
        await smtp_script(greeting=b"")(peer)

    async def go() -> list[Any]:
        async with RawServer(slow_greeting) as server:
            a = agent()
            try:
                return await a.deliver(route(server.port), envelope("u@x.test"), [0], BODY)
            finally:
                await a.close()

    (result,) = run(go())
    assert result.state is DELIVERED, result.reply


# --- the pool --------------------------------------------------------------------------


def test_connection_reuse_and_max_messages(
    aiosmtpd_server: Callable[..., CountingController],
) -> None:
    handler = Handler()
    server = aiosmtpd_server(handler)

    async def go(per_connection: int, messages: int) -> None:
        a = agent(max_messages_per_connection=per_connection)
        try:
            for n in range(messages):
                result = await a.deliver(
                    route(server.port), envelope(f"u{n}@example.net"), [0], BODY
                )
                assert states(result) == [DELIVERED]
        finally:
            await a.close()

    run(go(100, 3))
    assert server.connections == 1 and len(handler.messages) == 3
    server.connections = 0
    run(go(2, 5))
    assert server.connections == 3 and len(handler.messages) == 8


def test_rset_only_after_a_failed_transaction_and_quit_on_close() -> None:
    def rcpt(line: bytes) -> bytes:
        return b"550 5.1.1 No" if b"<bad@" in line else b"250 2.1.5 Ok"

    async def go() -> tuple[list[bytes], bool]:
        async with RawServer(smtp_script(rcpt=rcpt)) as server:
            a = agent()
            r = route(server.port)
            assert states(await a.deliver(r, envelope("u@x.test"), [0], BODY)) == [DELIVERED]
            assert states(await a.deliver(r, envelope("u@x.test"), [0], BODY)) == [DELIVERED]
            assert states(await a.deliver(r, envelope("bad@x.test"), [0], BODY)) == [FAILED]
            assert states(await a.deliver(r, envelope("u@x.test"), [0], BODY)) == [DELIVERED]
            await a.close()
            return server.peers[0].lines, await server.dropped()

    lines, closed = run(go())
    verbs = [ln.split(b" ")[0] for ln in lines if not ln.startswith((b"Subject", b"From"))]
    verbs = [v for v in verbs if v in (b"EHLO", b"MAIL", b"RSET", b"QUIT")]
    assert verbs == [b"EHLO", b"MAIL", b"MAIL", b"MAIL", b"RSET", b"MAIL", b"QUIT"]
    assert closed


def test_idle_connections_are_closed_after_idle_timeout() -> None:
    async def go() -> tuple[bool, list[bytes]]:
        async with RawServer(smtp_script()) as server:
            a = agent(idle_timeout=0.2)
            await a.deliver(route(server.port), envelope("u@x.test"), [0], BODY)
            closed = await server.dropped(within=3)
            await a.close()
            return closed, server.peers[0].lines

    closed, lines = run(go())
    assert closed and lines[-1] == b"QUIT"


def test_a_pooled_connection_closed_by_the_server_is_replaced() -> None:
    async def go() -> tuple[list[Any], int]:
        async with RawServer(smtp_script(close_after=1)) as server:
            a = agent()
            r = route(server.port)
            await a.deliver(r, envelope("u@x.test"), [0], BODY)
            await server.dropped()
            second = await a.deliver(r, envelope("v@x.test"), [0], BODY)
            await a.close()
            return second, len(server.peers)

    second, connections = run(go())
    assert states(second) == [DELIVERED] and connections == 2


# --- LMTP ------------------------------------------------------------------------------


def test_lmtp_replies_per_recipient() -> None:
    finals = {
        b"<a@": b"250 2.0.0 Ok",
        b"<b@": b"452 4.2.2 Mailbox full",
        b"<c@": b"550 5.1.1 No such mailbox",
    }

    def final(who: bytes) -> bytes:
        return next(v for k, v in finals.items() if k in who)

    async def go() -> tuple[list[Any], Peer]:
        async with RawServer(
            smtp_script(("PIPELINING", "8BITMIME"), lmtp=True, final=final)
        ) as server:
            a = agent(lmtp=True)
            results = await a.deliver(
                route(server.port), envelope("a@x.test", "b@x.test", "c@x.test"), [0, 1, 2], BODY
            )
            await a.close()
            return results, server.peers[0]

    results, peer = run(go())
    assert [(r.state, r.reply) for r in results] == [
        (DELIVERED, "250 2.0.0 Ok"),
        (DEFERRED, "452 4.2.2 Mailbox full"),
        (FAILED, "550 5.1.1 No such mailbox"),
    ]
    assert peer.lines[0] == b"LHLO client.test" and peer.messages == [BODY]


# --- malicious and broken servers ------------------------------------------------------


def _after_ehlo(junk: bytes, *, then_wait: bool = True) -> Script:
    """A server that greets, answers EHLO, then sends ``junk`` in reply to MAIL."""

    async def script(peer: Peer) -> None:
        peer.send(b"220 evil.test\r\n")
        await peer.line()
        peer.send(b"250-evil.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        await peer.line()
        peer.send(junk)
        await peer.until_eof()

    return script


async def _endless(peer: Peer) -> None:
    peer.send(b"220 evil.test\r\n")
    await peer.line()
    try:
        while not peer.eof.is_set():
            peer.send(b"250-more and more\r\n" * 100)
            await peer.writer.drain()
            await asyncio.sleep(0)
    except ConnectionError:
        peer.eof.set()


async def _huge_line(peer: Peer) -> None:
    peer.send(b"220 " + b"x" * (1 << 20) + b"\r\n")
    await peer.until_eof()


async def _mismatched(peer: Peer) -> None:
    peer.send(b"220 evil.test\r\n")
    await peer.line()
    peer.send(b"250-evil.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    await peer.line()  # MAIL
    peer.send(b"250 2.1.0 Ok\r\n250-2.1.5 Ok\r\n550 5.1.1 but no\r\n")
    await peer.until_eof()


async def _injected_after_starttls(peer: Peer) -> None:
    peer.send(b"220 evil.test\r\n")
    await peer.line()
    peer.send(b"250-evil.test\r\n250 STARTTLS\r\n")
    await peer.line()  # STARTTLS
    # RFC 3207 §4.2 / CVE-2011-0411: bytes after the 220, before the handshake
    peer.send(b"220 2.0.0 Go ahead\r\n250-evil.test\r\n250 AUTH PLAIN\r\n")
    await peer.until_eof()


async def _silent(peer: Peer) -> None:
    peer.send(b"220 evil.test\r\n")
    await peer.until_eof()  # never answers EHLO


async def _silent_after_data(peer: Peer) -> None:
    peer.send(b"220 evil.test\r\n")
    await peer.line()
    peer.send(b"250-evil.test\r\n250 PIPELINING\r\n")
    for _ in range(3):
        await peer.line()
    peer.send(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    await peer.message()
    await peer.until_eof()  # never gives the final reply


MALICIOUS: dict[str, tuple[Script, str]] = {
    "mismatched-multiline": (_mismatched, "mismatch"),
    "mail-reply-mismatch": (_after_ehlo(b"250-a\r\n251 b\r\n"), "mismatch"),
    "endless-continuation": (_endless, "Too many reply lines"),
    "1MB-reply-line": (_huge_line, "too long"),
    "bytes-after-starttls-220": (_injected_after_starttls, "STARTTLS"),
    "never-answers": (_silent, "Timeout"),
    "no-final-reply": (_silent_after_data, "Timeout"),
    "not-smtp": (_after_ehlo(b"HTTP/1.1 400 Bad Request\r\n"), "Malformed"),
    # A 250 to DATA: the body was never sent, so nothing was delivered (RFC 5321 §4.1.1.4).
    "250-to-DATA": (_after_ehlo(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                                b"250 2.0.0 Queued without a body\r\n"), "without a body"),
}


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_malicious_servers_defer_and_drop(name: str) -> None:
    script, reason = MALICIOUS[name]

    async def go() -> tuple[list[Any], bool, int]:
        async with RawServer(script) as server:
            a = agent(
                tls_context_factory=lambda mode: ssl.create_default_context(),
                timeout_scale=0.002,
                max_reply_lines=50,
            )
            results = await a.deliver(
                route(server.port, tls="opportunistic"),
                envelope("u@x.test", "v@x.test"),
                [0, 1],
                BODY,
            )
            dropped = await server.dropped(within=3)
            pooled = sum(len(v) for v in a._pool.values())
            await a.close()
            return results, dropped, pooled

    results, dropped, pooled = run(go(), limit=20)
    assert states(results) == [DEFERRED, DEFERRED]
    assert all(reason.lower() in r.reply.lower() for r in results), results
    assert all(len(r.reply) <= 512 and "\r" not in r.reply and "\n" not in r.reply for r in results)
    assert dropped and pooled == 0


@pytest.mark.parametrize("offered", [True, False], ids=["dsn", "no-dsn"])
def test_dsn_parameters_only_when_offered(offered: bool) -> None:
    ehlo = ("PIPELINING", "DSN") if offered else ("PIPELINING",)
    env = Envelope(
        "a@client.test",
        [Recipient("u@x.test", "x.test", notify=("FAILURE", "DELAY"), orcpt="rfc822;u+1@x.test")],
        ret="HDRS",
        envid="id+1",
    )

    async def go() -> tuple[list[Any], list[bytes]]:
        async with RawServer(smtp_script(ehlo)) as server:
            a = agent()
            results = await a.deliver(route(server.port), env, [0], BODY)
            await a.close()
            return results, server.peers[0].lines

    results, lines = run(go())
    assert states(results) == [DELIVERED]
    assert results[0].dsn_offered is offered  # RFC 3461 §4: passed on, or not
    mail = next(ln for ln in lines if ln.startswith(b"MAIL"))
    rcpt = next(ln for ln in lines if ln.startswith(b"RCPT"))
    if offered:  # RFC 3461: ENVID and ORCPT in xtext
        assert mail == b"MAIL FROM:<a@client.test> RET=HDRS ENVID=id+2B1"
        assert rcpt == b"RCPT TO:<u@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;u+2B1@x.test"
    else:
        assert (mail, rcpt) == (b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@x.test>")


# --- follow-on messages: the next envelope behind the current body ----------------------


class Offered(list[FollowOn]):
    """The messages put in a follow-on queue; ``taken`` are those the agent took."""

    @property
    def taken(self) -> list[FollowOn]:
        return [job for job in self if job.handle is not None]


def offer(*jobs: FollowOn) -> tuple[FollowOns, Offered]:
    """A connection's follow-on queue holding ``jobs`` (prepared, as the scheduler does)."""
    return deque(jobs), Offered(jobs)


def follow_on(rcpt: str, sender: str = "a@client.test") -> FollowOn:
    return FollowOn(envelope(rcpt, sender=sender), [0], BODY)


def test_follow_on_messages_ride_behind_the_body_on_one_connection() -> None:
    async def go() -> tuple[list[Any], list[Peer], int]:
        async with RawServer(smtp_script()) as server:
            a = agent()
            follow, offered = offer(follow_on("u2@x.test"), follow_on("u3@x.test"))
            try:
                results = [await a.deliver(route(server.port), envelope("u1@x.test"), [0],
                                           BODY, follow)]
                # Each follow-on is taken when its predecessor's 354 arrives.
                collected = 0
                while collected < len(offered.taken):
                    results.append(await a.resume(offered.taken[collected]))
                    collected += 1
                assert not follow and [job.envelope.recipients[0].address
                                       for job in offered.taken] == ["u2@x.test", "u3@x.test"]
                # The connection went back to the pool once the last one was collected.
                results.append(await a.deliver(route(server.port), envelope("u4@x.test"), [0],
                                               BODY))
            finally:
                await a.close()
            return results, server.peers, a.connections_opened

    results, peers, opened = run(go())
    assert [states(r) for r in results] == [[DELIVERED]] * 4
    assert opened == 1 and len(peers) == 1 and len(peers[0].messages) == 4
    # RFC 2920 §3.1: each body and the next MAIL, RCPT and DATA left in one write.
    together = [c for c in peers[0].chunks if b"\r\n.\r\nMAIL FROM:" in c]
    assert len(together) == 2, peers[0].chunks


def test_a_follow_on_is_deferred_when_the_connection_breaks_after_the_body() -> None:
    async def go() -> tuple[list[Any], list[Any]]:
        async with RawServer(smtp_script(close_after=1)) as server:
            a = agent()
            follow, offered = offer(follow_on("u2@x.test"))
            try:
                first = await a.deliver(route(server.port), envelope("u1@x.test"), [0], BODY,
                                        follow)
                (job,) = offered.taken
                return first, await a.resume(job)
            finally:
                await a.close()

    first, second = run(go())
    assert states(first) == [DELIVERED]
    # Sent, never answered: deferred (tried again later), never failed and never lost.
    assert states(second) == [DEFERRED] and "closed" in second[0].reply.lower()


def test_a_follow_on_the_next_hop_cannot_take_is_refused_before_anything_is_sent() -> None:
    async def go() -> tuple[list[Any], list[Any], list[Peer]]:
        async with RawServer(smtp_script()) as server:
            a = agent()
            follow, offered = offer(follow_on("u2@x.test", sender="bad\tsender@client.test"))
            try:
                first = await a.deliver(route(server.port), envelope("u1@x.test"), [0], BODY,
                                        follow)
                (job,) = offered.taken
                return first, await a.resume(job), server.peers
            finally:
                await a.close()

    first, second, peers = run(go())
    assert states(first) == [DELIVERED]
    assert states(second) == [FAILED] and second[0].reply == "553 5.1.3 Address cannot be sent"
    assert not any(b"bad" in line for line in peers[0].lines)


def test_no_follow_on_without_pipelining_or_in_lmtp() -> None:
    async def go(lmtp: bool, ehlo: tuple[str, ...]) -> list[FollowOn]:
        async with RawServer(smtp_script(ehlo, lmtp=lmtp)) as server:
            a = agent(lmtp=lmtp)
            follow, offered = offer(follow_on("u2@x.test"))
            try:
                result = await a.deliver(route(server.port), envelope("u1@x.test"), [0], BODY,
                                         follow)
                assert states(result) == [DELIVERED]
            finally:
                await a.close()
            assert len(follow) == 1  # left for the caller to deliver on its own
            return offered.taken

    assert run(go(False, ("8BITMIME",))) == []
    assert run(go(True, ("PIPELINING", "8BITMIME"))) == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_replies_before_a_break_are_kept(pipelining: bool) -> None:
    """A 550 to one RCPT stands when the connection breaks later in the transaction: that
    recipient fails, the accepted one is deferred (its fate is unknown)."""

    async def script(peer: Peer) -> None:
        peer.send(b"220 raw.test ESMTP\r\n")
        await peer.line()  # EHLO
        peer.send(b"250-raw.test\r\n" + (b"250-PIPELINING\r\n" if pipelining else b"")
                  + b"250 8BITMIME\r\n")
        while True:
            line = await peer.line()
            if line.startswith(b"RCPT") and b"<bad@" in line:
                peer.send(b"550 5.1.1 No such user\r\n")
            elif line.startswith(b"DATA"):
                peer.send(b"354 go ahead\r\n")
                await peer.message()
                peer.writer.close()  # no reply to the final dot
                return
            else:
                peer.send(b"250 2.0.0 Ok\r\n")

    async def go() -> list[Any]:
        async with RawServer(script) as server:
            a = agent()
            try:
                return await a.deliver(route(server.port),
                                       envelope("good@x.test", "bad@x.test"), [0, 1], BODY)
            finally:
                await a.close()

    good, bad = run(go())
    assert good.state is DEFERRED and bad.state is FAILED
    assert bad.reply == "550 5.1.1 No such user"


# --- a destination's connection limit counts connections until they are closed ---------


def test_a_retiring_connection_is_closed_before_its_replacement_opens() -> None:
    """One delivery at a time (a limit of 1) and two messages per connection: the receiver
    never sees two connections at once, so the replacement waits for the retiring
    connection's QUIT and close (a connection's slot is free only once it is closed)."""
    open_now = 0
    peak = 0

    async def script(peer: Peer) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            await smtp_script()(peer)
        finally:
            open_now -= 1

    async def go() -> list[Any]:
        async with RawServer(script) as server:
            a = agent(max_messages_per_connection=2)
            try:
                return [await a.deliver(route(server.port), envelope(f"u{n}@x.test"), [0], BODY)
                        for n in range(5)]
            finally:
                await a.close()

    results = run(go())
    assert [states(r) for r in results] == [[DELIVERED]] * 5
    assert peak == 1


ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
one.test.      IN MX 10 mx.one.test.
mx.one.test.   IN A 127.0.10.21
"""


def deliver_waiting(tmp_path: Path, messages: int, **delivery: Any) -> tuple[CountingSink, int]:
    """The whole path: ``messages`` for one destination, all waiting when delivery starts,
    to a counting sink; the sink and how many went behind another's body (follow-ons)."""
    sink = CountingSink(["127.0.10.21"])
    try:
        with DnsResponder(ZONE) as dns:
            config = ferry_config(tmp_path / "spool")
            config = dataclasses.replace(config, delivery=dataclasses.replace(
                config.delivery, dns=dns.address, mx_port=sink.port, paused=False,
                **delivery))
            with RunningFerry(config) as f:
                assert f.app.scheduler is not None
                # Held while they arrive, so all of them wait when delivery starts.
                f.call(f.app.scheduler.suspend("one.test"))
                for n in range(messages):
                    with smtplib.SMTP(f.host, f.port) as client:
                        client.sendmail("a@client.test", [f"u{n}@one.test"], BODY)

                def parked() -> bool:
                    ids = f.store.ids_for_hop("one.test", messages + 1, b"")
                    return len(ids) == messages and all(
                        f.store.get(i).recipients[0].state is RcptState.SUSPENDED for i in ids)

                wait_for(parked, 30)  # none still on its way to being parked
                f.call(f.app.scheduler.resume("one.test"))
                wait_for(lambda: len(sink.state.messages) == messages
                         and f.store.count() == 0, 30)
                agent = f.app.agents["smtp"]
                assert isinstance(agent, SmtpAgent)
                follow_ons = agent.follow_ons
    finally:
        sink.stop()
    return sink, follow_ons


def test_a_destination_limit_of_one_is_never_exceeded_when_connections_retire(
    tmp_path: Path,
) -> None:
    """A limit of 1, two messages per connection, five messages waiting: the receiver
    (which counts a connection until its socket is closed) sees one at once."""
    sink, _ = deliver_waiting(tmp_path, 5, max_per_domain=1, max_messages_per_connection=2)
    assert sink.state.connections["127.0.10.21"] == 3
    assert sink.state.peak["127.0.10.21"] == 1


def test_every_waiting_message_follows_the_one_before_on_a_busy_connection(
    tmp_path: Path,
) -> None:
    """The scheduler keeps the connection's follow-on queue filled: on a site at its limit
    each message after the first goes behind the body before it (RFC 2920 §3.1), one
    write per message, with no call from the connection into the scheduler."""
    sink, follow_ons = deliver_waiting(tmp_path, 10, max_per_domain=1)
    assert sink.state.connections["127.0.10.21"] == 1
    assert follow_ons == 9


# --- 452: too many recipients ------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_recipients_refused_with_452_go_in_next_transactions_on_the_same_connection(
    pipelining: bool,
) -> None:
    """RFC 5321 §4.5.3.1.10: a server that takes two recipients per transaction and says
    452 to the rest gets the rest in next transactions, at once and on one connection, not
    at a later queue run."""
    per_transaction: list[list[bytes]] = []

    async def script(peer: Peer) -> None:
        peer.send(b"220 raw.test ESMTP\r\n")
        await peer.line()  # EHLO
        peer.send(b"250-raw.test\r\n" + (b"250-PIPELINING\r\n" if pipelining else b"")
                  + b"250 8BITMIME\r\n")
        accepted: list[bytes] = []
        while True:
            line = await peer.line()
            if line.startswith(b"MAIL"):
                accepted = []
                peer.send(b"250 2.1.0 Ok\r\n")
            elif line.startswith(b"RCPT"):
                if len(accepted) < 2:
                    accepted.append(line[8:])
                    peer.send(b"250 2.1.5 Ok\r\n")
                else:
                    peer.send(b"452 4.5.3 Too many recipients\r\n")
            elif line.startswith(b"DATA"):
                peer.send(b"354 go ahead\r\n")
                await peer.message()
                per_transaction.append(accepted)
                peer.send(b"250 2.0.0 Ok: queued as %d\r\n" % len(per_transaction))
            elif line.startswith(b"QUIT"):
                peer.send(b"221 Bye\r\n")
                await peer.until_eof()
                return
            else:
                peer.send(b"502 5.5.1 No\r\n")

    async def go() -> tuple[list[Any], int]:
        async with RawServer(script) as server:
            a = agent()
            try:
                rcpts = [f"u{n}@x.test" for n in range(5)]
                results = await a.deliver(route(server.port), envelope(*rcpts), range(5), BODY)
            finally:
                await a.close()
            return results, len(server.peers)

    results, connections = run(go())
    assert states(results) == [DELIVERED] * 5
    assert [r.reply for r in results] == ["250 2.0.0 Ok: queued as 1"] * 2 + [
        "250 2.0.0 Ok: queued as 2"] * 2 + ["250 2.0.0 Ok: queued as 3"]
    assert per_transaction == [[b"<u0@x.test>", b"<u1@x.test>"],
                               [b"<u2@x.test>", b"<u3@x.test>"], [b"<u4@x.test>"]]
    assert connections == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_a_server_that_stops_reading_the_body_times_out(pipelining: bool) -> None:
    """RFC 5321 §4.5.3.2.5: each write of the body has its timeout; a server that says 354
    and then reads nothing defers the message and the connection is dropped."""

    async def script(peer: Peer) -> None:
        peer.send(b"220 raw.test ESMTP\r\n")
        await peer.line()  # EHLO
        peer.send(b"250-raw.test\r\n" + (b"250-PIPELINING\r\n" if pipelining else b"")
                  + b"250 8BITMIME\r\n")
        while not (await peer.line()).startswith(b"DATA"):
            peer.send(b"250 Ok\r\n")
        peer.send(b"354 go ahead\r\n")
        await peer.eof.wait()  # reads no more: the client's writes back up

    async def go() -> tuple[list[Any], bool]:
        async with RawServer(script) as server:
            a = agent(timeout_scale=0.005)  # 180 s → 0.9 s
            try:
                big = b"x" * 998 + b"\r\n"
                results = await a.deliver(route(server.port), envelope("u@x.test"), [0],
                                          big * 20_000)
                server.peers[0].writer.transport.abort()
                return results, sum(len(v) for v in a._pool.values()) == 0
            finally:
                await a.close()

    (result,), dropped = run(go())
    assert result.state is DEFERRED and "Timeout sending" in result.reply, result
    assert dropped


def test_deliveries_waiting_for_the_same_closing_connection_all_go_on() -> None:
    """Two deliveries that need a new connection while the pool's last one is being QUIT
    both wait for its close, and both go on when it is closed."""

    async def go() -> tuple[list[Any], int]:
        async with RawServer(smtp_script()) as server:
            a = agent(max_messages_per_connection=1)
            r = route(server.port)
            try:
                first = await a.deliver(r, envelope("u0@x.test"), [0], BODY)  # retires
                rest = await asyncio.gather(*(a.deliver(r, envelope(f"u{n}@x.test"), [0], BODY)
                                              for n in (1, 2)))
            finally:
                await a.close()
            return [first, *rest], len(server.peers)

    results, connections = run(go())
    assert [states(r) for r in results] == [[DELIVERED]] * 3 and connections == 3

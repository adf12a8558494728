"""The send side's protocol log over real sockets on 127.0.0.1.

A whole Ferry, configured by TOML, relays through send connectors to aiosmtpd smarthosts
and to a sink found by DNS MX (a responder on loopback): the connector with
``protocol_log = true`` writes its conversation to ``send-protocol-<name>.log``, with the
AUTH payloads masked; one without writes nothing; ``[delivery] protocol_log`` logs
delivery straight to MX.  The agent itself, with a log of its own: the LOGIN mechanism,
STARTTLS and its outcome, and rotation.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
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
from aiosmtpd.smtp import AuthResult, LoginPassword

from engine.client.api import FollowOn
from engine.client.smtp import SmtpAgent
from engine.config import load_config
from engine.ops.protolog import ProtocolLog
from engine.queue.records import Envelope, RcptState, Recipient
from engine.routing.api import Host, Route
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

BODY = b"Subject: confidential body\r\n\r\nthe body itself, never logged\r\n.dot\r\n"
USER, PASSWORD = "relayuser", "relay-pass-W0rd"
LINE = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\t([^\t]+)\t([^\t]+)\t([<>*])\t([^\t]*)")


def rows(path: Path) -> list[tuple[str, str, str, str]]:
    """(connection id, peer, direction, text) of each line; every line well formed."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    out = []
    for raw in data.decode("utf-8").split("\n")[:-1]:
        m = LINE.fullmatch(raw)
        assert m is not None, raw
        out.append((m[2], m[3], m[4], m[5]))
    return out


def shown(path: Path) -> list[str]:
    """Each line as "<direction> <text>"."""
    return [f"{d} {t}" for _, _, d, t in rows(path)]


def in_order(lines: list[str], *patterns: str) -> None:
    """Each pattern (a regular expression) matches a line after the previous one's."""
    at = 0
    for pattern in patterns:
        for i in range(at, len(lines)):
            if re.fullmatch(pattern, lines[i]):
                at = i + 1
                break
        else:
            raise AssertionError(f"no line {pattern!r} after line {at} in:\n" + "\n".join(lines))


def protocol_logs(directory: Path) -> list[str]:
    """The protocol log files (the tracking log has a directory of its own there)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def secrets_absent(directory: Path) -> None:
    """Neither the password nor any base64 form of it, nor the body, is in any file."""
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    forms = [PASSWORD.encode(), base64.b64encode(PASSWORD.encode()), token, token[:12],
             b"never logged", b"confidential"]
    for path in directory.rglob("*"):  # the tracking log under it too
        if not path.is_file():
            continue
        data = path.read_bytes()
        for form in forms:
            assert form not in data, (path.name, form)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Smarthost:
    """aiosmtpd handler: checks the credentials, records the messages."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str]]] = []
        self.logins: list[bytes] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append(data.login)
        ok = (data.login, data.password) == (USER.encode(), PASSWORD.encode())
        return AuthResult(success=ok, handled=False)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK queued"


@pytest.fixture
def smarthosts() -> Iterator[Callable[..., tuple[Smarthost, int]]]:
    started: list[Controller] = []

    def start(**kw: Any) -> tuple[Smarthost, int]:
        handler = Smarthost()
        port = free_port()
        kw.setdefault("auth_require_tls", False)
        controller = Controller(handler, hostname="127.0.0.1", port=port,
                                server_hostname="smarthost.test",
                                authenticator=handler.authenticate, **kw)
        controller.start()
        started.append(controller)
        return handler, port

    yield start
    for controller in started:
        controller.stop()


def ferry(tmp_path: Path, toml: str, **flags: Any) -> RunningFerry:
    path = tmp_path / "ferry.toml"
    path.write_text("[queue]\nmin_free_disk = 0\n" + toml, encoding="utf-8")
    flags = {"--listen": ["127.0.0.1:0"], "--spool": str(tmp_path / "spool"),
             "--hostname": "ferry.test", "--dns": "127.0.0.1:9", **flags}
    return RunningFerry(load_config(path, flags))


def send(f: RunningFerry, *recipients: str) -> None:
    with smtplib.SMTP(f.host, f.port) as client:
        for rcpt in recipients:
            client.sendmail("a@client.test", [rcpt], BODY)


# --- a whole Ferry --------------------------------------------------------------------------


def test_send_connector_logs_its_conversation_with_auth_masked(
        tmp_path: Path, smarthosts: Callable[..., tuple[Smarthost, int]]) -> None:
    relay, relay_port = smarthosts()
    quiet, quiet_port = smarthosts()
    f = ferry(tmp_path, f"""
[delivery]
retry_interval = 60
[[send]]
name = "relay"
address_spaces = ["partner.test"]
smarthosts = ["127.0.0.1:{relay_port}"]
tls = "off"
auth_user = "{USER}"
auth_password = "{PASSWORD}"
allow_plaintext_auth = true
protocol_log = true
[[send]]
name = "quiet"
address_spaces = ["*"]
smarthosts = ["127.0.0.1:{quiet_port}"]
tls = "off"
""")
    with f:
        send(f, "x@partner.test", "y@other.test")
        wait_for(lambda: relay.messages and quiet.messages, what="both smarthosts got mail")
        wait_for(lambda: f.store.count() == 0, what="the queue is empty")
    # Stopped: the pooled connection said QUIT and the log was flushed and closed.
    log_dir = tmp_path / "spool" / "log"
    assert protocol_logs(log_dir) == ["send-protocol-relay.log"]
    path = log_dir / "send-protocol-relay.log"
    lines = shown(path)
    in_order(lines,
             rf"\* connecting to 127\.0\.0\.1\[127\.0\.0\.1\]:{relay_port}",
             r"\* connected from 127\.0\.0\.1:\d+",
             r"< 220 smarthost\.test .*",
             r"> EHLO ferry\.test",
             r"< 250-smarthost\.test",
             r"< 250-AUTH .*",
             r"< 250 HELP",
             r"> AUTH PLAIN \*\*\*\*",
             r"< 235 2\.7\.0 Authentication successful",
             r"> MAIL FROM:<a@client\.test>.*",
             r"> RCPT TO:<x@partner\.test>",
             r"> DATA",
             r"< 354 .*",
             r"\* message body \d+ octets sent",
             r"< 250 2\.0\.0 OK queued",
             r"> QUIT",
             r"< 221 .*",
             r"\* disconnect")
    ids = {conn for conn, _, _, _ in rows(path)}
    peers = {peer for _, peer, _, _ in rows(path)}
    assert len(ids) == 1 and next(iter(ids)).startswith("relay-")
    assert peers == {f"127.0.0.1:{relay_port}"}
    size = int(re.search(r"message body (\d+) octets", "\n".join(lines))[1])  # type: ignore[index]
    assert size > len(BODY)  # the trace header and the stuffed dot are counted
    assert not any("other.test" in line for line in lines)  # the quiet connector's mail
    assert relay.logins == [USER.encode()]
    secrets_absent(log_dir)


def test_delivery_protocol_log_covers_delivery_by_mx(tmp_path: Path) -> None:
    zone = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
mx.test.    IN MX 10 mx1.mx.test.
mx1.mx.test. IN A 127.0.32.1
"""
    sink = CountingSink(["127.0.32.1"])
    try:
        with DnsResponder(zone) as dns:
            f = ferry(tmp_path, "[delivery]\nprotocol_log = true\n",
                      **{"--dns": f"{dns.address[0]}:{dns.address[1]}",
                         "--mx-port": str(sink.port)})
            with f:
                send(f, "d@mx.test")
                wait_for(lambda: len(sink.state.messages) == 1, what="the MX delivery")
                wait_for(lambda: f.store.count() == 0, what="the queue is empty")
    finally:
        sink.stop()
    log_dir = tmp_path / "spool" / "log"
    assert protocol_logs(log_dir) == ["send-protocol-mx.log"]
    path = log_dir / "send-protocol-mx.log"
    in_order(shown(path),
             rf"\* connecting to mx1\.mx\.test\[127\.0\.32\.1\]:{sink.port}",
             r"< 220 .*",
             r"> EHLO ferry\.test",
             r"> MAIL FROM:<a@client\.test>.*",
             r"> RCPT TO:<d@mx\.test>",
             r"> DATA",
             r"< 354 .*",
             r"\* message body \d+ octets sent",
             r"< 250 .*",
             r"\* disconnect")
    assert {peer for _, peer, _, _ in rows(path)} == {f"127.0.32.1:{sink.port}"}
    secrets_absent(log_dir)


@pytest.mark.parametrize("on", [False, True])
def test_delivery_smarthost_is_logged_only_when_asked(
        tmp_path: Path, smarthosts: Callable[..., tuple[Smarthost, int]], on: bool) -> None:
    relay, port = smarthosts()
    # The receive side logs (so the directory exists either way).
    toml = '[[receive]]\nname = "in"\nprotocol_log = true\n'
    if on:
        toml += "[delivery]\nprotocol_log = true\n"
    with ferry(tmp_path, toml, **{"--smarthost": f"127.0.0.1:{port}"}) as f:
        send(f, "x@partner.test")
        wait_for(lambda: relay.messages, what="the smarthost got the message")
        wait_for(lambda: f.store.count() == 0, what="the queue is empty")
    log_dir = tmp_path / "spool" / "log"
    names = protocol_logs(log_dir)
    if not on:
        assert names == ["protocol-in.log"]
        return
    assert names == ["protocol-in.log", "send-protocol-delivery.smarthost.log"]
    in_order(shown(log_dir / "send-protocol-delivery.smarthost.log"),
             r"> EHLO ferry\.test", r"> MAIL FROM:<a@client\.test>.*",
             r"> RCPT TO:<x@partner\.test>", r"\* message body \d+ octets sent",
             r"< 250 2\.0\.0 OK queued", r"> QUIT")
    # The receive side's file holds the receive side's conversation only (there, commands
    # are received: "<"; nothing Ferry sent as a client).
    received = shown(log_dir / "protocol-in.log")
    assert any(line.lower().startswith("< mail from:<a@client.test>") for line in received)
    assert not any(line.startswith(("> EHLO", "> MAIL")) for line in received)


# --- the agent with a log of its own --------------------------------------------------------


def run(coro: Awaitable[Any], limit: float = 30) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await coro

    return uvloop.run(bounded())


def deliver(log: ProtocolLog, port: int, messages: int = 1, **route: Any) -> list[RcptState]:
    """``messages`` deliveries over one agent (pooled) to 127.0.0.1:``port`` through a
    connector named after ``log``; the agent closes (QUIT) and the log is closed."""
    agent = SmtpAgent("client.test", timeout_scale=0.01, connect_timeout=200,
                      ca_file=route.pop("ca_file", None),
                      protocol_logs={log.connector: log})
    r = Route("example.net", "site:example.net", (Host("mx.test", "127.0.0.1", port),),
              connector=log.connector, **route)

    async def go() -> list[RcptState]:
        states = []
        try:
            for i in range(messages):
                env = Envelope("a@client.test", [Recipient(f"u{i}@example.net", "example.net")])
                states += [x.state for x in await agent.deliver(r, env, [0], BODY)]
        finally:
            await agent.close()
        return states

    try:
        return run(go())  # type: ignore[no-any-return]
    finally:
        log.close()


def test_login_mechanism_is_masked(
        tmp_path: Path, smarthosts: Callable[..., tuple[Smarthost, int]]) -> None:
    handler, port = smarthosts(auth_exclude_mechanism=["PLAIN"])
    log = ProtocolLog(tmp_path, "login", side="send")
    states = deliver(log, port, tls="off", auth=(USER, PASSWORD), plaintext_auth=True)
    assert states == [RcptState.DELIVERED] and handler.logins == [USER.encode()]
    in_order(shown(tmp_path / "send-protocol-login.log"),
             r"> AUTH LOGIN", r"< 334 .*", r"> \*\*\*\*", r"< 334 .*", r"> \*\*\*\*",
             r"< 235 .*", r"> MAIL FROM:<a@client\.test>.*")
    data = (tmp_path / "send-protocol-login.log").read_bytes()
    assert base64.b64encode(USER.encode()) not in data
    secrets_absent(tmp_path)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    """A server context for mx.test signed by a test CA, and the CA file."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, str(ca_file)


def test_starttls_and_its_outcome(
        tmp_path: Path, smarthosts: Callable[..., tuple[Smarthost, int]],
        tls_server: tuple[ssl.SSLContext, str]) -> None:
    context, ca_file = tls_server
    _, port = smarthosts(tls_context=context)
    ok = ProtocolLog(tmp_path, "tls", side="send")
    assert deliver(ok, port, tls="verify", ca_file=ca_file) == [RcptState.DELIVERED]
    in_order(shown(tmp_path / "send-protocol-tls.log"),
             r"> EHLO client\.test", r"< 250-STARTTLS", r"> STARTTLS", r"< 220 .*",
             r"\* TLS established: version=TLSv1\.[23] cipher=\S+",
             r"> EHLO client\.test", r"< 250.*", r"> MAIL FROM:<a@client\.test>.*",
             r"\* message body \d+ octets sent")
    # The same server, its certificate not trusted: the failure and why, nothing sent.
    bad = ProtocolLog(tmp_path, "untrusted", side="send")
    assert deliver(bad, port, tls="verify") == [RcptState.DEFERRED]
    lines = shown(tmp_path / "send-protocol-untrusted.log")
    in_order(lines, r"> STARTTLS", r"< 220 .*", r"\* TLS handshake failed: .*CERTIFICATE.*",
             r"\* giving up: 451 4\.7\.5 TLS handshake .*", r"\* disconnect.*")
    assert not any(line.startswith("> MAIL") for line in lines)


def test_rotation_on_the_send_side(
        tmp_path: Path, smarthosts: Callable[..., tuple[Smarthost, int]]) -> None:
    _, port = smarthosts()
    # Every line is flushed (and may rotate) as it is logged.
    log = ProtocolLog(tmp_path, "rot", side="send", max_bytes=1500, flush_interval=1e-9)
    assert deliver(log, port, messages=6, tls="off") == [RcptState.DELIVERED] * 6
    current = tmp_path / "send-protocol-rot.log"
    generations = [tmp_path / f"send-protocol-rot.log.{i}" for i in range(5, 0, -1)]
    files = [p for p in generations if p.exists()] + [current]
    assert len(files) >= 3, [p.name for p in files]
    for path in files:
        assert 0 < path.stat().st_size <= 1500
    # Oldest to newest, the files hold the whole conversation in order.
    lines = [line for path in files for line in shown(path)]
    assert sum(line.startswith("* message body") for line in lines) == 6
    rcpts = [rf"> RCPT TO:<u{i}@example\.net>" for i in range(6)]
    in_order(lines, r"> EHLO client\.test", *rcpts, r"> QUIT", r"\* disconnect")


def test_follow_on_messages_are_logged_behind_the_body(tmp_path: Path) -> None:
    # RFC 2920 §3.1: the next message's MAIL, RCPT and DATA go in the body's write; the log
    # shows the body's line, then those commands, all on one connection.
    sink = CountingSink(["127.0.0.1"], pipelining=True)
    log = ProtocolLog(tmp_path, "follow", side="send")
    agent = SmtpAgent("client.test", timeout_scale=0.01, protocol_logs={"follow": log})
    r = Route("example.net", "site:example.net", (Host("mx.test", "127.0.0.1", sink.port),),
              tls="off", connector="follow")

    def job(i: int) -> FollowOn:
        return FollowOn(Envelope("a@client.test", [Recipient(f"u{i}@example.net", "example.net")]),
                        [0], BODY)

    async def go() -> list[RcptState]:
        follow = deque([job(1), job(2)])
        offered = list(follow)
        try:
            results = await agent.deliver(r, job(0).envelope, [0], BODY, follow)
            for taken in offered:
                results += await agent.resume(taken)
        finally:
            await agent.close()
        return [x.state for x in results]

    try:
        assert run(go()) == [RcptState.DELIVERED] * 3
    finally:
        log.close()
        sink.stop()
    assert agent.follow_ons == 2
    path = tmp_path / "send-protocol-follow.log"
    lines = shown(path)
    in_order(lines, r"> RCPT TO:<u0@example\.net>", r"> DATA", r"< 354 .*",
             r"\* message body \d+ octets sent", r"> MAIL FROM:<a@client\.test>.*",
             r"> RCPT TO:<u1@example\.net>", r"> DATA", r"\* message body \d+ octets sent",
             r"> RCPT TO:<u2@example\.net>", r"\* message body \d+ octets sent")
    assert sum(line.startswith("> MAIL ") for line in lines) == 3
    assert len({conn for conn, _, _, _ in rows(path)}) == 1


def test_delivery_protocol_log_with_only_send_connectors_says_so(
        tmp_path: Path, smarthosts: Callable[..., tuple[Smarthost, int]],
        caplog: pytest.LogCaptureFixture) -> None:
    # No mail can leave without a [[send]] connector here: the key would log nothing.
    relay, port = smarthosts()
    toml = f"""
[delivery]
protocol_log = true
[[send]]
name = "all"
address_spaces = ["*"]
smarthosts = ["127.0.0.1:{port}"]
tls = "off"
"""
    with caplog.at_level(logging.WARNING, logger="ferry"), ferry(tmp_path, toml) as f:
        send(f, "x@partner.test")
        wait_for(lambda: relay.messages, what="the smarthost got the message")
    assert any("delivery.protocol_log" in r.getMessage() and "[[send]]" in r.getMessage()
               for r in caplog.records)
    log_dir = tmp_path / "spool" / "log"
    assert not log_dir.exists() or protocol_logs(log_dir) == []

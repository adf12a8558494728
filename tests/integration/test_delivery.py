"""Delivery end to end: Ferry accepts mail over SMTP, resolves MX through a DNS responder
the test starts (real dnspython), and delivers to aiosmtpd sinks on loopback addresses."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import random
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from engine.client.smtp import SmtpAgent
from engine.queue.records import RcptState
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink, Received
from engine.testing.wait import poll, until, wait_for

ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
one.test.      IN MX 10 mx1.one.test.
one.test.      IN MX 20 mx2.one.test.
mx1.one.test.  IN A 127.0.10.1
mx2.one.test.  IN A 127.0.10.2
two.test.      IN MX 10 mx.two.test.
mx.two.test.   IN A 127.0.10.3
dead.test.     IN MX 10 mx1.dead.test.
dead.test.     IN MX 20 mx2.one.test.
mx1.dead.test. IN A 127.0.10.9
onlydead.test. IN MX 10 mx1.dead.test.
nomx.test.     IN A 127.0.10.4
nullmx.test.   IN MX 0 .
client.test.   IN MX 10 mx.client.test.
mx.client.test. IN A 127.0.10.5
dsn.test.      IN MX 10 mx.dsn.test.
mx.dsn.test.   IN A 127.0.10.6
"""

SINK_ADDRESSES = ["127.0.10.1", "127.0.10.2", "127.0.10.3", "127.0.10.4", "127.0.10.5"]


Start = Callable[..., RunningFerry]


@pytest.fixture
def ferry(tmp_path: Path, dns_server: DnsResponder, sink: CountingSink) -> Iterator[Start]:
    running: list[RunningFerry] = []

    def start(top: dict[str, Any] | None = None, **delivery: Any) -> RunningFerry:
        """A Ferry with these ``[delivery]`` settings and top-level ``top`` (``send``,
        ``local``)."""
        config = ferry_config(tmp_path / f"spool{len(running)}")
        settings = {"dns": dns_server.address, "mx_port": sink.port, "retry_interval": 0.5,
                    "max_retry_interval": 1.0, "paused": False, **delivery}
        config = dataclasses.replace(
            config, delivery=dataclasses.replace(config.delivery, **settings), **(top or {}))
        f = RunningFerry(config)
        running.append(f)
        return f

    yield start
    for f in running:
        f.stop()


def send(f: RunningFerry, sender: str, rcpts: list[str], body: bytes,
         options: list[str] | None = None, rcpt_options: list[str] | None = None) -> None:
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        client.mail(sender, options or [])
        for rcpt in rcpts:
            client.rcpt(rcpt, rcpt_options or [])
        code, _ = client.data(body)
        assert code == 250


BODY = b"Subject: test\r\nMessage-ID: <t1@client.test>\r\n\r\nHello\r\n.dot line\r\n"


def test_delivery_by_mx_preference_byte_exact(ferry: Start, sink: CountingSink) -> None:
    f = ferry()
    send(f, "a@client.test", ["x@one.test", "y@one.test"], BODY)
    wait_for(lambda: len(sink.state.messages) == 1)
    msg = sink.state.messages[0]
    assert msg.address == "127.0.10.1"  # the preferred MX
    assert sorted(msg.recipients) == ["x@one.test", "y@one.test"]  # one transaction
    assert msg.body.startswith(b"Received: from client.test")
    assert msg.body.endswith(BODY)  # byte-exact after the trace field
    wait_for(lambda: f.store.count() == 0)  # the body is freed after the last outcome


def test_fallback_to_the_next_mx_and_implicit_mx(ferry: Start, sink: CountingSink) -> None:
    f = ferry()  # nothing listens on dead.test's preferred MX, 127.0.10.9
    send(f, "a@client.test", ["x@dead.test", "z@nomx.test"], BODY)
    wait_for(lambda: len(sink.state.messages) == 2)
    assert {m.address for m in sink.state.messages} == {"127.0.10.2", "127.0.10.4"}


def test_null_mx_fails_at_once_with_a_dsn(ferry: Start, sink: CountingSink) -> None:
    f = ferry()
    send(f, "a@client.test", ["x@nullmx.test"], BODY)
    wait_for(lambda: any(m.address == "127.0.10.5" for m in sink.state.messages))
    (dsn,) = [m for m in sink.state.messages if m.address == "127.0.10.5"]
    assert dsn.sender in ("", "<>") and dsn.recipients == ["a@client.test"]  # null sender
    parsed = email.message_from_bytes(dsn.body, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    text = dsn.body.decode()
    assert "Final-Recipient: rfc822;x@nullmx.test" in text and "Status: 5.1.10" in text


def test_5xx_gives_a_dsn_and_notify_never_none(ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["bad@two.test"] = "550 5.1.1 No such user"
    sink.state.rcpt_replies["quiet@two.test"] = "550 5.1.1 No such user"
    f = ferry()
    send(f, "a@client.test", ["bad@two.test"], BODY, options=["RET=HDRS", "ENVID=env1"],
         rcpt_options=["ORCPT=rfc822;bad@two.test"])
    send(f, "a@client.test", ["quiet@two.test"], BODY, rcpt_options=["NOTIFY=NEVER"])
    # A failure and its DSN are recorded in one commit, and a message leaves the queue only
    # after the sink took it: with the queue empty, every DSN there will be is at the sink.
    wait_for(lambda: f.store.count() == 0 and len(sink.state.messages) >= 1)
    dsns = [m for m in sink.state.messages if m.address == "127.0.10.5"]
    assert len(dsns) == 1
    text = dsns[0].body.decode()
    assert "Original-Envelope-Id: env1" in text
    assert "Original-Recipient: rfc822;bad@two.test" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in text
    assert "text/rfc822-headers" in text


def test_no_dsn_for_the_null_sender(ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["bad@two.test"] = "550 5.1.1 No such user"
    f = ferry()
    send(f, "", ["bad@two.test"], BODY)
    wait_for(lambda: f.store.count() == 0)  # the failure, with any DSN, in one commit
    assert sink.state.messages == []


def test_retry_then_success(ferry: Start, sink: CountingSink) -> None:
    sink.state.data_replies["127.0.10.3"] = "451 4.3.0 try later"
    f = ferry()
    send(f, "a@client.test", ["x@two.test"], BODY)
    (qid,) = wait_for(lambda: f.store.ids_in_state(RcptState.DEFERRED.value, 2))
    env = f.store.get(qid)
    assert env.recipients[0].state is RcptState.DEFERRED
    assert env.recipients[0].last_reply.startswith("451 4.3.0")
    sink.state.data_replies["127.0.10.3"] = ""
    wait_for(lambda: len(sink.state.messages) == 1)
    wait_for(lambda: f.store.count() == 0)


def test_a_look_that_raises_does_not_end_the_scheduler(ferry: Start, sink: CountingSink,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The runner's look at the due index raising once (a bug, a failing read) is logged
    and the runner goes on: deferred mail is still retried when it comes due, which only
    the runner's polling does (no new mail arrives to wake the scheduler)."""
    sink.state.data_replies["127.0.10.3"] = "451 4.3.0 try later"
    f = ferry()
    send(f, "a@client.test", ["x@two.test"], BODY)
    wait_for(lambda: f.store.ids_in_state(RcptState.DEFERRED.value, 2))
    scheduler = f.app.scheduler
    assert scheduler is not None
    looked = threading.Event()

    def failing_look() -> None:
        del scheduler._look  # the next look is the class's again
        looked.set()
        raise RuntimeError("a look that fails")

    f.loop.call_soon_threadsafe(setattr, scheduler, "_look", failing_look)
    assert looked.wait(30)
    sink.state.data_replies["127.0.10.3"] = ""
    wait_for(lambda: len(sink.state.messages) == 1)
    wait_for(lambda: f.store.count() == 0)
    assert "the scheduler's look at the due index failed" in caplog.text


def test_expiry_fails_with_a_dsn(ferry: Start, sink: CountingSink) -> None:
    sink.state.data_replies["127.0.10.3"] = "451 4.3.0 try later"
    f = ferry(max_queue_lifetime=1.5)
    send(f, "a@client.test", ["x@two.test"], BODY)
    wait_for(lambda: any(m.address == "127.0.10.5" for m in sink.state.messages), 20)
    (dsn,) = [m for m in sink.state.messages if m.address == "127.0.10.5"]
    text = dsn.body.decode()
    assert "Action: failed" in text and "Final-Recipient: rfc822;x@two.test" in text
    assert "451 4.3.0 try later" in text
    wait_for(lambda: f.store.count() == 0)


def test_suspend_and_resume_a_destination(ferry: Start, sink: CountingSink) -> None:
    f = ferry()
    assert f.app.scheduler is not None
    f.call(f.app.scheduler.suspend("two.test"))
    send(f, "a@client.test", ["x@two.test"], BODY)
    (qid,) = wait_for(lambda: f.store.ids_in_state(RcptState.SUSPENDED.value, 2))
    assert f.store.get(qid).recipients[0].state is RcptState.SUSPENDED
    assert sink.state.messages == []  # held, not delivered
    f.call(f.app.scheduler.resume("two.test"))
    wait_for(lambda: len(sink.state.messages) == 1)


class _AuthSink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, bool, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.authenticated else ""
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content, session.ssl is not None, login))
        return "250 2.0.0 OK"


def test_send_connector_to_a_smarthost_with_starttls_and_auth(
    tmp_path: Path, dns_server: DnsResponder, cert_files: tuple[Path, Path]
) -> None:
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    from engine.config import SendConfig

    cert, key = cert_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        ok = (data.login, data.password) == (b"relayuser", b"relaypass")
        return AuthResult(success=ok, handled=False, auth_data=data)

    import socket

    with socket.socket() as probe:  # aiosmtpd's Controller needs a known port
        probe.bind(("127.0.10.7", 0))
        port = probe.getsockname()[1]
    handler = _AuthSink()
    controller = Controller(handler, hostname="127.0.10.7", port=port, tls_context=context,
                            require_starttls=True, authenticator=authenticator,
                            auth_require_tls=True)
    controller.start()
    try:
        config = ferry_config(tmp_path / "spool")
        partner = SendConfig(name="partner", address_spaces=("*.partner.test", "partner.test"),
                             smarthosts=(("127.0.10.7", port),), tls="required",
                             auth_user="relayuser", auth_password="relaypass")
        config = dataclasses.replace(config, send=(partner,), delivery=dataclasses.replace(
            config.delivery, paused=False, dns=dns_server.address, retry_interval=0.5))
        with RunningFerry(config) as f:
            send(f, "a@client.test", ["x@eu.partner.test"], BODY)
            wait_for(lambda: len(handler.messages) == 1)
            wait_for(lambda: f.store.count() == 0)
        sender, rcpts, body, tls, login = handler.messages[0]
        assert (sender, rcpts, tls) == ("a@client.test", ["x@eu.partner.test"], True)
        assert login == "relayuser" and body.endswith(BODY)
    finally:
        controller.stop()


def test_verify_trusts_delivery_ca_file(tmp_path: Path, dns_server: DnsResponder,
                                        ca: Any, cert_files: tuple[Path, Path]) -> None:
    """``tls = "verify"`` to a smarthost whose certificate (for 127.0.0.1) comes from a
    private CA: refused (deferred, kept) with the system's store, delivered with
    ``delivery.ca_file``."""
    import socket
    import ssl

    from aiosmtpd.controller import Controller

    from engine.config import SendConfig

    cert, key = cert_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = _AuthSink()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context,
                            require_starttls=True)
    controller.start()
    try:
        partner = SendConfig(name="partner", address_spaces=("partner.test",),
                             smarthosts=(("127.0.0.1", port),), tls="verify")
        for n, trusted in enumerate((None, ca_file)):
            config = ferry_config(tmp_path / f"spool{n}")
            config = dataclasses.replace(config, send=(partner,), delivery=dataclasses.replace(
                config.delivery, paused=False, dns=dns_server.address, retry_interval=30,
                ca_file=trusted))
            with RunningFerry(config) as f:
                send(f, "a@client.test", ["x@partner.test"], BODY)
                if trusted is None:
                    qid = wait_for(lambda: f.store.ids_in_state("deferred", 1))[0]
                    reply = f.store.get(qid).recipients[0].last_reply
                    assert reply.startswith("451 4.7.5") and "certificate" in reply, reply
                    assert not handler.messages
                else:
                    wait_for(lambda: len(handler.messages) == 1)
                    wait_for(lambda: f.store.count() == 0)
        sender, rcpts, _, tls, _ = handler.messages[0]
        assert (sender, rcpts, tls) == ("a@client.test", ["x@partner.test"], True)
    finally:
        controller.stop()


def test_local_domain_to_maildir(tmp_path: Path, dns_server: DnsResponder) -> None:
    from engine.config import LocalConfig

    config = ferry_config(tmp_path / "spool", relay_networks=())
    template = str(tmp_path / "mail" / "{domain}" / "{local}")
    config = dataclasses.replace(
        config, local=(LocalConfig(domains=("local.test",), maildir=template),),
        delivery=dataclasses.replace(config.delivery, paused=False, dns=dns_server.address))
    with RunningFerry(config) as f:
        send(f, "a@client.test", ["Bob@local.test"], BODY)  # accepted from anyone
        new = tmp_path / "mail" / "local.test" / "bob" / "new"
        wait_for(lambda: new.exists() and any(new.iterdir()))
        (delivered,) = list(new.iterdir())
        content = delivered.read_bytes()
        assert content.startswith(b"Return-Path: <a@client.test>\r\n")
        assert b"Delivered-To: <Bob@local.test>" in content or b"Delivered-To: <bob@local.test>" \
            in content.lower()
        assert content.endswith(BODY)
        wait_for(lambda: f.store.count() == 0)


def test_a_site_that_takes_no_connection_is_marked_down(ferry: Start) -> None:
    # One at a time: the second sees "down" (the mark lasts down_period, at most the
    # retry interval, so neither comes back while the replies are read).
    f = ferry(down_period=30.0, retry_interval=30.0, max_per_domain=1)
    send(f, "a@client.test", ["x@onlydead.test"], BODY)
    send(f, "a@client.test", ["y@onlydead.test"], BODY)

    def replies() -> list[str]:
        return [f.store.get(e.queue_id).recipients[0].last_reply
                for e in f.store.due(time.time() + 3600, 10)]

    wait_for(lambda: len(replies()) == 2 and all(replies()))
    texts = replies()
    assert sum("not tried" in t for t in texts) == 1, texts  # one tried, one left alone


def test_stop_gives_up_a_route_lookup_the_dns_never_answers(
        ferry: Start, dns_server: DnsResponder, sink: CountingSink) -> None:
    """A stop while a destination's MX lookup waits on a DNS server that never answers
    does not wait out the resolver (10 s a lookup, then a deferral): the lookup is given
    up, the message stays queued untried, and the next start delivers it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.settimeout(30)
        f = ferry(dns=silent.getsockname())
        send(f, "a@client.test", ["x@two.test"], BODY)
        query, _ = silent.recvfrom(4096)  # the MX query is out: the lookup waits
        assert b"\x03two\x04test\x00" in query
        f.stop()
    from engine.queue.lmdb_store import LmdbQueue

    store = LmdbQueue(f.config.spool / "queue", min_free_disk=0)
    try:
        (env,) = [store.get(e.queue_id) for e in store.due(time.time() + 3600, 10)]
    finally:
        store.close_sync()
    assert [(r.state, r.attempts, r.last_reply) for r in env.recipients] == [
        (RcptState.PENDING, 0, "")]
    delivery = dataclasses.replace(f.config.delivery, dns=dns_server.address)
    with RunningFerry(dataclasses.replace(f.config, delivery=delivery)) as again:
        wait_for(lambda: len(sink.state.messages) == 1)
        wait_for(lambda: again.store.count() == 0)


def test_per_domain_limit_overrides_the_default(ferry: Start, sink: CountingSink) -> None:
    from engine.config import DomainLimits

    sink.reply_delay = 0.3  # hold replies so connections overlap
    f = ferry(max_per_domain=3, domains={"two.test": DomainLimits(max_connections=1)})
    for n in range(6):
        send(f, "a@client.test", [f"u{n}@two.test"], BODY)
        send(f, "a@client.test", [f"u{n}@one.test"], BODY)
    wait_for(lambda: len(sink.state.messages) == 12, 30)
    assert sink.state.peak["127.0.10.3"] == 1  # two.test: its own limit
    assert 1 < sink.state.peak["127.0.10.1"] <= 3  # one.test: the default


@pytest.mark.parametrize("pipeline", [True, False])
def test_queued_messages_for_a_site_follow_each_other_on_one_connection(
    ferry: Start, sink: CountingSink, pipeline: bool
) -> None:
    f = ferry(max_per_domain=1, pipeline_messages=pipeline)
    assert f.app.scheduler is not None
    # Held while they arrive, so the site's queue has all eight when delivery starts.
    f.call(f.app.scheduler.suspend("two.test"))
    for n in range(8):
        send(f, "a@client.test", [f"u{n}@two.test"], BODY)
    f.call(f.app.scheduler.resume("two.test"))
    wait_for(lambda: len(sink.state.messages) == 8 and f.store.count() == 0, 30)
    agent = f.app.agents["smtp"]
    assert isinstance(agent, SmtpAgent)
    # Sent behind an earlier body (RFC 2920 §3.1), over the site's single connection;
    # one message after another when delivery.pipeline_messages is off.
    assert (agent.follow_ons > 0) is pipeline and agent.connections_opened == 1
    assert sorted(m.recipients[0] for m in sink.state.messages) == [
        f"u{n}@two.test" for n in range(8)]


def test_groups_prepared_behind_a_stalled_transaction_go_out_on_another_connection(
    ferry: Start, sink: CountingSink
) -> None:
    """Groups a worker prepared to follow on its connection are taken back by a worker
    that is free: a next hop without PIPELINING never takes them as follow-ons, and the
    owner's transaction here stalls until every other message has arrived."""
    others = 6
    released: list[str] = []

    async def hold(envelope: Any) -> None:
        if "stall@two.test" not in envelope.rcpt_tos:
            return
        try:  # 15 s at most, so a failure is a failed test, not a hang
            await until(lambda: len(sink.state.messages) >= others, 15, "the other messages")
        except AssertionError:
            released.append("timeout")
        else:
            released.append("every other message arrived")

    sink.pipelining = False
    sink.hold = hold
    f = ferry(max_per_domain=2)
    assert f.app.scheduler is not None
    # Held while they arrive, so delivery starts with the stalling message first in line.
    f.call(f.app.scheduler.suspend("two.test"))
    send(f, "a@client.test", ["stall@two.test"], BODY)
    for n in range(others):
        send(f, "a@client.test", [f"u{n}@two.test"], BODY)
    f.call(f.app.scheduler.resume("two.test"))
    wait_for(lambda: len(sink.state.messages) == others + 1 and f.store.count() == 0, 40)
    assert released == ["every other message arrived"]


# --- delay notices (RFC 3464 action "delayed") ---------------------------------------------

BUSY = "451 4.2.1 Mailbox busy"


def notices(sink: CountingSink) -> list[str]:
    """Reports delivered to the senders' domain, client.test (its MX is 127.0.10.5)."""
    return [m.body.decode() for m in sink.state.messages if m.address == "127.0.10.5"]


def waiting(f: RunningFerry) -> list[Any]:
    return [f.store.get(e.queue_id) for e in f.store.due(time.time() + 3600, 100)]


def tried(f: RunningFerry, count: int, times: int) -> bool:
    """``count`` messages are queued and each recipient was tried at least ``times``."""
    envs = waiting(f)
    return len(envs) == count and all(r.attempts >= times for e in envs for r in e.recipients)


def test_delay_notice_is_sent_once_with_the_right_fields(ferry: Start,
                                                         sink: CountingSink) -> None:
    sink.state.rcpt_replies["late@two.test"] = BUSY
    f = ferry(delay_notice_after=1.0)
    send(f, "a@client.test", ["late@two.test"], BODY, options=["ENVID=env7"])
    # ... and the notice's own delivery recorded (outcomes are committed in batches).
    wait_for(lambda: len(notices(sink)) == 1 and len(waiting(f)) == 1)
    (env,) = waiting(f)
    assert env.delay_notified and env.recipients[0].state is RcptState.DEFERRED
    wait_for(lambda: tried(f, 1, env.recipients[0].attempts + 2))  # more deferrals after it
    (text,) = notices(sink)
    (report,) = [m for m in sink.state.messages if m.address == "127.0.10.5"]
    assert report.sender in ("", "<>") and report.recipients == ["a@client.test"]
    parsed = email.message_from_bytes(report.body, policy=email.policy.default)
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    assert parsed.get_content_type() == "multipart/report"
    for line in ("Final-Recipient: rfc822;late@two.test", "Action: delayed", "Status: 4.2.1",
                 "Diagnostic-Code: smtp; 451 4.2.1 Mailbox busy", "Original-Envelope-Id: env7",
                 "Remote-MTA: dns; ", "Will-Retry-Until: "):
        assert line in text, line
    del sink.state.rcpt_replies["late@two.test"]
    wait_for(lambda: f.store.count() == 0)
    assert any(m.recipients == ["late@two.test"] for m in sink.state.messages)
    assert len(notices(sink)) == 1


def test_no_delay_notice_for_notify_never_or_failure_or_the_null_sender(
    ferry: Start, sink: CountingSink
) -> None:
    for local in ("never", "failure", "null", "delay"):
        sink.state.rcpt_replies[f"{local}@two.test"] = BUSY
    f = ferry(delay_notice_after=0.5)
    send(f, "a@client.test", ["never@two.test"], BODY, rcpt_options=["NOTIFY=NEVER"])
    send(f, "a@client.test", ["failure@two.test"], BODY, rcpt_options=["NOTIFY=FAILURE"])
    send(f, "", ["null@two.test"], BODY)
    send(f, "a@client.test", ["delay@two.test"], BODY, rcpt_options=["NOTIFY=DELAY"])
    # Three tries each: every message was deferred past the threshold at least once.
    wait_for(lambda: tried(f, 4, 3), 30)
    (text,) = notices(sink)
    assert "Final-Recipient: rfc822;delay@two.test" in text
    flagged = {e.recipients[0].address for e in waiting(f) if e.delay_notified}
    assert flagged == {"delay@two.test"}


def test_no_delay_notice_when_turned_off(ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["late@two.test"] = BUSY
    f = ferry(delay_notice_after=0.0)
    send(f, "a@client.test", ["late@two.test"], BODY)
    wait_for(lambda: tried(f, 1, 3))
    assert notices(sink) == [] and not waiting(f)[0].delay_notified


# --- failover, down marks and resume -------------------------------------------------------


def free_port(address: str) -> int:
    """A port nothing listens on at ``address`` (until a test starts a server there)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def test_a_backup_connector_takes_the_mail_while_the_cheaper_one_is_down(
    ferry: Start,
) -> None:
    # Exchange's failover: every host of the cheapest connector for "*" refuses, so the
    # next-cheapest takes the mail at once; after the cheaper one's retry interval, new
    # mail goes by it again.
    from engine.config import SendConfig

    cheap_port = free_port("127.0.11.1")
    backup = CountingSink(["127.0.11.2"])
    cheap: CountingSink | None = None
    try:
        connectors = (
            SendConfig(name="cheap", address_spaces=("*",), cost=1, tls="off",
                       smarthosts=(("127.0.11.1", cheap_port),)),
            SendConfig(name="backup", address_spaces=("*",), cost=2, tls="off",
                       smarthosts=(("127.0.11.2", backup.port),)),
        )
        f = ferry(top={"send": connectors}, retry_interval=2.0, max_retry_interval=4.0)
        send(f, "a@client.test", ["x@far.test"], BODY)
        wait_for(lambda: len(backup.state.messages) == 1, what="the backup took the mail")
        wait_for(lambda: f.store.count() == 0)
        cheap = CountingSink(["127.0.11.1"], port=cheap_port)
        sinks = (cheap, backup)

        def one_more(n: int) -> list[Received]:
            """Send message ``n`` and wait until a connector delivered it; its copies."""
            send(f, "a@client.test", [f"u{n}@far.test"], BODY)
            return wait_for(lambda: [m for s in sinks for m in s.state.messages
                                     if m.recipients == [f"u{n}@far.test"]])

        counter = iter(range(1000))

        def by_cheap() -> list[Received]:
            one_more(next(counter))
            return cheap.state.messages if cheap is not None else []

        assert poll(by_cheap, 20, interval=0.25), (
            "the cheaper connector was not used again after its retry interval")
        assert cheap.state.messages[0].body.endswith(BODY)
    finally:
        backup.stop()
        if cheap is not None:
            cheap.stop()


def test_mail_for_a_refusing_hop_flows_soon_after_it_comes_back(
    ferry: Start, sink: CountingSink
) -> None:
    # The site is marked down when no host takes a connection; the mark must not hold
    # the message past its own retry (2 s here) though down_period is 60 s.
    f = ferry(retry_interval=2.0, max_retry_interval=2.0)
    assert f.config.delivery.down_period == 60
    send(f, "a@client.test", ["x@onlydead.test"], BODY)
    wait_for(lambda: f.store.ids_in_state(RcptState.DEFERRED.value, 1))
    back = CountingSink(["127.0.10.9"], port=sink.port)
    try:
        wait_for(lambda: back.state.messages, 20, what="delivered well before down_period")
        wait_for(lambda: f.store.count() == 0)
    finally:
        back.stop()


class _EarliestJitter(random.Random):
    """Every draw at its low end: retries come as early as the jitter allows."""

    def uniform(self, a: float, b: float) -> float:
        return a


def test_a_down_mark_never_holds_a_message_past_its_own_early_retry(ferry: Start) -> None:
    # The retry interval is jittered (±10 %): a retry drawn early must still be tried,
    # not deferred "not tried" by the down mark its own failed attempt left.  (12 s: the
    # early retry comes more than a poll interval, 1 s, before the retry interval ends.)
    f = ferry(retry_interval=12.0, max_retry_interval=12.0)
    assert f.app.scheduler is not None
    f.app.scheduler._rnd = _EarliestJitter()
    send(f, "a@client.test", ["x@onlydead.test"], BODY)

    def recipient() -> Any:
        envs = waiting(f)
        return envs[0].recipients[0] if envs else None

    wait_for(lambda: (r := recipient()) is not None and r.attempts == 1)
    second = wait_for(lambda: (r := recipient()) is not None and (
        r.attempts >= 2 or "not tried" in r.last_reply) and r, 30)
    assert "not tried" not in second.last_reply and second.attempts == 2, second


@pytest.mark.parametrize("held", [False, True], ids=["deferred", "suspended"])
def test_resume_delivers_now(ferry: Start, sink: CountingSink, held: bool) -> None:
    # ``ferry queue resume DEST`` means "deliver now": not after the recipient's retry
    # time (an hour here) nor after its site's down mark.
    from engine.ops.control import request, socket_path

    f = ferry(retry_interval=3600.0, max_retry_interval=3600.0)
    path = socket_path(f.config.spool)
    send(f, "a@client.test", ["x@onlydead.test"], BODY)
    wait_for(lambda: f.store.ids_in_state(RcptState.DEFERRED.value, 1))
    if held:
        assert request(path, {"command": "suspend", "destination": "onlydead.test"})["ok"]
    back = CountingSink(["127.0.10.9"], port=sink.port)
    try:
        reply = request(path, {"command": "resume", "destination": "onlydead.test"})
        assert reply == {"ok": True, "destination": "onlydead.test", "recipients": 1,
                         "was_suspended": held}
        wait_for(lambda: back.state.messages, 20, what="delivered after resume")
        wait_for(lambda: f.store.count() == 0)
        assert back.state.messages[0].recipients == ["x@onlydead.test"]
    finally:
        back.stop()


# --- success notices (RFC 3461 NOTIFY=SUCCESS) ---------------------------------------------


def submit(f: RunningFerry, sender: str, rcpts: dict[str, list[str]],
           options: list[str] | None = None) -> None:
    """One message to ``rcpts`` (address → its RCPT parameters)."""
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        assert client.mail(sender, options or [])[0] == 250
        for rcpt, params in rcpts.items():
            assert client.rcpt(rcpt, params)[0] == 250
        assert client.data(BODY)[0] == 250


def test_notify_success_to_a_hop_without_dsn_gets_one_relayed_report(
    ferry: Start, sink: CountingSink
) -> None:
    # RFC 3461 §5.2.2: the next hop (aiosmtpd) does not offer DSN, so Ferry reports
    # "relayed" for the recipients that asked, in one report per message.
    f = ferry()
    submit(f, "a@client.test", {
        "x@two.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;orig@two.test"],
        "y@two.test": ["NOTIFY=FAILURE"],
        "z@two.test": ["NOTIFY=SUCCESS,FAILURE"],
    }, ["ENVID=env9", "RET=FULL"])
    submit(f, "", {"n@two.test": ["NOTIFY=SUCCESS"]})  # never a report to the null sender
    # A report is committed with the outcomes it reports: an empty queue means every
    # report there is has been delivered to client.test's MX.
    wait_for(lambda: len(notices(sink)) == 1 and f.store.count() == 0)
    assert len(notices(sink)) == 1
    (report,) = [m for m in sink.state.messages if m.address == "127.0.10.5"]
    assert report.sender in ("", "<>") and report.recipients == ["a@client.test"]
    parsed = email.message_from_bytes(report.body, policy=email.policy.default)
    assert parsed["Subject"] == "Successful Mail Delivery Report"
    text = notices(sink)[0]
    assert text.count("Action: relayed") == 2 and "Action: delivered" not in text
    for line in ("Original-Envelope-Id: env9", "Original-Recipient: rfc822;orig@two.test",
                 "Final-Recipient: rfc822;x@two.test", "Final-Recipient: rfc822;z@two.test",
                 "Status: 2.0.0", "Remote-MTA: dns; ", "Diagnostic-Code: smtp; 250"):
        assert line in text, line
    assert "y@two.test" not in text  # NOTIFY=FAILURE only
    # RET=FULL applies to failure reports (RFC 3461 §4.3): the header only.
    assert "Content-Type: text/rfc822-headers" in text and "Hello" not in text
    relayed = [m for m in sink.state.messages if m.address == "127.0.10.3"]
    assert sorted(r for m in relayed for r in m.recipients) == [
        "n@two.test", "x@two.test", "y@two.test", "z@two.test"]


class _DsnPeer(Controller):
    """An aiosmtpd server that offers DSN (RFC 3461) and records the MAIL and RCPT
    arguments it was given (aiosmtpd itself refuses unknown parameters)."""

    def __init__(self, address: str, port: int) -> None:
        self.lines: list[str] = []
        self.messages: list[tuple[str, list[str]]] = []
        super().__init__(self, hostname=address, port=port)

    def factory(self) -> SMTP:
        return _DsnSMTP(self, hostname="dsn.test", decode_data=False)

    async def handle_EHLO(self, server: SMTP, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        responses.insert(1, "250-DSN")
        return responses

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK"


_DSN_PARAMS = ("NOTIFY=", "ORCPT=", "RET=", "ENVID=")


class _DsnSMTP(SMTP):
    def __init__(self, peer: _DsnPeer, **kw: Any) -> None:
        super().__init__(peer, **kw)
        self.peer = peer

    def _take(self, verb: str, arg: str | None) -> str | None:
        if arg is None:
            return None
        self.peer.lines.append(f"{verb} {arg}")
        return " ".join(w for w in arg.split(" ") if not w.upper().startswith(_DSN_PARAMS))

    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(self._take("MAIL", arg))

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(self._take("RCPT", arg))


def test_notify_success_is_passed_on_to_a_hop_that_offers_dsn(
    ferry: Start, sink: CountingSink
) -> None:
    # RFC 3461 §5.2.1: NOTIFY, ORCPT, ENVID and RET go to the next hop, which answers
    # for the notices from then on; Ferry sends none.
    peer = _DsnPeer("127.0.10.6", sink.port)
    peer.start()
    try:
        f = ferry()
        submit(f, "a@client.test",
               {"x@dsn.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;orig@dsn.test"]},
               ["ENVID=env9", "RET=HDRS"])
        wait_for(lambda: peer.messages and f.store.count() == 0)
        assert peer.messages == [("a@client.test", ["x@dsn.test"])]
        mail = next(line for line in peer.lines if line.startswith("MAIL"))
        rcpt = next(line for line in peer.lines if line.startswith("RCPT"))
        assert "RET=HDRS" in mail and "ENVID=env9" in mail
        assert "NOTIFY=SUCCESS" in rcpt and "ORCPT=rfc822;orig@dsn.test" in rcpt
        assert notices(sink) == []
    finally:
        peer.stop()


class _LmtpServer(Controller):
    """aiosmtpd's LMTP server (RFC 2033), recording the recipients it delivered to."""

    def __init__(self, address: str, port: int) -> None:
        self.delivered: list[str] = []
        super().__init__(self, hostname=address, port=port)

    def factory(self) -> SMTP:
        return LMTP(self, hostname="lmtp.test", decode_data=False)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.delivered += envelope.rcpt_tos
        return "250 2.0.0 Delivered"


@pytest.mark.parametrize("agent", ["maildir", "lmtp"])
def test_notify_success_after_local_delivery_gets_a_delivered_report(
    ferry: Start, sink: CountingSink, tmp_path: Path, agent: str
) -> None:
    # RFC 3461 §5.2.3: the final delivery is ours (Maildir, or the LMTP server, which
    # offers no DSN), so the report says "delivered".
    from engine.config import LocalConfig

    lmtp = _LmtpServer("127.0.10.7", free_port("127.0.10.7"))
    lmtp.start()
    try:
        if agent == "lmtp":
            local = LocalConfig(domains=("local.test",), lmtp=("127.0.10.7", lmtp.port))
        else:
            local = LocalConfig(domains=("local.test",),
                                maildir=str(tmp_path / "mail" / "{domain}" / "{local}"))
        f = ferry(top={"local": (local,)})
        submit(f, "a@client.test", {"bob@local.test": ["NOTIFY=SUCCESS"]}, ["ENVID=env3"])
        wait_for(lambda: len(notices(sink)) == 1 and f.store.count() == 0)
        if agent == "lmtp":
            assert lmtp.delivered == ["bob@local.test"]
        else:
            assert any((tmp_path / "mail" / "local.test" / "bob" / "new").iterdir())
    finally:
        lmtp.stop()
    (text,) = notices(sink)
    for line in ("Action: delivered", "Final-Recipient: rfc822;bob@local.test",
                 "Status: 2.0.0", "Original-Envelope-Id: env3"):
        assert line in text, line
    assert "Action: relayed" not in text

"""The operator's log over real sockets, a real queue and the real file system: refusals
and AUTH failures (engine.server.session), back pressure start/clear and low disk at start
(engine.ops.pressure), the 451 path, and the mail log lines of delivered, deferred and
bounced mail (engine.ops.maillog)."""

from __future__ import annotations

import base64
import dataclasses
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.server.auth import hash_password
from engine.testing.dns import DnsResponder
from engine.testing.logs import CapturedLog
from engine.testing.rawsmtp import RawClient
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

#: More free space than any test machine has: the disk is "low" against it.
HUGE = 1 << 62


@pytest.fixture
def log() -> Iterator[CapturedLog]:
    with CapturedLog() as captured:
        yield captured


@pytest.fixture
def running() -> Iterator[list[RunningFerry]]:
    started: list[RunningFerry] = []
    yield started
    for f in started:
        f.stop()


def start(running: list[RunningFerry], config: object) -> RunningFerry:
    f = RunningFerry(config)  # type: ignore[arg-type]
    running.append(f)
    return f


def test_relay_denied_at_rcpt_is_one_line_with_client_helo_sender_and_recipient(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    config = ferry_config(tmp_path / "spool", relay_networks=())
    config = dataclasses.replace(config, accepted_domains=("accepted.test",))
    f = start(running, config)
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        client.mail("s@client.test")
        code, _ = client.rcpt("x@elsewhere.test")
        assert code == 554
        assert client.rcpt("ok@accepted.test")[0] == 250
    line = log.wait("NOQUEUE: reject: RCPT")
    assert "INFO ferry.mail: NOQUEUE: reject: RCPT from [127.0.0.1]: 554 5.7.1 " in line
    # by=: the policy agent that refused (relay control, engine.agents.relay), and why.
    assert line.endswith("; from=<s@client.test> to=<x@elsewhere.test> helo=<client.test> "
                         "connector=default by=<relay: relay access denied>")
    # Only the refusal: the accepted RCPT and MAIL wrote nothing.
    assert len(log.matching("NOQUEUE")) == 1
    record = next(r for r in log.records if "NOQUEUE" in r.getMessage())
    assert record.fields["recipient"] == "x@elsewhere.test"  # type: ignore[attr-defined]


def test_mail_before_auth_and_too_many_recipients_are_refused_with_a_line(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    config = ferry_config(tmp_path / "spool", require_auth=True, allow_plaintext_auth=True,
                          max_recipients=1)
    config = dataclasses.replace(config, users={"app": hash_password("s3cret")})
    f = start(running, config)
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        assert client.mail("s@client.test", ["SIZE=10"])[0] == 530
        client.login("app", "s3cret")
        assert client.mail("s@client.test")[0] == 250
        assert client.rcpt("one@[127.0.0.1]")[0] == 250
        assert client.rcpt("two@[127.0.0.1]")[0] == 452
        client.noop()
    line = log.wait("NOQUEUE: reject: MAIL")
    assert line.endswith("MAIL from [127.0.0.1]: 530 5.7.0 Authentication required; "
                         "from=<s@client.test> helo=<client.test> connector=default")
    line = log.wait("NOQUEUE: reject: RCPT")
    assert " 452 4.5.3 " in line and "from=<s@client.test> to=<two@[127.0.0.1]> " in line
    # The NOOP, the accepted MAIL and RCPT and the AUTH wrote no refusal line.
    assert len(log.matching("NOQUEUE")) == 2 and not log.matching("AUTH failed")


def test_auth_failure_names_mechanism_user_and_client_never_the_password(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    config = ferry_config(tmp_path / "spool", allow_plaintext_auth=True)
    config = dataclasses.replace(config, users={"app": hash_password("s3cret")})
    f = start(running, config)
    password = "hunter2-wrong"
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("app", password)
    line = log.wait("AUTH failed")
    assert "INFO ferry.mail: AUTH failed from [127.0.0.1]: mechanism=PLAIN, user=app, " \
           "helo=<client.test>, connector=default (535 5.7.8 " in line
    secrets = (password, base64.b64encode(f"\0app\0{password}".encode()).decode())
    assert not [x for x in log.lines if any(s in x for s in secrets)]


def test_auth_failure_without_a_user_name(tmp_path: Path, log: CapturedLog,
                                          running: list[RunningFerry]) -> None:
    config = ferry_config(tmp_path / "spool", allow_plaintext_auth=True)
    config = dataclasses.replace(config, users={"app": hash_password("s3cret")})
    f = start(running, config)
    with RawClient(f.host, f.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.test")
        # Decoded, but no user name: the mechanism itself refuses it (RFC 4616 §2).
        empty = base64.b64encode(b"\0\0pw").decode()
        assert raw.command(f"AUTH PLAIN {empty}".encode()).code == 535
    line = log.wait("AUTH failed")
    assert "mechanism=PLAIN, user=(none), helo=<client.test>" in line and "pw" not in line


def test_back_pressure_warns_once_when_it_starts_and_once_when_it_clears(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    f = start(running, ferry_config(tmp_path / "spool"))
    store = f.store
    store.disk_check_interval = 0.0  # look at the file system at every MAIL
    store.min_free_disk = HUGE
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        for _ in range(3):
            assert client.mail("s@client.test")[0] == 452
            client.rset()
    started = log.wait("back pressure: disk space low")
    assert "WARNING ferry.queue: " in started
    assert f"below queue.min_free_disk {HUGE / (1 << 20):.1f} MiB" in started
    assert "MiB free in " in started and str(tmp_path) in started
    assert len(log.matching("NOQUEUE: reject: MAIL")) == 3
    store.min_free_disk = 0
    cleared = log.wait("back pressure cleared")
    assert "(disk space low)" in cleared and "3 commands refused" in cleared
    assert len(log.matching("back pressure: ")) == 1
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        assert client.mail("s@client.test")[0] == 250


def test_low_free_disk_at_start_warns_that_every_mail_gets_452(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, queue=dataclasses.replace(config.queue,
                                                                   min_free_disk=HUGE))
    f = start(running, config)
    line = log.wait("spool free space is low at start: ")
    assert "WARNING" in line and "every MAIL will get 452 4.3.1" in line
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        assert client.mail("s@client.test")[0] == 452
    log.wait("NOQUEUE: reject: MAIL")
    # The same episode: the refusal writes no second back pressure WARNING.
    assert log.matching("back pressure: ") == []


def test_a_message_the_writer_refuses_after_data_logs_an_error_with_the_reason(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    # The writer process keeps the configured floor; the session's side is lowered, so
    # MAIL is admitted and the commit is refused: the 451 after DATA.
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, queue=dataclasses.replace(config.queue,
                                                                   min_free_disk=HUGE))
    f = start(running, config)
    f.store.disk_check_interval = 0.0
    f.store.min_free_disk = 0
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        client.mail("s@client.test")
        client.rcpt("r@[127.0.0.1]")
        code, _ = client.data(b"Subject: x\r\n\r\nx\r\n")
        assert code == 451
    line = log.wait("not stored, answered 451")
    assert "ERROR ferry.server: message from <s@client.test> [127.0.0.1] not stored, " \
           "answered 451 4.3.1: disk space low (" in line
    assert "below queue.min_free_disk" in line


ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
two.test.      IN MX 10 mx.two.test.
mx.two.test.   IN A 127.0.12.3
client.test.   IN MX 10 mx.client.test.
mx.client.test. IN A 127.0.12.5
"""


def test_received_delivered_deferred_and_bounced_lines(
        tmp_path: Path, log: CapturedLog, running: list[RunningFerry]) -> None:
    sink = CountingSink(["127.0.12.3", "127.0.12.5"])
    try:
        with DnsResponder(ZONE) as dns:
            sink.state.rcpt_replies["bad@two.test"] = "550 5.1.1 No such user"
            sink.state.rcpt_replies["late@two.test"] = "451 4.7.1 Greylisted"
            config = ferry_config(tmp_path / "spool")
            config = dataclasses.replace(config, delivery=dataclasses.replace(
                config.delivery, paused=False, dns=dns.address, mx_port=sink.port,
                retry_interval=60.0))
            f = start(running, config)
            with smtplib.SMTP(f.host, f.port) as client:
                client.ehlo("client.test")
                client.sendmail("a@client.test", ["ok@two.test", "bad@two.test",
                                                  "late@two.test"],
                                b"Subject: t\r\nMessage-ID: <t1@client.test>\r\n\r\nhi\r\n")
            received = log.wait(": from=<a@client.test>")
            assert "size=" in received and "nrcpt=3, client=[127.0.0.1], " \
                   "helo=<client.test>" in received and "message-id=<t1@client.test>" \
                   in received
            qid = received.split(": ")[1]
            sent = log.wait("to=<ok@two.test>")
            assert f"{qid}: to=<ok@two.test>, relay=mx.two.test[127.0.12.3:" in sent
            assert ", attempt=1, status=sent (250" in sent
            bounced = log.wait("to=<bad@two.test>")
            assert "status=bounced (550 5.1.1 No such user)" in bounced
            deferred = log.wait("to=<late@two.test>")
            assert ", retry=" in deferred and "status=deferred (451 4.7.1 Greylisted)" \
                in deferred
            log.wait(f"{qid}: sender non-delivery notification: ")
            wait_for(lambda: any(m.address == "127.0.12.5" for m in sink.state.messages),
                     what="the DSN at the sender's MX")
    finally:
        sink.stop()

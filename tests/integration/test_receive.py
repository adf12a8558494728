"""The receive service over real sockets on 127.0.0.1, with a real queue database."""

from __future__ import annotations

import ipaddress
import logging
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage

import pytest
import trustme

from engine.message.headers import scan_headers
from engine.queue.records import id_bytes
from engine.server.auth import hash_password
from engine.testing.rawsmtp import RawClient
from engine.testing.wait import wait_for
from tests.integration.conftest import StartFerry

NO_RELAY = (ipaddress.ip_network("192.0.2.0/24"),)  # loopback clients may not relay


def queued_id(reply_text: str) -> bytes:
    return id_bytes(reply_text.rsplit(" ", 1)[1])



def at_data(c: RawClient) -> None:
    """Greeting, EHLO, one relayed recipient, and DATA answered 354: the body is next."""
    c.reply()
    c.command(b"EHLO client.test")
    c.command(b"MAIL FROM:<a@client.test>")
    c.command(b"RCPT TO:<b@example.net>")
    assert c.command(b"DATA").code == 354


def test_message_is_queued_with_received_field_and_envelope(start_ferry: StartFerry) -> None:
    ferry = start_ferry()
    body = b"Subject: hello\r\nMessage-ID: <m1@client.test>\r\n\r\n.leading dot\r\nend\r\n"
    with smtplib.SMTP(ferry.host, ferry.port, local_hostname="client.test") as client:
        code, _ = client.ehlo()
        assert code == 250
        for kw in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes",
                   "chunking", "dsn"):
            assert kw in client.esmtp_features, kw
        client.mail("sender@client.test", [f"SIZE={len(body)}", "RET=HDRS", "ENVID=e+2B1"])
        client.rcpt("user@example.net", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;user@example.net"])
        code, text = client.data(body)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    qid = queued_id(text.decode())
    env = ferry.store.get(qid)
    assert env.sender == "sender@client.test"
    assert [(r.address, r.next_hop, r.notify, r.orcpt) for r in env.recipients] == [
        ("user@example.net", "example.net", ("FAILURE", "DELAY"), "rfc822;user@example.net")]
    assert (env.ret, env.envid, env.message_id) == ("HDRS", "e+1", "<m1@client.test>")
    assert env.client_address == "127.0.0.1" and env.receive_connector == "default"
    stored = ferry.store.body(qid)
    scan = scan_headers(stored)
    assert scan.received == 1 and stored.startswith(b"Received: from client.test")
    assert qid.hex().upper().encode() in stored[: scan.fields[0][3]]
    assert stored.endswith(body)  # the body arrives byte-exact after the trace field
    assert env.size == len(stored)


def test_pipelined_transaction_with_aiosmtplib(start_ferry: StartFerry) -> None:
    import asyncio

    import aiosmtplib

    ferry = start_ferry()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@client.test", "b@example.net", "pipelined"
    msg.set_content("hello\n")

    async def send() -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        return await aiosmtplib.send(msg, hostname=ferry.host, port=ferry.port,
                                     recipients=["b@example.net", "c@example.net"])

    errors, text = asyncio.run(send())
    assert errors == {} and "queued as" in text
    env = ferry.store.get(queued_id(text))
    assert [r.address for r in env.recipients] == ["b@example.net", "c@example.net"]


def test_relay_control_for_clients_that_may_not_relay(start_ferry: StartFerry) -> None:
    ferry = start_ferry(relay_networks=NO_RELAY, accepted_domains=("example.com",))
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        cases = {
            b"<user@example.com>": 250,
            b"<User@EXAMPLE.COM>": 250,
            b"<Postmaster>": 250,
            b"<user@example.org>": 554,
            b"<user%example.org@example.com>": 554,  # percent hack
            b'<"user@example.org"@example.com>': 554,  # quoted local part holding @
            b"<example.org!user@example.com>": 554,  # bang path
            b"<@example.com:user@example.org>": 554,  # source route to elsewhere
            b"<user@[192.0.2.1]>": 554,  # address literal
        }
        for path, code in cases.items():
            reply = c.command(b"RCPT TO:" + path)
            assert reply.code == code, (path, reply)
            if code == 554:
                assert reply.enhanced == "5.7.1"


def test_a_client_that_half_closes_after_its_message_gets_every_reply(
    start_ferry: StartFerry,
) -> None:
    """The end of data, QUIT and the end of the client's side in one go: the message is
    stored while the rest waits, and the 250 and the 221 still come before the close."""
    ferry = start_ferry()
    with RawClient(ferry.host, ferry.port) as c:
        at_data(c)
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        stored, bye = c.replies(2)
        assert stored.code == 250 and bye.code == 221
        assert c.closed_by_server()
    assert ferry.store.body(queued_id(stored.text)).endswith(b"body\r\n")


def test_size_limit_and_oversize_read_to_the_end(start_ferry: StartFerry) -> None:
    ferry = start_ferry(max_message_size=2000)
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        assert "SIZE 2000" in c.command(b"EHLO client.test").lines
        assert c.command(b"MAIL FROM:<a@client.test> SIZE=5000").code == 552
        c.command(b"MAIL FROM:<a@client.test>")
        c.command(b"RCPT TO:<b@example.net>")
        assert c.command(b"DATA").code == 354
        lines = b"".join(b"RCPT TO:<x%d@example.net>\r\n" % i for i in range(200))
        c.send(lines + b".\r\n")
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (552, "5.3.4")
        assert c.command(b"NOOP").code == 250  # in sync: the body was not read as commands
    assert ferry.store.count() == 0


def test_too_many_recipients(start_ferry: StartFerry) -> None:
    ferry = start_ferry(max_recipients=3)
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        c.command(b"MAIL FROM:<a@client.test>")
        codes = [c.command(b"RCPT TO:<r%d@example.net>" % i).code for i in range(5)]
    assert codes == [250, 250, 250, 452, 452]


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\r.\r\n",
             b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]


@pytest.mark.parametrize("vector", SMUGGLING, ids=repr)
def test_smuggling_is_refused_end_to_end(start_ferry: StartFerry, vector: bytes) -> None:
    ferry = start_ferry()
    with RawClient(ferry.host, ferry.port) as c:
        at_data(c)
        c.send(b"Subject: x\r\n\r\nhello" + vector + b"MAIL FROM:<evil@x.test>\r\n"
               b"RCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n.\r\n")
        reply = c.reply()
        assert reply.code == 554 and "bare" in reply.text
        assert c.command(b"NOOP").code == 250
    assert ferry.store.count() == 0


def test_smuggling_normalised_gives_one_canonical_message(start_ferry: StartFerry) -> None:
    ferry = start_ferry(bare_eol="normalize")
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        c.command(b"MAIL FROM:<a@client.test>")
        c.command(b"RCPT TO:<b@example.net>")
        c.command(b"DATA")
        c.send(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x.test>\r\n.\r\n")
        reply = c.reply()
        assert reply.code == 250
        assert c.command(b"NOOP").code == 250
    (entry,) = ferry.store.due(time.time() + 10, 10)
    body = ferry.store.body(entry.queue_id)
    assert b"\n" not in body.replace(b"\r\n", b"") and b"\r" not in body.replace(b"\r\n", b"")
    assert body.endswith(b"hello\r\n.\r\nMAIL FROM:<evil@x.test>\r\n")


def test_starttls_auth_and_relay_for_authenticated_users(
    start_ferry: StartFerry, cert_files: tuple[object, object], ca: trustme.CA
) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="starttls", cert_file=cert, key_file=key, relay_networks=NO_RELAY,
                        users={"app": hash_password("s3cret")})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(ferry.host, ferry.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        client.rset()
        client.starttls(context=context)
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("app", "wrong")
        client.login("app", "s3cret")
        refused = client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        assert refused == {}
    (entry,) = ferry.store.due(time.time() + 10, 10)
    env = ferry.store.get(entry.queue_id)
    assert env.auth_user == "app"
    received = ferry.store.body(entry.queue_id).split(b"\r\n\r\n")[0]
    assert b"ESMTPSA" in received and b"TLSv1." in received


def test_starttls_injection_is_defeated(
    start_ferry: StartFerry, cert_files: tuple[object, object], ca: trustme.CA
) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="starttls", cert_file=cert, key_file=key, strict_pipelining=False)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        # CVE-2011-0411: commands pipelined in plaintext after STARTTLS
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.net>\r\n")
        assert c.reply().code == 220
        c.starttls(context, "ferry.test")
        # nothing of the injected plaintext survived: the session starts afresh
        assert c.command(b"MAIL FROM:<a@client.test>").code == 503
        assert c.command(b"EHLO client.test").code == 250
        assert c.command(b"RCPT TO:<b@example.net>").code == 503


def test_starttls_injection_with_strict_pipelining_closes(
    start_ferry: StartFerry, cert_files: tuple[object, object]
) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="starttls", cert_file=cert, key_file=key)
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
        assert c.reply().code == 554
        assert c.closed_by_server()


def test_idle_timeout(start_ferry: StartFerry) -> None:
    ferry = start_ferry(idle_timeout=1.0)
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (421, "4.4.2")
        assert c.closed_by_server()


def test_connection_limits(start_ferry: StartFerry) -> None:
    ferry = start_ferry(max_connections_per_ip=2)
    first, second = RawClient(ferry.host, ferry.port), RawClient(ferry.host, ferry.port)
    assert first.reply().code == 220 and second.reply().code == 220
    with RawClient(ferry.host, ferry.port) as third:
        reply = third.reply()
        assert (reply.code, reply.enhanced) == (421, "4.7.0")
    first.close()
    wait_for(lambda: len(ferry.app.connectors[0].sessions) == 1, 10, "the first one gone")
    with RawClient(ferry.host, ferry.port) as fourth:
        assert fourth.reply().code == 220
    second.close()


def test_remote_ranges_refuse_other_clients(start_ferry: StartFerry) -> None:
    ferry = start_ferry(remote_ranges=NO_RELAY)
    with RawClient(ferry.host, ferry.port) as c:
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (554, "5.7.1")


def test_messages_per_connection_limit(start_ferry: StartFerry) -> None:
    ferry = start_ferry(max_messages_per_connection=2)
    with smtplib.SMTP(ferry.host, ferry.port) as client:
        for _ in range(2):
            client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        assert info.value.smtp_code == 421


def test_back_pressure_gives_452_at_mail(start_ferry: StartFerry) -> None:
    ferry = start_ferry()
    ferry.store.min_free_disk = 1 << 62
    ferry.store.disk_check_interval = 0
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        reply = c.command(b"MAIL FROM:<a@client.test>")
        assert (reply.code, reply.enhanced) == (452, "4.3.1")
        ferry.store.min_free_disk = 0  # the cause goes away: so does the refusal
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250


def test_mail_loop_is_refused(start_ferry: StartFerry) -> None:
    ferry = start_ferry(max_received_headers=5)
    loop_headers = b"".join(b"Received: from hop%d\r\n" % i for i in range(5))
    with smtplib.SMTP(ferry.host, ferry.port) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@client.test", ["b@example.net"], loop_headers + b"\r\nx\r\n")
        assert info.value.smtp_code == 554 and b"5.4.6" in info.value.smtp_error
        client.sendmail("a@client.test", ["b@example.net"], loop_headers[:-20] + b"\r\nx\r\n")


def test_bdat_over_a_socket(start_ferry: StartFerry) -> None:
    ferry = start_ferry()
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.net>\r\n"
               b"BDAT 14\r\nSubject: x\r\n\r\nBDAT 3 LAST\r\nhi\n")
        codes = [r.code for r in c.replies(4)]
    assert codes == [250, 250, 250, 554]  # the bare LF in the last chunk is refused
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        c.send(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.net>\r\n"
               b"BDAT 14\r\nSubject: x\r\n\r\nBDAT 4 LAST\r\nhi\r\n")
        replies = c.replies(4)
    assert [r.code for r in replies] == [250, 250, 250, 250]
    assert ferry.store.body(queued_id(replies[-1].text)).endswith(b"Subject: x\r\n\r\nhi\r\n")


def test_a_transaction_is_served_beside_a_thousand_idle_connections(
    start_ferry: StartFerry,
) -> None:
    ferry = start_ferry(max_connections=2000, max_connections_per_ip=2000)
    idle = [socket.create_connection((ferry.host, ferry.port), timeout=10) for _ in range(1000)]
    try:
        for sock in idle[:: 100]:
            assert sock.recv(100).startswith(b"220 ")
        # Served at all; how fast, against no idle connections, is benchmarks/bench_idle.py.
        with smtplib.SMTP(ferry.host, ferry.port, timeout=10) as client:
            client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
    finally:
        for sock in idle:
            sock.close()


def test_early_talker_is_refused(start_ferry: StartFerry) -> None:
    ferry = start_ferry(greet_delay=0.5)
    with RawClient(ferry.host, ferry.port) as c:
        c.send(b"EHLO spam.test\r\n")  # before the greeting
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (554, "5.5.1")
        assert c.closed_by_server()
    with RawClient(ferry.host, ferry.port) as c:  # a patient client is served
        assert c.reply().code == 220


def test_minimum_data_rate(start_ferry: StartFerry) -> None:
    ferry = start_ferry(min_data_rate=1_000_000, data_rate_grace=0.5)
    with RawClient(ferry.host, ferry.port) as c:
        at_data(c)
        for _ in range(30):  # a trickle, far under a megabyte a second
            try:
                c.send(b"slow line\r\n")
            except OSError:
                break
            time.sleep(0.1)
        reply = c.reply()
        assert (reply.code, reply.enhanced, reply.text) == (421, "4.4.2", "Data rate too low, "
                                                           "closing connection")
    assert ferry.store.count() == 0


def test_errors_before_421(start_ferry: StartFerry) -> None:
    ferry = start_ferry(max_errors=3)
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        codes = [c.command(b"FROB").code for _ in range(2)]
        reply = c.command(b"FROB")
        assert codes == [500, 500]
        assert reply.code == 500 and c.reply().code == 421
        assert c.closed_by_server()


def test_auth_failures_before_421(start_ferry: StartFerry) -> None:
    import base64

    ferry = start_ferry(users={"app": hash_password("s3cret")}, allow_plaintext_auth=True,
                        max_auth_failures=2)
    wrong = base64.b64encode(b"\0app\0wrong")
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        assert c.command(b"AUTH PLAIN " + wrong).code == 535
        reply = c.command(b"AUTH PLAIN " + wrong)
        assert (reply.code, reply.enhanced) == (421, "4.7.0")
        assert c.closed_by_server()


def test_implicit_tls(start_ferry: StartFerry, cert_files: tuple[object, object],
                      ca: trustme.CA) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="implicit", cert_file=cert, key_file=key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP_SSL(ferry.host, ferry.port, context=context,
                          local_hostname="client.test") as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
    (entry,) = ferry.store.due(time.time() + 10, 10)
    assert b"with ESMTPS" in ferry.store.body(entry.queue_id)


def test_required_tls_refuses_mail_in_plaintext(
    start_ferry: StartFerry, cert_files: tuple[object, object], ca: trustme.CA
) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="required", cert_file=cert, key_file=key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(ferry.host, ferry.port) as client:
        client.ehlo()
        code, _ = client.mail("a@client.test")
        assert code == 530
        client.starttls(context=context)
        client.ehlo()
        assert client.mail("a@client.test")[0] == 250


def test_back_pressure_at_the_end_of_data_gives_451(start_ferry: StartFerry) -> None:
    ferry = start_ferry()
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        c.command(b"RCPT TO:<b@example.net>")
        assert c.command(b"DATA").code == 354
        ferry.store.min_free_disk = 1 << 62  # the disk fills while the body is on its way
        ferry.store.disk_check_interval = 0
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (451, "4.3.1")  # never a 250 not durable
    assert ferry.store.count() == 0


def test_an_ingest_failure_gives_451_and_logs_the_traceback(
    start_ferry: StartFerry, caplog: pytest.LogCaptureFixture
) -> None:
    ferry = start_ferry()

    def broken_route(domain: str) -> str:
        raise LookupError(f"no route for {domain}")  # a fault the router cannot be led into

    ferry.app.connectors[0].ingest.route = broken_route
    caplog.set_level(logging.ERROR, logger="ferry.server")
    with RawClient(ferry.host, ferry.port) as c:
        at_data(c)
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (451, "4.3.0")
        assert c.command(b"NOOP").code == 250  # the session goes on
    (record,) = [r for r in caplog.records if r.name == "ferry.server"]
    assert record.exc_info is not None and record.exc_info[0] is LookupError
    assert "MessageReceived" in record.getMessage()
    assert ferry.store.count() == 0


def auth_session(c: RawClient) -> None:
    c.reply()
    c.command(b"EHLO client.test")


def test_an_over_long_auth_response_ends_the_exchange(start_ferry: StartFerry) -> None:
    import base64

    ferry = start_ferry(users={"app": hash_password("s3cret")}, allow_plaintext_auth=True,
                        max_auth_failures=2)
    wrong = base64.b64encode(b"\0app\0wrong")
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        assert c.command(b"AUTH PLAIN").code == 334
        reply = c.command(b"A" * 20_000)
        assert (reply.code, reply.enhanced) == (500, "5.5.6")  # RFC 4954 §6
        # RFC 4954 §4: the error ended the exchange; NOOP is a command again.
        assert c.command(b"NOOP").code == 250
        # No AUTH failure was counted: one wrong password is the first (535), not the
        # second (421).
        assert c.command(b"AUTH PLAIN " + wrong).code == 535
        assert c.command(b"NOOP").code == 250


def test_auth_plain_equals_is_an_empty_response_not_a_challenge(
    start_ferry: StartFerry,
) -> None:
    ferry = start_ferry(users={"app": hash_password("s3cret")}, allow_plaintext_auth=True)
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        reply = c.command(b"AUTH PLAIN =")
        assert (reply.code, reply.enhanced) == (535, "5.7.8")  # no 334
        assert c.command(b"NOOP").code == 250


@pytest.mark.parametrize("rcpt", [b"<b@example.net>", b"<user@example.com>"],
                         ids=["relayed", "local"])
def test_require_auth_refuses_mail_before_auth(start_ferry: StartFerry, rcpt: bytes) -> None:
    import base64

    ferry = start_ferry(users={"app": hash_password("s3cret")}, allow_plaintext_auth=True,
                        require_auth=True, accepted_domains=("example.com",))
    good = base64.b64encode(b"\0app\0s3cret")
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        reply = c.command(b"MAIL FROM:<a@client.test>")
        assert (reply.code, reply.enhanced, reply.text) == (530, "5.7.0",
                                                            "Authentication required")
        assert c.command(b"RCPT TO:" + rcpt).code == 503  # in sync: no transaction
        assert c.command(b"AUTH PLAIN " + good).code == 235
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RCPT TO:" + rcpt).code == 250
        assert c.command(b"DATA").code == 354
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert c.reply().code == 250
    (entry,) = ferry.store.due(time.time() + 10, 10)
    assert ferry.store.get(entry.queue_id).auth_user == "app"


def test_require_auth_is_off_by_default(start_ferry: StartFerry) -> None:
    ferry = start_ferry(users={"app": hash_password("s3cret")}, allow_plaintext_auth=True)
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250


def test_long_lines_reject_mode_refuses_at_the_end_of_data(start_ferry: StartFerry) -> None:
    ferry = start_ferry(long_lines="reject")
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        c.command(b"MAIL FROM:<a@client.test>")
        c.command(b"RCPT TO:<b@example.net>")
        assert c.command(b"DATA").code == 354
        c.send(b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n.\r\n")
        reply = c.reply()
        assert (reply.code, reply.enhanced) == (554, "5.6.0")
        assert "longer than 1000 octets" in reply.text
        assert c.command(b"NOOP").code == 250
        # A line of 998 octets and its CRLF is the longest allowed (RFC 5321 §4.5.3.1.6).
        c.command(b"MAIL FROM:<a@client.test>")
        c.command(b"RCPT TO:<b@example.net>")
        c.command(b"DATA")
        c.send(b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n")
        assert c.reply().code == 250
    assert ferry.store.count() == 1


def test_require_auth_without_auth_offered_is_warned_about(
    start_ferry: StartFerry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferry.server")
    ferry = start_ferry(require_auth=True)  # no [users]: no one could ever send
    assert any("require_auth" in r.getMessage() for r in caplog.records)
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        assert c.command(b"MAIL FROM:<a@client.test>").code == 530


def test_starttls_forgets_an_auth_made_in_plaintext(
    start_ferry: StartFerry, cert_files: tuple[object, object], ca: trustme.CA
) -> None:
    # RFC 3207 §4.2: after the TLS handshake the server discards what it knew of the
    # client, an AUTH included: the user relays (and is recorded) only after a new AUTH.
    import base64

    cert, key = cert_files
    ferry = start_ferry(tls="starttls", cert_file=cert, key_file=key, relay_networks=NO_RELAY,
                        users={"app": hash_password("s3cret")}, allow_plaintext_auth=True)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    good = base64.b64encode(b"\0app\0s3cret")
    with RawClient(ferry.host, ferry.port) as c:
        auth_session(c)
        assert c.command(b"AUTH PLAIN " + good).code == 235
        assert c.command(b"STARTTLS").code == 220
        c.starttls(context, "ferry.test")
        assert c.command(b"EHLO client.test").code == 250
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RCPT TO:<b@example.net>").code == 554  # no relay without AUTH
        assert c.command(b"RSET").code == 250
        assert c.command(b"AUTH PLAIN " + good).code == 235
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RCPT TO:<b@example.net>").code == 250

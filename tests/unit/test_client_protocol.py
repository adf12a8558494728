"""The sans-I/O client state machine: reply matching, extensions, pipelining, STARTTLS."""

from __future__ import annotations

import pytest

from engine.protocol.client import ClientConnection, ClientProtocolError, Greeting, Response
from engine.protocol.command import Command
from engine.protocol.errors import ReplyError
from engine.protocol.events import NEED_DATA

EHLO_REPLY = (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
              b"250-CHUNKING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 DSN\r\n")


def events(conn: ClientConnection, data: bytes) -> list[Greeting | Response]:
    conn.receive_data(data)
    found: list[Greeting | Response] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Greeting | Response)
        found.append(event)
    return found


def greeted(ehlo: bytes = EHLO_REPLY) -> ClientConnection:
    conn = ClientConnection()
    (greeting,) = events(conn, b"220 mx.test ESMTP\r\n")
    assert isinstance(greeting, Greeting) and greeting.reply.code == 220
    assert conn.send(Command("EHLO", arg="client.test")) == b"EHLO client.test\r\n"
    (resp,) = events(conn, ehlo)
    assert isinstance(resp, Response) and resp.verb == "EHLO"
    return conn


def test_extensions_are_learned_from_ehlo() -> None:
    ext = greeted().extensions
    assert ext is not None
    assert "PIPELINING" in ext and "CHUNKING" in ext and "SMTPUTF8" not in ext
    assert ext.size == 1000 and ext.auth == ("PLAIN", "LOGIN")


def test_pipelined_transaction_replies_match_commands_in_order() -> None:
    conn = greeted()
    out = conn.send(Command("MAIL", local="a", domain="b.test", params={"SIZE": "10"}))
    out += conn.send(Command("RCPT", local="c", domain="d.test"))
    out += conn.send(Command("RCPT", local="e", domain="d.test"))
    out += conn.send(Command("DATA"))
    assert out == (b"MAIL FROM:<a@b.test> SIZE=10\r\nRCPT TO:<c@d.test>\r\n"
                   b"RCPT TO:<e@d.test>\r\nDATA\r\n")
    got = events(conn, b"250 2.1.0 OK\r\n250 OK\r\n550 5.1.1 No such user\r\n354 Go\r\n")
    assert [(e.verb, e.reply.code) for e in got if isinstance(e, Response)] == [
        ("MAIL", 250), ("RCPT", 250), ("RCPT", 550), ("DATA", 354)]
    assert conn.send_message(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    (done,) = events(conn, b"250 2.0.0 queued\r\n")
    assert isinstance(done, Response) and done.verb == "MESSAGE" and done.reply.enhanced == "2.0.0"


def test_no_pipelining_without_the_extension() -> None:
    conn = greeted(b"250-mx.test\r\n250 8BITMIME\r\n")
    conn.send(Command("MAIL", local="a", domain="b.test"))
    with pytest.raises(ClientProtocolError):
        conn.send(Command("RCPT", local="c", domain="d.test"))


def test_nothing_after_a_group_ender() -> None:
    conn = greeted()
    conn.send(Command("MAIL", local="a", domain="b.test"))
    conn.send(Command("RCPT", local="c", domain="d.test"))
    conn.send(Command("DATA"))
    with pytest.raises(ClientProtocolError):
        conn.send(Command("RSET"))
    with pytest.raises(ClientProtocolError):
        conn.send_message(b"x\r\n")  # no 354 yet


def test_the_next_transaction_may_follow_the_message_content() -> None:
    # RFC 2920 §3.1: the content may start a group; what follows it is pipelined.
    conn = greeted()
    conn.send(Command("MAIL", local="a", domain="b.test"))
    conn.send(Command("DATA"))
    events(conn, b"250 2.1.0 ok\r\n354 go ahead\r\n")
    conn.send_message(b"x\r\n")
    assert conn.send(Command("MAIL", local="e", domain="f.test")) == b"MAIL FROM:<e@f.test>\r\n"
    assert [e.verb for e in events(conn, b"250 2.0.0 queued\r\n250 2.1.0 ok\r\n")
            if isinstance(e, Response)] == ["MESSAGE", "MAIL"]


def test_nothing_follows_the_message_content_without_pipelining() -> None:
    conn = greeted(b"250-mx.test\r\n250 8BITMIME\r\n")
    conn.send(Command("MAIL", local="a", domain="b.test"))
    events(conn, b"250 2.1.0 ok\r\n")
    conn.send(Command("DATA"))
    events(conn, b"354 go ahead\r\n")
    conn.send_message(b"x\r\n")
    with pytest.raises(ClientProtocolError):
        conn.send(Command("MAIL", local="e", domain="f.test"))


def test_not_offered_extensions_are_refused_locally() -> None:
    conn = greeted(b"250-mx.test\r\n250 PIPELINING\r\n")
    for command in (Command("MAIL", local="a", domain="b.test", params={"SMTPUTF8": None}),
                    Command("MAIL", local="a", domain="b.test", params={"BODY": "8BITMIME"}),
                    Command("MAIL", local="a", domain="b.test", params={"RET": "HDRS"}),
                    Command("STARTTLS"), Command("BDAT", size=1, last=True)):
        with pytest.raises(ClientProtocolError):
            conn.send(command)


def test_bdat_sends_the_chunk() -> None:
    conn = greeted()
    conn.send(Command("MAIL", local="a", domain="b.test"))
    conn.send(Command("RCPT", local="c", domain="d.test"))
    assert conn.send_bdat(b"hello", last=True) == b"BDAT 5 LAST\r\nhello"


def test_bytes_after_starttls_220_are_a_protocol_error() -> None:
    conn = greeted()
    conn.send(Command("STARTTLS"))
    with pytest.raises(ReplyError):
        events(conn, b"220 2.0.0 go ahead\r\n250 injected\r\n")


def test_starttls_then_ehlo_again() -> None:
    conn = greeted()
    conn.send(Command("STARTTLS"))
    events(conn, b"220 2.0.0 go ahead\r\n")
    with pytest.raises(ReplyError):
        conn.receive_data(b"250 injected later\r\n")
    conn.tls_started()
    assert conn.extensions is None and conn.tls
    with pytest.raises(ClientProtocolError):
        conn.send(Command("MAIL", local="a", domain="b.test"))
    conn.send(Command("EHLO", arg="client.test"))
    events(conn, b"250-mx.test\r\n250 AUTH PLAIN\r\n")
    assert conn.send(Command("AUTH", arg="PLAIN", initial="AGEAYg==")) == b"AUTH PLAIN AGEAYg==\r\n"


def test_malicious_replies() -> None:
    conn = ClientConnection()
    with pytest.raises(ReplyError):
        events(conn, b"220-mx.test\r\n250 mismatch\r\n")
    conn = ClientConnection()
    with pytest.raises(ReplyError):
        events(conn, b"220-x\r\n" * 1000)
    conn = ClientConnection()
    with pytest.raises(ReplyError):
        events(conn, b"220 " + b"x" * 100_000)
    conn = ClientConnection()
    events(conn, b"220 hi\r\n")
    with pytest.raises(ReplyError):
        events(conn, b"250 unsolicited\r\n")


def test_eof_is_an_error_while_a_reply_is_due() -> None:
    conn = greeted()
    conn.send(Command("NOOP"))
    conn.receive_data(b"")
    with pytest.raises(ReplyError):
        conn.next_event()

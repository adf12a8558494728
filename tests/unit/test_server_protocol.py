"""The sans-I/O server state machine: sequencing, limits, pipelining, STARTTLS, DATA, BDAT."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.protocol import server as sm
from engine.protocol.events import NEED_DATA
from engine.protocol.server import ServerConnection, ServerSettings
from engine.testing.chunkings import chunkings

Policy = Callable[[sm.Event], tuple[int, str, str]]


def accept_all(event: sm.Event) -> tuple[int, str, str]:
    """The application's answers in these tests: yes to everything, 354 to DATA."""
    if isinstance(event, sm.DataCommand):
        return (354, "", "End data with <CR><LF>.<CR><LF>")
    if isinstance(event, sm.StartTLS):
        return (220, "2.0.0", "Ready to start TLS")
    if isinstance(event, sm.AuthStart | sm.AuthResponse):
        return (235, "2.7.0", "Authentication successful")
    if isinstance(event, sm.RcptTo) and event.command.local.startswith("bad"):
        return (550, "5.1.1", "No such user")
    if isinstance(event, sm.Verify):
        return (252, "2.5.2", "Cannot VRFY user")
    return (250, "2.0.0", "OK")


class Session:
    """Drives a ServerConnection like the I/O glue does, recording events and replies."""

    def __init__(self, settings: ServerSettings | None = None, policy: Policy = accept_all):
        self.conn = ServerConnection(settings or ServerSettings(hostname="mx.test"))
        self.policy = policy
        self.events: list[sm.Event] = []
        self.conn.send_greeting()
        self.out = self.conn.data_to_send()

    def feed(self, *chunks: bytes) -> bytes:
        """Feed chunks, answering every event; returns the replies written."""
        written = b""
        for chunk in chunks:
            self.conn.receive_data(chunk)
            written += self.pump()
        return written

    def pump(self) -> bytes:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, sm.Event)
            self.events.append(event)
            if event.needs_reply:
                self.conn.reply(*self.policy(event))
            if self.conn.closed:
                break
        return self.conn.data_to_send()

    def codes(self, written: bytes) -> list[int]:
        return [int(line[:3]) for line in written.split(b"\r\n") if line[3:4] == b" "]

    def of(self, kind: type[sm.Event]) -> list[sm.Event]:
        return [e for e in self.events if isinstance(e, kind)]


def ehlo_session(**settings: object) -> Session:
    s = Session(ServerSettings(hostname="mx.test", **settings))  # type: ignore[arg-type]
    assert s.codes(s.feed(b"EHLO client.test\r\n")) == [250]
    return s


def test_greeting_and_ehlo_extensions() -> None:
    s = Session(ServerSettings(hostname="mx.test", max_message_size=1000))
    assert s.out == b"220 mx.test ESMTP\r\n"
    out = s.feed(b"EHLO client.test\r\n")
    lines = out.decode().split("\r\n")
    assert lines[0] == "250-OK"  # no enhanced code in the EHLO reply: clients parse keywords
    assert "250-SIZE 1000" in lines
    for kw in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"):
        assert any(kw in line for line in lines), kw
    assert "STARTTLS" not in out.decode()
    assert s.conn.esmtp and s.conn.helo == "client.test"


def test_helo_has_no_extensions_and_no_pipelining() -> None:
    s = Session()
    assert s.feed(b"HELO client.test\r\n") == b"250 OK\r\n"
    assert not s.conn.esmtp
    # RFC 2920: without PIPELINING on offer, a command group is a violation.
    out = s.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert out.startswith(b"554 5.5.0") and s.conn.closed


def test_whole_transaction() -> None:
    s = ehlo_session()
    out = s.feed(b"MAIL FROM:<a@b.test> SIZE=20\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n")
    assert s.codes(out) == [250, 250, 354]
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")  # no enhanced code on 354
    out = s.feed(b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
    assert s.codes(out) == [250]
    (msg,) = s.of(sm.MessageReceived)
    assert isinstance(msg, sm.MessageReceived)
    assert msg.body == b"Subject: hi\r\n\r\n.dot\r\n"
    assert msg.mail.mailbox == "a@b.test" and msg.mail.params == {"SIZE": "20"}
    assert [r.mailbox for r in msg.recipients] == ["c@d.test"]
    assert s.conn.transaction is None
    assert s.codes(s.feed(b"QUIT\r\n")) == [221] and s.conn.closed


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"MAIL FROM:<a@b.test>"], [503]),  # before EHLO
        ([b"EHLO x", b"RCPT TO:<c@d.test>"], [250, 503]),
        ([b"EHLO x", b"DATA"], [250, 503]),
        ([b"EHLO x", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<a@b.test>"], [250, 250, 503]),
        ([b"EHLO x", b"MAIL FROM:<a@b.test>", b"DATA"], [250, 250, 503]),
        ([b"EHLO x", b"MAIL FROM:<a@b.test>", b"RCPT TO:<bad@d.test>", b"DATA"],
         [250, 250, 550, 554]),
        ([b"EHLO x", b"MAIL FROM:<a@b.test>", b"RSET", b"RCPT TO:<c@d.test>"],
         [250, 250, 250, 503]),
        ([b"EHLO x", b"MAIL FROM:<a@b.test>", b"EHLO y", b"RCPT TO:<c@d.test>"],
         [250, 250, 250, 503]),  # a second EHLO resets the transaction
        ([b"EHLO x", b"MAIL FROM:<a@b.test> FOO=1"], [250, 555]),
        ([b"EHLO x", b"MAIL FROM:<a@b.test> BODY=BINARYMIME"], [250, 555]),
        ([b"EHLO x", b"MAIL FROM:a@b.test"], [250, 501]),
        ([b"EHLO x", b"FROB"], [250, 500]),
        ([b"EHLO x", b"STARTTLS"], [250, 502]),  # not offered without a certificate
        ([b"EHLO x", b"AUTH PLAIN"], [250, 502]),
        ([b"EHLO x", b"VRFY someone"], [250, 252]),
        ([b"EHLO x", b"NOOP", b"HELP"], [250, 250, 214]),
        ([b"HELO x", b"MAIL FROM:<a@b.test> SIZE=10"], [250, 555]),  # no ESMTP after HELO
    ],
)
def test_sequencing_and_syntax(lines: list[bytes], expected: list[int]) -> None:
    s = Session()
    got: list[int] = []
    for line in lines:  # one at a time: these are not pipelining tests
        got += s.codes(s.feed(line + b"\r\n"))
    assert got == expected


def test_pipelined_group_gets_replies_in_one_write() -> None:
    s = ehlo_session()
    group = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<bad@d.test>\r\nDATA\r\n"
    for chunks in chunkings(group, pair_limit=0):
        s = ehlo_session()
        out = s.feed(*chunks)
        assert s.codes(out) == [250, 250, 550, 354]
    # whole, the four replies leave in one write
    s = ehlo_session()
    s.conn.receive_data(group)
    assert s.codes(s.pump()) == [250, 250, 550, 354]


@pytest.mark.parametrize("ender", [b"EHLO x", b"DATA", b"NOOP", b"VRFY x"])
def test_group_ender_followed_by_input_is_refused(ender: bytes) -> None:
    s = ehlo_session()
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n")
    out = s.feed(ender + b"\r\nRSET\r\n")
    assert out.startswith(b"554 5.5.0") and s.conn.closed


def test_strict_pipelining_can_be_switched_off() -> None:
    s = ehlo_session(strict_pipelining=False)
    out = s.feed(b"NOOP\r\nNOOP\r\n")
    assert s.codes(out) == [250, 250]


def test_early_talker_is_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO fast\r\n")
    conn.send_greeting()
    assert conn.data_to_send().startswith(b"554 5.5.1") and conn.closed
    assert conn.next_event() is NEED_DATA


def test_too_many_recipients() -> None:
    s = ehlo_session(max_recipients=2)
    s.feed(b"MAIL FROM:<a@b.test>\r\n")
    codes = [s.codes(s.feed(b"RCPT TO:<c%d@d.test>\r\n" % i))[0] for i in range(4)]
    assert codes == [250, 250, 452, 452]


def test_errors_before_421() -> None:
    s = ehlo_session(max_errors=3)
    out = s.feed(b"FROB\r\n", b"FROB\r\n", b"FROB\r\n", b"NOOP\r\n")
    assert s.codes(out) == [500, 500, 500, 421]
    assert s.conn.closed
    assert isinstance(s.events[-1], sm.Closed)


def test_error_count_resets_after_accepted_message() -> None:
    s = ehlo_session(max_errors=3)
    s.feed(b"FROB\r\n", b"FROB\r\n")
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n", b"x\r\n.\r\n")
    out = s.feed(b"FROB\r\n", b"FROB\r\n", b"NOOP\r\n")
    assert s.codes(out) == [500, 500, 250]


def test_overlong_command_line() -> None:
    s = ehlo_session(max_command_line=64)
    out = s.feed(b"NOOP " + b"x" * 100 + b"\r\n", b"NOOP\r\n")
    assert s.codes(out) == [500, 250]


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\r.\r\n",
             b"\r\n.\r\r\n", b"\r\r\n.\r\r\n", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("vector", SMUGGLING, ids=repr)
@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_smuggled_message_never_becomes_a_command(vector: bytes, policy: str) -> None:
    s = ehlo_session(bare_eol=policy)
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n")
    body = (b"Subject: x\r\n\r\nbody" + vector +
            b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nevil\r\n.\r\n")
    for chunks in ([body], [body[i:i + 1] for i in range(len(body))]):
        t = ehlo_session(bare_eol=policy)
        t.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n")
        out = b"".join(t.feed(c) for c in chunks)
        assert len(t.of(sm.MailFrom)) == 1, "the smuggled MAIL must not be parsed"
        assert len(t.codes(out)) == 1
        received = t.of(sm.MessageReceived)
        if vector == b"\r\n\x00.\r\n":  # no bare line ending: simply content
            assert len(received) == 1
        elif policy == "reject":
            assert t.codes(out) == [554] and b"bare" in out and not received
        else:
            (msg,) = received
            assert isinstance(msg, sm.MessageReceived)
            assert b"MAIL FROM:<evil@x.test>\r\n" in msg.body
            assert b"\r\n" not in msg.body.replace(b"\r\n", b"")  # canonical: no lone CR/LF
            assert b"\n" not in msg.body.replace(b"\r\n", b"")


def test_oversize_message_is_read_to_its_end_then_552() -> None:
    s = ehlo_session(max_message_size=100)
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n")
    body = b"".join(b"line %d RCPT TO:<x@y.test>\r\n" % i for i in range(50)) + b".\r\n"
    out = s.feed(body[:300], body[300:])
    assert s.codes(out) == [552]
    assert not s.of(sm.MessageReceived) and len(s.of(sm.RcptTo)) == 1
    assert s.conn.transaction is None
    assert s.codes(s.feed(b"NOOP\r\n")) == [250]


def test_size_parameter_over_limit_at_mail() -> None:
    s = ehlo_session(max_message_size=100)
    assert s.codes(s.feed(b"MAIL FROM:<a@b.test> SIZE=101\r\n")) == [552]


def test_bdat_chunks_and_last() -> None:
    s = ehlo_session()
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n")
    out = s.feed(b"BDAT 5\r\nHello", b"BDAT 8 LAST\r\n world\r\n")
    assert s.codes(out) == [250, 250]
    (msg,) = s.of(sm.MessageReceived)
    assert isinstance(msg, sm.MessageReceived) and msg.body == b"Hello world\r\n"


def test_bdat_zero_last() -> None:
    s = ehlo_session()
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n")
    out = s.feed(b"BDAT 6\r\nHello\n", b"BDAT 0 LAST\r\n")
    # a bare LF is refused by default even with BDAT (the stored body must be canonical)
    assert s.codes(out) == [250, 554]


def test_refused_bdat_chunk_is_consumed_not_parsed() -> None:
    s = ehlo_session()
    chunk = b"MAIL FROM:<evil@x.test>\r\n"
    out = s.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert s.codes(out) == [503, 250]
    assert not s.of(sm.MailFrom)


def test_bdat_not_offered_still_consumes_the_chunk() -> None:
    s = ehlo_session(chunking=False)
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n")
    out = s.feed(b"BDAT 9 LAST\r\nQUIT\r\nxyz", b"NOOP\r\n")
    assert s.codes(out) == [502, 250] and not s.conn.closed


def test_data_after_bdat_is_refused() -> None:
    s = ehlo_session()
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"BDAT 2\r\nab")
    assert s.codes(s.feed(b"DATA\r\n")) == [503]


def test_starttls_discards_pipelined_plaintext_and_forgets_state() -> None:
    s = ehlo_session(starttls=True, strict_pipelining=False)
    assert b"STARTTLS" in s.feed(b"EHLO again\r\n")
    out = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert s.codes(out) == [220]
    (event,) = s.of(sm.StartTLS)
    assert isinstance(event, sm.StartTLS) and event.discarded == len(b"MAIL FROM:<evil@x.test>\r\n")
    s.conn.receive_data(b"RCPT TO:<evil@x.test>\r\n")  # plaintext before the handshake
    s.conn.tls_started()
    assert s.conn.tls and s.conn.helo is None
    assert s.codes(s.feed(b"MAIL FROM:<a@b.test>\r\n")) == [503]  # EHLO forgotten
    out = s.feed(b"EHLO again\r\n")
    assert b"STARTTLS" not in out
    assert not s.of(sm.MailFrom)


def test_starttls_with_strict_pipelining_closes() -> None:
    s = ehlo_session(starttls=True)
    out = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert out.startswith(b"554") and s.conn.closed and not s.of(sm.StartTLS)


def test_require_tls_refuses_mail() -> None:
    s = ehlo_session(starttls=True, require_tls=True)
    assert s.codes(s.feed(b"MAIL FROM:<a@b.test>\r\n")) == [530]


def test_auth_only_under_tls_by_default() -> None:
    s = ehlo_session(auth_mechanisms=("PLAIN", "LOGIN"))
    assert s.codes(s.feed(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")) == [538]
    s = ehlo_session(auth_mechanisms=("PLAIN", "LOGIN"), implicit_tls=True)
    assert b"AUTH PLAIN LOGIN" in s.feed(b"EHLO again\r\n")
    assert s.codes(s.feed(b"AUTH CRAM-MD5\r\n")) == [504]
    assert s.codes(s.feed(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")) == [235]
    assert s.conn.authenticated
    assert s.codes(s.feed(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")) == [503]


def test_auth_challenge_response_and_cancel() -> None:
    def login(event: sm.Event) -> tuple[int, str, str]:
        if isinstance(event, sm.AuthStart):
            return (334, "", "VXNlcm5hbWU6")
        if isinstance(event, sm.AuthResponse):
            return (535, "5.7.8", "Authentication credentials invalid")
        return accept_all(event)

    s = Session(ServerSettings(auth_mechanisms=("LOGIN",), auth_requires_tls=False), login)
    s.feed(b"EHLO x\r\n")
    out = s.feed(b"AUTH LOGIN\r\n")
    assert out == b"334 VXNlcm5hbWU6\r\n"
    assert s.codes(s.feed(b"dXNlcg==\r\n")) == [535]
    s.feed(b"AUTH LOGIN\r\n")
    assert s.codes(s.feed(b"*\r\n")) == [501]
    s.feed(b"AUTH LOGIN\r\n")
    assert s.codes(s.feed(b"not base64!\r\n")) == [501]
    # long AUTH response lines are allowed (RFC 4954 §4), long commands are not
    s.feed(b"AUTH LOGIN\r\n")
    assert s.codes(s.feed(b"QUFB" * 1000 + b"\r\n")) == [535]
    assert s.codes(s.feed(b"NOOP " + b"x" * 600 + b"\r\n")) == [500]


def test_overlong_auth_response_ends_the_exchange() -> None:
    # RFC 4954 §4: any error ends the exchange; the next line is a command again, with the
    # command line limit (RFC 4954 §6: 500 5.5.6 for an over-long response).
    s = Session(ServerSettings(auth_mechanisms=("PLAIN",), auth_requires_tls=False,
                               max_auth_line=1000))
    s.feed(b"EHLO x\r\n")
    s.policy = lambda e: (334, "", "") if isinstance(e, sm.AuthStart) else accept_all(e)
    assert s.codes(s.feed(b"AUTH PLAIN\r\n")) == [334]
    out = s.feed(b"QUFB" * 5000 + b"\r\n")
    assert out.startswith(b"500 5.5.6 ")
    assert s.conn.state is sm.State.S_COMMAND and not s.of(sm.AuthResponse)
    assert s.feed(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
    assert s.codes(s.feed(b"NOOP " + b"x" * 600 + b"\r\n")) == [500]  # command limit again


def test_overlong_auth_response_in_pieces_ends_the_exchange() -> None:
    s = Session(ServerSettings(auth_mechanisms=("PLAIN",), auth_requires_tls=False,
                               max_auth_line=1000),
                lambda e: (334, "", "") if isinstance(e, sm.AuthStart) else accept_all(e))
    s.feed(b"EHLO x\r\n", b"AUTH PLAIN\r\n")
    out = s.feed(*[b"QUFB" * 500] * 10, b"\r\nNOOP\r\n")
    assert s.codes(out) == [500, 250] and not s.of(sm.AuthResponse)


def test_require_auth_refuses_mail_until_authenticated() -> None:
    s = ehlo_session(auth_mechanisms=("PLAIN",), auth_requires_tls=False, require_auth=True)
    out = s.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert out == (b"530 5.7.0 Authentication required\r\n"
                   b"503 5.5.1 Need MAIL command\r\n")
    assert s.codes(s.feed(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")) == [235]
    assert s.codes(s.feed(b"MAIL FROM:<a@b.test>\r\n")) == [250]


def test_reply_is_required_before_next_event() -> None:
    conn = ServerConnection()
    conn.send_greeting()
    conn.receive_data(b"EHLO x\r\n")
    assert isinstance(conn.next_event(), sm.Hello)
    with pytest.raises(RuntimeError):
        conn.next_event()


def test_peer_eof_closes() -> None:
    s = ehlo_session()
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n", b"partial")
    s.conn.receive_data(b"")
    assert s.pump() == b""
    assert isinstance(s.events[-1], sm.Closed)
    assert not s.of(sm.MessageReceived)


def test_no_enhanced_codes_when_switched_off() -> None:
    s = Session(ServerSettings(enhanced_status_codes=False))
    out = s.feed(b"EHLO x\r\n")
    assert b"2.0.0" not in out and b"ENHANCEDSTATUSCODES" not in out


def test_data_body_in_every_chunking_gives_the_same_replies() -> None:
    s = ehlo_session()
    s.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n")
    body = b"a\r\n..b\r\n.\r\nNOOP\r\n"
    for chunks in chunkings(body):
        t = ehlo_session()
        t.feed(b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n")
        out = b"".join(t.feed(c) for c in chunks)
        assert t.codes(out) == [250, 250], chunks
        msg = t.of(sm.MessageReceived)[0]
        assert isinstance(msg, sm.MessageReceived) and msg.body == b"a\r\n.b\r\n"
        assert [r.mailbox for r in msg.recipients] == ["c@d.test"]


TOKENS = [b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n",
          b"RCPT TO:<bad@d.test>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n",
          b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"*\r\n", b".\r\n",
          b"\r\n", b"\n", b"\r", b".", b"x" * 600, b"MAIL FROM:<\xff@b>\r\n", b"QUIT\r\n"]


@given(st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=20)), max_size=30),
       st.data())
def test_any_input_gives_events_and_well_formed_replies(
    parts: list[bytes], data: st.DataObject
) -> None:
    """The h11 fuzz invariant: any bytes, any chunking → events, never an exception."""
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    settings = ServerSettings(starttls=True, auth_mechanisms=("PLAIN",), auth_requires_tls=False,
                              max_errors=1000, strict_pipelining=data.draw(st.booleans()))
    s = Session(settings)
    out = b""
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if s.conn.state is sm.State.S_TLS:
            s.conn.tls_started()
        out += s.feed(stream[a:b])
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line

"""The sans-I/O outbound transaction (engine.protocol.transaction): the order of the
commands and what each reply means for each recipient, with no socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.protocol.client import ClientConnection, Response
from engine.protocol.command import Command
from engine.protocol.events import NEED_DATA
from engine.protocol.transaction import DATA, END_OF_DATA, MAIL, Transaction
from engine.queue.records import Envelope, RcptState, Recipient

DELIVERED, DEFERRED, FAILED = RcptState.DELIVERED, RcptState.DEFERRED, RcptState.FAILED
BODY = b"Subject: t\r\n\r\n.dot\r\nbody\r\n"
STUFFED = b"Subject: t\r\n\r\n..dot\r\nbody\r\n.\r\n"
REMOTE = "mx.test[192.0.2.1]"
LOST = "451 4.4.2 Connection lost"


def connected(*ext: str, lmtp: bool = False) -> ClientConnection:
    """A connection past its greeting and EHLO (LHLO), offering ``ext``."""
    conn = ClientConnection()
    conn.receive_data(b"220 mx.test ESMTP\r\n")
    conn.next_event()
    conn.send(Command("LHLO" if lmtp else "EHLO", arg="client.test"))
    conn.receive_data(b"250-mx.test\r\n" + b"".join(b"250-" + k.encode() + b"\r\n" for k in ext)
                      + b"250 HELP\r\n")
    conn.next_event()
    return conn


def transaction(*rcpts: str, pipelining: bool = True, lmtp: bool = False, rset: bool = False,
                ext: tuple[str, ...] = ("8BITMIME",), **kw: object) -> Transaction:
    conn = connected(*(("PIPELINING",) if pipelining else ()), *ext, lmtp=lmtp)
    env = Envelope("a@client.test", [Recipient(r, "x.test") for r in rcpts], **kw)  # type: ignore[arg-type]
    return Transaction(conn, env, list(range(len(rcpts))), BODY, lmtp=lmtp, rset=rset,
                       remote=REMOTE)


def feed(t: Transaction, replies: bytes) -> bytes:
    """Give ``t`` the replies in ``replies`` (while it wants them); what it writes."""
    if replies:
        t.conn.receive_data(replies)
    out = b""
    while not t.done:
        event = t.conn.next_event()
        if event is NEED_DATA:
            break
        assert isinstance(event, Response)
        out += t.receive(event.reply)
    return out


def answers(t: Transaction) -> list[tuple[RcptState, str]]:
    return [(r.state, r.reply) for r in t.outcome(LOST)]


def run_sequential(t: Transaction, replies: list[bytes]) -> list[bytes]:
    """Without PIPELINING: one reply at a time; each write (one command each)."""
    writes = [t.start()]
    for reply in replies:
        writes.append(feed(t, reply))
    return writes


# --- the per-recipient rules ----------------------------------------------------------


def test_mixed_rcpt_replies_pipelined_in_one_write() -> None:
    t = transaction("a@x.test", "b@x.test", "c@x.test")
    assert t.start() == (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<a@x.test>\r\n"
                         b"RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n")
    out = feed(t, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n450 4.2.1 Busy\r\n550 5.1.1 No such user\r\n")
    assert out == b"" and t.phase == DATA and t.accepted == [0]
    assert feed(t, b"354 Go\r\n") == STUFFED and t.phase == END_OF_DATA
    assert feed(t, b"250 2.0.0 Queued\r\n") == b""
    # The message went through: the next transaction needs no RSET.
    assert t.done and t.keep and t.clean
    assert answers(t) == [(DELIVERED, "250 2.0.0 Queued"), (DEFERRED, "450 4.2.1 Busy"),
                          (FAILED, "550 5.1.1 No such user")]
    assert all(r.remote == REMOTE and not r.dsn_offered for r in t.outcome(LOST))


def test_mixed_rcpt_replies_sequential_one_command_per_reply() -> None:
    t = transaction("a@x.test", "b@x.test", "c@x.test", pipelining=False)
    writes = run_sequential(t, [b"250 Ok\r\n", b"250 Ok\r\n", b"450 4.2.1 Busy\r\n",
                                b"550 5.1.1 No\r\n", b"354 Go\r\n", b"250 Queued\r\n"])
    assert writes == [b"MAIL FROM:<a@client.test>\r\n", b"RCPT TO:<a@x.test>\r\n",
                      b"RCPT TO:<b@x.test>\r\n", b"RCPT TO:<c@x.test>\r\n", b"DATA\r\n",
                      STUFFED, b""]
    assert t.done and t.keep
    assert [s for s, _ in answers(t)] == [DELIVERED, DEFERRED, FAILED]


def test_sequential_sends_no_data_when_no_recipient_was_accepted() -> None:
    t = transaction("a@x.test", pipelining=False)
    writes = run_sequential(t, [b"250 Ok\r\n", b"550 5.1.1 No\r\n"])
    assert writes[-1] == b"" and t.done and t.keep and not t.clean
    assert answers(t) == [(FAILED, "550 5.1.1 No")]


def test_a_refused_mail_answers_for_every_recipient() -> None:
    t = transaction("a@x.test", "b@x.test")
    t.start()
    feed(t, b"451 4.3.0 Try later\r\n503 5.5.1 No MAIL\r\n503 5.5.1 No MAIL\r\n")
    assert answers(t) == [(DEFERRED, "451 4.3.0 Try later")] * 2 and not t.done
    # The DATA of the pipelined group is refused too: the transaction is over, cleanly.
    assert feed(t, b"554 5.5.1 No valid recipients\r\n") == b""
    assert t.done and t.keep
    assert answers(t) == [(DEFERRED, "451 4.3.0 Try later")] * 2


def test_a_354_with_no_recipient_accepted_gets_an_empty_message() -> None:
    t = transaction("a@x.test")
    t.start()
    assert feed(t, b"250 Ok\r\n550 5.1.1 No\r\n354 Go\r\n") == b".\r\n"
    feed(t, b"554 5.5.1 No recipients\r\n")
    assert t.done and answers(t) == [(FAILED, "550 5.1.1 No")]


def test_554_to_data_after_accepted_recipients() -> None:
    t = transaction("a@x.test", "b@x.test")
    t.start()
    assert feed(t, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n554 5.7.1 Rejected by policy\r\n") == b""
    assert t.done and t.keep and not t.clean  # RSET before the next message
    assert answers(t) == [(FAILED, "554 5.7.1 Rejected by policy")] * 2


def test_lmtp_one_reply_per_accepted_recipient_in_rcpt_order() -> None:
    t = transaction("a@x.test", "b@x.test", "c@x.test", "d@x.test", lmtp=True)
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n550 5.1.1 No such user\r\n250 Ok\r\n")
    assert t.accepted == [0, 1, 3]
    assert feed(t, b"354 Go\r\n") == STUFFED
    feed(t, b"250 2.0.0 Delivered\r\n452 4.2.2 Mailbox full\r\n")
    assert not t.done and t.phase == END_OF_DATA  # RFC 2033 §4.2: one more reply is due
    feed(t, b"550 5.2.1 Mailbox disabled\r\n")
    assert t.done and t.keep and not t.clean
    assert answers(t) == [(DELIVERED, "250 2.0.0 Delivered"), (DEFERRED, "452 4.2.2 Mailbox full"),
                          (FAILED, "550 5.1.1 No such user"),
                          (FAILED, "550 5.2.1 Mailbox disabled")]


def test_a_clean_transaction_needs_no_rset_and_rset_goes_first_when_it_does() -> None:
    t = transaction("a@x.test")
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
    assert t.done and t.clean
    t = transaction("a@x.test", rset=True)
    assert t.start().startswith(b"RSET\r\nMAIL FROM:")  # RFC 2920 §3.1: RSET in the group
    feed(t, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
    assert t.done and t.clean and answers(t) == [(DELIVERED, "250 Ok")]
    t = transaction("a@x.test", rset=True, pipelining=False)
    assert run_sequential(t, [b"250 Ok\r\n"]) == [b"RSET\r\n", b"MAIL FROM:<a@client.test>\r\n"]


def test_a_refused_rset_defers_everything_and_drops_the_connection() -> None:
    t = transaction("a@x.test", rset=True)
    t.start()
    feed(t, b"500 5.5.1 What\r\n")
    assert t.done and not t.keep and answers(t) == [(DEFERRED, "500 5.5.1 What")]


# --- 452: too many recipients -----------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_recipients_refused_with_452_go_in_a_next_transaction(pipelining: bool) -> None:
    """RFC 5321 §4.5.3.1.10: the server took as many as it could; once the message is
    accepted for them, the rest go in a next transaction on the same connection."""
    t = transaction("a@x.test", "b@x.test", "c@x.test", pipelining=pipelining)
    first = [b"250 Ok\r\n", b"250 Ok\r\n", b"452 4.5.3 Too many recipients\r\n",
             b"452 4.5.3 Too many recipients\r\n", b"354 Go\r\n"]
    sent = t.start()
    for reply in first:
        sent += feed(t, reply)
    assert t.more and t.accepted == [0]
    again = feed(t, b"250 2.0.0 Queued 1\r\n")
    assert not t.done and t.phase == MAIL
    expected = (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\n"
                b"DATA\r\n")
    assert again == (expected if pipelining else b"MAIL FROM:<a@client.test>\r\n")
    for reply in [b"250 Ok\r\n", b"250 Ok\r\n", b"250 Ok\r\n", b"354 Go\r\n"]:
        again += feed(t, reply)
    assert again == expected + STUFFED
    feed(t, b"250 2.0.0 Queued 2\r\n")
    assert t.done and t.keep and t.clean and not t.more
    assert answers(t) == [(DELIVERED, "250 2.0.0 Queued 1"), (DELIVERED, "250 2.0.0 Queued 2"),
                          (DELIVERED, "250 2.0.0 Queued 2")]


def test_452_rounds_go_on_while_each_gets_one_through() -> None:
    t = transaction("a@x.test", "b@x.test", "c@x.test")
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n452 Full\r\n452 Full\r\n354 Go\r\n")
    feed(t, b"250 One\r\n")
    feed(t, b"250 Ok\r\n250 Ok\r\n452 Full\r\n354 Go\r\n")
    feed(t, b"250 Two\r\n")
    feed(t, b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
    feed(t, b"250 Three\r\n")
    assert t.done and [r for _, r in answers(t)] == ["250 One", "250 Two", "250 Three"]


def test_452_with_no_progress_stands_as_a_deferral() -> None:
    # Nobody accepted: no next transaction (it would get the same answer).
    t = transaction("a@x.test", "b@x.test")
    t.start()
    feed(t, b"250 Ok\r\n452 4.5.3 Too many\r\n452 4.5.3 Too many\r\n554 No recipients\r\n")
    assert t.done and t.keep and answers(t) == [(DEFERRED, "452 4.5.3 Too many")] * 2
    # The message was not taken for the accepted one: the 452s stand too.
    t = transaction("a@x.test", "b@x.test")
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n452 4.5.3 Too many\r\n354 Go\r\n")
    assert feed(t, b"451 4.3.0 Try later\r\n") == b""
    assert t.done and answers(t) == [(DEFERRED, "451 4.3.0 Try later"),
                                     (DEFERRED, "452 4.5.3 Too many")]


def test_a_552_too_many_recipients_is_taken_as_a_452() -> None:
    t = transaction("a@x.test", "b@x.test")
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n552 5.5.3 Too many recipients\r\n354 Go\r\n")
    assert t.more
    assert feed(t, b"250 Ok\r\n").startswith(b"MAIL FROM:")
    t.lost()
    # Never failed: RFC 5321 §4.5.3.1.10 asks to treat it as temporary.
    assert answers(t) == [(DELIVERED, "250 Ok"), (DEFERRED, LOST)]


# --- a connection lost at each step, 421 anywhere ------------------------------------------

#: The replies before the connection breaks, by the reply it breaks waiting for (the body
#: is written on the 354, so a break after it waits for the final reply).
STEPS = {
    "MAIL": b"",
    "RCPT": b"250 Ok\r\n250 Ok\r\n550 5.1.1 No\r\n",
    "DATA": b"250 Ok\r\n250 Ok\r\n550 5.1.1 No\r\n250 Ok\r\n",
    "body and final reply": b"250 Ok\r\n250 Ok\r\n550 5.1.1 No\r\n250 Ok\r\n354 Go\r\n",
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_connection_lost_at_each_step_defers_those_without_a_final_answer(step: str) -> None:
    t = transaction("a@x.test", "b@x.test", "c@x.test")
    t.start()
    feed(t, STEPS[step])
    t.lost()
    assert t.done and not t.keep
    got = answers(t)
    refused = step != "MAIL"
    assert got == [(DEFERRED, LOST), (FAILED, "550 5.1.1 No") if refused else (DEFERRED, LOST),
                   (DEFERRED, LOST)]


def test_a_connection_lost_before_the_last_lmtp_reply() -> None:
    t = transaction("a@x.test", "b@x.test", lmtp=True)
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 Go\r\n250 Delivered\r\n")
    t.lost()
    assert answers(t) == [(DELIVERED, "250 Delivered"), (DEFERRED, LOST)]


@pytest.mark.parametrize("at", ["MAIL", "RCPT", "DATA", "final"])
def test_421_anywhere_ends_the_transaction_and_the_connection(at: str) -> None:
    before = {"MAIL": b"", "RCPT": STEPS["RCPT"], "DATA": STEPS["DATA"],
              "final": STEPS["body and final reply"]}[at]
    t = transaction("a@x.test", "b@x.test", "c@x.test")
    t.start()
    feed(t, before)
    assert not t.done
    assert feed(t, b"421 4.3.2 Shutting down\r\n") == b""
    assert t.done and not t.keep
    got = answers(t)
    closing = (DEFERRED, "421 4.3.2 Shutting down")
    if at == "MAIL":
        assert got == [closing] * 3
    else:
        assert got == [closing, (FAILED, "550 5.1.1 No"), closing]


def test_out_of_step_replies_mean_the_connection_is_not_kept() -> None:
    t = transaction("a@x.test", "b@x.test")
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n354 What\r\n")
    assert not t.keep and t.phase == DATA  # a 354 to RCPT: out of step
    feed(t, b"354 Go\r\n250 Ok\r\n")
    assert t.done and not t.keep
    assert answers(t) == [(DELIVERED, "250 Ok"), (DEFERRED, LOST)]


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_2xx_to_data_without_the_354_delivers_nothing(pipelining: bool) -> None:
    # The body was never sent: a 250 to DATA is out of step, not a delivery (RFC 5321
    # §4.1.1.4: DATA's positive answer is 354; only the reply after the body is final).
    t = transaction("a@x.test", "b@x.test", pipelining=pipelining)
    t.start()
    feed(t, b"250 Ok\r\n")
    feed(t, b"250 Ok\r\n")
    feed(t, b"250 Ok\r\n")
    feed(t, b"250 2.0.0 Queued\r\n")
    assert t.done and not t.keep
    assert [state for state, _ in answers(t)] == [DEFERRED, DEFERRED]


def test_a_1xx_or_3xx_after_the_body_means_the_connection_is_not_kept() -> None:
    t = transaction("a@x.test")
    t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n354 Go\r\n")
    feed(t, b"354 What\r\n")
    assert t.done and not t.keep
    assert [state for state, _ in answers(t)] == [DEFERRED]


# --- what the next hop can take, and what is passed on -------------------------------------


def test_a_message_the_next_hop_cannot_take_is_refused_before_any_command() -> None:
    conn = connected("PIPELINING", "SIZE 10")
    env = Envelope("a@client.test", [Recipient("a@x.test", "x.test")])
    t = Transaction(conn, env, [0], BODY, remote=REMOTE)
    assert t.start() == b"" and t.done and t.keep and conn.waiting == 0
    ((state, reply),) = answers(t)
    assert state is FAILED and reply.startswith("552 5.3.4 Message size")
    t = transaction("a\r\n@x.test")
    assert t.start() == b"" and answers(t) == [(FAILED, "553 5.1.3 Address cannot be sent")]
    t = transaction("a@x.test", ext=(), smtputf8=True)
    assert t.start() == b"" and answers(t)[0][1].startswith("553 5.6.7")


@pytest.mark.parametrize("offered", [True, False])
def test_dsn_parameters_and_dsn_offered_follow_the_ehlo(offered: bool) -> None:
    conn = connected("PIPELINING", *(("DSN",) if offered else ()))
    env = Envelope("a@client.test", [Recipient("u@x.test", "x.test", notify=("SUCCESS",),
                                               orcpt="rfc822;u@x.test")], ret="HDRS", envid="e1")
    t = Transaction(conn, env, [0], BODY, remote=REMOTE)
    sent = t.start()
    feed(t, b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
    if offered:
        assert sent.startswith(b"MAIL FROM:<a@client.test> RET=HDRS ENVID=e1\r\n"
                               b"RCPT TO:<u@x.test> NOTIFY=SUCCESS ORCPT=rfc822;u@x.test\r\n")
    else:
        assert sent.startswith(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<u@x.test>\r\n")
    (result,) = t.outcome(LOST)
    assert result.state is DELIVERED and result.dsn_offered is offered


# --- any replies: a result per recipient, never an out-of-order command -------------------

REPLIES = [b"250 2.1.0 Ok", b"251 Forwarded", b"354 Go", b"421 4.3.2 Closing",
           b"450 4.2.1 Busy", b"452 4.5.3 Too many", b"552 5.5.3 Too many",
           b"550 5.1.1 No", b"554 5.5.1 No", b"334 What", b"500 5.5.2 \x01bad"]


@given(rcpts=st.integers(1, 4), pipelining=st.booleans(), lmtp=st.booleans(),
       rset=st.booleans(), replies=st.lists(st.sampled_from(REPLIES), max_size=40),
       lose=st.booleans())
def test_any_replies_give_one_result_per_recipient(rcpts: int, pipelining: bool, lmtp: bool,
                                                    rset: bool, replies: list[bytes],
                                                    lose: bool) -> None:
    """Whatever the server answers, the transaction only writes what the connection
    allows (ClientConnection raises otherwise: pipelining without PIPELINING, a command
    after a group ender), never takes more replies than it has commands out, and ends with
    one well-formed result per recipient."""
    t = transaction(*(f"u{n}@x.test" for n in range(rcpts)), pipelining=pipelining,
                    lmtp=lmtp, rset=rset)
    t.start()
    for reply in replies:
        if t.done or not t.conn.waiting:
            break
        feed(t, reply + b"\r\n")
    if lose or not t.done:
        t.lost()
    out = t.outcome(LOST)
    assert [r.index for r in out] == list(range(rcpts))
    assert all(r.reply.isprintable() and len(r.reply) <= 512 for r in out)
    if t.keep:  # ended normally: every recipient has the server's answer
        assert all(r.reply != LOST for r in out)

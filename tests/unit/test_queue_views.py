"""The queue viewer's pure parts: the traffic counters, the message as delivered, the
filters and a message's state.  No sockets, no queue database."""

from __future__ import annotations

import argparse

import pytest

from engine.ops.select import Filter, add_filter_arguments
from engine.ops.views import as_delivered, last_error, message_state, message_view
from engine.protocol.wire import DataDecoder, dot_stuff
from engine.queue.records import Envelope, RcptState, Recipient
from engine.scheduler.traffic import Traffic


def test_traffic_is_a_sliding_minute() -> None:
    t = Traffic()
    t.came("a.test", 3, 600.0)
    t.left("a.test", 610.0)
    assert t.rates("a.test", 620.0) == (3.0, 1.0)
    # 15 s into the next minute: three quarters of the last minute still count.
    assert t.rates("a.test", 675.0) == (2.2, 0.8)
    t.came("a.test", 1, 676.0)
    assert t.rates("a.test", 676.0) == (3.2, 0.7)
    # Two minutes of silence: nothing, and the sweep forgets it.
    assert t.rates("a.test", 800.0) == (0.0, 0.0)
    assert t.rates("never.test", 800.0) == (0.0, 0.0)
    t.came("b.test", 1, 800.0)
    t.sweep(800.0, 3600.0)
    assert set(t.counts) == {"b.test"}


def test_unreachable_marks_last_until_routed_or_stale() -> None:
    t = Traffic()
    t.unroutable("lost.test", "451 4.4.4 no route", 100.0)
    t.unroutable("gone.test", "451 4.4.3 DNS", 100.0)
    t.routed("gone.test")
    t.routed("never.test")
    assert t.unreachable == {"lost.test": ("451 4.4.4 no route", 100.0)}
    t.sweep(1000.0, 1000.0)
    assert "lost.test" in t.unreachable
    t.sweep(1100.0, 1000.0)
    assert t.unreachable == {}


def test_traffic_forgets_a_minute_that_is_not_the_last() -> None:
    t = Traffic()
    t.came("a.test", 5, 0.0)
    t.came("a.test", 1, 130.0)  # two minutes later: the 5 are not "the minute before"
    assert t.rates("a.test", 130.0) == (1.0, 0.0)


@pytest.mark.parametrize(("stored", "delivered"), [
    (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n"),
    (b"Subject: x\r\n\r\n.dot\r\n..two\r\n.\r\n", b"Subject: x\r\n\r\n.dot\r\n..two\r\n.\r\n"),
    (b".first\r\n\r\nx", b".first\r\n\r\nx\r\n"),  # the client ends the last line
    (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n"),  # bare line ends go as CRLF
    (b"", b""),
])
def test_as_delivered_is_what_a_receiver_decodes(stored: bytes, delivered: bytes) -> None:
    assert as_delivered(stored) == delivered
    decoder = DataDecoder()
    decoder.feed(dot_stuff(stored))
    assert decoder.done and decoder.body() == delivered


def envelope(*recipients: Recipient, sender: str = "app@one.test") -> Envelope:
    return Envelope(sender, list(recipients), arrival=1000.0, size=2000, queue_id=b"\1" * 12)


def parse(*argv: str) -> Filter:
    parser = argparse.ArgumentParser()
    add_filter_arguments(parser)
    return Filter.from_args(parser.parse_args(list(argv)))


def test_recipient_filters_hold_for_one_recipient() -> None:
    env = envelope(Recipient("bob@x.test", "x.test", RcptState.PENDING),
                   Recipient("amy@y.test", "y.test", RcptState.DEFERRED, 1, 5.0, "451 later"))
    assert parse("--recipient", "bob@x.test").matches(env, 2000.0)
    assert not parse("--recipient", "bob@x.test", "--state", "deferred").matches(env, 2000.0)
    assert parse("--recipient", "y.test", "--error", "LATER").matches(env, 2000.0)
    assert not parse("--destination", "x.test", "--error", "later").matches(env, 2000.0)


def test_destinations_are_named_as_the_queue_names_them() -> None:
    env = envelope(Recipient("a@[IPv6:::1]", "[IPv6:::1]"), Recipient("b@x.test", "x.test"))
    assert parse("--destination", "[ipv6:::1]").matches(env, 2000.0)
    assert parse("--destination", "X.Test.").matches(env, 2000.0)
    assert not parse("--destination", "local:x.test").matches(env, 2000.0)


def test_message_filters() -> None:
    env = envelope(Recipient("bob@x.test", "x.test"))
    assert parse("--sender", "@ONE.test").matches(env, 2000.0)
    assert not parse("--sender", "<>").matches(env, 2000.0)
    assert parse("--sender", "<>").matches(envelope(Recipient("b@x.test", "x.test"),
                                                    sender=""), 2000.0)
    assert parse("--older-than", "999").matches(env, 2000.0)
    assert not parse("--older-than", "1000").matches(env, 2000.0)
    assert parse("--larger-than", "1999").matches(env, 2000.0)
    assert not parse("--larger-than", "2000").matches(env, 2000.0)
    assert not parse().decodes and not parse("--state", "deferred").decodes
    assert parse("--state", "deferred", "--destination", "x.test").decodes


def test_final_recipients_match_only_by_their_state() -> None:
    env = envelope(Recipient("bob@x.test", "x.test", RcptState.DELIVERED),
                   Recipient("amy@y.test", "y.test"))
    assert not parse("--recipient", "bob@x.test").matches(env, 2000.0)
    assert parse("--recipient", "bob@x.test", "--state", "delivered").matches(env, 2000.0)


def test_a_message_state_and_last_error() -> None:
    env = envelope(Recipient("a@x.test", "x.test", RcptState.DELIVERED, 1, 0.0, "250 ok"),
                   Recipient("b@x.test", "x.test", RcptState.DEFERRED, 2, 50.0, "451 one"),
                   Recipient("c@y.test", "y.test", RcptState.DEFERRED, 1, 90.0, "452 two"),
                   Recipient("d@z.test", "z.test"))
    assert message_state(env) == "deferred"
    assert last_error(env) == "452 two"  # the waiting recipient tried last
    view = message_view(env)
    assert view["id"] == "01" * 12 and view["arrived"] == "1970-01-01T00:16:40.000Z"
    assert [r["next_retry"] for r in view["recipients"]] == [
        None, "1970-01-01T00:00:50.000Z", "1970-01-01T00:01:30.000Z",
        None]
    assert message_state(envelope(Recipient("a@x.test", "x.test", RcptState.FAILED))) == (
        "failed")

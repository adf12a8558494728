"""The "ratelimit" agent (engine.agents.ratelimit) with a clock the test moves: each limit
trips at its count and recovers exactly at its boundary, the lockout after AUTH failures,
the delay after a failure (seen by order), and the bound on tracked keys."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from engine.agents.api import Action, Session, Transaction, Verdict
from engine.agents.ratelimit import Rate, RateLimitAgent, Tracker
from engine.config import ConfigError, RateLimitAgentConfig, load_config
from engine.protocol.command import parse_command
from engine.testing.clock import ManualClock

# Periods whose intervals are exact in binary floating point: the boundary is exact.
ONE = "192.0.2.1"
TWO = "192.0.2.2"


def session(ip: str = ONE, sid: str = "s1", user: str = "") -> Session:
    return Session(session_id=sid, connector="test", client_ip=ipaddress.ip_address(ip),
                   auth_user=user)


def agent(clock: ManualClock, sleep: Any = None, **keys: Any) -> RateLimitAgent:
    base = {"concurrent_connections": 0, "auth_failures_per_hour": 0,
            "auth_failure_delay": 0.0}
    config = dataclasses.replace(RateLimitAgentConfig(), **{**base, **keys})
    if sleep is None:
        return RateLimitAgent(config, clock=clock)
    return RateLimitAgent(config, clock=clock, sleep=sleep)


def tx() -> Transaction:
    return Transaction(mail=parse_command(b"MAIL FROM:<s@client.test>"))


RCPT = parse_command(b"RCPT TO:<r@example.test>")


def code(verdict: Verdict | Awaitable[Verdict]) -> int:
    assert isinstance(verdict, Verdict)
    return 250 if verdict.action is Action.ACCEPT else (verdict.reply or (0,))[0]


# --- the GCRA ------------------------------------------------------------------------------


def test_rate_allows_a_burst_then_one_per_interval() -> None:
    rate = Rate(4, 60.0)  # interval 15 s
    tat = 0.0
    for _ in range(4):
        new = rate.take(tat, 1000.0)
        assert new is not None
        tat = new
    assert rate.take(tat, 1000.0) is None
    assert rate.take(tat, 1014.999) is None
    assert rate.take(tat, 1015.0) is not None


def test_rate_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Rate(0, 60.0)


# --- connections ---------------------------------------------------------------------------


def test_connections_per_minute_trip_and_recover_at_the_boundary() -> None:
    clock = ManualClock()
    a = agent(clock, connections_per_minute=3)  # one more every 20 s
    for i in range(3):
        assert code(a.connect(session(sid=f"c{i}"))) == 250
    refused = a.connect(session(sid="c3"))
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert refused.reply[:2] == (421, "4.7.0")
    assert "at most 3 a minute" in refused.reply[2] and "[192.0.2.1]" in refused.reply[2]
    # Another address has its own allowance.
    assert code(a.connect(session(TWO, sid="other"))) == 250
    clock.advance(19.5)
    assert code(a.connect(session(sid="c4"))) == 421
    clock.advance(0.5)
    assert code(a.connect(session(sid="c5"))) == 250
    assert code(a.connect(session(sid="c6"))) == 421


def test_concurrent_connections_counted_down_at_disconnect() -> None:
    clock = ManualClock()
    a = agent(clock, concurrent_connections=2)
    assert code(a.connect(session(sid="a"))) == 250
    assert code(a.connect(session(sid="b"))) == 250
    refused = a.connect(session(sid="c"))
    assert code(refused) == 421
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert "at most 2 at once" in refused.reply[2]
    a.disconnect(session(sid="c"))  # the refused one held nothing
    assert code(a.connect(session(sid="d"))) == 421
    a.disconnect(session(sid="a"))
    assert code(a.connect(session(sid="e"))) == 250
    assert code(a.connect(session(sid="f"))) == 421
    a.disconnect(session(sid="a"))  # twice: counted down once only
    assert code(a.connect(session(sid="g"))) == 421


def test_exempt_networks_are_not_counted() -> None:
    clock = ManualClock()
    a = agent(clock, connections_per_minute=1, messages_per_minute=1,
              exempt=(ipaddress.ip_network("192.0.2.0/24"),))
    for i in range(5):
        assert code(a.connect(session(sid=f"x{i}"))) == 250
        assert code(a.mail(session(sid=f"x{i}"), tx())) == 250
    assert len(a.tracker) == 0
    assert code(a.connect(session("198.51.100.7", sid="y"))) == 250
    assert code(a.connect(session("198.51.100.7", sid="z"))) == 421


def test_ipv6_clients_counted_per_prefix_and_mapped_ones_as_ipv4() -> None:
    clock = ManualClock()
    a = agent(clock, connections_per_minute=1, ipv6_prefix=64)
    assert code(a.connect(session("2001:db8:1:2::1", sid="a"))) == 250
    assert code(a.connect(session("2001:db8:1:2:ffff::9", sid="b"))) == 421
    assert code(a.connect(session("2001:db8:1:3::1", sid="c"))) == 250
    assert code(a.connect(session("::ffff:192.0.2.1", sid="d"))) == 250
    assert code(a.connect(session(ONE, sid="e"))) == 421


# --- messages and recipients ----------------------------------------------------------------


def test_messages_per_minute_at_mail_with_450() -> None:
    clock = ManualClock()
    a = agent(clock, messages_per_minute=2)
    s = session()
    assert code(a.mail(s, tx())) == 250
    assert code(a.mail(s, tx())) == 250
    refused = a.mail(s, tx())
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert refused.reply[:2] == (450, "4.7.1")
    assert "Too many messages from [192.0.2.1]: at most 2 a minute" in refused.reply[2]
    clock.advance(29.999)
    assert code(a.mail(s, tx())) == 450
    clock.advance(0.001)
    assert code(a.mail(s, tx())) == 250


def test_recipients_per_minute_at_rcpt_with_452() -> None:
    clock = ManualClock()
    a = agent(clock, recipients_per_minute=4)
    s, t = session(), tx()
    for _ in range(4):
        assert code(a.rcpt(s, t, RCPT)) == 250
    refused = a.rcpt(s, t, RCPT)
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert refused.reply[:2] == (452, "4.7.1")
    assert "at most 4 a minute" in refused.reply[2]
    clock.advance(15)
    assert code(a.rcpt(s, t, RCPT)) == 250
    assert code(a.rcpt(s, t, RCPT)) == 452


def test_authenticated_sessions_count_per_user_not_per_address() -> None:
    clock = ManualClock()
    a = agent(clock, messages_per_minute=1, user_messages_per_minute=2,
              recipients_per_minute=1, user_recipients_per_minute=3)
    alice, bob = session(user="alice"), session(sid="s2", user="bob")
    assert code(a.mail(alice, tx())) == 250
    assert code(a.mail(alice, tx())) == 250
    refused = a.mail(alice, tx())
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert "Too many messages from user alice: at most 2 a minute" in refused.reply[2]
    # Same address, another user; and the address's own allowance is untouched.
    assert code(a.mail(bob, tx())) == 250
    assert code(a.mail(session(), tx())) == 250
    assert code(a.mail(session(), tx())) == 450
    for _ in range(3):
        assert code(a.rcpt(alice, tx(), RCPT)) == 250
    assert code(a.rcpt(alice, tx(), RCPT)) == 452


def test_user_sessions_counted_at_auth() -> None:
    clock = ManualClock()
    a = agent(clock, user_concurrent_connections=1, user_connections_per_minute=2)
    assert code(a.connect(session(sid="a"))) == 250
    assert code(a.auth(session(sid="a"), "alice", True)) == 250
    assert code(a.auth(session(sid="a"), "alice", True)) == 250  # counted once
    assert code(a.connect(session(TWO, sid="b"))) == 250
    refused = a.auth(session(TWO, sid="b"), "alice", True)
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert refused.reply[:2] == (421, "4.7.0") and "at most 1 at once" in refused.reply[2]
    a.disconnect(session(sid="a"))
    assert code(a.connect(session(TWO, sid="c"))) == 250
    assert code(a.auth(session(TWO, sid="c"), "alice", True)) == 250
    a.disconnect(session(TWO, sid="c"))
    # Two sessions a minute: the third is refused until 30 s have passed.
    assert code(a.connect(session(sid="d"))) == 250
    refused = a.auth(session(sid="d"), "alice", True)
    assert isinstance(refused, Verdict) and refused.reply is not None
    assert "at most 2 a minute" in refused.reply[2]
    clock.advance(30)
    assert code(a.auth(session(sid="d"), "alice", True)) == 250


# --- AUTH failures ----------------------------------------------------------------------------


def test_auth_failures_lock_out_then_recover_after_the_period() -> None:
    clock = ManualClock()
    a = agent(clock, auth_failures_per_hour=3, auth_lockout=600.0)
    for i in range(3):
        assert code(a.auth(session(sid=f"f{i}"), "alice", False)) == 250
    locked = a.auth(session(sid="f3"), "alice", False)
    assert isinstance(locked, Verdict) and locked.reply is not None
    assert locked.reply[:2] == (421, "4.7.0")
    assert "after 3 failures an hour" in locked.reply[2] and "600 s" in locked.reply[2]
    # Locked out: even the right password is refused, from a new connection too.
    clock.advance(599.999)
    assert code(a.auth(session(sid="g"), "alice", True)) == 421
    # Another address is not.
    assert code(a.auth(session(TWO, sid="h"), "alice", False)) == 250
    clock.advance(0.001)
    assert code(a.auth(session(sid="i"), "alice", True)) == 250
    # A fresh allowance after the lockout.
    for i in range(3):
        assert code(a.auth(session(sid=f"j{i}"), "alice", False)) == 250
    assert code(a.auth(session(sid="k"), "alice", False)) == 421


def test_delay_after_each_failure_answers_only_when_the_wait_ends() -> None:
    async def scenario() -> list[str]:
        gate, sleeping = asyncio.Event(), asyncio.Event()
        order: list[str] = []
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            sleeping.set()
            await gate.wait()
            order.append("slept")

        a = agent(ManualClock(), sleep=sleep, auth_failures_per_hour=5,
                  auth_failure_delay=2.5)
        assert code(a.auth(session(), "alice", True)) == 250  # no delay for success
        pending = a.auth(session(), "alice", False)
        assert not isinstance(pending, Verdict)
        task = asyncio.ensure_future(pending)
        await asyncio.wait_for(sleeping.wait(), 10)  # the delay has begun
        assert not task.done()
        order.append("released")
        gate.set()
        verdict = await task
        order.append(verdict.action.value)
        assert waits == [2.5]
        return order

    assert asyncio.run(scenario()) == ["released", "slept", "accept"]


# --- the memory bound --------------------------------------------------------------------------


def test_tracker_never_holds_more_than_max_keys() -> None:
    clock = ManualClock()
    a = agent(clock, connections_per_minute=1, max_keys=100)
    for i in range(1000):
        a.connect(session(str(ipaddress.IPv4Address(0x0A000000 + i)), sid=f"s{i}"))
        assert len(a.tracker) <= 100
    # Every one of these still holds a connection open: evicted live, and counted.
    assert a.tracker.evicted_live == 900


def test_tracker_forgets_stale_keys_first() -> None:
    clock = ManualClock()
    tracker = Tracker(max_keys=10, clock=clock)
    rate = Rate(1, 60.0)
    for i in range(5):
        tracker.take(tracker.entry(f"k{i}", clock()), 0, rate, clock())
    clock.advance(60)  # all five are stale now
    live = tracker.entry("live", clock())
    tracker.take(live, 0, rate, clock())
    # Each new key sweeps stale ones off the old end: the table shrinks back.
    for i in range(3):
        tracker.entry(f"n{i}", clock())
    assert tracker.get("k0") is None and tracker.get("k4") is None
    assert tracker.get("live") is live
    assert tracker.evicted_live == 0


def test_nothing_tracked_for_limits_that_are_off() -> None:
    clock = ManualClock()
    a = agent(clock, auth_failure_delay=0.0)
    for i in range(10):
        assert code(a.connect(session(sid=f"s{i}"))) == 250
        assert code(a.auth(session(sid=f"s{i}"), "alice", False)) == 250
        assert code(a.mail(session(sid=f"s{i}"), tx())) == 250
    assert len(a.tracker) == 0


def test_delay_must_fit_in_the_time_budget(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text("[agents.ratelimit]\ntimeout = 2\nauth_failure_delay = 2\n"
                    "auth_failures_per_hour = 0\nipv6_prefix = 129\nmax_keys = 0\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == (
        "agents.ratelimit.ipv6_prefix: must be a prefix length from 1 to 128 (got 129)",
        "agents.ratelimit.max_keys: must be a positive integer (got 0)")
    path.write_text("[agents.ratelimit]\ntimeout = 2\nauth_failure_delay = 2\n"
                    "auth_failures_per_hour = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == (
        "agents.ratelimit.auth_failure_delay: must be shorter than timeout (2) (got 2)",)

"""Egress sources, shaping limits per (source, site), warm-up caps and automation on replies,
measured at a counting sink over real sockets (docs/shaping.md).

Ferry binds its connections to two loopback addresses (127.0.0.2 and 127.0.0.3 work on
Linux without setup); the sink sees where each connection comes from and the EHLO name
it gave.  Mail is queued before Ferry starts, so every message is due at once.  Bounded:
at most 40 messages per test, waits for states with deadlines, no sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from pathlib import Path

from engine.config import load_config
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient
from engine.scheduler.snapshot import SchedulerSnapshot
from engine.testing.dns import DnsResponder
from engine.testing.events import Recorder
from engine.testing.server import RunningFerry
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

SINK = "127.0.40.1"
SOURCES = {"a": "127.0.0.2", "b": "127.0.0.3"}

ZONE = f"""
$TTL 300
@ IN SOA ns.test. admin.test. 1 60 60 600 60
shape.test. IN MX 10 mx1.sink.test.
mx1.sink.test. IN A {SINK}
"""


def _config(tmp_path: Path, dns: DnsResponder, sink: CountingSink, body: str) -> Path:
    path = tmp_path / "ferry.toml"
    host, port = dns.address
    path.write_text(f"""
hostname = "ferry.test"
spool = "spool"
[queue]
min_free_disk = 0
durability = "os"
[delivery]
dns = "{host}:{port}"
mx_port = {sink.port}
retry_interval = 1
[[receive]]
listen = ["127.0.0.1:0"]
[egress.sources.a]
address = "{SOURCES["a"]}"
ehlo = "a.ferry.test"
[egress.sources.b]
address = "{SOURCES["b"]}"
ehlo = "b.ferry.test"
{body}
""", encoding="utf-8")
    return path


def _enqueue(spool: Path, count: int) -> list[bytes]:
    store = LmdbQueue(spool / "queue", durability="os", min_free_disk=0)
    ids = []
    try:
        for n in range(count):
            env = Envelope("a@client.test", [Recipient(f"u{n}@shape.test", "shape.test")])
            ids.append(store.enqueue_sync(env, b"Subject: shaping\r\n\r\nhello\r\n"))
    finally:
        store.close_sync()
    return ids


def _states(ferry: RunningFerry, ids: list[bytes]) -> list[RcptState]:
    out = []
    for qid in ids:
        try:
            out.append(ferry.store.get(qid).recipients[0].state)
        except KeyError:
            out.append(RcptState.DELIVERED)  # final and gone
    return out


def test_two_sources_one_site_limits_exact_per_source(tmp_path: Path) -> None:
    limit, count = 2, 40
    sink = CountingSink([SINK], reply_delay=0.3)
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, f"""
[egress.pools.both]
sources = {{ a = 1, b = 1 }}
[egress]
pool = "both"
[[shaping.rules]]
name = "shape"
mx_suffixes = [".sink.test"]
max_connections = {limit}
""")
            _enqueue(tmp_path / "spool", count)
            with RunningFerry(load_config(path), path=path) as ferry:
                wait_for(lambda: len(sink.state.messages) >= count, 60, "every message")
                # The operator's view names the (source, site) queues (ferry queue queues).
                scheduler = ferry.app.scheduler
                assert scheduler is not None

                async def snapshot() -> SchedulerSnapshot:
                    assert scheduler is not None
                    return scheduler.snapshot()

                (view,) = ferry.call(snapshot()).destinations
                assert (view.name, view.site) == ("shape.test",
                                                  "a@mx:mx1.sink.test b@mx:mx1.sink.test")
            state = sink.state
            assert len(state.messages) == count
            # Each address gave its own EHLO name, and only its own.
            assert dict(state.peer_helo) == {SOURCES["a"]: {"a.ferry.test"},
                                             SOURCES["b"]: {"b.ferry.test"}}
            assert {m.peer for m in state.messages} == set(SOURCES.values())
            # The limit is per (source, site): each address reached it, none passed it.
            assert {state.peer_peak[a] for a in SOURCES.values()} == {limit}
            assert state.peak[SINK] <= 2 * limit
        finally:
            sink.stop()


def _warming_up(cap: int) -> str:
    """The one source of the tests, new today: ``cap`` messages a day."""
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    return f"""
[egress.sources.new]
address = "{SOURCES["a"]}"
ehlo = "new.ferry.test"
warmup_start = "{today}"
warmup_caps = [{cap}, 10]
[egress.pools.new]
sources = {{ new = 1 }}
[egress]
pool = "new"
"""


def test_warmup_cap_defers_beyond_the_day_s_cap(tmp_path: Path) -> None:
    cap, count = 3, 5
    sink = CountingSink([SINK])
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, _warming_up(cap))
            ids = _enqueue(tmp_path / "spool", count)
            with RunningFerry(load_config(path), path=path) as ferry:
                wait_for(lambda: sorted(_states(ferry, ids)).count(RcptState.DEFERRED)
                         == count - cap, 30, "the messages beyond the cap deferred")
                # The capped ones may be deferred while the first three are still on the
                # wire: wait for those three, then no fourth may have come.
                wait_for(lambda: len(sink.state.messages) >= cap, 30, "the cap's messages")
                deferred = [ferry.store.get(q).recipients[0] for q in ids
                            if _states(ferry, [q])[0] is RcptState.DEFERRED]
                assert len(sink.state.messages) == cap
                midnight = (int(time.time() // 86400) + 1) * 86400
                for r in deferred:
                    assert f"daily cap of {cap} messages from new" in r.last_reply
                    assert r.due >= midnight  # the next UTC day, not failed
                    assert r.attempts == 0  # never tried: the cap is not the receiver's
        finally:
            sink.stop()


def test_421_4_7_28_suspends_the_source_then_delivery_resumes(tmp_path: Path) -> None:
    count, first = 8, 3
    sink = CountingSink([SINK])
    answered: list[str] = []

    def answer(envelope: object, peer: str) -> str | None:
        answered.append(peer)
        if len(answered) == first + 1:  # once, after ``first`` messages
            return "421 4.7.28 [127.0.0.2] Our system has detected an unusual rate"
        return None

    sink.answer = answer
    recorder = Recorder()
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, """
[egress.pools.one]
sources = { a = 1 }
[egress]
pool = "one"
[[shaping.rules]]
name = "one-at-a-time"
mx_suffixes = [".sink.test"]
max_connections = 1
[[shaping.automation]]
name = "rate"
code = 421
enhanced = "4.7.28"
action = "suspend"
duration = 1.5
""")
            config = load_config(path)
            _enqueue(tmp_path / "spool", count)
            with RunningFerry(config, [recorder], path=path):
                wait_for(lambda: any(e["state"] == "on" for e in recorder.of("THROTTLE")), 30,
                         "the suspension")
                on = recorder.of("THROTTLE")[0]
                assert (on["action"], on["rule"], on["source"], on["site"]) == (
                    "suspend", "rate", "a", "mx:mx1.sink.test")
                assert on["reply"].startswith("421 4.7.28")
                wait_for(lambda: any(e["state"] == "off" for e in recorder.of("THROTTLE")), 30,
                         "the end of the suspension")
                wait_for(lambda: len(sink.state.messages) >= count, 30, "every message")
            # Groups taken while it was suspended were deferred untried with the rule's
            # reason, and delivered after it.
            held = [e for e in recorder.of("DEFER") if "suspended until" in e["reply"]]
            assert held and all("shaping rule 'rate'" in e["reply"] for e in held)
            off = next(e for e in recorder.of("THROTTLE") if e["state"] == "off")
            late = [e for e in recorder.of("DELIVER") if e["time"] >= off["time"]]
            assert late  # delivery resumed after the period
            assert len({m.recipients[0] for m in sink.state.messages}) == count
            assert sink.state.peer_helo == {SOURCES["a"]: {"a.ferry.test"}}
            # the tracking log names the (source, site) each message went out by
            assert {e["site"] for e in recorder.of("DELIVER")} == {"a@mx:mx1.sink.test"}
        finally:
            sink.stop()


def test_reload_applies_a_new_rule(tmp_path: Path) -> None:
    """[shaping] and [egress] keys are applied by ``ferry reload`` (no restart)."""
    sink = CountingSink([SINK])
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, "")
            with RunningFerry(load_config(path), path=path) as ferry:
                assert ferry.app.scheduler is not None
                before = ferry.app.scheduler.shaping
                path.write_text(path.read_text() + """
[[shaping.rules]]
name = "new"
domains = ["shape.test"]
max_connections = 1
""")
                result = ferry.call(ferry.app.reload())
                assert result.ok, result
                assert "shaping.rules[0] (added)" in result.applied
                shaping = ferry.app.scheduler.shaping
                assert shaping is not before
                assert shaping.rules[0].name == "new"
        finally:
            sink.stop()


def test_without_sources_delivery_is_as_before(tmp_path: Path) -> None:
    """A configuration without [egress]/[shaping] delivers as before: no bind, the
    hostname in EHLO (the implicit default)."""
    sink = CountingSink([SINK])
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, "")
            config = load_config(path)
            config = dataclasses.replace(config, egress=dataclasses.replace(
                config.egress, sources={}, pools={}))
            _enqueue(tmp_path / "spool", 2)
            with RunningFerry(config):
                wait_for(lambda: len(sink.state.messages) >= 2, 30, "both messages")
            assert {h for names in sink.state.peer_helo.values() for h in names} == {
                "ferry.test"}
            assert set(sink.state.peer_helo) == {"127.0.0.1"}
        finally:
            sink.stop()


def test_a_throttle_rule_lowers_the_limits_then_restores_them(tmp_path: Path) -> None:
    count, limit = 12, 3
    sink = CountingSink([SINK], reply_delay=0.2)
    answered: list[str] = []

    def answer(envelope: object, peer: str) -> str | None:
        answered.append(peer)
        return "421 4.7.0 [TS04] slow down" if len(answered) == 3 else None

    sink.answer = answer
    recorder = Recorder()
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, f"""
[egress.pools.one]
sources = {{ a = 1 }}
[egress]
pool = "one"
[[shaping.rules]]
name = "three"
mx_suffixes = [".sink.test"]
max_connections = {limit}
[[shaping.automation]]
name = "slow"
mx_suffixes = [".sink.test"]
code = 421
text = '\\bTS04\\b'
action = "throttle"
max_connections = 1
rate_factor = 0.5
duration = 3
""")
            _enqueue(tmp_path / "spool", count)
            with RunningFerry(load_config(path), [recorder], path=path) as ferry:
                scheduler = ferry.app.scheduler
                assert scheduler is not None

                async def snapshot() -> SchedulerSnapshot:
                    assert scheduler is not None
                    return scheduler.snapshot(destinations=False)

                wait_for(lambda: recorder.of("THROTTLE"), 30, "the throttle")
                on = recorder.of("THROTTLE")[0]
                assert (on["state"], on["action"], on["rule"]) == ("on", "throttle", "slow")
                snap = ferry.call(snapshot())
                if snap.held:  # (3 s: it may only have ended on a very slow machine)
                    assert [(h.name, h.action) for h in snap.held] == [
                        ("a@mx:mx1.sink.test", "throttle")]
                    assert all(s.max_connections == 1 for s in snap.sites)
                    assert dict(snap.shaping_actions)["throttle"] == 1
                wait_for(lambda: len(recorder.of("THROTTLE")) == 2, 30, "its end")
                snap = ferry.call(snapshot())
                assert not snap.held
                assert all(s.max_connections == limit for s in snap.sites)
                wait_for(lambda: len(sink.state.messages) >= count, 30, "every message")
            assert len({m.recipients[0] for m in sink.state.messages}) == count
        finally:
            sink.stop()


def test_messages_per_connection_of_a_rule(tmp_path: Path) -> None:
    count, per_connection = 6, 2
    sink = CountingSink([SINK])
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, f"""
[egress.pools.one]
sources = {{ b = 1 }}
[egress]
pool = "one"
[[shaping.rules]]
name = "short"
domains = ["shape.test"]
max_connections = 1
max_messages_per_connection = {per_connection}
""")
            _enqueue(tmp_path / "spool", count)
            with RunningFerry(load_config(path), path=path):
                wait_for(lambda: len(sink.state.messages) >= count, 30, "every message")
            # one connection at a time, each closed after its second message
            assert sink.state.peer_peak[SOURCES["b"]] == 1
            assert sink.state.peer_connections[SOURCES["b"]] == count // per_connection
        finally:
            sink.stop()


def test_a_source_address_not_on_this_machine_defers_with_the_reason(tmp_path: Path) -> None:
    sink = CountingSink([SINK])
    with DnsResponder(ZONE) as dns:
        try:
            # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind fails at
            # once, nothing is sent anywhere.
            path = _config(tmp_path, dns, sink, """
[egress.sources.away]
address = "192.0.2.1"
[egress.pools.away]
sources = { away = 1 }
[egress]
pool = "away"
""")
            (qid,) = _enqueue(tmp_path / "spool", 1)
            with RunningFerry(load_config(path), path=path) as ferry:
                wait_for(lambda: _states(ferry, [qid]) == [RcptState.DEFERRED], 30,
                         "the deferral")
                reply = ferry.store.get(qid).recipients[0].last_reply
            assert reply.startswith("451 4.4.1 Connection to mx1.sink.test[127.0.40.1]")
            assert "assign requested address" in reply
            assert not sink.state.messages
        finally:
            sink.stop()


def test_a_suspended_destination_spends_no_daily_cap(tmp_path: Path) -> None:
    """Mail parked by `ferry queue suspend` was never sent: once resumed, the day's cap
    still allows as many messages as before the suspension."""
    from engine.scheduler.scheduler import SUSPENDED_SETTING

    cap, count = 3, 5
    sink = CountingSink([SINK])
    with DnsResponder(ZONE) as dns:
        try:
            path = _config(tmp_path, dns, sink, _warming_up(cap))
            ids = _enqueue(tmp_path / "spool", count)
            # Suspended before the server starts, as a restart keeps an operator's
            # suspension: every message comes due while its destination is suspended.
            store = LmdbQueue(tmp_path / "spool" / "queue", durability="os", min_free_disk=0)
            try:
                asyncio.run(store.save_setting(SUSPENDED_SETTING, b'["shape.test"]'))
            finally:
                store.close_sync()
            with RunningFerry(load_config(path), path=path) as ferry:
                wait_for(lambda: _states(ferry, ids) == [RcptState.SUSPENDED] * count, 30,
                         "every message parked")
                scheduler = ferry.app.scheduler
                assert scheduler is not None
                assert ferry.call(scheduler.resume("shape.test")) == count
                wait_for(lambda: sorted(_states(ferry, ids)).count(RcptState.DEFERRED)
                         == count - cap, 30, "the messages beyond the cap deferred")
                wait_for(lambda: len(sink.state.messages) == cap, 30, "the cap's messages")
        finally:
            sink.stop()

"""The alert rules' pure parts, with an injected clock and figures: the rule state machine
(fires after ``lasting``, clears when the condition stops), the outcome window of the event
hub, the thresholds' units, and the queue figures read from a real LMDB in a temp dir.
No sockets."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import AlertConfig, ConfigError, load_config
from engine.ops.alerts import (
    Alerts,
    Change,
    Evaluator,
    OutcomeWindow,
    read_queue,
    windowed,
)
from engine.ops.events import Event, Events, Kind
from engine.queue.api import Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient, id_time
from engine.testing.events import Recorder


def rule(**keys: Any) -> AlertConfig:
    """A rule as the configuration file gives it (through the real checks)."""
    return alert_rules(keys)[0]


def alert_rules(*tables: dict[str, Any]) -> tuple[AlertConfig, ...]:
    lines: list[str] = []
    for table in tables:
        lines.append("[[alert]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ferry.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return load_config(path).alert


DEPTH = {"name": "gmail", "metric": "queue_depth", "destination": "gmail.com",
         "above": 10, "lasting": "5m"}


# --- the state machine -----------------------------------------------------------------------


def test_fires_only_once_the_condition_held_for_lasting_then_clears() -> None:
    ev = Evaluator([rule(**DEPTH)])
    assert ev.evaluate(0.0, {"gmail": {"gmail.com": 11.0}}) == []
    assert ev.evaluate(299.0, {"gmail": {"gmail.com": 50.0}}) == []
    assert ev.active() == []
    [fired] = ev.evaluate(300.0, {"gmail": {"gmail.com": 40.0}})
    assert fired.state == "firing" and fired.at == 300.0
    a = fired.alert
    assert (a.rule, a.destination, a.value, a.threshold, a.since, a.fired) == (
        "gmail", "gmail.com", 40.0, 10.0, 0.0, 300.0)
    assert a.summary() == "queue_depth for gmail.com is 40 messages, above 10 messages"
    # Still firing: no new change, the value follows the figures.
    assert ev.evaluate(310.0, {"gmail": {"gmail.com": 12.0}}) == []
    assert [x.value for x in ev.active()] == [12.0]
    [cleared] = ev.evaluate(320.0, {"gmail": {"gmail.com": 10.0}})
    assert (cleared.state, cleared.alert.value, cleared.at) == ("cleared", 10.0, 320.0)
    assert ev.active() == []


def test_a_condition_that_stops_before_lasting_starts_over() -> None:
    ev = Evaluator([rule(**DEPTH)])
    ev.evaluate(0.0, {"gmail": {"gmail.com": 11.0}})
    assert ev.evaluate(200.0, {"gmail": {"gmail.com": 3.0}}) == []  # not a clear
    assert ev.evaluate(250.0, {"gmail": {"gmail.com": 11.0}}) == []
    assert ev.evaluate(500.0, {"gmail": {"gmail.com": 11.0}}) == []  # 250 s, not 300
    [fired] = ev.evaluate(550.0, {"gmail": {"gmail.com": 11.0}})
    assert fired.alert.since == 250.0


def test_below_at_once_and_each_destination_on_its_own() -> None:
    disk = rule(name="disk", metric="free_disk", below="10GiB", severity="error")
    each = rule(name="each", metric="queue_depth", destination="*", above=5)
    ev = Evaluator([disk, each])
    changes = ev.evaluate(1.0, {"disk": {"": 5.0 * 2**30},
                                "each": {"a.test": 6.0, "b.test": 1.0, "c.test": 9.0}})
    assert [(c.state, c.alert.rule, c.alert.destination) for c in changes] == [
        ("firing", "disk", ""), ("firing", "each", "a.test"), ("firing", "each", "c.test")]
    assert changes[0].alert.severity == "error"
    assert [(a.rule, a.destination) for a in ev.active()] == [
        ("disk", ""), ("each", "a.test"), ("each", "c.test")]
    # a.test's queue emptied (no figure at all): it clears; c.test goes on firing.
    changes = ev.evaluate(2.0, {"disk": {"": 20.0 * 2**30}, "each": {"c.test": 7.0}})
    assert [(c.state, c.alert.rule, c.alert.destination) for c in changes] == [
        ("cleared", "disk", ""), ("cleared", "each", "a.test")]
    assert [(a.rule, a.destination, a.value) for a in ev.active()] == [
        ("each", "c.test", 7.0)]


def test_new_rules_keep_the_state_of_unchanged_ones() -> None:
    depth, disk = rule(**DEPTH, severity="error"), rule(name="disk", metric="back_pressure",
                                                        above=0)
    ev = Evaluator([depth, disk])
    ev.evaluate(0.0, {"gmail": {"gmail.com": 11.0}, "disk": {"": 1.0}})
    ev.evaluate(400.0, {"gmail": {"gmail.com": 11.0}, "disk": {"": 1.0}})
    assert len(ev.active()) == 2
    dropped = ev.replace_rules([depth, rule(name="disk", metric="back_pressure", above=0,
                                            severity="error")])
    assert [a.rule for a in dropped] == ["disk"]
    assert [a.rule for a in ev.active()] == ["gmail"]


# --- thresholds --------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "written", "value"), [
    ("queue_depth", 10000, 10000.0),
    ("oldest_message_age", "1h", 3600.0),
    ("deferral_ratio", "30%", 0.3),
    ("deferral_ratio", 0.25, 0.25),
    ("back_pressure", 0, 0.0),
    ("free_disk", "10GiB", 10.0 * 2**30),
    ("tls_failures", 3, 3.0),
])
def test_a_threshold_is_written_in_its_metrics_unit(metric: str, written: object,
                                                    value: float) -> None:
    assert rule(name="r", metric=metric, above=written).threshold() == ("above", value)


@pytest.mark.parametrize(("table", "problem"), [
    ({"name": "r", "metric": "free_disk", "below": "1h"},
     "alert[0].below: for free_disk: must be a size in bytes"),
    ({"name": "r", "metric": "deferral_ratio", "above": "130%"},
     "alert[0].above: for deferral_ratio: must be a fraction from 0 to 1"),
    ({"name": "r", "metric": "queue_depth", "above": 1, "below": 2},
     "alert[0].above: needs exactly one of above and below"),
    ({"name": "r", "metric": "free_disk", "destination": "a.test", "below": 1},
     "alert[0].destination: free_disk is one figure for the whole server"),
    ({"metric": "queue_depth", "above": 1}, "alert[0].name: is required"),
    ({"name": "r", "metric": "queue_dept", "above": 1}, 'did you mean "queue_depth"'),
])
def test_a_bad_rule_is_named_with_its_key(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        rule(**table)
    assert any(line.startswith(problem) or problem in line for line in err.value.problems), \
        err.value.problems


# --- the outcome window ------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outcome(event: str, recipient: str) -> Event:
    return {"event": event, "id": "X", "message_id": "", "recipient": recipient}


def test_deferral_ratio_and_tls_failures_over_a_sliding_window() -> None:
    clock = Clock()
    window = OutcomeWindow(lambda domain: domain.lower(), span=600.0, step=30.0, clock=clock)
    window.write([outcome("DEFER", "a@Slow.test"), outcome("DEFER", "b@slow.test"),
                  outcome("DELIVER", "c@slow.test"), outcome("FAIL", "d@slow.test"),
                  outcome("DELIVER", "e@fast.test"), outcome("RECEIVE", "x@slow.test"),
                  {"event": Kind.TLS_FAIL.value, "destination": "slow.test"}])
    clock.now += 400
    window.write([outcome("DEFER", "f@fast.test")])
    ratio = rule(name="ratio", metric="deferral_ratio", destination="*", above="30%")
    now = clock.now
    assert windowed(ratio, window.totals(600.0, now)) == {"slow.test": 0.5, "fast.test": 0.5}
    whole = rule(name="whole", metric="deferral_ratio", above="30%")
    assert windowed(whole, window.totals(600.0, now)) == {"": 0.5}
    tls = rule(name="tls", metric="tls_failures", destination="slow.test", above=0)
    assert windowed(tls, window.totals(600.0, now)) == {"slow.test": 1.0}
    # Over the last 5 minutes only the later deferral counts.
    assert windowed(ratio, window.totals(300.0, now)) == {"fast.test": 1.0}
    assert windowed(tls, window.totals(300.0, now)) == {"slow.test": 0.0}
    named = rule(name="n", metric="deferral_ratio", destination="slow.test", above=0.3)
    assert windowed(named, window.totals(300.0, now)) == {}  # no attempt: no figure
    # Long after, the old buckets are gone.
    clock.now += 2000
    window.write([outcome("DELIVER", "g@fast.test")])
    assert windowed(ratio, window.totals(600.0, clock.now)) == {"fast.test": 0.0}
    assert len(window._buckets) == 1


# --- the queue's figures, from a real LMDB --------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbQueue]:
    q = LmdbQueue(tmp_path / "queue", min_free_disk=0, writer="thread")
    yield q
    q.close_sync()


def queue(store: LmdbQueue, *hops: str) -> bytes:
    env = Envelope("s@client.test", [Recipient(f"r{i}@{h}", h) for i, h in enumerate(hops)],
                   client_address="127.0.0.1")
    return store.enqueue_sync(env, b"Subject: x\r\n\r\nx\r\n")


def test_queue_figures_from_the_hops_index(store: LmdbQueue) -> None:
    first = queue(store, "a.test", "b.test")
    second = queue(store, "a.test")
    last = queue(store, "b.test", "b.test")
    # a.test's recipient of the first message is delivered: it waits for b.test only.
    store.record_sync([Outcome(first, 0, RcptState.DELIVERED, "250 ok")])
    rules = alert_rules(
        {"name": "all", "metric": "queue_depth", "above": 0},
        {"name": "a", "metric": "queue_depth", "destination": "a.test", "above": 0},
        {"name": "each", "metric": "queue_depth", "destination": "*", "above": 0},
        {"name": "none", "metric": "queue_depth", "destination": "none.test", "above": 0},
        {"name": "age", "metric": "oldest_message_age", "above": 0},
        {"name": "age-b", "metric": "oldest_message_age", "destination": "b.test", "above": 0},
        {"name": "age-each", "metric": "oldest_message_age", "destination": "*", "above": 0},
        {"name": "disk", "metric": "free_disk", "below": 1},
        {"name": "pressure", "metric": "back_pressure", "above": 0},
    )
    now = id_time(last) + 100.0
    got = read_queue(store, rules, now)
    assert got["all"] == {"": 3.0}
    assert got["a"] == {"a.test": 1.0}
    assert got["each"] == {"a.test": 1.0, "b.test": 2.0}
    assert got["none"] == {"none.test": 0.0}
    assert got["age"] == {"": now - id_time(first)}
    assert got["age-b"] == {"b.test": now - id_time(first)}
    assert got["age-each"]["b.test"] == now - id_time(first)
    assert got["age-each"]["a.test"] == now - id_time(second)
    assert got["disk"][""] > 0
    assert "pressure" not in got  # read on the loop, not from the thread


# --- reporting: the log line and the event ----------------------------------------------


def test_a_change_is_one_log_line_at_its_severity_and_one_alert_event(
        store: LmdbQueue, caplog: pytest.LogCaptureFixture) -> None:
    sink = Recorder()
    events = Events([sink])
    disk = rule(name="disk", metric="free_disk", below="10GiB", severity="error")
    alerts = Alerts([disk], 1.0, events, store, str.lower, clock=Clock(5000.0))
    ev = alerts.evaluator
    [fired] = ev.evaluate(5000.0, {"disk": {"": float(2**30)}})
    [cleared] = ev.evaluate(5090.0, {"disk": {"": float(20 * 2**30)}})
    with caplog.at_level(logging.WARNING, logger="ferry.alerts"):
        alerts.report(fired)
        alerts.report(cleared)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ferry.alerts"]
    assert lines == [
        (logging.ERROR, "alert disk firing: free_disk is 1.00 GiB, below 10.00 GiB"),
        (logging.ERROR, "alert disk cleared: free_disk is 20.00 GiB, no longer below "
                        "10.00 GiB (fired 90 s ago)")]
    fire, clear = sink.events
    assert (fire["event"], fire["id"], fire["message_id"]) == ("ALERT", "", "")
    assert {k: fire[k] for k in ("alert", "state", "metric", "destination", "severity",
                                 "comparison", "threshold", "value")} == {
        "alert": "disk", "state": "firing", "metric": "free_disk", "destination": "",
        "severity": "error", "comparison": "below", "threshold": 10.0 * 2**30,
        "value": float(2**30)}
    assert clear["state"] == "cleared" and clear["duration"] == 90.0
    assert clear["value"] == 20.0 * 2**30
    assert isinstance(cleared, Change) and alerts.active() == []

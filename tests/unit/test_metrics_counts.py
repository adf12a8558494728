"""The metrics' event sink (engine.ops.metrics.EventCounts), fed tracking records as the
hub hands them over: what it counts per receive connector and per site."""

from __future__ import annotations

from engine.ops.metrics import EventCounts


def test_counts_per_connector_site_and_outcome() -> None:
    counts = EventCounts()
    counts.write([
        {"event": "RECEIVE", "connector": "submission", "recipients": ["a@x.test", "b@y.test"]},
        {"event": "DELIVER", "site": "mx:mx.x.test", "recipient": "a@x.test"},
        {"event": "DEFER", "site": "mx:mx.y.test", "recipient": "b@y.test"},
        {"event": "DSN", "dsn_id": "X", "recipients": ["b@y.test"]},
    ])
    counts.write([
        {"event": "DEFER", "site": "mx:mx.y.test", "recipient": "b@y.test"},
        {"event": "EXPIRE", "site": "", "recipient": "b@y.test"},
        {"event": "FAIL", "site": "mx:mx.x.test", "recipient": "c@x.test"},
        {"event": "RECEIVE", "connector": "submission", "recipients": ["c@x.test"]},
        {"event": "TLS_FAIL", "site": "mx:mx.x.test", "reason": "451 4.7.5 ..."},
    ])
    assert counts.received == {"submission": [2, 3]}
    assert counts.sites == {
        "mx:mx.x.test": {"delivered": 1, "deferred": 0, "failed": 1, "expired": 0},
        "mx:mx.y.test": {"delivered": 0, "deferred": 2, "failed": 0, "expired": 0},
        "": {"delivered": 0, "deferred": 0, "failed": 0, "expired": 1},
    }
    assert counts.tls_failures == {"mx:mx.x.test": 1}

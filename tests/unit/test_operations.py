"""The operations' request values (engine.ops.operations), no server: what a filter, a
limit, ids and a tracking query accept and how each refusal names the problem."""

from __future__ import annotations

import pytest

from engine.ops.operations import (
    MAX_IDS,
    OperationError,
    parse_destination,
    parse_filter,
    parse_ids,
    parse_limit,
    tracking_query,
)
from engine.ops.select import Filter


def test_filters_are_compared_as_the_command_line_compares_them() -> None:
    assert parse_filter({"sender": "<A@Example.COM>", "recipient": "@Two.Test",
                         "destination": "ONE.test.", "state": "deferred",
                         "older_than": "60", "larger_than": 1000, "error": "GreyListed"}) == (
        Filter(sender="a@example.com", recipient="@two.test", destination="one.test",
               state="deferred", older_than=60.0, larger_than=1000, error="greylisted"))
    assert parse_filter({"sender": "<>"}) == Filter(sender="")
    assert parse_filter({}) == Filter()


@pytest.mark.parametrize(("values", "says"), [
    ({"colour": "red"}, 'unknown filter "colour"'),
    ({"state": "lost"}, "is not one of pending, deferred"),
    ({"sender": 3}, 'filter "sender" must be a string'),
    ({"older_than": "-5"}, "not a number of seconds"),
    ({"older_than": "inf"}, "not a number of seconds"),
    ({"larger_than": 1.5}, "not a number of bytes"),
    ({"larger_than": True}, "not a number of bytes"),
])
def test_bad_filters_are_named(values: dict[str, object], says: str) -> None:
    with pytest.raises(OperationError, match=says):
        parse_filter(values)


def test_limits_ids_and_destinations() -> None:
    assert parse_limit(None) == 100
    assert parse_limit("0") is None  # all
    assert parse_limit("7") == 7
    for bad in ("-1", "x", "1.5", True):
        with pytest.raises(OperationError, match='"limit"'):
            parse_limit(bad)
    assert parse_ids(["ab" * 12, "AB" * 12]) == (bytes.fromhex("ab" * 12),)
    with pytest.raises(OperationError, match=f"at most {MAX_IDS}"):
        parse_ids(["ab" * 12] * (MAX_IDS + 1))
    with pytest.raises(OperationError, match='not a queue id: "\\\\r"'):
        parse_ids(["\r"])
    assert parse_destination(" example.com ") == "example.com"
    with pytest.raises(OperationError, match="spaces or control characters"):
        parse_destination("a\x00b")


def test_tracking_queries() -> None:
    query = tracking_query(queue_id="01ab", events=["fail", "EXPIRE"],
                           start="2026-12-06T10:00")
    assert (query.queue_id, query.events) == ("01AB", frozenset({"FAIL", "EXPIRE"}))
    assert query.since == 1796551200.0
    with pytest.raises(OperationError, match='unknown event "NOPE"'):
        tracking_query(events=["nope"])
    with pytest.raises(OperationError, match='"end": not an ISO 8601 time'):
        tracking_query(end="tomorrow")

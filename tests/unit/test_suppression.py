"""The suppression list's values without a server: addresses as the list keys them, the
control channel's requests for it, and its entries as stored."""

from __future__ import annotations

import pytest

from engine.ops.control import ControlError, parse_request
from engine.queue.suppression import Entry, SuppressionError, check_category, normalize


@pytest.mark.parametrize(("given", "key"), [
    ("Bob@Example.COM", "bob@example.com"),
    (" <bob@example.com> ", "bob@example.com"),
    ("a@b@example.com", "a@b@example.com"),
])
def test_addresses_are_keyed_in_lower_case(given: str, key: str) -> None:
    assert normalize(given) == key


@pytest.mark.parametrize("bad", ["", "bob", "@example.com", "bob@", "a b@example.com",
                                 "a\r\n@example.com", "x" * 300 + "@example.com", 5])
def test_what_is_not_an_address_is_refused(bad: object) -> None:
    with pytest.raises(SuppressionError):
        normalize(bad)


def test_categories_are_the_bounce_categories() -> None:
    assert check_category("quota") == "quota"
    assert check_category("") == ""
    with pytest.raises(SuppressionError, match="category must be one of"):
        check_category("full")


def test_an_entry_round_trips_its_stored_form() -> None:
    entry = Entry("a@example.com", "550 5.1.1 No such user", "bad-mailbox", 1.5e9, "auto")
    assert Entry.decode(b"a@example.com", entry.encode()) == entry


def test_control_requests_take_only_their_fields() -> None:
    request = parse_request(b'{"command": "suppress", "address": "a@b.test", "reason": "x"}')
    assert (request.command, dict(request.entry)) == (
        "suppress", {"address": "a@b.test", "reason": "x"})
    with pytest.raises(ControlError, match='unknown field "reason"'):
        parse_request(b'{"command": "unsuppress", "address": "a@b.test", "reason": "x"}')
    assert parse_request(b'{"command": "suppressions"}').entry == {}

"""engine.message.edit: the fold check of header values agents hand in."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.agents.api import HeaderChange
from engine.message.edit import apply_changes, change_problem, folds_only

# The rule as RFC 5322 §2.2.3 reads (a CR, LF or NUL only as part of CRLF + WSP), written
# as the regular expression the counting check replaced: the reference it must agree with.
REFERENCE = re.compile(r"\r(?!\n[ \t])|(?<!\r)\n|\x00")


@pytest.mark.parametrize(("value", "ok"), [
    ("plain", True),
    (" a;\r\n b=1;\r\n\tc=2", True),
    ("a\r\nb", False),          # CRLF without WSP: ends the field
    ("a\rb", False),            # bare CR
    ("a\nb", False),            # bare LF
    ("a\x00b", False),
    ("a\r\r\n b", False),       # a CR before a fold
    ("a\r\n \n\t", False),      # a bare LF after a fold
    ("a\r\r\n \n\tb", False),   # removing the fold would leave "\r\n\t": still refused
    ("a\r\n", False),           # a CRLF at the end
])  # fmt: skip
def test_folds_only_cases(value: str, ok: bool) -> None:
    assert folds_only(value) is ok
    assert (change_problem(HeaderChange("add", "X-Test", value)) is None) is ok


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "\t", "\r", "\n", "\x00", "\r\n ", "\r\n\t"]),
                max_size=30).map("".join))
def test_folds_only_agrees_with_the_rule(value: str) -> None:
    assert folds_only(value) is (REFERENCE.search(value) is None)


def test_a_refused_value_is_skipped_and_reported() -> None:
    skipped: list[str] = []
    data = b"Subject: x\r\n\r\nbody\r\n"
    out = apply_changes(data, [HeaderChange("add", "X-Bad", "a\r\nX-Smuggled: 1")],
                        lambda change, why: skipped.append(why))
    assert out == data
    assert skipped == ["the value of X-Bad holds a CR, LF or NUL that is not a fold"]

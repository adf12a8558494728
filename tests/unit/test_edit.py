"""engine.message.edit: the fold check of header values agents hand in, and the shortcut
for changes that only add fields."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.agents.api import HeaderChange, Message
from engine.agents.dns import Lookup
from engine.agents.verify import VerifyAgent
from engine.message.edit import _rewritten, apply_changes, change_problem, folds_only

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


NAMES = ["Authentication-Results", "DKIM-Signature", "X-A", "x-a", "Subject", "X-Bad:"]
FIELD_TEXT = st.sampled_from([
    b"Subject: hi\r\n", b"X-A: 1\r\n", b"x-a : 2\r\n\tfolded\r\n",
    b"Authentication-Results: mx.test; spf=pass\r\n", b"authentication-results:x\r\n",
    b"X-Note: see DKIM-Signature\r\n", b" continuation\r\n"])


@settings(max_examples=400, deadline=None)
@given(fields=st.lists(FIELD_TEXT, max_size=5),
       shape=st.sampled_from(["header", "no-header", "no-body"]),
       changes=st.lists(st.builds(
           lambda op, name, value, drop: HeaderChange(
               op, name, value, match=(lambda v: "spf" in v) if drop else None),
           st.sampled_from(["add", "remove", "replace"]), st.sampled_from(NAMES),
           st.sampled_from([" v", "v", " a;\r\n b", "bad\r\nX: 1"]), st.booleans()),
           min_size=1, max_size=4))
def test_adding_fields_agrees_with_the_general_path(
        fields: list[bytes], shape: str, changes: list[HeaderChange]) -> None:
    # The shortcut for changes that only prepend fields (engine.message.edit._only_added)
    # gives the bytes and the reports of splitting the header into fields and editing it.
    header = b"".join(fields)
    data = {"header": header + b"\r\nbody\r\n", "no-header": b"\r\nbody\r\n",
            "no-body": header}[shape]
    fast: list[tuple[HeaderChange, str]] = []
    slow: list[tuple[HeaderChange, str]] = []
    out = apply_changes(data, changes, lambda c, why: fast.append((c, why)))
    assert out == _rewritten(data, changes, lambda c, why: slow.append((c, why)))
    assert fast == slow
    # The chain hands in the header's end it already found (Message.header_end).
    given_end: list[tuple[HeaderChange, str]] = []
    assert apply_changes(data, changes, lambda c, why: given_end.append((c, why)),
                         Message(data).header_end) == out
    assert given_end == slow


VERIFY = VerifyAgent(Lookup(("127.0.0.1", 9)), ["dkim"], authserv_id="mx.ferry.test")


@settings(max_examples=1000, deadline=None)
@given(header=st.lists(st.one_of(
           st.sampled_from([b"\r\n", b"\r", b"\n", b"\r\n\r\n", b" ", b"\t", b":", b"\x00",
                            b"Authentication-Results", b"authentication-RESULTS",
                            b" mx.ferry.test;", b" other.test;", b"From", b"Subject",
                            b"\xe2\x84\xaa", b"\xff"]),
           st.binary(max_size=6)), max_size=30).map(b"".join),
       value=st.sampled_from(["mx.ferry.test;\r\n\tdkim=pass header.d=shop.test",
                              "mx.ferry.test; none", "bad\r\nX-Smuggled: 1"]))
def test_the_verify_agents_edit_on_any_header_is_the_general_paths(
        header: bytes, value: str) -> None:
    # The verify agent's changes (remove the fields that claim our authserv-id, add ours)
    # on arbitrary bytes: the shortcut, with and without the header's end handed in,
    # gives the bytes and the reports of splitting the header into fields.
    changes = [*VERIFY.fail_headers, HeaderChange("add", "Authentication-Results", value)]
    reports: list[list[tuple[HeaderChange, str]]] = [[], [], []]
    outs = [apply_changes(header, changes, lambda c, why: reports[0].append((c, why))),
            apply_changes(header, changes, lambda c, why: reports[1].append((c, why)),
                          Message(header).header_end),
            _rewritten(header, changes, lambda c, why: reports[2].append((c, why)))]
    assert outs[0] == outs[1] == outs[2]
    assert reports[0] == reports[1] == reports[2]

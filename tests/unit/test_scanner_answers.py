"""What the scanners' answers become, for answers the test daemons do not give: hostile
symbol options, broken fields, odd clamd lines.  The verdict functions are pure (the agents'
exchanges with the real daemons are tests/integration/test_scanners.py); here every text
that reaches a reply or a header field must be printable ASCII on lines a header may hold
(DESIGN.md, wire rules)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.agents.api import Action, Verdict
from engine.agents.clamav import ClamavAgent, ClamavError
from engine.agents.rspamd import MAX_SYMBOLS, RspamdAgent
from engine.config import ClamavAgentConfig, RspamdAgentConfig

RSPAMD = RspamdAgent(RspamdAgentConfig(), "ferry.test")
CLAMAV = ClamavAgent(ClamavAgentConfig(), "ferry.test")

#: A folded field body: lines of printable ASCII, each continuation starting with WSP.
_FOLDED = re.compile(r"[ -~]*(?:\r\n[ \t][ -~]*)*")


def assert_wire_safe(verdict: Verdict) -> None:
    if verdict.reply is not None:
        assert re.fullmatch(r"[ -~]*", verdict.reply[2]), verdict.reply
        assert len(verdict.reply[2]) <= 200
    for change in verdict.headers:
        assert _FOLDED.fullmatch(change.value), change
        assert all(len(line) <= 900 for line in change.value.split("\r\n")), change


def test_hostile_symbol_options_are_cleaned() -> None:
    answer = {"action": "add header", "score": 7.5, "required_score": 15,
              "symbols": {"EVIL\r\nX-Injected: 1": {"score": 1.0, "options": [
                  "http://a.example/\r\nBcc: victim@example.org", "nul\x00byte", "ünï",
                  "x" * 5000, "[brackets];semi", *["more"] * 20]}},
              "messages": {"smtp_message": "ok\r\n250 fake"}}
    verdict = RSPAMD.verdict(answer)
    assert_wire_safe(verdict)
    [result] = [c for c in verdict.headers if c.name == "X-Spamd-Result"]
    lines = result.value.split("\r\n\t")
    assert lines[0] == "default: True [7.50 / 15.00];"
    assert lines[1].startswith("EVIL??X-Injected: 1(1.00)[http://a.example/??Bcc: ")
    assert "nul?byte,?n?," in lines[1] and lines[1].count(",") == 4  # 5 options shown
    assert "X-Injected" not in [c.name for c in verdict.headers]


def test_a_reject_text_is_one_clean_line() -> None:
    verdict = RSPAMD.verdict({"action": "reject", "messages": {
        "smtp_message": "Go away\r\n250 2.0.0 OK\x00" + "!" * 500}})
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and verdict.reply[:2] == (550, "5.7.1")
    assert verdict.reply[2].startswith("Go away??250 2.0.0 OK?!!!")
    assert_wire_safe(verdict)


def test_symbols_are_capped_and_heaviest_first() -> None:
    symbols = {f"S{i:04d}": {"score": float(i % 7) - 3} for i in range(500)}
    verdict = RSPAMD.verdict({"action": "no action", "score": 1, "required_score": 15,
                              "symbols": symbols})
    [result] = [c for c in verdict.headers if c.name == "X-Spamd-Result"]
    rows = result.value.split(";\r\n\t")[1:]
    assert len(rows) == MAX_SYMBOLS
    weights = [abs(float(r.split("(")[1].split(")")[0])) for r in rows]
    assert weights == sorted(weights, reverse=True)


@pytest.mark.parametrize("answer", [
    {"action": "no action", "score": "high", "symbols": [1, 2]},
    {"action": "no action", "symbols": {"A": None, "B": {"options": "x"}}},
    {"action": "no action", "messages": ["not", "a", "table"]},
    {"action": "rewrite subject"},  # no subject: nothing to rewrite
    {"action": "discard"},  # an action rspamd may invent: no action
])
def test_odd_answers_still_give_a_verdict(answer: dict[str, Any]) -> None:
    verdict = RSPAMD.verdict(answer)
    assert verdict.action is Action.ACCEPT
    assert "Subject" not in [c.name for c in verdict.headers]
    assert_wire_safe(verdict)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(action=st.sampled_from(["reject", "soft reject", "greylist", "rewrite subject",
                               "add header", "no action"]) | st.text(),
       symbols=st.dictionaries(st.text(), json_values, max_size=8),
       subject=json_values, messages=json_values)
def test_any_answer_gives_a_wire_safe_verdict(action: str, symbols: dict[str, Any],
                                              subject: Any, messages: Any) -> None:
    verdict = RSPAMD.verdict({"action": action, "symbols": symbols, "subject": subject,
                              "messages": messages})
    assert_wire_safe(verdict)


# --- clamd's answers ---------------------------------------------------------------------

def test_a_virus_name_is_cleaned() -> None:
    verdict = CLAMAV.verdict("stream: Evil\r\n250 OK\x00" + "x" * 300 + " FOUND")
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert verdict.reply[2].startswith("Message rejected: virus found: Evil??250 OK?xxx")
    assert_wire_safe(verdict)


@pytest.mark.parametrize("answer", [
    "INSTREAM size limit exceeded. ERROR",
    "stream: Can't allocate memory ERROR",
    "UNKNOWN COMMAND",
    "",
])
def test_anything_but_ok_or_found_raises(answer: str) -> None:
    with pytest.raises(ClamavError, match="did not scan the message"):
        CLAMAV.verdict(answer)


@given(st.text())
def test_any_clamd_line_gives_a_safe_verdict_or_raises(answer: str) -> None:
    try:
        verdict = CLAMAV.verdict(answer)
    except ClamavError as err:
        assert "\r" not in str(err) and "\n" not in str(err)
        return
    assert_wire_safe(verdict)

"""The chain's combination of verdicts and the header edits, without sockets."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.agents.api import (
    ACCEPT,
    Action,
    Agent,
    HeaderChange,
    Message,
    Session,
    Stage,
    Verdict,
    _split_fields,
    add_header,
    hold,
    reject,
    remove_header,
    replace_header,
)
from engine.agents.chain import FAIL_CLOSED, Chain
from engine.message.edit import apply_changes
from engine.testing.agents import later

SESSION = Session("s-1", "default", ipaddress.ip_address("192.0.2.1"))


class Fixed(Agent):
    """Answers ``verdict`` at connect, at once or after a turn of the loop."""

    def __init__(self, name: str, verdict: Verdict, wait: bool = False) -> None:
        super().__init__()
        self.name = name  # type: ignore[misc]
        self.verdict = verdict
        self.wait = wait
        self.called = 0

    def connect(self, session: Session) -> Verdict | Awaitable[Verdict]:
        self.called += 1
        if self.wait:
            return self._later()
        return self.verdict

    async def _later(self) -> Verdict:
        return await later(self.verdict)


def run(chain: Chain) -> Verdict:
    answer = chain.run(Stage.CONNECT, SESSION)
    if isinstance(answer, Verdict):
        return answer

    async def wait() -> Verdict:
        return await answer

    return asyncio.run(wait())


@pytest.mark.parametrize("wait", [False, True])
def test_headers_collect_a_hold_goes_on_the_first_refusal_ends(wait: bool) -> None:
    a = Fixed("a", add_header("X-A", "1"), wait)
    b = Fixed("b", hold("suspicious"), wait)
    c = Fixed("c", add_header("X-C", "3"), wait)
    verdict = run(Chain([a, b, c]))
    assert verdict.action is Action.HOLD and verdict.reason == "b: suspicious"
    assert [h.name for h in verdict.headers] == ["X-A", "X-C"]
    d = Fixed("d", reject("no"), wait)
    e = Fixed("e", ACCEPT, wait)
    verdict = run(Chain([a, b, d, e]))
    assert verdict.action is Action.REJECT and verdict.reason == "d: no"
    assert verdict.reply == (550, "5.7.1", "no") and e.called == 0


def test_nothing_to_say_is_the_accept_singleton() -> None:
    assert run(Chain([Fixed("a", ACCEPT), Fixed("b", ACCEPT)])) is ACCEPT


def test_a_raising_agent_fails_by_its_setting() -> None:
    class Broken(Fixed):
        def connect(self, session: Session) -> Verdict:
            raise ValueError("bug")

    broken = Broken("broken", ACCEPT)
    chain = Chain([broken])
    assert run(chain) is ACCEPT and chain.failures["broken"] == 1
    broken.fail_open = False
    failed = run(chain)
    assert failed.reply == FAIL_CLOSED.reply and chain.failures["broken"] == 2


def test_header_edits() -> None:
    data = (b"Authentication-Results: ferry.test; spf=pass\r\nFrom: a@b\r\n"
            b"Authentication-Results: other.example;\r\n dkim=pass\r\nSubject: x\r\n\r\nbody\r\n")
    mine = remove_header("authentication-results",
                         lambda v: v.strip().lower().startswith("ferry.test"))
    out = apply_changes(data, [*mine.headers, HeaderChange("add", "Authentication-Results",
                                                            "ferry.test; dmarc=none")])
    assert out == (b"Authentication-Results: ferry.test; dmarc=none\r\nFrom: a@b\r\n"
                   b"Authentication-Results: other.example;\r\n dkim=pass\r\nSubject: x\r\n"
                   b"\r\nbody\r\n")
    out = apply_changes(data, replace_header("Subject", "[SPAM] x").headers)
    assert out.endswith(b"Subject: [SPAM] x\r\n\r\nbody\r\n")
    no_body = apply_changes(b"Subject: a\r\nSubject: b\r\n", replace_header("subject", "c").headers)
    assert no_body == b"subject: c\r\n"
    folded = apply_changes(b"\r\nbody\r\n", add_header("X-F", "a\r\n\tb").headers)
    assert folded == b"X-F: a\r\n\tb\r\n\r\nbody\r\n"
    skipped: list[str] = []
    bad = apply_changes(data, add_header("X-Bad", "a\r\nBcc: x").headers,
                        lambda c, why: skipped.append(why))
    assert bad == data and skipped


def test_message_view() -> None:
    msg = Message(b"From: a@b\r\nSubject: one\r\n two\r\n\r\nbody\r\n")
    assert msg.get("SUBJECT") == "one two" and msg.get("to") is None
    assert msg.fields() == [("From", " a@b"), ("Subject", " one\r\n two")]
    assert bytes(msg.body()) == b"body\r\n" and msg.header_end == 33


def test_every_builtin_agent_is_registered_and_loads() -> None:
    from engine.agents import BUILTIN, SIGNERS, _load_factory
    from engine.config import BUILTIN_AGENTS

    assert tuple(BUILTIN) == BUILTIN_AGENTS
    for path in (*BUILTIN.values(), *(path for _, path in SIGNERS)):
        assert callable(_load_factory(path))


def test_a_failing_agent_that_fails_open_still_removes_what_it_vouches_for() -> None:
    class Broken(Fixed):
        fail_headers = (HeaderChange("remove", "X-Checked"),)

        def connect(self, session: Session) -> Verdict:
            raise ValueError("bug")

    verdict = run(Chain([Broken("broken", ACCEPT)]))
    assert verdict.action is Action.ACCEPT and verdict.headers == Broken.fail_headers


def test_the_verify_agent_removes_forged_results_even_when_it_fails() -> None:
    from engine.agents.dns import Lookup
    from engine.agents.verify import VerifyAgent

    agent = VerifyAgent(Lookup(("127.0.0.1", 9)), ("spf",), authserv_id="ferry.test")
    data = (b"Authentication-Results: ferry.test; spf=pass\r\n"
            b"Authentication-Results: other.example; spf=fail\r\n\r\nbody\r\n")
    assert apply_changes(data, agent.fail_headers) == (
        b"Authentication-Results: other.example; spf=fail\r\n\r\nbody\r\n")


#: Header text made of what splitting into fields acts on: names in any case (one with
#: the Kelvin sign, which str.lower() makes a "k"), colons, blanks, folding, bare CR and
#: LF, NUL, non-ASCII and invalid UTF-8.
HEADER_PIECES = st.sampled_from([
    b"From", b"fROM", b"To", b"DKIM", b"D\xe2\x84\xaaIM", b":", b" ", b"\t", b"\r\n",
    b"\r\n ", b"\r\n\t", b"\r", b"\n", b"x", b"-", b"\x00", b"\xc4\x80", b"\xff",
    b"\r\nFrom: a@b", b"\r\n\r\n",
])


@settings(max_examples=1000, deadline=None)
@given(header=st.lists(HEADER_PIECES, max_size=24).map(b"".join),
       name=st.sampled_from(["From", "from", "To", "dkim", "x", "DKIM-Signature"]))
def test_get_all_from_the_scan_is_what_splitting_gives(header: bytes, name: str) -> None:
    # Message.get_all takes the values from the compiled header scan's items when the
    # header is plain; it must give what splitting the header into text fields gives,
    # for any bytes, whichever of the two is asked first.
    data = header + b"\r\n\r\nbody\r\n"
    split = [value for key, value in _split_fields(Message(data).header)
             if key.lower() == name.lower()]
    assert Message(data).get_all(name) == split
    message = Message(data)
    message.fields()
    assert message.get_all(name) == split


VERDICTS = [ACCEPT, add_header("X-A", "1"), Verdict(headers=(HeaderChange("add", "X-B", "2"),
                                                            HeaderChange("remove", "X-C"))),
            Verdict(headers=(HeaderChange("add", "X-D", "4"),), reason="tagged"),
            hold("held"), hold("held too", (HeaderChange("add", "X-E", "5"),)),
            Verdict(reason="said something"), reject("no")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(VERDICTS), st.booleans()), max_size=5))
def test_a_run_combines_as_the_rules_say(answers: list[tuple[Verdict, bool]]) -> None:
    # The module docstring's rules, written out; the run may hand back an agent's own
    # verdict (the one plain accept with changes) but never a different value.
    agents = [Fixed(f"a{i}", verdict, wait) for i, (verdict, wait) in enumerate(answers)]
    changes: list[HeaderChange] = []
    held = ""
    expected = None
    for agent in agents:
        verdict = agent.verdict
        if verdict.action is Action.REJECT:
            expected = Verdict(Action.REJECT, verdict.reply, (), f"{agent.name}: {verdict.reason}")
            break
        if verdict.action is Action.HOLD and not held:
            held = f"{agent.name}: {verdict.reason}"
        changes.extend(verdict.headers)
    if expected is None:
        expected = (Verdict(Action.HOLD, None, tuple(changes), held) if held
                    else Verdict(headers=tuple(changes)) if changes else ACCEPT)
    got = run(Chain(agents))
    assert got == expected
    assert (got is ACCEPT) is (expected == ACCEPT)

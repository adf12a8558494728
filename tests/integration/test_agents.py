"""The hook API through a real server: agents from the configuration file, called at each
stage of real SMTP sessions, their verdicts applied, their failures contained."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import load_config
from engine.queue.records import RcptState, id_bytes
from engine.testing.agents import Scripted
from engine.testing.events import Recorder
from engine.testing.rawsmtp import RawClient, one_message
from engine.testing.server import RunningFerry
from engine.testing.wait import wait_for
from tests.integration.conftest import FerryToml

Start = Callable[..., RunningFerry]

BODY = b"From: a@client.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def start(ferry_toml: FerryToml) -> Start:
    """``start(agents_toml, names, relay=True, extra="", recorder=None)``: a server whose
    connector lists the agents ``names``, defined by ``agents_toml`` (the [agents.custom]
    tables); ``extra`` goes on in the [[receive]] table."""

    def run(agents: str, names: list[str], *, relay: bool = True, extra: str = "",
            recorder: Recorder | None = None) -> RunningFerry:
        listed = ", ".join(f'"{n}"' for n in names)
        return ferry_toml(f"agents = [{listed}]\n{extra}\n{agents}", relay=relay,
                          sinks=[recorder] if recorder else [])

    return run


def scripted(name: str, script: dict[str, str] | None = None, *, wait: bool = False,
             fail: str = "open", timeout: float = 10.0, **stages: str) -> str:
    """An [agents.custom] table of engine.testing.agents.Scripted: stage = script."""
    every = {"name": name, **(script or {}), **stages}
    options = ", ".join(f'{k} = "{v}"' for k, v in every.items())
    return (f'[agents.custom."{name}"]\nfactory = "engine.testing.agents:Scripted"\n'
            f"options = {{ {options}, wait = {'true' if wait else 'false'} }}\n"
            f'timeout = {timeout}\nfail = "{fail}"\n')


def agent(ferry: RunningFerry, name: str) -> Scripted:
    assert ferry.app.policy is not None
    found = ferry.app.policy.get(name)
    assert isinstance(found, Scripted)
    return found


def send(ferry: RunningFerry, body: bytes = BODY, rcpt: bytes = b"b@example.net",
         helo: bytes = b"client.test") -> tuple[int, str]:
    """One transaction on a new session (engine.testing.rawsmtp.one_message): the reply's
    code and text."""
    reply = one_message(ferry.host, ferry.port, body, rcpt=rcpt, helo=helo)
    return reply.code, " ".join(reply.lines)


def queued(text: str) -> bytes:
    return id_bytes(text.rsplit(" ", 1)[1])


@pytest.mark.parametrize("wait", [False, True], ids=["sync", "async"])
def test_a_data_agent_adds_a_header_to_the_stored_message(start: Start, wait: bool) -> None:
    ferry = start(scripted("tag", wait=wait, data="header:X-Scanned:yes"), ["tag"])
    code, text = send(ferry)
    assert code == 250
    stored = ferry.store.body(queued(text))
    # Above the original header, below this server's Received field (added last).
    assert stored.startswith(b"Received: ")
    assert b"\r\nX-Scanned: yes\r\nFrom: a@client.test\r\n" in stored
    calls = agent(ferry, "tag").calls
    assert [c[0] for c in calls] == ["data"]
    session, tx, message = calls[0][1]
    assert (session.helo, session.esmtp, session.may_relay, session.connector) == (
        "client.test", True, True, "default")
    assert tx.sender == "a@client.test" and [r.mailbox for r in tx.recipients] == [
        "b@example.net"]
    assert message.data == BODY and message.get("subject") == "hi"


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
@pytest.mark.parametrize("wait", [False, True], ids=["sync", "async"])
def test_a_rejecting_agent_gets_its_reply_and_nothing_is_stored(
        start: Start, stage: str, wait: bool, caplog: pytest.LogCaptureFixture) -> None:
    stages = {stage: "reject:554:5.7.1:Not today"}
    ferry = start(scripted("no", stages, wait=wait), ["no"])
    with caplog.at_level(logging.INFO, "ferry.mail"):
        code, text = send(ferry)
    assert (code, text) == (554, "Not today")
    assert ferry.store.count() == 0
    assert "by=<no: Not today>" in caplog.text


def test_tempfail_at_rcpt_refuses_that_recipient_only(start: Start) -> None:
    ferry = start(scripted("grey", rcpt="tempfail:450:4.7.1:Greylisted"), ["grey"])
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        c.command(b"MAIL FROM:<a@client.test>")
        reply = c.command(b"RCPT TO:<b@example.net>")
        assert (reply.code, reply.enhanced, reply.lines) == (450, "4.7.1", ["Greylisted"])
        assert c.command(b"RSET").code == 250


def test_relay_control_runs_before_the_agents(start: Start) -> None:
    ferry = start(scripted("seen", rcpt="accept"), ["seen"], relay=False)
    code, text = send(ferry, rcpt=b"b@elsewhere.example")
    assert (code, text) == (554, "Relay access denied")
    assert agent(ferry, "seen").calls == []  # relay control refused first
    code, _ = send(ferry, rcpt=b"b@example.org")
    assert code == 250
    assert [c[0] for c in agent(ferry, "seen").calls] == ["rcpt"]


def test_discard_answers_250_and_stores_nothing(start: Start,
                                                caplog: pytest.LogCaptureFixture) -> None:
    ferry = start(scripted("bin", mail="discard"), ["bin"])
    with caplog.at_level(logging.INFO, "ferry.mail"):
        code, text = send(ferry)
    assert (code, text) == (250, "Ok: discarded")
    assert ferry.store.count() == 0
    assert "NOQUEUE: discard:" in caplog.text and "by=<bin: scripted discard at mail>" in (
        caplog.text)


@pytest.mark.parametrize("stage", ["connect", "rcpt", "data"])
def test_hold_stores_the_message_held_and_reports_it(start: Start, stage: str) -> None:
    recorder = Recorder()
    stages = {stage: "hold"}
    ferry = start(scripted("q", stages), ["q"], recorder=recorder)
    code, text = send(ferry)
    assert code == 250
    qid = queued(text)
    env = ferry.store.get(qid)
    assert [r.state for r in env.recipients] == [RcptState.HELD] and env.parked_since > 0
    held = wait_for(lambda: recorder.of("HOLD"), what="the HOLD event")
    assert len(held) == 1 and held[0]["by"] == "agent q"
    assert held[0]["reason"] == f"scripted hold at {stage}"


def test_a_hold_does_not_stop_a_later_reject(start: Start) -> None:
    ferry = start(scripted("q", data="hold") + scripted("no", data="reject"), ["q", "no"])
    code, _ = send(ferry)
    assert code == 550
    assert ferry.store.count() == 0


@pytest.mark.parametrize("script", ["raise", "hang"])
@pytest.mark.parametrize("fail", ["open", "closed"])
def test_a_failing_agent_is_contained_by_its_fail_setting(
        start: Start, script: str, fail: str, caplog: pytest.LogCaptureFixture) -> None:
    ferry = start(scripted("bad", fail=fail, timeout=0.2, data=script)
                  + scripted("after", data="header:X-After:1"), ["bad", "after"])
    with caplog.at_level(logging.WARNING, "ferry.agents"):
        code, text = send(ferry)
    if fail == "open":
        assert code == 250
        assert b"X-After: 1" in ferry.store.body(queued(text))  # the chain went on
    else:
        assert (code, text) == (451, "Policy check temporarily unavailable, try again later")
        assert ferry.store.count() == 0
        assert agent(ferry, "after").calls == []
    assert "agent bad failed at data" in caplog.text
    if script == "raise":
        assert "RuntimeError: scripted failure at data" in caplog.text
    else:
        assert "no verdict within 0.2 s" in caplog.text
    assert ferry.app.connectors[0].chain.failures["bad"] == 1


@pytest.mark.parametrize(("script", "greeting"), [
    ("reject:550:5.7.1:Listed", (554, "5.7.1", ["Listed"])),
    ("tempfail:450:4.7.0:Slow down", (421, "4.7.0", ["Slow down"])),
])
def test_a_connect_refusal_replaces_the_greeting(start: Start, script: str,
                                                 greeting: tuple[int, str, list[str]]) -> None:
    ferry = start(scripted("gate", wait=True, connect=script), ["gate"])
    with RawClient(ferry.host, ferry.port) as c:
        reply = c.reply()
        assert (reply.code, reply.enhanced, reply.lines) == greeting
        assert c.closed_by_server()


def test_disconnect_is_told_once_per_connection(start: Start) -> None:
    ferry = start(scripted("count", connect="accept"), ["count"])
    for _ in range(3):
        send(ferry)
    gate = agent(ferry, "count")
    wait_for(lambda: gate.disconnects == 3, what="three disconnects")
    assert len(gate.calls) == 3


def test_a_header_with_a_bare_newline_is_not_applied(start: Start,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    ferry = start(scripted("evil", data="header:X-A:1\\nBcc: x@evil.example"), ["evil"])
    with caplog.at_level(logging.WARNING, "ferry.agents"):
        code, text = send(ferry)
    assert code == 250
    stored = ferry.store.body(queued(text))
    assert b"Bcc:" not in stored and b"X-A" not in stored
    assert "header change was not applied" in caplog.text


def test_sign_stage_runs_for_relayed_mail_only(start: Start) -> None:
    ferry = start(scripted("signer", sign="header:X-Signed:1", data="header:X-Seen:1"),
                  ["signer"], relay=False)
    code, text = send(ferry, rcpt=b"b@example.org")  # inbound: not signed
    assert code == 250 and b"X-Signed" not in ferry.store.body(queued(text))
    ferry2 = start(scripted("signer", sign="header:X-Signed:1", data="header:X-Seen:1"),
                   ["signer"], relay=True)
    code, text = send(ferry2)
    stored = ferry2.store.body(queued(text))
    # The signer saw the data stage's header (it signs what is stored).
    assert code == 250 and b"X-Signed: 1\r\nX-Seen: 1\r\n" in stored
    sign_calls = [args for stage, args in agent(ferry2, "signer").calls if stage == "sign"]
    assert b"X-Seen: 1" in sign_calls[0][2].data


def test_auth_stage_can_lock_a_client_out(start: Start) -> None:
    from base64 import b64encode

    from engine.server.auth import hash_password

    users = f'[users]\n"app" = "{hash_password("secret")}"\n'
    ferry = start(scripted("lock", auth="tempfail:451:4.7.0:Locked out") + users, ["lock"],
                  extra="allow_plaintext_auth = true")
    with RawClient(ferry.host, ferry.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        reply = c.command(b"AUTH PLAIN " + b64encode(b"\0app\0wrong"))
        assert (reply.code, reply.lines) == (421, ["Locked out"])
        assert c.closed_by_server()
    (stage, (_, user, ok)), = agent(ferry, "lock").calls
    assert (stage, user, ok) == ("auth", "app", False)


def test_an_unknown_agent_name_is_a_config_error(tmp_path: Path) -> None:
    from engine.config import ConfigError

    path = tmp_path / "f.toml"
    path.write_text('[[receive]]\nagents = ["rspamdd"]\n')
    with pytest.raises(ConfigError, match=r'receive\[0\]\.agents\[0\]: "rspamdd" is neither'):
        load_config(path)


def test_injected_mail_meets_the_http_agents_and_the_signers(start: Start) -> None:
    from tests.integration.test_inject import _post

    agents = (scripted("sign", sign="header:X-Signed:1")
              + scripted("scan", data="header:X-Scanned:1", wait=True))
    ferry = start(agents, [], extra='[http]\nlisten = ["127.0.0.1:0"]\n'
                                   'agents = ["scan", "sign"]')
    doc = {"from": "app@client.test", "recipients": ["b@example.net"],
           "content": BODY.decode()}
    status, _, answer = _post(ferry, doc)
    assert status == 200
    stored = ferry.store.body(bytes.fromhex(answer["id"]))
    # Scanned, then signed over what is stored (loopback is trusted: its mail is outbound).
    assert b"\r\nX-Signed: 1\r\nX-Scanned: 1\r\n" in stored
    session = agent(ferry, "scan").calls[0][1][0]
    assert (session.door, session.connector, session.may_relay) == ("HTTP", "http", True)


@pytest.mark.parametrize(("script", "status"), [("reject:554:5.7.1:Spam", 422),
                                                ("tempfail", 503)])
def test_an_agent_refusing_injected_mail_is_a_problem_document(start: Start, script: str,
                                                               status: int) -> None:
    from tests.integration.test_inject import _post

    ferry = start(scripted("scan", data=script), [],
                  extra='[http]\nlisten = ["127.0.0.1:0"]\nagents = ["scan"]')
    doc = {"from": "app@client.test", "recipients": ["b@example.net", "c@example.net"],
           "subject": "s", "text": "hi"}
    got, headers, problem = _post(ferry, doc)
    assert got == status and problem["by"].startswith("scan: ")
    if status == 422:
        assert problem["reply"] == "554 5.7.1 Spam"
    else:
        assert "Retry-After" in headers
    assert ferry.store.count() == 0


def test_verdicts_and_failures_are_metrics(start: Start) -> None:
    import urllib.request

    ferry = start(scripted("no", data="reject") + scripted("bad", mail="raise"), ["bad", "no"],
                  extra='[http]\nlisten = ["127.0.0.1:0"]')
    send(ferry)
    send(ferry, rcpt=b"x@elsewhere.example")
    assert ferry.app.http is not None
    with urllib.request.urlopen(f"http://{ferry.app.http.addresses[0]}/metrics") as answer:
        text = answer.read().decode()
    assert 'ferry_agent_verdicts_total{action="reject",agent="no",stage="data"} 2.0' in text
    assert 'ferry_agent_failures_total{agent="bad"} 2.0' in text

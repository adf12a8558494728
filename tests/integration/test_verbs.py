"""The verbs on messages through the control channel of a whole Ferry (in-process, over
its real Unix socket, delivery paused): what each does to the queue, its reply, and the
events it emits after its commit, naming the operator from the socket's credentials."""

from __future__ import annotations

import os
import pwd
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import Config
from engine.ops.control import request, socket_path
from engine.queue.api import Outcome
from engine.queue.records import Envelope, RcptState, id_bytes, id_text
from engine.testing.events import Recorder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.wait import wait_for

ME = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[RunningFerry]:
    with RunningFerry(ferry_config(tmp_path / "spool")) as running:
        yield running


def queued(ferry: RunningFerry, sender: str = "a@client.test") -> str:
    before = set(ferry.store.ids_in_state("pending", 100))
    with smtplib.SMTP(ferry.host, ferry.port) as client:
        client.sendmail(sender, ["x@one.test", "y@one.test"],
                        b"Subject: s\r\nMessage-ID: <m1@client.test>\r\n\r\nx\r\n")
    (qid,) = set(ferry.store.ids_in_state("pending", 100)) - before
    return id_text(qid)


def ask(ferry: RunningFerry, **message: object) -> dict[str, Any]:
    return request(socket_path(ferry.config.spool), message)


def test_hold_release_retry_remove_and_their_events(ferry: RunningFerry) -> None:
    seen = Recorder()
    ferry.app.events.add(seen)
    qid = queued(ferry)
    raw = id_bytes(qid)
    nobody = "00" * 12

    assert ask(ferry, command="hold", ids=[qid, nobody]) == {
        "ok": True, "changed": [qid], "unchanged": [], "missing": [nobody.upper()]}
    assert [r.state for r in ferry.store.get(raw).recipients] == [RcptState.HELD] * 2
    assert ferry.store.due(time.time() + 86400 * 30, 10) == []
    hold = wait_for(lambda: seen.of("HOLD"))[0]
    assert (hold["id"], hold["message_id"], hold["by"], hold["reason"]) == (
        qid, "m1@client.test", ME, "")
    assert ask(ferry, command="hold", ids=[qid])["unchanged"] == [qid]
    assert len(seen.of("HOLD")) == 1  # no event for what did not change

    assert ask(ferry, command="release", ids=[qid])["changed"] == [qid]
    assert [r.state for r in ferry.store.get(raw).recipients] == [RcptState.PENDING] * 2
    assert wait_for(lambda: seen.of("RELEASE"))[0]["by"] == ME

    assert ask(ferry, command="retry", ids=[qid])["unchanged"] == [qid]  # nothing deferred
    ferry.call(ferry.store.record([Outcome(raw, 1, RcptState.DEFERRED, "451 later",
                                           due=time.time() + 3600)]))
    assert ask(ferry, command="retry", ids=[qid])["changed"] == [qid]
    assert ferry.store.get(raw).recipients[1].due <= time.time()
    retry = wait_for(lambda: seen.of("RETRY"))[0]
    assert (retry["by"], retry["destination"]) == (ME, "")
    ferry.call(ferry.store.record([Outcome(raw, 1, RcptState.DEFERRED, "451 later",
                                           due=time.time() + 3600)]))
    assert ask(ferry, command="retry", destination="ONE.test") == {
        "ok": True, "destination": "one.test", "recipients": 1}
    wait_for(lambda: len(seen.of("RETRY")) == 2, 10, "the second RETRY")
    assert seen.of("RETRY")[1]["destination"] == "one.test"

    reply = ask(ferry, command="remove", ids=[qid], report=True)
    assert reply["changed"] == [qid]
    (report_id,) = reply["reports"]
    with pytest.raises(KeyError):
        ferry.store.get(raw)
    report = ferry.store.get(id_bytes(report_id))
    assert report.sender == "" and [r.address for r in report.recipients] == ["a@client.test"]
    body = ferry.store.body(id_bytes(report_id))
    assert b"removed by the operator" in body
    assert b"x@one.test" in body and b"y@one.test" in body
    removed = wait_for(lambda: seen.of("REMOVE"))[0]
    assert (removed["by"], removed["report"]) == (ME, True)
    dsn = wait_for(lambda: seen.of("DSN"))[0]
    assert (dsn["dsn_id"], dsn["action"], dsn["recipients"]) == (
        report_id, "failed", ["x@one.test", "y@one.test"])


def test_remove_never_reports_to_the_null_sender(ferry: RunningFerry) -> None:
    seen = Recorder()
    ferry.app.events.add(seen)
    qid = queued(ferry, sender="")
    reply = ask(ferry, command="remove", ids=[qid], report=True)
    assert reply == {"ok": True, "changed": [qid], "unchanged": [], "missing": []}
    assert ferry.store.count() == 0
    assert wait_for(lambda: seen.of("REMOVE"))[0]["report"] is False
    assert seen.of("DSN") == []


def start_after_a_crash(config: Config, qid: str, n: int) -> tuple[Envelope, Recorder]:
    """Start (and stop) a Ferry on ``config`` once its crash count for ``qid`` is ``n``:
    the message's record then, and the events of that run."""
    seen = Recorder()
    with RunningFerry(config, sinks=[seen]) as ferry:
        store = ferry.store

        def counted() -> Envelope | None:
            env = store.get(id_bytes(qid))
            return env if env.crashes == n else None

        env = wait_for(counted, 10, f"crash {n} counted")
        if n == 2:
            wait_for(lambda: seen.of("POISON"), 10, "the POISON event")
    return env, seen


def test_a_message_in_the_journal_at_two_starts_in_a_row_is_poisoned(tmp_path: Path) -> None:
    """The crash rule in-process: the journal a crash would leave, written by hand before
    each start; the second start moves the message to POISON and says so (POISON)."""
    config = ferry_config(tmp_path / "spool")
    journal = Path(config.spool) / "inflight"
    with RunningFerry(config) as ferry:
        qid = queued(ferry)
    group = id_bytes(qid) + b"one.test"
    other = id_bytes("01" * 12) + b"two.test"
    for start in (1, 2):
        # What a run that died with the group in flight leaves (an ended one is not
        # counted, nor a torn last line).
        journal.write_bytes(b"+" + group.hex().encode() + b"\n+" + other.hex().encode()
                            + b"\n-" + other.hex().encode() + b"\n+0a1")
        env, seen = start_after_a_crash(config, qid, start)
        assert not journal.exists()  # a clean stop
        if start == 1:
            assert env.recipients[0].state is RcptState.PENDING
            assert seen.of("POISON") == []
        else:
            assert [r.state for r in env.recipients] == [RcptState.POISON] * 2
            assert "in flight at 2 crashes" in env.poisoned
            (poison,) = seen.of("POISON")
            assert (poison["id"], poison["reason"]) == (qid, env.poisoned)
    with RunningFerry(config) as ferry:
        assert ask(ferry, command="release", ids=[qid])["changed"] == [qid]
        env = ferry.store.get(id_bytes(qid))
        assert (env.crashes, env.poisoned, env.recipients[0].state) == (
            0, "", RcptState.PENDING)

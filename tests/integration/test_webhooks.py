"""Delivery webhooks end to end: a whole Ferry (real SMTP, real LMDB, real group commit) and
a receiver over HTTP on 127.0.0.1 (``engine.testing.webhooks.Receiver``).

- a receiver that fails twice, then accepts: every event arrives at least once, in
  batches of at most ``batch_size``, signed, with the tracking log's records;
- while it fails, ``ferry queue queues`` (the control channel) shows the backlog, the
  state ``retry`` and the last error;
- past ``max_backlog`` the oldest events are dropped, with an ERROR;
- a ``kill -9`` of a real ``ferry serve`` with events waiting (receiver down), a restart,
  the receiver up: none of them is lost; the stopped spool shows them too.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from engine.config import load_config
from engine.ops import control
from engine.ops.tracking import read_records
from engine.testing.process import FerryProcess
from engine.testing.server import RunningFerry
from engine.testing.wait import wait_for
from engine.testing.webhooks import Receiver

SECRET = "s3cret-for-the-hook"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ferry(tmp_path: Path, toml: str) -> RunningFerry:
    path = tmp_path / "ferry.toml"
    path.write_text("[queue]\nmin_free_disk = 0\n" + toml, encoding="utf-8")
    flags = {"--listen": ["127.0.0.1:0"], "--spool": str(tmp_path / "spool"),
             "--hostname": "ferry.test", "--dns": "127.0.0.1:9"}
    return RunningFerry(load_config(path, flags))


def hook(url: str, **keys: Any) -> str:
    settings = {"name": "hook", "url": url, "secret": SECRET, "retry_interval": 0.05,
                "max_retry_interval": 0.2, **keys}
    return "[[webhook]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())


def send(host: str, port: int, count: int, rcpt: str = "a@local.test", first: int = 0) -> None:
    with smtplib.SMTP(host, port, timeout=30) as client:
        for n in range(first, first + count):
            client.sendmail("s@client.test", [rcpt],
                            f"Message-ID: <{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SECRET, fail=2) as r:
        yield r


def test_every_event_arrives_signed_in_batches_after_failures(
        tmp_path: Path, receiver: Receiver) -> None:
    maildir = tmp_path / "mail" / "{domain}" / "{local}"
    toml = (f'[[local]]\ndomains = ["local.test"]\nmaildir = "{maildir}"\n'
            + hook(receiver.url, events=["RECEIVE", "DELIVER"], batch_size=3))
    with ferry(tmp_path, toml) as f:
        send(f.host, f.port, 5)
        # 5 RECEIVE and 5 DELIVER events, each at least once
        wait_for(lambda: len({(e["event"], e["id"]) for e in receiver.events()}) == 10,
                 what="ten distinct events accepted")
        hooks = f.app.webhooks
        assert hooks is not None
        wait_for(lambda: hooks.backlog() == {"hook": 0}, what="no backlog")
    requests = receiver.requests
    assert [r.status for r in requests[:2]] == [500, 500]
    assert all(r.verified for r in requests), "every signature verifies"
    assert all(r.content_type == "application/json" for r in requests)
    assert all(1 <= len(r.events) <= 3 for r in requests)
    events = receiver.events()
    # at-least-once: a resent event has the id it had; distinct events, distinct ids
    by_id: dict[str, tuple[str, str]] = {}
    for e in events:
        assert by_id.setdefault(e["event_id"], (e["event"], e["id"])) == (e["event"], e["id"])
    assert len(by_id) == 10
    # The tracking log's records, field for field, plus the event id.
    tracked = [r for r in read_records(tmp_path / "spool" / "log" / "tracking")
               if r["event"] in ("RECEIVE", "DELIVER")]
    assert len(tracked) == 10
    for e in events:
        assert {k: v for k, v in e.items() if k != "event_id"} in tracked
    deliver = next(e for e in events if e["event"] == "DELIVER")
    assert deliver["recipient"] == "a@local.test" and deliver["host"] == "local"


def test_queues_shows_the_backlog_and_last_error_until_the_receiver_recovers(
        tmp_path: Path) -> None:
    with Receiver(SECRET, status=503) as receiver, \
            ferry(tmp_path, "[delivery]\npaused = true\n"
                  + hook(receiver.url, events=["RECEIVE"])) as f:
        send(f.host, f.port, 2, "x@mx.test")
        sock = control.socket_path(tmp_path / "spool")

        def row() -> dict[str, Any]:
            reply = control.request(sock, {"command": "queues"}, timeout=10)
            return next(r for r in reply["queues"] if r["destination"] == "webhook:hook")

        failing = wait_for(lambda: (r := row())["state"] == "retry" and r["messages"] == 2
                           and r, what="the webhook in retry with 2 events")
        assert "503" in failing["last_error"] and failing["next_retry"] is not None
        assert row()["recipients"] == 0
        receiver.answer(200)
        wait_for(lambda: (r := row())["messages"] == 0 and r["state"] == "ready",
                 what="the backlog sent")
        assert {e["message_id"] for e in receiver.events()} == {"0@test", "1@test"}


def test_max_backlog_drops_the_oldest_with_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nobody listens there yet
    toml = "[delivery]\npaused = true\n" + hook(f"http://127.0.0.1:{port}/hook",
                                               events=["RECEIVE"], max_backlog=3)
    with caplog.at_level(logging.ERROR, logger="ferry.webhooks"), ferry(tmp_path, toml) as f:
        assert f.app.webhooks is not None
        hooks = f.app.webhooks
        send(f.host, f.port, 7, "x@mx.test")
        wait_for(lambda: hooks.hooks["hook"].dropped == 4, what="four dropped")
        assert hooks.backlog() == {"hook": 3}
        assert f.store.hook_counts() == {"hook": 3}
        assert any("max_backlog 3" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
        with Receiver(SECRET, port=port) as receiver:
            wait_for(lambda: hooks.backlog() == {"hook": 0}, what="the backlog sent")
            # the newest three are the ones kept
            assert {e["message_id"] for e in receiver.events()} == {"4@test", "5@test",
                                                                   "6@test"}


def test_https_receiver_verified_with_ca_file_and_a_stalled_post_times_out(
        tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    with Receiver(SECRET, tls=tls, stall=1) as receiver:
        toml = ("[delivery]\npaused = true\n"
                + hook(receiver.url, events=["RECEIVE"], ca_file=str(ca_file), timeout=0.5)
                # the same receiver, but its certificate checked against the system's CAs
                + hook(receiver.url, name="untrusted", events=["RECEIVE"]))
        with caplog.at_level(logging.WARNING, logger="ferry.webhooks"), \
                ferry(tmp_path, toml) as f:
            hooks = f.app.webhooks
            assert hooks is not None
            send(f.host, f.port, 3, "x@mx.test")
            wait_for(lambda: hooks.backlog()["hook"] == 0, what="sent over https")
            wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in hooks.hooks["untrusted"].last_error,
                     what="the untrusted receiver refused")
            assert hooks.backlog()["untrusted"] == 3
    assert {e["message_id"] for e in receiver.events()} == {"0@test", "1@test", "2@test"}
    assert any("no answer within 0.5 s (timeout)" in r.getMessage() for r in caplog.records)


def test_reload_adds_changes_and_removes_webhooks(tmp_path: Path) -> None:
    with ferry(tmp_path, "[delivery]\npaused = true\n") as f, Receiver(SECRET) as receiver:
        hooks = f.app.webhooks
        assert hooks is not None and not hooks.hooks

        def reload(toml: str) -> None:
            path = tmp_path / "reload.toml"
            path.write_text(toml, encoding="utf-8")
            f.call(f.app.reload_webhooks(load_config(path)))

        # From none to one: the sink starts listening; the receiver is not there.
        reload(hook(f"http://127.0.0.1:{free_port()}/hook", name="a", events=["RECEIVE"]))
        send(f.host, f.port, 2, "x@mx.test")
        wait_for(lambda: hooks.backlog() == {"a": 2}, what="two waiting for a")
        # a replaced by b: a's events are dropped, b gets what comes from now on.
        reload(hook(receiver.url, name="b", events=["RECEIVE"]))
        wait_for(lambda: f.store.hook_counts() == {}, what="a's events dropped")
        send(f.host, f.port, 2, "x@mx.test", first=2)
        def ids() -> set[str]:
            return {e["message_id"] for e in receiver.events()}

        wait_for(lambda: ids() == {"2@test", "3@test"}, what="b's two events")
        # b changed (another kind of event): its sender starts again with it.
        reload(hook(receiver.url, name="b", events=["RECEIVE", "HOLD"], batch_size=1))
        send(f.host, f.port, 2, "x@mx.test", first=4)
        # (2 and 3 may come again: their deletion may not have been committed when the
        # sender was started again; at least once)
        wait_for(lambda: ids() == {f"{n}@test" for n in range(2, 6)}, what="b's four events")
        assert len(receiver.requests[-1].events) == 1
        wait_for(lambda: hooks.backlog() == {"b": 0}, what="b's count back to 0")
        reply = control.request(control.socket_path(tmp_path / "spool"), {"command": "queues"})
        assert [r["destination"] for r in reply["queues"]
                if r["destination"].startswith("webhook:")] == ["webhook:b"]


# --- kill -9 of a real ferry serve --------------------------------------------------------


def queues(spool: Path) -> tuple[dict[str, Any], str]:
    """``ferry queue queues --json``: the webhook's row, and what went to stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "engine", "queue", "--spool", str(spool), "queues", "--json"],
        capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60,
        check=True)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return (next((r for r in rows if r["destination"] == "webhook:hook"), {}),
            done.stderr.decode())


def test_kill_9_with_events_waiting_loses_none(tmp_path: Path) -> None:
    smtp_port, hook_port = free_port(), free_port()
    spool = tmp_path / "spool"
    (tmp_path / "ferry.toml").write_text(f"""
spool = "{spool}"
hostname = "ferry.test"
[queue]
min_free_disk = 0
[[receive]]
listen = ["127.0.0.1:{smtp_port}"]
relay_networks = ["127.0.0.0/8"]
[delivery]
paused = true
dns = "127.0.0.1:9"
{hook(f"http://127.0.0.1:{hook_port}/hook", events=["RECEIVE"], batch_size=7)}
""", encoding="utf-8")
    serve = FerryProcess(tmp_path, smtp_port, ["--config", str(tmp_path / "ferry.toml")])
    serve.start()
    try:
        send("127.0.0.1", smtp_port, 20, "x@mx.test")
        # All twenty committed (the running server's row, over the control channel).
        wait_for(lambda: queues(spool)[0].get("messages") == 20, timeout=30,
                 what="20 events waiting")
        serve.kill()
        # The stopped spool says the same.
        row, said = queues(spool)
        assert "no server runs" in said
        assert (row["messages"], row["state"]) == (20, "ready")
        with Receiver(SECRET, port=hook_port) as receiver:
            serve.start()
            wanted = {f"{n}@test" for n in range(20)}
            wait_for(lambda: {e["message_id"] for e in receiver.events()} == wanted,
                     timeout=30, what="the twenty events after the restart")
            assert all(r.verified for r in receiver.requests)
            assert all(len(r.events) <= 7 for r in receiver.requests)
            wait_for(lambda: queues(spool)[0].get("messages") == 0, timeout=30,
                     what="nothing waiting")
            assert serve.stop() == 0
    finally:
        if serve.proc is not None:
            serve.kill()

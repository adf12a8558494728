"""The control channel of a whole Ferry (in-process) over its real Unix socket: replies to
bad requests, the commands, the scheduler's snapshot, permissions, a stale socket, a second
server on one spool."""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.ops.control import MAX_REQUEST, request, socket_path
from engine.queue.records import RcptState
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[RunningFerry]:
    # Delivery stays paused (ferry_config): these tests look at the queue, not the sinks.
    with RunningFerry(ferry_config(tmp_path / "spool")) as running:
        yield running


class Conversation:
    """One connection to the control socket; ``ask`` sends raw bytes, reads one reply."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def ask(self, raw: bytes) -> dict[str, object]:
        self.sock.sendall(raw)
        reply = orjson.loads(self.file.readline())
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_bad_requests_get_error_replies_and_the_connection_keeps_serving(
    ferry: RunningFerry,
) -> None:
    path = socket_path(ferry.config.spool)
    talk = Conversation(path)
    try:
        for raw, words in [
            (b"not json\n", "not JSON"),
            (b'{"command": "flush"}\n', 'unknown command "flush"'),
            (b"[]\r\n", "JSON object"),
            (b'{"command": "suspend"}\n', '"destination" is required'),
            (b"x" * (MAX_REQUEST + 10) + b"\n", f"longer than {MAX_REQUEST} bytes"),
            (b'{"command": "resume", "destination": "bad\\u0000name"}\n', "control characters"),
        ]:
            reply = talk.ask(raw)
            assert reply["ok"] is False and words in str(reply["error"]), (raw[:40], reply)
        # Two requests in one packet get two replies, in order.
        talk.sock.sendall(b'{"command": "suspend", "destination": "one.test"}\n'
                          b'{"command": "suspended"}\n')
        first, second = (orjson.loads(talk.file.readline()) for _ in range(2))
        assert first == {"ok": True, "destination": "one.test", "recipients": 0}
        assert second == {"ok": True, "destinations": ["one.test"]}
    finally:
        talk.close()
    assert request(path, {"command": "suspended"})["destinations"] == ["one.test"]


def test_suspend_parks_queued_mail_and_resume_brings_it_back(ferry: RunningFerry) -> None:
    with smtplib.SMTP(ferry.host, ferry.port) as client:
        client.sendmail("a@client.test", ["x@two.test", "y@one.test"], b"Subject: s\r\n\r\nx\r\n")
    path = socket_path(ferry.config.spool)
    reply = request(path, {"command": "suspend", "destination": "TWO.test."})
    assert reply == {"ok": True, "destination": "two.test", "recipients": 1}
    (qid,) = ferry.store.ids_in_state(RcptState.SUSPENDED.value, 10)
    states = [r.state for r in ferry.store.get(qid).recipients]
    assert states == [RcptState.SUSPENDED, RcptState.PENDING]
    stats = request(path, {"command": "stats"})
    assert stats["ok"] is True and stats["messages"] == 1 and stats["paused"] is True
    assert stats["suspended"] == ["two.test"] and stats["delivered"] == 0
    reply = request(path, {"command": "resume", "destination": "two.test"})
    assert reply == {"ok": True, "destination": "two.test", "recipients": 1,
                     "was_suspended": True}
    assert [r.state for r in ferry.store.get(qid).recipients] == [RcptState.PENDING] * 2
    assert request(path, {"command": "suspended"})["destinations"] == []


SNAPSHOT_ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
busy.test.     IN MX 10 mx.busy.test.
mx.busy.test.  IN A 127.0.12.1
dead.test.     IN MX 10 mx.dead.test.
mx.dead.test.  IN A 127.0.12.9
held.test.     IN MX 10 mx.held.test.
mx.held.test.  IN A 127.0.12.1
"""


def test_stats_is_the_schedulers_snapshot(tmp_path: Path) -> None:
    """A busy site with its worker and limits, a site marked down and until when, a
    suspended destination, the messages queued and delivered: all as the operator asks."""
    sink = CountingSink(["127.0.12.1"], reply_delay=3.0)  # a delivery that takes a while
    try:
        with DnsResponder(SNAPSHOT_ZONE) as dns:
            config = ferry_config(tmp_path / "spool")
            config = dataclasses.replace(config, delivery=dataclasses.replace(
                config.delivery, paused=False, dns=dns.address, mx_port=sink.port,
                retry_interval=3600.0, down_period=600.0))
            with RunningFerry(config) as f:
                path = socket_path(config.spool)

                def stats() -> dict[str, Any]:
                    reply = request(path, {"command": "stats"})
                    assert reply["ok"] is True
                    return reply

                assert request(path, {"command": "suspend", "destination": "held.test"})["ok"]
                started = time.time()
                with smtplib.SMTP(f.host, f.port) as client:
                    client.sendmail("a@client.test", ["x@busy.test", "y@dead.test",
                                                      "z@held.test"], b"Subject: s\r\n\r\nx\r\n")

                def busy_and_down() -> dict[str, Any] | None:
                    now = stats()
                    busy = [s for s in now["sites"] if s["site"] == "mx:mx.busy.test"]
                    return now if busy and busy[0]["workers"] and now["down"] else None

                now = wait_for(busy_and_down, 20, "a site busy and a site down")
                (busy,) = [s for s in now["sites"] if s["site"] == "mx:mx.busy.test"]
                assert busy == {"site": "mx:mx.busy.test", "workers": 1, "waiting": 0,
                                "max_connections": config.delivery.max_per_domain,
                                "max_rate": 0.0}
                assert list(now["down"]) == ["mx:mx.dead.test"]
                assert 500 < now["down"]["mx:mx.dead.test"] <= 600
                until = now["down_until"]["mx:mx.dead.test"]
                assert started + 600 <= until <= time.time() + 600
                assert now["suspended"] == ["held.test"] and now["paused"] is False
                assert now["messages"] == 1 and now["delivered"] == 0

                done = wait_for(lambda: (s := stats())["delivered"] == 1 and not s["sites"]
                                and s, 20, "the delivery to finish")
                # Still queued: deferred for the site that is down, held for the suspended.
                assert done["messages"] == 1 and list(done["down"]) == ["mx:mx.dead.test"]
                assert done["queue"]["enqueued"] == 1 and done["commits"] >= 2
                assert len(sink.state.messages) == 1
    finally:
        sink.stop()


def test_the_socket_is_private_and_removed_at_stop(tmp_path: Path) -> None:
    config = ferry_config(tmp_path / "spool")
    path = socket_path(config.spool)
    with RunningFerry(config):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    assert not path.exists()


def test_a_stale_socket_is_replaced_and_a_live_one_keeps_a_second_server_out(
    tmp_path: Path,
) -> None:
    config = ferry_config(tmp_path / "spool")
    path = socket_path(config.spool)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))  # a server killed without cleaning up leaves this behind
    with RunningFerry(config) as first:
        assert request(path, {"command": "suspended"})["ok"] is True
        with pytest.raises(OSError, match="another ferry serve"):
            RunningFerry(config)
        assert request(path, {"command": "suspended"})["ok"] is True  # untouched
        assert first.store.count() == 0


def test_a_spool_path_too_long_for_a_socket_runs_without_the_channel(tmp_path: Path) -> None:
    spool = tmp_path / ("s" * 60) / ("p" * 60)
    with RunningFerry(ferry_config(spool)) as f:
        assert f.app.control is None
        with smtplib.SMTP(f.host, f.port) as client:  # mail is still accepted
            client.sendmail("a@client.test", ["x@two.test"], b"Subject: s\r\n\r\nx\r\n")
        wait_for(lambda: f.store.count() == 1, 10, "the message queued")


def test_a_saved_set_that_does_not_decode_is_reported_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from engine.queue.lmdb_store import LmdbQueue
    from engine.scheduler.scheduler import SUSPENDED_SETTING

    config = ferry_config(tmp_path / "spool")
    store = LmdbQueue(config.spool / "queue", min_free_disk=0)
    asyncio.run(store.save_setting(SUSPENDED_SETTING, b'{"not": "a list"}'))
    store.close_sync()
    with RunningFerry(config):
        assert request(socket_path(config.spool), {"command": "suspended"})["destinations"] == []
    assert "suspended destinations does not decode" in caplog.text

"""One view of a node of two workers (engine.cluster.fanout, engine.cluster.nodeview): two
real Apps on two queue shards of one spool, each with its own control socket, and the
node's control channel (NodeControl) on ``<spool>/control.sock``, as the supervisor runs
it.  Mail queued in both workers is listed, shown, counted per destination, held,
released, removed and tracked by ``ferry queue`` / ``ferry track`` (real processes) and
by worker 0's admin API; worker 0's /metrics has every worker's samples; a stopped
worker is named and the other still acts."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from engine.cluster.fanout import NodeControl
from engine.cluster.shards import shard_config, shard_spool, worker_control_path, workers_dir
from engine.config import AlertConfig, Config
from engine.ops.control import request, socket_path
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import RcptState, id_bytes, id_text
from engine.testing.events import Recorder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.integration.test_admin_api import call, http_config

T = TypeVar("T")
ME = pwd.getpwuid(os.getuid()).pw_name


class RunningNode:
    """A NodeControl for the workers ``indexes`` of ``spool`` on a loop of its own."""

    def __init__(self, spool: Path, indexes: list[int], timeout: float = 20.0) -> None:
        self.indexes = indexes
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.control = NodeControl(socket_path(spool), spool, lambda: self.indexes,
                                   timeout=timeout)
        self.call(self.control.start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.call(self.control.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Node:
    def __init__(self, tmp_path: Path, http: bool = False,
                 smarthost: tuple[str, int] | None = None,
                 alerts: tuple[AlertConfig, ...] = ()) -> None:
        self.spool = tmp_path / "spool"
        config = ferry_config(self.spool)
        if alerts:  # evaluated when a test says (App.alerts.evaluate), not by a timer
            config = dataclasses.replace(config, alert=alerts, alerts=dataclasses.replace(
                config.alerts, interval=3600))
        if smarthost is not None:  # delivery on, to a sink
            config = dataclasses.replace(config, delivery=dataclasses.replace(
                config.delivery, paused=False, smarthost=smarthost))
        if http:
            config = dataclasses.replace(config, http=http_config())
        self.config: Config = config
        workers_dir(self.spool).mkdir(parents=True)  # the supervisor makes it
        self.node = RunningNode(self.spool, [0, 1])
        self.workers: list[RunningFerry | None] = []
        for index in (0, 1):
            # As in a node, worker 1's configuration names the node's [http] listener
            # (its metrics are kept for worker 0 to gather); without a supervisor's role
            # it also serves one of its own here, on another port, which no test uses.
            shard = shard_config(config, index)
            self.workers.append(RunningFerry(
                shard, control_path=worker_control_path(self.spool, index),
                node_control=socket_path(self.spool), node_index=index))

    def worker(self, index: int) -> RunningFerry:
        w = self.workers[index]
        assert w is not None
        return w

    def send(self, index: int, *recipients: str, subject: str = "s") -> str:
        w = self.worker(index)
        before = set(w.store.ids_in_state("pending", 100))
        with smtplib.SMTP(w.host, w.port) as client:
            client.sendmail("a@client.test", list(recipients),
                            f"Subject: {subject}\r\n\r\nx\r\n".encode())
        (qid,) = set(w.store.ids_in_state("pending", 100)) - before
        return id_text(qid)

    def states(self, index: int, qid: str) -> list[RcptState]:
        return [r.state for r in self.worker(index).store.get(id_bytes(qid)).recipients]

    def ask(self, **message: object) -> dict[str, Any]:
        return request(socket_path(self.spool), message)

    def stop_worker(self, index: int) -> None:
        self.worker(index).stop()
        self.workers[index] = None

    def close(self) -> None:
        for w in self.workers:
            if w is not None:
                w.stop()
        self.node.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=60)


def test_ferry_queue_and_track_see_and_act_on_both_workers(node: Node) -> None:
    a = node.send(0, "x@one.test", subject="in worker 0")
    b = node.send(1, "y@one.test", "z@two.test", subject="in worker 1")
    spool = str(node.spool)

    listed = ferry("queue", "--spool", spool, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [orjson.loads(line)["id"] for line in listed.stdout.splitlines()] == [a, b]
    assert ferry("queue", "--spool", spool, "list", "--limit", "1").stdout.count(
        "1 of 2 shown") == 1
    one = ferry("queue", "--spool", spool, "list", "--destination", "one.test", "--json")
    assert len(one.stdout.splitlines()) == 2

    shown = ferry("queue", "--spool", spool, "show", b)
    assert shown.returncode == 0, shown.stderr
    assert "Subject: in worker 1" in shown.stdout and "<z@two.test> → two.test" in shown.stdout
    stats = orjson.loads(ferry("queue", "--spool", spool, "stats", "--json").stdout)
    assert stats["messages"] == 2 and stats["states"]["pending"] == 2

    queues = ferry("queue", "--spool", spool, "queues", "--json")
    assert queues.returncode == 0 and queues.stderr == ""  # from the running node
    rows = {r["destination"]: r for r in map(orjson.loads, queues.stdout.splitlines())}
    assert (rows["one.test"]["messages"], rows["one.test"]["recipients"]) == (2, 2)
    assert (rows["two.test"]["messages"], rows["two.test"]["recipients"]) == (1, 1)
    assert rows["one.test"]["in_per_minute"] is not None  # the workers' live figures

    held = ferry("queue", "--spool", spool, "hold", a, b)
    assert held.returncode == 0, held.stderr
    assert held.stdout.split() == ["held", a, "held", b]
    assert node.states(0, a) == [RcptState.HELD]
    assert node.states(1, b) == [RcptState.HELD] * 2
    again = ferry("queue", "--spool", spool, "hold", "--destination", "two.test")
    assert again.returncode == 0 and b in again.stderr  # already held, in worker 1

    released = ferry("queue", "--spool", spool, "release", "--state", "held")
    assert released.returncode == 0, released.stderr
    assert sorted(released.stdout.split()) == sorted(["released", a, "released", b])
    assert node.states(1, b) == [RcptState.PENDING] * 2

    removed = ferry("queue", "--spool", spool, "remove", b)
    assert removed.returncode == 0 and removed.stdout.split() == ["removed", b]
    with pytest.raises(KeyError):
        node.worker(1).store.get(id_bytes(b))
    nobody = "00" * 12
    missing = ferry("queue", "--spool", spool, "hold", nobody)
    assert missing.returncode == 1 and f"no message {nobody.upper()}" in missing.stderr

    def tracked() -> dict[str, list[str]] | None:
        out = ferry("track", "--spool", spool, "--json")
        events: dict[str, list[str]] = {}
        for record in map(orjson.loads, out.stdout.splitlines()):
            events.setdefault(record["id"], []).append(record["event"])
        done = "REMOVE" in events.get(b, ()) and "RELEASE" in events.get(a, ())
        return events if done else None

    events = wait_for(tracked, 20, "both workers' events in ferry track")
    assert events[a][0] == "RECEIVE" and events[b][0] == "RECEIVE"
    assert "HOLD" in events[a] and "HOLD" in events[b]
    holds = ferry("track", "--spool", spool, "--event", "HOLD", "--json").stdout
    # The node's control channel forwards who asked it: the workers' events name them.
    assert {orjson.loads(line)["by"] for line in holds.splitlines()} == {ME}


def test_destination_commands_and_figures_are_the_nodes(node: Node) -> None:
    node.send(0, "x@one.test")
    node.send(1, "y@one.test", "w@one.test")
    assert node.ask(command="suspend", destination="ONE.test") == {
        "ok": True, "destination": "one.test", "recipients": 3}
    for index in (0, 1):
        scheduler = node.worker(index).app.scheduler
        assert scheduler is not None and "one.test" in scheduler.snapshot().suspended
    assert node.ask(command="suspended") == {"ok": True, "destinations": ["one.test"]}
    rows = node.ask(command="queues")["queues"]
    assert [(r["destination"], r["state"], r["recipients"]) for r in rows] == [
        ("one.test", "suspended", 3)]
    resumed = node.ask(command="resume", destination="one.test")
    assert (resumed["recipients"], resumed["was_suspended"]) == (3, True)
    stats = node.ask(command="stats")
    assert stats["ok"] and stats["messages"] == 2 and stats["suspended"] == []
    bad = node.ask(command="suspend")
    assert bad == {"ok": False, "error": 'suspend: "destination" is required'}


def test_alerts_read_every_shard_and_fire_once_for_the_node(tmp_path: Path) -> None:
    """A threshold is the node's: two messages queued in each worker are above 3 for the
    node though neither shard is; worker 0 alone evaluates the rules, so it fires once,
    and the other workers' /readyz show worker 0's alerts."""
    node = Node(tmp_path, http=True, alerts=(AlertConfig(
        name="backlog", metric="queue_depth", destination="one.test", above=3),))
    try:
        for index in (0, 1):
            node.send(index, "a@one.test")
            node.send(index, "b@one.test")
        w0, w1 = node.worker(0), node.worker(1)
        ops, first, second = w0.app.node_operations, w0.app.alerts, w1.app.alerts
        assert ops is not None and first is not None and second is not None
        ops.open_here[1] = w1.store  # one process: LMDB opens shard 1 once in it
        (change,) = w0.call(first.evaluate())
        alert = change.alert
        assert change.state == "firing"
        assert (alert.rule, alert.destination, alert.value) == ("backlog", "one.test", 4.0)
        assert first.active() == [alert]
        assert second.rules == () and second.active() == []
        (shown,) = node.ask(command="alerts")["alerts"]
        assert (shown["rule"], shown["value"]) == ("backlog", 4.0)
        ready = call(w1, "GET", "/readyz", token=None)
        assert ready.status == 200 and ready.doc["alerts"] == [shown]
    finally:
        node.close()


def test_a_stopped_worker_is_named_and_the_other_acts(node: Node) -> None:
    a = node.send(0, "x@one.test")
    b = node.send(1, "y@one.test")
    node.stop_worker(1)
    reply = node.ask(command="hold", ids=[a, b])
    assert (reply["ok"], reply["changed"], reply["missing"]) == (True, [a], [b])
    assert reply["not_answering"] == [1]
    assert reply["warnings"][0].startswith("worker 1 not answering")
    assert node.states(0, a) == [RcptState.HELD]

    out = ferry("queue", "--spool", str(node.spool), "release", a)
    assert out.returncode == 0 and out.stdout.split() == ["released", a]
    assert "worker 1 not answering" in out.stderr
    node.stop_worker(0)
    none = node.ask(command="suspended")
    assert not none["ok"] and "worker 0" in none["error"] and "worker 1" in none["error"]


def test_the_admin_api_and_metrics_of_worker_0_cover_the_node(tmp_path: Path) -> None:
    node = Node(tmp_path, http=True)
    try:
        # Two workers in one process: worker 0 reads worker 1's shard through its store
        # (LMDB opens an environment once per process; workers are processes of their own).
        ops = node.worker(0).app.node_operations
        assert ops is not None
        ops.open_here[1] = node.worker(1).store
        a = node.send(0, "x@one.test")
        b = node.send(1, "y@two.test")
        w0 = node.worker(0)
        listed = call(w0, "GET", "/api/v1/messages", token="reader")
        assert listed.status == 200
        assert [m["id"] for m in listed.doc["messages"]] == [a, b]
        assert call(w0, "GET", f"/api/v1/messages/{b}", token="reader").doc["id"] == b
        queues = call(w0, "GET", "/api/v1/queues", token="reader").doc["queues"]
        assert sorted(r["destination"] for r in queues) == ["one.test", "two.test"]
        assert call(w0, "GET", "/api/v1/stats", token="reader").doc["messages"] == 2

        seen = Recorder()
        node.worker(1).app.events.add(seen)
        held = call(w0, "POST", f"/api/v1/messages/{b}/hold")
        assert held.status == 200 and held.doc["changed"] == [b]
        assert wait_for(lambda: seen.of("HOLD"))[0]["by"] == "operator"  # the token
        assert node.states(1, b) == [RcptState.HELD]
        bulk = call(w0, "POST", "/api/v1/queue/release", json={"ids": [a, b]})
        assert (bulk.doc["changed"], bulk.doc["unchanged"]) == ([b], [a])
        assert call(w0, "POST", "/api/v1/destinations/two.test/suspend").doc[
            "recipients"] == 1
        assert call(w0, "GET", "/api/v1/destinations/suspended",
                    token="reader").doc == {"destinations": ["two.test"]}

        tracked = wait_for(lambda: (lambda d: d if d["total"] >= 2 else None)(
            call(w0, "GET", "/api/v1/tracking?event=RECEIVE", token="reader").doc), 20,
            "both RECEIVE events")
        assert sorted(r["id"] for r in tracked["records"]) == sorted([a, b])

        scraped = call(w0, "GET", "/metrics", token="reader")
        assert scraped.status == 200
        text = scraped.body.decode()
        assert 'worker="0"' in text and 'worker="1"' in text
        families: list[str] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                families.append(line.split()[2])
        assert len(families) == len(set(families))  # each family once, its samples together
        assert {f.name for f in text_string_to_metric_families(text)} >= {
            "ferry_received_messages", "ferry_build_info"}
        received = [line for line in text.splitlines()
                    if line.startswith("ferry_received_messages_total{")]
        assert {('worker="0"' in line, 'worker="1"' in line) for line in received} == {
            (True, False), (False, True)}

        node.stop_worker(1)  # a verb still acts on worker 0, and says who did not answer
        partial = call(w0, "POST", "/api/v1/queue/hold", json={"ids": [a, b]})
        assert partial.status == 200
        assert (partial.doc["changed"], partial.doc["missing"]) == ([a], [b])
        assert partial.doc["not_answering"] == [1]
        assert partial.doc["warnings"][0].startswith("worker 1 not answering")
    finally:
        node.close()


def test_suppress_on_a_stopped_node_changes_every_shard(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.close()  # the shards are there, nothing runs
    spool = str(node.spool)
    added = ferry("suppress", "--spool", spool, "add", "bad@one.test", "--reason", "gone")
    assert added.returncode == 0, added.stderr

    def entries(index: int) -> list[bytes]:
        store = LmdbQueue(shard_spool(node.spool, index) / "queue", min_free_disk=0)
        try:
            return [address for address, _ in store.suppressed()]
        finally:
            store.close_sync()

    assert entries(0) == entries(1) == [b"bad@one.test"]
    removed = ferry("suppress", "--spool", spool, "remove", "bad@one.test")
    assert removed.returncode == 0, removed.stderr
    assert entries(0) == entries(1) == []


def test_a_spool_path_too_long_for_a_socket_runs_the_node_without_its_channel(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / ("s" * 110)
    spool.mkdir()
    node = RunningNode(spool, [0])
    try:
        assert not socket_path(spool).exists()
        assert "node control channel off" in caplog.text
    finally:
        node.stop()


def test_a_worker_that_hangs_is_named_after_the_timeout(tmp_path: Path) -> None:
    """Worker 1's socket accepts and never answers (a worker stuck in a long call): the
    node answers with worker 0's part once the timeout is over, naming worker 1."""
    spool = tmp_path / "spool"
    workers_dir(spool).mkdir(parents=True)
    worker = RunningFerry(ferry_config(spool), control_path=worker_control_path(spool, 0))
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(worker_control_path(spool, 1)))
    stuck.listen(4)
    node = RunningNode(spool, [0, 1], timeout=0.5)
    try:
        reply = request(socket_path(spool), {"command": "suspended"}, timeout=30)
        assert (reply["ok"], reply["destinations"], reply["not_answering"]) == (True, [], [1])
        assert reply["warnings"] == ["worker 1 not answering (no answer in 0.5 s)"]
    finally:
        node.stop()
        worker.stop()
        stuck.close()


SINK_ADDRESSES = ["127.0.31.1"]


def test_a_bounce_suppresses_its_address_in_every_worker(tmp_path: Path,
                                                          sink: CountingSink) -> None:
    """Worker 1's delivery fails with a hard bounce: the entry its suppression list takes
    goes to worker 0's list too (through the node's control channel), as "auto"."""
    sink.state.rcpt_replies["gone@sink.test"] = "550 5.1.1 <gone@sink.test>: no such user"
    node = Node(tmp_path, smarthost=(SINK_ADDRESSES[0], sink.port))
    try:
        node.send(1, "gone@sink.test")
        lists = [node.worker(i).app.suppression for i in (0, 1)]
        assert lists[0] is not None and lists[1] is not None
        wait_for(lambda: all("gone@sink.test" in s.entries for s in lists if s), 20,
                 "the entry in both workers' lists")
        for suppression in lists:
            entry = suppression.entry("gone@sink.test") if suppression else None
            assert entry is not None and (entry.source, entry.category) == ("auto",
                                                                            "bad-mailbox")
    finally:
        node.close()

"""A node's limits shared by its workers without Redis (engine.cluster.node): one
NodeCoordinator on a real Unix socket, NodeLimits clients on other event loops (threads)
and in other processes.  A limit holds across clients, a closed or killed client's
leases return at once, a rate is one schedule, daily caps are counted for the node, and a
coordinator that goes away leaves each client on its share until it is back.  Then two
real Ferry apps on two shards of one spool deliver to one counting sink through one
coordinator: never more than the limit at once, and the limit reached.

Bounded: a few dozen leases and messages, waits for states with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from engine.cluster.api import ClusterLimits, Lease
from engine.cluster.node import (
    NodeCoordinator,
    NodeLimits,
    coordinator_for,
    start_worker_limits,
)
from engine.cluster.role import WorkerRole
from engine.cluster.shards import limits_path, shard_config
from engine.cluster.supervisor import Supervisor
from engine.config import load_config
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

T = TypeVar("T")


class Loop:
    """An event loop in a thread: the coordinator's (the supervisor's), or a worker's."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    # Short enough for a Unix socket whatever pytest's temporary directory is called.
    short = Path(f"/tmp/ferry-node-{os.getpid()}-{id(tmp_path) % 100000}")
    short.mkdir(exist_ok=True)
    yield short / "limits.sock"
    for leftover in short.iterdir():
        leftover.unlink()
    short.rmdir()


@pytest.fixture
def coordinator(socket_path: Path) -> Iterator[tuple[NodeCoordinator, Loop]]:
    loop = Loop("coordinator")
    node = NodeCoordinator(socket_path)
    loop.call(node.start())
    try:
        yield node, loop
    finally:
        loop.call(node.stop())
        loop.close()


def client(path: Path, loop: Loop, share: float = 0.5, **kw: Any) -> NodeLimits:
    async def make() -> NodeLimits:
        limits = NodeLimits(path, share=share, **kw)
        await limits.start()
        return limits

    return loop.call(make())


def test_a_limit_of_three_holds_across_two_workers(
        coordinator: tuple[NodeCoordinator, Loop], socket_path: Path) -> None:
    node, _ = coordinator
    loops = [Loop("worker-a"), Loop("worker-b")]
    workers = [client(socket_path, loop) for loop in loops]
    lock = threading.Lock()
    held = [0, 0]  # [now, peak], across both workers

    async def deliveries(limits: NodeLimits, rounds: int) -> int:
        async def one_connection() -> int:
            done = 0
            while done < rounds:
                lease = await limits.acquire("site", 3)
                if lease is None:
                    await asyncio.sleep(0.001)  # the scheduler's lease_wait, shortened
                    continue
                with lock:
                    held[0] += 1
                    held[1] = max(held)
                await asyncio.sleep(0.002)  # a delivery on the connection
                with lock:
                    held[0] -= 1
                await limits.release(lease)
                done += 1
            return done

        return sum(await asyncio.gather(*(one_connection() for _ in range(4))))

    try:
        futures = [asyncio.run_coroutine_threadsafe(deliveries(w, 15), loop.loop)
                   for w, loop in zip(workers, loops, strict=True)]
        assert [f.result(60) for f in futures] == [60, 60]
        # Eight would-be connections, three at most at once for the node, and three used.
        assert held == [0, 3]
        assert all(w.shared for w in workers)
        assert sum(w.figures.refused for w in workers) > 0
        wait_for(lambda: node.held("site") == 0, what="every lease back")
    finally:
        for w, loop in zip(workers, loops, strict=True):
            loop.call(w.stop())
            loop.close()


def test_a_stopped_workers_leases_return(coordinator: tuple[NodeCoordinator, Loop],
                                         socket_path: Path) -> None:
    node, _ = coordinator
    loop = Loop("workers")
    a, b = client(socket_path, loop), client(socket_path, loop)

    async def take(limits: NodeLimits, n: int) -> list[Lease]:
        got = [await limits.acquire("site", 3) for _ in range(n)]
        return [lease for lease in got if lease is not None]

    try:
        assert len(loop.call(take(a, 3))) == 3
        assert loop.call(take(b, 1)) == []
        loop.call(a.stop())  # gives nothing back itself: its connection closes
        wait_for(lambda: node.held("site") == 0, what="a's leases returned")
        assert len(loop.call(take(b, 4))) == 3
        assert node.held("site") == 3
    finally:
        loop.call(b.stop())
        loop.close()


def test_a_worker_holding_every_lease_yields_to_one_that_waits(
        coordinator: tuple[NodeCoordinator, Loop], socket_path: Path) -> None:
    node, _ = coordinator
    loop = Loop("workers")
    a, b = client(socket_path, loop), client(socket_path, loop)

    async def take(limits: NodeLimits, n: int) -> list[Lease]:
        got = [await limits.acquire("site", 3) for _ in range(n)]
        return [lease for lease in got if lease is not None]

    try:
        held = loop.call(take(a, 3))
        assert len(held) == 3 and not a.yielding("site", 3)  # nobody waits yet
        assert loop.call(take(b, 1)) == []
        # b was refused: a is told, and ends its connections beyond its share (1 of 3).
        wait_for(lambda: a.yielding("site", 3), what="a told that b waits")
        assert node.figures.wanted == 1
        assert not b.yielding("site", 3)  # b holds none
        # Each of a's three connections asks: two are to end, the third keeps its lease.
        assert [a.over_share("site", 3) for _ in range(3)] == [True, True, False]
        assert not a.yielding("site", 3)
        # Nor does a take more while b waits: refused without asking the coordinator.
        assert loop.call(take(a, 1)) == []
        for lease in held[1:]:
            loop.call(a.release(lease))
        wait_for(lambda: node.held("site") == 1, what="a's two leases back")
        assert len(loop.call(take(b, 3))) == 2
        assert not a.over_share("site", 3) and not b.over_share("site", 3)
    finally:
        for w in (a, b):
            loop.call(w.stop())
        loop.close()


#: A worker in a process of its own: takes ``n`` leases on ``key``, says so, then waits
#: to be killed.
WORKER = """
import asyncio, sys
from pathlib import Path
from engine.cluster.node import NodeLimits

async def main():
    limits = NodeLimits(Path(sys.argv[1]), share=0.5)
    await limits.start()
    got = [await limits.acquire(sys.argv[2], 3) for _ in range(int(sys.argv[3]))]
    print("held", sum(lease is not None for lease in got), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def test_a_killed_workers_leases_return_at_once(coordinator: tuple[NodeCoordinator, Loop],
                                                socket_path: Path) -> None:
    node, _ = coordinator
    loop = Loop("worker")
    other = client(socket_path, loop)
    with subprocess.Popen([sys.executable, "-c", WORKER, str(socket_path), "site", "3"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "held 3\n"
            assert node.held("site") == 3
            assert loop.call(other.acquire("site", 3)) is None
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            # No expiry to wait for: the kernel closed the dead worker's socket.
            wait_for(lambda: node.held("site") == 0, what="the killed worker's leases back")
            got = [loop.call(other.acquire("site", 3)) for _ in range(3)]
            assert all(lease is not None for lease in got)
            assert other.shared
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
            loop.call(other.stop())
            loop.close()


def test_a_rate_is_one_schedule_for_the_node(coordinator: tuple[NodeCoordinator, Loop],
                                             socket_path: Path) -> None:
    rate = 50.0
    loops = [Loop("worker-a"), Loop("worker-b")]
    workers = [client(socket_path, loop) for loop in loops]

    async def send(limits: NodeLimits, n: int) -> list[int]:
        starts = []
        for _ in range(n):
            slot = await limits.reserve("site", rate)
            starts.append(slot.start)
            await asyncio.sleep(slot.wait)  # as the scheduler does, then sends
        return starts

    try:
        futures = [asyncio.run_coroutine_threadsafe(send(w, 20), loop.loop)
                   for w, loop in zip(workers, loops, strict=True)]
        starts = sorted(s for f in futures for s in f.result(30))
        # Forty slots on the coordinator's clock, each 1/50 s after the one before,
        # whichever worker asked: 50 a second for the node, not 50 per worker.
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(19_999 <= gap <= 20_001 for gap in gaps), gaps
        achieved = (len(starts) - 1) / ((starts[-1] - starts[0]) / 1e6)
        assert achieved == pytest.approx(rate, rel=0.10)
        assert loops[0].call(workers[0].reserve("site", 0)).wait == 0.0
    finally:
        for w, loop in zip(workers, loops, strict=True):
            loop.call(w.stop())
            loop.close()


def test_a_daily_cap_is_counted_for_the_node(coordinator: tuple[NodeCoordinator, Loop],
                                             socket_path: Path) -> None:
    node, _ = coordinator
    loop = Loop("workers")
    a, b = client(socket_path, loop), client(socket_path, loop)

    async def count(limits: NodeLimits, n: int, day: int = 20_000) -> int:
        return sum([await limits.count("site", day, 5) for _ in range(n)])

    try:
        assert (loop.call(count(a, 4)), loop.call(count(b, 4))) == (4, 1)
        assert node.sent("site", 20_000) == 5
        assert loop.call(count(a, 2, day=20_001)) == 2  # a new UTC day, a new count
    finally:
        for w in (a, b):
            loop.call(w.stop())
        loop.close()


def test_coordinator_gone_falls_back_to_the_share_and_back(
        socket_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ferry.cluster")
    home = Loop("coordinator")
    node = NodeCoordinator(socket_path)
    home.call(node.start())
    loop = Loop("workers")
    a = client(socket_path, loop, reconnect_interval=0.05, name="worker 1")
    b = client(socket_path, loop, reconnect_interval=0.05, name="worker 2")

    async def take(limits: NodeLimits, n: int) -> list[Lease]:
        got = [await limits.acquire("site", 4) for _ in range(n)]
        return [lease for lease in got if lease is not None]

    try:
        assert len(loop.call(take(a, 1))) == 1
        home.call(node.stop())
        wait_for(lambda: not a.shared and not b.shared, what="both workers on their share")
        # Each worker alone: half of 4 (a holds one already).
        assert len(loop.call(take(a, 3))) == 1
        assert len(loop.call(take(b, 3))) == 2
        assert loop.call(b.count("capped", 20_000, 4)) is True  # 2 of 4, on its own
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert sorted(r.getMessage().split(":")[1].strip() for r in unreachable) == [
            "worker 1", "worker 2"]  # said once each, however many calls followed
        node = NodeCoordinator(socket_path)
        home.call(node.start())
        wait_for(lambda: a.shared and b.shared, what="both workers back with the node")
        # Every lease held was registered again: 2 + 2 = 4, the limit, is taken.
        wait_for(lambda: node.held("site") == 4, what="the leases registered again")
        assert loop.call(take(a, 1)) == [] and loop.call(take(b, 1)) == []
        assert node.sent("capped", 20_000) == 1
        assert "answers again" in caplog.text
        assert (a.figures.fallbacks, b.figures.fallbacks) == (1, 1)
    finally:
        for w in (a, b):
            loop.call(w.stop())
        loop.close()
        home.call(node.stop())
        home.close()


def test_a_worker_starts_on_its_share_without_a_coordinator(socket_path: Path) -> None:
    loop = Loop("worker")
    lonely = client(socket_path, loop, share=0.5, reconnect_interval=60)
    try:
        assert not lonely.shared
        got = [loop.call(lonely.acquire("site", 3)) for _ in range(3)]
        assert sum(lease is not None for lease in got) == 1
        waits = [loop.call(lonely.reserve("site", 10.0)).wait for _ in range(2)]
        # Its share of 10 a second: one every 0.2 s.
        assert waits[0] == 0.0 and waits[1] == pytest.approx(0.2, abs=0.05)
    finally:
        loop.call(lonely.stop())
        loop.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket away needs root")
def test_the_socket_is_given_to_the_workers_account(socket_path: Path) -> None:
    home = Loop("supervisor")
    node = NodeCoordinator(socket_path, owner=(65534, 65534))  # nobody: the workers' user
    home.call(node.start())
    try:
        st = socket_path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o600)
    finally:
        home.call(node.stop())
        home.close()
    assert not socket_path.exists()  # removed at stop


@pytest.mark.parametrize("line", [
    b"A 1 three site\n",          # a limit that is not a number
    b"A 1 3\n",                   # no key
    b"X 1 site\n",                # no such request
    b"G nan site\n",              # not a rate
    b"G -1 site\n",
    b"C today 3 site\n",          # not a day
    b"R \xff\xfe site\n",          # not UTF-8
    b"A 1 3 " + b"s" * 9000,      # longer than MAX_LINE, no end in sight
], ids=["limit", "no-key", "verb", "nan-rate", "negative-rate", "day", "utf8", "too-long"])
def test_a_line_out_of_step_closes_only_that_connection(
        coordinator: tuple[NodeCoordinator, Loop], socket_path: Path, line: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    node, home = coordinator
    loop = Loop("worker")
    good = client(socket_path, loop)
    assert loop.call(good.acquire("site", 2)) is not None

    async def out_of_step() -> bytes:
        reader, writer = await asyncio.open_unix_connection(os.fspath(socket_path))
        # A lease first, so closing the connection must give it back.
        writer.write(b"A 1 2 site\n" + line)
        await writer.drain()
        got = await reader.read()
        writer.close()
        return got

    try:
        assert home.call(out_of_step()) == b"1\n"  # its lease, then closed, no answer
        assert node.figures.bad == 1
        assert "closing a worker's connection" in caplog.text
        wait_for(lambda: node.held("site") == 1, what="the closed connection's lease back")
        # The other worker's connection and lease are untouched.
        assert loop.call(good.acquire("site", 2)) is not None and good.shared
    finally:
        loop.call(good.stop())
        loop.close()


# --- two real Ferry workers through one coordinator ----------------------------------------

SINKS = {"node.test": "127.0.43.1", "other.test": "127.0.43.2"}
LIMIT = 3
ZONE = f"""
$TTL 300
@ IN SOA ns.test. admin.test. 1 60 60 600 60
node.test. IN MX 10 mx1.node.test.
mx1.node.test. IN A {SINKS["node.test"]}
other.test. IN MX 10 mx1.other.test.
mx1.other.test. IN A {SINKS["other.test"]}
"""


@pytest.fixture
def dns() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as responder:
        yield responder


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    # Each DATA answered after 0.1 s: a worker's connections stay busy while it has mail.
    s = CountingSink(list(SINKS.values()), reply_delay=0.1)
    try:
        yield s
    finally:
        s.stop()


@contextlib.contextmanager
def two_workers(tmp_path: Path, dns: DnsResponder, sink: CountingSink,
                more: str = "") -> Iterator[tuple[RunningFerry, RunningFerry]]:
    """Workers 0 and 1 of one node (two shards of one spool), their schedulers asking one
    coordinator (the supervisor's, here on a thread's loop)."""
    spool = Path(f"/tmp/ferry-node-{os.getpid()}")  # a Unix socket's path is short
    host, port = dns.address
    path = tmp_path / "ferry.toml"
    path.write_text(f"""
hostname = "node.ferry.test"
spool = "{spool}"
[queue]
min_free_disk = 0
durability = "os"
[[receive]]
listen = ["127.0.0.1:0"]
[delivery]
dns = "{host}:{port}"
mx_port = {sink.port}
max_per_domain = {LIMIT}
retry_interval = 1
{more}
""", encoding="utf-8")
    config = load_config(path)
    home = Loop("supervisor")
    # As the supervisor and the workers wire it (engine.cluster.supervisor, engine.app).
    node = coordinator_for(Supervisor(config))
    assert node.path == limits_path(spool)
    home.call(node.start())
    try:
        with RunningFerry(shard_config(config, 0)) as w0, \
                RunningFerry(shard_config(config, 1)) as w1:
            for index, worker in enumerate((w0, w1)):
                worker.call(_attach(worker, WorkerRole(index, 2, 2, spool)))
            yield w0, w1
    finally:
        home.call(node.stop())
        home.close()
        shutil.rmtree(spool, ignore_errors=True)


async def _attach(worker: RunningFerry, role: WorkerRole) -> None:
    limits = await start_worker_limits(role)
    assert limits.share == 0.5 and limits.shared
    assert worker.app.scheduler is not None
    worker.app.scheduler.cluster = limits  # App.stop stops it


def send(workers: tuple[RunningFerry, ...], *counts: int) -> None:
    """``counts[i]`` messages to each destination through worker ``i``, parked
    (suspended) while they are queued, so every message is due at once after."""
    for worker in workers:
        assert worker.app.operations is not None
        for domain in SINKS:
            worker.call(worker.app.operations.suspend(domain, "test"))
    for tag, worker, count in zip("ab", workers, counts, strict=False):
        with smtplib.SMTP(worker.host, worker.port) as smtp:
            for n in range(count):
                for domain in SINKS:
                    smtp.sendmail("s@client.test", [f"{tag}{n}@{domain}"],
                                  f"Subject: {tag}{n}\r\n\r\nhello\r\n".encode())
    for worker in workers:
        assert worker.app.operations is not None
        for domain in SINKS:
            worker.call(worker.app.operations.resume(domain, "test"))


def _delivered(sink: CountingSink) -> set[str]:
    return {rcpt for m in sink.state.messages for rcpt in m.recipients}


def _clusters(*workers: RunningFerry) -> list[ClusterLimits]:
    out = []
    for worker in workers:
        cluster = worker.app.scheduler.cluster if worker.app.scheduler else None
        assert cluster is not None
        out.append(cluster)
    return out


def test_two_workers_never_open_more_than_the_limit(tmp_path: Path, dns: DnsResponder,
                                                    sink: CountingSink) -> None:
    with two_workers(tmp_path, dns, sink) as workers:
        send(workers, 12, 12)
        wait_for(lambda: len(_delivered(sink)) == 48, what="every message of both")
        # Each worker alone may open 3 to each destination; together they never had more
        # than 3 open to either, and did use all 3.
        assert {sink.state.peak[address] for address in SINKS.values()} == {LIMIT}
        assert {rcpt[0] for rcpt in _delivered(sink)} == {"a", "b"}
        clusters = _clusters(*workers)
        assert all(c.shared for c in clusters)
        assert sum(c.figures.refused for c in clusters) > 0  # a worker waited for leases


def test_a_worker_with_a_long_queue_does_not_starve_the_other(
        tmp_path: Path, dns: DnsResponder, sink: CountingSink) -> None:
    with two_workers(tmp_path, dns, sink) as workers:
        # Worker 0 takes every lease first and has 30 messages per destination for them
        # (at least a second of deliveries on 3 connections); worker 1 has 3.
        send(workers, 30, 3)
        wait_for(lambda: len(_delivered(sink)) == 66, what="every message of both")
        order = [r for m in sink.state.messages for r in m.recipients]
        for domain in SINKS:
            mine = [r[0] for r in order if r.endswith("@" + domain)]
            # Worker 1 waited, worker 0 was told and gave back its leases beyond its
            # share: worker 1's mail went while worker 0 still had plenty, not after it.
            last_b = max(i for i, tag in enumerate(mine) if tag == "b")
            assert last_b < len(mine) - 10, "".join(mine)
        assert {sink.state.peak[address] for address in SINKS.values()} == {LIMIT}


def test_a_daily_cap_holds_for_the_node(tmp_path: Path, dns: DnsResponder,
                                        sink: CountingSink) -> None:
    cap = 3
    with two_workers(tmp_path, dns, sink, f"""
[[shaping.rules]]
name = "capped"
domains = ["node.test"]
daily_cap = {cap}
""") as workers:
        # Parked while queued: a suspended group spends none of the cap.
        send(workers, 4, 4)
        # other.test has no cap: all 8 of it; node.test: 3 for the node, not 3 per worker.
        wait_for(lambda: sum(r.endswith("@other.test") for r in _delivered(sink)) == 8,
                 what="every message to other.test")

        def deferred() -> int:
            return sum(len(w.store.ids_in_state("deferred", 10)) for w in workers)

        wait_for(lambda: deferred() == 8 - cap, what="the messages beyond the cap deferred")
        assert sum(r.endswith("@node.test") for r in _delivered(sink)) == cap
        replies = [w.store.get(q).recipients[0].last_reply for w in workers
                   for q in w.store.ids_in_state("deferred", 10)]
        assert all(f"daily cap of {cap} messages" in reply for reply in replies)


def test_an_automation_hold_in_one_worker_holds_the_node(tmp_path: Path, dns: DnsResponder,
                                                         sink: CountingSink) -> None:
    """Worker 0 gets a 421 that a [[shaping.automation]] rule suspends on: worker 1
    holds the same (source, site) until the same time, and defers its own mail for it
    untried, as the provider asked of the whole sender."""
    sink.state.data_replies[SINKS["node.test"]] = "421 4.7.28 slow down"
    with two_workers(tmp_path, dns, sink, """
[[shaping.automation]]
name = "back-off"
domains = ["node.test"]
code = 421
duration = 120
""") as (w0, w1):
        with smtplib.SMTP(w0.host, w0.port) as smtp:
            smtp.sendmail("s@client.test", ["a@node.test"], b"Subject: a\r\n\r\nx\r\n")
        assert w0.app.scheduler is not None and w1.app.scheduler is not None
        held0, held1 = w0.app.scheduler.held, w1.app.scheduler.held
        wait_for(lambda: list(held1), what="the hold told to worker 1")
        ((name, theirs),) = held1.items()
        mine = held0[name]
        assert (theirs.rule.name, theirs.origin) == ("back-off", False)
        assert abs(theirs.until - mine.until) < 0.001  # told in milliseconds
        assert mine.origin and theirs.reply == mine.reply == "421 4.7.28 slow down"
        attempts = sum(sink.state.connections.values())
        with smtplib.SMTP(w1.host, w1.port) as smtp:
            smtp.sendmail("s@client.test", ["b@node.test"], b"Subject: b\r\n\r\nx\r\n")
        wait_for(lambda: w1.store.ids_in_state("deferred", 10), what="b deferred")
        (qid,) = w1.store.ids_in_state("deferred", 10)
        reply = w1.store.get(qid).recipients[0].last_reply
        assert "by shaping rule 'back-off' after: 421 4.7.28 slow down" in reply
        assert sum(sink.state.connections.values()) == attempts  # never tried

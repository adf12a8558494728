"""Two Ferry nodes (their own spools) share one destination's connection limit through a
real redis-server ([cluster], engine.cluster.limits; docs/cluster.md), measured at one
counting sink: never more than the limit in total, each node falls back to its share
while Redis is down and shares again when it is back, and the leases of a node killed
with -9 expire so the other node takes the whole limit.

Mail is queued before the nodes start, so every message is due at once; the sink holds
each reply a little so connections stay open and the limit is reached.  Bounded: 24
messages per node at most, waits for states with deadlines, no sleeps.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import load_config
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient
from engine.testing.dns import DnsResponder
from engine.testing.mta import free_port
from engine.testing.process import FerryProcess
from engine.testing.redis import RedisInstance, find_redis_server
from engine.testing.server import RunningFerry
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

pytestmark = pytest.mark.skipif(find_redis_server() is None,
                                reason="redis-server is not installed (tests/run.sh installs it)")

SINK = "127.0.41.1"
LIMIT = 3
ZONE = f"""
$TTL 300
@ IN SOA ns.test. admin.test. 1 60 60 600 60
shared.test. IN MX 10 mx1.shared.test.
mx1.shared.test. IN A {SINK}
"""


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisInstance]:
    with RedisInstance(tmp_path / "redis") as instance:
        yield instance


@pytest.fixture
def dns() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as responder:
        yield responder


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    # Each DATA answered after 0.1 s: a node's connections stay busy while it has mail.
    s = CountingSink([SINK], reply_delay=0.1)
    try:
        yield s
    finally:
        s.stop()


def node_config(directory: Path, name: str, redis: RedisInstance, dns: DnsResponder,
                sink: CountingSink, *, listen: str = "127.0.0.1:0",
                lease_ttl: float = 30) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    host, port = dns.address
    path = directory / "ferry.toml"
    path.write_text(f"""
hostname = "{name}"
spool = "spool"
[queue]
min_free_disk = 0
durability = "os"
[[receive]]
listen = ["{listen}"]
[delivery]
dns = "{host}:{port}"
mx_port = {sink.port}
max_per_domain = {LIMIT}
retry_interval = 1
[cluster]
redis = "{redis.url}"
lease_ttl = {lease_ttl}
timeout = 0.5
share = 0.34
probe_interval = 0.1
lease_wait = 0.05
sync_interval = 0.1
""", encoding="utf-8")
    return path


def enqueue(directory: Path, count: int, tag: str) -> None:
    store = LmdbQueue(directory / "spool" / "queue", durability="os", min_free_disk=0)
    try:
        for n in range(count):
            env = Envelope("a@client.test", [Recipient(f"{tag}{n}@shared.test", "shared.test")])
            store.enqueue_sync(env, f"Subject: {tag}{n}\r\n\r\nhello\r\n".encode())
    finally:
        store.close_sync()


def delivered(sink: CountingSink, tag: str) -> set[str]:
    return {rcpt for m in sink.state.messages for rcpt in m.recipients if rcpt.startswith(tag)}


def test_two_nodes_never_open_more_than_the_limit(tmp_path: Path, redis: RedisInstance,
                                                  dns: DnsResponder,
                                                  sink: CountingSink) -> None:
    for tag in ("a", "b"):
        enqueue(tmp_path / tag, 24, tag)
    configs = [load_config(node_config(tmp_path / tag, f"{tag}.ferry.test", redis, dns, sink))
               for tag in ("a", "b")]
    with RunningFerry(configs[0]) as a, RunningFerry(configs[1]) as b:
        wait_for(lambda: len(delivered(sink, "a")) == 24 and len(delivered(sink, "b")) == 24,
                 what="every message of both nodes")
        # Each node alone may open 3; together they never had more than 3 open.
        assert sink.state.peak_total == LIMIT
        refused = 0
        for node in (a, b):
            shared = node.app.scheduler.cluster if node.app.scheduler else None
            assert shared is not None and shared.shared
            refused += shared.figures.refused
        assert refused > 0  # the nodes did wait for each other's leases


def test_redis_down_falls_back_to_shares_and_loses_nothing(
        tmp_path: Path, redis: RedisInstance, dns: DnsResponder, sink: CountingSink) -> None:
    for tag in ("a", "b"):
        enqueue(tmp_path / tag, 24, tag)
    configs = [load_config(node_config(tmp_path / tag, f"{tag}.ferry.test", redis, dns, sink))
               for tag in ("a", "b")]
    with RunningFerry(configs[0]) as a, RunningFerry(configs[1]) as b:
        wait_for(lambda: len(delivered(sink, "a")) + len(delivered(sink, "b")) >= 6,
                 what="the first deliveries, limits shared")
        redis.stop()
        clusters = [node.app.scheduler.cluster for node in (a, b) if node.app.scheduler]
        assert all(c is not None for c in clusters)
        wait_for(lambda: not any(c.shared for c in clusters if c is not None),
                 what="both nodes on their share")
        # Each node alone: a third of 3 is one connection.  A node that held more when
        # Redis went ends the extra ones after their deliveries.
        wait_for(lambda: sum(sink.state.open.values()) <= 2, what="each node at its share")
        sink.state.peak_total = sum(sink.state.open.values())
        wait_for(lambda: len(delivered(sink, "a")) + len(delivered(sink, "b")) >= 18,
                 what="deliveries while Redis is down")
        assert sink.state.peak_total <= 2
        redis.start()
        wait_for(lambda: all(c.shared for c in clusters if c is not None),
                 what="both nodes sharing again")
        wait_for(lambda: len(delivered(sink, "a")) == 24 and len(delivered(sink, "b")) == 24,
                 what="every message of both nodes")
        assert sink.state.peak_total <= LIMIT
        assert all(c is not None and c.figures.fallbacks == 1 for c in clusters)


def test_a_killed_nodes_leases_expire(tmp_path: Path, redis: RedisInstance,
                                      dns: DnsResponder, sink: CountingSink) -> None:
    # Node a, a real process, holds every lease on slow deliveries, then dies by kill -9.
    sink.reply_delay = 5.0
    enqueue(tmp_path / "a", 6, "a")
    port = free_port()
    config_a = node_config(tmp_path / "a", "a.ferry.test", redis, dns, sink,
                           listen=f"127.0.0.1:{port}", lease_ttl=2)
    node_a = FerryProcess(tmp_path / "a", port, ["--config", str(config_a)])
    node_a.start()
    try:
        wait_for(lambda: sink.state.peak_total == LIMIT, what="node a's three connections")
        node_a.kill()
    finally:
        node_a.abandon()
    wait_for(lambda: sum(sink.state.open.values()) == 0, what="node a's sockets closed")
    sink.reply_delay = 0.1
    sink.state.peak_total = 0
    enqueue(tmp_path / "b", 24, "b")
    config_b = load_config(node_config(tmp_path / "b", "b.ferry.test", redis, dns, sink,
                                       lease_ttl=2))
    with RunningFerry(config_b) as b:
        wait_for(lambda: len(delivered(sink, "b")) == 24, what="node b's messages")
        cluster = b.app.scheduler.cluster if b.app.scheduler else None
        assert cluster is not None
        # Refused while the dead node's leases lived, then the whole limit.
        assert cluster.figures.refused > 0
        assert sink.state.peak_total == LIMIT


def test_a_suspension_on_one_node_holds_on_every_node(
        tmp_path: Path, redis: RedisInstance, dns: DnsResponder, sink: CountingSink) -> None:
    configs = [load_config(node_config(tmp_path / tag, f"{tag}.ferry.test", redis, dns, sink))
               for tag in ("a", "b")]
    with RunningFerry(configs[0]) as a, RunningFerry(configs[1]) as b:
        assert a.app.operations is not None and b.app.operations is not None
        assert a.app.scheduler is not None and b.app.scheduler is not None
        a.call(a.app.operations.suspend("shared.test", "alice"))
        suspended_b = b.app.scheduler.suspended
        wait_for(lambda: "shared.test" in suspended_b, what="node b suspending it too")
        # Mail that node b takes for it now is parked there.
        with smtplib.SMTP(b.host, b.port) as client:
            client.sendmail("s@client.test", ["b0@shared.test"], b"Subject: b0\r\n\r\nx\r\n")
        qid = wait_for(lambda: b.store.ids_in_state("suspended", 10), what="parked")[0]
        assert b.store.get(qid).recipients[0].state is RcptState.SUSPENDED
        # Resumed on node b: node a follows, and b's message goes.
        b.call(b.app.operations.resume("shared.test", "bob"))
        suspended_a = a.app.scheduler.suspended
        wait_for(lambda: "shared.test" not in suspended_a, what="node a resuming it too")
        wait_for(lambda: delivered(sink, "b") == {"b0@shared.test"}, what="b's message")


def test_a_site_rate_is_one_schedule_for_both_nodes(
        tmp_path: Path, redis: RedisInstance, dns: DnsResponder, sink: CountingSink) -> None:
    sink.reply_delay = 0.0
    rate = 20.0
    for tag in ("a", "b"):
        enqueue(tmp_path / tag, 20, tag)
    paths = [node_config(tmp_path / tag, f"{tag}.ferry.test", redis, dns, sink)
             for tag in ("a", "b")]
    for path in paths:
        path.write_text(path.read_text().replace("retry_interval = 1",
                                                 f"retry_interval = 1\nmax_rate = {rate}"))
    configs = [load_config(path) for path in paths]
    start = time.monotonic()
    with RunningFerry(configs[0]), RunningFerry(configs[1]):
        wait_for(lambda: len(delivered(sink, "a")) == 20 and len(delivered(sink, "b")) == 20,
                 what="every message of both nodes")
        # 40 messages at 20 a second for both nodes together take at least 39 intervals
        # (each node alone at 20 a second would be done in half that).
        assert time.monotonic() - start >= 39 / rate


def test_an_automation_hold_on_one_node_holds_every_node(
        tmp_path: Path, redis: RedisInstance, dns: DnsResponder, sink: CountingSink) -> None:
    """Node a gets a 421 that a [[shaping.automation]] rule suspends on: it was meant for
    the sender, so node b holds the same site until the same time and defers its own
    mail for it untried."""
    sink.reply_delay = 0.0
    sink.state.data_replies[SINK] = "421 4.7.28 slow down"
    paths = [node_config(tmp_path / tag, f"{tag}.ferry.test", redis, dns, sink)
             for tag in ("a", "b")]
    for path in paths:
        path.write_text(path.read_text() + """
[[shaping.automation]]
name = "back-off"
domains = ["shared.test"]
code = 421
duration = 120
""")
    with RunningFerry(load_config(paths[0])) as a, RunningFerry(load_config(paths[1])) as b:
        assert a.app.scheduler is not None and b.app.scheduler is not None
        with smtplib.SMTP(a.host, a.port) as client:
            client.sendmail("s@client.test", ["a0@shared.test"], b"Subject: a0\r\n\r\nx\r\n")
        held_a, held_b = a.app.scheduler.held, b.app.scheduler.held
        wait_for(lambda: list(held_b), what="node b holding the site too")
        ((name, theirs),) = held_b.items()
        mine = held_a[name]
        assert (theirs.rule.name, theirs.origin, mine.origin) == ("back-off", False, True)
        assert abs(theirs.until - mine.until) < 0.001
        assert theirs.reply == mine.reply == "421 4.7.28 slow down"
        attempts = sum(sink.state.connections.values())
        with smtplib.SMTP(b.host, b.port) as client:
            client.sendmail("s@client.test", ["b0@shared.test"], b"Subject: b0\r\n\r\nx\r\n")
        (qid,) = wait_for(lambda: b.store.ids_in_state("deferred", 10), what="b0 deferred")
        reply = b.store.get(qid).recipients[0].last_reply
        assert "by shaping rule 'back-off' after: 421 4.7.28 slow down" in reply
        assert sum(sink.state.connections.values()) == attempts  # never tried


def test_a_resume_on_another_node_before_this_one_looked_is_followed(
        tmp_path: Path, redis: RedisInstance, dns: DnsResponder, sink: CountingSink) -> None:
    """Suspended on node a, resumed on node b before a looked at the cluster again: a's
    look finds its own suspension gone from Redis and resumes too (it must not write it
    back).  The looks are the test's (sync_interval is an hour), so the order is sure."""
    paths = [node_config(tmp_path / tag, f"{tag}.ferry.test", redis, dns, sink)
             for tag in ("a", "b")]
    for path in paths:
        path.write_text(path.read_text().replace("sync_interval = 0.1",
                                                 "sync_interval = 3600"))
    with RunningFerry(load_config(paths[0])) as a, RunningFerry(load_config(paths[1])) as b:
        assert a.app.operations is not None and b.app.operations is not None
        assert a.app.cluster_sync is not None and b.app.cluster_sync is not None
        assert a.app.scheduler is not None and b.app.scheduler is not None
        a.call(a.app.operations.suspend("shared.test", "alice"))
        b.call(b.app.cluster_sync.sync())
        assert "shared.test" in b.app.scheduler.suspended
        b.call(b.app.operations.resume("shared.test", "bob"))
        a.call(a.app.cluster_sync.sync())
        assert "shared.test" not in a.app.scheduler.suspended
        b.call(b.app.cluster_sync.sync())
        assert "shared.test" not in b.app.scheduler.suspended

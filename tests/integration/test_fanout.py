"""Fan-out: one Ferry delivers to 1,000 domains over many concurrent connections, and the
sinks measure that no domain ever sees more connections than its limit (how many
connections Ferry holds open at once is benchmarks/bench_fanout.py's figure).

Each domain has its own MX on its own loopback address (127.1.x.y) served by a counting
aiosmtpd sink that holds its reply to the final dot, so connections overlap.  Bounded:
4,000 messages, one run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, Recipient
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

DOMAINS = 1000
PER_DOMAIN = 4
LIMIT = 3  # up to 3,000 connections at once


def address(i: int) -> str:
    return f"127.1.{i // 200}.{i % 200 + 1}"


def zone() -> str:
    lines = ["$TTL 300", "@ IN SOA ns.test. admin.test. 1 60 60 600 60"]
    for i in range(DOMAINS):
        lines.append(f"d{i}.test. IN MX 10 mx.d{i}.test.")
        lines.append(f"mx.d{i}.test. IN A {address(i)}")
    return "\n".join(lines) + "\n"


def test_fanout_to_1000_domains_respects_per_domain_limits(tmp_path: Path) -> None:
    sink = CountingSink([address(i) for i in range(DOMAINS)], reply_delay=2.0)
    responder = DnsResponder(zone())
    ferry: RunningFerry | None = None
    try:
        responder.start()
        config = ferry_config(tmp_path / "spool")
        config = dataclasses.replace(config, delivery=dataclasses.replace(
            config.delivery, paused=False, dns=responder.address, mx_port=sink.port,
            max_per_domain=LIMIT, retry_interval=1.0))
        # Queued before Ferry starts (a restart with a full queue): every domain's mail is
        # due at once, so what is measured is the scheduler, not how fast the test enqueues.
        store = LmdbQueue(tmp_path / "spool" / "queue", durability="os", min_free_disk=0)
        body = b"Subject: fan-out\r\n\r\nhello\r\n"
        for n in range(PER_DOMAIN):
            for i in range(DOMAINS):
                env = Envelope("a@client.test", [Recipient(f"u{n}@d{i}.test", f"d{i}.test")])
                store.enqueue_sync(env, body)
        store.close_sync()
        ferry = RunningFerry(config)
        wait_for(lambda: len(sink.state.messages) >= DOMAINS * PER_DOMAIN, 240, "every message")
        state = sink.state
        assert len(state.messages) == DOMAINS * PER_DOMAIN
        assert max(state.peak.values()) <= LIMIT  # never more than the limit, anywhere
        assert sum(1 for i in range(DOMAINS) if state.peak[address(i)] == LIMIT) > DOMAINS // 2
        per_domain = {a: sum(1 for m in state.messages if m.address == a)
                      for a in (address(i) for i in range(DOMAINS))}
        assert set(per_domain.values()) == {PER_DOMAIN}
    finally:
        if ferry is not None:
            ferry.stop()
        responder.stop()
        sink.stop()

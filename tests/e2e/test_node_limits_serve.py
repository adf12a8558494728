"""``ferry serve --workers 2`` keeps a site's connection limit for the whole node, without
Redis: the supervisor's coordinator (engine.cluster.node) counts every worker's leases.

Real processes on 127.0.0.1: the supervisor and its two workers, clients submitting over
smtplib on new connections (so both workers queue mail for the one site), a loopback DNS
responder whose MX is a sink that holds each reply 0.2 s, so the workers' connections
overlap.  Each worker alone may open 3; the sink must never see more than 3 at once, and
must see 3.  Bounded: the clients stop after 60 acknowledged messages.
"""

from __future__ import annotations

from pathlib import Path

from engine.testing.dns import DnsResponder
from engine.testing.torture import (
    ACKED,
    DOMAIN,
    SINK_ADDRESS,
    Clients,
    Ledger,
    TortureFerry,
    TortureSink,
    free_port,
)
from engine.testing.wait import wait_for

LIMIT = 3


def test_two_workers_keep_the_site_limit(tmp_path: Path) -> None:
    sink = TortureSink([SINK_ADDRESS], reply_delay=0.2)
    responder = DnsResponder(f"$TTL 300\n{DOMAIN}. IN MX 10 mx.{DOMAIN}.\n"
                             f"mx.{DOMAIN}. IN A {SINK_ADDRESS}\n")
    ledger = Ledger()
    port = free_port()
    ferry = TortureFerry(tmp_path, port, responder.start(), sink.port, LIMIT,
                         extra=("--workers", "2"))
    clients = Clients(port, ledger, 6, 0.01, 23, 0.0)
    try:
        ferry.start()
        wait_for(lambda: len(ferry.workers()) == 2, what="two workers")
        clients.start()
        wait_for(lambda: len(ledger.by_outcome(ACKED)) >= 60, 60, "60 messages accepted")
        clients.stop()
        assert clients.errors == []
        acked = {s.token for s in ledger.by_outcome(ACKED)}
        wait_for(lambda: acked <= {d.token for d in sink.deliveries}, 60,
                 "every acknowledged message delivered")
        # Both workers had mail for the site, each may open 3 on its own: together they
        # never had more than 3 open, and did use all 3.
        assert sink.state.peak_total == LIMIT
        assert ferry.stop() == 0
        log = (tmp_path / "ferry.log").read_text()
        assert "coordinator" not in log  # never unreachable: no fall-back was logged
    finally:
        clients.stop()
        ferry.abandon()
        responder.stop()
        sink.stop()

"""``ferry queue``, ``ferry track`` and ``ferry reload`` against ``ferry serve --workers 2``:
real processes on 127.0.0.1 (the supervisor, its two workers, clients over smtplib on new
connections, a sink that defers every message so the mail stays queued), the node's
control channel served by the supervisor (engine.cluster.fanout), and the admin
API and /metrics answering for both workers."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from engine.cluster.shards import shard_spool
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
from tests.e2e.test_workers import _pair, _received


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=60)


def test_the_cli_sees_and_acts_on_both_workers_of_a_node(tmp_path: Path) -> None:
    sink = TortureSink([SINK_ADDRESS], reply_delay=0.0)
    sink.state.data_replies[SINK_ADDRESS] = "451 4.3.0 not now"  # the mail stays queued
    responder = DnsResponder(f"$TTL 300\n{DOMAIN}. IN MX 10 mx.{DOMAIN}.\n"
                             f"mx.{DOMAIN}. IN A {SINK_ADDRESS}\n")
    ledger = Ledger()
    port = free_port()
    http = free_port()
    node = TortureFerry(tmp_path, port, responder.start(), sink.port, 4,
                        extra=("--workers", "2", "--http", f"127.0.0.1:{http}"))
    clients = Clients(port, ledger, 6, 0.01, 23, 0.0)
    spool = tmp_path / "spool"
    try:
        node.start()
        wait_for(lambda: _pair(node.workers()), what="two workers")
        clients.start()
        wait_for(lambda: len(_received(shard_spool(spool, 0))) >= 3
                 and len(_received(shard_spool(spool, 1))) >= 3, 60,
                 "mail received by both workers")
        clients.stop()
        assert clients.errors == []
        acked = len(ledger.by_outcome(ACKED))
        wait_for(lambda: sum(len(_received(shard_spool(spool, i))) for i in (0, 1))
                 == acked, 30, "every RECEIVE record written")
        in_0, in_1 = (sorted(_received(shard_spool(spool, i))) for i in (0, 1))

        listed = ferry("queue", "--spool", str(spool), "list", "--limit", "0", "--json")
        assert listed.returncode == 0, listed.stderr
        ids = [orjson.loads(line)["id"] for line in listed.stdout.splitlines()]
        assert sorted(ids) == sorted(in_0 + in_1) and len(ids) == acked
        assert ids == sorted(ids)  # one queue: oldest first across the shards

        queues = ferry("queue", "--spool", str(spool), "queues", "--json")
        assert queues.returncode == 0 and queues.stderr == "", queues.stderr
        (row,) = [orjson.loads(line) for line in queues.stdout.splitlines()]
        assert (row["destination"], row["messages"]) == (DOMAIN, acked)

        held = ferry("queue", "--spool", str(spool), "hold", in_0[0], in_1[0])
        assert held.returncode == 0, held.stderr
        assert held.stdout.split() == ["held", in_0[0], "held", in_1[0]]
        shown = ferry("queue", "--spool", str(spool), "show", in_1[0])
        assert ": held," in shown.stdout

        suspended = ferry("queue", "--spool", str(spool), "suspend", DOMAIN)
        assert suspended.returncode == 0, suspended.stderr
        # Every recipient not held, in both shards (one recipient per message): the reply
        # counts those the command parked; a delivery that took its group meanwhile parks
        # its own when it sees the suspension, so the states say it, not the count.
        assert 0 < int(suspended.stdout.split()[2]) <= acked - 2

        def parked() -> int:
            listed = ferry("queue", "--spool", str(spool), "list", "--state", "suspended",
                           "--limit", "0", "--json")
            return len(listed.stdout.splitlines())

        wait_for(lambda: parked() == acked - 2, 30, "every recipient not held parked")
        assert ferry("queue", "--spool", str(spool), "suspended").stdout.split() == [DOMAIN]
        assert ferry("queue", "--spool", str(spool), "resume", DOMAIN).returncode == 0

        # The HTTP listener (whichever worker it reaches) answers for the node (loopback
        # is trusted by default).
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/v1/messages?limit=0",
                                    timeout=30) as answer:
            assert orjson.loads(answer.read())["total"] == acked
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics",
                                    timeout=30) as answer:
            families = list(text_string_to_metric_families(answer.read().decode()))
        received = {s.labels["worker"]: s.value for f in families
                    if f.name == "ferry_received_messages" for s in f.samples
                    if s.name.endswith("_total") and s.labels["outcome"] == "accepted"}
        assert received == {"0": len(in_0), "1": len(in_1)}

        reloaded = ferry("reload", "--spool", str(spool))
        assert reloaded.returncode == 0 and "reloaded" in reloaded.stdout, reloaded.stderr

        def holds() -> set[str] | None:
            out = ferry("track", "--spool", str(spool), "--event", "HOLD", "--json")
            found = {orjson.loads(line)["id"] for line in out.stdout.splitlines()}
            return found if len(found) == 2 else None

        assert wait_for(holds, 30, "both HOLD events") == {in_0[0], in_1[0]}
        assert node.stop() == 0

        # Stopped: the viewer reads every shard alone.
        stopped = ferry("queue", "--spool", str(spool), "queues", "--json")
        assert stopped.returncode == 0 and "no server runs" in stopped.stderr
        (row,) = [orjson.loads(line) for line in stopped.stdout.splitlines()]
        assert (row["destination"], row["messages"]) == (DOMAIN, acked)
        stats = orjson.loads(ferry("queue", "--spool", str(spool), "stats", "--json").stdout)
        assert stats["messages"] == acked and stats["states"]["held"] == 2
    finally:
        clients.stop()
        node.abandon()
        responder.stop()
        sink.stop()

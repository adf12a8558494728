"""``ferry serve --workers 2``: a node of two worker processes under a supervisor.

Real processes on 127.0.0.1: the supervisor and its workers, clients submitting over
smtplib on new connections, a loopback DNS responder whose MX is a sink that holds its
replies (so deliveries are in flight), as in the crash torture (``engine.testing.torture``).
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from collections import Counter
from pathlib import Path

from engine.cluster.shards import shard_spool
from engine.config import tracking_dir
from engine.ops.tracking import read_records
from engine.testing.dns import DnsResponder
from engine.testing.process import ROOT
from engine.testing.torture import (
    ACKED,
    DOMAIN,
    SINK_ADDRESS,
    Clients,
    Ledger,
    Submission,
    TortureFerry,
    TortureSink,
    free_port,
    whereabouts,
)
from engine.testing.wait import poll, wait_for


def _received(spool: Path) -> set[str]:
    """The queue ids of every RECEIVE record in the shard's tracking log (a line being
    written as it is read is left out, as ``ferry track`` leaves it out)."""
    return {r["id"] for r in read_records(tracking_dir(spool)) if r["event"] == "RECEIVE"}


def _undelivered(missing: list[Submission], spool: Path, log: Path) -> str:
    """Why acknowledged mail is still not delivered: where each such message is (still
    queued in a shard, and why it waits: late; or in no shard: delivered by Ferry's
    account, failed, or lost), what the shards' tracking logs say of the mail that did
    not go at once and of these messages, and the node's warnings.  The logs are read as
    ``ferry track`` reads them: a kill may leave half a line in one."""
    ids = [s.queue_id for s in missing]
    shown = set(ids[:10])
    events: Counter[tuple[str, str]] = Counter()
    theirs: list[str] = []
    for index in (0, 1):
        for record in read_records(tracking_dir(shard_spool(spool, index))):
            if record["event"] not in ("RECEIVE", "DELIVER"):
                events[f"w{index} {record['event']}", str(record.get("reason", ""))[:120]] += 1
            if record["id"] in shown:
                theirs.append(f"w{index} {record['time']} {record['id']} {record['event']}")
    places = whereabouts([shard_spool(spool, i) for i in (0, 1)], ids)
    where = Counter(place.split(":")[0] for place in places.values())
    warnings = [line for line in log.read_text(errors="replace").splitlines()
                if "WARNING" in line or "ERROR" in line][-30:]
    return (f"{len(missing)} acknowledged messages not delivered in 60 s; where they are: "
            f"{dict(where)}:\n" + "\n".join(f"  {i}: {places[i]}" for i in ids[:10])
            + "\ntheir tracking events:\n" + "\n".join(theirs)
            + f"\ntracking events of the mail that did not go at once: {dict(events)}; "
            "node warnings:\n" + "\n".join(warnings))


def _pair(pids: list[int]) -> list[int] | None:
    return pids if len(pids) == 2 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent has not waited yet).
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_two_workers_share_the_load_survive_a_kill_and_stop_together(tmp_path: Path) -> None:
    sink = TortureSink([SINK_ADDRESS], reply_delay=0.1)
    responder = DnsResponder(f"$TTL 300\n{DOMAIN}. IN MX 10 mx.{DOMAIN}.\n"
                             f"mx.{DOMAIN}. IN A {SINK_ADDRESS}\n")
    ledger = Ledger()
    port = free_port()
    ferry = TortureFerry(tmp_path, port, responder.start(), sink.port, 4,
                         extra=("--workers", "2"))
    clients = Clients(port, ledger, 6, 0.01, 17, 0.0)
    spool = tmp_path / "spool"
    try:
        ferry.start()
        first = wait_for(lambda: _pair(ferry.workers()), what="two workers")
        clients.start()
        # Connections land in both workers: each queues mail in its own shard.
        wait_for(lambda: len(_received(shard_spool(spool, 0))) >= 5
                 and len(_received(shard_spool(spool, 1))) >= 5, 60,
                 "mail received by both workers")
        # kill -9 of one worker under load: the node goes on serving, the supervisor
        # starts it again on its shard.
        os.kill(first[0], signal.SIGKILL)
        acked_at_kill = len(ledger.by_outcome(ACKED))
        again = wait_for(lambda: _pair(ferry.workers()) if first[0] not in ferry.workers()
                         else None, 60, "the worker started again")
        assert first[1] in again  # the other worker was never stopped
        wait_for(lambda: len(ledger.by_outcome(ACKED)) >= acked_at_kill + 30, 60,
                 "mail accepted after the kill")
        clients.stop()
        assert clients.errors == []
        acked = {s.token for s in ledger.by_outcome(ACKED)}
        # Every acknowledged message is delivered, the killed worker's shard's too.
        if poll(lambda: acked <= {d.token for d in sink.deliveries}, 60) is None:
            got = {d.token for d in sink.deliveries}
            raise AssertionError(_undelivered(
                [s for s in ledger.by_outcome(ACKED) if s.token not in got], spool,
                tmp_path / "ferry.log"))
        copies = Counter(d.token for d in sink.deliveries)
        assert set(copies) <= {s.token for s in ledger.entries.values()}
        # At most what the killed worker had in flight is sent twice: a message on each
        # of its 4 connections to the sink, and one prepared to follow on each.
        duplicates = sum(n - 1 for n in copies.values())
        print(f"delivered {len(copies)}, duplicates {duplicates}")
        assert duplicates <= 4 * 2
        # SIGHUP to the supervisor: every worker reloads the file.
        assert ferry.proc is not None
        ferry.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(f"[w{i}]: configuration reloaded: no change" in
                             (tmp_path / "ferry.log").read_text() for i in (0, 1)),
                 what="both workers reloaded")
        # A second serve on the same spool refuses, naming the lock.
        second = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--spool", str(spool), "--listen",
             f"127.0.0.1:{free_port()}", "--workers", "2"],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
            text=True, timeout=60)
        assert second.returncode == 1 and "is in use by another ferry serve" in second.stderr
        # SIGTERM stops every worker cleanly, then the supervisor.
        assert ferry.stop() == 0
        assert not any(_alive(pid) for pid in again)
        log = (tmp_path / "ferry.log").read_text()
        assert f"(pid {first[0]}) ended (signal SIGKILL)" in log
        assert "[w1]: stopped" in log and "node stopped" in log
    finally:
        clients.stop()
        ferry.abandon()
        responder.stop()
        sink.stop()


def test_a_shard_left_by_more_workers_is_delivered_by_a_worker_that_accepts_nothing(
        tmp_path: Path) -> None:
    """Mail queued by worker 1 of a two-worker node, which stops before it can deliver
    it, is delivered after a restart with one worker: the supervisor starts a worker for
    the shard that still holds mail, that worker takes no connection, and it ends once
    the shard is empty."""
    sink = TortureSink([SINK_ADDRESS], reply_delay=0.0)
    sink.state.data_replies[SINK_ADDRESS] = "451 4.3.0 not now"
    responder = DnsResponder(f"$TTL 300\n{DOMAIN}. IN MX 10 mx.{DOMAIN}.\n"
                             f"mx.{DOMAIN}. IN A {SINK_ADDRESS}\n")
    ledger = Ledger()
    port = free_port()
    dns = responder.start()
    spool = tmp_path / "spool"
    two = TortureFerry(tmp_path, port, dns, sink.port, 4, extra=("--workers", "2"))
    clients = Clients(port, ledger, 6, 0.01, 5, 0.0)
    one = TortureFerry(tmp_path, port, dns, sink.port, 4, extra=("--workers", "1"))
    try:
        two.start()
        wait_for(lambda: _pair(two.workers()), what="two workers")
        clients.start()
        wait_for(lambda: len(_received(shard_spool(spool, 1))) >= 3, 60,
                 "mail taken by worker 1")
        clients.stop()
        assert two.stop() == 0
        in_shard_1 = _received(shard_spool(spool, 1))
        sink.state.data_replies[SINK_ADDRESS] = ""
        one.start()
        acked = {s.token for s in ledger.by_outcome(ACKED)}
        wait_for(lambda: acked <= {d.token for d in sink.deliveries}, 60,
                 "every acknowledged message delivered, shard 1's too")
        log = (tmp_path / "ferry.log").read_text()
        assert "node of 1 workers" in log and "(and 1 delivering what their shards hold)" in log
        # Worker 1 accepted nothing in this run: its shard's RECEIVE records are the first
        # run's, while mail still arrives (through worker 0).
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.sendmail("s@client.test", [f"x@{DOMAIN}"], b"Subject: late\r\n\r\nx\r\n")
        assert _received(shard_spool(spool, 1)) == in_shard_1
        # Its shard empty, worker 1 ends by itself and is not started again.
        wait_for(lambda: "worker 1 delivered what its shard held and ended"
                 in (tmp_path / "ferry.log").read_text(), 30, "worker 1 ending")
        assert len(one.workers()) == 1
        assert one.stop() == 0
    finally:
        clients.stop()
        two.abandon()
        one.abandon()
        responder.stop()
        sink.stop()

"""``ferry queue hold / release / remove / retry`` and poison messages, against real
``ferry serve`` processes and real sinks on 127.0.0.1: a hold keeps a message from a sink
that accepts, release delivers it, a held message does not expire and its lifetime
counts from the release, remove with and without a report, retry before the retry time,
a message that makes DSN generation fail goes to POISON without stopping other mail, a
message in flight at two crashes in a row goes to POISON, and a hold during a delivery."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope as SinkEnvelope

from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, id_bytes, id_text
from engine.testing.dns import DnsResponder
from engine.testing.faults import DSN_FAULT
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.e2e.test_cli import free_port, stop, wait_for_port
from tests.e2e.test_queue_cli import ferry_queue

MX = "127.0.22.1"  # mx of dest.test: the mail under test
PROBE = "127.0.22.2"  # mx of probe.test (after_a_retry)
SENDER_MX = "127.0.22.3"  # mx of sender.test: where reports to the sender arrive
OTHER = "127.0.22.4"  # mx of other.test: other mail, flowing on
ZONE = (
    "$TTL 60\ndest.test. IN MX 10 mx.dest.test.\nmx.dest.test. IN A 127.0.22.1\n"
    "probe.test. IN MX 10 mx.probe.test.\nmx.probe.test. IN A 127.0.22.2\n"
    "sender.test. IN MX 10 mx.sender.test.\nmx.sender.test. IN A 127.0.22.3\n"
    "other.test. IN MX 10 mx.other.test.\nmx.other.test. IN A 127.0.22.4\n"
)
SENDER = "app@sender.test"
LATER = "451 4.3.0 try again later"

Serve = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    s = CountingSink([MX, PROBE, SENDER_MX, OTHER])
    yield s
    s.stop()


class Server:
    """Starts ``ferry serve`` processes on one spool; ``port`` is the last one's."""

    def __init__(self, tmp_path: Path, sink: CountingSink, dns: tuple[str, int]) -> None:
        self.tmp_path = tmp_path
        self.spool = tmp_path / "s"
        self.sink = sink
        self.dns = dns
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *flags: str, lifetime: float = 0.0,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.port = free_port()
        args = ["serve", "--listen", f"127.0.0.1:{self.port}", "--spool", str(self.spool),
                "--dns", f"{self.dns[0]}:{self.dns[1]}", "--mx-port", str(self.sink.port)]
        if lifetime:
            config = self.tmp_path / "ferry.toml"
            config.write_text(f"[delivery]\nmax_queue_lifetime = {lifetime}\n")
            args += ["--config", str(config)]
        if "--retry-interval" not in flags:
            args += ["--retry-interval", "1"]
        # Through the fault launcher: with no fault variable set it is plain ferry serve.
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.testing.faults", *args, *flags],
            cwd=self.tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), **(env or {})))
        self.procs.append(proc)
        wait_for_port(self.port, proc)
        return proc

    def send(self, *rcpts: str, subject: str = "verbs") -> None:
        with smtplib.SMTP("127.0.0.1", self.port) as client:
            client.sendmail(SENDER, list(rcpts),
                            f"Subject: {subject}\r\n\r\n{subject}\r\n".encode())

    def queue(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ferry_queue(self.spool, *args)

    def ids(self, state: str) -> list[str]:
        """The queue ids with a recipient in ``state``, read from the spool here (LMDB
        readers share it with the server; faster than a ``ferry queue list`` process)."""
        store = LmdbQueue(self.spool / "queue", min_free_disk=0)
        try:
            return [id_text(qid) for qid in store.ids_in_state(state, 100)]
        finally:
            store.close_sync()

    def envelope(self, qid: str) -> Envelope | None:
        """The record as the queue holds it now (None: gone)."""
        store = LmdbQueue(self.spool / "queue", min_free_disk=0)
        try:
            return store.get(id_bytes(qid))
        except KeyError:
            return None
        finally:
            store.close_sync()

    def one(self, state: str) -> str:
        def single() -> str | None:
            ids = self.ids(state)
            return ids[0] if len(ids) == 1 else None

        return wait_for(single, 30, f"one message {state}")


@pytest.fixture
def server(tmp_path: Path, sink: CountingSink) -> Iterator[Server]:
    with DnsResponder(ZONE) as responder:
        running = Server(tmp_path, sink, responder.address)
        yield running
        for proc in running.procs:
            if proc.poll() is None:
                stop(proc)


def to(address: str, sink: CountingSink) -> list[str]:
    """The recipients of the messages the sink took at ``address``."""
    return [r for m in sink.state.messages if m.address == address for r in m.recipients]


def reports(sink: CountingSink) -> list[bytes]:
    return [m.body for m in sink.state.messages if m.address == SENDER_MX]


def after_a_retry(server: Server) -> None:
    """Return once the server has retried a deferred message: a probe to probe.test,
    whose MX defers it, has had its second attempt.  By then the retry interval has passed
    and a retry has run: mail that was due would have gone out."""
    server.sink.state.data_replies[PROBE] = LATER
    server.send("p@probe.test", subject="probe")

    def retried() -> bool:
        for qid in server.ids("deferred"):
            env = server.envelope(qid)
            if env is not None and any(r.address == "p@probe.test" and r.attempts >= 2
                                       for r in env.recipients):
                return True
        return False

    wait_for(retried, 30, "the probe's second attempt")


def deferred_once(server: Server, *rcpts: str) -> str:
    """A message to dest.test, deferred by its MX: its queue id."""
    server.sink.state.data_replies[MX] = LATER
    server.send(*rcpts)
    qid = server.one("deferred")
    return qid


def test_hold_keeps_a_message_from_a_sink_that_accepts_and_release_delivers_it(
    server: Server, sink: CountingSink,
) -> None:
    server.start()
    qid = deferred_once(server, "x@dest.test")
    held = server.queue("hold", qid)
    assert held.returncode == 0, held.stderr
    assert held.stdout == f"held {qid}\n"
    assert server.ids("held") == [qid]
    listed = server.queue("list", "--state", "held").stdout.splitlines()[1:]
    assert [line.split()[0] for line in listed] == [qid] and "(1 held)" in listed[0]
    sink.state.data_replies[MX] = ""  # the sink accepts now
    after_a_retry(server)
    assert to(MX, sink) == []  # a retry ran; the held message stayed
    again = server.queue("hold", qid)
    assert again.returncode == 0 and "already held" in again.stderr

    released = server.queue("release", qid)
    assert released.returncode == 0, released.stderr
    assert released.stdout == f"released {qid}\n"
    wait_for(lambda: to(MX, sink) == ["x@dest.test"], 20, "the released message")
    wait_for(lambda: server.envelope(qid) is None, 20, "the message gone")
    missing = server.queue("release", qid)
    assert missing.returncode == 1 and f"no message {qid}" in missing.stderr
    bad = server.queue("hold", "nonsense")
    assert bad.returncode == 1 and "not a queue id" in bad.stderr


def test_a_held_message_does_not_expire_and_its_lifetime_counts_from_the_release(
    server: Server, sink: CountingSink,
) -> None:
    # Long enough for the hold (one `ferry queue` process, a second or two on a busy
    # machine) to come well before the expiry; the test waits out the lifetime twice.
    server.start(lifetime=8.0)
    qid = deferred_once(server, "x@dest.test")
    held = server.queue("hold", qid)
    assert held.returncode == 0 and held.stdout == f"held {qid}\n", held.stderr
    # A probe deferred at its MX too, queued after the hold: once it has expired (its
    # failure report reached the sender), the held message is past its own lifetime.
    sink.state.data_replies[PROBE] = LATER
    server.send("p@probe.test")
    wait_for(lambda: len(reports(sink)) == 1, 60, "the probe's expiry report")
    env = server.envelope(qid)
    assert env is not None and [r.state for r in env.recipients] == [RcptState.HELD]
    assert env.parked_since > 0

    assert server.queue("release", qid).returncode == 0
    env = server.envelope(qid)
    assert env is not None and env.parked > 0 and env.parked_since == 0
    attempts = env.recipients[0].attempts
    # Tried again at once; deferred, not failed as expired: its lifetime runs from here.
    wait_for(lambda: (e := server.envelope(qid)) is not None
             and e.recipients[0].attempts > attempts, 20, "a try after the release")
    env = server.envelope(qid)
    assert env is not None and env.recipients[0].state is RcptState.DEFERRED
    # And it does expire, the time it was held later.
    wait_for(lambda: len(reports(sink)) == 2, 60, "its expiry report")
    assert server.envelope(qid) is None
    assert b"x@dest.test" in reports(sink)[1]


def test_remove_without_a_report_sends_nothing(server: Server, sink: CountingSink) -> None:
    server.start()
    qid = deferred_once(server, "x@dest.test")
    removed = server.queue("remove", qid)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == f"removed {qid}\n"
    assert server.envelope(qid) is None
    sink.state.data_replies[MX] = ""
    after_a_retry(server)
    assert to(MX, sink) == [] and reports(sink) == []


def test_remove_with_a_report_sends_exactly_one(server: Server, sink: CountingSink) -> None:
    server.start()
    qid = deferred_once(server, "x@dest.test", "y@dest.test")
    server.send("z@dest.test")
    other = wait_for(lambda: [i for i in server.ids("deferred") if i != qid], 20)[0]
    refused = server.queue("remove", qid, other)
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    assert server.envelope(qid) is not None  # nothing was removed

    removed = server.queue("remove", "--report", qid)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {qid}" in removed.stdout and "non-delivery reports queued:" in (
        removed.stdout)
    wait_for(lambda: reports(sink), 20, "the report")
    after_a_retry(server)
    (report,) = reports(sink)
    assert b"removed by the operator" in report
    assert b"x@dest.test" in report and b"y@dest.test" in report
    assert to(SENDER_MX, sink) == [SENDER]
    assert server.envelope(qid) is None and server.envelope(other) is not None
    both = server.queue("remove", "--yes", qid, other)
    assert both.returncode == 1 and f"removed {other}" in both.stdout
    assert f"no message {qid}" in both.stderr


def test_retry_delivers_before_the_retry_time(server: Server, sink: CountingSink) -> None:
    server.start("--retry-interval", "3600")
    first = deferred_once(server, "x@dest.test")
    server.send("y@dest.test")
    second = wait_for(lambda: [i for i in server.ids("deferred") if i != first], 20)[0]
    sink.state.data_replies[MX] = ""
    retried = server.queue("retry", "--message", first)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == f"retried {first}\n"
    wait_for(lambda: to(MX, sink) == ["x@dest.test"], 20, "the retried message")
    assert server.envelope(second) is not None  # the other waits for its retry time
    by_destination = server.queue("retry", "DEST.test")
    assert by_destination.returncode == 0, by_destination.stderr
    assert by_destination.stdout == "retried dest.test: 1 recipients due now\n"
    wait_for(lambda: sorted(to(MX, sink)) == ["x@dest.test", "y@dest.test"], 20)
    neither = server.queue("retry")
    assert neither.returncode == 2 and "one of the two" in neither.stderr


def test_a_message_whose_report_cannot_be_made_goes_to_poison_and_mail_flows_on(
    server: Server, sink: CountingSink,
) -> None:
    sink.state.rcpt_replies["gone@dest.test"] = "550 5.1.1 no such user"
    proc = server.start(env={DSN_FAULT: SENDER})
    server.send("gone@dest.test", subject="poison")
    qid = server.one("poison")
    env = server.envelope(qid)
    assert env is not None and "test hook" in env.poisoned
    assert [r.state for r in env.recipients] == [RcptState.POISON]
    server.send("ok@dest.test", subject="other mail")
    wait_for(lambda: to(MX, sink) == ["ok@dest.test"], 20, "other mail delivered")
    after_a_retry(server)
    assert server.ids("poison") == [qid]  # left for the operator, not tried again
    listed = server.queue("list", "--state", "poison").stdout.splitlines()[1:]
    assert [line.split()[0] for line in listed] == [qid] and "(1 poison)" in listed[0]
    code, err = stop(proc)
    assert code == 0, err
    assert f"message {qid} moved to poison" in err and "Traceback" in err
    assert err.count("Traceback") == 1  # the traceback is logged once


def test_a_message_in_flight_at_two_crashes_in_a_row_goes_to_poison(
    server: Server, sink: CountingSink,
) -> None:
    taken: list[str] = []
    never = asyncio.Event()  # the sink never answers the final dot: surely in flight

    async def stall(envelope: SinkEnvelope) -> None:
        taken.extend(envelope.rcpt_tos)
        await never.wait()

    sink.hold = stall
    for crash in (1, 2):
        proc = server.start()
        if crash == 1:
            server.send("x@dest.test")
        wait_for(lambda n=crash: len(taken) == n,  # type: ignore[misc]
                 20, f"in flight before crash {crash}")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)  # and its pipes closed
    sink.hold = None
    proc = server.start()
    qid = server.one("poison")
    env = server.envelope(qid)
    assert env is not None and env.crashes == 2 and "crashes" in env.poisoned
    server.send("y@dest.test")  # mail flows on
    wait_for(lambda: to(MX, sink) == ["y@dest.test"], 20)
    assert server.queue("release", qid).returncode == 0
    wait_for(lambda: sorted(to(MX, sink)) == ["x@dest.test", "y@dest.test"], 20)
    code, err = stop(proc)
    assert code == 0, err
    assert not (server.spool / "inflight").exists()  # a clean stop leaves no journal


@pytest.mark.parametrize(("reply", "held"), [(LATER, True), ("", False)])
def test_a_hold_during_a_delivery(server: Server, sink: CountingSink, reply: str,
                                  held: bool) -> None:
    """Held while its delivery is on the wire: a deferral leaves it held (not tried
    again), a delivery stands (the message is gone)."""
    answer = asyncio.Event()
    taken: list[str] = []

    async def wait_for_the_test(envelope: SinkEnvelope) -> None:
        taken.extend(envelope.rcpt_tos)
        await answer.wait()

    sink.hold = wait_for_the_test
    sink.state.data_replies[MX] = reply
    server.start()
    server.send("x@dest.test")
    wait_for(lambda: taken, 20, "the delivery in flight")
    qid = server.one("pending")
    assert server.queue("hold", qid).returncode == 0
    sink.loop.call_soon_threadsafe(answer.set)
    if held:
        wait_for(lambda: (e := server.envelope(qid)) is not None
                 and e.recipients[0].attempts == 1, 20, "the deferral recorded")
        env = server.envelope(qid)
        assert env is not None and env.recipients[0].state is RcptState.HELD
        assert env.recipients[0].last_reply.startswith("451")
        sink.hold = None
        sink.state.data_replies[MX] = ""
        after_a_retry(server)
        assert to(MX, sink) == [] and server.ids("held") == [qid]
    else:
        wait_for(lambda: server.envelope(qid) is None, 20, "the delivered message gone")
        assert to(MX, sink) == ["x@dest.test"]


@pytest.mark.parametrize("reply", ["", "550 5.7.1 refused", LATER])
def test_a_removal_during_a_delivery(server: Server, sink: CountingSink, reply: str) -> None:
    """Removed while its delivery is on the wire: whatever the attempt's outcome, the
    message stays removed, no report is sent (none was asked for), and mail flows on."""
    answer = asyncio.Event()
    taken: list[str] = []

    async def wait_for_the_test(envelope: SinkEnvelope) -> None:
        taken.extend(envelope.rcpt_tos)
        await answer.wait()

    sink.hold = wait_for_the_test
    sink.state.data_replies[MX] = reply
    proc = server.start()
    server.send("x@dest.test")
    wait_for(lambda: taken, 20, "the delivery in flight")
    qid = server.one("pending")
    assert server.queue("remove", qid).returncode == 0
    sink.loop.call_soon_threadsafe(answer.set)
    server.send("y@other.test")
    wait_for(lambda: to(OTHER, sink) == ["y@other.test"], 20, "other mail")
    after_a_retry(server)
    assert server.envelope(qid) is None and reports(sink) == []
    assert to(MX, sink) == (["x@dest.test"] if not reply else [])
    code, err = stop(proc)
    assert code == 0, err
    assert "poison" not in err


def test_hold_release_and_remove_act_on_what_the_filters_match(
    server: Server, sink: CountingSink,
) -> None:
    server.start()
    sink.state.data_replies[MX] = LATER
    sink.state.data_replies[OTHER] = LATER
    server.send("a@dest.test", subject="one")
    server.send("b@dest.test", subject="two")
    server.send("c@other.test", subject="other")
    wait_for(lambda: len(server.ids("deferred")) == 3, 30, "three deferred messages")
    mine = sorted(qid for qid in server.ids("deferred")
                  if (env := server.envelope(qid)) is not None
                  and env.recipients[0].next_hop == "dest.test")
    (other,) = set(server.ids("deferred")) - set(mine)

    both = server.queue("hold", "x", "--destination", "dest.test")
    assert both.returncode == 1 and "not both" in both.stderr
    neither = server.queue("hold")
    assert neither.returncode == 1 and "give queue ids, or filters" in neither.stderr
    held = server.queue("hold", "--destination", "dest.test")
    assert held.returncode == 0, held.stderr
    assert sorted(held.stdout.split()[1::2]) == mine
    assert sorted(server.ids("held")) == mine  # other.test's message is left alone
    none = server.queue("hold", "--recipient", "nobody@nowhere.test")
    assert none.returncode == 0 and "no message matches" in none.stderr

    refused = server.queue("remove", "--state", "held")
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    released = server.queue("release", "--state", "held", "--recipient", "a@dest.test")
    assert released.returncode == 0 and released.stdout.split()[1:] == [mine[0]]
    removed = server.queue("remove", "--yes", "--destination", "dest.test")
    assert removed.returncode == 0, removed.stderr
    assert sorted(removed.stdout.split()[1::2]) == mine
    wait_for(lambda: all(server.envelope(q) is None for q in mine), 20, "both removed")
    assert server.envelope(other) is not None  # other.test's message stays

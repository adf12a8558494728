"""Crash torture of the whole ``ferry serve`` process: SIGKILL it under load, restart, check.

``run_torture(workdir, kills=N)`` starts, on loopback only, a ``DnsResponder`` whose MX
for ``torture.test`` points at a ``CountingSink`` address, and ``ferry serve`` as a child
process with its own spool, ``--dns`` at that responder (never the system resolver),
``--mx-port`` at the sink and ``--retry-interval 1``.  Client threads submit messages with
smtplib, each with a unique token in its Subject and body (some with a bare LF, which
Ferry must refuse), and write every outcome in a ``Ledger``: *acked* (250 with a queue
id), *rejected* (a 4xx/5xx reply) or *unknown* (the connection died before the reply).
The sink holds its reply to the final dot for ``reply_delay`` seconds, so deliveries are
in flight most of the time.  Ferry is killed with SIGKILL at random moments, alternately
while a client waits for its reply to the final dot (ingest) and while the sink holds a
reply (delivery), and restarted on the same spool; at the end clients stop, Ferry drains
and is stopped with SIGTERM.

Checks (each broken one is a line in ``TortureReport.violations``):

- restart to the 220 greeting within ``restart_limit`` seconds, every time (a timing
  target: the benchmark sets it; the test suite passes None and asserts no timing);
- after each kill, with Ferry dead, the spool holds every acknowledged message that the
  sink has not received, with the very body the client sent (after Ferry's Received
  field), holds no rejected message, and has no corrupt record;
- every acknowledged message reaches the sink, every copy with the client's body after
  Ferry's Received field (for unknown messages too: no copy is ever altered);
- no rejected message ever reaches the sink, nor anything the clients did not send;
- duplicates are bounded by what was in flight at each kill, exactly: a message is *in
  flight at kill k* when the sink received it on a connection that incarnation k opened
  and the spool, opened after the kill, still has it not final (Ferry had been given the
  250 or was about to be, but had not committed the outcome).  Only such a message may be
  delivered again, once per kill that found it so: for every message,
  ``copies <= 1 + number of kills at which it was in flight``.  Hence the duplicates
  after kill k are at most the number in flight at kill k, and the total is at most the
  sum.  (Messages whose reply the sink was still holding at the kill are reported as
  ``held``; aiosmtpd cancels the handler when the connection dies, so they are normally
  not received at all and simply delivered once after the restart.  The bound is
  therefore on *received but not committed*, which the spool says exactly, rather than on
  a count from the sink's side that cannot see Ferry's commit.)

Used by ``tests/e2e/test_crash_torture.py`` (a few kills) and ``benchmarks/crash_torture.py``
(many).  Never imported by the running server; it binds only 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import RcptState, RecordError, id_text
from engine.testing.dns import DnsResponder
from engine.testing.process import FerryProcess
from engine.testing.sink import CountingSink, _CountingSMTP, _Handler
from engine.testing.wait import poll

DOMAIN = "torture.test"
SINK_ADDRESS = "127.0.31.1"
SENDER = "sender@client.test"
TOKEN = re.compile(rb"Subject: torture ([0-9a-f]{32})\r\n")
QUEUED = re.compile(r"queued as ([0-9A-F]+)")

ACKED, REJECTED, UNKNOWN = "acked", "rejected", "unknown"
#: Every state a queued (not lost) message may be in: poisoned and held ones are kept too.
_NOT_FINAL = (RcptState.PENDING, RcptState.DEFERRED, RcptState.SUSPENDED, RcptState.HELD,
              RcptState.POISON)
#: The kills here are the test's, not the messages' fault: a message in flight at two of
#: them in a row must be delivered after the drain, not moved to the poison state (the
#: crash rule of ``delivery.poison_after`` has tests of its own).
_CONFIG = "[delivery]\npoison_after = 1000000\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_of(body: bytes) -> str | None:
    found = TOKEN.search(body)
    return found.group(1).decode() if found else None


def after_received(body: bytes) -> bytes | None:
    """The message after its first field when that is a Received field, else None.

    The field may be folded (continuation lines start with SP or HTAB, RFC 5322 §2.2.3).
    """
    if not body.startswith(b"Received: "):
        return None
    pos = body.find(b"\r\n")
    while pos >= 0 and body[pos + 2 : pos + 3] in (b" ", b"\t"):
        pos = body.find(b"\r\n", pos + 2)
    return None if pos < 0 else body[pos + 2 :]


# --- the client side ---------------------------------------------------------------------


@dataclass
class Submission:
    token: str
    body: bytes
    bad: bool  # carries a bare LF: Ferry must refuse it
    outcome: str = UNKNOWN
    queue_id: str = ""
    reply: str = ""


class Ledger:
    """Every message a client started to submit, with its client-side outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: dict[str, Submission] = {}

    def new(self, rnd: random.Random, bad: bool) -> Submission:
        token = rnd.randbytes(16).hex()
        lines = [
            f"Subject: torture {token}".encode(),
            b"From: <sender@client.test>",
            f"To: <rcpt@{DOMAIN}>".encode(),
            b"",
            f"token {token}".encode(),
            b".a line that starts with a dot (dot-stuffed on the wire)",
        ]
        lines += [
            rnd.randbytes(rnd.randint(10, 60)).hex().encode() for _ in range(rnd.randint(1, 40))
        ]
        if bad:
            lines.append(b"a bare\nline feed")  # SMTP smuggling class: refused with a 5xx
        sub = Submission(token, b"\r\n".join(lines) + b"\r\n", bad)
        with self._lock:
            self.entries[token] = sub
        return sub

    def by_outcome(self, outcome: str) -> list[Submission]:
        with self._lock:
            return [s for s in self.entries.values() if s.outcome == outcome]


class Clients:
    """``count`` threads submitting over smtplib until ``stop()``; errors are kept."""

    def __init__(
        self, port: int, ledger: Ledger, count: int, pace: float, seed: int, bad_share: float
    ) -> None:
        self.port = port
        self.ledger = ledger
        self.pace = pace
        self.bad_share = bad_share
        self.in_data = 0  # clients between sending DATA and reading the reply to the dot
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(random.Random(seed + i),),
                name=f"torture-client-{i}",
                daemon=True,
            )
            for i in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, rnd: random.Random) -> None:
        try:
            while not self._stop.is_set():
                # Ferry is down or went down: connect again.
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    self._session(rnd)
                self._stop.wait(0.05)
        except Exception as exc:  # kept for the report: a thread must not die silently
            self.errors.append(f"client thread: {exc!r}")

    def _session(self, rnd: random.Random) -> None:
        with smtplib.SMTP(
            "127.0.0.1", self.port, local_hostname="client.test", timeout=15
        ) as client:
            client.ehlo()
            for _ in range(rnd.randint(1, 20)):
                if self._stop.is_set():
                    return
                if not self._submit(client, self.ledger.new(rnd, rnd.random() < self.bad_share)):
                    return
                self._stop.wait(rnd.uniform(0, 2 * self.pace))

    def _submit(self, client: smtplib.SMTP, sub: Submission) -> bool:
        """One transaction; False when the connection is no longer usable."""
        try:
            code, text = client.mail(SENDER)
            if code != 250:
                sub.outcome, sub.reply = REJECTED, f"MAIL {code} {text!r}"
                client.rset()
                return True
            code, text = client.rcpt(f"rcpt@{DOMAIN}")
            if code not in (250, 251):
                sub.outcome, sub.reply = REJECTED, f"RCPT {code} {text!r}"
                client.rset()
                return True
            with self._lock:
                self.in_data += 1
            try:
                code, raw = client.data(sub.body)
            finally:
                with self._lock:
                    self.in_data -= 1
        except smtplib.SMTPDataError as exc:  # a 4xx/5xx to DATA or to the final dot
            sub.outcome, sub.reply = REJECTED, f"DATA {exc.smtp_code} {exc.smtp_error!r}"
            return exc.smtp_code not in (421,)
        except (OSError, smtplib.SMTPServerDisconnected):
            return False  # died before the reply: the outcome stays unknown
        reply = raw.decode("utf-8", "replace")
        found = QUEUED.search(reply)
        sub.reply = f"DOT {code} {reply}"
        if code == 250 and found:
            sub.outcome, sub.queue_id = ACKED, found.group(1)
        else:
            sub.outcome = REJECTED if code >= 400 else UNKNOWN
        return True


# --- the sink side -----------------------------------------------------------------------


@dataclass
class Delivery:
    token: str | None
    body: bytes
    opened: float  # monotonic time the sink's connection was made (tells the incarnation)
    at: float


class _TortureHandler(_Handler):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sink: TortureSink = self.sink  # type: ignore[assignment]
        sink.held += 1
        before = len(sink.state.messages)
        try:
            reply: str = await super().handle_DATA(server, session, envelope)
        finally:
            sink.held -= 1
        if len(sink.state.messages) > before:
            body = sink.state.messages[-1].body
            sink.deliveries.append(
                Delivery(token_of(body), body, server.torture_opened, time.monotonic())
            )
        return reply


class _TortureSMTP(_CountingSMTP):
    def __init__(self, sink: CountingSink, **kw: Any) -> None:
        # aiosmtpd binds the handler's hooks in its constructor, so the handler is given
        # there: _CountingSMTP's own constructor (which would give _Handler) is skipped.
        SMTP.__init__(self, _TortureHandler(sink), **kw)
        self._sink = sink
        self._local = "?"
        self.torture_opened = time.monotonic()


class TortureSink(CountingSink):
    """A ``CountingSink`` that also stamps each received message with its connection's
    opening time, and counts the replies it is holding."""

    def __init__(self, addresses: list[str], reply_delay: float) -> None:
        self.held = 0
        self.deliveries: list[Delivery] = []
        super().__init__(addresses, reply_delay=reply_delay)

    async def _start(self, port: int) -> int:
        for address in self.addresses:
            server = await self.loop.create_server(
                lambda: _TortureSMTP(
                    self,
                    enable_SMTPUTF8=self.smtputf8,
                    decode_data=False,
                    hostname="sink.test",
                    timeout=30,
                ),
                address,
                port,
                reuse_address=True,
                backlog=4096,
            )
            if not port:
                port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        return port

    def open_connections(self) -> int:
        return sum(self.state.open.values())


# --- the run -----------------------------------------------------------------------------


@dataclass
class Kill:
    index: int
    phase: str  # "ingest" (a client waited for its reply to the dot) or "delivery"
    uptime: float  # seconds from the greeting to the kill
    clients_in_data: int
    held: int  # replies the sink was holding at the kill
    sink_open: int  # sink connections open at the kill
    in_flight: int = 0  # received by the sink, not final in the spool (see module doc)
    duplicates: int = 0  # of those, delivered again later
    restart: float = 0.0  # seconds from the next start to its greeting
    at: float = 0.0  # monotonic time of the kill


@dataclass
class TortureReport:
    kills: list[Kill] = field(default_factory=list)
    acked: int = 0
    rejected: int = 0
    unknown: int = 0
    rejections: Counter[str] = field(default_factory=Counter)  # "DOT 554" → count
    delivered: int = 0  # distinct messages received by the sink
    deliveries: int = 0  # copies received by the sink
    duplicates: int = 0  # deliveries - delivered
    starts: list[float] = field(default_factory=list)  # seconds to greeting, each start
    leftover: int = 0  # messages still in the spool after the drain and SIGTERM
    exit_code: int | None = None
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def max_restart(self) -> float:
        return max(self.starts, default=0.0)

    def summary(self) -> str:
        phases = Counter(k.phase for k in self.kills)
        lines = [
            f"kills: {len(self.kills)} (ingest {phases['ingest']}, delivery "
            f"{phases['delivery']}); in flight at kills: {sum(k.in_flight for k in self.kills)}"
            f", held by the sink at kills: {sum(k.held for k in self.kills)}",
            f"messages: acknowledged {self.acked}, rejected {self.rejected} "
            f"({dict(self.rejections)}), unknown {self.unknown}",
            f"sink: delivered {self.delivered} distinct, {self.deliveries} copies, "
            f"duplicates {self.duplicates} (max per kill "
            f"{max((k.duplicates for k in self.kills), default=0)})",
            f"restart to greeting: max {self.max_restart:.2f} s over {len(self.starts)} starts;"
            f" exit after SIGTERM {self.exit_code}; left in spool {self.leftover}; "
            f"{self.seconds:.1f} s",
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  {v}" for v in self.violations[:30]]
        return "\n".join(lines)


class TortureFerry(FerryProcess):
    """The ``ferry serve`` under torture: the configuration and flags of the run."""

    def __init__(
        self, workdir: Path, port: int, dns: tuple[str, int], sink_port: int, max_per_domain: int,
        extra: tuple[str, ...] = (),
    ) -> None:
        config = workdir / "ferry.toml"
        config.write_text(_CONFIG, encoding="utf-8")
        super().__init__(workdir, port, [
            "--config", str(config),
            "--listen", f"127.0.0.1:{port}",
            "--spool", str(workdir / "spool"),
            "--hostname", "ferry.torture.test",
            "--dns", f"{dns[0]}:{dns[1]}",
            "--mx-port", str(sink_port),
            "--retry-interval", "1",
            "--max-per-domain", str(max_per_domain),
            *extra,
        ])  # fmt: skip


@dataclass
class _SpoolView:
    not_final: dict[str, bytes]  # token → stored body, messages not final
    by_qid: dict[str, str]  # queue id text → token
    count: int


def _read_spool(spool: Path, violations: list[str], label: str) -> _SpoolView:
    store = LmdbQueue(spool / "queue", min_free_disk=0)
    try:
        ids: set[bytes] = set()
        for state in _NOT_FINAL:
            ids.update(store.ids_in_state(state.value, 1_000_000))
        view = _SpoolView({}, {}, store.count())
        for qid in ids:
            env = store.get(qid)
            body = store.body(qid)
            token = token_of(body)
            if token is None:
                violations.append(f"{label}: spool message {id_text(qid)} has no token")
                continue
            if any(r.state in _NOT_FINAL for r in env.recipients):
                view.not_final[token] = body
                view.by_qid[id_text(qid)] = token
        corrupt = store.scan_corrupt() + store.corrupt()
        if corrupt:
            violations.append(f"{label}: corrupt records {corrupt[:3]}")
        return view
    finally:
        store.close_sync()


def whereabouts(spools: list[Path], queue_ids: list[str]) -> dict[str, str]:
    """Where each message (queue id text) is now, for a failure's report: for one still
    queued in a shard (``spools``: each shard's spool), that shard and the state, retry
    time, attempts and crash count of each recipient (late); "in no shard" otherwise
    (delivered, failed or lost: the tracking log says which).  Reads the queue databases
    while the server runs (LMDB readers never block its writer)."""
    found = dict.fromkeys(queue_ids, "in no shard")
    now = time.time()
    for index, spool in enumerate(spools):
        if not (spool / "queue").is_dir():
            continue
        store = LmdbQueue(spool / "queue", min_free_disk=0)
        try:
            for text in queue_ids:
                try:
                    env = store.get(bytes.fromhex(text))
                except (KeyError, ValueError):
                    continue
                except RecordError as exc:
                    found[text] = f"shard {index}: corrupt ({exc})"
                    continue
                found[text] = f"shard {index}: crashes {env.crashes}, faults {env.faults}; " + (
                    "; ".join(f"{r.state.value} due {r.due - now:+.1f} s, attempts "
                              f"{r.attempts}, last reply {r.last_reply[:60]!r}"
                              for r in env.recipients))
        finally:
            store.close_sync()
    return found


def run_torture(
    workdir: Path,
    *,
    kills: int = 10,
    seed: int | None = None,
    clients: int = 3,
    pace: float = 0.04,
    reply_delay: float = 0.15,
    max_per_domain: int = 8,
    uptime: tuple[float, float] = (0.3, 1.5),
    bad_share: float = 0.05,
    drain_timeout: float = 60.0,
    restart_limit: float | None = 10.0,
    progress: Callable[[str], None] | None = None,
) -> TortureReport:
    """Kill ``ferry serve`` ``kills`` times under load and check it (see the module doc).

    ``uptime``: the range of seconds each incarnation runs after its greeting before the
    kill is armed; the kill then waits (at most 3 s) for its phase: a client waiting for
    its reply to the dot ("ingest", even kills) or the sink holding a reply ("delivery",
    odd kills).  Returns the report; nothing raises for a broken promise.
    """
    seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
    rnd = random.Random(seed)
    say = progress or (lambda text: None)
    say(f"seed {seed}")
    began = time.monotonic()
    report = TortureReport()
    violations = report.violations
    ledger = Ledger()
    sink = TortureSink([SINK_ADDRESS], reply_delay=reply_delay)
    zone = f"$TTL 300\n{DOMAIN}. IN MX 10 mx.{DOMAIN}.\nmx.{DOMAIN}. IN A {SINK_ADDRESS}\n"
    responder = DnsResponder(zone)
    ferry: TortureFerry | None = None
    workers: Clients | None = None
    # Incarnation i (0-based) is the Ferry started at starts_at[i]; a sink connection
    # belongs to the last incarnation started before it was opened.
    starts_at: list[float] = []
    licences: Counter[str] = Counter()  # token → kills at which it was in flight
    in_flight_sets: list[set[str]] = []
    try:
        dns = responder.start()
        port = free_port()
        ferry = TortureFerry(workdir, port, dns, sink.port, max_per_domain)
        workers = Clients(port, ledger, clients, pace, rnd.randrange(1 << 30), bad_share)

        def start() -> None:
            assert ferry is not None
            starts_at.append(time.monotonic())
            seconds = ferry.start()
            report.starts.append(seconds)
            if restart_limit is not None and seconds > restart_limit:
                violations.append(
                    f"start {len(report.starts)}: greeting after "
                    f"{seconds:.2f} s (limit {restart_limit} s)"
                )

        start()
        workers.start()
        for index in range(kills):
            phase = "ingest" if index % 2 == 0 else "delivery"
            time.sleep(rnd.uniform(*uptime))
            if phase == "ingest":
                poll(lambda: workers is not None and workers.in_data > 0, 3, 0.001)
            else:
                poll(lambda: sink.held > 0, 3, 0.001)
                # A random moment inside the hold, not always its first millisecond (a
                # client's wait for its 250 is a few milliseconds: no such delay there).
                time.sleep(rnd.uniform(0, reply_delay / 2))
            kill = Kill(
                index + 1,
                phase,
                time.monotonic() - ferry.greeted,
                workers.in_data,
                sink.held,
                sink.open_connections(),
                at=time.monotonic(),
            )
            ferry.kill()
            report.kills.append(kill)
            # Every connection of the dead process is gone before the sink is read.
            if not poll(lambda: sink.open_connections() == 0, 10):
                violations.append(f"kill {kill.index}: sink connections stayed open")
            delivered = list(sink.deliveries)
            view = _read_spool(workdir / "spool", violations, f"kill {kill.index}")
            this = starts_at[-1]
            received_now = {d.token for d in delivered if d.token and d.opened >= this}
            in_flight = received_now & view.not_final.keys()
            kill.in_flight = len(in_flight)
            in_flight_sets.append(in_flight)
            licences.update(in_flight)
            _check_spool(ledger, delivered, view, violations, f"kill {kill.index}")
            if index == kills - 1:
                workers.stop()  # the last incarnation drains what is left
            start()
            kill.restart = report.starts[-1]
            say(
                f"kill {kill.index:3d} ({phase:8s}) up {kill.uptime:5.2f} s, in DATA "
                f"{kill.clients_in_data}, held {kill.held}, sink conns {kill.sink_open}, in "
                f"flight {kill.in_flight}; restart {kill.restart:.2f} s"
            )
        if kills == 0:
            time.sleep(rnd.uniform(*uptime))
            workers.stop()
        report.violations += workers.errors

        acked = ledger.by_outcome(ACKED)

        def drained() -> bool:
            got = {d.token for d in sink.deliveries}
            return all(s.token in got for s in acked)

        if not poll(drained, drain_timeout, 0.05):
            violations.append(f"not drained within {drain_timeout} s")
        # Quiet for a moment: late copies (duplicates) would arrive now.
        seen = -1
        while seen != len(sink.deliveries):
            seen = len(sink.deliveries)
            time.sleep(1.0)
        report.exit_code = ferry.stop()
        if report.exit_code != 0:
            violations.append(f"exit code {report.exit_code} after SIGTERM")
        view = _read_spool(workdir / "spool", violations, "end")
        report.leftover = len(view.not_final)
        check_deliveries(report, ledger, list(sink.deliveries), licences, in_flight_sets)
    finally:
        if workers is not None:
            workers.stop()
        if ferry is not None:
            ferry.abandon()
        responder.stop()
        sink.stop()
    report.seconds = time.monotonic() - began
    return report


def _check_spool(
    ledger: Ledger, delivered: list[Delivery], view: _SpoolView, violations: list[str], label: str
) -> None:
    """With Ferry dead: every acknowledged message not yet received is in the spool, with
    the client's body; no rejected message is."""
    got = {d.token for d in delivered}
    for sub in ledger.by_outcome(ACKED):
        if sub.token in got:
            continue
        stored = view.not_final.get(sub.token)
        if stored is None:
            violations.append(
                f"{label}: acknowledged {sub.queue_id} neither delivered nor in the spool"
            )
        elif view.by_qid.get(sub.queue_id) != sub.token:
            violations.append(f"{label}: acknowledged {sub.queue_id} stored under another id")
        elif after_received(stored) != sub.body:
            violations.append(f"{label}: acknowledged {sub.queue_id} stored with another body")
    for sub in ledger.by_outcome(REJECTED):
        if sub.token in view.not_final:
            violations.append(f"{label}: rejected {sub.token} ({sub.reply}) is in the spool")


def check_deliveries(
    report: TortureReport,
    ledger: Ledger,
    deliveries: list[Delivery],
    licences: Counter[str],
    in_flight_sets: list[set[str]],
) -> None:
    """Fill ``report``'s counts from the ledger and the sink's copies, and add a violation
    for each broken promise: an acknowledged message never delivered, any copy whose body
    after the Received field is not the client's, a rejected or unknown-to-the-clients
    message delivered, a bare-LF message acknowledged, and a message with more copies
    than ``1 + licences[token]`` (``licences``: the kills at which it was in flight)."""
    violations = report.violations
    report.acked = len(ledger.by_outcome(ACKED))
    report.rejected = len(ledger.by_outcome(REJECTED))
    report.unknown = len(ledger.by_outcome(UNKNOWN))
    report.rejections = Counter(" ".join(s.reply.split()[:2]) for s in ledger.by_outcome(REJECTED))
    copies: Counter[str] = Counter()
    for d in deliveries:
        if d.token is None or d.token not in ledger.entries:
            violations.append(f"the sink got a message no client sent: {d.body[:80]!r}")
            continue
        copies[d.token] += 1
        sub = ledger.entries[d.token]
        if after_received(d.body) != sub.body:
            violations.append(f"{sub.token} ({sub.outcome}) delivered with another body")
    report.delivered = len(copies)
    report.deliveries = sum(copies.values())
    report.duplicates = report.deliveries - report.delivered
    for sub in ledger.by_outcome(ACKED):
        if not copies[sub.token]:
            violations.append(f"acknowledged {sub.queue_id} never delivered")
    for sub in ledger.by_outcome(REJECTED):
        if copies[sub.token]:
            violations.append(f"rejected {sub.token} ({sub.reply}) delivered")
    for sub in ledger.entries.values():
        if sub.bad and sub.outcome == ACKED:
            violations.append(f"{sub.queue_id}: a bare LF message was acknowledged")
    for token, n in copies.items():
        if n > 1 + licences[token]:
            violations.append(
                f"{token} delivered {n} times; in flight at only {licences[token]} kills"
            )
    # Per kill: how many of its in-flight messages were delivered again afterwards
    # (at most its in-flight count, by construction; the bound above is what is checked).
    for kill, in_flight in zip(report.kills, in_flight_sets, strict=True):
        again = {d.token for d in deliveries if d.opened > kill.at}
        kill.duplicates = len(in_flight & again)

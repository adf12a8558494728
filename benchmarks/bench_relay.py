"""Relay end to end: smtp-source → server → smtp-sink, Ferry against Postfix and the ceiling.

Run (as root: Postfix runs as a private instance): ``.venv/bin/python
benchmarks/bench_relay.py [--quick] [--dir DIR]`` (about 2.5 minutes with the defaults;
``--quick`` about one).

Set-up, everything on 127.0.0.1, every process started here stopped by its PID:

- the sink: Postfix's ``smtp-sink`` (C, one process, ``-c`` counters), a fresh one per
  cell, so its ``mesg=`` counter is the number of messages that reached it;
- ``ferry serve``: default durability (``fsync``: the 250 comes after the commit),
  delivery on, ``--smarthost 127.0.0.1:SINK`` and ``--max-per-domain 20`` (the default),
  and ``--dns`` pointing at a ``DnsResponder`` (engine.testing.dns) on loopback with an
  empty zone, so Ferry never asks the system resolver even if something looked a name up;
- Postfix 3.7 (``engine.testing.postfix.PostfixInstance``: own configuration and queue,
  no DNS, loopback literal next hops only), queue files fsynced before the 250 (stock),
  ``relayhost = [127.0.0.1]:SINK``, the connection cache on demand (stock), destination
  concurrency 20 (Ferry's ``max_per_domain``), process limit 200 and no per-client
  connection limit so 100 smtpd sessions run at once;
- ``direct``: smtp-source straight into the sink, the ceiling of the load tools.

Cells: 1 KiB, 20 KiB and 100 KiB messages (``smtp-source -l``), 100 parallel sessions
(``-s``), one message per connection, and with ``-d`` many per connection (messages / 100
each: 100 at 1 and 20 KiB in the full run).  Measured per cell: injection (smtp-source's
wall time) and end to end (from smtp-source's start until the sink has counted every
message) in messages/s; the server's CPU seconds per message (utime + stime of its process
tree from /proc, reaped children included, read once it has gone quiet); peak memory:
for Ferry (one process) its VmHWM, the kernel's peak RSS; for Postfix (master, ~100 smtpd,
cleanup, qmgr, 20 smtp ...) the peak of the tree's summed PSS sampled every 0.5 s (PSS
shares each shared page among its processes; summed RSS would count libc ~150 times).
For ``direct`` the columns describe smtp-sink.  ``idle`` and ``steal`` are the machine's
shares of idle time and of time the VM's host took (``/proc/stat``) from smtp-source's
start until the sink had every message: a rate measured on a busy machine, or in a host's
slow phase, can be told from one measured on a quiet one.

Targets (issue 6): Ferry end to end ≥ 2x Postfix for 1 KiB and 20 KiB, ≥ 1x for 100 KiB.
Every load is bounded by a message count and a timeout.

``--logs`` (issue 12) runs each cell twice with Ferry only: issue 12's logs off
(``ferry-off``) and on (``ferry-logs``: the message tracking log and both protocol logs,
the smarthost's being ``[delivery] protocol_log``; :data:`LOGS_ON`), and prints logs-on /
logs-off end to end; the target is ≥ 0.90 in every cell.  The mail log (issue 13, its own
``--maillog`` below) stays at its default, on, in both: issue 12 measures the logs it
added.  No Postfix there, so it needs no root.  ``--scale K`` runs K times the messages
in the one-per-connection cells (1,000 to 2,000 by default: a second or two of load, in
which a VM's noise and the first messages' one-time costs weigh much).  The plain run uses
Ferry's default configuration (the tracking log is on by default).

``--dkim rsa`` / ``--dkim ed25519`` (issue 15) does the same with every message signed
(a ``[[dkim_sign]]`` key for smtp-source's From: domain, RSA-2048 or Ed25519) against
unsigned; the targets: signed keeps ≥ 0.70 of unsigned with RSA, ≥ 0.90 with Ed25519.
Each cell's verdict also prints the ``ceiling``: the best ratio this machine allows any
signer, given the unsigned runs' rate and busy share and the CPU a message that signing
cannot avoid (the ``floor``: the public-key signature and SHA-256 over the body, timed in
this process) — on a machine whose cores the unsigned relay and its peers already keep
busy, that work has no idle core to go to (:func:`ceiling`).

``--maillog`` (issue 13) does the same with the mail log off (``[log] level =
"warning"``, ``ferry-quiet``) and on (``"info"``: one line per received and per delivered
message, engine.ops.maillog, written to the log file, ``ferry-maillog``); same target.
Both modes print the server's CPU per message on/off too: on a shared machine it varies
less than the rate.

``--verify`` (issue 15) runs each cell twice with Ferry only: a connector that verifies
nothing (``ferry-noverify``) and one with ``verify = ["spf", "dkim", "dmarc"]``
(``ferry-verify``); both let no loopback client relay (so the verify agent runs: it skips
clients that may relay) and accept the recipient's domain.  smtp-source sends a message
file (``-F``) of the cell's size, DKIM-signed (RSA-2048, relaxed/relaxed) by dkimpy for the
sender's domain, whose SPF, DMARC (p=reject) and DKIM key records the DNS responder serves:
DMARC passes through both SPF and DKIM, and the answers are cached after the first message.
The target is verify-on ≥ 0.70 of verify-off end to end in every cell.

``--workers N`` (issue 17) adds ``ferry-wN``, Ferry with ``[server] workers = N`` (a
supervisor, N workers on their queue shards, each with its writer process), to the plain
run's kinds and prints N workers / one worker and N workers / Postfix per cell, with
each one's CPU per message (the whole process tree's); with ``--rounds`` the kinds
alternate and the medians are compared.  ``--size 1024`` runs only the cells of that
message size.  Targets (2 workers on the 2-core machine, 1 KiB): ≥ 1.4x one worker and
≥ 3.5x Postfix end to end.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autogroup import autogroup_off
from bench_inbound import (
    FERRY,
    ROOT,
    SMTP_SOURCE,
    machine_share,
    machine_times,
    settle_cpu,
    tree_cpu,
    wait_listening,
)

from engine.testing.dns import DnsResponder
from engine.testing.postfix import PostfixInstance, free_port

SMTP_SINK = "/usr/sbin/smtp-sink"
SESSIONS = 100
MAX_PER_DOMAIN = 20
SENDER = "a@client.test"
RECIPIENT = "b@example.net"
TARGETS = {1024: 2.0, 20 * 1024: 2.0, 100 * 1024: 1.0}
KINDS = ("ferry", "postfix", "direct")
#: --logs: Ferry with issue 12's logs off, then on; logs-on must keep this share of logs-off.
LOG_TARGET = 0.90
#: The configuration of each Ferry kind (the flags add listen, spool, smarthost, DNS).
#: LOGS_ON is the one place that says "issue 12's logs on": the tracking log and both
#: protocol logs (the smarthost's is [delivery] protocol_log).  The mail log keeps its
#: default level (info: on) in both, as an operator runs it.
LOGS_OFF = """\
[queue]
durability = "fsync"

[tracking]
enabled = false

[delivery]
protocol_log = false

[[receive]]
name = "default"
protocol_log = false
"""
LOGS_ON = """\
[queue]
durability = "fsync"

[tracking]
enabled = true

[delivery]
protocol_log = true

[[receive]]
name = "default"
protocol_log = true
"""
FERRY_CONFIGS = {"ferry": '[queue]\ndurability = "fsync"\n', "ferry-off": LOGS_OFF,
                 "ferry-logs": LOGS_ON,
                 "ferry-quiet": '[queue]\ndurability = "fsync"\n[log]\nlevel = "warning"\n',
                 "ferry-maillog": '[queue]\ndurability = "fsync"\n[log]\nlevel = "info"\n'}
#: --verify: both connectors refuse to let loopback relay and accept the recipient's domain;
#: the second verifies SPF, DKIM and DMARC.
_NO_RELAY = f"""\
accepted_domains = ["{RECIPIENT.partition("@")[2]}"]

[queue]
durability = "fsync"

[[receive]]
name = "default"
relay_networks = ["192.0.2.0/24"]
"""
FERRY_CONFIGS["ferry-noverify"] = _NO_RELAY
FERRY_CONFIGS["ferry-verify"] = _NO_RELAY + 'verify = ["spf", "dkim", "dmarc"]\n'
#: --verify: verify-on must keep this share of verify-off (issue 15).
VERIFY_TARGET = 0.70
#: --dkim (issue 15): outbound mail (From: smtp-source's sender) signed by a
#: [[dkim_sign]] key written beside the configuration; the unsigned run is the baseline.
DKIM_SIGN = ('[[dkim_sign]]\ndomain = "{domain}"\nselector = "bench"\n'
             'key_file = "dkim.pem"\n').format(domain=SENDER.rpartition("@")[2])
FERRY_CONFIGS.update({"ferry-unsigned": '[queue]\ndurability = "fsync"\n',
                      "ferry-rsa": '[queue]\ndurability = "fsync"\n' + DKIM_SIGN,
                      "ferry-ed25519": '[queue]\ndurability = "fsync"\n' + DKIM_SIGN})
#: The key each signing kind writes to dkim.pem.
DKIM_KEYS = {"ferry-rsa": False, "ferry-ed25519": True}
#: The comparisons that sign (their verdicts print the machine's ceiling, :func:`ceiling`).
DKIM_MODES = ("rsa", "ed25519")
#: The pairs a comparison mode runs: (off, on).
COMPARISONS = {"logs": ("ferry-off", "ferry-logs"), "maillog": ("ferry-quiet", "ferry-maillog"),
               "verify": ("ferry-noverify", "ferry-verify"),
               "rsa": ("ferry-unsigned", "ferry-rsa"),
               "ed25519": ("ferry-unsigned", "ferry-ed25519")}
#: The share of the "off" run's end-to-end rate the "on" run must keep, per comparison.
TARGETS_ON_OFF = {"logs": LOG_TARGET, "maillog": LOG_TARGET, "verify": VERIFY_TARGET,
                  "rsa": 0.70, "ed25519": 0.90}
#: The installed console script, or this tree's package (PYTHONPATH) when there is none.
FERRY_ARGV = [str(FERRY)] if FERRY.exists() else [sys.executable, "-m", "engine"]
EMPTY_ZONE = "$ORIGIN bench.invalid.\n@ 60 IN SOA ns hostmaster 1 60 60 60 60\n"


# --- processes -------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = Path(f"/proc/{entry.name}/stat").read_text()
                parents[int(entry.name)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    kids: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them, so
    the sum over a tree of forked processes is not inflated by shared libraries."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Peak of the summed PSS of a process tree, sampled in a thread."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval, self.peak_kib = root, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = sum(pss_kib(pid) for pid in tree_pids(self.root))
        self.peak_kib = max(self.peak_kib, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()


_children: list[subprocess.Popen[bytes]] = []


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to our own child, by its PID; SIGKILL if it lingers."""
    if proc in _children:
        _children.remove(proc)
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _stop_children() -> None:
    for proc in list(_children):
        with contextlib.suppress(Exception):
            stop(proc)


class Sink:
    """One smtp-sink on 127.0.0.1 counting the messages it receives (``-c``)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.out = workdir / "sink.out"
        self.proc = spawn(
            [SMTP_SINK, "-c", "-u", "root", "-m", "1024", f"127.0.0.1:{self.port}", "1024"],
            self.out,
        )
        wait_listening(self.port, 10)

    def count(self) -> int:
        try:
            found = re.findall(rb"mesg=(\d+)", self.out.read_bytes()[-4096:])
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return True
            time.sleep(0.02)
        return self.count() >= n

    def stop(self) -> None:
        stop(self.proc)


# --- one cell --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    size: int
    per_conn: bool
    messages: int

    @property
    def name(self) -> str:
        conn = f"{self.messages // SESSIONS}/conn" if self.per_conn else "1/conn"
        return f"{self.size >> 10} KiB {conn}"


@dataclass
class Result:
    kind: str
    cell: Cell
    inject: float = 0.0
    e2e: float = 0.0
    cpu: float = 0.0
    #: Of ``cpu``, the queue writer processes' (Ferry; --workers prints it).
    writer_cpu: float = 0.0
    rss_kib: int = 0
    received: int = 0
    #: The machine's idle and steal shares from smtp-source's start until the sink had
    #: every message (:func:`bench_inbound.machine_share`): a run on a busy machine, or
    #: in a phase where the VM's host took our vCPUs, shows here.
    idle: float = 0.0
    steal: float = 0.0
    error: str = ""

    def rate(self, wall: float) -> float:
        return self.cell.messages / wall if wall and not self.error else 0.0


def writer_cpu(root: int) -> float:
    """CPU seconds of the queue writer processes under ``root`` (live ones)."""
    total = 0.0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            if b"writer_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def node_kind(kind: str) -> int:
    """The workers of a ``ferry-wN`` kind (--workers); 1 for any other Ferry."""
    return int(kind[len("ferry-w"):]) if kind.startswith("ferry-w") else 1


def wait_workers(log: Path, timeout: float = 60) -> None:
    """Until the supervisor says every worker serves (the port greets with the first)."""
    deadline = time.monotonic() + timeout
    while "workers serve" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not all start in {timeout:.0f} s")
        time.sleep(0.05)


def start_server(
    kind: str, workdir: Path, sink: Sink, dns: DnsResponder
) -> tuple[int, int, PostfixInstance | subprocess.Popen[bytes] | None]:
    """(port, pid of the tree's root, handle) of a fresh server relaying to ``sink``."""
    if kind == "direct":
        return sink.port, sink.proc.pid, None
    if kind in FERRY_CONFIGS:
        port = free_port()
        config = workdir / "ferry.toml"
        config.write_text(FERRY_CONFIGS[kind])
        if kind in DKIM_KEYS:
            from engine.message.dkim import generate_key, private_pem

            (workdir / "dkim.pem").write_bytes(private_pem(generate_key(DKIM_KEYS[kind])))
        proc = spawn(
            [
                *FERRY_ARGV,
                "serve",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--spool",
                str(workdir / "spool"),
                "--hostname",
                "ferry.bench.test",
                "--smarthost",
                f"127.0.0.1:{sink.port}",
                "--dns",
                f"{dns.host}:{dns.port}",
                "--max-per-domain",
                str(MAX_PER_DOMAIN),
            ],
            workdir / "ferry.log",
        )
        wait_listening(port)
        if node_kind(kind) > 1:
            wait_workers(workdir / "ferry.log")
        return port, proc.pid, proc
    pf = PostfixInstance(
        workdir / "postfix",
        {
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "default_destination_concurrency_limit": str(MAX_PER_DOMAIN),
            "smtp_destination_concurrency_limit": str(MAX_PER_DOMAIN),
            "default_process_limit": "200",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
        },
        hostname="postfix.bench.test",
    )
    pf.start()
    return pf.port, pf.pid, pf


class SignedMail:
    """--verify: a DKIM key for the sender's domain, the zone that publishes it with SPF
    and DMARC records, and signed message files of each cell's size."""

    def __init__(self) -> None:
        import base64
        import importlib
        import textwrap

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self._dkim = importlib.import_module("dkim")  # dkimpy, no type information
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._pem = key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        public = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        record = " ".join(f'"{part}"' for part in textwrap.wrap(
            f"v=DKIM1; k=rsa; p={public.decode()}", 200))
        self.domain = SENDER.partition("@")[2]
        self.zone = (f"{self.domain}. 3600 IN TXT \"v=spf1 ip4:127.0.0.1 -all\"\n"
                     f"_dmarc.{self.domain}. 3600 IN TXT \"v=DMARC1; p=reject\"\n"
                     f"s1._domainkey.{self.domain}. 3600 IN TXT {record}\n")

    def file(self, size: int, workdir: Path) -> Path:
        """A signed message of about ``size`` bytes, with LF line ends (smtp-source -F
        sends each line with CRLF)."""
        line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
        body = line * max(1, size // len(line))
        data = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n"
                f"Message-ID: <bench@{self.domain}>\r\n\r\n").encode() + body
        signature: bytes = self._dkim.sign(data, b"s1", self.domain.encode(), self._pem,
                                           canonicalize=(b"relaxed", b"relaxed"))
        path = workdir / "message.txt"
        path.write_bytes((signature + data).replace(b"\r\n", b"\n"))
        return path


def run_cell(kind: str, cell: Cell, base: Path, signed: SignedMail | None = None) -> Result:
    """One cell; with ``signed`` (--verify) the DNS serves its records and smtp-source
    sends its message file instead of generating one."""
    result = Result(kind, cell)
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}.", dir=base))
    os.chmod(workdir, 0o755)
    # --verify: the signed mail's records are outside bench.invalid., which a zone of that
    # origin would not serve (every answer NXDOMAIN: SPF none, DKIM "no key", DMARC
    # none, and so no RSA verification measured); they get a zone of their own.
    dns = (DnsResponder(signed.zone, ".") if signed
           else DnsResponder(EMPTY_ZONE, "bench.invalid."))
    sink: Sink | None = None
    handle: PostfixInstance | subprocess.Popen[bytes] | None = None
    timeout = 60 + cell.messages * cell.size / 5e6
    try:
        dns.start()
        sink = Sink(workdir)
        port, pid, handle = start_server(kind, workdir, sink, dns)
        argv = [
            SMTP_SOURCE,
            "-s",
            str(SESSIONS),
            "-m",
            str(cell.messages),
            *(["-F", str(signed.file(cell.size, workdir))] if signed else ["-l", str(cell.size)]),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            "-M",
            "client.test",
        ]
        if cell.per_conn:
            argv.append("-d")
        argv.append(f"127.0.0.1:{port}")
        cpu0, writer0 = tree_cpu(pid), writer_cpu(pid)
        with RssSampler(pid) as rss:
            machine0 = machine_times()
            t0 = time.perf_counter()
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
                result.inject = time.perf_counter() - t0
                if done.returncode != 0:
                    lines = done.stderr.strip().splitlines()
                    result.error = lines[-1] if lines else f"smtp-source exit {done.returncode}"
            except subprocess.TimeoutExpired:
                result.error = f"smtp-source timed out after {timeout:.0f} s"
            if not result.error:
                if sink.wait_count(cell.messages, timeout):
                    result.e2e = time.perf_counter() - t0
                    result.idle, result.steal = machine_share(machine0, machine_times())
                else:
                    result.error = (
                        f"sink has {sink.count()} of {cell.messages} after {timeout:.0f} s"
                    )
            if kind != "direct":
                result.cpu = settle_cpu(pid) - cpu0
                result.writer_cpu = writer_cpu(pid) - writer0
        result.rss_kib = rss.peak_kib
        if kind in FERRY_CONFIGS and node_kind(kind) == 1:  # the kernel's own peak RSS
            result.rss_kib = status_kib(pid, "VmHWM")
        if kind == "direct":
            result.cpu = tree_cpu(pid) - cpu0
        time.sleep(0.2)  # a late duplicate would show here
        result.received = sink.count()
        if not result.error and result.received != cell.messages:
            result.error = f"sink received {result.received} of {cell.messages}"
    except Exception as exc:  # a failed cell is reported, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if isinstance(handle, PostfixInstance):
            handle.stop()
        elif handle is not None:
            stop(handle)
        if sink is not None:
            sink.stop()
        dns.stop()
        if result.error:
            for log in ("ferry.log", "postfix/maillog"):
                with contextlib.suppress(OSError):
                    tail = (workdir / log).read_text(errors="replace").splitlines()[-6:]
                    result.error += "\n    " + "\n    ".join(tail)
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --- report ----------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def signing_floor(ed25519: bool, size: int, count: int = 200) -> float:
    """CPU seconds a message that no signer can avoid (--dkim): the public-key signature
    of a digest (engine.message.pkey, OpenSSL) and SHA-256 over a body of ``size`` octets
    (bh=, RFC 6376 §3.7), measured here on this machine's CPU (thread time, best of 3)."""
    from bench_verify_stage import best_of

    from engine.message.dkim import Signer, generate_key

    signer = Signer("bench.invalid", "bench", generate_key(ed25519))
    body = b"x" * size

    def sign(n: int) -> None:
        for _ in range(n):
            signer.signatures([hashlib.sha256(body).digest()])

    return best_of(3, count, sign) / 1e6


def ceiling(off: list[Result], rate: float, floor: float) -> float:
    """The best on/off ratio this machine allows a signer (--dkim), from the unsigned runs:
    with ``floor`` seconds of CPU more a message and every core busy, the signed rate is at
    most cores / (C + floor), where C = busy share x cores / rate is the whole machine's
    CPU a message unsigned (server, queue writer, smtp-source and smtp-sink), so the ratio
    is at most 1 / (busy share + rate x floor / cores) (``rate``: the median end-to-end
    rate of ``off``; the busy share: its runs' median)."""
    cores = os.cpu_count() or 1
    busy = 1 - statistics.median(r.idle + r.steal for r in off)
    return 1 / (busy + rate * floor / cores) if rate else 0.0


def spread(off: list[Result], on: list[Result]) -> str:
    """The median and quartiles of the rounds' own on/off end-to-end ratios."""
    pairs = [b.rate(b.e2e) / a.rate(a.e2e) for a, b in zip(off, on, strict=True)
             if a.rate(a.e2e) and b.rate(b.e2e)]
    if len(pairs) < 2:
        return "-"
    low, mid, high = statistics.quantiles(pairs, n=4)
    return f"{mid:.2f} ({low:.2f}-{high:.2f}) of {len(pairs)}"


def print_comparison(cells: list[Cell], results: dict[tuple[str, Cell], list[Result]],
                     kinds: tuple[str, str], target: float = LOG_TARGET,
                     floors: dict[Cell, float] | None = None) -> None:
    """--logs / --maillog / --verify / --dkim: on / off, end to end, injection and CPU per
    message, per cell: the medians of the rounds (one short run on a shared machine moves
    by ±30 %).  The verdict is the ratio of the medians; ``rounds`` shows the spread: the
    median and quartiles of each round's own on/off ratio (its two runs are next to each
    other in time, so a slow phase of the host weighs on both).  With ``floors`` (--dkim:
    :func:`signing_floor` per cell), the ratio the machine allows at most (:func:`ceiling`)
    too."""
    print(f"\n{'cell':<16} {'on/off e2e':>10} {'inject':>7} {'CPU':>6} {'target':>6}  verdict"
          f"  {'rounds: median (quartiles)':<26}"
          f"{'  ceiling (floor µs)' if floors else ''}")
    verdicts = []
    for cell in cells:
        (off_e2e, off_inject, off_cpu), (on_e2e, on_inject, on_cpu) = (
            (statistics.median(r.rate(r.e2e) for r in results[k, cell]),
             statistics.median(r.rate(r.inject) for r in results[k, cell]),
             statistics.median(r.cpu for r in results[k, cell])) for k in kinds)
        ok = bool(on_e2e and off_e2e and on_e2e / off_e2e >= target)
        verdicts.append(ok)
        bound = ""
        if floors:
            bound = (f"  {ceiling(results[kinds[0], cell], off_e2e, floors[cell]):>6.2f}x "
                     f"({floors[cell] * 1e6:,.0f})")
        print(f"{cell.name:<16} {ratio(on_e2e, off_e2e):>10} {ratio(on_inject, off_inject):>7} "
              f"{ratio(on_cpu, off_cpu):>6} "
              f"{f'>={target:.2f}':>6}  {'PASS' if ok else 'FAIL'}   "
              f"{spread(results[kinds[0], cell], results[kinds[1], cell]):<26}{bound}")
    print(f"\noverall: {'PASS' if all(verdicts) else 'FAIL'} "
          f"({sum(verdicts)} of {len(verdicts)} cells meet the target)")


def _median(runs: list[Result]) -> Result:
    """The run of the median end-to-end rate (the one run, without --rounds)."""
    ordered = sorted(runs, key=lambda r: r.rate(r.e2e))
    return ordered[len(ordered) // 2]


#: --workers (issue 17), 1 KiB cells: N workers / one worker and N workers / Postfix.
NODE_TARGETS = (1.4, 3.5)


def print_node(cells: list[Cell], results: dict[tuple[str, Cell], list[Result]],
               node: str) -> None:
    """--workers: the node against one worker and against Postfix, end to end, with the
    CPU per message of each (medians of the rounds)."""
    print(f"\n{'cell':<16} {node + '/ferry':>13} {node + '/postfix':>15} "
          f"{'CPU µs/msg ferry':>16} {node:>9} {'writers':>15}  verdict (1 KiB: >= "
          f"{NODE_TARGETS[0]}x, >= {NODE_TARGETS[1]}x)")
    for cell in cells:
        one, many, pf = (_median(results[k, cell]) for k in ("ferry", node, "postfix"))
        e1, en, ep = one.rate(one.e2e), many.rate(many.e2e), pf.rate(pf.e2e)
        verdict = "-"
        if cell.size == 1024:
            ok = bool(e1 and ep and en / e1 >= NODE_TARGETS[0] and en / ep >= NODE_TARGETS[1])
            verdict = "PASS" if ok else "FAIL"
        print(f"{cell.name:<16} {ratio(en, e1):>13} {ratio(en, ep):>15} "
              f"{one.cpu / cell.messages * 1e6:>16,.0f} "
              f"{many.cpu / cell.messages * 1e6:>9,.0f} "
              f"{one.writer_cpu / cell.messages * 1e6:>7,.0f}/"
              f"{many.writer_cpu / cell.messages * 1e6:<7,.0f}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages per cell")
    parser.add_argument("--dir", default="/work", help="where the temporary spools go")
    parser.add_argument("--logs", action="store_true", help="Ferry with the tracking "
                        "and protocol logs on against off (issue 12), instead of "
                        "Ferry/Postfix/direct")
    parser.add_argument("--maillog", action="store_true", help="Ferry with the mail log "
                        "on against off (issue 13), instead of Ferry/Postfix/direct")
    parser.add_argument("--verify", action="store_true", help="Ferry verifying SPF, DKIM and "
                        "DMARC against verifying nothing (issue 15)")
    parser.add_argument("--dkim", choices=("rsa", "ed25519"), help="Ferry signing every "
                        "message with a [[dkim_sign]] key against not signing (issue 15)")
    parser.add_argument("--rounds", type=int, default=1, help="with --logs, --maillog, "
                        "--verify, --dkim or --workers: run each kind this many times, "
                        "alternating, and compare medians")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="add Ferry with "
                        "[server] workers = N to the plain run (issue 17)")
    parser.add_argument("--keep-autogroup", action="store_true", help="leave the kernel's "
                        "autogroup scheduling as it is (see benchmarks/autogroup.py)")
    parser.add_argument("--size", type=int, default=0, help="only the cells of messages "
                        "of this many bytes (1024, 20480, 102400)")
    parser.add_argument("--scale", type=float, default=1.0, metavar="K",
                        help="K times the messages of the one-per-connection cells (the "
                        "shortest runs; a cell of many per connection is defined by its "
                        "messages per connection and keeps them): less of a VM's noise and "
                        "of the first messages' one-time costs in each figure")
    parser.add_argument("--cell", action="append", default=[], metavar="NAME",
                        help='only this cell, as the tables name it ("1 KiB 20/conn"); '
                        "repeatable")
    args = parser.parse_args()
    mode = ("logs" if args.logs else "maillog" if args.maillog
            else "verify" if args.verify else args.dkim)
    compare = COMPARISONS[mode] if mode else None
    node = f"ferry-w{args.workers}" if args.workers > 1 and compare is None else ""
    if node:
        FERRY_CONFIGS[node] = f'[queue]\ndurability = "fsync"\n[server]\nworkers = {args.workers}\n'
    plain = ("ferry", node, "postfix", "direct") if node else KINDS
    signed = SignedMail() if args.verify else None
    if os.geteuid() != 0 and compare is None:
        sys.exit("run as root: the Postfix instance needs it")
    atexit.register(_stop_children)
    print(autogroup_off() if not args.keep_autogroup and os.geteuid() == 0
          else "autogroup: left as it is")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    scale = 5 if args.quick else 1
    cells = []
    for size, single, multi in (
        (1024, 2000, 10000),
        (20 * 1024, 2000, 10000),
        (100 * 1024, 1000, 4000),
    ):
        if not args.size or args.size == size:
            cells += [Cell(size, False, int(single * args.scale / scale)),
                      Cell(size, True, multi // scale)]
    if args.cell:
        unknown = set(args.cell) - {c.name for c in cells}
        if unknown:
            sys.exit(f"no such cell: {', '.join(sorted(unknown))}")
        cells = [c for c in cells if c.name in args.cell]
    base = Path(tempfile.mkdtemp(prefix="bench_relay.", dir=args.dir))
    os.chmod(base, 0o755)
    version = subprocess.run([*FERRY_ARGV, "--version"], capture_output=True, text=True)
    postfix = subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}; {' / '.join(version.stdout.splitlines())}; "
        f"Postfix {postfix.stdout.split('=')[-1].strip()}"
    )
    print(
        f"smtp-source -s {SESSIONS} → server → smtp-sink; max per destination "
        f"{MAX_PER_DOMAIN}; spools under {base}"
    )
    results: dict[tuple[str, Cell], list[Result]] = {}
    rounds = max(1, args.rounds) if compare is not None or node else 1
    try:
        print(
            f"\n{'cell':<16} {'server':<13} {'msgs':>6} {'inject/s':>9} {'e2e/s':>8} "
            f"{'CPU µs/msg':>10} {'peak MiB':>12} {'at sink':>7} {'idle':>5} {'steal':>5}"
        )
        kinds = compare or plain
        for cell in cells:
            for turn in range(rounds):
                for kind in kinds if turn % 2 == 0 else kinds[::-1]:
                    r = run_cell(kind, cell, base, signed)
                    results.setdefault((kind, cell), []).append(r)
                    print(
                        f"{cell.name:<16} {kind:<13} {cell.messages:>6} "
                        f"{r.rate(r.inject):>9,.0f} {r.rate(r.e2e):>8,.0f} "
                        f"{r.cpu / cell.messages * 1e6:>10,.0f} {r.rss_kib / 1024:>12,.1f} "
                        f"{r.received:>7} {r.idle:>5.0%} {r.steal:>5.0%}",
                        flush=True,
                    )
                    if r.error:
                        print(f"  ERROR: {r.error}")

        if compare is not None:
            floors = ({cell: signing_floor(mode == "ed25519", cell.size) for cell in cells}
                      if mode in DKIM_MODES else None)
            print_comparison(cells, results, compare, TARGETS_ON_OFF[mode], floors)
            return
        if node:
            print_node(cells, results, node)
        print(
            f"\n{'cell':<16} {'ferry/postfix e2e':>17} {'inject':>7} "
            f"{'ferry/direct e2e':>16} {'target':>6}  verdict"
        )
        verdicts = []
        for cell in cells:
            f, p, d = (_median(results[k, cell]) for k in KINDS)
            fe, pe, de = f.rate(f.e2e), p.rate(p.e2e), d.rate(d.e2e)
            target = TARGETS[cell.size]
            ok = bool(fe and pe and fe / pe >= target)
            verdicts.append(ok)
            print(
                f"{cell.name:<16} {ratio(fe, pe):>17} "
                f"{ratio(f.rate(f.inject), p.rate(p.inject)):>7} "
                f"{ratio(fe, de):>16} {f'>={target:.0f}x':>6}  {'PASS' if ok else 'FAIL'}"
            )
        print(
            f"\noverall: {'PASS' if all(verdicts) else 'FAIL'} "
            f"({sum(verdicts)} of {len(verdicts)} cells meet the target)"
        )
    finally:
        _stop_children()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Inbound SMTP: accepting and durably storing mail, against Postfix and a discarding aiosmtpd.

Run (as root: Postfix runs as a private instance): ``.venv/bin/python
benchmarks/bench_inbound.py [--quick] [--dir DIR]`` (about 4-5 minutes with the defaults;
``--quick`` takes about one and a half).

Measures, in one run, receiving only (delivery paused):

1. Throughput.  Postfix's ``smtp-source`` with 100 parallel sessions sends 1 KiB and
   100 KiB messages (``-l``), one message per connection and, with ``-d``, up to 100 per
   connection, one sender and one recipient (``b@example.net``, relayed from loopback), to:

   - ``ferry serve`` (one process, a configuration file with ``[delivery] paused = true``
     and the defaults otherwise: LMDB queue, durability ``fsync``, so the 250 comes after
     the commit that holds the message).  The ``engine`` package is the one ``.venv/bin/
     ferry`` imports; set ``PYTHONPATH`` to measure another copy (the run prints which);
   - Postfix 3.7, a private instance (own ``config_directory`` and ``queue_directory``, no
     chroot, stock settings otherwise, so queue files are fsynced before the 250), in two
     configurations: ``deferred`` (``defer_transports = smtp``: the queue manager picks
     each message up and defers it, the issue's baseline) and ``hold``
     (``check_client_access static:HOLD``: cleanup files the message in the hold queue and
     nothing else touches it, the cheapest way to pause delivery in Postfix);
   - aiosmtpd on uvloop with a handler whose ``handle_DATA`` drops the message and
     answers 250 (nothing stored).

   Every cell gets a fresh server and a fresh spool under ``--dir`` (default ``/work``),
   deleted afterwards.  Reported: wall time of ``smtp-source`` → messages/s and MB/s,
   and the CPU seconds of the server's process tree (utime + stime from ``/proc``, reaped
   children included) per message, read when the server has gone quiet after the run (so
   Postfix's deferral work counts).  The messages stored are counted independently:
   LMDB entries for Ferry, queue files for Postfix, the handler's counter for aiosmtpd.

2. Latency.  At half of each server's peak 1 KiB rate, 50 client sessions (asyncio
   streams on uvloop, no pipelining, up to 100 messages per connection) send 1 KiB
   messages at a fixed paced rate for a few seconds; the time from writing the message
   and its final ``.<CRLF>`` to reading the 250 line gives p50 / p99 / max.

Targets (issue): Ferry ≥ 1.5x Postfix and ≥ 1.0x the discarding aiosmtpd server in
messages/s; p99 end-of-data → 250 ≤ 50 ms at half of peak load.  Only 127.0.0.1 is used;
every load is bounded by a message count and a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import grp
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autogroup import autogroup_off

ROOT = Path(__file__).resolve().parent.parent
FERRY = ROOT / ".venv" / "bin" / "ferry"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SESSIONS = 100
SENDER = "a@client.test"
RECIPIENT = "b@example.net"
TARGET_POSTFIX = 1.5
TARGET_AIOSMTPD = 1.0
TARGET_P99_MS = 50.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- measuring processes ---------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU seconds, reaped children's CPU seconds) from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14-17
    ppid = int(fields[1])
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return ppid, own, children


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and all its live descendants, plus the children it reaped."""
    stats: dict[int, tuple[int, float, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    if root not in stats:
        return 0.0
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = stats[root][2], [root]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo += kids.get(pid, [])
    return total


def machine_times() -> tuple[int, int, int]:
    """The machine's CPU time since boot in clock ticks from /proc/stat: (all, idle with
    iowait, steal).  Two readings give a run's idle share (how far it was from using every
    core) and its steal share (time the VM's host ran something else on our vCPUs: the
    host's slow phases show there, when the host reports them)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return sum(ticks), ticks[3] + ticks[4], ticks[7]


def machine_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> tuple[float, float]:
    """(idle, steal) shares of the machine between two :func:`machine_times` readings."""
    total = max(1, after[0] - before[0])
    return (after[1] - before[1]) / total, (after[2] - before[2]) / total


def settle_cpu(root: int, quiet: float = 0.5, limit: float = 15.0) -> float:
    """The tree's CPU seconds once it has stopped using CPU (after deferred work)."""
    deadline = time.monotonic() + limit
    last = tree_cpu(root)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = tree_cpu(root)
        if now - last < 0.02:
            return now
        last = now
    return last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# --- the servers -----------------------------------------------------------------------

_live: list[Server] = []


def _stop_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()


class Server:
    """One server instance under test, with its own directory."""

    label = "?"

    def __init__(self, base: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.label.split()[0]}.", dir=base))
        self.port = free_port()
        self.pid = 0
        self.log = self.dir / "server.log"

    def start(self) -> None:
        _live.append(self)
        self._start()
        wait_listening(self.port)

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self in _live:
            _live.remove(self)
            self._stop()

    def _stop(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        """Messages the server holds (or accepted, for the discarding server)."""
        raise NotImplementedError

    def log_tail(self) -> str:
        """The end of the server's log, for error reports."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-8:])
        return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ChildServer(Server):
    """A server that is one child process of ours, stopped with SIGTERM."""

    proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT, start_new_session=True)
        self.pid = self.proc.pid

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)



class Ferry(ChildServer):
    label = "ferry"

    def _start(self) -> None:
        config = self.dir / "ferry.toml"
        config.write_text("[delivery]\npaused = true\n")  # receiving only
        self._spawn([str(FERRY), "serve", "--config", str(config),
                     "--listen", f"127.0.0.1:{self.port}", "--spool", str(self.dir / "spool"),
                     "--hostname", "bench.test"])

    def stored(self) -> int:
        self.stop()  # LMDB read after the writer has closed the store
        env = lmdb.open(str(self.dir / "spool" / "queue"), readonly=True, lock=False,
                        max_dbs=8)
        try:
            with env.begin() as txn:
                n: int = txn.stat(env.open_db(b"envelopes", txn=txn, create=False))["entries"]
        finally:
            env.close()
        return n


class Aiosmtpd(ChildServer):
    label = "aiosmtpd discard"

    def _start(self) -> None:
        self._spawn([sys.executable, __file__, "--serve-aiosmtpd", str(self.port)])

    def stored(self) -> int:
        self.stop()
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("accepted "):
                return int(line.split()[1])
        return -1


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = {relay}
default_transport = smtp
relay_transport = smtp
defer_transports = smtp
maillog_file = {log}
maillog_file_prefixes = {base}
smtpd_client_connection_count_limit = 0
default_process_limit = 200
smtpd_peername_lookup = no
biff = no
alias_maps =
alias_database =
local_recipient_maps =
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Postfix(Server):
    def __init__(self, base: Path, variant: str) -> None:
        self.variant = variant
        self.label = f"postfix {variant}"
        super().__init__(base)
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"

    def _postfix(self, *args: str, check: bool = True) -> None:
        done = subprocess.run(["postfix", "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed:\n{self.log_tail()}")

    def _postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), *args], check=True, timeout=30)

    def _start(self) -> None:
        data = self.dir / "data"
        for d in (self.conf, self.queue, data):
            d.mkdir()
        os.chmod(self.dir, 0o755)  # the postfix user reaches its queue and data below
        os.chown(data, pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        relay = "permit_mynetworks, reject"
        if self.variant == "hold":
            relay = "check_client_access static:HOLD, " + relay
        self.log = self.dir / "maillog"
        (self.conf / "main.cf").write_text(POSTFIX_MAIN.format(
            queue=self.queue, data=data, relay=relay, log=self.log, base=self.dir))
        self._postconf("-F", "*/*/chroot = n")
        self._postconf("-MX", "smtp/inet")
        self._postconf("-M", f"127.0.0.1:{self.port}/inet="
                       f"127.0.0.1:{self.port} inet n - n - - smtpd")
        self._postfix("start")
        self.pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])

    def _stop(self) -> None:
        if not self.pid:
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{self.pid}").exists():  # our master, by its pid
            os.kill(self.pid, signal.SIGKILL)

    def stored(self) -> int:
        return sum(sum(len(files) for _, _, files in os.walk(self.queue / q)) for q in QUEUES)



def make_server(kind: str, base: Path) -> Server:
    if kind == "ferry":
        return Ferry(base)
    if kind == "aiosmtpd":
        return Aiosmtpd(base)
    return Postfix(base, kind.split("-")[1])


KINDS = ("ferry", "postfix-deferred", "postfix-hold", "aiosmtpd")


# --- the discarding aiosmtpd server (runs in its own process) --------------------------


def serve_aiosmtpd(port: int) -> None:
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Discard:
        count = 0

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            self.count += 1
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Discard()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="aiosmtpd.bench.test"), "127.0.0.1", port,
            backlog=1024, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()
        print(f"accepted {handler.count}", flush=True)

    uvloop.run(main())


# --- throughput ------------------------------------------------------------------------


@dataclass
class Cell:
    size: int
    per_conn: bool
    messages: int

    @property
    def name(self) -> str:
        size = f"{self.size >> 10} KiB"
        conn = f"{self.messages // SESSIONS}/conn" if self.per_conn else "1/conn"
        return f"{size:>7} {conn:>8}"


@dataclass
class Result:
    kind: str
    cell: Cell
    wall: float = 0.0
    cpu: float = 0.0
    client_cpu: float = 0.0
    stored: int = 0
    error: str = ""

    @property
    def rate(self) -> float:
        return self.cell.messages / self.wall if self.wall and not self.error else 0.0


def run_cell(kind: str, cell: Cell, base: Path, timeout: float) -> Result:
    result = Result(kind, cell)
    server = make_server(kind, base)
    try:
        server.start()
        argv = [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(cell.messages), "-l",
                str(cell.size), "-f", SENDER, "-t", RECIPIENT, "-M", "client.test"]
        if cell.per_conn:
            argv.append("-d")
        argv.append(f"127.0.0.1:{server.port}")
        cpu0 = tree_cpu(server.pid)
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            result.wall = time.perf_counter() - t0
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            result.client_cpu = (usage.ru_utime + usage.ru_stime
                                 - usage0.ru_utime - usage0.ru_stime)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines()
                result.error = lines[-1] if lines else f"smtp-source exit {done.returncode}"
        except subprocess.TimeoutExpired:
            result.error = f"smtp-source timed out after {timeout:.0f} s"
        result.cpu = settle_cpu(server.pid) - cpu0
        result.stored = server.stored()
        if not result.error and result.stored != cell.messages:
            result.error = f"stored {result.stored} of {cell.messages}"
        if result.error and server.log_tail():
            result.error += "\n" + server.log_tail()
    except Exception as exc:  # a failed cell is reported, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        server.cleanup()
    return result


# --- latency ---------------------------------------------------------------------------


def latency_message(size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: latency\r\n"
            "Message-ID: <latency@client.test>\r\n\r\n").encode()
    line = b"x" * 70 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body + b".\r\n"


class ReplyError(Exception):
    pass


async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line.startswith(code):
            raise ReplyError(line.decode(errors="replace").strip() or "connection closed")
        if line[3:4] != b"-":
            return


@dataclass
class Latency:
    requested: float
    sent: int = 0
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)

    def pct(self, p: float) -> float:
        if not self.samples:
            return float("nan")
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000


async def paced(port: int, rate: float, seconds: float, sessions: int = 50,
                per_conn: int = 100, size: int = 1024) -> Latency:
    loop = asyncio.get_running_loop()
    out = Latency(rate)
    total = int(rate * seconds)
    message = latency_message(size)
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    rcpt = f"RCPT TO:<{RECIPIENT}>\r\n".encode()
    slots = iter(range(total))
    start = loop.time() + 0.2

    async def session() -> None:
        while len(out.errors) <= 20:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                out.errors.append(str(exc))
                await asyncio.sleep(0.1)
                continue
            try:
                await expect(reader, b"220")
                writer.write(b"EHLO latency.client.test\r\n")
                await expect(reader, b"250")
                for _ in range(per_conn):
                    k = next(slots, None)
                    if k is None:
                        writer.write(b"QUIT\r\n")
                        return
                    delay = start + k / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    writer.write(mail)
                    await expect(reader, b"250")
                    writer.write(rcpt)
                    await expect(reader, b"250")
                    writer.write(b"DATA\r\n")
                    await expect(reader, b"354")
                    t0 = time.perf_counter()
                    writer.write(message)
                    await expect(reader, b"250")
                    out.samples.append(time.perf_counter() - t0)
                writer.write(b"QUIT\r\n")
                await expect(reader, b"221")
            except (ReplyError, OSError) as exc:
                out.errors.append(str(exc))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    tasks = [asyncio.ensure_future(session()) for _ in range(sessions)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 60)
    except TimeoutError:
        out.errors.append("timed out")
    out.elapsed = loop.time() - start
    out.sent = len(out.samples)
    return out


def run_latency(kind: str, rate: float, seconds: float, base: Path) -> Latency:
    server = make_server(kind, base)
    try:
        server.start()
        return uvloop.run(paced(server.port, rate, seconds))
    except Exception as exc:
        lat = Latency(rate)
        lat.errors.append(f"{type(exc).__name__}: {exc}")
        return lat
    finally:
        server.cleanup()


# --- report ----------------------------------------------------------------------------


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer messages per cell")
    parser.add_argument("--dir", default="/work", help="where the temporary spools go")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--serve-aiosmtpd", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--keep-autogroup", action="store_true", help="leave the kernel's "
                        "autogroup scheduling as it is (see benchmarks/autogroup.py)")
    args = parser.parse_args()
    if args.serve_aiosmtpd:
        serve_aiosmtpd(args.serve_aiosmtpd)
        return
    if os.geteuid() != 0:
        sys.exit("run as root: the Postfix instance needs it")

    atexit.register(_stop_all)
    print(autogroup_off() if not args.keep_autogroup else "autogroup: left as it is")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale = 5 if args.quick else 1
    cells = [Cell(1024, False, 6000 // scale), Cell(1024, True, 10000 // scale),
             Cell(100 * 1024, False, 2000 // scale), Cell(100 * 1024, True, 10000 // scale)]
    seconds = args.latency_seconds or (2.0 if args.quick else 5.0)
    base = Path(tempfile.mkdtemp(prefix="bench_inbound.", dir=args.dir))
    os.chmod(base, 0o755)
    version = subprocess.run([str(FERRY), "--version"], capture_output=True, text=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; Python "
          f"{platform.python_version()}; {' / '.join(version.stdout.splitlines())}")
    where = subprocess.run([sys.executable, "-c", "import engine; print(engine.__file__)"],
                           capture_output=True, text=True, cwd="/")
    print(f"ferry's engine package: {Path(where.stdout.strip()).parent}; "
          f"smtp-source -s {SESSIONS}; spools under {base}")
    print("cores: the server's CPU seconds / wall seconds; client: smtp-source's")
    results: dict[tuple[str, int], Result] = {}
    try:
        print(f"\n{'server':<18} {'cell':<16} {'messages':>8} {'wall s':>7} {'msg/s':>8} "
              f"{'MB/s':>7} {'CPU µs/msg':>10} {'cores':>5} {'client':>6} {'stored':>7}")
        for i, cell in enumerate(cells):
            timeout = 60 + cell.messages * cell.size / 2e6
            for kind in KINDS:
                r = run_cell(kind, cell, base, timeout)
                results[kind, i] = r
                mb = r.rate * cell.size / 1e6
                cpu_us = r.cpu / cell.messages * 1e6
                print(f"{kind:<18} {cell.name:<16} {cell.messages:>8} {r.wall:>7.2f} "
                      f"{r.rate:>8,.0f} {mb:>7.1f} {cpu_us:>10,.0f} "
                      f"{r.cpu / r.wall if r.wall else 0:>5.2f} "
                      f"{r.client_cpu / r.wall if r.wall else 0:>6.2f} {r.stored:>7}", flush=True)
                if r.error:
                    print(f"  ERROR: {r.error}")

        print(f"\n{'cell':<16} {'ferry/pf-deferred':>17} {'ferry/pf-hold':>13} "
              f"{'ferry/aiosmtpd':>14}  targets (>= {TARGET_POSTFIX}x deferred, "
              f">= {TARGET_AIOSMTPD}x aiosmtpd)")
        for i, cell in enumerate(cells):
            f, pd, ph, a = (results[k, i].rate for k in KINDS)
            ok = f and pd and a and f / pd >= TARGET_POSTFIX and f / a >= TARGET_AIOSMTPD
            print(f"{cell.name:<16} {fmt_ratio(f, pd):>17} {fmt_ratio(f, ph):>13} "
                  f"{fmt_ratio(f, a):>14}  {'met' if ok else 'MISSED'}")

        print(f"\nlatency, end of data -> 250, 50 sessions, 1 KiB, {seconds:.0f} s at half of "
              "each server's peak 1 KiB rate")
        print(f"{'server':<18} {'asked/s':>8} {'got/s':>8} {'messages':>8} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7}")
        for kind in KINDS:
            peak = max(results[kind, 0].rate, results[kind, 1].rate)
            if not peak:
                continue
            lat = run_latency(kind, peak / 2, seconds, base)
            got = lat.sent / lat.elapsed if lat.elapsed > 0 else 0.0
            print(f"{kind:<18} {peak / 2:>8,.0f} {got:>8,.0f} {lat.sent:>8} "
                  f"{lat.pct(50):>7.1f} {lat.pct(99):>7.1f} "
                  f"{max(lat.samples, default=0) * 1000:>7.1f}"
                  + (f"  p99 target <= {TARGET_P99_MS:.0f} ms: "
                     f"{'met' if lat.pct(99) <= TARGET_P99_MS else 'MISSED'}"
                     if kind == "ferry" else ""), flush=True)
            if lat.errors:
                print(f"  {len(lat.errors)} errors, first: {lat.errors[0]}")
            if lat.samples and kind == "ferry":
                print(f"  mean {statistics.fmean(lat.samples) * 1000:.1f} ms")
    finally:
        _stop_all()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

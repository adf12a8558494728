"""Fan-out delivery: one Ferry process drains a queue to 1,000 domains over thousands of
concurrent connections, with per-domain connection limits held exactly.

Run: ``.venv/bin/python benchmarks/bench_fanout.py [--quick] [--messages N] [--domains N]
[--limit N] [--sink-delay S] [--sinks N] [--window N] [--no-pin] [--profile]`` (about 1-2
minutes with the defaults: 100,000 messages to 1,000 domains; ``--quick``: 10,000 messages
to 200 domains).

The peers stand in for other machines, so they are kept off Ferry's CPU: this process and
everything it starts except Ferry (the sinks, the DNS responder, ``ss``) run on the last
CPU only, and Ferry may use every CPU (``--no-pin``: no affinity).  On a 2-CPU machine the
peers otherwise wake up on the CPU Ferry's event loop runs on and preempt it thousands of
times a second; they still share the second CPU with Ferry's queue writer.

Set-up, all on 127.0.0.0/8, every process started here stopped by its PID at the end:

* ``--sinks`` Postfix ``smtp-sink`` processes (C) on 127.3.0.1 ... 127.3.0.N, one port.
  Domain ``dK.test`` has its own MX name ``mx.dK.test`` (so its own site: limits are per
  site) pointing at sink ``K mod N``.  By default the sinks answer at once, so that they
  are not the bottleneck (the issue's set-up): Ferry's event loop is, and every site keeps
  its ``--limit`` connections open and busy because its backlog is longer than the limit.
  ``--sink-delay S`` makes each sink hold its reply to DATA for S seconds (``-w``; whole
  seconds only): slow receivers.  Little's law then bounds the rate at (domains x limit) /
  S, 8,000/s with 1,000 x 8 / 1 s, and each domain needs at least messages / (domains x
  limit) x S seconds (12.5 s for 100 messages over 8 connections), so that run measures
  start-up latency and the slowest domain as much as Ferry's throughput.
* A ``DnsResponder`` (engine.testing.dns) in a process of its own (``python -m
  engine.testing.dns``; in a thread here it shared this process's GIL with the ``ss``
  sampling and answered slowly, so sites came up over ~15 s) answers the MX and address
  queries; Ferry's ``delivery.dns`` points at it, never at the system resolver.
* The spool is filled here with ``LmdbQueue`` (durability ``os``, 1 KiB bodies, one
  recipient each, domains round-robin), then closed.
* Ferry runs in a subprocess (the driver below: the real composition root ``engine.app.App``
  on uvloop, queue durability ``fsync`` as in production, delivery on from the start), so
  its CPU time and RSS are its own.  The driver records, without changing what Ferry does:
  every site's ``peak_workers`` (by wrapping ``Scheduler._staff``, the only place workers
  are added; sites are dropped from ``Scheduler.sites`` when idle, so sampling would miss
  them) and the connections Ferry has open per MX host (a ``_Session``/``_Pipe`` subclass
  in ``engine.client.smtp`` counts from connect to ``connection_lost``, which includes
  connections being QUIT and idle pooled ones).

Measured: wall time from ``App.start()`` to an empty queue (``LmdbQueue.count() == 0``,
polled every 50 ms) → deliveries/s; the sinks' own message counters (``-c``); peak
concurrent established connections to the sink port (``ss`` every ``--sample`` seconds,
client ends; 1 s by default, as one look costs ~80 ms of CPU with 16,000 sockets) and,
from the sink ends, the peak per sink address against that address's bound (domains on
it x limit); per-domain peaks from Ferry's side as above; VmHWM of the Ferry process;
its CPU seconds (user+sys, all threads, and its queue writer process) per delivery.
``--profile`` runs ``py-spy record --gil`` (the thread holding the GIL: what the event loop
spends its time on) on the Ferry process from the start of delivery, prints the top
functions by own time and by inclusive time, and leaves the raw stacks in
``--profile-out``.

Targets (issue): >= 5,000 deliveries/s from one process with >= 2,000 connections open,
peak connections per domain equal to the limit and never above it.

``--shaping [--rounds R]`` (issue 16): today's configuration (no shipped rules, no egress
sources, no MTA-STS) against shaping on (TLS policy ``may`` with MTA-STS, the defaults;
the shipped rules, a rule and an automation rule for every
site with the same limits, an egress pool of one source on 127.0.0.1: every group placed
per (source, site), every connection bound, every reply looked up among the automation
rules), alternated R times in this one invocation (each run a child ``bench_fanout.py``);
prints the medians and their ratio (target: shaping on >= 0.90x of the deliveries/s).
With ``--suppressed N`` too, the "on" runs also have N suppression entries: the issue's
combined figure.

``--suppressed N [--rounds R]`` (issue 16): the same run with N entries on the suppression
list (engine.queue.suppression: written to the spool with the messages, none of them a
recipient, loaded by Ferry at start) against none, alternated R times in this one
invocation (each run a child ``bench_fanout.py``); prints the medians of deliveries/s
and CPU per delivery, their ratio (target >= 0.90), the start-up time (the load of the
list), and the cost of the RCPT-time check (the real ``SuppressAgent.rcpt`` on parsed RCPT
commands, N entries against none, in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import uvloop

from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, Recipient

ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = "/usr/sbin/smtp-sink"
TARGET_RATE = 5_000.0
TARGET_CONNECTIONS = 2_000


def sink_address(k: int) -> str:
    return f"127.3.{k // 250}.{k % 250 + 1}"


def domain_sink(i: int, sinks: int) -> int:
    return i % sinks


def zone(domains: int, sinks: int) -> str:
    lines = ["$TTL 3600", "@ IN SOA ns.test. admin.test. 1 60 60 600 60"]
    for i in range(domains):
        lines.append(f"d{i}.test. IN MX 10 mx.d{i}.test.")
        lines.append(f"mx.d{i}.test. IN A {sink_address(domain_sink(i, sinks))}")
    return "\n".join(lines) + "\n"


def make_body(size: int) -> bytes:
    head = (b"From: sender@client.test\r\nTo: someone@fanout.test\r\n"
            b"Subject: fan-out benchmark\r\nMessage-ID: <bench@client.test>\r\n\r\n")
    line = b"lorem ipsum dolor sit amet ferry fan-out benchmark body line 0123456789\r\n"
    out = head + line * (size // len(line) + 1)
    return out[:size - 2] + b"\r\n"


# --- the Ferry process ----------------------------------------------------------------

DRIVER = r"""
import asyncio, dataclasses, json, os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
args = json.loads(sys.argv[1])
import uvloop
import engine.client.smtp as smtp
from engine.scheduler.scheduler import Scheduler
from engine.testing.server import ferry_config

# --- instrumentation: observe, never change, what Ferry does --------------------------
site_peak = {}
conn_open = {}
conn_peak = {}
conn_total = [0, 0]  # open now, peak

class CountingPipe(smtp._Pipe):
    host_name = None
    def connection_lost(self, exc):
        name = self.host_name
        if name is not None:
            self.host_name = None
            conn_open[name] -= 1
            conn_total[0] -= 1
        super().connection_lost(exc)

class CountingSession(smtp._Session):
    def __init__(self, host, pipe, *a, **kw):
        super().__init__(host, pipe, *a, **kw)
        if not pipe.lost.is_set():
            pipe.host_name = host.name
            n = conn_open[host.name] = conn_open.get(host.name, 0) + 1
            if n > conn_peak.get(host.name, 0):
                conn_peak[host.name] = n
            conn_total[0] += 1
            conn_total[1] = max(conn_total[1], conn_total[0])

smtp._Pipe = CountingPipe
smtp._Session = CountingSession
_staff = Scheduler._staff
def staff(self, site):
    _staff(self, site)
    if site.peak_workers > site_peak.get(site.name, 0):
        site_peak[site.name] = site.peak_workers
Scheduler._staff = staff

from engine.app import App, tune_gc

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out

writer_pid = []  # the queue's writer process, once started

def cpu():
    # this process's CPU seconds plus its queue writer process's (which is Ferry too)
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    for pid in writer_pid:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total

def shaping(config, on):
    # --shaping: "off" is today's configuration (no shipped rules, no sources, no MTA-STS);
    # "on" is TLS policy "may" with MTA-STS (the defaults), the shipped rules plus a rule
    # and an automation rule that match every site here (with the same limits as off), and
    # an egress pool of one source on 127.0.0.1.
    from engine.config import (AutomationRule, EgressConfig, EgressPool, EgressSource,
                               ShapingConfig, ShapingRule)
    if not on:
        # Today's is also without MTA-STS (issue 16's TLS policy): no _mta-sts lookups.
        return dataclasses.replace(config, shaping=ShapingConfig(defaults=False),
                                   delivery=dataclasses.replace(config.delivery,
                                                                mta_sts=False))
    rule = ShapingRule("bench", mx_suffixes=(".test",), max_connections=args["limit"],
                       max_messages_per_connection=config.delivery.max_messages_per_connection)
    react = AutomationRule("bench", mx_suffixes=(".test",), code=421, enhanced="4.7.28",
                           duration=60.0)
    egress = EgressConfig(sources={"s1": EgressSource("127.0.0.1", "out.ferry.test")},
                          pools={"bench": EgressPool({"s1": 1})}, pool="bench")
    return dataclasses.replace(config, egress=egress, shaping=ShapingConfig(
        defaults=True, rules=(rule,), automation=(react,)))

async def main():
    config = ferry_config(args["spool"])
    config = dataclasses.replace(config, delivery=dataclasses.replace(
        config.delivery, paused=False, dns=tuple(args["dns"]), mx_port=args["port"],
        max_per_domain=args["limit"], retry_interval=args["retry"],
        window=args["window"] or config.delivery.window))
    if args["shaping"]:
        config = shaping(config, args["shaping"] == "on")
    if not args.get("mta_sts", True):
        config = dataclasses.replace(config, delivery=dataclasses.replace(
            config.delivery, mta_sts=False))
    app = App(config)
    cpu0 = cpu()  # before start: the writer process does not exist yet
    t0 = time.time()
    await app.start()
    tune_gc()  # as engine.app.serve does
    store, sched = app.store, app.scheduler
    if store.writer_pid != os.getpid():  # a writer process, not a thread
        writer_pid.append(store.writer_pid)
    agent = app.agents["smtp"]
    print(json.dumps({"event": "started", "t": t0, "start_s": time.time() - t0,
                      "queued": store.count(), "pid": __import__("os").getpid()}),
          flush=True)
    deadline = t0 + args["timeout"]
    first = None
    last_report = 0.0
    left = store.count()
    while time.time() < deadline:
        await asyncio.sleep(0.05)
        left = store.count()
        now = time.time()
        if first is None and sched.delivered:
            first = now - t0
        if now - last_report >= 1.0 or not left:
            last_report = now
            print(json.dumps({"event": "progress", "t": now - t0, "left": left,
                              "delivered": sched.delivered, "open": conn_total[0],
                              "workers": sum(s.workers for s in sched.sites.values()),
                              "sites": len(sched.sites), "held": len(sched.window),
                              "queued": sum(len(s.jobs) for s in sched.sites.values()),
                              "resolving": sum(len(d.pending)
                                               for d in sched.destinations.values()),
                              "commits": store.stats.commits}), flush=True)
        if not left:
            break
    elapsed = time.time() - t0
    cpu1 = cpu()
    st = status()
    await app.stop()
    print(json.dumps({"event": "done", "elapsed": elapsed, "left": left, "first": first,
                      "delivered": sched.delivered, "cpu": cpu1 - cpu0, "status": st,
                      "opened": agent.connections_opened, "site_peak": site_peak,
                      "conn_peak": conn_peak, "conn_peak_total": conn_total[1],
                      "open_after_stop": conn_total[0]}), flush=True)

uvloop.run(main())
"""


# --- sinks and sampling ----------------------------------------------------------------


def free_port(address: str) -> int:
    for port in range(25_250, 25_350):
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the sinks")


def start_sinks(count: int, port: int, delay: int, out_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for k in range(count):
        cmd = [SMTP_SINK, "-c", "-u", "root", "-m", "2048"]
        if delay:
            cmd += ["-w", str(delay)]
        cmd += [f"{sink_address(k)}:{port}", "1024"]
        out = open(out_dir / f"sink{k}.out", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
        out.close()
    deadline = time.monotonic() + 10
    for k in range(count):
        while True:
            with socket.socket() as s:
                if s.connect_ex((sink_address(k), port)) == 0:
                    break
            if time.monotonic() > deadline or procs[k].poll() is not None:
                raise RuntimeError(f"smtp-sink {k} did not start")
            time.sleep(0.05)
    return procs


def sink_messages(out_dir: Path, count: int) -> int:
    """Messages the sinks received (their -c counters; a probe connection counts none)."""
    total = 0
    for k in range(count):
        found = re.findall(rb"mesg=(\d+)", (out_dir / f"sink{k}.out").read_bytes())
        total += int(found[-1]) if found else 0
    return total


@dataclass
class Sampler:
    """Established connections to the sink port every ``interval`` s, from ``ss``."""

    port: int
    interval: float
    peak_clients: int = 0
    peak_per_sink: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    cost: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        flt = f"( dport = :{self.port} or sport = :{self.port} )"
        suffix = f":{self.port}"
        while not self._stop.wait(self.interval):
            t0 = time.perf_counter()
            out = subprocess.run(["ss", "-tnH", "state", "established", flt],
                                 capture_output=True, text=True, timeout=10, check=False).stdout
            clients = 0
            per_sink: Counter[str] = Counter()
            for line in out.splitlines():
                parts = line.split()
                if len(parts) < 4:
                    continue
                local = parts[2]
                if local.endswith(suffix):
                    per_sink[local.rpartition(":")[0]] += 1
                else:
                    clients += 1
            self.peak_clients = max(self.peak_clients, clients)
            for addr, n in per_sink.items():
                if n > self.peak_per_sink[addr]:
                    self.peak_per_sink[addr] = n
            self.samples += 1
            self.cost += time.perf_counter() - t0


# --- fill ------------------------------------------------------------------------------


async def suppress(store: LmdbQueue, entries: int) -> None:
    """``entries`` suppression entries, none of them a recipient of the benchmark."""
    from engine.queue.suppression import Entry

    now = time.time()
    for start in range(0, entries, 10_000):
        await store.suppress_soon([
            (f"gone{n}@s{n % 1000}.test".encode(),
             Entry(f"gone{n}@s{n % 1000}.test", "550 5.1.1 No such user", "bad-mailbox",
                   now, "auto").encode())
            for n in range(start, min(entries, start + 10_000))])


async def fill(path: Path, messages: int, domains: int, body: bytes,
               suppressed: int = 0) -> float:
    store = LmdbQueue(path, durability="os")
    try:
        if suppressed:
            await suppress(store, suppressed)
        counter = iter(range(messages))
        t0 = time.perf_counter()

        async def producer() -> None:
            for n in counter:
                i = n % domains
                env = Envelope("sender@client.test",
                               [Recipient(f"u{n}@d{i}.test", f"d{i}.test")],
                               size=len(body), client_address="127.0.0.1",
                               receive_connector="default")
                await store.enqueue(env, body)

        await asyncio.gather(*(producer() for _ in range(1_000)))
        return messages / (time.perf_counter() - t0)
    finally:
        await store.close()


# --- profile ---------------------------------------------------------------------------


def summarize_profile(raw: Path, top: int = 18) -> list[str]:
    """Own and inclusive sample shares from py-spy's collapsed ("raw") stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [re.sub(r" \((.*/)?([^/]+\.py):\d+\)$", r" (\2)", f)
                  for f in stack.split(";")]
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return ["  (no samples)"]
    lines = [f"  {total:,} samples; top own time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  top inclusive time (engine code):")
    shown = [(f, n) for f, n in incl.most_common() if "(" in f
             and not f.startswith(("<module>", "run ", "main ", "_run_once", "run_forever"))]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in shown[:top]]
    return lines


# --- output ----------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="10,000 messages to 200 domains")
    parser.add_argument("--messages", type=int, default=None, help="default 100,000")
    parser.add_argument("--domains", type=int, default=None, help="default 1,000")
    parser.add_argument("--limit", type=int, default=8, help="max_per_domain (default 8)")
    parser.add_argument("--sinks", type=int, default=50, help="smtp-sink processes")
    parser.add_argument("--sink-delay", type=int, default=0,
                        help="seconds smtp-sink waits before its reply to DATA (whole "
                             "seconds; default 0: none)")
    parser.add_argument("--window", type=int, default=0,
                        help="delivery.window (default: Ferry's default)")
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--no-pin", action="store_true",
                        help="no CPU affinity (default: the peers on the last CPU only)")
    parser.add_argument("--sample", type=float, default=1.0,
                        help="seconds between connection samples (ss)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="give up delivery after this many seconds")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy record the Ferry process during the drain")
    parser.add_argument("--profile-seconds", type=int, default=30,
                        help="how long py-spy records, from the start of delivery")
    parser.add_argument("--profile-out", default="/tmp/fanout-profile.txt",
                        help="where --profile leaves py-spy's raw stacks")
    parser.add_argument("--dir", default="/work", help="where the temporary spool goes")
    parser.add_argument("--no-mta-sts", action="store_true",
                        help="[delivery] mta_sts = false: no MTA-STS lookups (the TLS "
                        "policy's only per-domain DNS cost; compare with and without)")
    parser.add_argument("--suppressed", type=int, default=0, metavar="N",
                        help="compare N suppression entries against none (see above)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --suppressed or --shaping: runs of each, alternated "
                             "(median)")
    parser.add_argument("--entries", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shaping", action="store_true",
                        help="compare today's configuration with shaping on (see above)")
    parser.add_argument("--shaping-mode", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shaping:
        return compare_shaping(list(sys.argv[1:] if argv is None else argv), args)
    if args.suppressed:
        return compare_suppressed(list(sys.argv[1:] if argv is None else argv), args)
    messages = args.messages or (10_000 if args.quick else 100_000)
    domains = args.domains or (200 if args.quick else 1_000)
    sinks = min(args.sinks, domains)
    limit = args.limit
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) > 1
    if pin:
        os.sched_setaffinity(0, {cpus[-1]})  # the peers, started below, inherit it

    base = Path(tempfile.mkdtemp(prefix="ferry-bench-fanout-", dir=args.dir))
    spool = base / "spool"
    print(f"Python {platform.python_version()}, uvloop {version('uvloop')}, "
          f"{os.cpu_count()} CPUs; {messages:,} messages to {domains:,} domains, limit "
          f"{limit}, {sinks} smtp-sinks (-w {args.sink_delay}); peers on CPU "
          f"{cpus[-1] if pin else 'any'}, Ferry on any; spool under {base}",
          flush=True)
    sink_procs: list[subprocess.Popen[bytes]] = []
    ferry: subprocess.Popen[str] | None = None
    spy: subprocess.Popen[bytes] | None = None
    responder: subprocess.Popen[str] | None = None
    sampler: Sampler | None = None
    try:
        body = make_body(args.body_size)
        fill_rate = uvloop.run(fill(spool / "queue", messages, domains, body, args.entries))
        print(f"  filled {messages:,} messages at {fill_rate:,.0f}/s (durability os)",
              flush=True)
        port = free_port(sink_address(0))
        sink_procs = start_sinks(sinks, port, args.sink_delay, base)
        (base / "zone").write_text(zone(domains, sinks))
        responder = subprocess.Popen(
            [sys.executable, "-m", "engine.testing.dns", str(base / "zone")],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert responder.stdout is not None
        _, dns_host, dns_port = responder.stdout.readline().split()
        sampler = Sampler(port, args.sample)
        sampler.start()
        driver_args = {"spool": str(spool), "dns": [dns_host, int(dns_port)], "port": port,
                       "limit": limit, "retry": 5.0, "window": args.window, "timeout": args.timeout,
                       "shaping": args.shaping_mode, "mta_sts": not args.no_mta_sts}
        ferry = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(driver_args)],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if pin
                                 else None)
        assert ferry.stdout is not None
        done: dict[str, Any] = {}
        started: dict[str, Any] = {}
        peak_workers_sampled = 0
        wall_deadline = time.monotonic() + args.timeout + 60
        for line in ferry.stdout:
            event = json.loads(line)
            if event["event"] == "started":
                started = event
                print(f"  Ferry pid {event['pid']} started in {event['start_s']:.3f} s "
                      f"with {event['queued']:,} queued", flush=True)
                spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                if args.profile and Path(spy_bin).exists():
                    spy = subprocess.Popen(
                        [spy_bin, "record", "-p", str(event["pid"]), "-r", "200", "--gil",
                         "--format", "raw", "-o", str(base / "profile.txt"),
                         "-d", str(args.profile_seconds)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elif event["event"] == "progress":
                peak_workers_sampled = max(peak_workers_sampled, event["workers"])
                print(f"  t={event['t']:6.1f} s  left {event['left']:>8,}  delivered "
                      f"{event['delivered']:>8,}  connections {event['open']:>6,}  "
                      f"workers {event['workers']:>6,}  sites {event['sites']:>5,}  window "
                      f"{event['held']:>6,} ({event['queued']:,} at sites, "
                      f"{event['resolving']:,} resolving)  commits {event['commits']:,}",
                      flush=True)
            else:
                done = event
            if time.monotonic() > wall_deadline:
                break
        ferry.wait(30)
        sampler.stop()
        if spy is not None:
            spy.wait(60)
        if not done or not started:
            print("Ferry did not finish; see its log above", file=sys.stderr)
            return 1
        time.sleep(0.5)  # the sinks print their counters when sessions end
        received = sink_messages(base, sinks)
        if spy is not None and (base / "profile.txt").exists():
            shutil.copy(base / "profile.txt", args.profile_out)
        profile = (summarize_profile(base / "profile.txt")
                   if spy is not None and (base / "profile.txt").exists() else [])
    finally:
        if sampler is not None:
            sampler.stop()
        if ferry is not None:
            stop_process(ferry)
        if spy is not None:
            stop_process(spy, signal.SIGINT)
        for proc in sink_procs:
            stop_process(proc)
        if responder is not None:
            stop_process(responder)
        shutil.rmtree(base, ignore_errors=True)

    # --- report ---
    elapsed = float(done["elapsed"])
    delivered = int(done["delivered"])
    rate = delivered / elapsed
    st = done["status"]
    hwm_mb = st["VmHWM"] / 1024
    site_peak: dict[str, int] = done["site_peak"]
    conn_peak: dict[str, int] = done["conn_peak"]
    worker_max = max(site_peak.values(), default=0)
    at_limit = sum(1 for v in site_peak.values() if v == limit)
    conn_max = max(conn_peak.values(), default=0)
    conn_at_limit = sum(1 for v in conn_peak.values() if v == limit)
    over = sorted(((v, k) for k, v in conn_peak.items() if v > limit), reverse=True)
    per_sink_domains: Counter[str] = Counter(sink_address(domain_sink(i, sinks))
                                             for i in range(domains))
    sink_over = {a: (n, per_sink_domains[a] * limit) for a, n in sampler.peak_per_sink.items()
                 if n > per_sink_domains[a] * limit}
    bound = domains * limit / args.sink_delay if args.sink_delay else float("inf")
    rows = [
        ["messages delivered (Ferry / sinks' counters)", f"{delivered:,} / {received:,}"],
        ["wall time, App.start() → queue empty", f"{elapsed:.2f} s"],
        ["first delivery after App.start()", f"{done['first'] or 0:.2f} s"],
        ["deliveries/s", f"{rate:,.0f}"],
        ["sink bound (domains x limit / delay)",
         f"{bound:,.0f}/s" if args.sink_delay else "none (no delay)"],
        ["peak connections open (ss, client ends)", f"{sampler.peak_clients:,}"],
        ["peak connections open (Ferry's count)", f"{done['conn_peak_total']:,}"],
        ["peak concurrent deliveries (workers, 1 s samples)", f"{peak_workers_sampled:,}"],
        ["connections opened in total", f"{done['opened']:,}"],
        ["per-domain peak workers: max / domains at limit",
         f"{worker_max} / {at_limit:,} of {len(site_peak):,}"],
        ["per-domain peak connections: max / domains at limit",
         f"{conn_max} / {conn_at_limit:,} of {len(conn_peak):,}"],
        ["per-sink-address peak (ss) over its bound", f"{len(sink_over)} addresses"],
        ["Ferry RSS peak (VmHWM)", f"{hwm_mb:,.0f} MB"],
        ["Ferry CPU (user+sys, all threads, queue writer process included)",
         f"{done['cpu']:.1f} s"],
        ["CPU per delivery", f"{1e6 * done['cpu'] / max(1, delivered):,.0f} µs"],
        ["ss samples (cost in this process)",
         f"{sampler.samples:,} ({1e3 * sampler.cost / max(1, sampler.samples):.0f} ms each)"],
    ]
    print()
    print(table(["measure", "value"], rows))
    if over:
        print(f"\n  domains whose open connections exceeded the limit {limit} "
              f"(Ferry's count): {len(over)}, e.g. "
              + ", ".join(f"{k}={v}" for v, k in over[:5]))
    if sink_over:
        print("  sink addresses above domains x limit: "
              + ", ".join(f"{a}={n}>{b}" for a, (n, b) in list(sink_over.items())[:5]))
    if profile:
        print("\nProfile of the Ferry process (py-spy, 200 Hz):")
        print("\n".join(profile))
    limits_ok = worker_max == limit and conn_max <= limit and not sink_over
    print()
    print("Targets:")
    print(f"  {verdict(rate >= TARGET_RATE and delivered == messages)}  deliveries/s: "
          f"{rate:,.0f} (target >= {TARGET_RATE:,.0f}, all {messages:,} delivered: "
          f"{delivered == messages and received >= messages})")
    print(f"  {verdict(sampler.peak_clients >= TARGET_CONNECTIONS)}  connections open at "
          f"once: {sampler.peak_clients:,} (target >= {TARGET_CONNECTIONS:,})")
    print(f"  {verdict(limits_ok)}  per-domain peak == limit {limit}, never above: workers "
          f"max {worker_max}, connections max {conn_max}, sink addresses over bound "
          f"{len(sink_over)}")
    if messages < 100_000 or domains < 1_000:
        print(f"  (run with {messages:,} messages and {domains:,} domains, not the "
              f"100,000 and 1,000 of the issue)")
    print(SUMMARY + json.dumps({"rate": rate, "delivered": delivered,
                                "cpu_us": 1e6 * done["cpu"] / max(1, delivered),
                                "start_s": started["start_s"], "hwm_mb": hwm_mb}))
    return 0


#: The line a child run ends its report with (read by compare_suppressed).
SUMMARY = "SUMMARY "


def _without(argv: list[str], *names: str) -> list[str]:
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in names:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def rcpt_cost(entries: int, checks: int = 200_000) -> tuple[float, float, float]:
    """µs per RCPT check by the suppression agent: with ``entries`` on the list (a miss,
    a hit) and with none (a miss), on parsed RCPT commands, in this process."""
    import ipaddress
    import statistics

    from engine.agents.api import Session, Transaction
    from engine.agents.suppress import SuppressAgent
    from engine.protocol.command import parse_command
    from engine.queue.suppression import SuppressionList

    base = Path(tempfile.mkdtemp(prefix="ferry-bench-suppress-", dir="/tmp"))
    try:
        store = LmdbQueue(base / "queue", durability="os", min_free_disk=0)
        try:
            uvloop.run(suppress(store, entries))
            full = SuppressionList(store)
            uvloop.run(full.load())
        finally:
            store.close_sync()
        empty = SuppressionList(store)
        session = Session("smtp-1", "default", ipaddress.ip_address("127.0.0.1"),
                          may_relay=True)
        tx = Transaction(parse_command(b"MAIL FROM:<a@client.test>"))
        miss = [parse_command(f"RCPT TO:<u{n}@d{n % 1000}.test>".encode())
                for n in range(1000)]
        hit = [parse_command(f"RCPT TO:<gone{n}@s{n % 1000}.test>".encode())
               for n in range(1000)]

        def timed(agent: SuppressAgent, rcpts: list[Any]) -> float:
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(checks // len(rcpts)):
                    for rcpt in rcpts:
                        agent.rcpt(session, tx, rcpt)
                runs.append((time.perf_counter() - t0) / checks * 1e6)
            return statistics.median(runs)

        return (timed(SuppressAgent(full), miss), timed(SuppressAgent(full), hit),
                timed(SuppressAgent(empty), miss))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def compare_suppressed(argv: list[str], args: argparse.Namespace) -> int:
    """Child runs with ``--entries N`` and with none, alternated ``--rounds`` times."""
    import statistics

    child = [sys.executable, __file__, *_without(argv, "--suppressed", "--rounds",
                                                 "--entries")]
    results: dict[int, list[dict[str, Any]]] = {0: [], args.suppressed: []}
    for n in range(args.rounds):
        order = (0, args.suppressed) if n % 2 == 0 else (args.suppressed, 0)
        for entries in order:
            print(f"--- round {n + 1}: {entries:,} suppression entries", flush=True)
            run = subprocess.run([*child, "--entries", str(entries)], capture_output=True,
                                 text=True, timeout=args.timeout + 600)
            lines = [line for line in run.stdout.splitlines() if line.startswith(SUMMARY)]
            if run.returncode or not lines:
                print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
                return 1
            summary = json.loads(lines[-1][len(SUMMARY):])
            print(f"    {summary['rate']:,.0f} deliveries/s, {summary['cpu_us']:,.0f} µs "
                  f"CPU per delivery, start {summary['start_s']:.3f} s, RSS peak "
                  f"{summary['hwm_mb']:,.0f} MB", flush=True)
            results[entries].append(summary)

    def median(entries: int, key: str) -> float:
        return float(statistics.median(r[key] for r in results[entries]))

    off, on = 0, args.suppressed
    ratio = median(on, "rate") / median(off, "rate")
    # Each round's pair ran back to back: its ratio is less exposed to a load that drifts
    # over the minutes of the whole comparison (a shared machine).
    pairs = statistics.median(a["rate"] / b["rate"]
                              for a, b in zip(results[on], results[off], strict=True))
    cpu_ratio = median(on, "cpu_us") / median(off, "cpu_us")
    miss, hit, empty = rcpt_cost(args.suppressed)
    rows = [
        ["deliveries/s (median)", f"{median(off, 'rate'):,.0f}", f"{median(on, 'rate'):,.0f}"],
        ["CPU per delivery (median)", f"{median(off, 'cpu_us'):,.0f} µs",
         f"{median(on, 'cpu_us'):,.0f} µs"],
        ["start-up (App.start(), list loaded)", f"{median(off, 'start_s'):.3f} s",
         f"{median(on, 'start_s'):.3f} s"],
        ["RSS peak", f"{median(off, 'hwm_mb'):,.0f} MB", f"{median(on, 'hwm_mb'):,.0f} MB"],
        ["RCPT check, a recipient not listed", f"{empty:.3f} µs", f"{miss:.3f} µs"],
        ["RCPT check, a listed recipient (refused)", "-", f"{hit:.3f} µs"],
    ]
    print()
    print(table(["measure", "no entries", f"{args.suppressed:,} entries"], rows))
    print()
    print(f"  {verdict(ratio >= 0.90)}  deliveries/s with {args.suppressed:,} entries / "
          f"without: {ratio:.3f} (target >= 0.90; {args.rounds} rounds, medians); "
          f"median of the rounds' own ratios {pairs:.3f}; CPU per delivery {cpu_ratio:.3f}x")
    return 0


def compare_shaping(argv: list[str], args: argparse.Namespace) -> int:
    """Child runs with ``--shaping-mode off`` and ``on`` (plus ``--entries N`` with
    ``--suppressed N``), alternated ``--rounds`` times."""
    import statistics

    # (--shaping takes no value: dropped first, _without drops a flag with its value)
    argv = [item for item in argv if item != "--shaping"]
    child = [sys.executable, __file__, *_without(argv, "--suppressed", "--rounds", "--entries",
                                                 "--shaping-mode")]
    modes = {"off": ["--shaping-mode", "off"],
             "on": ["--shaping-mode", "on", "--entries", str(args.suppressed)]}
    results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for n in range(args.rounds):
        for mode in ("off", "on") if n % 2 == 0 else ("on", "off"):
            print(f"--- round {n + 1}: shaping {mode}", flush=True)
            run = subprocess.run([*child, *modes[mode]], capture_output=True, text=True,
                                 timeout=args.timeout + 600)
            lines = [line for line in run.stdout.splitlines() if line.startswith(SUMMARY)]
            if run.returncode or not lines:
                print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
                return 1
            summary = json.loads(lines[-1][len(SUMMARY):])
            limits = [line for line in run.stdout.splitlines() if "per-domain peak ==" in line]
            print(f"    {summary['rate']:,.0f} deliveries/s, {summary['cpu_us']:,.0f} µs CPU "
                  f"per delivery; {limits[-1].strip() if limits else ''}", flush=True)
            results[mode].append(summary)

    def median(mode: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[mode]))

    ratio = median("on", "rate") / median("off", "rate")
    cpu_ratio = median("on", "cpu_us") / median("off", "cpu_us")
    on = "shaping on" + (f" + {args.suppressed:,} suppressed" if args.suppressed else "")
    print()
    print(table(["configuration", "deliveries/s (runs)", "median", "CPU µs/delivery (median)"],
                [[name, " ".join(f"{r['rate']:,.0f}" for r in results[mode]),
                  f"{median(mode, 'rate'):,.0f}", f"{median(mode, 'cpu_us'):,.0f}"]
                 for name, mode in (("today (no shaping)", "off"), (on, "on"))]))
    print(f"\n  {verdict(ratio >= 0.90)}  {on} / today: {ratio:.2f}x deliveries/s (target "
          f">= 0.90; {args.rounds} rounds, medians), CPU per delivery {cpu_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Webhooks at delivery rate: do they keep up, and what do they cost the server?

A whole Ferry (``engine.testing.server.RunningFerry``: the queue writer process with fsync,
the tracking log on) gets DELIVER events fed into its event hub on its own loop, paced at
``--rate`` events a second for ``--seconds`` (the records a real delivery emits, field for
field), twice in the same run:

- ``off``: no webhook (the baseline: the hub and the tracking log alone);
- ``on``: one ``[[webhook]]`` (batch_size ``--batch``) POSTing to a receiver in another
  process (``python -m engine.testing.webhooks``: it counts, keeps nothing).

It prints, for ``on``: events produced and POSTed per second (POSTed = acknowledged by the
receiver, so deleted from the queue), their ratio, the largest backlog sampled (every
50 ms) and the backlog left at the end, and for both: the CPU of the server (its loop and
threads, plus the writer process) per 1,000 events and the commits per second, with the
on/off ratios.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_webhooks.py            # about 30 s
    PYTHONPATH=. .venv/bin/python benchmarks/bench_webhooks.py --rate 5000 --seconds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from engine.config import WebhookConfig
from engine.ops.events import Kind
from engine.queue.records import new_id
from engine.testing.server import RunningFerry, ferry_config

SECRET = "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Run:
    produced: int = 0
    seconds: float = 0.0
    posted: int = 0
    max_backlog: int = 0
    left: int = 0
    drain: float = 0.0
    cpu: float = 0.0
    writer_cpu: float = 0.0
    commits: int = 0
    posts: int = 0


def run(workdir: Path, rate: float, seconds: float, batch: int, url: str | None,
        count_url: str | None) -> Run:
    config = ferry_config(workdir / "spool")
    if url is not None:
        config = dataclasses.replace(config, webhook=(WebhookConfig(
            name="bench", url=url, secret=SECRET, batch_size=batch, max_backlog=1_000_000,
            retry_interval=0.1, max_retry_interval=1.0),))
    result = Run()
    with RunningFerry(config) as f:
        app, loop = f.app, f.loop
        hooks = app.webhooks
        qid = new_id()

        def feed(n: int) -> None:
            for _ in range(n):
                app.events.emit(Kind.DELIVER, qid, "20261206100203.1234@app.example.com",
                                recipient="bob@example.net", host="mx1.example.net",
                                address="192.0.2.25:25", reply="250 2.0.0 Ok: queued as 4XyZ",
                                tls="TLSv1.3 TLS_AES_256_GCM_SHA384", attempt=1, delay=0.539,
                                connector="")

        def backlog() -> int:
            if hooks is None or not hooks.hooks:
                return 0
            hook = hooks.hooks["bench"]
            return hook.stored + hook.adding

        me, writer = os.getpid(), f.store.writer_pid
        cpu0 = cpu_seconds(me) + cpu_seconds(writer)
        writer0 = cpu_seconds(writer)
        commits0 = f.store.stats.commits
        began = time.monotonic()
        next_sample = began
        while (now := time.monotonic()) - began < seconds:
            due = int((now - began) * rate) - result.produced
            if due > 0:
                loop.call_soon_threadsafe(feed, due)
                result.produced += due
            if now >= next_sample:
                result.max_backlog = max(result.max_backlog, backlog())
                next_sample = now + 0.05
            time.sleep(0.005)
        result.seconds = time.monotonic() - began
        result.cpu = cpu_seconds(me) + cpu_seconds(writer) - cpu0
        result.writer_cpu = cpu_seconds(writer) - writer0
        result.commits = f.store.stats.commits - commits0
        if count_url is not None:
            result.posted = accepted(count_url)
            result.posts = hooks.hooks["bench"].posts if hooks is not None else 0
            result.left = backlog()
            drained = time.monotonic()
            while backlog() and time.monotonic() - drained < 60:
                time.sleep(0.01)
            result.drain = time.monotonic() - drained
    return result


def accepted(count_url: str) -> int:
    with urllib.request.urlopen(count_url, timeout=10) as answer:
        count: int = json.load(answer)["accepted"]
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=3000.0, help="events a second fed")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of feeding")
    parser.add_argument("--batch", type=int, default=100, help="the webhook's batch_size")
    parser.add_argument("--dir", default=None, help="where the temporary spools go")
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen(
        [sys.executable, "-m", "engine.testing.webhooks", str(port), SECRET],
        stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == b"ready"
        count_url = f"http://127.0.0.1:{port}/count"
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            off = run(Path(tmp) / "off", args.rate, args.seconds, args.batch, None, None)
            before = accepted(count_url)
            on = run(Path(tmp) / "on", args.rate, args.seconds, args.batch,
                     f"http://127.0.0.1:{port}/hook", count_url)
            on.posted -= before
    finally:
        receiver.terminate()
        receiver.wait(10)
    produced_rate = on.produced / on.seconds
    posted_rate = on.posted / on.seconds
    print(f"webhook on: {on.produced} events in {on.seconds:.1f} s: produced "
          f"{produced_rate:,.0f}/s, POSTed and acknowledged {posted_rate:,.0f}/s "
          f"(ratio {posted_rate / produced_rate:.2f}); max backlog {on.max_backlog:,} "
          f"({on.max_backlog / produced_rate:.2f} s of events), {on.left:,} left at the end, "
          f"drained in {on.drain:.2f} s")
    print(f"{'':12} {'events/s':>9} {'CPU ms/1000 ev':>15} {'writer':>7} {'commits/s':>10}")
    for name, r in (("webhook off", off), ("webhook on", on)):
        print(f"{name:12} {r.produced / r.seconds:>9,.0f} {1e6 * r.cpu / r.produced:>15.1f} "
              f"{1e6 * r.writer_cpu / r.produced:>7.1f} {r.commits / r.seconds:>10,.1f}")
    print(f"on/off: CPU per event {on.cpu / on.produced / (off.cpu / off.produced):.2f}x "
          f"(+{1e6 * (on.cpu / on.produced - off.cpu / off.produced):.0f} µs an event); "
          f"{on.posts} POSTs, {on.produced / max(on.posts, 1):.0f} events a POST")


if __name__ == "__main__":
    main()

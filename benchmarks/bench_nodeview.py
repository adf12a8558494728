"""What the node-wide view costs: the operator's views answered by a node of two workers
(the supervisor's control channel asking both, engine.cluster.fanout; worker 0's admin
API reading both shards, engine.cluster.nodeview) against one ``ferry serve``, with the
same mail queued, in the same run.

Run: ``.venv/bin/python benchmarks/bench_nodeview.py [--quick] [--messages N]
[--rounds N] [--repeat N]`` (about a minute with the defaults).

Per round, for each kind (``one``: ``ferry serve``; ``node``: ``ferry serve --workers
2``), alternated: a server with delivery paused on a fresh spool, N messages submitted
over SMTP by 8 clients on new connections (so the node's kernel spreads them over both
workers), then each view asked ``--repeat`` times, one after the other:

- ``queues``: the control channel's ``queues`` (``ferry queue queues``: every queued
  record read, in a thread of each worker);
- ``stats``: the control channel's ``stats`` (the scheduler's snapshot: memory only);
- ``metrics``: ``GET /metrics`` (the node's: every worker's text, labelled and merged);
- ``list``: ``GET /api/v1/messages?limit=100`` (the oldest 100 of every shard).

Printed: the median latency of each view per kind (medians over the rounds of each
round's median), and the ratio node / one.  Every process started here is stopped by its
PID.  No root needed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.ops import control
from engine.testing.postfix import free_port

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("one", "node")
VIEWS = ("queues", "stats", "metrics", "list")
CLIENTS = 8
PER_CONNECTION = 25


def _config(workdir: Path, smtp: int, http: int) -> Path:
    path = workdir / "ferry.toml"
    path.write_text(f"""
hostname = "ferry.bench"
spool = "{workdir / 'spool'}"
[queue]
min_free_disk = 0
[delivery]
paused = true
dns = "127.0.0.1:9"
[http]
listen = ["127.0.0.1:{http}"]
[[receive]]
listen = ["127.0.0.1:{smtp}"]
relay_networks = ["127.0.0.0/8"]
""", encoding="utf-8")
    return path


def _submit(port: int, count: int, errors: list[str]) -> None:
    body = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"
    sent = 0
    try:
        while sent < count:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                for _ in range(min(PER_CONNECTION, count - sent)):
                    client.sendmail("app@bench.test", [f"r{sent}@dest{sent % 20}.test"],
                                    body)
                    sent += 1
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"GET {path}: {answer.status} {body[:200]!r}")
        return body
    finally:
        conn.close()


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not in {seconds:g} s: {what}")


def one_round(kind: str, messages: int, repeat: int) -> dict[str, float]:
    """Each view's median latency (seconds) for ``kind`` with ``messages`` queued."""
    with tempfile.TemporaryDirectory(prefix="bench-nodeview-") as tmp:
        workdir = Path(tmp)
        smtp, web = free_port(), free_port()
        config = _config(workdir, smtp, web)
        args = [sys.executable, "-m", "engine", "serve", "--config", str(config)]
        if kind == "node":
            args += ["--workers", "2"]
        log = open(workdir / "ferry.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            spool = workdir / "spool"
            sock = control.socket_path(spool)

            def stats() -> dict[str, object]:
                return control.request(sock, {"command": "stats"}, timeout=30)

            _wait(lambda: bool(stats().get("ok")), 60, f"{kind} serving")
            errors: list[str] = []
            threads = [threading.Thread(target=_submit, args=(
                smtp, messages // CLIENTS + (i < messages % CLIENTS), errors))
                for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            if errors:
                raise RuntimeError(f"{kind}: submission failed: {errors[:3]}")
            _wait(lambda: stats()["messages"] == messages, 60, f"{messages} queued")
            views: dict[str, Callable[[], object]] = {
                "queues": lambda: control.request(sock, {"command": "queues"}, timeout=60),
                "stats": stats,
                "metrics": lambda: _get(web, "/metrics"),
                "list": lambda: _get(web, "/api/v1/messages?limit=100"),
            }
            out: dict[str, float] = {}
            for name, view in views.items():
                view()  # warm: the first metrics scrape starts the walk of the hops
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    view()
                    times.append(time.perf_counter() - started)
                out[name] = statistics.median(times)
            return out
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 messages, 2 rounds")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    messages, rounds = (2000, 2) if args.quick else (args.messages, args.rounds)
    print(f"bench_nodeview: {messages} messages queued, {rounds} rounds, {args.repeat} "
          f"asks per view; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    results: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for r in range(rounds):
        for kind in KINDS if r % 2 == 0 else KINDS[::-1]:
            results[kind].append(one_round(kind, messages, args.repeat))
            print(f"  round {r + 1} {kind:>4}: " + "  ".join(
                f"{v} {results[kind][-1][v] * 1000:7.1f} ms" for v in VIEWS), flush=True)
    print(f"\n{'view':<8} {'one (ms)':>9} {'node (ms)':>10} {'node/one':>9}")
    for view in VIEWS:
        one = statistics.median(r[view] for r in results["one"])
        node = statistics.median(r[view] for r in results["node"])
        print(f"{view:<8} {one * 1000:>9.1f} {node * 1000:>10.1f} {node / one:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

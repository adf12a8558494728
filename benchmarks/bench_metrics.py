"""What a Prometheus scrape costs under full relay load: Ferry relaying with and without a
scraper hitting ``GET /metrics`` every 100 ms, in the same run.

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--quick] [--rounds N] [--dir DIR]``
(about a minute with the defaults).  No root needed (no Postfix here).

The relay cell is bench_relay's (``run_cell``: smtp-source with 100 sessions → ``ferry
serve`` with fsync and delivery on → Postfix's smtp-sink, everything on 127.0.0.1, every
process started here stopped by its PID), 1 KiB messages, one per connection (the most
work per message on the receive side).  Three kinds of server, alternated per round:

- ``ferry``: ``[http]`` off (no metrics at all: the baseline);
- ``ferry-http``: ``[http]`` on (the event sink counting deliveries runs), nobody scrapes;
- ``ferry-scraped``: the same, with a scraper thread here asking ``GET /metrics`` every
  100 ms over one keep-alive connection for the whole cell.

Printed: the end-to-end rate of each (medians of the rounds), the ratios
``ferry-scraped / ferry-http`` (what scraping costs) and ``ferry-http / ferry`` (what the
metrics' event sink costs), and the scrape latency (request sent → whole answer read)
at p50 / p99 / max over the scrapes made while SMTP sessions were open (the load).
Targets (issue 14): a scrape under full load answers in under 50 ms, and the SMTP side is
unchanged within noise (ratio ≥ 0.95 on a quiet machine; a shared one moves ±10 %).
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import os
import platform
import re
import shutil
import signal
import smtplib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_relay
from bench_relay import FERRY_CONFIGS, Cell, Result, _stop_children, run_cell

from engine.testing.postfix import free_port

KINDS = ("ferry", "ferry-http", "ferry-scraped")
#: Seconds between two scrapes (a busy Prometheus scrapes every 10-15 s: this is 100x).
INTERVAL = 0.1
LATENCY_TARGET = 0.050
RATE_TARGET = 0.95
_OPEN = re.compile(rb"^ferry_connections_in\{[^}]*\} (\S+)$", re.MULTILINE)
_RENDER = re.compile(rb"^ferry_metrics_render_seconds (\S+)$", re.MULTILINE)


class Scraper:
    """GET /metrics every ``INTERVAL`` on one keep-alive connection, from its own thread,
    until stopped; keeps the latency of each scrape made while the load's sessions were
    open, and right after it of a ``GET /healthz`` (an HTTP request that does nothing) and
    of an SMTP NOOP on a session of its own: what any request waits for the event loop's
    turn at that moment (the baselines a scrape cannot beat)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loaded: list[float] = []
        self.health: list[float] = []
        self.noops: list[float] = []
        #: the server's own time rendering (ferry_metrics_render_seconds, the one before)
        self.renders: list[float] = []
        self.scrapes = 0
        self.errors = 0
        self.size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _get(self, conn: http.client.HTTPConnection, path: str) -> tuple[float, bytes]:
        started = time.perf_counter()
        conn.request("GET", path)
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            self.errors += 1
        return time.perf_counter() - started, body

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        smtp: smtplib.SMTP | None = None
        tick = 0
        while not self._stop.wait(INTERVAL):
            tick += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                # In turn first and second: neither always meets the loop after the pause.
                if tick % 2:
                    took, body = self._get(conn, "/metrics")
                    health, _ = self._get(conn, "/healthz")
                else:
                    health, _ = self._get(conn, "/healthz")
                    took, body = self._get(conn, "/metrics")
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", _PORTS[-1], timeout=5)
                started = time.perf_counter()
                smtp.noop()
                noop = time.perf_counter() - started
            except (OSError, smtplib.SMTPException):  # not up yet, or gone: connect again
                for link in (conn, smtp):
                    if link is not None:
                        link.close()
                conn = smtp = None
                continue
            self.scrapes += 1
            self.size = len(body)
            # More sessions open than the probe's own: the load runs.
            if sum(float(n) for n in _OPEN.findall(body)) > 1:
                self.loaded.append(took)
                self.health.append(health)
                self.noops.append(noop)
                self.renders += [float(n) for n in _RENDER.findall(body)]
        for link in (conn, smtp):
            if link is not None:
                link.close()


def config(http_port: int | None) -> str:
    # Room for the NOOP probe's session beside smtp-source's 100, in every kind alike.
    text = ('[queue]\ndurability = "fsync"\n\n[[receive]]\nname = "default"\n'
            'max_connections_per_ip = 200\n')
    if http_port is not None:
        text += f'\n[http]\nlisten = ["127.0.0.1:{http_port}"]\n'
    return text


def run(kind: str, cell: Cell, base: Path) -> tuple[Result, Scraper | None]:
    port = free_port() if kind != "ferry" else None
    FERRY_CONFIGS[kind] = config(port)
    if kind != "ferry-scraped" or port is None:
        return run_cell(kind, cell, base), None
    with Scraper(port) as scraper:
        result = run_cell(kind, cell, base)
    return result, scraper


#: The ports bench_relay's free_port handed out, in order: run_cell picks the sink's and
#: then the server's listen port with it, so the last one is the port the NOOP probe uses
#: (read once /metrics answers: by then the server is up).
_PORTS: list[int] = []


def _recording_free_port(host: str = "127.0.0.1") -> int:
    _PORTS.append(free_port(host))
    return _PORTS[-1]


setattr(bench_relay, "free_port", _recording_free_port)  # noqa: B010  (a module's import)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer messages per cell")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three kinds, "
                        "alternating their order; medians are compared")
    parser.add_argument("--dir", default="/work", help="where the temporary spools go")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"which servers to run, in this order (default {','.join(KINDS)})")
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k in KINDS)
    atexit.register(_stop_children)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cell = Cell(1024, False, 2000 if args.quick else 5000)
    base = Path(tempfile.mkdtemp(prefix="bench_metrics.", dir=args.dir))
    os.chmod(base, 0o755)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; Python "
          f"{platform.python_version()}; cell {cell.name}, {cell.messages} messages, "
          f"smtp-source -s {bench_relay.SESSIONS}; scrape every {INTERVAL * 1000:.0f} ms")
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, list[float]] = {kind: [] for kind in KINDS}
    latencies: list[float] = []
    noops: list[float] = []
    health: list[float] = []
    renders: list[float] = []
    scrapes = errors = size = 0
    failed = False
    try:
        print(f"\n{'round':<6} {'server':<14} {'e2e/s':>8} {'CPU µs/msg':>10} {'scrapes':>8}")
        for turn in range(max(1, args.rounds)):
            for kind in kinds if turn % 2 == 0 else kinds[::-1]:
                result, scraper = run(kind, cell, base)
                rate = result.rate(result.e2e)
                rates[kind].append(rate)
                cpu[kind].append(result.cpu / cell.messages * 1e6)
                shown = ""
                if scraper is not None:
                    latencies += scraper.loaded
                    noops += scraper.noops
                    health += scraper.health
                    renders += scraper.renders
                    scrapes += scraper.scrapes
                    errors += scraper.errors
                    size = scraper.size or size
                    shown = f"{len(scraper.loaded)}"
                print(f"{turn + 1:<6} {kind:<14} {rate:>8,.0f} "
                      f"{result.cpu / cell.messages * 1e6:>10,.0f} {shown:>8}", flush=True)
                if result.error:
                    failed = True
                    print(f"  ERROR: {result.error}")
    finally:
        _stop_children()
        shutil.rmtree(base, ignore_errors=True)
    median = {kind: statistics.median(r) if r else 0.0 for kind, r in rates.items()}
    cpus = {kind: statistics.median(c) if c else 0.0 for kind, c in cpu.items()}
    scraped = median["ferry-scraped"] / median["ferry-http"] if median["ferry-http"] else 0
    sink = median["ferry-http"] / median["ferry"] if median["ferry"] else 0
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    worst = max(latencies, default=0.0)
    n50, n99 = percentile(noops, 0.50), percentile(noops, 0.99)
    h50, h99 = percentile(health, 0.50), percentile(health, 0.99)
    print(f"\nmedian e2e/s: ferry {median['ferry']:,.0f}, ferry-http {median['ferry-http']:,.0f}"
          f", ferry-scraped {median['ferry-scraped']:,.0f}")
    print(f"median CPU µs/msg: ferry {cpus['ferry']:,.0f}, ferry-http {cpus['ferry-http']:,.0f}, "
          f"ferry-scraped {cpus['ferry-scraped']:,.0f}")
    print(f"scraped / not scraped: {scraped:.2f}x (target >= {RATE_TARGET}); "
          f"http on / off: {sink:.2f}x")
    print(f"scrape latency under load ({len(latencies)} of {scrapes} scrapes, {errors} errors, "
          f"{size} bytes): p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms (target < {LATENCY_TARGET * 1000:.0f} ms)")
    print(f"  of which rendering on the server's loop (ferry_metrics_render_seconds): p50 "
          f"{percentile(renders, 0.5) * 1000:.2f} ms, p99 {percentile(renders, 0.99) * 1000:.2f}"
          f" ms, max {max(renders, default=0.0) * 1000:.2f} ms")
    print(f"GET /healthz beside each: p50 {h50 * 1000:.1f} ms, p99 {h99 * 1000:.1f} ms, "
          f"max {max(health, default=0.0) * 1000:.1f} ms")
    print(f"SMTP NOOP after both (the loop's own delay): p50 {n50 * 1000:.1f} ms, "
          f"p99 {n99 * 1000:.1f} ms, max {max(noops, default=0.0) * 1000:.1f} ms")
    ok = (not failed and latencies and p99 < LATENCY_TARGET and scraped >= RATE_TARGET)
    print(f"verdict: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()

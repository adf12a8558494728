"""The injection API (``POST /api/v1/messages``) against SMTP ingest, in one run.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_inject.py [--quick] [--rounds N]
[--dir DIR] [--against TREE]`` (about a minute; ``--quick`` a third of it; ``--rounds N``
runs the four injection cells N times, alternating, and reports the medians; ``--against
TREE`` runs every cell on another checkout too, e.g. ``/work/main``, alternating the two
in each round, and prints each cell's medians side by side: a before/after in one run).
Needs Postfix's ``smtp-source`` and nghttp2's ``h2load``.  Run it as root: it turns the
kernel's autogroup off for the run, as bench_relay.py does (benchmarks/autogroup.py;
``--keep-autogroup`` leaves it).

Two measurements, each against a fresh ``ferry serve`` (one process, delivery paused, the
defaults otherwise: LMDB with fsync, so both answers come after the commit that holds the
message) that listens for SMTP and for HTTP (``[http] listen``):

1. **HTTP against SMTP.**  ``smtp-source -d -s 100 -m N -l 1024`` (100 sessions, up to
   ``N / 100`` messages per connection, 1 KiB) into the SMTP port; then the same ``N``
   messages as ``POST``s of the raw form of a 1 KiB message with one recipient over 100
   keep-alive HTTP/1.1 connections, from three clients in turn: **h2load** (nghttp2's load
   generator, ``h2load --h1 -c 100 -m 1``: C, one thread, one request in flight per
   connection, the counterpart of the C smtp-source, so the ratio compares the two doors
   and not the load tools; Debian's ``nghttp2-client``, installed by tests/run.sh), aiohttp
   clients (one ``ClientSession``, uvloop, in this process: Python, so they take CPU the
   server then lacks, and their ratio is a floor), and raw keep-alive connections in this
   process (a prepared request written, the answer read by its Content-Length).  Reported:
   messages/s of each (wall time of the load), the ratio h2load / SMTP (target ≥ 1.0) and
   the others', and the CPU seconds of Ferry's process tree (server and queue writer, from
   ``/proc``) per message: what a message costs the server by each door.
2. **Bulk.**  One request with 10,000 recipients, each with its own ``{{name}}``
   substitution (10,000 distinct messages with subject, text and html), timed from the
   request to its 200: recipients queued per second (target ≥ 20,000/s); best of three.

The messages stored are counted in LMDB after each cell (they must match).  Only
127.0.0.1 is used; every load is bounded by a count and a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import lmdb
import orjson
import uvloop
from autogroup import autogroup_off
from bench_inbound import SMTP_SOURCE, ChildServer, free_port, settle_cpu, tree_cpu

SESSIONS = 100
H2LOAD = "/usr/bin/h2load"
SENDER = "a@client.test"
RECIPIENT = "b@example.net"
TARGET_RATIO = 1.0
TARGET_BULK = 20_000
BULK = 10_000


class Ferry(ChildServer):
    """``ferry serve`` (the engine on PYTHONPATH, or ``tree``'s) with SMTP and HTTP
    listeners."""

    label = "ferry"

    def __init__(self, base: Path, tree: Path | None = None) -> None:
        super().__init__(base)
        self.tree = tree

    def _spawn(self, argv: list[str]) -> None:
        if self.tree is None:
            super()._spawn(argv)
            return
        # `python -m engine` imports from its working directory first: run it in the tree.
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.tree, start_new_session=True,
                                         env={**os.environ, "PYTHONPATH": str(self.tree)})
        self.pid = self.proc.pid

    def _start(self) -> None:
        self.http_port = free_port()
        config = self.dir / "ferry.toml"
        config.write_text(f'[delivery]\npaused = true\n\n[http]\nlisten = ["127.0.0.1:'
                          f'{self.http_port}"]\n')
        self._spawn([sys.executable, "-m", "engine", "serve", "--config", str(config),
                     "--listen", f"127.0.0.1:{self.port}", "--spool", str(self.dir / "spool"),
                     "--hostname", "bench.test"])

    def stored(self) -> int:
        self.stop()  # read LMDB after the writer closed the store
        env = lmdb.open(str(self.dir / "spool" / "queue"), readonly=True, lock=False,
                        max_dbs=16)
        try:
            with env.begin() as txn:
                n: int = txn.stat(env.open_db(b"envelopes", txn=txn, create=False))["entries"]
        finally:
            env.close()
        return n


def _started(base: Path, tree: Path | None = None) -> Ferry:
    ferry = Ferry(base, tree)
    ferry.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the HTTP listener starts after the SMTP one
        try:
            asyncio.run(_get(f"http://127.0.0.1:{ferry.http_port}/healthz"))
            return ferry
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the HTTP listener did not come up")


async def _get(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        await answer.read()


def smtp_cell(base: Path, n: int, tree: Path | None = None) -> tuple[float, float]:
    """(messages/s, server CPU µs per message) of smtp-source -d into Ferry."""
    ferry = _started(base, tree)
    try:
        cpu = tree_cpu(ferry.pid)
        started = time.perf_counter()
        subprocess.run([SMTP_SOURCE, "-d", "-s", str(SESSIONS), "-m", str(n), "-l", "1024",
                        "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{ferry.port}"],
                       check=True, timeout=300, stdout=subprocess.DEVNULL)
        took = time.perf_counter() - started
        cpu = settle_cpu(ferry.pid) - cpu
        stored = ferry.stored()
    finally:
        ferry.cleanup()
    if stored != n:
        raise RuntimeError(f"SMTP: {stored} messages stored, {n} sent")
    return n / took, cpu / n * 1e6


def _message() -> bytes:
    head = (f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: bench\n"
            "Date: Sun, 06 Dec 2026 10:00:00 +0000\nMessage-ID: <bench@client.test>\n\n")
    line = "x" * 70 + "\n"
    body = line * ((1024 - len(head)) // len(line))
    return orjson.dumps({"from": SENDER, "recipients": [RECIPIENT], "content": head + body})


async def _http_load(url: str, n: int) -> float:
    payload = _message()
    headers = {"Content-Type": "application/json"}
    todo = iter(range(n))
    failures: list[int] = []
    connector = aiohttp.TCPConnector(limit=SESSIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            for _ in todo:
                async with session.post(url, data=payload, headers=headers) as answer:
                    await answer.read()
                    if answer.status != 200:
                        failures.append(answer.status)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(SESSIONS)))
        took = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"HTTP: {len(failures)} requests failed: {sorted(set(failures))}")
    return n / took


async def _raw_load(port: int, n: int) -> float:
    """``_http_load`` with a client as cheap as smtp-source: each of the 100 connections
    writes a prepared HTTP/1.1 request and reads the answer's head and its Content-Length
    body (keep-alive), no client library."""
    payload = _message()
    request = (b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(payload), payload))
    todo = iter(range(n))
    failures: list[bytes] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in todo:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200"):
                    failures.append(head.split(b"\r\n")[0])
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(SESSIONS)))
    took = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"HTTP: {len(failures)} requests failed: {sorted(set(failures))}")
    return n / took


def _h2load(url: str, n: int) -> float:
    """``n`` POSTs by h2load over :data:`SESSIONS` keep-alive connections; every answer
    must be a 200."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body:
        body.write(_message())
        body.flush()
        started = time.perf_counter()
        out = subprocess.run([H2LOAD, "--h1", "-n", str(n), "-c", str(SESSIONS), "-m", "1",
                              "-d", body.name, "-H", "content-type: application/json", url],
                             check=True, timeout=300, capture_output=True, text=True).stdout
        took = time.perf_counter() - started
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if codes is None or int(codes.group(1)) != n:
        raise RuntimeError(f"HTTP: not every h2load request got a 2xx:\n{out}")
    return n / took


#: The HTTP clients of :func:`http_cell`, by name.
CLIENTS = ("h2load", "aiohttp", "raw")


def http_cell(base: Path, n: int, client: str = "h2load",
              tree: Path | None = None) -> tuple[float, float]:
    """(messages/s, server CPU µs per message) of the keep-alive ``client`` (one of
    :data:`CLIENTS`) into Ferry."""
    ferry = _started(base, tree)
    url = f"http://127.0.0.1:{ferry.http_port}/api/v1/messages"
    try:
        cpu = tree_cpu(ferry.pid)
        if client == "h2load":
            rate = _h2load(url, n)
        else:
            rate = uvloop.run(_raw_load(ferry.http_port, n) if client == "raw" else
                              _http_load(url, n))
        cpu = settle_cpu(ferry.pid) - cpu
        stored = ferry.stored()
    finally:
        ferry.cleanup()
    if stored != n:
        raise RuntimeError(f"HTTP: {stored} messages stored, {n} posted")
    return rate, cpu / n * 1e6


def _bulk_request() -> bytes:
    return orjson.dumps({
        "from": SENDER,
        "recipients": [{"email": f"user{i}@example.net", "substitutions": {"name": f"User {i}"}}
                       for i in range(BULK)],
        "subject": "Your order, {{name}}",
        "text": "Dear {{name}},\n\n" + "Your order has shipped and is on its way.\n" * 8,
        "html": "<p>Dear {{name}},</p>" + "<p>Your order has shipped.</p>" * 8,
    })


async def _bulk(url: str, rounds: int) -> list[float]:
    payload = _bulk_request()
    rates = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(rounds):
            started = time.perf_counter()
            async with session.post(url, data=payload,
                                    headers={"Content-Type": "application/json"}) as answer:
                doc = await answer.json()
                took = time.perf_counter() - started
                if answer.status != 200 or len(doc["ids"]) != BULK:
                    raise RuntimeError(f"bulk: {answer.status} {str(doc)[:300]}")
            rates.append(BULK / took)
    return rates


def bulk_cell(base: Path, rounds: int, tree: Path | None = None) -> tuple[list[float], float]:
    """(recipients/s of each round, server CPU µs per recipient)."""
    ferry = _started(base, tree)
    try:
        cpu = tree_cpu(ferry.pid)
        rates = uvloop.run(_bulk(f"http://127.0.0.1:{ferry.http_port}/api/v1/messages",
                                 rounds))
        cpu = settle_cpu(ferry.pid) - cpu
        stored = ferry.stored()
    finally:
        ferry.cleanup()
    if stored != BULK * rounds:
        raise RuntimeError(f"bulk: {stored} messages stored, {BULK * rounds} posted")
    return rates, cpu / (BULK * rounds) * 1e6


def _medians(results: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.median(r for r, _ in results),
            statistics.median(c for _, c in results))


def against(base: Path, n: int, rounds: int, tree: Path) -> None:
    """Every cell on ``tree`` (the baseline) and on this engine, alternating in each
    round; each cell's medians side by side, and this engine's rate / the baseline's."""
    cells: dict[str, Callable[[Path | None], tuple[float, float]]] = {
        "SMTP smtp-source -d": lambda t: smtp_cell(base, n, t),
        **{f"HTTP {client} keep-alive": (lambda c: lambda t: http_cell(base, n, c, t))(client)
           for client in CLIENTS},
        # one request a round; its rate is recipients/s, its CPU per recipient
        "bulk 10,000 recipients": lambda t: (lambda r: (r[0][0], r[1]))(bulk_cell(base, 1, t)),
    }
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for i in range(rounds):
        line = []
        for name, cell in cells.items():
            for side, where in (("base", tree), ("this", None)):
                got.setdefault((name, side), []).append(cell(where))
            line.append(f"{name.split()[1 if name.startswith('HTTP') else 0]} "
                        f"{got[name, 'base'][-1][0]:.0f}/{got[name, 'this'][-1][0]:.0f}")
        print(f"round {i + 1} (rate base/this): " + ", ".join(line), flush=True)
    print(f"medians of {rounds} rounds, baseline {tree} against this engine:")
    print(f"{'cell':26s} {'base /s':>8s} {'this /s':>8s} {'ratio':>6s} "
          f"{'base us':>8s} {'this us':>8s}")
    for name in cells:
        (rate_b, cpu_b), (rate_t, cpu_t) = _medians(got[name, "base"]), _medians(got[name, "this"])
        print(f"{name:26s} {rate_b:8.0f} {rate_t:8.0f} {rate_t / rate_b:5.2f}x {cpu_b:8.0f} "
              f"{cpu_t:8.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the spools go (deleted afterwards)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the four injection cells, alternating; medians "
                             "are reported (a shared machine's load moves between cells)")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="another checkout of Ferry (e.g. /work/main) to run every cell "
                             "on too, alternating: before/after in one run (rates per "
                             "second, server CPU us per message or recipient)")
    parser.add_argument("--keep-autogroup", action="store_true",
                        help="leave the kernel's autogroup scheduling as it is (by default a "
                             "run as root turns it off, see benchmarks/autogroup.py)")
    args = parser.parse_args()
    # ferry serve runs in a session of its own (ChildServer): with the autogroup on, the
    # server and its queue writer get one group's share against this process's clients.
    print(autogroup_off() if not args.keep_autogroup and os.geteuid() == 0
          else "autogroup: left as it is")
    for tool, package in ((SMTP_SOURCE, "postfix"), (H2LOAD, "nghttp2-client")):
        if not shutil.which(tool):
            print(f"needs {tool} (Debian's {package}; tests/run.sh installs it)",
                  file=sys.stderr)
            return 2
    n = 5_000 if args.quick else 20_000
    print(f"engine from {os.environ.get('PYTHONPATH') or 'the installed package'}; "
          f"{os.cpu_count()} CPUs; {n} messages of 1 KiB, {SESSIONS} clients")
    if args.against is not None:
        against(args.dir, n, max(args.rounds, 1), args.against.resolve())
        return 0
    cells: dict[str, list[tuple[float, float]]] = {"smtp": [], **{c: [] for c in CLIENTS}}
    for i in range(args.rounds):
        cells["smtp"].append(smtp_cell(args.dir, n))
        for client in CLIENTS:
            cells[client].append(http_cell(args.dir, n, client))
        if args.rounds > 1:
            print(f"round {i + 1}: " + ", ".join(
                f"{name} {got[-1][0]:.0f}/s {got[-1][1]:.0f} us" for name, got in cells.items()))
    medians = {name: _medians(got) for name, got in cells.items()}
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds:")
    smtp, smtp_cpu = medians["smtp"]
    print(f"SMTP  smtp-source -d:     {smtp:6.0f} messages/s, server CPU {smtp_cpu:4.0f} "
          "us/message")
    for client in CLIENTS:
        rate, cpu = medians[client]
        print(f"HTTP  {client + ' keep-alive:':18s} {rate:6.0f} messages/s, server CPU "
              f"{cpu:4.0f} us/message; / SMTP {rate / smtp:.2f}x")
    ratio = medians["h2load"][0] / smtp
    print(f"ratio HTTP (h2load) / SMTP (smtp-source): {ratio:5.2f}x  (target >= "
          f"{TARGET_RATIO:.1f}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'}); server "
          f"CPU per message SMTP / HTTP (h2load) {smtp_cpu / medians['h2load'][1]:.2f}x")
    rates, bulk_cpu = bulk_cell(args.dir, max(args.rounds, 1 if args.quick else 3))
    best = max(rates)
    print(f"bulk: one request, {BULK} personalised recipients: best {best:.0f} "
          f"recipients/s (median {statistics.median(rates):.0f}; target >= {TARGET_BULK}: "
          f"{'met' if best >= TARGET_BULK else 'NOT met'}); server CPU {bulk_cpu:.0f} "
          "us/recipient")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

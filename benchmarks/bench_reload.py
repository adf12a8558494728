"""Reload under load: what reloading the configuration costs the SMTP side.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_reload.py [--messages N]
[--interval S] [--rounds R]`` (about 30 s with the defaults).

In one run, alternating (R rounds each, best kept): a fresh ``ferry serve`` (delivery
paused: receiving and storing with fsync only) takes N 1 KiB messages from Postfix's
``smtp-source`` (50 sessions, ``-d``: many messages per session), once with no reload
(the baseline) and once while a thread asks the server to reload every S seconds over its
control socket (``ferry reload``'s request), each reload with a real change (the
``[delivery] max_per_domain`` alternates), so the whole path runs: read and validate the
file, load the certificate, plan, apply.  Printed: messages/s of both, their ratio, the
reloads made and their latency (request to reply), and that every message was stored (the
server's queue count) and no session failed (``smtp-source``'s exit status).

Only 127.0.0.1 is used; every load is bounded by a message count and a timeout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.ops.control import request, socket_path  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SESSIONS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, spool: Path, port: int, per_domain: int) -> None:
    path.write_text(f"""\
hostname = "bench.test"
spool = "{spool}"
[queue]
min_free_disk = 0
[[receive]]
listen = ["127.0.0.1:{port}"]
[delivery]
paused = true
max_per_domain = {per_domain}
[log]
level = "warning"
""")


def run(messages: int, interval: float | None, base: Path) -> tuple[float, list[float]]:
    """(messages/s, reload latencies in seconds) of one cell on a fresh server."""
    work = Path(tempfile.mkdtemp(prefix="reload.", dir=base))
    port, spool, config = free_port(), work / "spool", work / "ferry.toml"
    write_config(config, spool, port, 20)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with (work / "serve.log").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--config",
                                 str(config)], env=env, stdout=subprocess.DEVNULL, stderr=err)
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request(socket_path(spool), {"command": "stats"}, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((work / "serve.log").read_text()) from None
                time.sleep(0.05)
        done = threading.Event()

        def reloader() -> None:
            n = 0
            while interval is not None and not done.wait(interval):
                n += 1
                write_config(config, spool, port, 20 + n % 2)
                t0 = time.perf_counter()
                reply = request(socket_path(spool), {"command": "reload"})
                latencies.append(time.perf_counter() - t0)
                assert reply["ok"] and reply["applied"] == ["delivery.max_per_domain"], reply

        thread = threading.Thread(target=reloader)
        thread.start()
        t0 = time.perf_counter()
        source = subprocess.run(
            [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(messages), "-l", "1024", "-d",
             "-f", "a@client.test", "-t", "b@example.net", "-M", "client.test",
             f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
        done.set()
        thread.join(60)
        if source.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {source.stderr.strip()[-300:]}")
        stored = request(socket_path(spool), {"command": "stats"})["messages"]
        if stored != messages:
            raise RuntimeError(f"stored {stored} of {messages}")
        return messages / wall, latencies
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between reloads in the reloading cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the spools go")
    args = parser.parse_args()
    if not Path(SMTP_SOURCE).exists():
        print(f"{SMTP_SOURCE} is needed (Debian: postfix)", file=sys.stderr)
        return 1
    base = Path(args.dir)
    plain: list[float] = []
    reloading: list[float] = []
    latencies: list[float] = []
    for _ in range(args.rounds):
        plain.append(run(args.messages, None, base)[0])
        rate, lat = run(args.messages, args.interval, base)
        reloading.append(rate)
        latencies += lat
    best_plain, best_reloading = max(plain), max(reloading)
    print(f"{args.messages} x 1 KiB, smtp-source -s {SESSIONS} -d, delivery paused, "
          f"{args.rounds} rounds each (best)")
    print(f"no reload:                 {best_plain:8.0f} msg/s")
    print(f"reload every {args.interval:g} s:        {best_reloading:8.0f} msg/s")
    print(f"ratio reloading/no reload: {best_reloading / best_plain:8.2f}")
    if latencies:
        ms = sorted(x * 1000 for x in latencies)
        print(f"reloads: {len(ms)}, latency p50 {statistics.median(ms):.1f} ms, "
              f"max {ms[-1]:.1f} ms; every message stored, no session failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

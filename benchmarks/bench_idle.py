"""Idle connections: a transaction must not slow down while many clients sit idle.

Run: ``.venv/bin/python benchmarks/bench_idle.py [--idle N] [--runs N]``

Starts Ferry in this process (``engine.testing.server.RunningFerry``: the embedded default
configuration on a loopback port, delivery paused, a temporary spool) and times one whole
SMTP transaction (connect, EHLO, MAIL, RCPT, DATA with a small message, the 250 after the
commit, QUIT) with ``smtplib``: first with no other connection open (the baseline, same
run), then with ``--idle`` connections (default 1,000) open, greeted and silent.  Prints
best-of-N milliseconds and the ratio; expect about 1.0 (an idle session costs a socket and
a timer, nothing per transaction of another session).
"""

from __future__ import annotations

import argparse
import smtplib
import socket
import tempfile
import time
from pathlib import Path

from engine.testing.server import RunningFerry, ferry_config


def transaction_seconds(host: str, port: int, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        with smtplib.SMTP(host, port, timeout=30) as client:
            client.sendmail("a@client.test", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to hold")
    parser.add_argument("--runs", type=int, default=20, help="timed transactions per cell")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-idle-") as tmp:
        limit = args.idle + 10
        config = ferry_config(Path(tmp) / "spool", max_connections=limit,
                              max_connections_per_ip=limit)
        with RunningFerry(config) as ferry:
            transaction_seconds(ferry.host, ferry.port, args.runs)  # warm up: first commits
            alone = transaction_seconds(ferry.host, ferry.port, args.runs)
            idle = [socket.create_connection((ferry.host, ferry.port), timeout=30)
                    for _ in range(args.idle)]
            try:
                for sock in idle:
                    if not sock.recv(100).startswith(b"220 "):
                        raise SystemExit("an idle connection was not greeted")
                crowded = transaction_seconds(ferry.host, ferry.port, args.runs)
            finally:
                for sock in idle:
                    sock.close()
    print(f"{'connections open':<28}{'transaction ms':>16}")
    print(f"{'none (baseline)':<28}{alone * 1e3:>16.2f}")
    print(f"{f'{args.idle:,} idle':<28}{crowded * 1e3:>16.2f}")
    print(f"ratio crowded/alone: {crowded / alone:.2f}x")


if __name__ == "__main__":
    main()

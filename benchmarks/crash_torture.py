"""Crash torture of ``ferry serve``, the long run: many SIGKILLs under load, then drain.

Run: ``.venv/bin/python benchmarks/crash_torture.py [--kills 50] [--seed N] [--clients 3]
[--reply-delay 0.15] [--dir DIR]`` (about 2 s per kill, plus the drain).

Uses ``engine.testing.torture.run_torture`` (its module docstring says what is checked,
and how duplicates are bounded by the messages in flight at each kill) with a real
``ferry serve`` process, a loopback DNS responder and an aiosmtpd sink, all on
127.0.0.0/8; the spool lives in a temporary directory under ``--dir``, deleted at the end
unless ``--keep``.  Prints one line per kill and a summary; exits 1 when any promise was
broken.  ``FERRY_NO_EXTENSIONS=1`` / ``FERRY_REQUIRE_EXTENSIONS=1`` in the environment
pass to the Ferry process.  Not a throughput figure: it is a durability check too long
for the test suite (``tests/e2e/test_crash_torture.py`` runs 10 kills).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from engine import _speedups
from engine.testing.torture import run_torture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs (50)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    parser.add_argument("--clients", type=int, default=3, help="client threads (3)")
    parser.add_argument(
        "--pace",
        type=float,
        default=0.04,
        help="mean pause between a client's messages, seconds (0.04)",
    )
    parser.add_argument(
        "--reply-delay",
        type=float,
        default=0.15,
        help="the sink holds each reply to the final dot this long (0.15)",
    )
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--dir", default=None, help="parent of the temporary work directory")
    parser.add_argument("--keep", action="store_true", help="keep the spool and ferry.log")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ferry-torture-", dir=args.dir))
    print(f"crash torture: {args.kills} kills; {_speedups.status()}; work in {workdir}")
    try:
        report = run_torture(
            workdir,
            kills=args.kills,
            seed=args.seed,
            clients=args.clients,
            pace=args.pace,
            reply_delay=args.reply_delay,
            drain_timeout=args.drain_timeout,
            progress=print,
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.summary())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())

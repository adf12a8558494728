"""``ferry track --message-id`` over a 1 GB tracking log, against ``grep -F``.

Run: ``.venv/bin/python benchmarks/bench_track.py [--size-mb 1024] [--dir /tmp]``.

Builds a log set like a busy server's (``engine.ops.tracking`` file names and records:
rotated files of 100 MiB and the current one, RECEIVE/DELIVER/DEFER records of about
400 bytes, ~2.5 million of them per GB) in a temporary directory, deleted afterwards.
One message's records are spread over the first, a middle and the last file.  Then times
``ferry track --dir DIR --message-id ID --json`` (the whole command, start-up included)
and, as the baseline, ``grep -F`` for the same id over the same files (after one read of
each to warm the page cache for both).  Target (issue 12): ≤ 5 s for 1 GB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.ops.tracking import CURRENT, rotated_name  # noqa: E402

TARGET_SECONDS = 5.0
FILE_SIZE = 100 << 20
NEEDLE_ID = "needle-20261206.4242@app.example.com"


def records(n: int, start: float) -> bytes:
    """A block of ``n`` records of ``n // 3`` messages (RECEIVE, DEFER, DELIVER each)."""
    out = []
    for i in range(0, n, 3):
        qid = f"{int(start * 1000) + i:012X}{i:012X}"
        mid = f"{i:08d}.{int(start)}@app{i % 97}.example.com"
        base = {"id": qid, "message_id": mid}
        t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + i / 1000)) + ".000Z"
        out.append({"time": t, "event": "RECEIVE", **base, "connector": "submission",
                    "client": f"10.1.{i % 250}.{i % 200}", "helo": f"app{i % 97}.example.com",
                    "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384", "auth": "app", "size": 2000 + i,
                    "sender": f"noreply@app{i % 97}.example.com",
                    "recipients": [f"user{i}@example.net"]})
        out.append({"time": t, "event": "DEFER", **base, "recipient": f"user{i}@example.net",
                    "host": "mx1.example.net", "address": "192.0.2.25:25",
                    "reply": "451 4.7.1 Greylisted, please try again later", "attempt": 1,
                    "delay": 0.4, "retry": t})
        out.append({"time": t, "event": "DELIVER", **base, "recipient": f"user{i}@example.net",
                    "host": "mx1.example.net", "address": "192.0.2.25:25",
                    "reply": "250 2.0.0 Ok: queued as 4XyZ", "attempt": 2,
                    "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384", "delay": 300.5, "connector": ""})
    return b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in out)


def needle(event: str) -> bytes:
    return orjson.dumps({"time": "2026-12-06T10:00:00.000Z", "event": event,
                         "id": "0193A0B1C2D3E4F5A6B7C8D9", "message_id": NEEDLE_ID,
                         "recipient": "bob@example.net"}, option=orjson.OPT_APPEND_NEWLINE)


def build(directory: Path, total: int) -> list[Path]:
    """The log set: files of FILE_SIZE (the last one smaller), ``total`` bytes in all."""
    block = records(3000, 1_796_000_000.0)
    files = (total + FILE_SIZE - 1) // FILE_SIZE
    paths = []
    for k in range(files):
        last = k == files - 1
        name = CURRENT if last else rotated_name(1_796_000_000.0 + k * 3600)
        path = directory / name
        size = total - k * FILE_SIZE if last else FILE_SIZE
        with path.open("wb") as f:
            written = 0
            marks = {0: "RECEIVE", files // 2: "DEFER", files - 1: "DELIVER"}
            if k in marks and k != files - 1:
                f.write(needle(marks[k]))
            while written < size - len(block):
                f.write(block)
                written += len(block)
            if k == files - 1:
                f.write(needle(marks[k]))
        paths.append(path)
    return paths


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, timeout=600)
    return time.perf_counter() - t0, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the log set")
    parser.add_argument("--dir", default="/tmp", help="where the log set is built")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_track.", dir=args.dir))
    try:
        t0 = time.perf_counter()
        paths = build(directory, args.size_mb << 20)
        total = sum(p.stat().st_size for p in paths)
        print(f"log set: {len(paths)} files, {total / 1e9:.2f} GB, built in "
              f"{time.perf_counter() - t0:.1f} s in {directory}")
        for path in paths:  # both runs start from a warm page cache
            with path.open("rb") as f:
                while f.read(16 << 20):
                    pass
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        ferry, out = timed([sys.executable, "-m", "engine", "track", "--dir", str(directory),
                            "--message-id", f"<{NEEDLE_ID}>", "--json"], env)
        found = [orjson.loads(line)["event"] for line in out.splitlines()]
        grep, gout = timed(["grep", "-F", "--", NEEDLE_ID, *map(str, paths)])
        assert found == ["RECEIVE", "DEFER", "DELIVER"], found
        assert len(gout.splitlines()) == 3
        print(f"ferry track --message-id: {ferry:.2f} s ({total / ferry / 1e6:,.0f} MB/s), "
              f"found {len(found)} records")
        print(f"grep -F (baseline):       {grep:.2f} s ({total / grep / 1e6:,.0f} MB/s)")
        print(f"ferry/grep time: {ferry / grep:.2f}x; target <= {TARGET_SECONDS:.0f} s per "
              f"GB: {'PASS' if ferry * (1 << 30) / total <= TARGET_SECONDS else 'FAIL'}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

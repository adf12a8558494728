"""What an evaluation of the alert rules reads from the queue database, against the
baseline of counting the same figures the way ``ferry queue queues`` does.

A queue of N waiting messages (one recipient each, over 500 destinations) is built in a
temporary LMDB; then, best of 5 each:

- ``*`` rule: ``LmdbQueue.hop_depths()``, one walk of the hops index's keys (messages and
  oldest message per destination), what a ``destination = "*"`` rule reads;
- named rule: ``hop_depth(one destination)``;
- whole server: ``count()`` and ``oldest()``;
- baseline: ``engine.ops.views.queue_rows`` (every record decoded), the per-destination
  figures as the queue viewer computes them.

The reads run in a worker thread in the server; here they run on the main thread, alone.

    .venv/bin/python benchmarks/bench_alerts.py            # 200,000 messages, about 30 s
    .venv/bin/python benchmarks/bench_alerts.py --quick    # 50,000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.ops.views import queue_rows
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, Recipient

DESTINATIONS = 500


async def fill(store: LmdbQueue, count: int) -> None:
    batch = 2000
    for start in range(0, count, batch):
        await asyncio.gather(*(store.enqueue(Envelope(
            "app@client.test", [Recipient(f"r{i}@d{i % DESTINATIONS}.test",
                                          f"d{i % DESTINATIONS}.test")],
            client_address="127.0.0.1"), b"Subject: x\r\n\r\nx\r\n")
            for i in range(start, min(count, start + batch))))


def best(fn: Callable[[], Any], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--messages", type=int)
    args = parser.parse_args()
    count = args.messages or (50_000 if args.quick else 200_000)
    with tempfile.TemporaryDirectory() as tmp:
        store = LmdbQueue(Path(tmp) / "queue", durability="os", min_free_disk=0,
                          writer="thread")
        try:
            asyncio.run(fill(store, count))
            assert sum(n for n, _ in store.hop_depths().values()) == count
            baseline = best(lambda: queue_rows(store, None), runs=2)
            rows = [("'*' rule: hop_depths()", best(store.hop_depths)),
                    ("named rule: hop_depth()", best(lambda: store.hop_depth("d7.test"))),
                    ("whole server: count() + oldest()",
                     best(lambda: (store.count(), store.oldest())))]
        finally:
            store.close_sync()
    print(f"{count:,} waiting messages over {DESTINATIONS} destinations")
    print(f"{'read':<44}{'ms':>10}{'baseline/read':>16}")
    print(f"{'baseline: queue_rows (ferry queue queues)':<44}{baseline * 1000:>10.1f}"
          f"{1:>15.1f}x")
    for name, seconds in rows:
        print(f"{name:<44}{seconds * 1000:>10.2f}{baseline / seconds:>15.1f}x")


if __name__ == "__main__":
    main()

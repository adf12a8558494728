"""What a shared connection limit adds to a connection's set-up: one lease taken and given
back through a local Redis (engine.cluster.limits), against the same lease from the node's
own share (no Redis call), in one run.

Run: ``.venv/bin/python benchmarks/bench_cluster.py [--leases N] [--dir DIR] [--node]`` (a few
seconds).  A private ``redis-server`` on 127.0.0.1 (engine.testing.redis) is started and
stopped here.  Measured per lease, on uvloop: the time of ``acquire`` (the Lua script's
round trip: what a delivery worker waits before it may connect) and of ``release``, as
the median and the 99th percentile; and one GCRA reservation (``reserve``), what a message
to a rate-limited site waits for besides its slot.  Target (issue 17): the cluster limit
adds at most 1 ms to a connection's set-up with a local Redis.

``--node``: the same figures for the limits a node's workers share without Redis
(engine.cluster.node): one NodeLimits client of a NodeCoordinator that runs in a process
of its own on a Unix socket (as the supervisor's), against the client on its own share
(no coordinator).  No redis-server needed.  Target (issue 17): ≤ 1 ms added, about
0.1 ms expected.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cluster.api import ClusterLimits
from engine.cluster.limits import SharedLimits
from engine.cluster.node import NodeLimits
from engine.testing.redis import RedisInstance


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def measure(url: str, leases: int, shared: bool) -> dict[str, list[float]]:
    # An unreachable URL gives the node's own share: the same calls, no Redis.
    node = SharedLimits(url if shared else "redis://127.0.0.1:9/0", "bench",
                        share=1.0, probe_interval=3600, timeout=0.5)
    await node.start()
    assert node.shared is shared
    try:
        return await take_and_give(node, leases)
    finally:
        await node.stop()


#: The supervisor's side: a coordinator in a process of its own, until stdin closes.
COORDINATOR = """
import asyncio, sys
from pathlib import Path
import uvloop
from engine.cluster.node import NodeCoordinator

async def main():
    coordinator = NodeCoordinator(Path(sys.argv[1]))
    await coordinator.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await coordinator.stop()

uvloop.run(main())
"""


async def measure_node(path: Path, leases: int, shared: bool) -> dict[str, list[float]]:
    # No coordinator: the worker's own share, the same calls without the socket.
    worker = NodeLimits(path if shared else path.with_name("none.sock"), share=1.0,
                        reconnect_interval=3600)
    await worker.start()
    assert worker.shared is shared
    try:
        return await take_and_give(worker, leases)
    finally:
        await worker.stop()


def run_node(directory: Path, leases: int) -> dict[str, dict[str, list[float]]]:
    path = directory / "limits.sock"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with subprocess.Popen([sys.executable, "-c", COORDINATOR, str(path)], env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            return {mode: uvloop.run(measure_node(path, leases, mode == "node"))
                    for mode in ("node", "share")}
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(10)


async def take_and_give(node: ClusterLimits, leases: int) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {"acquire": [], "release": [], "reserve": []}
    for i in range(leases):
        key = f"site{i % 100}"
        t0 = time.perf_counter()
        lease = await node.acquire(key, 8)
        t1 = time.perf_counter()
        assert lease is not None
        await node.release(lease)
        t2 = time.perf_counter()
        await node.reserve(key, 1e6)
        t3 = time.perf_counter()
        took["acquire"].append(t1 - t0)
        took["release"].append(t2 - t1)
        took["reserve"].append(t3 - t2)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leases", type=int, default=5000)
    parser.add_argument("--dir", default=None, help="where redis-server's files go")
    parser.add_argument("--node", action="store_true",
                        help="a node's workers' limits (engine.cluster.node), not Redis")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the share mode's fall-back warning
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.node:
            shared_mode = "node"
            results = run_node(Path(tmp), args.leases)
            print(f"{args.leases} leases, 100 sites, limit 8, coordinator in another "
                  "process on a Unix socket")
        else:
            shared_mode = "redis"
            with RedisInstance(Path(tmp) / "redis") as redis:
                results = {mode: uvloop.run(measure(redis.url, args.leases, mode == "redis"))
                           for mode in ("redis", "share")}
            print(f"{args.leases} leases, 100 sites, limit 8, local redis-server")
    print(f"{'':22} {'median µs':>10} {'p99 µs':>10}")
    for mode, took in results.items():
        for what, values in took.items():
            print(f"{mode + ' ' + what:22} {statistics.median(values) * 1e6:10.1f} "
                  f"{percentile(values, 0.99) * 1e6:10.1f}")
    added = statistics.median(results[shared_mode]["acquire"]) - statistics.median(
        results["share"]["acquire"])
    print(f"added to a connection's set-up (median acquire, {shared_mode} - share): "
          f"{added * 1e3:.3f} ms (target <= 1 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Limits shared through a real redis-server (engine.cluster.limits): two SharedLimits are
two nodes; leases and rates hold across both, a dead node's leases expire, and a Redis
outage falls back to each node's share and back again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from engine.cluster.limits import Lease, SharedLimits
from engine.testing.redis import RedisInstance, find_redis_server
from engine.testing.wait import until

pytestmark = pytest.mark.skipif(find_redis_server() is None,
                                reason="redis-server is not installed (tests/run.sh installs it)")

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisInstance]:
    with RedisInstance(tmp_path / "redis") as instance:
        yield instance


@contextlib.asynccontextmanager
async def nodes(redis: RedisInstance, count: int = 2,
                **kw: Any) -> AsyncIterator[list[SharedLimits]]:
    made = [SharedLimits(redis.url, f"node{i}", **kw) for i in range(count)]
    try:
        for node in made:
            await node.start()
        yield made
    finally:
        for node in made:
            await node.stop()


async def take(node: SharedLimits, key: str, limit: int, n: int) -> list[Lease]:
    got = [await node.acquire(key, limit) for _ in range(n)]
    return [lease for lease in got if lease is not None]


def test_a_limit_of_three_holds_across_two_nodes(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis) as (a, b):
            assert a.shared and b.shared
            first = await take(a, "site-x", 3, 2)
            second = await take(b, "site-x", 3, 2)
            assert (len(first), len(second)) == (2, 1)
            assert await a.acquire("site-x", 3) is None
            # Another destination has limits of its own.
            assert len(await take(b, "site-y", 3, 3)) == 3
            await a.release(first[0])
            assert await b.acquire("site-x", 3) is not None
            assert await a.acquire("site-x", 3) is None
            assert (a.held("site-x"), b.held("site-x")) == (1, 2)
            assert (a.figures.refused, b.figures.refused) == (2, 1)

    run(main())


def test_a_stopped_node_gives_its_leases_back(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis) as (a, b):
            assert len(await take(a, "site", 2, 2)) == 2
            assert await b.acquire("site", 2) is None
            await a.stop()
            assert len(await take(b, "site", 2, 2)) == 2

    run(main())


def test_the_leases_of_a_dead_node_expire(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis, lease_ttl=1.0) as (a, b):
            assert len(await take(a, "site", 3, 3)) == 3
            # Node a dies: it neither renews nor gives back (its task and link just end).
            assert a._task is not None
            a._task.cancel()
            a._local.clear()
            refused = b.figures.refused
            assert await b.acquire("site", 3) is None
            got: list[Lease] = []

            async def one_more() -> bool:
                lease = await b.acquire("site", 3)
                if lease is not None:
                    got.append(lease)
                return len(got) == 3

            # Within the lease lifetime (1 s) of a's last renewal, b takes the whole limit.
            async with asyncio.timeout(20):
                while not await one_more():  # noqa: ASYNC110 (the state is in Redis)
                    await asyncio.sleep(0.05)
            assert b.figures.refused > refused  # it was refused while a's leases lived

    run(main())


def test_leases_live_while_their_node_renews_them(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis, lease_ttl=0.6) as (a, b):
            assert len(await take(a, "site", 1, 1)) == 1
            # Three renewals, each a third of the lifetime apart: the lease has outlived
            # its first lifetime, and b still cannot take the place.
            await until(lambda: a.figures.renewals >= 3, what="three renewals by a")
            assert await b.acquire("site", 1) is None

    run(main())


def test_a_node_holding_every_lease_yields_to_one_that_waits(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis, lease_ttl=0.6) as (a, b):
            held = await take(a, "site", 3, 3)
            assert len(held) == 3 and not a.yielding("site", 3)
            assert await b.acquire("site", 3) is None  # marks the site wanted in Redis
            # a learns it at its next renewal (a third of the lease's lifetime), and keeps
            # to its share (half of 3: one): two of its connections are to end.
            await until(lambda: a.yielding("site", 3), what="a told that b waits")
            assert [a.over_share("site", 3) for _ in range(3)] == [True, True, False]
            assert await a.acquire("site", 3) is None  # nor takes more meanwhile
            for lease in held[1:]:
                await a.release(lease)
            assert len(await take(b, "site", 3, 3)) == 2

    run(main())


def test_rates_are_one_schedule_for_the_cluster(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis) as (a, b):
            starts = []
            for i in range(10):
                node = a if i % 2 else b
                starts.append((await node.reserve("site", 50.0)).start)
            # 50 a second: each slot 20 ms after the one before, whichever node asked.
            assert [s2 - s1 for s1, s2 in itertools.pairwise(starts)] == [20_000] * 9
            assert (await a.reserve("site", 0)).wait == 0.0

    run(main())


def test_redis_down_falls_back_to_the_share_and_back(redis: RedisInstance,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ferry.cluster")

    async def main() -> None:
        async with nodes(redis, share=0.5, probe_interval=0.1, timeout=0.5) as (a, b):
            held_a = await take(a, "site", 4, 1)
            assert len(held_a) == 1
            redis.stop()
            # Each node alone: half of 4.
            assert len(await take(a, "site", 4, 3)) == 1 and not a.shared
            assert len(await take(b, "site", 4, 3)) == 2 and not b.shared
            assert "unreachable" in caplog.text
            redis.start()
            await until(lambda: a.shared and b.shared, what="both nodes shared again")
            # Every lease held was registered again: 2 + 2 = 4, the limit, is taken.
            assert await a.acquire("site", 4) is None
            assert await b.acquire("site", 4) is None
            assert "answers again" in caplog.text
            assert a.figures.fallbacks == 1 and b.figures.fallbacks == 1

    run(main())


def test_suspensions_are_seen_by_every_node(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis) as (a, b):
            await a.suspend("example.com", "operator")
            assert await b.suspended() == {"example.com": "operator"}
            await b.resume("example.com")
            assert await a.suspended() == {}

    run(main())


def test_automation_holds_are_seen_by_every_node(redis: RedisInstance) -> None:
    async def main() -> None:
        async with nodes(redis) as (a, b):
            end = round(time.time()) + 60.0
            a.share_hold("s@mx:example.com", "back-off", end, "421 4.7.28 slow down")
            await until(lambda: not a._writes, what="the hold written")
            assert await b.holds() == [("s@mx:example.com", "back-off", end,
                                        "421 4.7.28 slow down", "node0")]
            # A hold that has ended is not in force, and the next hold's write drops it.
            b.share_hold("s@mx:example.net", "back-off", time.time() - 1, "421 4.7.28 old")
            await until(lambda: not b._writes, what="the ended hold written")
            assert [h[0] for h in await a.holds() or []] == ["s@mx:example.com"]
            a.share_hold("s@mx:example.org", "back-off", end + 1, "421 4.7.28 again")
            await until(lambda: not a._writes, what="the third hold written")
            assert await a._client.zcard("ferry:holds") == 2

    run(main())


def test_a_node_starts_on_its_share_when_redis_is_down(tmp_path: Path) -> None:
    instance = RedisInstance(tmp_path / "redis")  # never started

    async def main() -> None:
        node = SharedLimits(instance.url, "lonely", probe_interval=60, timeout=0.2)
        await node.start()
        try:
            assert not node.shared
            assert len(await take(node, "site", 3, 3)) == 1
            wait = (await node.reserve("site", 10.0)).wait, (await node.reserve("site", 10.0)).wait
            assert wait[0] == 0.0 and wait[1] == pytest.approx(0.2, abs=0.05)
        finally:
            await node.stop()

    run(main())

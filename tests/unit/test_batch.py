"""engine.agents.batch: one executor job at a time, the items submitted meanwhile together
in the next, each item's own result or exception, with per-item work or a whole-batch
function (the DKIM signing agent's, which signs a batch in one release of the GIL)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from engine.agents.batch import ThreadBatches


def tens(items: Sequence[int]) -> list[int | Exception]:
    return [ValueError(i) if i % 3 == 0 else i * 10 for i in items]


def test_items_submitted_during_a_job_go_together_into_the_next() -> None:
    calls: list[list[int]] = []
    started, gate = threading.Event(), threading.Event()

    def batch(items: Sequence[int]) -> list[int | Exception]:
        calls.append(list(items))
        started.set()
        assert gate.wait(10)  # the first job runs until the others are waiting
        return tens(items)

    async def go() -> list[int | BaseException]:
        batches: ThreadBatches[int, int] = ThreadBatches(batch=batch)
        first = batches.submit(1)
        assert await asyncio.to_thread(started.wait, 10)
        rest = [batches.submit(i) for i in range(2, 7)]
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    outcomes = asyncio.run(go())
    assert calls == [[1], [2, 3, 4, 5, 6]]
    assert [o if isinstance(o, int) else type(o) for o in outcomes] == [
        10, 20, ValueError, 40, 50, ValueError]


def test_per_item_work_fails_only_its_item() -> None:
    def work(item: int) -> int:
        if item == 2:
            raise KeyError(item)
        return -item

    async def go() -> list[int | BaseException]:
        batches: ThreadBatches[int, int] = ThreadBatches(work)
        return await asyncio.gather(*(batches.submit(i) for i in range(4)),
                                    return_exceptions=True)

    outcomes = asyncio.run(go())
    assert outcomes[:2] == [0, -1] and outcomes[3] == -3
    assert isinstance(outcomes[2], KeyError)


def test_a_batch_that_loses_items_fails_them_all_and_the_next_batch_runs() -> None:
    # No item may take another's result: a wrong count fails the whole job's items.
    def batch(items: Sequence[int]) -> list[int | Exception]:
        return tens(items)[:-1] if len(items) > 1 else tens(items)

    async def go() -> tuple[tuple[int | BaseException, ...], int]:
        batches: ThreadBatches[int, int] = ThreadBatches(batch=batch)
        lost = await asyncio.gather(batches.submit(1), batches.submit(2),
                                    return_exceptions=True)
        return lost, await asyncio.wait_for(batches.submit(4), 10)

    lost, after = asyncio.run(go())
    assert all(isinstance(o, RuntimeError) for o in lost)
    assert after == 40


def test_work_or_batch_exactly_one() -> None:
    with pytest.raises(TypeError):
        ThreadBatches()
    with pytest.raises(TypeError):
        ThreadBatches(abs, batch=tens)

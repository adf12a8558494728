"""Work of many sessions done in one executor job at a time: the agents' public-key
operations (DKIM signatures and their verification), which OpenSSL does without the GIL.

Made on the event loop, such an operation costs the loop far more than itself:
``cryptography`` releases the GIL inside it, another thread of ``ferry serve`` (the queue
writer's, the tracking log's) takes the GIL meanwhile, and the loop waits to get it back
(benchmarks/README.md, issue 15: a 28 µs RSA verification cost the relay about 250 µs of
CPU per message on the loop; a 35 µs Ed25519 signature about 220 µs).  A job per
operation is no better: the hand-off to a thread and back (two futures, a wake-up of the
loop through its self-pipe) costs about as much.  So :class:`ThreadBatches` keeps at most
one job in flight: whatever is submitted while it runs goes, together, into the next
one, and one hand-off back settles them all.  Under load the batches grow; a lone item
waits one loop turn (for the others submitted in the same turn) and goes alone.

The work is given per item (``ThreadBatches(work)``: ``work(item)`` for each, in turn) or
for the whole batch (``ThreadBatches(batch=work)``: one call with every item, returning
each item's result or its exception in order).  The whole-batch form is for work that can
release the GIL once for the batch instead of once per item: the RSA signatures of the
DKIM signing agent, which the compiled engine.message.pkey makes in one ``nogil`` block
(issue 15, seventh pass: each release cost a wait for the busy loop to give the GIL back).

It must never run Python work of any size in the thread (that would take the GIL from
the loop for as long): callers hand over what is ready for OpenSSL, or work that would
hold the loop as long where it is (the signing agent's hashing of a large body).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["ThreadBatches"]

T = TypeVar("T")
R = TypeVar("R")


def _run_all(work: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
    """Every item's result, in the thread; an item whose work raises gets its exception
    (handed to its own caller), the others their results."""
    out: list[R | Exception] = []
    for item in items:
        try:
            out.append(work(item))
        except Exception as exc:  # reported through the item's own future
            out.append(exc)
    return out


#: Work on a whole batch: every item's result, or the exception of an item that failed.
Batch = Callable[[Sequence[T]], Sequence[R | Exception]]


class ThreadBatches(Generic[T, R]):
    """``work`` done for every submitted item in the default executor, one job at a time
    (see the module docstring), or ``batch`` done for all the items of a job in one call.
    One per agent: its futures belong to the running loop."""

    def __init__(self, work: Callable[[T], R] | None = None, *,
                 batch: Batch[T, R] | None = None) -> None:
        if batch is None:
            if work is None:
                raise TypeError("ThreadBatches needs work or batch")
            batch = functools.partial(_run_all, work)
        elif work is not None:
            raise TypeError("ThreadBatches takes work or batch, not both")
        self._batch: Batch[T, R] = batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False

    def submit(self, item: T) -> asyncio.Future[R]:
        """A future of ``work(item)``; cancel it to drop the item if not yet handed over."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._submit, loop)
        return future

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        # An item whose caller gave up (its agent's time budget) is not worked on.
        batch = [w for w in self._waiting if not w[1].done()]
        self._waiting = []
        if not batch:
            self._busy = False
            return
        try:
            job = loop.run_in_executor(None, self._batch, [item for item, _ in batch])
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            for _, future in batch:
                future.set_exception(exc)
            self._busy = False
            return
        job.add_done_callback(functools.partial(self._done, loop, batch))

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]],
              job: asyncio.Future[Sequence[R | Exception]]) -> None:
        cancelled = job.cancelled()
        failed = None if cancelled else job.exception()
        results = () if cancelled or failed is not None else job.result()
        if not cancelled and failed is None and len(results) != len(batch):
            # A batch function that lost or added items: no item may get another's result.
            failed = RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            if cancelled:
                future.cancel()
                continue
            outcome = failed if failed is not None else results[i]
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._waiting:
            self._submit(loop)
        else:
            self._busy = False

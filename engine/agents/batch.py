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

It must never run Python work of any size in the thread (that would take the GIL from
the loop for as long): callers hand over what is ready for OpenSSL.
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


class ThreadBatches(Generic[T, R]):
    """``work`` done for every submitted item in the default executor, one job at a time
    (see the module docstring).  One per agent: its futures belong to the running loop."""

    def __init__(self, work: Callable[[T], R]) -> None:
        self._work = work
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
            job = loop.run_in_executor(None, _run_all, self._work, [item for item, _ in batch])
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            for _, future in batch:
                future.set_exception(exc)
            self._busy = False
            return
        job.add_done_callback(functools.partial(self._done, loop, batch))

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]],
              job: asyncio.Future[list[R | Exception]]) -> None:
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            if job.cancelled():
                future.cancel()
                continue
            failed = job.exception()
            outcome = failed if failed is not None else job.result()[i]
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._waiting:
            self._submit(loop)
        else:
            self._busy = False

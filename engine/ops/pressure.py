"""Back pressure for the operator: a WARNING when it starts and one when it clears.

The queue refuses new mail (``engine.queue.api.BackPressure``: disk below
``queue.min_free_disk``, the map at ``queue.max_map_size``, ``queue.max_pending`` writes
waiting), and every MAIL then gets ``452 4.3.1``.  One line per refused command would
bury the log; none (as before) leaves the operator guessing.  :class:`PressureLog` writes
one WARNING when an episode starts, naming the threshold with the figures, and one when
it clears, with how long it lasted and how many commands were refused; the receive
session tells it of each refusal (the refusal path only), and a check once an
``interval`` notices both ends when no client is asking.  At start, free space already
below ``min_free_disk`` gets its own WARNING, since every MAIL will be refused.

This module must never refuse or admit anything itself: it reads ``QueueStore.pressure``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine.queue.api import BackPressure, QueueStore

log = logging.getLogger("ferry.queue")


class PressureLog:
    def __init__(self, store: QueueStore, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        #: the threshold of the episode under way (BackPressure.reason), None: none
        self.reason: str | None = None
        self.refusals = 0
        self._since = 0.0
        self._task: asyncio.Task[None] | None = None

    def at_start(self) -> None:
        """Say at once when the queue cannot take mail from the start (call once open)."""
        problem = self.store.pressure()
        if problem is None:
            return
        if problem.reason == "disk space low":
            log.warning("spool free space is low at start: %s; every MAIL will get 452 "
                        "4.3.1 until space is freed (or queue.min_free_disk is lowered)",
                        problem.figures)
        else:
            log.warning("the queue refuses new mail from the start: %s; every MAIL will get "
                        "452 4.3.1 until it clears", problem.describe())
        self._begin(problem)

    def refused(self, problem: BackPressure) -> None:
        """A command was refused for ``problem`` (the refusal path calls this)."""
        if self.reason != problem.reason:
            self._started(problem)
        self.refusals += 1

    def check(self) -> None:
        """Look once: an episode that started or ended with no client asking."""
        problem = self.store.pressure()
        if problem is None:
            if self.reason is not None:
                log.warning("back pressure cleared (%s) after %.1f s; %d commands refused; "
                            "new mail is accepted again", self.reason,
                            time.monotonic() - self._since, self.refusals)
                self.reason = None
        elif problem.reason != self.reason:
            self._started(problem)

    def _started(self, problem: BackPressure) -> None:
        log.warning("back pressure: %s; new mail gets 452 4.3.1 until it clears",
                    problem.describe())
        self._begin(problem)

    def _begin(self, problem: BackPressure) -> None:
        self.reason = problem.reason
        self.refusals = 0
        self._since = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

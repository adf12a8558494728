"""Suspensions shared by the nodes of a cluster: a destination the operator suspends on one
node is suspended on every node, and resumed on every node when resumed on one.

Owns the reconciliation between this node's suspended set (the scheduler's, kept in its
queue) and the cluster's (a Redis hash, engine.cluster.limits): every ``interval`` it reads
the hash; a destination there and not here is suspended here (``by`` the node that did it);
one here and not there is resumed here if it was there at the last look (another node
resumed it), and written there otherwise (suspended here while Redis was away, or before
this node joined).  The operator's verbs write through at once
(``engine.ops.operations``), so the others follow within ``interval``.

The same look reads the automation holds other nodes shared (a receiver's "421 4.7.28
slow down" to one node is meant for the sender, every node of it) and hands each to the
scheduler (``on_hold`` of the limits: it holds the same (source, site) until the same
time, and ignores what it holds as long already).

It must never decide delivery itself (it calls the scheduler's own verbs) and never fail
the node when Redis is away: a look that gets no answer changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from engine.cluster.limits import SharedLimits

log = logging.getLogger("ferry.cluster")

__all__ = ["SuspensionSync"]

#: ``by`` of a suspension or resumption this node made because another node had.
CLUSTER_BY = "cluster"


class Suspender(Protocol):
    suspended: set[str]

    async def suspend(self, destination: str, by: str = ...) -> int: ...

    async def resume(self, destination: str, by: str = ...) -> int: ...


class SuspensionSync:
    def __init__(self, limits: SharedLimits, scheduler: Suspender, interval: float) -> None:
        self.limits = limits
        self.scheduler = scheduler
        self.interval = interval
        #: the destinations the hash held at the last look that got an answer
        self._seen: set[str] = set()
        #: resumptions the operator made here that Redis has not taken yet
        self._unsent: set[str] = set()
        #: what the operator did here that Redis took, until a look judged it:
        #: destination → True (suspended), False (resumed)
        self._done: dict[str, bool] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.interval)

    async def suspended(self, destination: str, by: str) -> None:
        """The operator suspended ``destination`` here: tell the other nodes now (when
        Redis does not take it, the next look writes it)."""
        self._unsent.discard(destination)
        if await self.limits.suspend(destination, by):
            self._done[destination] = True

    async def resumed(self, destination: str) -> None:
        """The operator resumed ``destination`` here: tell the other nodes now, or at the
        first look that Redis answers (else that look would suspend it here again)."""
        if await self.limits.resume(destination):
            self._done[destination] = False
        else:
            self._unsent.add(destination)

    async def sync(self) -> None:
        """One look at the cluster's suspensions and holds, and this node brought in
        line."""
        await self._holds()
        for destination in sorted(self._unsent):
            if await self.limits.resume(destination):
                self._unsent.discard(destination)
        done = dict(self._done)  # in Redis before the read below
        remote = await self.limits.suspended()
        if remote is None:
            return  # Redis away: nothing known, nothing changed
        # What the operator did here while the hash was read: the read may be older than
        # it, so the next look judges it.
        late = {d for d, suspended in self._done.items() if done.get(d) is not suspended}
        local = self.scheduler.suspended
        for destination in sorted(remote.keys() - local - late):
            by = f"{CLUSTER_BY} ({remote[destination]})"
            count = await self.scheduler.suspend(destination, by)
            log.info("cluster: %s suspended %s here too (%d recipients parked)",
                     remote[destination], destination, count)
        published: set[str] = set()
        for destination in sorted(local - remote.keys() - late):
            # In the hash before (seen at the last look, or written by this node's
            # operator before this one) and gone now: another node resumed it.
            if destination in self._seen or done.get(destination):
                count = await self.scheduler.resume(destination, CLUSTER_BY)
                log.info("cluster: %s resumed on another node, here too (%d recipients "
                         "back in the queue)", destination, count)
            elif await self.limits.suspend(destination, self.limits.node):
                published.add(destination)
        self._seen = set(remote) | published | {d for d in late if self._done.get(d)}
        for destination, suspended in done.items():
            if self._done.get(destination) is suspended:
                del self._done[destination]

    async def _holds(self) -> None:
        on_hold = self.limits.on_hold
        if on_hold is None:
            return
        for key, rule, until, reply, node in await self.limits.holds() or ():
            if node != self.limits.node:
                on_hold(key, rule, until, reply)

"""What the scheduler asks of limits shared beyond its own process: the one interface of
the cluster's limits through Redis (engine.cluster.limits.SharedLimits) and of a node's
limits shared by its workers (engine.cluster.node.NodeLimits).

This module only declares the interface; it must never hold state or do I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from engine.cluster.limits import Lease, Reservation, SharedFigures

__all__ = ["ClusterLimits", "Lease", "Reservation"]


class ClusterLimits(Protocol):
    """Per-destination limits kept with others.  Every call is bounded in time and never
    raises because the other side is away: it answers from this one's ``share`` then
    (``shared`` is False meanwhile)."""

    #: True while the limits are shared; False while each limit is this one's share.
    shared: bool
    #: counters for metrics and the log
    figures: SharedFigures
    #: how soon a caller refused a lease asks again
    lease_wait: float
    #: Called with (key, rule, until, reply) when another member holds ``key`` by an
    #: automation rule (:meth:`share_hold`); None: nobody listens.
    on_hold: Callable[[str, str, float, str], None] | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def acquire(self, key: str, limit: int) -> Lease | None:
        """A lease on one of ``limit`` connections to ``key``, or None when all are
        taken."""
        ...

    async def release(self, lease: Lease) -> None: ...

    def over_share(self, key: str, limit: int) -> bool:
        """Whether the calling connection (holding a lease on ``key``) is to end and give
        its lease back: this one holds more than it should keep (beyond its share while
        the limits are not shared, or while another waits for a lease).  True is a claim:
        only the extra connections are told to end."""
        ...

    def yielding(self, key: str, limit: int) -> bool:
        """Whether this one holds more leases on ``key`` than it should keep (no claim):
        its connections take no more follow-on messages until enough have ended."""
        ...

    def held(self, key: str) -> int: ...

    async def reserve(self, key: str, rate: float) -> Reservation:
        """The next of ``rate`` messages a second to ``key``: how long to wait."""
        ...

    def share_hold(self, key: str, rule: str, until: float, reply: str) -> None:
        """Tell the other members that the automation rule ``rule`` holds ``key`` until
        ``until`` (epoch seconds) after ``reply``: each holds it too (without waiting)."""
        ...

    async def count(self, key: str, day: int, cap: int) -> bool:
        """One send to ``key`` counted against its daily ``cap`` on UTC ``day``: False
        once the cap is reached (and nothing is counted)."""
        ...

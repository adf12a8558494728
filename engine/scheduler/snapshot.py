"""What an operator sees of the scheduler: one frozen value, taken by ``Scheduler.snapshot()``.

The control channel (``ferry queue``'s ``stats``), and after it the queue viewer and the
HTTP admin API, read the scheduler only through this value, never through its private
state: the one place that state is read, and one moment per value.

Plain frozen values; no I/O, and nothing here may change the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.queue.api import QueueStats


@dataclass(frozen=True, slots=True)
class SiteView:
    """A site (a destination's server set) with deliveries running or waiting."""

    name: str
    #: deliveries (connections) running now, and the site's limits
    workers: int
    max_connections: int
    #: messages per second; 0 = no limit
    max_rate: float
    #: groups queued at the site for a worker
    waiting: int


@dataclass(frozen=True, slots=True)
class DownSite:
    """A site that took no connection: its groups are deferred untried until ``until``
    (epoch seconds)."""

    name: str
    until: float


@dataclass(frozen=True, slots=True)
class HeldSite:
    """A (source, site) that a shaping automation rule suspends or throttles until
    ``until`` (epoch seconds); engine.scheduler.shaping."""

    name: str
    action: str
    rule: str
    until: float


@dataclass(frozen=True, slots=True)
class DestinationView:
    """A destination (a next hop as the queue names it) the scheduler handled lately."""

    name: str
    #: the site its route goes to now; "" when the route is not known without a lookup;
    #: with egress sources, the (source, site) queues it uses, "a@site b@site"
    site: str
    #: groups (a message's recipients for it) per minute that came due and joined its
    #: queue (new mail and retries), and that left it final (delivered or failed)
    in_per_minute: float
    out_per_minute: float
    #: the routing failure that deferred its mail last ("451 4.4.4 ..."); "" once a
    #: route was found again
    unreachable: str = ""


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    #: when it was taken (epoch seconds)
    taken: float
    #: messages in the queue database, whatever their state
    messages: int
    #: recipients delivered since the scheduler started
    delivered: int
    #: delivery stopped by configuration (mail is still accepted and queued)
    paused: bool
    #: (message, destination) groups in the active window, waiting or in flight
    window: int
    #: busy sites, the most workers first
    sites: tuple[SiteView, ...]
    #: sites marked down, by name
    down: tuple[DownSite, ...]
    #: destinations held by the operator, by name
    suspended: tuple[str, ...]
    #: the queue writer's figures
    queue: QueueStats
    #: destinations with traffic in the last two minutes or a routing failure, by name
    destinations: tuple[DestinationView, ...] = ()
    #: (source, site) queues held by a shaping automation rule, by name
    held: tuple[HeldSite, ...] = ()
    #: shaping automation actions taken since the start, by action
    shaping_actions: tuple[tuple[str, int], ...] = ()

"""The delivery scheduler: from the due index to delivery agents and back to the queue.

Theory of operation (Postfix's qmgr, KumoMTA's two-level queues):

1. The active window (``engine.queue.window``) holds at most ``window`` due (message,
   destination) groups.  Each taken group joins its destination.
2. A destination resolves its route once at a time (``Router.resolve``); its groups then
   join the route's *site* (the server set: domains at one provider share it).  A
   permanent routing failure (null MX, no such domain) fails the recipients; a temporary
   one defers them.
3. A site runs at most ``max_connections`` workers, paced by its message-rate throttle.
   A worker delivers one group (recipients in transactions of at most
   ``max_recipients_per_transaction``), records the outcomes (with any DSN) in one queue
   commit, frees the group's window place, and takes the next group of its site.  Groups
   finishing in one turn of the event loop share one queue operation, and the places
   its commit frees are refilled at once (``_queue_outcomes``, ``_committed``).  Under
   load one turn of the loop can serve thousands of connections and last hundreds of
   milliseconds, so every hop from a freed place back to a busy site (a timer, a task,
   a callback) costs a turn: a place held that long is one the window cannot hand out,
   and sites go idle while the window is full.  A site
   where no host took a connection is marked down for ``down_period``, never longer than
   ``retry_interval`` (a mark must not hold a message past its own retry); its groups are
   deferred without trying.  When the route came from a send connector, the router is
   told (``Router.connector_failed``) and the group is routed again at once: a costlier
   connector of the same address space takes it (Exchange's failover).
   Shaping (``engine.scheduler.shaping``, docs/shaping.md): a route whose send connector
   (or a shaping rule) names an egress pool gets a source per group, drawn by weight,
   and the site's queue is per (source, site), named "source@site": limits, down marks,
   daily caps and automation apply to each source alone.  A site's limits are its
   shape's, the rules matched once per site and kept; a group beyond a (source, site)'s
   daily cap (a rule's, a source's warm-up) or while an automation rule suspends it is
   deferred untried until the cap's next day or the rule's end; a reply that matches an
   automation rule suspends the (source, site) or lowers its limits for a while
   (``_react``), told as THROTTLE events.
4. Deferred recipients come back through the due index at ``retry_delay``; a recipient
   older than ``max_queue_lifetime`` fails whatever its state, with a DSN.
   ``resume`` makes a destination's suspended and deferred recipients due now.
5. The operator's verbs (``hold``, ``release``, ``remove``, ``retry``; through
   ``engine.ops.control``) change whole messages in the writer (``Change``), so they
   cannot race an attempt in flight: its outcome finds the record as the verb left it
   (a hold outlives a deferral, a final outcome stands, a removed message's outcome is
   dropped).  Held and poisoned recipients have no due entry: never tried, never expired
   until released; the time parked moves the expiry.
6. Poison: a message whose processing raises an unexpected error twice in a row, or that
   was in flight at two crashes in a row (``engine.scheduler.inflight``), goes to POISON
   (the counts are kept in its record) and the rest of the mail flows on.

Tasks are bounded by the window and the site limits (resolvers ≤ destinations in the
window, workers ≤ the sum of site limits), never one per queued message.  The scheduler
never writes sockets: delivery agents do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from engine.client.api import DeliveryAgent, FollowOn, FollowOns, RcptResult
from engine.cluster.api import ClusterLimits, Lease
from engine.config import DeliveryConfig
from engine.message.dsn import Action, Failure, build_dsn, reply_status, wants_notice
from engine.ops.events import Events, Kind, bare_message_id
from engine.queue.api import (
    BackPressure,
    Change,
    DueEntry,
    NewMessage,
    Outcome,
    QueueClosed,
    QueueStore,
)
from engine.queue.records import (
    PARKED_STATES,
    Envelope,
    RcptState,
    Recipient,
    RecordError,
    id_text,
    new_id,
)
from engine.queue.window import DueWindow
from engine.routing.api import Route, RouteError, Router, Source
from engine.scheduler import facts
from engine.scheduler.facts import Fact
from engine.scheduler.inflight import InFlightJournal
from engine.scheduler.notices import DelayNotices
from engine.scheduler.policy import (
    RETRY_JITTER,
    SiteLimits,
    Throttle,
    count_daily,
    retry_delay,
)
from engine.scheduler.shaping import Automation, Shape, Shaping, next_day, site_key, utc_day
from engine.scheduler.snapshot import (
    DestinationView,
    DownSite,
    HeldSite,
    SchedulerSnapshot,
    SiteView,
)
from engine.scheduler.traffic import Traffic

log = logging.getLogger("ferry.scheduler")

_WAITING = (RcptState.PENDING, RcptState.DEFERRED)
#: Name of the suspended destinations (an orjson list) among the queue's settings.
SUSPENDED_SETTING = "suspended"
#: Seconds between refills of the window when nothing wakes the scheduler.
POLL_INTERVAL = 1.0
#: Route protocols whose agent makes the final delivery (RFC 3461 §5.2.3 "delivered").
_FINAL = frozenset({"maildir", "lmtp"})
#: Who did it, in events of changes the server made itself (not an operator).
AUTOMATIC = "ferry"
#: The reason in the non-delivery report of a message the operator removed.
REMOVED = "removed by the operator"


@dataclass(frozen=True, slots=True)
class VerbResult:
    """What an operator's verb did, per queue id asked about: ``changed`` (it acted),
    ``unchanged`` (queued, nothing to do: e.g. already held), ``missing`` (not queued)."""

    changed: list[bytes] = field(default_factory=list)
    unchanged: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    #: for ``remove``: the reports queued (their queue ids)
    reports: list[bytes] = field(default_factory=list)

@dataclass(slots=True)
class _Destination:
    name: str
    pending: list[DueEntry] = field(default_factory=list)
    resolving: bool = False
    #: The task asking the DNS for this destination's route (cancelled at stop).
    lookup: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Batch:
    """Outcomes handed to the queue in one operation, and the groups whose window places
    its commit frees."""

    outcomes: list[Outcome] = field(default_factory=list)
    groups: list[DueEntry] = field(default_factory=list)
    #: their tracking events, emitted once the commit is done (none when nobody listens)
    facts: list[Fact] = field(default_factory=list)


#: Groups a worker keeps prepared for its connection's follow-on queue (see _prepare):
#: the agent takes one at each 354, and the worker tops the queue up each time it runs.
#: Two, because the 354 of a follow-on can arrive in the same read as the final reply of
#: the message before it, before the worker has run again.
_FOLLOW_AHEAD = 2


@dataclass(slots=True)
class _Taken:
    """A group prepared to follow another on a worker's connection (see
    Scheduler._prepare): loaded, and offered to the agent in ``job``; the agent's once
    ``job.handle`` is set."""

    entry: DueEntry
    route: Route
    env: Envelope
    job: FollowOn


@dataclass(slots=True)
class _FollowQueue:
    """A worker's follow-on queue (see Scheduler._prepare): the groups prepared for its
    connection, in order, and the same messages as the agent sees them (it pops
    ``follow_ons`` from the left at each 354, so the ones it took come first in
    ``prepared``); ``route`` is the route of the delivery in flight (None between two)."""

    prepared: deque[_Taken] = field(default_factory=deque)
    follow_ons: FollowOns = field(default_factory=deque)
    route: Route | None = None


@dataclass(slots=True)
class _Site:
    name: str
    limits: SiteLimits
    throttle: Throttle
    jobs: deque[tuple[DueEntry, Route]] = field(default_factory=deque)
    workers: int = 0
    peak_workers: int = 0
    #: workers spawned that have not yet taken their first group
    starting: int = 0
    #: the workers' follow-on queues, topped up as groups arrive (see _staff)
    follow_queues: list[_FollowQueue] = field(default_factory=list)
    #: the destination whose limits the site took (its limits again at a reload)
    destination: str = ""
    #: what the shaping rules say for it (engine.scheduler.shaping), and the route it was
    #: made for (its shape again at a reload)
    shape: Shape = field(default_factory=lambda: Shape(SiteLimits()))
    route: Route | None = None
    #: its egress source (None: the system's address); the site's name is "source@site"
    source: Source | None = None
    #: a daily cap may apply (a rule's, or its source's warm-up): counted per group
    capped: bool = False
    #: the call that staffs it again once a connection lease may be free (engine.cluster)
    lease_timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Parked:
    """A connection lease kept with the idle connection its delivery worker left in the
    pool (:data:`LEASE_PARK`), for the next worker of the site to take with it."""

    lease: Lease
    route: Route
    timer: asyncio.TimerHandle | None = None


#: How long a lease shared with others (engine.cluster) stays with the idle connection
#: its delivery worker leaves (seconds).  A worker ends whenever its site's queue is
#: empty for a moment, which a steady trickle of mail makes happen all the time: giving
#: the lease back means closing that connection first (the count must stay true), and
#: the next message would then pay a new lease, a new connection and its EHLO.
LEASE_PARK: Final = 2.0


def _acts(rule: Automation) -> str:
    """What an automation rule does to a (source, site), as the log says it."""
    return "suspends" if rule.action == "suspend" else "throttles"


@dataclass(slots=True)
class _Hold:
    """An automation rule acting on a (source, site) until ``until`` (epoch seconds)."""

    rule: Automation
    until: float
    reply: str
    #: the site (server set) and the source's name ("" for none), for the events
    site: str = ""
    source: str = ""
    timer: asyncio.TimerHandle | None = None
    #: Taken here (False: another worker of the node took it and tells its events).
    origin: bool = True


class Scheduler:
    def __init__(
        self,
        store: QueueStore,
        router: Router,
        agents: Mapping[str, DeliveryAgent],
        *,
        hostname: str,
        settings: DeliveryConfig | None = None,
        events: Events | None = None,
        journal: InFlightJournal | None = None,
        shaping: Shaping | None = None,
    ) -> None:
        self.store = store
        #: where the facts of each message's life go once committed (engine.ops.events)
        self.events = events or Events()
        self.router = router
        self.agents = agents
        self.hostname = hostname
        #: [delivery]: the scheduler reads its settings from the configuration itself
        self.settings = s = settings or DeliveryConfig()
        #: sources, pools, limits by provider and automation ([egress], [shaping])
        self.shaping = shaping or Shaping(s)
        #: (source, site) → the automation rule holding it (suspended or throttled)
        self.held: dict[str, _Hold] = {}
        #: (source, site) → (UTC day, groups sent that day), where a daily cap applies
        self.sent: dict[str, tuple[int, int]] = {}
        #: automation actions taken, by action ("suspend", "throttle"), for metrics
        self.shaping_actions: dict[str, int] = {"suspend": 0, "throttle": 0}
        #: unexpected errors, or crashes in flight, in a row that move a message to POISON
        self.poison_after = s.poison_after
        self.window = DueWindow(store, s.window)
        self.destinations: dict[str, _Destination] = {}
        self.sites: dict[str, _Site] = {}
        self.suspended: set[str] = set()
        self.delay_notices = DelayNotices(s.delay_notice_after)
        #: site → until when it is left alone (outlives the site's workers and queue)
        self.down: dict[str, float] = {}
        self.delivered = 0
        #: messages per minute in and out per destination, and the destinations that could
        #: not be routed lately, for the operator's view (engine.scheduler.traffic)
        self.traffic = Traffic()
        self._traffic_swept = 0.0
        self._rnd = random.Random()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._refill_soon = False
        #: The runner looks at the due index on its own (recovery done), and a look
        #: asked by wake() is due at the end of this turn of the loop.
        self._looking = False
        self._look_soon = False
        #: Outcomes waiting for the next hand-over to the queue (see _queue_outcomes),
        #: and the hand-overs not yet committed.
        self._batch: _Batch | None = None
        self._committing: set[asyncio.Future[None]] = set()
        #: the groups being delivered, kept in the spool for the crash rule (None: off)
        self.journal = journal
        #: told each message's outcomes as they go to the queue (the suppression list's
        #: auto-add: engine.queue.suppression); must not raise or block
        self.on_outcomes: Callable[[Envelope, Sequence[Outcome]], None] | None = None
        #: Limits shared with other nodes through Redis ([cluster], engine.cluster.limits)
        #: or with the other workers of this node (engine.cluster.node): each worker holds
        #: a lease on one of its site's connections for its whole life, a site's message
        #: rate is one schedule for all, and daily caps are counted for all; None: this
        #: process's limits alone.
        self._cluster: ClusterLimits | None = None
        #: site → leases kept with the idle connections their workers left (_park)
        self._parked_leases: dict[str, list[_Parked]] = {}

    # --- control ---------------------------------------------------------------------

    def start(self) -> None:
        # Suspensions outlive a restart: the set is kept with the queue (suspend/resume).
        self.suspended |= load_suspended(self.store)
        self._runner = asyncio.get_running_loop().create_task(self._run())

    @property
    def cluster(self) -> ClusterLimits | None:
        return self._cluster

    @cluster.setter
    def cluster(self, limits: ClusterLimits | None) -> None:
        self._cluster = limits
        if limits is not None:
            limits.on_hold = self._held_elsewhere

    def wake(self) -> None:
        """New mail was queued: look at the due index now rather than at the next poll.

        Once the runner is in its loop, the look is a callback at the end of this turn,
        shared by every wake of the turn: waking the runner took a task and a timer for
        its ``wait_for`` each time, ~12 µs a message received (2026-12-07, issue 17)."""
        if not self._looking:
            self._wake.set()  # (starting: the runner's first look comes after recovery)
        elif not self._look_soon:
            self._look_soon = True
            asyncio.get_running_loop().call_soon(self._look)

    async def stop(self) -> None:
        """Stop taking work; let deliveries in flight finish and record their outcomes."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        # A route still being looked up holds no connection and no outcome: its groups
        # stay queued as they are, and the stop does not wait out a resolver that does
        # not answer (up to its lifetime, 10 s a lookup).
        for dest in self.destinations.values():
            if dest.lookup is not None:
                dest.lookup.cancel()
        # Workers no longer wait for their commits: record what they queued before going.
        while self._tasks or self._batch or self._committing:
            self._flush_outcomes()
            await asyncio.gather(*self._tasks, *self._committing, return_exceptions=True)
        for hold in self.held.values():
            if hold.timer is not None:
                hold.timer.cancel()
        for site in self.sites.values():
            if site.lease_timer is not None:
                site.lease_timer.cancel()
        for stack in self._parked_leases.values():  # given back as the limits stop
            for parked in stack:
                if parked.timer is not None:
                    parked.timer.cancel()
        self._parked_leases.clear()
        if self.journal is not None:
            self.journal.close()  # a clean stop: nothing was in flight at a crash

    async def suspend(self, destination: str, by: str = AUTOMATIC) -> int:
        """Park every waiting recipient of ``destination`` (asked by the operator ``by``);
        returns how many.

        The set is saved before the recipients are parked: after a crash in between, the
        loaded set parks the rest when they come due (a resumed destination saves after
        unparking, so no recipient is ever left parked by a set that forgot it)."""
        self.suspended.add(destination)
        await self._save_suspended()
        return await self._set_state(destination, _WAITING, _suspend, Kind.SUSPEND, by)

    async def resume(self, destination: str, by: str = AUTOMATIC) -> int:
        """Deliver ``destination``'s mail now (``ferry queue resume``): lift its suspension,
        make its suspended and deferred recipients due now, and clear the down mark of its
        site; returns how many recipients were made due."""
        self.suspended.discard(destination)
        count = await self._set_state(destination, (RcptState.SUSPENDED, RcptState.DEFERRED),
                                      _due_now, Kind.RESUME, by)
        await self._save_suspended()
        self._clear_down(destination)
        self.wake()
        return count

    def _clear_down(self, destination: str) -> None:
        """Forget the down mark of ``destination``'s site.  The site that was marked down
        was routed to moments before: its route is in the DNS cache (a mark outlives no
        TTL by much), so no lookup is waited for here."""
        with contextlib.suppress(RouteError):
            route = self.router.resolve_cached(destination)
            if route is not None:
                self.down.pop(route.site, None)
                # and the marks of the site from each egress source ("source@site")
                for key in [k for k in self.down if k.endswith("@" + route.site)]:
                    del self.down[key]

    def reconfigure(self, router: Router, settings: DeliveryConfig,
                    shaping: Shaping | None = None) -> None:
        """A reload (engine.ops.reload): route with ``router`` and work under ``settings``
        from now on.  Deliveries in flight finish with the route and limits they started
        with; groups waiting at a site are routed again by the new router; each site takes
        its new limits (a site over a lowered ``max_connections`` loses a worker as each
        delivery ends, one under a raised one gets workers at once)."""
        self.router = router
        self.settings = settings
        self.shaping = shaping or Shaping(settings)
        self.poison_after = settings.poison_after
        self.window.capacity = settings.window
        self.delay_notices = DelayNotices(settings.delay_notice_after)
        waiting: dict[str, list[DueEntry]] = {}
        for site in list(self.sites.values()):
            if site.route is not None:
                site.shape = self.shaping.shape(site.route)
                site.capped = site.shape.capped
            limits = self._limits(site)
            if limits != site.limits:
                if limits.max_rate != site.limits.max_rate:
                    site.throttle = Throttle(limits.max_rate)
                site.limits = limits
            # Waiting groups are routed again (they keep their window places; workers
            # starting for them find none and end).
            for entry, _route in site.jobs:
                waiting.setdefault(entry.next_hop, []).append(entry)
            site.jobs.clear()
        for destination, entries in waiting.items():
            self._take(destination, entries)
        for site in list(self.sites.values()):
            self._staff(site)
        self.wake()

    # --- the operator's verbs on messages (engine.ops.control) ---------------------------

    async def hold(self, ids: Sequence[bytes], by: str = AUTOMATIC) -> VerbResult:
        """Hold messages: every open recipient HELD (``ferry queue hold``); never tried
        nor expired until released.  An attempt in flight finishes; its outcome leaves
        the hold in place unless it is final (``Outcome``)."""
        return await self._change_all(ids, "hold", Kind.HOLD, by)

    async def release(self, ids: Sequence[bytes], by: str = AUTOMATIC) -> VerbResult:
        """Release held or poisoned messages: due now, their lifetime counting again."""
        done = await self._change_all(ids, "release", Kind.RELEASE, by)
        if done.changed:
            self.wake()
        return done

    async def _change_all(self, ids: Sequence[bytes], action: str, kind: Kind,
                          by: str) -> VerbResult:
        now = time.time()
        results = await self.store.change([Change(qid, action, now) for qid in ids])
        done = VerbResult()
        for qid, count in zip(ids, results, strict=True):
            if count is None:
                done.missing.append(qid)
            elif count > 0:
                done.changed.append(qid)
                if self.events.on:
                    self.events.emit(kind, qid, self._message_id(qid), by=by, reason="")
            else:
                done.unchanged.append(qid)
        return done

    def _message_id(self, queue_id: bytes) -> str:
        """The Message-ID for an event about a message still queued ("" if it is not)."""
        try:
            return bare_message_id(self.store.get(queue_id).message_id)
        except (KeyError, RecordError):
            return ""

    async def remove(self, ids: Sequence[bytes], report: bool = False,
                     by: str = AUTOMATIC) -> VerbResult:
        """Delete messages (``ferry queue remove``); with ``report``, one non-delivery
        report per message to its sender (never to the null sender) about its open
        recipients, committed with the removal.  A delivery in flight cannot be called
        back: its outcome finds no record and is dropped."""
        done = VerbResult()
        for qid in ids:
            for _ in range(3):  # a recipient's outcome landed meanwhile: build it again
                try:
                    env = self.store.get(qid)
                except KeyError:
                    done.missing.append(qid)
                    break
                except RecordError:
                    # Corrupt: its indexes cannot be derived to be removed with it; it
                    # stays listed in the corrupt state (ferry queue stats).
                    done.unchanged.append(qid)
                    break
                open_now = tuple(i for i, r in enumerate(env.recipients) if not r.final)
                failures = [Failure(i, "failed", "5.0.0", REMOVED, "", None)
                            for i in open_now] if report else []
                reports = self._dsn(env, failures, time.time()) if failures else []
                for dsn in reports:
                    # Named here, not by the writer (it may be another process): the
                    # report's id goes into the reply and the events.
                    dsn.envelope.queue_id = new_id()
                (count,) = await self.store.change([Change(
                    qid, "remove", time.time(), expect=open_now, new_messages=tuple(reports))])
                if count == -1:
                    continue
                if count is None:
                    done.missing.append(qid)
                    break
                done.changed.append(qid)
                for dsn in reports:
                    done.reports.append(dsn.envelope.queue_id)
                if self.events.on:
                    self.events.emit(Kind.REMOVE, qid, bare_message_id(env.message_id), by=by,
                                     report=bool(reports))
                    for dsn in reports:
                        facts.emit(self.events, facts.dsn(env, failures, dsn.envelope.queue_id))
                break
            else:
                done.unchanged.append(qid)  # it kept changing under us: ask again
        if done.reports:
            self.wake()
        return done

    async def retry_destination(self, destination: str, by: str = AUTOMATIC) -> int:
        """Try ``destination``'s deferred recipients now, whatever their retry time, and
        forget its site's down mark (``ferry queue retry DEST``); how many recipients."""
        seen: dict[bytes, None] = {}

        def now_due(qid: bytes, index: int, recipient: Recipient, now: float) -> Outcome:
            seen[qid] = None
            return _retry_now(qid, index, now)

        count = await self._set_state(destination, (RcptState.DEFERRED,), now_due)
        self._clear_down(destination)
        self.wake()
        if self.events.on:
            for qid in seen:
                self.events.emit(Kind.RETRY, qid, self._message_id(qid), by=by,
                                 destination=destination)
        return count

    async def retry_messages(self, ids: Sequence[bytes], by: str = AUTOMATIC) -> VerbResult:
        """Try these messages' deferred recipients now (``ferry queue retry --message``),
        their sites' down marks forgotten.  A recipient held meanwhile stays held (the
        writer keeps a hold over a deferral)."""
        done = VerbResult()
        outcomes: list[Outcome] = []
        found: list[tuple[bytes, Envelope]] = []
        now = time.time()
        for qid in ids:
            try:
                env = self.store.get(qid)
            except (KeyError, RecordError):
                done.missing.append(qid)
                continue
            mine = [_retry_now(qid, i, now)
                    for i, r in enumerate(env.recipients) if r.state is RcptState.DEFERRED]
            if not mine:
                done.unchanged.append(qid)
                continue
            outcomes += mine
            found.append((qid, env))
        if outcomes:
            await self.store.record(outcomes)
        for qid, env in found:
            done.changed.append(qid)
            for hop in {r.next_hop for r in env.recipients if r.state is RcptState.DEFERRED}:
                self._clear_down(hop)
            if self.events.on:
                self.events.emit(Kind.RETRY, qid, bare_message_id(env.message_id), by=by,
                                 destination="")
        if found:
            self.wake()
        return done

    # --- poison ------------------------------------------------------------------------

    async def _fault(self, entry: DueEntry, exc: Exception) -> None:
        """Processing ``entry`` raised: a bug, not a delivery problem.  The first time,
        park the group for a retry interval rather than take it again at once; the
        second time in a row, move the message to POISON so it cannot loop.  The queue
        refusing a write (back pressure, shutdown) says nothing about the message: it is
        not counted."""
        reason = _reason(exc)
        if isinstance(exc, (BackPressure, QueueClosed)):
            log.warning("recording the delivery of %s to %s failed: %s; tried again in a "
                        "retry interval", id_text(entry.queue_id), entry.next_hop, reason)
            await self._retry_later(entry)
            return
        try:
            (count,) = await self.store.change([Change(
                entry.queue_id, "fault", time.time(), reason, self.poison_after)])
        except Exception as error:  # the queue is closed: the due entry stays
            log.error("recording a fault of %s failed: %s", id_text(entry.queue_id), error)
            self._release(entry)
            return
        if count is None:
            self._release(entry)
            return
        if count:
            log.error("message %s moved to poison: a second unexpected error in its "
                      "delivery to %s (release it with ferry queue release)",
                      id_text(entry.queue_id), entry.next_hop, exc_info=exc)
            self._poisoned(entry.queue_id, reason)
            self._release(entry)
            return
        log.warning("delivery of %s to %s raised %s; tried again in a retry interval "
                    "(poison at the next)", id_text(entry.queue_id), entry.next_hop, reason)
        await self._retry_later(entry)

    async def _retry_later(self, entry: DueEntry) -> None:
        """Park a group that could not be processed for a retry interval rather than take
        it again at once from the due index."""
        await self._defer_group(entry, "451 4.3.0 local error in delivery",
                                time.time() + self.settings.retry_interval)

    def _poisoned(self, queue_id: bytes, reason: str) -> None:
        if self.events.on:
            self.events.emit(Kind.POISON, queue_id, self._message_id(queue_id),
                             reason=reason)

    async def _count_crashes(self, ids: list[bytes]) -> None:
        """The messages in flight when the last run died get one more crash each; the
        second in a row moves a message to POISON."""
        if not ids:
            return
        reason = f"in flight at {self.poison_after} crashes of the server in a row"
        try:
            results = await self.store.change([Change(qid, "crash", time.time(), reason,
                                                      self.poison_after) for qid in ids])
        except Exception as exc:
            log.error("counting the crash of %d messages in flight failed: %s", len(ids), exc)
            return
        log.warning("%d messages were in flight when the server last stopped without "
                    "shutting down", len(ids))
        for qid, count in zip(ids, results, strict=True):
            if count:
                log.error("message %s moved to poison: %s (release it with ferry queue "
                          "release)", id_text(qid), reason)
                self._poisoned(qid, reason)

    def snapshot(self, destinations: bool = True) -> SchedulerSnapshot:
        """What the operator sees, now, as one frozen value (``engine.scheduler.snapshot``):
        the one place the control channel and the viewers read the scheduler's state.
        Without ``destinations`` (a metrics scrape) the per-destination views, a route
        lookup each, are left out."""
        now = time.time()
        sites = sorted((SiteView(site.name, site.workers, site.limits.max_connections,
                                 site.limits.max_rate, len(site.jobs))
                        for site in self.sites.values()), key=lambda v: (-v.workers, v.name))
        return SchedulerSnapshot(
            taken=now, messages=self.store.count(), delivered=self.delivered,
            paused=self.settings.paused, window=len(self.window), sites=tuple(sites),
            down=tuple(DownSite(name, until) for name, until in sorted(self.down.items())
                       if until > now),
            suspended=tuple(sorted(self.suspended)), queue=self.store.stats,
            destinations=self._destination_views(now) if destinations else (),
            held=tuple(HeldSite(name, hold.rule.action, hold.rule.name, hold.until)
                       for name, hold in sorted(self.held.items())),
            shaping_actions=tuple(sorted(self.shaping_actions.items())))

    def _destination_views(self, now: float) -> tuple[DestinationView, ...]:
        traffic = self._sweep_traffic(now)
        views = []
        for name in sorted(set(traffic.counts) | set(traffic.unreachable)):
            site = ""
            with contextlib.suppress(RouteError):
                route = self.router.resolve_cached(name)
                site = route.site if route is not None else ""
                if route is not None and (sources := self.shaping.shape(route).sources):
                    # one queue per egress source: "a@site b@site"
                    site = " ".join(site_key(route.site, s.source) for s in sources)
            views.append(DestinationView(name, site, *traffic.rates(name, now),
                                         traffic.unreachable.get(name, ("", 0.0))[0]))
        return tuple(views)

    def _sweep_traffic(self, now: float) -> Traffic:
        # Mail that waits is retried within the longest retry interval (plus its jitter).
        self._traffic_swept = now
        self.traffic.sweep(now, self.settings.max_retry_interval * (1 + 2 * RETRY_JITTER))
        return self.traffic

    async def _save_suspended(self) -> None:
        await self.store.save_setting(SUSPENDED_SETTING, orjson.dumps(sorted(self.suspended)))

    async def _set_state(
        self, destination: str, states: Sequence[RcptState],
        new: Callable[[bytes, int, Recipient, float], Outcome], kind: Kind | None = None,
        by: str = AUTOMATIC,
    ) -> int:
        """Record ``new(queue_id, index, recipient, now)`` for every recipient of
        ``destination`` in one of ``states``; returns how many.  Each message changed is
        reported as ``kind`` (when given) once its page is committed."""
        count, after = 0, b""
        while True:
            ids = self.store.ids_for_hop(destination, 1000, after)
            if not ids:
                return count
            outcomes = []
            changed: list[Fact] = []
            for qid in ids:
                try:
                    env = self.store.get(qid)
                except (KeyError, RecordError):
                    continue
                now = time.time()
                mine = [new(qid, i, r, now) for i, r in enumerate(env.recipients)
                        if r.next_hop == destination and r.state in states]
                if mine and kind is not None and self.events.on:
                    changed.append(facts.parked(kind, env, destination, len(mine), by))
                outcomes += mine
            if outcomes:
                await self.store.record(outcomes)
                facts.emit(self.events, changed)
            count += len(outcomes)
            after = ids[-1]

    # --- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        if self.journal is not None:
            await self._count_crashes(self.journal.recover())
            self.journal.open()
        self._looking = True
        while not self._stopping:
            try:
                self._look()
            except Exception:
                # A bug or a failing read of the due index must not end the runner: with
                # it would go every retry of deferred mail, silently, until the stop.
                log.exception("the scheduler's look at the due index failed; it looks "
                              "again in %g s", POLL_INTERVAL)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
        self._looking = False

    def _look(self) -> None:
        """One look of the runner: forget ended down times, sweep the traffic figures,
        then refill the window and hand the groups out."""
        self._look_soon = False
        if self._stopping:
            return
        now = time.time()
        if self.down:
            self.down = {site: until for site, until in self.down.items() if until > now}
        if now - self._traffic_swept > 60.0:
            self._sweep_traffic(now)
        self._refill()

    def _refill(self) -> None:
        """Fill the window's free places from the due index and hand the groups out."""
        self._refill_soon = False
        if self._stopping or self.settings.paused:
            return
        self.window.refill()
        taken: dict[str, list[DueEntry]] = {}
        while (entry := self.window.take()) is not None:
            taken.setdefault(entry.next_hop, []).append(entry)
        if taken:
            now = time.time()
            for destination, entries in taken.items():
                self.traffic.came(destination, len(entries), now)
                self._take(destination, entries)

    def _release(self, entry: DueEntry) -> None:
        """Free a group's window place outside a batch (nothing to record, or recorded on
        its own): places freed in one turn of the loop share the next turn's refill."""
        self.window.release(entry)
        if self.journal is not None:
            self.journal.ended(entry.group)
        if not self._refill_soon:
            self._refill_soon = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _take(self, name: str, entries: list[DueEntry]) -> None:
        """Route groups for destination ``name`` to their site."""
        dest = self.destinations.get(name)
        if dest is None:
            # Most groups go where the DNS answers are cached: straight to their site,
            # without a task and the turns of the loop it would wait for.
            try:
                route = self.router.resolve_cached(name)
            except RouteError as exc:
                self._unrouted(entries, exc)
                return
            if route is not None:
                self._place(entries, route)
                return
            dest = self.destinations[name] = _Destination(name)
        dest.pending += entries
        if not dest.resolving:
            dest.resolving = True
            dest.lookup = self._spawn(self._resolve(dest))

    async def _resolve(self, dest: _Destination) -> None:
        entries: list[DueEntry] = []
        try:
            while dest.pending:
                entries, dest.pending = dest.pending, []
                try:
                    route = await self.router.resolve(dest.name)
                except RouteError as exc:
                    self._unrouted(entries, exc)
                    continue
                self._place(entries, route)
                entries = []
        except asyncio.CancelledError:
            # The stop: the groups leave the window untouched (their retry time and
            # attempts as they were), to be routed again at the next start.
            for entry in (*entries, *dest.pending):
                self._release(entry)
            dest.pending = []
            raise
        finally:
            dest.resolving = False
            dest.lookup = None
            if not dest.pending:
                self.destinations.pop(dest.name, None)

    def _unrouted(self, entries: list[DueEntry], exc: RouteError) -> None:
        if entries:
            if exc.permanent:
                self.traffic.routed(entries[0].next_hop)  # failed for good: nothing waits
            else:
                self.traffic.unroutable(entries[0].next_hop, _route_reply(exc), time.time())
        for entry in entries:
            self._spawn(self._fail_unrouted(entry, exc))

    def _place(self, entries: list[DueEntry], route: Route) -> None:
        """Queue groups at their route's site (per egress source, drawn by weight for each
        group, when the route has a pool) and staff it."""
        if entries:
            self.traffic.routed(entries[0].next_hop)
        shape = self.shaping.shape(route)  # a dict lookup: the rules matched once per site
        per_connection = shape.limits.max_messages_per_connection
        if not shape.sources:
            if per_connection:
                route = route.shaped(None, per_connection)
            self._queue(entries, route, shape)
            return
        by_source: dict[Source | None, list[DueEntry]] = {}
        for entry in entries:
            by_source.setdefault(shape.pick(self._rnd), []).append(entry)
        for source, mine in by_source.items():
            self._queue(mine, route.shaped(source, per_connection), shape)

    def _queue(self, entries: list[DueEntry], route: Route, shape: Shape) -> None:
        site = self._site(route, shape)
        for entry in entries:
            site.jobs.append((entry, route))
        self._staff(site)

    def _site(self, route: Route, shape: Shape) -> _Site:
        key = site_key(route.site, route.source)
        site = self.sites.get(key)
        if site is None:
            site = _Site(key, shape.limits, Throttle(0.0), destination=route.destination,
                         shape=shape, route=route, source=route.source,
                         capped=shape.capped)
            site.limits = limits = self._limits(site)
            site.throttle = Throttle(limits.max_rate)
            self.sites[key] = site
        return site

    def _limits(self, site: _Site) -> SiteLimits:
        """A site's limits now: its shape's, lowered while an automation rule holds it."""
        hold = self.held.get(site.name)
        limits = site.shape.limits
        if hold is not None and hold.rule.action == "throttle":
            return hold.rule.lowered(limits)
        return limits

    def _staff(self, site: _Site) -> None:
        """A worker for every queued group no starting worker will take, up to the site's
        limit: busy workers are busy for a whole transaction, so groups that arrive
        meanwhile get connections of their own while the limit allows."""
        while site.workers < site.limits.max_connections and site.starting < len(site.jobs):
            site.workers += 1
            site.starting += 1
            site.peak_workers = max(site.peak_workers, site.workers)
            self._spawn(self._work(site))
        if len(site.jobs) > site.starting:
            # At the limit: the groups no worker takes now go to the follow-on queues of
            # the deliveries in flight, ready for their next 354.
            for queue in site.follow_queues:
                if queue.route is not None:
                    self._prepare(site, queue)

    async def _work(self, site: _Site) -> None:
        site.starting -= 1
        lease: Lease | None = None
        #: this worker ends to give its lease back (not to keep it with its connection)
        leaving = False
        if self.cluster is not None:
            lease = self._unpark(site.name) or await self.cluster.acquire(
                site.name, site.limits.max_connections)
            if lease is None:
                # Every connection to the site is leased, by this node or another: its
                # groups wait here for a lease, asked for again shortly.
                self._lease_later(site)
                site.workers -= 1
                if not site.jobs and not site.workers:
                    self.sites.pop(site.name, None)
                return
        last: Route | None = None
        #: Groups prepared to follow on this worker's connection (see _prepare); those the
        #: agent took are already on the wire: this worker collects them first.
        queue = _FollowQueue()
        prepared, follow_ons = queue.prepared, queue.follow_ons
        site.follow_queues.append(queue)
        try:
            while site.jobs or prepared or self._reclaim(site, queue):
                if not prepared and (site.workers > site.limits.max_connections or (
                        lease is not None and self.cluster is not None
                        and self.cluster.over_share(site.name, site.limits.max_connections))):
                    # A reload lowered the limit, or this node lost Redis holding more
                    # than its share: this worker's delivery was its last.
                    leaving = True
                    break
                if prepared and prepared[0].job.handle is not None:
                    tried = time.time()
                    job = prepared.popleft()
                    queue.route = last = job.route
                    self._prepare(site, queue)
                    try:
                        ok = await self._deliver(job.entry, job.route, taken=job, site=site)
                    finally:
                        queue.route = None
                else:
                    loaded: _Taken | None = None
                    if prepared:
                        # Prepared, never taken (the connection could carry no more): its
                        # turn now, loaded already.
                        loaded = prepared.popleft()
                        if follow_ons and follow_ons[0] is loaded.job:
                            follow_ons.popleft()
                        entry, route = loaded.entry, loaded.route
                    else:
                        entry, route = site.jobs.popleft()
                    down_until = self.down.get(site.name, 0.0)
                    if down_until > time.time():
                        if self._elsewhere(route):
                            # Its send connector failed and the router now names another:
                            # the group goes there at once, keeping its window place.
                            self._take(entry.next_hop, [entry])
                            continue
                        await self._defer_group(
                            entry, f"451 4.4.1 {site.name} is down, not tried", down_until,
                            min(5.0, self._down_length() * RETRY_JITTER), site=site.name)
                        continue
                    # A suspended destination's group is only parked by _deliver: it
                    # spends no daily cap's count and no rate slot of its site.
                    if (entry.next_hop not in self.suspended
                            and await self._paced(site, entry)):
                        continue
                    tried = time.time()
                    queue.route = last = route
                    try:
                        ok = await self._deliver(entry, route, self._prepare(site, queue),
                                                 loaded=loaded, site=site)
                    finally:
                        queue.route = None
                if ok:
                    self.down.pop(site.name, None)
                else:
                    # From the attempt's start: its deferred recipients' retry times are
                    # counted from after it (see _down_length).
                    self.down[site.name] = tried + self._down_length()
        finally:
            site.follow_queues.remove(queue)
            # Only if this task is cancelled: prepared groups nobody took go back.
            follow_ons.clear()
            for job in reversed(prepared):
                if job.job.handle is None:
                    site.jobs.appendleft((job.entry, job.route))
            site.workers -= 1
            if not site.jobs and not site.workers:
                self.sites.pop(site.name, None)
            if lease is not None:
                self._park(site, lease, last, leaving)

    def _park(self, site: _Site, lease: Lease, route: Route | None, leaving: bool) -> None:
        """Keep ``lease`` with the idle connection a worker of ``site`` leaves, for
        :data:`LEASE_PARK`; give it back now when the worker ends to give it back, when
        another waits for the site's leases, or at the stop."""
        cluster = self.cluster
        if (leaving or route is None or self._stopping or cluster is None
                or cluster.yielding(site.name, site.limits.max_connections)):
            self._spawn(self._give_back(lease, route))
            return
        parked = _Parked(lease, route)
        parked.timer = asyncio.get_running_loop().call_later(
            LEASE_PARK, self._unparked, site.name, parked)
        self._parked_leases.setdefault(site.name, []).append(parked)

    def _unpark(self, name: str) -> Lease | None:
        """A lease parked for ``name`` (and its idle connection), or None."""
        stack = self._parked_leases.get(name)
        if not stack:
            return None
        parked = stack.pop()
        if not stack:
            del self._parked_leases[name]
        if parked.timer is not None:
            parked.timer.cancel()
        return parked.lease

    def _unparked(self, name: str, parked: _Parked) -> None:
        """Nobody took a parked lease in time: its connection is closed, it goes back."""
        stack = self._parked_leases.get(name)
        if stack is not None and parked in stack:
            stack.remove(parked)
            if not stack:
                del self._parked_leases[name]
            self._spawn(self._give_back(parked.lease, parked.route))

    def _lease_later(self, site: _Site) -> None:
        if site.lease_timer is None and self.cluster is not None:
            site.lease_timer = asyncio.get_running_loop().call_later(
                self.cluster.lease_wait, self._lease_again, site)

    def _lease_again(self, site: _Site) -> None:
        site.lease_timer = None
        if self.sites.get(site.name) is site and not self._stopping:
            self._staff(site)

    async def _give_back(self, lease: Lease, route: Route | None) -> None:
        """A worker ended: close the idle connection it leaves in its agent's pool, then
        return its lease (engine.cluster), so no node opens a connection while one that
        counts against the same limit is still open here."""
        assert self.cluster is not None
        agent = self.agents.get(route.protocol) if route is not None else None
        if route is not None and agent is not None:
            await agent.retire_idle(route.site, route.source)
        await self.cluster.release(lease)

    # --- shaping: daily caps and automation on replies ----------------------------------

    async def _paced(self, site: _Site, entry: DueEntry) -> bool:
        """Hold ``entry``'s group to its site's gate and rate: True when it was deferred
        (an automation hold, the daily cap), else after waiting for its rate slot."""
        if self.held or site.capped:
            gate = await self._gate(site)
            if gate is not None:
                reason, until, spread = gate
                await self._defer_group(entry, reason, until, spread, site=site.name)
                return True
        if self.cluster is not None and site.limits.max_rate:
            wait = (await self.cluster.reserve(site.name, site.limits.max_rate)).wait
        else:
            wait = site.throttle.wait(asyncio.get_running_loop().time())
        if wait:
            await asyncio.sleep(wait)
        return False

    async def _gate(self, site: _Site) -> tuple[str, float, float] | None:
        """Whether the next group of ``site`` must wait: (the deferral's reply, until when,
        its spread) while an automation rule suspends the (source, site), or once its
        daily cap is reached (the group is counted otherwise).  Deferred, never failed:
        the provider asked for patience, not for the mail to be dropped."""
        now = time.time()
        hold = self.held.get(site.name)
        if hold is not None and hold.rule.action == "suspend" and hold.until > now:
            return (f"451 4.7.0 {site.name} suspended until {_iso(hold.until)} by shaping "
                    f"rule {hold.rule.name!r} after: {hold.reply}"[:500], hold.until,
                    min(5.0, hold.rule.duration * RETRY_JITTER))
        if not site.capped:
            return None
        day = utc_day(now)
        cap = site.shape.cap(site.source, day)
        if not cap:
            return None
        if self.cluster is not None:
            # Counted with the others (a node's workers: engine.cluster.node).
            reached = not await self.cluster.count(site.name, day, cap)
        else:
            reached = not count_daily(self.sent, site.name, day, cap)
        if reached:
            source = site.source.name if site.source is not None else "this server"
            return (f"451 4.7.0 daily cap of {cap} messages from {source} to "
                    f"{site.route.site if site.route else site.name} reached; deferred to "
                    "the next UTC day", next_day(now), 60.0)
        return None

    def _react(self, site: _Site, results: Sequence[RcptResult]) -> None:
        """The first automation rule a reply of this delivery matches acts on the
        (source, site) that got it, unless a rule holds it already."""
        if site.name in self.held:
            return
        for r in results:
            if r.state is RcptState.DELIVERED:
                continue
            rule = site.shape.react(r.reply)
            if rule is not None:
                self._hold(site, rule, r.reply)
                return

    def _hold(self, site: _Site, rule: Automation, reply: str) -> None:
        action = rule.action
        hold = self._keep_hold(site.name, _Hold(
            rule, time.time() + rule.duration, reply,
            site.route.site if site.route is not None else site.name,
            site.source.name if site.source is not None else ""))
        self.shaping_actions[action] += 1
        log.warning("shaping rule %r %s %s for %gs after: %s", rule.name, _acts(rule),
                    site.name, rule.duration, reply)
        self._tell_hold("on", hold)
        if self.cluster is not None:
            # The other workers of the node back off too (engine.cluster.node).
            self.cluster.share_hold(site.name, rule.name, hold.until, reply)

    def _keep_hold(self, name: str, hold: _Hold) -> _Hold:
        """Hold the (source, site) ``name`` until ``hold.until``."""
        self.held[name] = hold
        hold.timer = asyncio.get_running_loop().call_later(
            max(0.0, hold.until - time.time()), self._unhold, name, hold)
        site = self.sites.get(name)
        if site is not None and hold.rule.action == "throttle":
            self._set_limits(site, self._limits(site))
        return hold

    def _held_elsewhere(self, name: str, rule_name: str, until: float, reply: str) -> None:
        """Another worker of the node (or another node of the cluster) was held by the
        automation rule ``rule_name``: this one holds the same (source, site) until the
        same time (its events are the other's).  A rule this one does not know (a reload
        not yet done) is ignored."""
        rule = next((a for a in self.shaping.automation if a.name == rule_name), None)
        current = self.held.get(name)
        if rule is None or until <= time.time() or (current is not None
                                                    and current.until >= until):
            return
        if current is not None and current.timer is not None:
            current.timer.cancel()
        source, _, site = name.rpartition("@")
        self._keep_hold(name, _Hold(rule, until, reply, site, source, origin=False))
        log.info("shaping rule %r %s %s until %s, told by another worker or node",
                 rule.name, _acts(rule), name, _iso(until))

    def _unhold(self, name: str, hold: _Hold) -> None:
        if self.held.get(name) is not hold:
            return
        del self.held[name]
        site = self.sites.get(name)
        if site is not None:
            self._set_limits(site, self._limits(site))
            self._staff(site)
        log.info("shaping rule %r lifted from %s", hold.rule.name, name)
        if hold.origin:
            self._tell_hold("off", hold)
        self.wake()

    @staticmethod
    def _set_limits(site: _Site, limits: SiteLimits) -> None:
        if limits.max_rate != site.limits.max_rate:
            site.throttle = Throttle(limits.max_rate)
        site.limits = limits

    def _tell_hold(self, state: str, hold: _Hold) -> None:
        """The THROTTLE event (docs/tracking.md): a fact of a (source, site), not of a
        message, told when it happens."""
        if self.events.on:
            rule = hold.rule
            self.events.emit(Kind.THROTTLE, b"", "", state=state, action=rule.action,
                             rule=rule.name, site=hold.site, source=hold.source,
                             until=_iso(hold.until), reply=hold.reply)

    def _down_length(self) -> float:
        """How long a site where no host took a connection is left alone: ``down_period``,
        but never longer than the earliest first retry (the retry interval less its
        jitter), so the mark never holds a message past the time its own retry would have
        come (Postfix keeps a dead destination throttled for ``minimal_backoff_time``,
        then delivers its backlog)."""
        s = self.settings
        return min(s.down_period, s.retry_interval * (1 - RETRY_JITTER))

    def _elsewhere(self, route: Route) -> bool:
        """Whether the router now sends ``route.destination``'s mail by another send
        connector than ``route``'s (it was marked failed), by a route it has without
        waiting for DNS."""
        if not route.connector:
            return False
        try:
            current = self.router.resolve_cached(route.destination)
        except RouteError:
            return False
        return current is not None and current.connector != route.connector

    def _fail_over(self, entry: DueEntry, route: Route) -> bool:
        """No host of ``route``'s send connector took a connection: tell the router (it
        avoids the connector for a retry interval, Exchange's failover) and, when it now
        names another connector, or must ask the DNS to say, hand the group back to be
        routed again at once (it keeps its window place; nothing is recorded, so a crash
        tries it again).  False when the group stays with this connector.

        Every hand-back follows a failed connection and marks that connector; once every
        connector of the match is marked, the router names the one just tried again and
        the group stays (deferred, its site down): hand-backs cannot go round."""
        if not route.connector:
            return False
        self.router.connector_failed(route.connector,
                                     time.time() + self.settings.retry_interval)
        try:
            current = self.router.resolve_cached(entry.next_hop)
        except RouteError:
            return False
        if current is not None and current.connector == route.connector:
            return False  # every connector of its match is marked: it stays with this one
        self._take(entry.next_hop, [entry])
        return True

    # --- one group -------------------------------------------------------------------

    def _load(self, entry: DueEntry) -> Envelope | None:
        try:
            return self.store.get(entry.queue_id)
        except KeyError:
            return None  # already final (a duplicate due entry after a crash)
        except RecordError as exc:
            self._spawn(self.store.quarantine(entry.queue_id, str(exc), entry.key))
            return None

    def _load_with_body(self, entry: DueEntry) -> tuple[Envelope | None, bytes | None]:
        """The envelope and the body in one read (most groups are delivered: one read
        transaction, not two); when either is absent or the record does not decode, the
        envelope as :meth:`_load` says, the body (None) to be read on its own later."""
        try:
            return self.store.get_with_body(entry.queue_id)
        except (KeyError, RecordError):
            return self._load(entry), None

    def _waiting(self, env: Envelope, destination: str) -> list[int]:
        return [i for i, r in enumerate(env.recipients)
                if r.next_hop == destination and r.state in _WAITING]

    @staticmethod
    def _reclaim(site: _Site, queue: _FollowQueue) -> bool:
        """A worker with nothing left takes back one group another worker prepared and
        its agent has not taken (the newest: the agent takes from the other end), so a
        prepared group never waits for a connection that cannot carry it (no PIPELINING)
        or whose transaction stalls while this one is free.  The group goes back to the
        front of the site's queue (it keeps its window place; it is loaded again)."""
        for other in site.follow_queues:
            if other is queue or not other.prepared or not other.follow_ons:
                continue
            last = other.prepared[-1]
            # The agent pops follow_ons from the left and sets the handle in the same
            # step, so the right end of both is the same untaken group.
            if last.job.handle is None and other.follow_ons[-1] is last.job:
                other.prepared.pop()
                other.follow_ons.pop()
                site.jobs.appendleft((last.entry, last.route))
                return True
        return False

    def _prepare(self, site: _Site, queue: _FollowQueue) -> FollowOns | None:
        """Top up a worker's follow-on queue from the site's next groups, loaded (envelope
        and body), for the delivery in flight on ``queue.route``, and return it for
        ``deliver`` (None when the agent takes none there).

        Only when the site has all the workers its limit allows (below it, the group goes
        out in parallel on a connection of its own; above it, after a reload lowered the
        limit, this worker is to end after its delivery), no rate limit (a follow-on is sent
        at once), and for plain groups (one transaction, same route, nothing to record
        first).  Anything else waits for a worker's turn.  Runs in the worker, never from
        the agent's reads: the agent only pops what is ready."""
        route = queue.route
        assert route is not None
        prepared, follow_ons = queue.prepared, queue.follow_ons
        agent = self.agents.get(route.protocol)
        if (site.limits.max_rate or site.capped or agent is None
                or not agent.takes_follow_ons(route)):
            return None  # a rate or a daily cap counts each group at its worker's turn
        if self.cluster is not None and self.cluster.yielding(site.name,
                                                              site.limits.max_connections):
            # Leases to give back (another worker or node waits, or the share is lower
            # now): nothing more rides on these connections, so the extra ones can end.
            return None
        jobs = site.jobs
        # Never the groups that workers still starting will take (see _staff).
        while (len(follow_ons) < _FOLLOW_AHEAD and len(jobs) > site.starting
               and not self._stopping and site.workers == site.limits.max_connections
               and not self.down.get(site.name, 0.0) and site.name not in self.held):
            entry, nxt = jobs[0]
            if (nxt.site, nxt.protocol, nxt.tls, nxt.auth) != (
                    route.site, route.protocol, route.tls, route.auth):
                break
            try:
                env, body = self.store.get_with_body(entry.queue_id)
            except (KeyError, RecordError):
                break  # gone or corrupt: the worker's normal turn deals with it
            pending = self._waiting(env, entry.next_hop)
            if (not pending or len(pending) > self.settings.max_recipients_per_transaction
                    or entry.next_hop in self.suspended or self._expired(env, time.time())):
                break
            jobs.popleft()
            if self.journal is not None:
                self.journal.started(entry.group)  # the agent may send it at any 354
            job = FollowOn(env, pending, body)
            prepared.append(_Taken(entry, nxt, env, job))
            follow_ons.append(job)
        return follow_ons

    async def _deliver(self, entry: DueEntry, route: Route,
                       follow_ons: FollowOns | None = None, *, taken: _Taken | None = None,
                       loaded: _Taken | None = None, site: _Site | None = None) -> bool:
        """Deliver one group (``loaded``: prepared for a follow-on queue, not taken), or
        collect one an agent took from ``follow_ons`` (``taken``); False when no server
        answered at all (the site is down).

        The worker does not wait for the commit of the outcomes: it takes its next group
        while the writer syncs.  The group keeps its window place until that commit is
        done, so it is never taken twice; a crash before it re-delivers (at-least-once)."""
        batched = False
        try:
            agent = self.agents[route.protocol]
            results: list[RcptResult] = []
            if taken is not None:
                env = taken.env
                results = await agent.resume(taken.job)
            else:
                current: Envelope | None
                read: bytes | None
                if loaded is not None:
                    current, read = loaded.env, loaded.job.body
                else:
                    current, read = self._load_with_body(entry)
                if current is None:
                    return True
                env = current
                now = time.time()
                if entry.next_hop in self.suspended:
                    waiting = self._waiting(env, entry.next_hop)
                    await self.store.record([Outcome(entry.queue_id, i, RcptState.SUSPENDED,
                                                     attempted=False) for i in waiting])
                    self._parked(Kind.SUSPEND, env, entry.next_hop, len(waiting))
                    if entry.next_hop not in self.suspended:
                        # Resumed while that commit was on its way: resume() may have
                        # looked before it landed, so release these recipients here.
                        await self.store.record([Outcome(entry.queue_id, i, RcptState.PENDING,
                                                         attempted=False, due=time.time())
                                                 for i in waiting])
                        self._parked(Kind.RESUME, env, entry.next_hop, len(waiting))
                        self.wake()
                    return True
                expired = self._expired(env, now)
                pending = self._waiting(env, entry.next_hop)
                if expired or not pending:
                    if expired:
                        batched = await self._finish(
                            entry, env, [],
                            [(i, "expired") for i in self._all_open(env, entry.next_hop)],
                            route)
                    return True
                if self.journal is not None:
                    self.journal.started(entry.group)
                body = read if read is not None else self.store.body(entry.queue_id)
                size = self.settings.max_recipients_per_transaction
                if len(pending) <= size:
                    results = await agent.deliver(route, env, pending, body, follow_ons)
                else:
                    for start in range(0, len(pending), size):
                        results += await agent.deliver(route, env, pending[start:start + size],
                                                       body)
            reached = any(r.remote for r in results) or any(
                r.state is not RcptState.DEFERRED for r in results)
            if site is not None and site.shape.by_code:
                self._react(site, results)
            if not reached and taken is None and self._fail_over(entry, route):
                batched = True  # routed again: the group keeps its window place
                return False
            self.delivered += sum(r.state is RcptState.DELIVERED for r in results)
            batched = await self._finish(entry, env, results, [], route)
            return reached
        except Exception as exc:
            await self._fault(entry, exc)
            return True
        finally:
            if not batched:
                self._release(entry)

    def _parked(self, kind: Kind, env: Envelope, destination: str, count: int) -> None:
        if count and self.events.on:
            facts.emit(self.events, [facts.parked(kind, env, destination, count, AUTOMATIC)])

    def _all_open(self, env: Envelope, destination: str) -> list[int]:
        return [i for i, r in enumerate(env.recipients)
                if r.next_hop == destination and not r.final and r.state not in PARKED_STATES]

    def _expired(self, env: Envelope, now: float) -> bool:
        if env.parked_since:
            return False  # held or poisoned: its lifetime counts again from the release
        limit = env.expiry(self.settings.max_queue_lifetime)
        return bool(limit) and now >= limit

    async def _finish(
        self, entry: DueEntry, env: Envelope, results: Sequence[RcptResult],
        expired: Sequence[tuple[int, str]], route: Route | None = None,
    ) -> bool:
        """Turn results (from a delivery by ``route``) into outcomes and one DSN for the
        failures, delays and successes reported, and record them.  With a DSN the commit
        is awaited here (it may be refused alone) and False is returned; otherwise the
        outcomes join the next batch, whose commit frees ``entry``'s window place, and
        True is returned (the caller must not free it)."""
        now = time.time()
        outcomes: list[Outcome] = []
        failures: list[Failure] = []
        lifetime = self.settings.max_queue_lifetime
        lifetime_end = env.expiry(lifetime) or env.arrival + lifetime
        # At most one delay notice per message; its flag rides on these outcomes.
        delays = self.delay_notices.items(env, results, lifetime_end, now)
        finished = bool(results or expired)  # the group leaves its queue (the view's "out")
        for r in results:
            state, reply = r.state, r.reply
            due = 0.0
            if state is RcptState.DEFERRED:
                finished = False
                attempts = env.recipients[r.index].attempts + 1
                due = now + retry_delay(attempts, self.settings, self._rnd)
                if due >= lifetime_end:
                    due = lifetime_end  # come back exactly at expiry, then fail
            outcomes.append(Outcome(env.queue_id, r.index, state, reply, due,
                                    delay_notified=bool(delays)))
            if state is RcptState.FAILED:
                failures.append(_failure(r.index, reply, r.remote))
            elif (state is RcptState.DELIVERED and env.recipients[r.index].notify
                  and not r.dsn_offered and route is not None
                  and wants_notice(env.recipients[r.index], "success")):
                failures.append(_success(r, route))
        for index, _why in expired:
            last = env.recipients[index].last_reply
            reply = f"message expired in the queue; last reply: {last}" if last else (
                "message expired in the queue")
            outcomes.append(Outcome(env.queue_id, index, RcptState.FAILED, reply,
                                    attempted=False))
            failures.append(Failure(index, "failed", "4.4.7", last, "", None))
        failures += delays
        if finished:
            self.traffic.left(entry.next_hop, now)
        new_messages = self._dsn(env, failures, now) if failures else []
        told = facts.outcomes(env, results, outcomes, route, now) if self.events.on else []
        if self.on_outcomes is not None and failures:
            self.on_outcomes(env, outcomes)
        if new_messages:
            # Alone: a DSN adds bytes and may be refused (back pressure), which must fail
            # this group's record only.
            await self.store.record(outcomes, new_messages)
            if self.events.on:
                told += facts.dsn(env, failures, new_messages[0].envelope.queue_id)
                facts.emit(self.events, told)
            return False
        self._queue_outcomes(outcomes, entry, told)
        return True

    def _queue_outcomes(self, outcomes: list[Outcome], entry: DueEntry,
                        told: list[Fact] | None = None) -> None:
        """Queue outcomes to be recorded with those of the other groups that finish in
        this turn of the loop: one queue operation (one hand-over to the writer, one
        settle) for many groups instead of one each, and no timer: a timer only adds
        latency when the loop's turns are long, and when they are short the writer's own
        group commit gathers the hand-overs into one transaction."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            asyncio.get_running_loop().call_soon(self._flush_outcomes)
        batch.outcomes += outcomes
        batch.groups.append(entry)
        if told:
            batch.facts += told

    def _flush_outcomes(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            committed = self.store.record_soon(batch.outcomes)
        except Exception as exc:  # the queue is closed: the due entries stay for a retry
            log.error("recording the outcomes of %d groups failed: %s", len(batch.groups), exc)
            for entry in batch.groups:
                self._release(entry)
            return
        self._committing.add(committed)
        committed.add_done_callback(lambda done: self._committed(batch, done))

    def _committed(self, batch: _Batch, done: asyncio.Future[None]) -> None:
        """A batch's commit is done: free its groups' places and refill them now.  When
        the commit failed, the groups' due entries are still in the index and they are
        tried again."""
        self._committing.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.error("recording the outcomes of %d groups failed: %s", len(batch.groups),
                      done.exception())
        elif batch.facts and not done.cancelled():
            facts.emit(self.events, batch.facts)
        journal = self.journal
        for entry in batch.groups:
            self.window.release(entry)
            if journal is not None:
                journal.ended(entry.group)
        self._refill()

    def _dsn(self, env: Envelope, failures: list[Failure], now: float) -> list[NewMessage]:
        if not env.sender:
            return []  # never a DSN to the null sender (RFC 5321 §6.1)
        body = build_dsn(reporting_mta=self.hostname, envelope=env, items=failures,
                         original=self.store.body(env.queue_id), now=now)
        if body is None:
            return []
        domain = env.sender.rpartition("@")[2]
        bounce = Envelope(sender="", recipients=[Recipient(env.sender,
                                                           self.router.destination(domain))],
                          size=len(body), smtputf8=not env.sender.isascii(),
                          body_type="" if body.isascii() else "8BITMIME",
                          # its id now, so the DSN event can name it (engine.ops.events)
                          queue_id=new_id(now))
        return [NewMessage(bounce, body)]

    async def _fail_unrouted(self, entry: DueEntry, exc: RouteError) -> None:
        batched = False
        try:
            env = self._load(entry)
            if env is None:
                return
            reply = _route_reply(exc)
            state = RcptState.FAILED if exc.permanent else RcptState.DEFERRED
            try:
                batched = await self._finish(
                    entry, env,
                    [RcptResult(i, state, reply) for i in self._waiting(env, entry.next_hop)],
                    [])
            except Exception as error:  # e.g. the report cannot be made
                await self._fault(entry, error)
        finally:
            if not batched:
                self._release(entry)

    async def _defer_group(self, entry: DueEntry, reply: str, until: float,
                           spread: float = 5.0, site: str = "") -> None:
        """Defer a group's waiting recipients, untried, to ``until`` plus up to ``spread``
        seconds drawn at random (so they do not come back in one wave); ``site``: theirs,
        when it is down (for the DEFER events)."""
        try:
            env = self._load(entry)
            if env is not None:
                outcomes = [Outcome(entry.queue_id, i, RcptState.DEFERRED, reply,
                                    due=until + self._rnd.uniform(0, spread), attempted=False)
                            for i in self._waiting(env, entry.next_hop)]
                await self.store.record(outcomes)
                if self.events.on:
                    facts.emit(self.events, facts.deferred(env, outcomes, time.time(), site))
        finally:
            self._release(entry)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _route_reply(exc: RouteError) -> str:
    """A routing failure as recorded for the recipients it fails or defers."""
    return f"{exc.code} {exc.enhanced} {exc.text}"


def _reason(exc: BaseException) -> str:
    """An error as a one-line reason for the log, the record and the POISON event."""
    text = f"{type(exc).__name__}: {exc}"
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def load_suspended(store: QueueStore) -> set[str]:
    """The suspended destinations saved with the queue (read by the viewer too, with no
    server running)."""
    raw = store.setting(SUSPENDED_SETTING)
    if raw is None:
        return set()
    try:
        names = orjson.loads(raw)
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return set(names)
    except orjson.JSONDecodeError:
        pass
    # Never a silent loss: an operator suspended these for a reason.
    log.error("the saved set of suspended destinations does not decode (%r); none loaded",
              raw[:200])
    return set()


def _suspend(queue_id: bytes, index: int, recipient: Recipient, now: float) -> Outcome:
    return Outcome(queue_id, index, RcptState.SUSPENDED, attempted=False)


def _retry_now(queue_id: bytes, index: int, now: float) -> Outcome:
    """A deferred recipient due now, its retry time ignored (``ferry queue retry``)."""
    return Outcome(queue_id, index, RcptState.DEFERRED, attempted=False, due=now)


def _due_now(queue_id: bytes, index: int, recipient: Recipient, now: float) -> Outcome:
    """A resumed recipient, due now: one never tried and due already is pending again, any
    other is deferred to now (the queue keeps a pending recipient's due time)."""
    if recipient.state is RcptState.SUSPENDED and not recipient.attempts and (
            recipient.due <= now):
        return Outcome(queue_id, index, RcptState.PENDING, attempted=False)
    return _retry_now(queue_id, index, now)


def _success(result: RcptResult, route: Route) -> Failure:
    """The DSN item for a recipient delivered with NOTIFY=SUCCESS whose next hop did not
    take the request on (it offers no DSN, or it is the final delivery): "delivered" after
    a local agent's final delivery, "relayed" after a hand-over to a next hop that will
    send no further notices (RFC 3461 §5.2.3 and §5.2.2; RFC 3464 §2.3.3).  A next hop
    that offers DSN got NOTIFY and answers for it (§5.2.1): nothing is sent then."""
    action: Action = "delivered" if route.protocol in _FINAL else "relayed"
    return Failure(result.index, action, reply_status(result.reply, action), result.reply,
                   result.remote, None)


def _failure(index: int, reply: str, remote: str) -> Failure:
    """The DSN item for a failed recipient; the status comes from the reply's enhanced
    code when it has one (RFC 3463), else it is 5.0.0."""
    return Failure(index, "failed", reply_status(reply, "failed"), reply, remote, None)

"""Prometheus metrics: what a scrape of ``GET /metrics`` says, read from figures that exist.

Nothing here counts on the mail path.  Two sources, read when Prometheus scrapes:

- **The event stream** (``engine.ops.events``): :class:`EventCounts`, a sink, counts the
  messages and recipients received per receive connector (``RECEIVE``) and the recipients
  delivered, deferred, failed and expired per site (``DELIVER``, ``DEFER``, ``FAIL``,
  ``EXPIRE``): the same facts, after the same commits, as the tracking log.
- **The figures the parts keep anyway**, plain integers (``engine.ops.figures``): the
  receive connectors' open sessions, refusals and TLS handshakes, the SMTP client's
  connections and STARTTLS handshakes, the queue writer's commit histograms and
  messages per state, the MX resolver's query histogram, the scheduler's snapshot (sites,
  active window), the queue's back pressure and its oldest message.

:class:`FerryCollector` turns them into metric families (``prometheus_client``'s custom
collector, on a registry of its own per server, never the process-wide one).  A scrape
reads memory and two O(1) lookups of the queue database (its entry count and its first
key): no scan, nothing that waits, so it answers in milliseconds under full load.  Names
and meanings: ``docs/metrics.md``.

This module must never change what it reads, and never run on the mail path: the sink's
``write`` runs once per turn of the event loop, the rest only at a scrape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, Protocol

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from engine import __version__, _speedups
from engine.client.smtp import SmtpAgent
from engine.ops.events import Event
from engine.ops.figures import Histogram, LinkFigures
from engine.queue.records import id_time

if TYPE_CHECKING:
    from engine.app import App

#: The back pressure reasons of the queue (``engine.queue.lmdb_store.LmdbQueue.pressure``):
#: each is shown, 0 or 1, so an alert can name the one that holds.
PRESSURE_REASONS: Final = ("disk space low", "queue database is full",
                           "queue writer is behind", "queue writer is gone",
                           "queue database is shutting down")
#: Delivery events counted per site, and the metric each goes to.
_OUTCOMES: Final = {"DELIVER": "delivered", "DEFER": "deferred", "FAIL": "failed",
                    "EXPIRE": "expired"}
#: The reply classes refusals are counted by (``Connector.refused_*`` index = code // 100).
_CLASSES: Final = ((4, "rejected_4xx"), (5, "rejected_5xx"))


class WebhookBacklog(Protocol):
    """What metrics need of the webhook sender (``engine.ops.webhooks``): the events not
    yet delivered, per ``[[webhook]]`` name."""

    def backlog(self) -> Mapping[str, int]: ...


class EventCounts:
    """An event sink (``engine.ops.events.Sink``): counts per receive connector and per
    site, since the server started."""

    def __init__(self) -> None:
        #: receive connector → [messages, recipients] queued
        self.received: dict[str, list[int]] = {}
        #: site → recipients per outcome ("delivered", "deferred", "failed", "expired")
        self.sites: dict[str, dict[str, int]] = {}
        #: site → connections that did not get the TLS their route asks for (TLS_FAIL)
        self.tls_failures: dict[str, int] = {}

    def write(self, batch: list[Event]) -> None:
        for record in batch:
            kind = record["event"]
            outcome = _OUTCOMES.get(kind)
            if outcome is not None:
                site = record.get("site", "")
                counts = self.sites.get(site)
                if counts is None:
                    counts = self.sites[site] = dict.fromkeys(_OUTCOMES.values(), 0)
                counts[outcome] += 1
            elif kind == "RECEIVE":
                connector = record.get("connector", "")
                received = self.received.get(connector)
                if received is None:
                    received = self.received[connector] = [0, 0]
                received[0] += 1
                received[1] += len(record.get("recipients", ()))
            elif kind == "TLS_FAIL":
                site = record.get("site", "")
                self.tls_failures[site] = self.tls_failures.get(site, 0) + 1

    def close(self) -> None:
        pass


#: The label of the destinations past ``[http] metrics_destinations`` (never a domain).
OTHER: Final = "(other)"


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
    family.add_metric([], buckets, histogram.sum)
    return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class FerryCollector(Collector):
    """Reads a running server's figures at each scrape (see the module docstring)."""

    def __init__(self, app: App, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.counts = metrics.counts
        _speedups.status()  # imports the selectors: ``active`` is complete after it
        #: the compiled extensions in use: chosen at import, fixed for the process
        self.extensions = ",".join(sorted(n for n, on in _speedups.active.items() if on))

    def collect(self) -> Iterator[Metric]:
        yield from self.build()
        yield from self.received()
        yield from self.delivered()
        yield from self.connections()
        yield from self.tls()
        yield from self.queue()
        yield from self.destinations()
        yield from self.scheduler()
        yield from self.cluster()
        yield from self.dns()
        yield from self.alerts()
        yield from self.agents()
        yield from self.webhook_backlog(self.app.webhooks.backlog()
                                        if self.app.webhooks is not None else None)
        yield GaugeMetricFamily("ferry_metrics_render_seconds", "How long the previous "
                                "scrape's rendering held the event loop",
                                value=self.metrics.render_seconds)

    def build(self) -> Iterator[Metric]:
        info = InfoMetricFamily("ferry_build", "Ferry's version and its compiled extensions "
                                "in use (none: the pure-Python twins)")
        info.add_metric([], {"version": __version__, "extensions": self.extensions or "none"})
        yield info

    def received(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "ferry_received_messages", "Messages per receive connector: accepted (queued) "
            "or rejected (at MAIL or at the end of the data) by reply class",
            labels=["connector", "outcome"])
        recipients = CounterMetricFamily(
            "ferry_received_recipients", "Recipients per receive connector: accepted (of "
            "queued messages) or rejected (RCPT refused, or their message refused) by reply "
            "class", labels=["connector", "outcome"])
        names = {c.name: c for c in self.app.connectors}
        for name in sorted(set(names) | set(self.counts.received)):
            queued = self.counts.received.get(name, (0, 0))
            messages.add_metric([name, "accepted"], queued[0])
            recipients.add_metric([name, "accepted"], queued[1])
            connector = names.get(name)
            if connector is None:
                continue  # mail from elsewhere (the injection API): accepted only
            for index, outcome in _CLASSES:
                messages.add_metric([name, outcome], connector.refused_messages[index])
                recipients.add_metric([name, outcome], connector.refused_recipients[index])
        yield messages
        yield recipients

    def delivered(self) -> Iterator[Metric]:
        families = {outcome: CounterMetricFamily(
            f"ferry_{outcome}_recipients",
            f"Recipients {outcome} per site (\"\": none was routed to)", labels=["site"])
            for outcome in _OUTCOMES.values()}
        for site, counts in sorted(self.counts.sites.items()):
            for outcome, family in families.items():
                family.add_metric([site], counts[outcome])
        yield from families.values()

    def connections(self) -> Iterator[Metric]:
        inbound = GaugeMetricFamily("ferry_connections_in", "SMTP sessions open per receive "
                                    "connector", labels=["connector"])
        for connector in self.app.connectors:
            inbound.add_metric([connector.name], len(connector.sessions))
        outbound = GaugeMetricFamily("ferry_connections_out", "Connections open to next "
                                     "hops per delivery agent", labels=["agent"])
        opened = CounterMetricFamily("ferry_connections_out_opened", "Connections made to "
                                     "next hops per delivery agent", labels=["agent"])
        for name, figures in self._links():
            outbound.add_metric([name], figures.opened - figures.closed)
            opened.add_metric([name], figures.opened)
        yield inbound
        yield outbound
        yield opened

    def _links(self) -> Iterator[tuple[str, LinkFigures]]:
        for name, agent in sorted(self.app.agents.items()):
            if isinstance(agent, SmtpAgent):
                yield name, agent.figures

    def tls(self) -> Iterator[Metric]:
        done_in = CounterMetricFamily("ferry_tls_in_handshakes", "TLS handshakes completed "
                                      "per receive connector (STARTTLS and implicit TLS)",
                                      labels=["connector"])
        failed_in = CounterMetricFamily("ferry_tls_in_failures", "STARTTLS handshakes that "
                                        "failed per receive connector", labels=["connector"])
        for connector in self.app.connectors:
            done_in.add_metric([connector.name], connector.tls_handshakes)
            failed_in.add_metric([connector.name], connector.tls_failures)
        done_out = CounterMetricFamily("ferry_tls_out_handshakes", "STARTTLS handshakes "
                                       "completed with next hops per site", labels=["site"])
        failed_out = CounterMetricFamily("ferry_tls_out_failures", "Connections to next hops "
                                         "that did not get the TLS their route asks for, per "
                                         "site (TLS_FAIL)", labels=["site"])
        handshakes: dict[str, int] = {}
        for _, figures in self._links():
            for site, n in list(figures.tls_handshakes.items()):
                handshakes[site] = handshakes.get(site, 0) + n
        failures = self.counts.tls_failures
        for site in sorted(set(handshakes) | set(failures)):
            done_out.add_metric([site], handshakes.get(site, 0))
            failed_out.add_metric([site], failures.get(site, 0))
        yield from (done_in, failed_in, done_out, failed_out)

    def destinations(self) -> Iterator[Metric]:
        """Messages waiting per destination and the oldest one's age, from the last walk of
        the hops index (:meth:`Metrics.walk_destinations`, one scrape behind): the
        ``[http] metrics_destinations`` fullest destinations, the rest as "(other)"."""
        most = self.app.config.http.metrics_destinations
        walked = self.metrics.destinations
        if not most or walked is None:
            return
        depth = GaugeMetricFamily(
            "ferry_queue_destination_messages", "Messages with a recipient waiting for the "
            "destination (the queue's next hop), as of the previous scrape",
            labels=["destination"])
        age = GaugeMetricFamily(
            "ferry_queue_destination_oldest_seconds", "Age of the oldest message waiting for "
            "the destination, as of the previous scrape", labels=["destination"])
        now = time.time()
        ranked = sorted(walked.items(), key=lambda item: (-item[1][0], item[0]))
        for name, (count, oldest) in ranked[:most]:
            depth.add_metric([name], count)
            age.add_metric([name], max(0.0, now - id_time(oldest)))
        rest = ranked[most:]
        if rest:
            depth.add_metric([OTHER], sum(count for _, (count, _) in rest))
            age.add_metric([OTHER], max(0.0, now - min(id_time(o) for _, (_, o) in rest)))
        yield depth
        yield age

    def queue(self) -> Iterator[Metric]:
        store = self.app.store
        if store is None:
            return
        yield GaugeMetricFamily("ferry_queue_messages", "Messages in the queue database, "
                                "whatever their state", value=store.count())
        states = GaugeMetricFamily("ferry_queue_state_messages", "Messages with a recipient "
                                   "in the state (a message may be in several)",
                                   labels=["state"])
        for state, n in sorted(store.stats.states):
            states.add_metric([state], n)
        yield states
        oldest = store.oldest()
        yield GaugeMetricFamily("ferry_queue_oldest_message_age_seconds", "Age of the oldest "
                                "message in the queue database (0: empty)",
                                value=0.0 if oldest is None else max(
                                    0.0, time.time() - id_time(oldest)))
        problem = store.pressure()
        reason = problem.reason if problem is not None else None
        pressure = GaugeMetricFamily("ferry_back_pressure", "1 while the queue refuses new "
                                     "mail for this reason, else 0", labels=["reason"])
        for known in (*PRESSURE_REASONS, *(() if reason in PRESSURE_REASONS or reason is None
                                           else (reason,))):
            pressure.add_metric([known], 1 if known == reason else 0)
        yield pressure
        seconds, writes = store.commit_figures
        yield _histogram("ferry_queue_commit_seconds", "Queue writer commit round trips "
                         "(hand-over to answer, group commit)", seconds)
        yield _histogram("ferry_queue_commit_writes", "Writes (messages, outcome batches, "
                         "changes) per queue commit", writes)

    def scheduler(self) -> Iterator[Metric]:
        scheduler = self.app.scheduler
        if scheduler is None:
            return
        snap = scheduler.snapshot(destinations=False)
        yield GaugeMetricFamily("ferry_queue_window_groups", "(message, destination) groups "
                                "in the active window, waiting or in delivery",
                                value=snap.window)
        waiting = GaugeMetricFamily("ferry_site_waiting_groups", "Groups of the active window "
                                    "waiting at a site for a connection", labels=["site"])
        workers = GaugeMetricFamily("ferry_site_deliveries", "Deliveries (connections) "
                                    "running per site", labels=["site"])
        for site in snap.sites:
            waiting.add_metric([site.name], site.waiting)
            workers.add_metric([site.name], site.workers)
        down = GaugeMetricFamily("ferry_site_down", "1 for a site marked down (no host took "
                                 "a connection): its mail is deferred untried",
                                 labels=["site"])
        for mark in snap.down:
            down.add_metric([mark.name], 1)
        yield from (waiting, workers, down)
        yield GaugeMetricFamily("ferry_suspended_destinations", "Destinations suspended by "
                                "the operator", value=len(snap.suspended))
        actions = CounterMetricFamily("ferry_shaping_actions", "Shaping automation rules "
                                      "that acted on a (source, site), by action",
                                      labels=["action"])
        held = GaugeMetricFamily("ferry_shaping_held", "(source, site) queues a shaping "
                                 "automation rule suspends or throttles now, by action",
                                 labels=["action"])
        for action, count in snap.shaping_actions:
            actions.add_metric([action], count)
            held.add_metric([action], sum(h.action == action for h in snap.held))
        yield from (actions, held)

    def cluster(self) -> Iterator[Metric]:
        """The limits shared with other nodes ([cluster]; engine.cluster.limits)."""
        scheduler = self.app.scheduler
        shared = scheduler.cluster if scheduler is not None else None
        if shared is None:
            return
        f = shared.figures
        yield GaugeMetricFamily("ferry_cluster_shared", "1 while the limits are shared "
                                "through Redis, 0 while this node uses its own share",
                                value=int(shared.shared))
        yield CounterMetricFamily("ferry_cluster_fallbacks", "Times Redis became unreachable "
                                  "and the node fell back to its share", value=f.fallbacks)
        yield CounterMetricFamily("ferry_cluster_errors", "Redis calls that failed or timed "
                                  "out (answered from the node's share)", value=f.errors)
        leases = CounterMetricFamily("ferry_cluster_leases", "Connection leases asked for, "
                                     "by outcome", labels=["outcome"])
        leases.add_metric(["granted"], f.granted)
        leases.add_metric(["refused"], f.refused)
        yield leases

    def dns(self) -> Iterator[Metric]:
        resolver = self.app.resolver
        if resolver is not None:
            yield _histogram("ferry_dns_query_seconds", "DNS queries sent by the MX "
                             "resolver (cache misses), with their retries",
                             resolver.query_seconds)

    def agents(self) -> Iterator[Metric]:
        """What the policy agents did (engine.agents.chain.Figures)."""
        policy = self.app.policy
        if policy is None:
            return
        figures = policy.figures
        verdicts = CounterMetricFamily(
            "ferry_agent_verdicts", "Verdicts of the policy agents other than a plain "
            "accept, per agent, stage and action (reject, tempfail, discard, hold, header)",
            labels=["agent", "stage", "action"])
        for (agent, stage, action), n in sorted(list(figures.verdicts.items())):
            verdicts.add_metric([agent, stage, action], n)
        failures = CounterMetricFamily(
            "ferry_agent_failures", "Calls of a policy agent that raised or ran out of time "
            "(answered by its fail setting)", labels=["agent"])
        for agent, n in sorted(list(figures.failures.items())):
            failures.add_metric([agent], n)
        yield verdicts
        yield failures

    def alerts(self) -> Iterator[Metric]:
        """``ferry_alert_firing``: the ``[[alert]]`` rules firing now (engine.ops.alerts),
        one series per rule and destination while it fires."""
        alerts = self.app.alerts
        if alerts is None:
            return
        firing = GaugeMetricFamily("ferry_alert_firing", "1 while an [[alert]] rule fires "
                                   "(per destination for a rule per destination; \"\" for "
                                   "the whole server)",
                                   labels=["rule", "destination", "severity"])
        for alert in alerts.active():
            firing.add_metric([alert.rule, alert.destination, alert.severity], 1)
        yield firing

    def webhook_backlog(self, backlog: Mapping[str, int] | None) -> Iterator[Metric]:
        """``ferry_webhook_backlog``: events not yet delivered per ``[[webhook]]`` (from
        ``App.webhooks.backlog()``); nothing while no webhook sender runs."""
        if backlog is None:
            return
        family = GaugeMetricFamily("ferry_webhook_backlog", "Events queued for a webhook "
                                   "and not yet delivered", labels=["webhook"])
        for name, n in sorted(backlog.items()):
            family.add_metric([name], n)
        yield family


class Metrics:
    """A running server's metrics: the event sink (add :attr:`counts` to the hub before the
    server starts) and the registry ``GET /metrics`` renders (:meth:`render`)."""

    def __init__(self, app: App) -> None:
        self.counts = EventCounts()
        #: how long the last :meth:`render` held the event loop (seconds)
        self.render_seconds = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FerryCollector(app, self))
        self.app = app
        #: messages waiting and the oldest id per destination, from the last walk of the
        #: hops index (None until one finished)
        self.destinations: dict[str, tuple[int, bytes]] | None = None
        self._walking: asyncio.Future[dict[str, tuple[int, bytes]]] | None = None

    def walk_destinations(self) -> None:
        """Start a walk of the hops index in a thread unless one runs: a scrape reads the
        last finished one (one scrape behind), so it never waits for a walk that takes
        0.2 s per million queued messages (benchmarks/README.md, bench_alerts.py)."""
        store = self.app.store
        if (self._walking is not None or store is None
                or not self.app.config.http.metrics_destinations):
            return
        self._walking = walk = asyncio.get_running_loop().run_in_executor(
            None, store.hop_depths)
        walk.add_done_callback(self._walked)

    async def stop(self) -> None:
        """Wait for a walk in flight: the queue closes after this."""
        if self._walking is not None:
            await asyncio.wait([self._walking])

    def _walked(self, walk: asyncio.Future[dict[str, tuple[int, bytes]]]) -> None:
        self._walking = None
        if walk.cancelled():
            return
        if walk.exception() is not None:  # the store closed under it: at shutdown only
            return
        self.destinations = walk.result()

    def render(self) -> bytes:
        """The text exposition of every metric, timed (``ferry_metrics_render_seconds``)."""
        started = time.perf_counter()
        text = generate_latest(self.registry)
        self.render_seconds = time.perf_counter() - started
        return text

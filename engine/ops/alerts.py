"""Alerts: the ``[[alert]]`` rules, evaluated on the event loop every ``[alerts] interval``.

A rule watches one figure (``engine.config.ALERT_METRICS``) for the whole server, for one
destination, or for each destination separately (``destination = "*"``), and *fires*
once the figure has been above (or below) its threshold for ``lasting`` seconds, like a
Prometheus rule's ``for``; it *clears* at the first evaluation where the condition no
longer holds.  Firing and clearing each give one log line on ``ferry.alerts`` at the
rule's severity (WARNING or ERROR) and one ``ALERT`` event on the hub (``state``
``firing`` or ``cleared``), so the tracking log and the webhooks carry it with no code of
their own.  :meth:`Alerts.active` is the state now, for ``/readyz`` and the metrics.

Where the figures come from, each cheap:

- ``queue_depth`` and ``oldest_message_age``: the queue database's hops index (one key
  per message and destination, in id order, and ids carry the arrival time): for one
  destination the keys under its name, for the whole server the database's entry count
  and first key, for ``*`` one walk of the index.  No record is decoded, and the reads
  run in a worker thread, never on the loop.
- ``back_pressure``: ``QueueStore.pressure()``, what the receive side asks.
- ``free_disk``: ``os.statvfs`` of the queue's directory.
- ``deferral_ratio`` and ``tls_failures``: :class:`OutcomeWindow`, a sink of the event hub
  that counts ``DELIVER``, ``DEFER``, ``FAIL`` and ``TLS_FAIL`` per destination in time
  buckets, so a window's counts are a few additions; it is added only when a rule needs it.

The rule logic (:class:`Evaluator`) is sans-I/O: it takes the figures read at a moment
and returns what changed, so it is tested with an injected clock and figures.

This module must never change a delivery decision or the queue, and never block the loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from engine.config import ALERT_WINDOWED, AlertConfig
from engine.ops.events import Event, Events, Kind, iso_time
from engine.queue.api import BackPressure
from engine.queue.records import id_time

log = logging.getLogger("ferry.alerts")

State = Literal["firing", "cleared"]

#: The counts of :class:`OutcomeWindow`, per destination, at these positions.
DELIVERED, DEFERRED, FAILED, TLS_FAILED = range(4)
_COUNTED: Mapping[str, int] = {"DELIVER": DELIVERED, "DEFER": DEFERRED, "FAIL": FAILED}


@dataclass(frozen=True, slots=True)
class Alert:
    """One firing alert: a rule, and for a per-destination rule the destination."""

    rule: str
    metric: str
    #: "" for a figure of the whole server
    destination: str
    severity: str
    comparison: Literal["above", "below"]
    threshold: float
    #: the figure at the last evaluation
    value: float
    #: when the condition started to hold (epoch seconds), and when the alert fired
    since: float
    fired: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (``/readyz`` detail, the admin API): times as ISO text."""
        return {"rule": self.rule, "metric": self.metric, "destination": self.destination,
                "severity": self.severity, "comparison": self.comparison,
                "threshold": self.threshold, "value": self.value,
                "since": iso_time(self.since), "fired": iso_time(self.fired),
                "summary": self.summary()}

    def summary(self, state: State = "firing") -> str:
        """ "queue_depth for gmail.com is 10,412 messages, above 10,000 messages"; cleared:
        "... is 9,120 messages, no longer above 10,000 messages" """
        where = f" for {self.destination}" if self.destination else ""
        no_longer = "no longer " if state == "cleared" else ""
        return (f"{self.metric}{where} is {show(self.metric, self.value)}, "
                f"{no_longer}{self.comparison} {show(self.metric, self.threshold)}")


@dataclass(frozen=True, slots=True)
class Change:
    """An alert that fired or cleared at an evaluation."""

    state: State
    alert: Alert
    #: when it changed (epoch seconds)
    at: float


def show(metric: str, value: float) -> str:
    """A figure in its metric's words, for log lines."""
    if metric == "queue_depth":
        return f"{value:,.0f} messages"
    if metric == "oldest_message_age":
        return _span(value)
    if metric == "deferral_ratio":
        return f"{value:.0%}"
    if metric == "back_pressure":
        return "on" if value else "off"
    if metric == "free_disk":
        return f"{value / (1 << 30):,.2f} GiB" if value >= 1 << 30 else \
            f"{value / (1 << 20):,.1f} MiB"
    if metric == "tls_failures":
        return f"{value:,.0f} TLS failures"
    return f"{value:g}"


def _span(seconds: float) -> str:
    whole = int(seconds)
    if whole < 120:
        return f"{seconds:.0f} s"
    if whole < 7200:
        return f"{whole // 60} min"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


@dataclass(slots=True)
class _Track:
    """Where one (rule, destination) stands between evaluations."""

    #: when the condition started to hold (None: it does not)
    since: float | None = None
    firing: Alert | None = None


#: A rule's figures at one moment: destination ("" for the whole server) → value.  A
#: destination with no figure (no delivery attempt in the window) is left out.
Reading = Mapping[str, float]


class Evaluator:
    """The rules' state machine, sans I/O: :meth:`evaluate` with the figures of a moment.

    Per (rule, destination): the condition starts holding → pending; it has held for
    ``lasting`` → firing (a Change); it stops holding → a firing alert clears (a Change),
    a pending one is forgotten.  A destination of a ``*`` rule that no longer has a figure
    does not hold (its queue emptied, its window has no attempt left).
    """

    def __init__(self, rules: Sequence[AlertConfig]) -> None:
        self.rules = tuple(rules)
        self._tracks: dict[tuple[str, str], _Track] = {}

    def evaluate(self, now: float, readings: Mapping[str, Reading]) -> list[Change]:
        """``readings``: rule name → its figures now (a rule missing here is skipped)."""
        changes: list[Change] = []
        for rule in self.rules:
            reading = readings.get(rule.name)
            if reading is None:
                continue
            side, threshold = rule.threshold()
            known = [key for (name, key) in self._tracks if name == rule.name]
            for key in dict.fromkeys([*reading, *known]):
                value = reading.get(key)
                holds = value is not None and (value > threshold if side == "above"
                                               else value < threshold)
                track = self._tracks.setdefault((rule.name, key), _Track())
                if holds:
                    assert value is not None
                    if track.since is None:
                        track.since = now
                    if track.firing is not None:
                        track.firing = dataclasses.replace(track.firing, value=value)
                    elif now - track.since >= rule.lasting:
                        track.firing = Alert(rule.name, rule.metric, key, rule.severity, side,
                                             threshold, value, track.since, now)
                        changes.append(Change("firing", track.firing, now))
                    continue
                if track.firing is not None:
                    last = track.firing
                    cleared = dataclasses.replace(last, value=last.value if value is None
                                                  else value)
                    changes.append(Change("cleared", cleared, now))
                del self._tracks[(rule.name, key)]
        return changes

    def active(self) -> list[Alert]:
        """The alerts firing now, in rule order then by destination."""
        order = {rule.name: i for i, rule in enumerate(self.rules)}
        firing = [t.firing for t in self._tracks.values() if t.firing is not None]
        return sorted(firing, key=lambda a: (order.get(a.rule, len(order)), a.destination))

    def replace_rules(self, rules: Sequence[AlertConfig]) -> list[Alert]:
        """Take new rules (a reload): an unchanged rule keeps its state; the firing alerts
        of a rule removed or changed are returned (their clearing is the caller's to say)."""
        kept = {rule.name for rule in self.rules if rule in set(rules)}
        dropped = [t.firing for (name, _), t in self._tracks.items()
                   if name not in kept and t.firing is not None]
        self._tracks = {k: t for k, t in self._tracks.items() if k[0] in kept}
        self.rules = tuple(rules)
        return dropped


class OutcomeWindow:
    """A sink of the event hub: delivery outcomes and TLS failures per destination over
    the last ``span`` seconds, in buckets of ``step`` seconds.  ``destination`` maps a
    recipient's domain to its destination (``Router.destination``: no DNS)."""

    def __init__(self, destination: Callable[[str], str], span: float, step: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._destination = destination
        self.span = span
        self.step = step
        self._clock = clock
        #: (bucket number, destination → [delivered, deferred, failed, tls failures])
        self._buckets: collections.deque[tuple[int, dict[str, list[int]]]] = (
            collections.deque())

    def write(self, batch: list[Event]) -> None:
        counts: dict[str, list[int]] | None = None
        for record in batch:
            event = str(record.get("event"))
            at = _COUNTED.get(event)
            if at is not None:
                domain = str(record.get("recipient", "")).rpartition("@")[2]
                where = self._destination(domain)
            elif event == Kind.TLS_FAIL:
                at, where = TLS_FAILED, str(record.get("destination", ""))
            else:
                continue
            if counts is None:
                counts = self._bucket()
            row = counts.get(where)
            if row is None:
                row = counts[where] = [0, 0, 0, 0]
            row[at] += 1

    def _bucket(self) -> dict[str, list[int]]:
        number = int(self._clock() // self.step)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != number:
            buckets.append((number, {}))
            oldest = number - int(self.span // self.step) - 1
            while buckets[0][0] < oldest:
                buckets.popleft()
        return buckets[-1][1]

    def totals(self, window: float, now: float) -> dict[str, list[int]]:
        """Destination → [delivered, deferred, failed, tls failures] over the last
        ``window`` seconds (to the bucket)."""
        first = int((now - window) // self.step) + 1
        out: dict[str, list[int]] = {}
        for number, counts in self._buckets:
            if number < first:
                continue
            for where, row in counts.items():
                total = out.get(where)
                if total is None:
                    out[where] = list(row)
                else:
                    for i, n in enumerate(row):
                        total[i] += n
        return out

    def close(self) -> None:
        pass


def _ratio(row: Sequence[int]) -> float | None:
    attempts = row[DELIVERED] + row[DEFERRED] + row[FAILED]
    return row[DEFERRED] / attempts if attempts else None


def windowed(rule: AlertConfig, totals: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """A deferral_ratio or tls_failures rule's reading from a window's totals."""
    if rule.metric == "tls_failures":
        each = {where: float(row[TLS_FAILED]) for where, row in totals.items()
                if row[TLS_FAILED]}
    else:
        each = {where: ratio for where, row in totals.items()
                if (ratio := _ratio(row)) is not None}
    if rule.destination == "*":
        return each
    if rule.destination:
        found = each.get(rule.destination)
        if found is None:
            return {rule.destination: 0.0} if rule.metric == "tls_failures" else {}
        return {rule.destination: found}
    whole = [sum(row[i] for row in totals.values()) for i in range(4)]
    if rule.metric == "tls_failures":
        return {"": float(whole[TLS_FAILED])}
    ratio = _ratio(whole)
    return {} if ratio is None else {"": ratio}


class QueueFigures(Protocol):
    """What the alerts read of the queue database (engine.queue.lmdb_store.LmdbQueue)."""

    path: Path

    def count(self) -> int: ...

    def oldest(self) -> bytes | None: ...

    def hop_depth(self, next_hop: str) -> tuple[int, bytes | None]: ...

    def hop_depths(self) -> dict[str, tuple[int, bytes]]: ...

    def pressure(self) -> BackPressure | None: ...


_QUEUE_METRICS = frozenset({"queue_depth", "oldest_message_age"})


def _age(now: float, queue_id: bytes | None) -> float:
    return max(0.0, now - id_time(queue_id)) if queue_id else 0.0


def read_queue(store: QueueFigures, rules: Iterable[AlertConfig],
               now: float) -> dict[str, dict[str, float]]:
    """The readings of the rules on the queue database and the disk (rule name →
    reading); it reads LMDB and may walk an index: run it in a thread."""
    rules = list(rules)
    readings: dict[str, dict[str, float]] = {}
    every: dict[str, tuple[int, bytes]] | None = None
    named: dict[str, tuple[int, bytes | None]] = {}
    for rule in rules:
        if rule.metric == "free_disk":
            st = os.statvfs(store.path)
            readings[rule.name] = {"": float(st.f_bavail * st.f_frsize)}
            continue
        if rule.metric not in _QUEUE_METRICS:
            continue
        depth = rule.metric == "queue_depth"
        if rule.destination == "*":
            if every is None:
                every = store.hop_depths()
            readings[rule.name] = {hop: float(n) if depth else _age(now, oldest)
                                   for hop, (n, oldest) in every.items()}
        elif rule.destination:
            if rule.destination not in named:
                named[rule.destination] = store.hop_depth(rule.destination)
            n, oldest_id = named[rule.destination]
            readings[rule.name] = {rule.destination: float(n) if depth
                                   else _age(now, oldest_id)}
        else:
            readings[rule.name] = {"": float(store.count()) if depth
                                   else _age(now, store.oldest())}
    return readings


class Alerts:
    """The running evaluator of one server: :meth:`start` once the queue is open,
    :meth:`stop` before it closes.  With no rule it runs nothing and ``active()`` is []."""

    def __init__(self, rules: Sequence[AlertConfig], interval: float, events: Events,
                 store: QueueFigures, destination: Callable[[str], str],
                 clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self.events = events
        self.store = store
        self.evaluator = Evaluator(rules)
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._reading: asyncio.Future[dict[str, dict[str, float]]] | None = None
        self._destination = destination
        self.window: OutcomeWindow | None = None
        self._count_outcomes()
        #: evaluations done so far (tests wait for one to have looked)
        self.evaluations = 0

    def _count_outcomes(self) -> None:
        """Add (or widen) the outcome counter when a rule counts over a window."""
        spans = [rule.window for rule in self.rules if rule.metric in ALERT_WINDOWED]
        if not spans:
            return
        if self.window is None:
            # Buckets of a twentieth of the shortest window: a window's count is exact to
            # 5 % of it, and a 10-minute window sums at most 21 small dicts.
            self.window = OutcomeWindow(self._destination, max(spans), min(spans) / 20,
                                        self._clock)
            self.events.add(self.window)
        else:
            self.window.span = max(self.window.span, *spans)

    @property
    def rules(self) -> tuple[AlertConfig, ...]:
        return self.evaluator.rules

    def active(self) -> list[Alert]:
        """The alerts firing now (``/readyz`` detail, metrics): each with its rule, its
        destination, the value at the last evaluation, the threshold and since when."""
        return self.evaluator.active()

    def start(self) -> None:
        if self.rules:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._reading is not None:
            # The thread goes on after a cancel: the queue must outlive its read.
            await asyncio.wait([self._reading])

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.evaluate()
            except Exception:
                log.exception("evaluating the alert rules failed; trying again in %g s",
                              self.interval)

    async def evaluate(self) -> list[Change]:
        """Read every rule's figures, evaluate them, report what fired and cleared."""
        now = self._clock()
        rules = self.rules
        loop = asyncio.get_running_loop()
        self._reading = loop.run_in_executor(None, read_queue, self.store, rules, now)
        try:
            readings = await asyncio.shield(self._reading)
        finally:
            if self._reading.done():
                self._reading = None
        for rule in rules:
            if rule.metric == "back_pressure":
                readings[rule.name] = {"": 0.0 if self.store.pressure() is None else 1.0}
            elif rule.metric in ALERT_WINDOWED and self.window is not None:
                readings[rule.name] = windowed(rule, self.window.totals(rule.window, now))
        changes = self.evaluator.evaluate(now, readings)
        self.evaluations += 1
        for change in changes:
            self.report(change)
        return changes

    def report(self, change: Change) -> None:
        """The log line and the ALERT event of a change."""
        a, state = change.alert, change.state
        level = logging.ERROR if a.severity == "error" else logging.WARNING
        summary = a.summary(state)
        if state == "firing":
            held = f" for {_span(change.at - a.since)}" if change.at > a.since else ""
            log.log(level, "alert %s firing: %s%s", a.rule, summary, held)
        else:
            log.log(level, "alert %s cleared: %s (fired %s ago)", a.rule, summary,
                    _span(change.at - a.fired))
        fields: dict[str, Any] = {
            "alert": a.rule, "state": state, "metric": a.metric,
            "destination": a.destination, "severity": a.severity, "comparison": a.comparison,
            "threshold": a.threshold, "value": a.value, "since": iso_time(a.since),
            "summary": summary}
        if change.state == "cleared":
            fields["duration"] = round(change.at - a.fired, 3)
        self.events.emit(Kind.ALERT, b"", "", when=change.at, **fields)

    def reconfigure(self, rules: Sequence[AlertConfig], interval: float) -> None:
        """New rules (a reload): unchanged rules keep their state; the alerts of rules
        removed or changed clear (said in the log and as events)."""
        now = self._clock()
        for alert in self.evaluator.replace_rules(rules):
            self.report(Change("cleared", alert, now))
        self.interval = interval
        self._count_outcomes()
        if self._task is None and self.rules:
            self.start()

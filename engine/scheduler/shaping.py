"""Traffic shaping: egress sources and pools, limits by provider, warm-up, automation.

Owns what the scheduler derives from [egress] and [shaping] (docs/shaping.md):

- **Sources and pools.**  A route names a pool (its send connector's, ``egress.pool``, or
  a shaping rule's); :meth:`Shape.pick` draws a source from it by weight for each group.
  The scheduler's queue of a site is then per (source, site) (:func:`site_key`), KumoMTA's
  ready queue: limits, down marks and automation apply per source, since a receiver judges
  each sending address on its own.
- **Limits by provider.**  :meth:`Shaping.shape` matches the rules once per (site,
  destination, pool) and caches the result: the site's MX host names against
  ``mx_suffixes``, the destination against ``domains``.  For each limit the first rule
  that sets it wins, configured rules before the shipped ones (``shaping.toml`` beside
  this module, with ``[shaping] defaults``); a [delivery.domains."x"] table wins over
  both, [delivery] is the fallback.  Messages per second, minute and hour become one
  spacing (the strictest), so no window of any length carries more than its limit.
- **Warm-up and daily caps.**  :meth:`Shape.cap` is a source's cap for one UTC day at one
  site: the rule's ``daily_cap`` and the source's warm-up plan (its caps per day since
  ``warmup_start``), the lower one.
- **Automation.**  :meth:`Shape.react` finds the first automation rule that matches a
  reply (its code, enhanced code, text); the scheduler acts on it.

Values and lookups only: no I/O, no asyncio, no clock but the one passed in.
"""

from __future__ import annotations

import bisect
import datetime
import functools
import itertools
import random
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from engine.config import (
    AutomationRule,
    Config,
    DeliveryConfig,
    EgressConfig,
    EgressSource,
    ShapingConfig,
    ShapingRule,
    parse_shaping,
)
from engine.routing.api import Route, Source
from engine.scheduler.policy import Limits, SiteLimits

__all__ = ["DEFAULTS_FILE", "Automation", "Shape", "Shaping", "from_config",
           "most_connections", "next_day", "shipped", "site_key", "utc_day"]

#: The shipped rules for the large providers (docs/shaping.md says where each comes from).
DEFAULTS_FILE: Final = Path(__file__).with_name("shaping.toml")

_DAY: Final = 86400.0


def site_key(site: str, source: Source | None) -> str:
    """The scheduler's name of the queue for ``site`` from ``source``: the site itself
    without a source (today's name), else "source@site"."""
    return site if source is None else f"{source.name}@{site}"


@functools.cache
def shipped() -> ShapingConfig:
    """The shipped rules, read and checked once."""
    with DEFAULTS_FILE.open("rb") as f:
        return parse_shaping(tomllib.load(f))


def _matches(hosts: Iterable[str], domain: str, suffixes: tuple[str, ...],
             domains: tuple[str, ...]) -> bool:
    for suffix in suffixes:
        for host in hosts:
            host = host.lower().rstrip(".")
            if (host.endswith(suffix) if suffix.startswith(".") else host == suffix):
                return True
    for pattern in domains:
        if pattern.startswith("*."):
            if domain == pattern[2:] or domain.endswith(pattern[1:]):
                return True
        elif domain == pattern:
            return True
    return False


class Automation:
    """One automation rule ([[shaping.automation]]), compiled once."""

    __slots__ = ("action", "code", "domains", "duration", "enhanced", "factor",
                 "max_connections", "max_rate", "mx_suffixes", "name", "text")

    def __init__(self, rule: AutomationRule) -> None:
        self.name = rule.name
        self.mx_suffixes, self.domains = rule.mx_suffixes, rule.domains
        self.code = rule.code
        self.enhanced = rule.enhanced
        self.text = re.compile(rule.text, re.I) if rule.text else None
        self.action = rule.action
        self.duration = rule.duration
        self.max_connections = rule.max_connections
        self.factor = rule.rate_factor
        self.max_rate = rule.max_rate

    def matches(self, code: int, enhanced: str, reply: str) -> bool:
        return ((self.code is None or self.code == code)
                and (not self.enhanced or self.enhanced == enhanced)
                and (self.text is None or self.text.search(reply) is not None))

    def lowered(self, limits: SiteLimits) -> SiteLimits:
        """``limits`` while a "throttle" rule holds: never above them."""
        connections = min(limits.max_connections, self.max_connections or limits.max_connections)
        rate = limits.max_rate * self.factor
        if self.max_rate:
            rate = min(rate, self.max_rate) if rate else self.max_rate
        return SiteLimits(connections, rate, limits.max_messages_per_connection,
                          limits.daily_cap)


#: The limits a [[shaping.rules]] entry may set (None: not set).
_LIMIT_KEYS: Final = ("max_connections", "max_messages_per_connection", "max_per_second",
                      "max_per_minute", "max_per_hour", "daily_cap")


@dataclass(frozen=True, slots=True)
class _Rule:
    """One [[shaping.rules]] entry, read once."""

    name: str
    mx_suffixes: tuple[str, ...]
    domains: tuple[str, ...]
    limits: dict[str, float | int | None]
    pool: str

    @classmethod
    def of(cls, rule: ShapingRule) -> _Rule:
        return cls(rule.name, rule.mx_suffixes, rule.domains,
                   {key: getattr(rule, key) for key in _LIMIT_KEYS}, rule.pool)


@dataclass(frozen=True, slots=True)
class _Source:
    source: Source
    warmup_start: float  # epoch seconds of its first day; 0 = no warm-up
    warmup_caps: tuple[int, ...]

    def cap(self, day: int) -> int:
        """The warm-up cap of UTC day ``day`` (days since the epoch); 0 = none."""
        if not self.warmup_start:
            return 0
        n = day - int(self.warmup_start // _DAY)
        if n < 0:
            return self.warmup_caps[0]  # not started yet: the first day's cap
        return self.warmup_caps[n] if n < len(self.warmup_caps) else 0


@dataclass(frozen=True, slots=True)
class Shape:
    """What the rules say for one (site, destination, pool): resolved once, cached."""

    limits: SiteLimits
    #: the names of the rules that matched, for the operator
    rules: tuple[str, ...] = ()
    sources: tuple[_Source, ...] = ()
    #: cumulative weights of ``sources`` (for a draw by weight)
    weights: tuple[int, ...] = ()
    automation: tuple[Automation, ...] = ()
    #: automation rules by reply code (those with no code under 0): the reply's code
    #: picks the few to try
    by_code: dict[int, tuple[Automation, ...]] = field(default_factory=dict)

    @property
    def capped(self) -> bool:
        """Whether a daily cap may apply: a rule's, or a source's warm-up."""
        return bool(self.limits.daily_cap) or any(s.warmup_start for s in self.sources)

    def pick(self, rnd: random.Random) -> Source | None:
        """A source for one group, by weight; None without a pool."""
        sources = self.sources
        if not sources:
            return None
        if len(sources) == 1:
            return sources[0].source
        i = bisect.bisect_right(self.weights, rnd.random() * self.weights[-1])
        return sources[min(i, len(sources) - 1)].source

    def cap(self, source: Source | None, day: int) -> int:
        """Messages ``source`` may send to the site on UTC day ``day``; 0 = no cap."""
        caps = [self.limits.daily_cap] if self.limits.daily_cap else []
        for s in self.sources:
            if s.source is source:
                warm = s.cap(day)
                if warm:
                    caps.append(warm)
        return min(caps, default=0)

    def react(self, reply: str) -> Automation | None:
        """The first automation rule that matches ``reply`` ("421 4.7.28 text")."""
        try:
            code = int(reply[:3])
        except ValueError:
            return None
        rules = self.by_code.get(code, ()) + self.by_code.get(0, ())
        if not rules:
            return None
        rest = reply[4:]
        enhanced = rest.split(" ", 1)[0] if rest[:1].isdigit() else ""
        for rule in rules:
            if rule.matches(code, enhanced, reply):
                return rule
        return None


class Shaping:
    """The shaping of one configuration (a reload builds a new one)."""

    def __init__(self, delivery: DeliveryConfig, egress: EgressConfig | None = None,
                 shaping: ShapingConfig | None = None) -> None:
        self.delivery = delivery
        egress = egress or EgressConfig()
        shaping = shaping or ShapingConfig()
        rules = list(shaping.rules)
        automation = list(shaping.automation)
        if shaping.defaults:
            rules += shipped().rules
            automation += shipped().automation
        self.rules = tuple(_Rule.of(r) for r in rules)
        self.automation = tuple(Automation(a) for a in automation)
        self.sources = {name: _source(name, s) for name, s in egress.sources.items()}
        self.pools = {name: tuple((self.sources[n], w) for n, w in pool.sources.items())
                      for name, pool in egress.pools.items()}
        self._cache: dict[tuple[str, str, str], Shape] = {}

    def shape(self, route: Route) -> Shape:
        """The shape of ``route``'s site for its destination: a dict lookup after the
        first time."""
        key = (route.site, route.destination, route.pool)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._resolve(route)
        return found

    def _resolve(self, route: Route) -> Shape:
        hosts = [h.name for h in route.hosts]
        domain = route.destination.lower()
        matched = [r for r in self.rules if _matches(hosts, domain, r.mx_suffixes, r.domains)]
        d = self.delivery
        table = d.domains.get(domain)

        def first(name: str) -> float | int | None:
            return next((v for r in matched if (v := r.limits[name]) is not None), None)

        connections = first("max_connections") or d.max_per_domain
        rate = d.max_rate
        spacings = [1 / v for v in (first("max_per_second"),) if v] + [
            per / v for per, v in ((60.0, first("max_per_minute")),
                                   (3600.0, first("max_per_hour"))) if v]
        if spacings:
            rate = 1 / max(spacings)
        if table is not None:
            connections = table.max_connections or connections
            rate = rate if table.max_rate is None else table.max_rate
        per_connection = int(first("max_messages_per_connection") or 0)
        cap = int(first("daily_cap") or 0)
        limits = SiteLimits(int(connections), float(rate), per_connection, cap)
        pool_name = next((r.pool for r in matched if r.pool), "") or route.pool
        pool = self.pools.get(pool_name, ())
        sources = tuple(s for s, _ in pool)
        weights = tuple(itertools.accumulate(w for _, w in pool))
        automation = tuple(a for a in self.automation
                           if (not a.mx_suffixes and not a.domains)
                           or _matches(hosts, domain, a.mx_suffixes, a.domains))
        by_code: dict[int, list[Automation]] = {}
        for a in automation:
            by_code.setdefault(a.code or 0, []).append(a)
        return Shape(limits, tuple(r.name for r in matched), sources, weights, automation,
                     {code: tuple(rules) for code, rules in by_code.items()})


def most_connections(config: Config) -> int:
    """The most connections any one (source, site) may have: [delivery]'s limits and the
    rules' (the SMTP agent keeps that many idle connections per pool)."""
    rules = list(config.shaping.rules) + (list(shipped().rules) if config.shaping.defaults
                                          else [])
    return max([Limits(config.delivery).most_connections(),
                *(r.max_connections for r in rules if r.max_connections)])


def from_config(config: Config) -> Shaping:
    """The shaping of a whole configuration (the App's, at start and at each reload)."""
    return Shaping(config.delivery, config.egress, config.shaping)


def _source(name: str, s: EgressSource) -> _Source:
    start = 0.0
    if s.warmup_start:
        day = datetime.date.fromisoformat(s.warmup_start)
        start = datetime.datetime(day.year, day.month, day.day,
                                  tzinfo=datetime.UTC).timestamp()
    return _Source(Source(name, s.address, s.ehlo), start, s.warmup_caps)


def utc_day(now: float) -> int:
    """Days since the epoch of ``now`` (UTC): the day a daily cap counts in."""
    return int(now // _DAY)


def next_day(now: float) -> float:
    """The start of the UTC day after ``now``'s, when daily caps start again."""
    return (utc_day(now) + 1) * _DAY

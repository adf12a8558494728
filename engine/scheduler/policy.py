"""Scheduling policy: the retry schedule, per-site limits and the message-rate throttle.

Pure functions and small value objects; no I/O, no asyncio, so they are exact to test.
The scheduler's settings are ``engine.config.DeliveryConfig`` itself; what is derived from
it (the limits of each site) is derived here, once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from engine.config import DeliveryConfig


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Limits for one site (a destination's server set)."""

    #: concurrent connections (and so concurrent deliveries) to the site
    max_connections: int = 20
    #: messages per second to the site; 0 = no limit
    max_rate: float = 0.0
    #: messages over one connection (a shaping rule's); 0 = the agent's setting
    max_messages_per_connection: int = 0
    #: messages per UTC day from one source (a shaping rule's); 0 = no cap
    daily_cap: int = 0


class Limits:
    """The site limits of [delivery]: ``max_per_domain`` and ``max_rate`` for every site,
    and a [delivery.domains."x"] table for the site that domain x resolves to (a key it
    leaves out keeps the default).  The scheduler takes each site's limits from
    ``engine.scheduler.shaping``, which puts the shaping rules between these two."""

    __slots__ = ("default", "per_domain")

    def __init__(self, delivery: DeliveryConfig) -> None:
        self.default = SiteLimits(delivery.max_per_domain, delivery.max_rate)
        self.per_domain = {
            domain: SiteLimits(
                max_connections=limits.max_connections or self.default.max_connections,
                max_rate=self.default.max_rate if limits.max_rate is None else limits.max_rate)
            for domain, limits in delivery.domains.items()
        }

    def for_destination(self, destination: str) -> SiteLimits:
        return self.per_domain.get(destination) or self.default

    def most_connections(self) -> int:
        """The most connections any one site may have."""
        return max(limits.max_connections for limits in (self.default, *self.per_domain.values()))


#: ± share of a retry delay drawn at random, so retries do not arrive in waves.
RETRY_JITTER: Final = 0.1


def retry_delay(attempts: int, delivery: DeliveryConfig, rnd: random.Random,
                jitter: float = RETRY_JITTER) -> float:
    """Seconds until the next try after ``attempts`` failed ones (1 = the first failure):
    ``retry_interval`` doubled per failure, at most ``max_retry_interval``."""
    base: float = delivery.retry_interval * (2 ** max(0, attempts - 1))
    base = min(base, delivery.max_retry_interval)
    spread = base * jitter
    return max(0.0, base + rnd.uniform(-spread, spread))


class Throttle:
    """A message-rate limit per site (GCRA: one send every 1/rate seconds, no bursts
    beyond one); ``wait(now)`` is how long the next send must wait."""

    __slots__ = ("_interval", "_next")

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    def wait(self, now: float) -> float:
        if not self._interval:
            return 0.0
        start = max(now, self._next)
        self._next = start + self._interval
        return start - now


def count_daily(counts: dict[str, tuple[int, int]], key: str, day: int, cap: int) -> bool:
    """Count one send to ``key`` on UTC ``day`` in ``counts`` (key → (day, sends)) unless
    ``cap`` sends were counted that day already: whether it may go."""
    counted_day, count = counts.get(key, (day, 0))
    if counted_day != day:
        count = 0
    if count >= cap:
        return False
    counts[key] = (day, count + 1)
    return True

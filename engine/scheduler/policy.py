"""Scheduling policy: the retry schedule, per-site limits and the message-rate throttle.

Pure functions and small value objects; no I/O, no asyncio, so they are exact to test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Limits for one site (a destination's server set)."""

    #: concurrent connections (and so concurrent deliveries) to the site
    max_connections: int = 20
    #: messages per second to the site; 0 = no limit
    max_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    #: due groups held in memory at once (the active window)
    window: int = 50_000
    #: limits for every site, unless ``site_limits`` or ``domain_limits`` say otherwise
    default_limits: SiteLimits = field(default_factory=SiteLimits)
    #: per-site overrides, keyed by site name ("mx:...", "smarthost:host:port")
    site_limits: dict[str, SiteLimits] = field(default_factory=dict)
    #: per-destination-domain overrides (applied to the site the domain resolves to)
    domain_limits: dict[str, SiteLimits] = field(default_factory=dict)
    #: recipients of one message to one destination in one transaction (RFC 5321 §4.5.3.1.8)
    max_recipients_per_transaction: int = 100
    #: the first retry delay; later ones double up to ``max_retry_interval``
    retry_interval: float = 300.0
    max_retry_interval: float = 4 * 3600.0
    #: ± share of a retry delay drawn at random, so retries do not arrive in waves
    retry_jitter: float = 0.1
    #: messages older than this fail, whatever their state (RFC 5321 §4.5.4.1: 4-5 days)
    max_queue_lifetime: float = 5 * 86400.0
    #: how long a site that accepted no connection is left alone
    down_period: float = 60.0
    #: how often the window is refilled when nothing wakes the scheduler
    poll_interval: float = 1.0
    #: stop taking new work (queue still accepts mail)
    paused: bool = False
    #: a message queued this long when a recipient is deferred gets one delay notice
    #: (RFC 3464 action "delayed"); 0 = never
    delay_notice_after: float = 0.0


def retry_delay(attempts: int, settings: SchedulerSettings, rnd: random.Random) -> float:
    """Seconds until the next try after ``attempts`` failed ones (1 = the first failure)."""
    base: float = settings.retry_interval * (2 ** max(0, attempts - 1))
    base = min(base, settings.max_retry_interval)
    spread = base * settings.retry_jitter
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

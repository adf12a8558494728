"""The scheduler's pure rules: the retry schedule, the site limits and the rate throttle."""

from __future__ import annotations

import random

import pytest

from engine.config import DeliveryConfig, DomainLimits
from engine.scheduler.policy import Limits, SiteLimits, Throttle, retry_delay


def test_retry_delay_doubles_up_to_the_cap_without_jitter() -> None:
    s = DeliveryConfig(retry_interval=60, max_retry_interval=600)
    rnd = random.Random(1)
    assert [retry_delay(n, s, rnd, jitter=0) for n in range(1, 7)] == [60, 120, 240, 480, 600,
                                                                      600]


def test_retry_jitter_stays_within_its_share() -> None:
    s = DeliveryConfig(retry_interval=100, max_retry_interval=10_000)
    rnd = random.Random(7)
    delays = [retry_delay(1, s, rnd) for _ in range(1000)]
    assert min(delays) >= 90 and max(delays) <= 110
    assert max(delays) - min(delays) > 10  # it really spreads


def test_throttle_paces_sends() -> None:
    t = Throttle(10.0)  # one every 0.1 s
    assert t.wait(0.0) == 0.0
    assert t.wait(0.0) == pytest.approx(0.1)
    assert t.wait(0.05) == pytest.approx(0.15)
    assert t.wait(5.0) == 0.0  # idle time is not saved up as a burst
    assert t.wait(5.0) == pytest.approx(0.1)


def test_no_rate_limit_never_waits() -> None:
    t = Throttle(0)
    assert all(t.wait(0.0) == 0.0 for _ in range(100))


def test_site_limits_derived_from_delivery() -> None:
    d = DeliveryConfig(max_per_domain=4, max_rate=2.0, domains={
        "big.example": DomainLimits(max_connections=9),
        "slow.example": DomainLimits(max_rate=0.5),
    })
    limits = Limits(d)
    assert limits.for_destination("other.example") == SiteLimits(4, 2.0)
    assert limits.for_destination("big.example") == SiteLimits(9, 2.0)
    assert limits.for_destination("slow.example") == SiteLimits(4, 0.5)
    assert limits.most_connections() == 9

"""The scheduler's pure rules: the retry schedule and the rate throttle."""

from __future__ import annotations

import random

import pytest

from engine.scheduler.policy import SchedulerSettings, Throttle, retry_delay


def test_retry_delay_doubles_up_to_the_cap_without_jitter() -> None:
    s = SchedulerSettings(retry_interval=60, max_retry_interval=600, retry_jitter=0)
    rnd = random.Random(1)
    assert [retry_delay(n, s, rnd) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


def test_retry_jitter_stays_within_its_share() -> None:
    s = SchedulerSettings(retry_interval=100, max_retry_interval=10_000, retry_jitter=0.1)
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

"""Shared fixtures: the twin implementations of every wire module, bounded Hypothesis."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Bounded examples keep the whole CI run (twice: compiled, then pure) well under its limit.
settings.register_profile(
    "ferry",
    max_examples=int(os.environ.get("FERRY_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ferry")

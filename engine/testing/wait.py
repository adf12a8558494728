"""Waiting for a condition in tests: poll it until it holds or time runs out.

Test-side only (never imported by the running server); every wait is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def poll(condition: Callable[[], _T | None], timeout: float,
         interval: float = 0.05) -> _T | None:
    """The first truthy result of ``condition()``, tried every ``interval`` seconds; None
    when it is still falsy after ``timeout`` seconds (it is tried once more at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result or None
        time.sleep(interval)


def wait_for(condition: Callable[[], _T | None], timeout: float = 20.0, what: str = "") -> _T:
    """``poll``, failing the test (AssertionError) when the condition never held."""
    result = poll(condition, timeout)
    if result is None:
        raise AssertionError(f"not in {timeout:.0f} s: {what or condition}")
    return result

"""Waiting for a condition in tests: poll it until it holds or time runs out.

Test-side only (never imported by the running server); every wait is bounded.
"""

from __future__ import annotations

import asyncio
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


async def until(condition: Callable[[], _T | None], within: float = 20.0, what: str = "",
                interval: float = 0.01) -> _T:
    """``wait_for`` inside a coroutine: polls without blocking the loop, so the tasks under
    test run meanwhile; AssertionError when the condition has not held ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            # Polling, not an Event: the state is often another thread's (a sink, a DNS
            # responder, a queue writer) and has no event to await.
            while not (result := condition()):  # noqa: ASYNC110
                await asyncio.sleep(interval)
            return result
    except TimeoutError:
        raise AssertionError(f"not in {within:.0f} s: {what or condition}") from None

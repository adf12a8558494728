"""A clock that moves only when a test moves it, for components that take ``clock=``.

Passing ``ManualClock()`` where a component reads time (``MxResolver(clock=...)``) lets a
test cross a TTL or an interval at once and exactly, instead of sleeping past it.
Test-side only; never imported by the running server.
"""

from __future__ import annotations


class ManualClock:
    """A monotonic clock read by calling it; ``advance(seconds)`` moves it forward."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds

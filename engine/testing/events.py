"""An event sink that keeps every record it is given, for tests to look at.

Test-side only (never imported by the running server).
"""

from __future__ import annotations

from engine.ops.events import Event


class Recorder:
    """``Events.add(Recorder())``: the records in the order they came (``events``)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, batch: list[Event]) -> None:
        self.events += batch

    def close(self) -> None:
        pass

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]

"""What the operator's view of the queues needs from the scheduler beyond its queues:
messages per minute in and out of each destination's queue (``ferry queue queues``,
Exchange's IncomingRate / OutgoingRate), and the destinations it could not route lately
(Get-Queue's "unreachable").

Two counters per direction and destination (this minute and the one before), not a list
of events: counting costs a dict lookup and an addition, and the memory stays one small
object per destination seen in the last two minutes (:meth:`Traffic.sweep` drops the
rest).  The rate is a sliding minute: the whole current minute and the part of the
previous one that still falls in the last 60 seconds.

It must never decide anything about delivery; the scheduler only counts into it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds per counting bucket (the rates are per minute).
MINUTE = 60.0


@dataclass(slots=True)
class _Counts:
    minute: int = 0
    in_now: int = 0
    in_before: int = 0
    out_now: int = 0
    out_before: int = 0

    def roll(self, minute: int) -> None:
        if minute == self.minute:
            return
        last = minute == self.minute + 1
        self.in_before = self.in_now if last else 0
        self.out_before = self.out_now if last else 0
        self.in_now = self.out_now = 0
        self.minute = minute


class Traffic:
    """Per-destination counts of groups that joined its queue (``came``) and left it final
    (``left``), and the destinations whose routing failed for now (``unroutable``) until a
    route is found (``routed``)."""

    __slots__ = ("counts", "unreachable")

    def __init__(self) -> None:
        self.counts: dict[str, _Counts] = {}
        #: destination → (the routing failure's reply, when)
        self.unreachable: dict[str, tuple[str, float]] = {}

    def unroutable(self, destination: str, reply: str, now: float) -> None:
        self.unreachable[destination] = (reply, now)

    def routed(self, destination: str) -> None:
        if self.unreachable:
            self.unreachable.pop(destination, None)

    def _at(self, destination: str, minute: int) -> _Counts:
        c = self.counts.get(destination)
        if c is None:
            c = self.counts[destination] = _Counts(minute)
        else:
            c.roll(minute)
        return c

    # came() and left() run per group on the delivery path: the common case (the bucket of
    # this minute exists) is one dict lookup and one addition.

    def came(self, destination: str, n: int, now: float) -> None:
        minute = int(now // MINUTE)
        c = self.counts.get(destination)
        if c is None or c.minute != minute:
            c = self._at(destination, minute)
        c.in_now += n

    def left(self, destination: str, now: float) -> None:
        minute = int(now // MINUTE)
        c = self.counts.get(destination)
        if c is None or c.minute != minute:
            c = self._at(destination, minute)
        c.out_now += 1

    def rates(self, destination: str, now: float) -> tuple[float, float]:
        """Messages per minute in and out over the last 60 seconds."""
        c = self.counts.get(destination)
        minute = int(now // MINUTE)
        if c is None or c.minute < minute - 1:
            return 0.0, 0.0
        share = 1.0 - (now % MINUTE) / MINUTE  # of the previous minute still in the window
        if c.minute == minute - 1:  # nothing counted yet this minute
            return round(c.in_now * share, 1), round(c.out_now * share, 1)
        return (round(c.in_now + c.in_before * share, 1),
                round(c.out_now + c.out_before * share, 1))

    def sweep(self, now: float, stale: float) -> None:
        """Forget destinations with nothing counted in this minute or the one before, and
        routing failures older than ``stale`` seconds (mail that waits is tried again
        sooner, and marked again: an older mark is for mail that is gone)."""
        minute = int(now // MINUTE)
        self.counts = {d: c for d, c in self.counts.items() if c.minute >= minute - 1}
        self.unreachable = {d: (reply, when) for d, (reply, when) in self.unreachable.items()
                            if when > now - stale}

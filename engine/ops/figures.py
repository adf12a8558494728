"""Figures the hot rooms keep for metrics: plain integers and fixed-bucket histograms.

The receive sessions, the SMTP client, the queue's writer and the MX resolver count what
happens on their own paths with an integer increment (a histogram: one bucket's increment
and one addition); ``engine.ops.metrics`` reads the figures when Prometheus scrapes, and
nothing else does.  A figure may be read while another thread adds to it: a scrape may see
a histogram's count one observation ahead of its sum, never a figure that goes back.

This module must never import the rest of Ferry, do I/O, take a lock, or allocate on an
increment.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from typing import Final

#: Seconds: the queue writer's commit round trip (an fsync is ~0.1-20 ms on most disks).
COMMIT_SECONDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                         1.0, 2.5)
#: Writes (messages, outcome batches, changes) that share one commit.
COMMIT_WRITES: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: Seconds: one DNS query, with the resolver's retries (its lifetime is 10 s).
DNS_SECONDS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                      5.0, 10.0)


class Histogram:
    """Observations counted into buckets with upper bounds ``bounds`` (Prometheus's ``le``:
    a value equal to a bound counts in that bound's bucket) and one more for the rest."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, the last ``inf``."""
        total = 0
        found = []
        for bound, count in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            total += count
            found.append((bound, total))
        return found


class LinkFigures:
    """An outbound delivery agent's connections and STARTTLS handshakes (per site; the
    failures are TLS_FAIL events, counted from the event stream)."""

    __slots__ = ("closed", "opened", "tls_handshakes")

    def __init__(self) -> None:
        #: connections made and closed so far: open = opened - closed
        self.opened = 0
        self.closed = 0
        #: site → STARTTLS handshakes completed
        self.tls_handshakes: Counter[str] = Counter()

"""The active window: a bounded in-memory slice of the due index (Postfix's active queue).

The queue may hold millions of messages; the process holds at most ``capacity`` due
(message, next hop) groups, the earliest first, and refills from the database's due index
as work is finished.  A group handed out stays "in flight" until released, so a refill
never hands the same group out twice while it is being delivered.

It must never decode envelopes or hold bodies: it holds index entries only.
"""

from __future__ import annotations

import time
from collections import deque

from engine.queue.api import DueEntry, QueueStore


class DueWindow:
    def __init__(self, store: QueueStore, capacity: int = 10_000,
                 rescan_interval: float = 10.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.store = store
        self.capacity = capacity
        self.rescan_interval = rescan_interval
        self._ready: deque[DueEntry] = deque()
        #: ``DueEntry.group`` of every group in the window or in flight
        self._held: set[bytes] = set()
        #: the due-index key the next scan starts after, and when it may start over
        self._cursor = b""
        self._rescan_at = time.monotonic() + rescan_interval

    def __len__(self) -> int:
        """Groups held: waiting in the window plus in flight."""
        return len(self._held)

    def refill(self, now: float | None = None) -> int:
        """Load due groups until the window is full; returns how many were added.

        The scan goes on from where the last one stopped: new mail is due at its arrival,
        so it sorts after, and a busy queue costs one short page per freed place, not a
        rescan of everything held.  Entries written behind the cursor (retries, resumed
        recipients) are found by going back to the lowest due key committed since the
        last look (``take_due_low``).  Once a ``rescan_interval`` the scan also starts over
        from the beginning, for entries no write announced: a group whose outcome failed
        to commit keeps its old due entry.
        """
        until = time.time() if now is None else now
        added = 0
        restarted = False
        held = self._held
        while len(held) < self.capacity:
            page, self._cursor = self.store.due_scan(
                until, self.capacity - len(held), self._cursor, held)
            if not page:
                if restarted:
                    break
                low = self.store.take_due_low()
                clock = time.monotonic()
                if low is not None and low <= self._cursor:
                    self._cursor = low[:-1]  # sorts just before it
                elif clock >= self._rescan_at and self._cursor:
                    self._cursor = b""
                else:
                    break
                if not self._cursor:
                    self._rescan_at = clock + self.rescan_interval
                restarted = True
                continue
            for entry in page:
                held.add(entry.group)
                self._ready.append(entry)
            added += len(page)
        return added

    def take(self) -> DueEntry | None:
        """The earliest due group not yet handed out, or None when the window is empty."""
        return self._ready.popleft() if self._ready else None

    def release(self, entry: DueEntry) -> None:
        """The group's outcome is recorded (or it was given up): free its place."""
        self._held.discard(entry.group)

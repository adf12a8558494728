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
                 rescan_interval: float = 1.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.store = store
        self.capacity = capacity
        self.rescan_interval = rescan_interval
        self._ready: deque[DueEntry] = deque()
        #: (queue id, next hop) of every group in the window or in flight
        self._held: set[tuple[bytes, str]] = set()
        #: the due-index key the next scan starts after, and when it may start over
        self._cursor = b""
        self._rescan_at = 0.0

    def __len__(self) -> int:
        """Groups held: waiting in the window plus in flight."""
        return len(self._held)

    def refill(self, now: float | None = None) -> int:
        """Load due groups until the window is full; returns how many were added.

        The scan goes on from where the last one stopped (new mail is due at its arrival,
        so it sorts after; a busy queue costs one short page per freed place, not a rescan
        of everything held) and starts over from the earliest due entry once it has
        reached the end.
        """
        until = time.time() if now is None else now
        added = 0
        restarted = False
        while len(self._held) < self.capacity:
            # A page per freed place when going on; bigger pages when starting over, as
            # that scan first walks past every held group (one read transaction a page).
            page = self.store.due(until, max(1024 if restarted else 16,
                                             self.capacity - len(self._held)), self._cursor)
            if not page:
                # The end: groups that came due since (retries) sort before the cursor, so
                # start over, but at most once a ``rescan_interval`` (each rescan skips
                # every held group once).
                clock = time.monotonic()
                if restarted or not self._cursor or clock < self._rescan_at:
                    break
                self._cursor, self._rescan_at = b"", clock + self.rescan_interval
                restarted = True
                continue
            for entry in page:
                group = (entry.queue_id, entry.next_hop)
                if group in self._held:
                    continue
                self._held.add(group)
                self._ready.append(entry)
                added += 1
                if len(self._held) >= self.capacity:
                    break
            self._cursor = entry.key
        return added

    def take(self) -> DueEntry | None:
        """The earliest due group not yet handed out, or None when the window is empty."""
        return self._ready.popleft() if self._ready else None

    def release(self, entry: DueEntry) -> None:
        """The group's outcome is recorded (or it was given up): free its place."""
        self._held.discard((entry.queue_id, entry.next_hop))

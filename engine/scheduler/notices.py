"""Delay notices: when a message's sender is told that delivery is late (RFC 3464
action "delayed"), and about which recipients.

A notice is due when a delivery attempt defers a recipient of a message that has been
queued for ``delay_notice_after`` seconds or more.  It goes out at most once per message:
the envelope record remembers it (``Envelope.delay_notified``, committed together with the
notice), and this object remembers the messages it gave a notice to recently, because two
destinations of one message may be tried at once, each with a copy of the envelope read
before the other's commit.

Who is named: the recipients this attempt deferred, and those the envelope already holds as
deferred at other destinations, each only if its NOTIFY asks for delay notices.  RFC 3461
§4.1 says that without NOTIFY a server may act as if it were NOTIFY=FAILURE or
NOTIFY=FAILURE,DELAY; Ferry takes the second (``engine.message.dsn.wants_notice``), so a
recipient without NOTIFY gets one, one with NOTIFY=NEVER or NOTIFY=FAILURE does not.  The
null sender never gets one (RFC 5321 §6.1; ``build_dsn`` refuses it too).

It must never do I/O or read the clock: the scheduler passes ``now`` and builds and
records the report (``Scheduler._finish``).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.client.api import RcptResult
from engine.message.dsn import Failure, reply_status, wants_notice
from engine.queue.records import Envelope, RcptState

#: Seconds a message stays in the recently-notified set: longer than any one delivery
#: attempt runs with the envelope it read (SMTP timeouts are minutes, RFC 5321 §4.5.3.2).
RECENT_SECONDS = 3600.0


class DelayNotices:
    """Decides which recipients a message's delay notice names (see the module docstring).

    ``after`` is ``delivery.delay_notice_after`` in seconds; 0 turns notices off.
    """

    def __init__(self, after: float) -> None:
        self.after = after
        #: queue id → when its notice was handed out, oldest first
        self._recent: dict[bytes, float] = {}

    def items(
        self, env: Envelope, results: Sequence[RcptResult], retry_until: float, now: float
    ) -> list[Failure]:
        """The "delayed" items for a notice about ``env`` after ``results``, or [] when no
        notice is due.  ``retry_until``: when retrying stops (the expiry), for the report's
        Will-Retry-Until.  A non-empty answer counts as given: record it with the notice."""
        # Time held or poisoned does not count: the mail was late by the operator's will.
        if (not self.after or env.delay_notified or not env.sender
                or now - env.arrival - env.parked < self.after):
            return []
        deferred = {r.index: (r.reply, r.remote) for r in results
                    if r.state is RcptState.DEFERRED}
        if not deferred:
            return []
        for i, rcpt in enumerate(env.recipients):
            if rcpt.state is RcptState.DEFERRED and i not in deferred:
                deferred[i] = (rcpt.last_reply, "")
        items = [Failure(i, "delayed", reply_status(reply, "delayed"), reply, remote,
                         retry_until)
                 for i, (reply, remote) in sorted(deferred.items())
                 if wants_notice(env.recipients[i], "delay")]
        if items:
            if env.queue_id in self._recent:
                return []
            self._remember(env.queue_id, now)
        return items

    def _remember(self, queue_id: bytes, now: float) -> None:
        recent = self._recent
        while recent:
            oldest, when = next(iter(recent.items()))
            if when > now - RECENT_SECONDS:
                break
            del recent[oldest]
        recent[queue_id] = now

"""When a delay notice is due and whom it names (engine.scheduler.notices), no I/O."""

from __future__ import annotations

import pytest

from engine.client.api import RcptResult
from engine.queue.records import Envelope, RcptState, Recipient
from engine.scheduler.notices import RECENT_SECONDS, DelayNotices

ARRIVAL = 1_000_000.0
HOUR = 3600.0
DEFERRED = RcptState.DEFERRED
BUSY = "451 4.2.1 Mailbox busy"


def envelope(*notify: tuple[str, ...], sender: str = "a@client.test",
             qid: bytes = b"q" * 12) -> Envelope:
    recipients = [Recipient(f"r{i}@two.test", "two.test", notify=n) for i, n in enumerate(notify)]
    return Envelope(sender, recipients or [Recipient("r@two.test", "two.test")],
                    arrival=ARRIVAL, queue_id=qid)


def deferred(*indexes: int, reply: str = BUSY) -> list[RcptResult]:
    return [RcptResult(i, DEFERRED, reply, "mx.two.test") for i in indexes]


def test_a_deferral_after_the_threshold_names_the_recipient() -> None:
    notices = DelayNotices(4 * HOUR)
    (item,) = notices.items(envelope(), deferred(0), ARRIVAL + 99 * HOUR, ARRIVAL + 4 * HOUR)
    assert (item.index, item.action, item.status) == (0, "delayed", "4.2.1")
    assert (item.diagnostic, item.remote_mta) == (BUSY, "mx.two.test")
    assert item.will_retry_until == ARRIVAL + 99 * HOUR


@pytest.mark.parametrize(("after", "age"), [(0.0, 100 * HOUR), (4 * HOUR, 4 * HOUR - 1)])
def test_off_or_too_early(after: float, age: float) -> None:
    assert DelayNotices(after).items(envelope(), deferred(0), 0.0, ARRIVAL + age) == []


def test_time_held_does_not_count() -> None:
    """A message held for three of its five hours is two hours late, not five."""
    env = envelope()
    env.parked = 3 * HOUR
    assert DelayNotices(4 * HOUR).items(env, deferred(0), 0.0, ARRIVAL + 5 * HOUR) == []
    env.parked = HOUR
    assert len(DelayNotices(4 * HOUR).items(env, deferred(0), 0.0, ARRIVAL + 5 * HOUR)) == 1


def test_only_deferrals_count() -> None:
    notices = DelayNotices(HOUR)
    results = [RcptResult(0, RcptState.DELIVERED, "250 ok"),
               RcptResult(1, RcptState.FAILED, "550 5.1.1 no")]
    assert notices.items(envelope((), ()), results, 0.0, ARRIVAL + 2 * HOUR) == []


def test_at_most_once_per_message() -> None:
    notices = DelayNotices(HOUR)
    env = envelope()
    assert notices.items(env, deferred(0), 0.0, ARRIVAL + 2 * HOUR)
    # Another destination's worker read the envelope before the notice was committed.
    assert notices.items(envelope(), deferred(0), 0.0, ARRIVAL + 2 * HOUR) == []
    # After a restart (a new DelayNotices) the record's flag says it was sent.
    env.delay_notified = True
    assert DelayNotices(HOUR).items(env, deferred(0), 0.0, ARRIVAL + 3 * HOUR) == []


def test_the_recent_set_forgets_old_messages() -> None:
    notices = DelayNotices(HOUR)
    now = ARRIVAL + 2 * HOUR
    for n in range(100):
        assert notices.items(envelope(qid=b"%012d" % n), deferred(0), 0.0, now + n)
    later = now + 200 + RECENT_SECONDS
    assert notices.items(envelope(qid=b"new" * 4), deferred(0), 0.0, later)
    assert len(notices._recent) == 1


@pytest.mark.parametrize(("notify", "wanted"), [
    ((), True),  # RFC 3461 §4.1: absent may mean FAILURE,DELAY; Ferry takes that
    (("DELAY",), True),
    (("FAILURE", "DELAY"), True),
    (("NEVER",), False),
    (("FAILURE",), False),
    (("SUCCESS",), False),
])
def test_notify_decides(notify: tuple[str, ...], wanted: bool) -> None:
    items = DelayNotices(HOUR).items(envelope(notify), deferred(0), 0.0, ARRIVAL + 2 * HOUR)
    assert bool(items) is wanted


def test_never_to_the_null_sender() -> None:
    env = envelope(sender="")
    assert DelayNotices(HOUR).items(env, deferred(0), 0.0, ARRIVAL + 2 * HOUR) == []


def test_recipients_deferred_elsewhere_are_named_too_unless_they_opted_out() -> None:
    env = envelope((), (), ("NEVER",), ())
    env.recipients[1].state = DEFERRED
    env.recipients[1].last_reply = "421 4.4.2 timeout"
    env.recipients[2].state = DEFERRED  # NOTIFY=NEVER
    env.recipients[3].state = RcptState.DELIVERED
    notices = DelayNotices(HOUR)
    items = notices.items(env, deferred(0, reply="connection refused"), 0.0, ARRIVAL + 2 * HOUR)
    assert [(i.index, i.status, i.diagnostic) for i in items] == [
        (0, "4.0.0", "connection refused"), (1, "4.4.2", "421 4.4.2 timeout")]


def test_no_wanted_recipient_is_no_notice_and_does_not_count() -> None:
    notices = DelayNotices(HOUR)
    env = envelope(("NEVER",), ())
    assert notices.items(env, deferred(0), 0.0, ARRIVAL + 2 * HOUR) == []
    # Recipient 1 (no NOTIFY) is deferred later: the message still has its notice to give.
    assert [i.index for i in notices.items(env, deferred(1), 0.0, ARRIVAL + 3 * HOUR)] == [1]

"""Crash torture of ``ferry serve``: SIGKILL under ingest and delivery, restart, drain.

A bounded run of ``engine.testing.torture`` (FERRY_TORTURE_KILLS kills, default 6: three
in each phase, each at a random moment; the whole test takes about 15 s): clients submit
over SMTP to a real ``ferry serve`` process that delivers, by MX from a loopback DNS
responder, to a sink that holds its replies to the final dot. The module docstring of
``engine.testing.torture`` states every check and the exact bound on duplicates; the run
collects broken promises as violations, and this test asserts there are none, plus that
the kills really hit both phases.
``FERRY_TORTURE_SEED`` replays a run (the seed is in the failure message).
``benchmarks/crash_torture.py`` is the long version.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from engine.testing.torture import (
    ACKED,
    REJECTED,
    Delivery,
    Kill,
    Ledger,
    Submission,
    TortureReport,
    after_received,
    check_deliveries,
    run_torture,
)

KILLS = int(os.environ.get("FERRY_TORTURE_KILLS", "6"))


def test_sigkill_under_ingest_and_delivery_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("FERRY_TORTURE_SEED") or int.from_bytes(os.urandom(4), "big"))
    # No timing is asserted (restart_limit=None): the time to the greeting after a kill is
    # benchmarks/crash_torture.py's figure; here every restart must greet at all.
    report = run_torture(tmp_path, kills=KILLS, seed=seed, drain_timeout=25, restart_limit=None)
    summary = f"seed {seed}\n{report.summary()}"
    assert report.violations == [], summary
    assert len(report.kills) == KILLS, summary
    # The kills hit both phases: a client waiting for its 250, the sink holding replies
    # (or having replied to messages whose outcome Ferry had not yet committed).
    assert any(k.clients_in_data > 0 for k in report.kills), summary
    assert any(k.held > 0 or k.in_flight > 0 for k in report.kills), summary
    # Real load: acknowledged and refused (bare LF) messages, all accounted for.
    assert report.acked > KILLS * 10 and report.rejected > 0, summary
    # (refused at the final dot: the bare LF ones; no back pressure, no other refusal)
    assert all(key.startswith("DOT 5") for key in report.rejections), summary
    assert report.delivered >= report.acked, summary
    assert report.duplicates <= sum(k.in_flight for k in report.kills), summary
    assert len(report.starts) == KILLS + 1, summary
    assert report.exit_code == 0 and report.leftover == 0, summary
    print(summary)  # shown with -s: the figures of the run


def test_the_checks_catch_loss_duplicates_alteration_and_rejected_delivery() -> None:
    """The bookkeeping itself: each broken promise is reported (no Ferry needed)."""
    rnd = random.Random(7)
    ledger = Ledger()
    lost, twice, altered, refused, licensed = (ledger.new(rnd, bad=False) for _ in range(5))
    for sub in (lost, twice, altered, licensed):
        sub.outcome, sub.queue_id = ACKED, sub.token[:8].upper()
    refused.outcome = REJECTED
    trace = b"Received: from client.test\r\n\tby ferry.torture.test; Thu, 26 Nov 2026\r\n"

    def copy(sub: Submission, body: bytes | None = None) -> Delivery:
        return Delivery(sub.token, trace + (sub.body if body is None else body), 0.0, 0.0)

    deliveries = [
        copy(twice),
        copy(twice),
        copy(altered, altered.body + b"x\r\n"),
        copy(refused),
        copy(licensed),
        copy(licensed),
    ]
    kill = Kill(1, "delivery", 1.0, 0, 0, 1, in_flight=1, at=1.0)
    report = TortureReport(kills=[kill])
    check_deliveries(report, ledger, deliveries, Counter({licensed.token: 1}), [{licensed.token}])
    assert sorted(v.split()[0] for v in report.violations) == sorted(
        [altered.token, "acknowledged", "rejected", twice.token]
    )
    assert f"acknowledged {lost.queue_id} never delivered" in report.violations
    assert (report.delivered, report.deliveries, report.duplicates) == (4, 6, 2)
    assert after_received(trace + b"a\r\n") == b"a\r\n" and after_received(b"a\r\n") is None

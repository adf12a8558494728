"""The in-flight journal on a real file in a temp dir: what a run that dies leaves, what
a clean stop leaves, torn lines, one write per turn of the loop, compaction."""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine.scheduler.inflight import InFlightJournal

A = b"\x01" * 12 + b"one.test"
B = b"\x02" * 12 + b"two.test"
C = b"\x02" * 12 + b"three.test"  # B's message, another destination


def test_a_run_that_dies_leaves_its_groups_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "inflight"
    journal = InFlightJournal(path)
    assert journal.recover() == []
    journal.open()
    for group in (A, B, C):
        journal.started(group)
    journal.ended(B)
    journal.ended(B)  # twice: written once
    # The process dies here (nothing closed): a new run reads what it left.
    assert InFlightJournal(path).recover() == [b"\x01" * 12, b"\x02" * 12]
    assert path.read_bytes().count(b"\n") == 4


def test_a_clean_stop_leaves_nothing(tmp_path: Path) -> None:
    journal = InFlightJournal(tmp_path / "inflight")
    journal.open()
    journal.started(A)
    journal.close()
    assert not (tmp_path / "inflight").exists()
    assert InFlightJournal(tmp_path / "inflight").recover() == []


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "inflight"
    path.write_bytes(b"+" + A.hex().encode() + b"\nxyz\n+zz\n+0102\n-" + B.hex().encode()
                     + b"\n+" + B.hex().encode()[:9])
    assert InFlightJournal(path).recover() == [b"\x01" * 12]


def test_recover_leaves_the_file_until_open(tmp_path: Path) -> None:
    """The crashes are counted between the two: a crash meanwhile must not lose them."""
    path = tmp_path / "inflight"
    path.write_bytes(b"+" + A.hex().encode() + b"\n")
    journal = InFlightJournal(path)
    assert journal.recover() == [b"\x01" * 12]
    assert InFlightJournal(path).recover() == [b"\x01" * 12]
    journal.open()
    assert InFlightJournal(path).recover() == []


def test_one_write_per_turn_of_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "inflight"

    async def go() -> tuple[int, int]:
        journal = InFlightJournal(path)
        journal.open()
        journal.started(A)
        journal.started(B)
        before = path.stat().st_size  # nothing yet: written when the loop turns
        # The next turn of the loop, and no later: the journal's write was scheduled
        # (call_soon) before this callback, so it has run when this future is done.
        turned = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(turned.set_result, None)
        await turned
        return before, path.stat().st_size

    before, after = asyncio.run(go())
    assert before == 0 and after == 2 * (1 + 2 * len(A) + 1)


def test_compaction_keeps_only_the_groups_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "inflight"
    journal = InFlightJournal(path, compact_at=500)
    journal.open()
    journal.started(A)
    for i in range(50):
        group = i.to_bytes(12, "big") + b"x.test"
        journal.started(group)
        journal.ended(group)
    assert path.stat().st_size < 500
    journal.started(B)
    assert InFlightJournal(path).recover() == [b"\x01" * 12, b"\x02" * 12]
    journal.ended(A)
    assert InFlightJournal(path).recover() == [b"\x02" * 12]

"""The tracking log writer and reader (engine.ops.tracking), on real files, no server."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.ops.events import Events, Kind
from engine.ops.tracking import CURRENT, TrackingLog, log_files, raw_lines, read_records


class Clock:
    """Starts at the real time: retention compares it with the files' real times."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def record(n: int, pad: int = 0) -> dict[str, object]:
    return {"time": f"2027-01-15T08:00:{n % 60:02d}.000Z", "event": "DELIVER",
            "id": f"{n:024X}", "message_id": f"m{n}@test", "recipient": "x" * pad}


def written(directory: Path) -> list[dict[str, object]]:
    return list(read_records(directory))


def test_batches_reach_the_file_in_order_and_close_drains(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    for n in range(0, 100, 10):
        log.write([record(i) for i in range(n, n + 10)])
    log.close()
    assert [r["id"] for r in written(tmp_path)] == [f"{i:024X}" for i in range(100)]
    assert (tmp_path / CURRENT).read_bytes().endswith(b"\n")
    assert log.dropped == 0


def test_through_the_hub_without_a_loop(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    events = Events([log])
    events.emit(Kind.FAIL, bytes(16), "a@b", recipient="r@x", reply="550 5.1.1 no")
    events.close()
    (only,) = written(tmp_path)
    assert (only["event"], only["recipient"], only["reply"]) == ("FAIL", "r@x", "550 5.1.1 no")


def test_rotation_by_size_keeps_every_record_in_time_order(tmp_path: Path) -> None:
    clock = Clock()
    log = TrackingLog(tmp_path, max_file_size=1000, max_total_size=0, clock=clock)
    for i in range(40):
        clock.now += 1
        log.write([record(i, pad=50)])
    log.close()
    files = log_files(tmp_path)
    assert len(files) > 5 and files[-1].name == CURRENT
    assert all(f.stat().st_size <= 1000 for f in files)
    assert [r["id"] for r in written(tmp_path)] == [f"{i:024X}" for i in range(40)]


def test_rotation_by_age(tmp_path: Path) -> None:
    clock = Clock()
    log = TrackingLog(tmp_path, max_file_age=60, clock=clock)
    log.write([record(1)])
    log.write([record(2)])
    assert log.drain(10)
    clock.now += 61
    log.write([record(3)])
    log.close()
    files = log_files(tmp_path)
    assert len(files) == 2
    assert [r["id"] for r in read_records(tmp_path)] == [f"{i:024X}" for i in (1, 2, 3)]
    assert len(list(raw_lines(files[0]))) == 2 and len(list(raw_lines(files[1]))) == 1


def test_retention_by_age_and_by_total_size(tmp_path: Path) -> None:
    clock = Clock()
    old = tmp_path / "tracking-20200101T000000.000000Z.log"
    old.write_bytes(orjson.dumps(record(0)) + b"\n")
    os.utime(old, (clock.now - 40 * 86400, clock.now - 40 * 86400))
    kept = [tmp_path / f"tracking-2026010{d}T000000.000000Z.log" for d in range(1, 4)]
    for path in kept:
        path.write_bytes(b"x" * 400 + b"\n")
        os.utime(path, (clock.now - 86400, clock.now - 86400))
    # Start-up applies retention: the 40-day-old file goes, then the oldest until the
    # directory fits in 1000 bytes.
    log = TrackingLog(tmp_path, max_age=30 * 86400, max_total_size=1000, clock=clock)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in kept[1:]]


def test_a_torn_last_line_is_skipped_and_the_next_write_starts_a_new_line(
        tmp_path: Path) -> None:
    whole = orjson.dumps(record(1)) + b"\n"
    (tmp_path / CURRENT).write_bytes(whole + orjson.dumps(record(2))[:30])
    # A reader meanwhile sees only the complete line.
    assert [r["id"] for r in read_records(tmp_path)] == [f"{1:024X}"]
    log = TrackingLog(tmp_path)
    log.write([record(3)])
    log.close()
    lines = (tmp_path / CURRENT).read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[1] == orjson.dumps(record(2))[:30]
    # The half line stays a line of its own, skipped; no record is glued to it.
    assert [r["id"] for r in read_records(tmp_path)] == [f"{1:024X}", f"{3:024X}"]


def test_an_io_error_is_logged_and_never_raised(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    log = TrackingLog(blocked / "tracking")
    with caplog.at_level(logging.ERROR, "ferry.tracking"):
        log.write([record(1), record(2)])
        log.write([record(3)])
        log.close()
    assert log.dropped == 3
    assert log.last_error is not None
    # Rate-limited: one line for the burst, naming what was lost.
    lines = [r for r in caplog.records if r.name == "ferry.tracking"]
    assert len(lines) == 1 and "records lost" in lines[0].getMessage()


def test_prefilter_finds_only_lines_with_every_needle(tmp_path: Path) -> None:
    log = TrackingLog(tmp_path)
    log.write([record(i) for i in range(1000)])
    log.close()
    needle = b'"message_id":"m517@test"'
    (line,) = raw_lines(tmp_path / CURRENT, (needle,))
    assert orjson.loads(line)["id"] == f"{517:024X}"
    assert list(raw_lines(tmp_path / CURRENT, (needle, b"nothing"))) == []


def test_track_query_times_and_ids() -> None:
    from engine.cli.track import Query, row
    from engine.ops.tracking import parse_time

    r: dict[str, Any] = {"time": "2026-12-06T10:02:03.412Z", "event": "DSN", "id": "AB" * 12,
         "message_id": "x@y", "dsn_id": "CD" * 12, "action": "failed",
         "recipients": ["Bob@Example.net"]}
    at = parse_time(r["time"])
    assert Query(start=at).matches(r) and not Query(end=at).matches(r)  # [start, end)
    assert Query(start=parse_time("2026-12-06T11:02:03.412+01:00")).matches(r)
    assert not Query(start=at + 0.001).matches(r)
    assert Query(message_id="<x@y>").matches(r) and not Query(message_id="x@z").matches(r)
    assert Query(queue_id=("cd" * 12)).matches(r)  # a DSN's own id finds its DSN event
    assert Query(recipient="bob@example.NET").matches(r)
    assert Query(events=["DSN"]).matches(r) and not Query(events=["FAIL"]).matches(r)
    assert "action=failed" in row(r) and "dsn_id=" + "CD" * 12 in row(r)

"""The event hub's own helpers: the time every record carries."""

from __future__ import annotations

from datetime import UTC, datetime

from engine.ops.events import iso_time


def test_iso_time_is_utc_with_milliseconds_whatever_the_second_before() -> None:
    # The date and time of day are kept from one call to the next within a second: a
    # change of second, or a time earlier than the last, must still be formatted anew.
    for when in (1765015323.001, 1765015323.999, 1765015324.5, 1765015323.25, 0.0,
                 1765015323.0, 1893456000.123):
        expected = datetime.fromtimestamp(int(when), UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert iso_time(when) == f"{expected}.{int((when - int(when)) * 1000):03d}Z"

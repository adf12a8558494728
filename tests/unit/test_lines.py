"""Long text lines (RFC 5321 §4.5.3.1.6): finding them, and wrapping them as Postfix does."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import SMTP

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.message.headers import scan_headers
from engine.message.lines import MAX_LINE, has_long_line, wrap_long_lines


def lengths(body: bytes) -> list[int]:
    """Each line's length with its CRLF."""
    return [len(line) + 2 for line in body.split(b"\r\n")[:-1]]


@pytest.mark.parametrize(("content", "long"), [(997, False), (998, False), (999, True),
                                                (1000, True), (2500, True)])
@pytest.mark.parametrize("where", ["first", "middle", "last", "last without CRLF"])
def test_a_line_is_long_past_998_octets_and_its_crlf(content: int, long: bool,
                                                     where: str) -> None:
    line = b"y" * content
    body = {"first": line + b"\r\nend\r\n", "middle": b"a\r\n" + line + b"\r\nb\r\n",
            "last": b"a\r\n" * 400 + line + b"\r\n", "last without CRLF": b"a\r\n" + line}[where]
    assert has_long_line(body) is long


def test_short_lines_of_a_large_body_are_not_long() -> None:
    assert not has_long_line((b"x" * 76 + b"\r\n") * 5000)
    assert not has_long_line((b"x" * 998 + b"\r\n") * 50)
    assert not has_long_line(b"")


def test_a_2500_octet_header_line_wraps_into_a_valid_folded_field() -> None:
    value = b"".join(b"%04d" % i for i in range(625))  # 2,500 octets, no white space
    body = b"X-Long: " + value + b"\r\nSubject: hi\r\n\r\n" + b"z" * 2500 + b"\r\nend\r\n"
    wrapped = wrap_long_lines(body)
    assert max(lengths(wrapped)) <= MAX_LINE and not has_long_line(wrapped)
    lines = wrapped.split(b"\r\n")
    # The first piece fills a line; every continuation starts with one inserted SPACE.
    assert len(lines[0]) == 998 and all(line.startswith(b" ") for line in lines[1:3])
    assert b"".join(line[1:] for line in lines[1:3]) == body[998:2508]
    assert lines[3] == b"Subject: hi"
    # Still a header section of two fields (continuations start with white space).
    scan = scan_headers(wrapped)
    assert [wrapped[f[0] : f[1]] for f in scan.fields] == [b"X-Long", b"Subject"]
    parsed = message_from_bytes(wrapped, policy=SMTP)
    assert parsed["Subject"] == "hi"
    assert parsed["X-Long"].replace(" ", "") == value.decode()
    # The body line became lines of at most 1,000 octets; other lines are untouched.
    assert wrapped.endswith(b"\r\nend\r\n") and wrapped.count(b"z") == 2500


def test_short_lines_are_kept_byte_for_byte() -> None:
    body = b"Subject: x\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3 + b".dot\r\n"
    assert wrap_long_lines(body) == body


@given(st.lists(st.integers(0, 3500), min_size=1, max_size=6), st.booleans())
def test_wrapping_leaves_no_long_line_and_loses_nothing(sizes: list[int], crlf: bool) -> None:
    body = b"\r\n".join(b"w" * n for n in sizes) + (b"\r\n" if crlf else b"")
    wrapped = wrap_long_lines(body)
    assert not has_long_line(wrapped)
    assert has_long_line(body) is (max(sizes) > 998)
    assert wrapped.replace(b"\r\n ", b"") == body

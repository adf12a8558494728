"""DKIM's relaxed canonicalisation in one call (engine.message.canon) on both
implementations: the compiled one-pass module and its twin give the same bytes for every
input, and the same bytes as the streaming canonicaliser and ``relaxed_header`` that
engine.message.dkim keeps for large bodies and single fields."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.message.dkim import RelaxedBody, relaxed_header
from engine.testing.chunkings import fed, split_at

IMPLS = _speedups.implementations("canon")
IDS = [name for name, _ in IMPLS]
MODULES = [module for _, module in IMPLS]

#: Text made of what canonicalisation acts on: blanks, line ends (bare ones too), colons.
PIECES = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"Bc", b":", b"\x00",
                          b"\xff", b"X" * 9])
TEXT = st.lists(PIECES, max_size=40).map(b"".join)


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),
    (b"\r\n", b""),
    (b"\r\n\r\n", b""),
    (b" C \r\nD \t E\r\n\r\n\r\n", b" C\r\nD E\r\n"),  # RFC 6376 §3.4.5
    (b"abc  ", b"abc\r\n"),  # the last line without CRLF loses its trailing blanks
    (b"a \r", b"a \r\r\n"),  # a bare CR is not a line end
    (b"x \n", b"x \n\r\n"),  # nor a bare LF
    (b"\r\n\r\nx", b"\r\n\r\nx\r\n"),
    (b"  \r\n \t\r\n", b""),
    (b"XXXXXXXXXXXXXXXX  XXXXXXX\t\r\n", b"XXXXXXXXXXXXXXXX XXXXXXX\r\n"),
])  # fmt: skip
def test_relaxed_body_cases(impl: ModuleType, body: bytes, canonical: bytes) -> None:
    assert impl.relaxed_body(body) == canonical
    assert impl.relaxed_body(memoryview(body)) == canonical


@settings(max_examples=400, deadline=None)
@given(body=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=3))
def test_relaxed_body_agrees_everywhere(body: bytes, cuts: list[int]) -> None:
    points = tuple(sorted({c for c in cuts if 0 < c < len(body)}))
    expected = fed(RelaxedBody, split_at(body, points))
    assert [impl.relaxed_body(body) for impl in MODULES] == [expected] * len(MODULES)


def field(raw: bytes) -> tuple[bytes, bytes, int]:
    """A (name, raw, colon) item as engine.message.dkim makes them."""
    colon = raw.index(b":") + 1
    return raw[: colon - 1].lower(), raw, colon


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_relaxed_fields_rfc6376_example(impl: ModuleType) -> None:
    # §3.4.5: "A: X" and "B : Y\t\r\n\tZ  " give "a:X" and "b:Y Z".
    items = [field(b"A: X"), None, field(b"B : Y\t\r\n\tZ  ")]
    assert impl.relaxed_fields(items) == b"a:X\r\nb:Y Z\r\n"
    assert impl.relaxed_fields([]) == b""


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_relaxed_fields_refuses_a_colon_outside_the_field(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.relaxed_fields([(b"a", b"a", 2)])
    with pytest.raises(ValueError):
        impl.relaxed_fields([(b"a", b"a:", 0)])


@settings(max_examples=400, deadline=None)
@given(fields=st.lists(st.tuples(TEXT, TEXT), max_size=4))
def test_relaxed_fields_agrees_everywhere(fields: list[tuple[bytes, bytes]]) -> None:
    items = [(name.lower(), name + b":" + value, len(name) + 1) for name, value in fields]
    expected = b"".join(relaxed_header(name, value) for name, value in fields)
    assert [impl.relaxed_fields(items) for impl in MODULES] == [expected] * len(MODULES)


def test_a_body_larger_than_the_stream_chunks_agrees() -> None:
    # Lines longer than engine.message.dkim.CHUNK take RelaxedBody's long-line path.
    body = b"X" * 70_000 + b" \t \r\n" + (b"a  b\t" * 20_000) + b"\r\n\r\n" + b"t" * 66_000 + b"  "
    chunk = 64 * 1024
    expected = fed(RelaxedBody, [body[i : i + chunk] for i in range(0, len(body), chunk)])
    assert [impl.relaxed_body(body) for impl in MODULES] == [expected] * len(MODULES)

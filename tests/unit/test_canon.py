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
from engine.message.dkim import RelaxedBody, _Field, relaxed_header
from engine.message.headers import scan_headers
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


#: Names a header and an h= list draw from (some fields repeated, some h= names absent).
NAMES = st.sampled_from([b"from", b"to", b"subject", b"x", b"dkim-signature"])
#: A signature field's value: tags, blanks, folding, b and bh and a case-sensitive B.
TAGS = st.lists(st.sampled_from([b"b", b"bh", b"B", b"=", b";", b" ", b"\t", b"\r\n", b"x",
                                 b"Zm9v", b"\xff"]), max_size=16).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(header=st.lists(st.tuples(NAMES, TEXT), max_size=6), h=st.lists(NAMES, max_size=8),
       value=TAGS, relaxed=st.booleans())
def test_header_data_agrees_everywhere(header: list[tuple[bytes, bytes]], h: list[bytes],
                                       value: bytes, relaxed: bool) -> None:
    # §3.7 / §5.4.2: the same selection, b= removal and canonical bytes from both, and
    # the same bytes as the fields canonicalised one by one (relaxed_header for relaxed).
    fields = [(name, name.title() + b":" + text, len(name) + 1) for name, text in header]
    signature = (b"dkim-signature", b"DKIM-Signature:" + value, 15)
    got = [impl.header_data(fields, tuple(h), signature, relaxed) for impl in MODULES]
    assert got == [got[0]] * len(MODULES)
    pure = MODULES[0]  # the twin ("py" comes first)
    chosen = [f for f in pure.select(fields, h) if f is not None]
    chosen.append(pure.without_b(signature))
    if relaxed:
        whole = b"".join(relaxed_header(f[1][: f[2] - 1], f[1][f[2]:]) for f in chosen)
    else:
        whole = b"".join(f[1] + b"\r\n" for f in chosen)
    assert got[0] == whole[:-2]


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_header_data_selects_from_the_bottom_and_empties_b(impl: ModuleType) -> None:
    # §5.4.2: two From fields, h= names From three times: the lower one first, then the
    # upper, then the null string; To is absent (nothing).  §3.7: b= emptied, bh= kept.
    # The items as engine.message.dkim makes them (a tuple subclass).
    fields = [_Field(*field(raw)) for raw in (b"From: a", b"Subject:  s  ", b"From: b")]
    signature = _Field(*field(b"DKIM-Signature: v=1; bh=AA=; b=Zm9v\r\n YmFy; d=x"))
    names = (b"from", b"from", b"to", b"from", b"subject")
    assert impl.header_data(fields, names, signature, True) == (
        b"from:b\r\nfrom:a\r\nsubject:s\r\ndkim-signature:v=1; bh=AA=; b=; d=x")
    assert impl.header_data(fields, names, signature, False) == (
        b"From: b\r\nFrom: a\r\nSubject:  s  \r\nDKIM-Signature: v=1; bh=AA=; b=; d=x")
    with pytest.raises(ValueError):
        impl.header_data([(b"a", b"a", 2)], (b"a",), signature, True)


@settings(max_examples=400, deadline=None)
@given(data=st.lists(st.sampled_from([b"From", b"tO", b" ", b"\t", b":", b"\r\n", b"x",
                                      b"\xc4", b"\r\n\r\n"]), max_size=20).map(b"".join))
def test_field_items_agree_everywhere(data: bytes) -> None:
    # The items of every field a header scan finds, in any bytes: the lower-cased name, the
    # field as it is, the value's offset; the same from both implementations.
    spans = scan_headers(data).fields
    expected = [(data[ns:ne].lower(), data[ns:ve], vs - ns) for ns, ne, vs, ve in spans]
    assert [impl.field_items(data, spans) for impl in MODULES] == [expected] * len(MODULES)


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_field_items_refuse_a_span_outside_the_data(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.field_items(b"a: b", [(0, 1, 2, 5)])
    with pytest.raises(ValueError):
        impl.field_items(b"a: b", [(1, 0, 2, 4)])

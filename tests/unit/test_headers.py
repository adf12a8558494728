"""Header scanner (engine.message.headers): a table on both implementations, properties
that hold for any bytes, and random bytes through both twins compared."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.message import headers
from engine.protocol import _tables

IMPLS = _speedups.implementations("headers")
BOTH = len(IMPLS) == 2
needs_both = pytest.mark.skipif(not BOTH, reason="compiled headers module not in use")


# The impl fixture hands out a stateless module, so reusing it across examples is safe.
fixture_ok = settings(
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture]
)


@pytest.fixture(params=[m for _, m in IMPLS], ids=[i for i, _ in IMPLS])
def impl(request: pytest.FixtureRequest) -> Any:
    return request.param


def expect(
    end: int,
    fields: list[tuple[int, int, int, int]],
    *,
    received: int = 0,
    message_id: tuple[int, int] | None = None,
    from_: tuple[int, int] | None = None,
    to: tuple[int, int] | None = None,
    subject: tuple[int, int] | None = None,
    date: tuple[int, int] | None = None,
    dkim_signature: bool = False,
    malformed: bool = False,
) -> tuple[Any, ...]:
    """The astuple() a scan must give, in the documented order."""
    return (
        end,
        tuple(fields),
        received,
        message_id,
        from_,
        to,
        subject,
        date,
        dkim_signature,
        malformed,
    )


# (id, data, limit, expected astuple)
CASES: list[tuple[str, bytes, int, tuple[Any, ...]]] = [
    (
        "two fields and a body",
        b"From: a\r\nTo: b\r\n\r\nbody",
        0,
        expect(18, [(0, 4, 5, 7), (9, 11, 12, 14)], from_=(5, 7), to=(12, 14)),
    ),
    (
        "folded value keeps its continuation lines",
        b"Subject: a\r\n b\r\n\tc\r\n\r\n",
        0,
        expect(22, [(0, 7, 8, 18)], subject=(8, 18)),
    ),
    ("empty first line: no fields", b"\r\nbody", 0, expect(2, [])),
    ("empty first line, bare LF", b"\nbody", 0, expect(1, [])),
    (
        "bare LF ends header lines too",
        b"From: a\nTo: b\n\nbody",
        0,
        expect(15, [(0, 4, 5, 7), (8, 10, 11, 13)], from_=(5, 7), to=(11, 13)),
    ),
    ("no body: end is len(data)", b"Date: x\r\n\r\n", 0, expect(11, [(0, 4, 5, 7)], date=(5, 7))),
    (
        "no empty line",
        b"From: a\r\n",
        0,
        expect(9, [(0, 4, 5, 7)], from_=(5, 7), malformed=True),
    ),
    (
        "data ends inside a field",
        b"From: a",
        0,
        expect(7, [(0, 4, 5, 7)], from_=(5, 7), malformed=True),
    ),
    (
        "a trailing CR without LF is part of the value",
        b"From: a\r",
        0,
        expect(8, [(0, 4, 5, 8)], from_=(5, 8), malformed=True),
    ),
    (
        "a non-field line ends the section",
        b"From: a\r\nthis is body\r\n",
        0,
        expect(9, [(0, 4, 5, 7)], from_=(5, 7), malformed=True),
    ),
    (
        "a lone CR line is not the empty line",
        b"From: a\r\n\rX\r\n\r\n",
        0,
        expect(9, [(0, 4, 5, 7)], from_=(5, 7), malformed=True),
    ),
    (
        "space in a field name",
        b"Bad Name: x\r\n\r\n",
        0,
        expect(15, [(0, 8, 9, 11)], malformed=True),
    ),
    (
        "8-bit octet in a field name",
        b"X\x80Y: z\r\n\r\n",
        0,
        expect(10, [(0, 3, 4, 6)], malformed=True),
    ),
    (
        "control octet in a field name",
        b"X\x00: z\r\n\r\n",
        0,
        expect(9, [(0, 2, 3, 5)], malformed=True),
    ),
    (
        "WSP before the colon is not part of the name (obsolete syntax)",
        b"Subject \t: hi\r\n\r\n",
        0,
        expect(17, [(0, 7, 10, 13)], subject=(10, 13)),
    ),
    (
        "continuation before any field is skipped, malformed",
        b" x\r\nFrom: a\r\n\r\n",
        0,
        expect(15, [(4, 8, 9, 11)], from_=(9, 11), malformed=True),
    ),
    ("an empty name is not a field", b": x\r\n\r\n", 0, expect(0, [], malformed=True)),
    ("no colon at all", b"hello\r\n\r\n", 0, expect(0, [], malformed=True)),
    ("empty data", b"", 0, expect(0, [], malformed=True)),
    (
        "tracked names match case-insensitively; first value kept; Received counted",
        b"RECEIVED: a\r\nreceived: b\r\nDKIM-Signature: x\r\n"
        b"message-ID: <m>\r\nMESSAGE-id: <n>\r\n\r\n",
        0,
        expect(
            81,
            [(0, 8, 9, 11), (13, 21, 22, 24), (26, 40, 41, 43), (45, 55, 56, 60), (62, 72, 73, 77)],
            received=2,
            message_id=(56, 60),
            dkim_signature=True,
        ),
    ),
    (
        "names that only look like tracked ones",
        b"Tox: a\r\nFro: b\r\nX-Subject: c\r\nReceived-SPF: d\r\n\r\n",
        0,
        expect(49, [(0, 3, 4, 6), (8, 11, 12, 14), (16, 25, 26, 28), (30, 42, 43, 45)]),
    ),
    ("empty value", b"To:\r\n\r\n", 0, expect(7, [(0, 2, 3, 3)], to=(3, 3))),
    (
        "whitespace-only continuation line",
        b"From: a\r\n \r\n\r\n",
        0,
        expect(14, [(0, 4, 5, 10)], from_=(5, 10)),
    ),
    (
        "bare CR inside a value is not a line end",
        b"From: a\rb\r\n\r\n",
        0,
        expect(13, [(0, 4, 5, 9)], from_=(5, 9)),
    ),
    (
        "CR CR LF: only the CR next to LF belongs to the line end",
        b"From: a\r\r\n\r\n",
        0,
        expect(12, [(0, 4, 5, 8)], from_=(5, 8)),
    ),
    (
        "a colon in the value",
        b"Date: Tue, 1 Apr 2025 10:00:00 +0000\r\n\r\n",
        0,
        expect(40, [(0, 4, 5, 36)], date=(5, 36)),
    ),
    (
        "limit inside a field: scanned as if cut there",
        b"From: a\r\nTo: b\r\n\r\nbody",
        12,
        expect(12, [(0, 4, 5, 7), (9, 11, 12, 12)], from_=(5, 7), to=(12, 12), malformed=True),
    ),
    (
        "limit between CR and LF of the empty line",
        b"From: a\r\nTo: b\r\n\r\nbody",
        17,
        expect(16, [(0, 4, 5, 7), (9, 11, 12, 14)], from_=(5, 7), to=(12, 14), malformed=True),
    ),
    (
        "limit exactly at the end of the section",
        b"From: a\r\nTo: b\r\n\r\nbody",
        18,
        expect(18, [(0, 4, 5, 7), (9, 11, 12, 14)], from_=(5, 7), to=(12, 14)),
    ),
    (
        "limit one short of the data",
        b"From: a\r\n\r\n",
        10,
        expect(9, [(0, 4, 5, 7)], from_=(5, 7), malformed=True),
    ),
    (
        "limit beyond the data is no limit",
        b"From: a\r\n\r\n",
        1000,
        expect(11, [(0, 4, 5, 7)], from_=(5, 7)),
    ),
    (
        "negative limit is no limit",
        b"From: a\r\n\r\n",
        -5,
        expect(11, [(0, 4, 5, 7)], from_=(5, 7)),
    ),
    (
        "limit inside the name of a field",
        b"From: a\r\nSubject: b\r\n\r\n",
        12,
        expect(9, [(0, 4, 5, 7)], from_=(5, 7), malformed=True),
    ),
]


@pytest.mark.parametrize(
    ("data", "limit", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_table(impl: Any, data: bytes, limit: int, want: tuple[Any, ...]) -> None:
    scan = impl.scan_headers(data, limit) if limit else impl.scan_headers(data)
    assert scan.astuple() == want
    # The attribute names are part of the contract, not only astuple().
    assert (scan.end, scan.fields, scan.received, scan.message_id, scan.from_) == (
        want[0],
        list(want[1]),
        want[2],
        want[3],
        want[4],
    )
    assert (scan.to, scan.subject, scan.date, scan.dkim_signature, scan.malformed) == want[5:]


def test_realistic_block(impl: Any) -> None:
    fields = [
        (
            b"Received",
            b" from a.example (a.example [192.0.2.1])\r\n\tby b.example; Tue, 1 Apr 2025",
        ),
        (b"Received", b" from c.example\r\n by d.example"),
        (b"DKIM-Signature", b" v=1; a=rsa-sha256; d=example.com;\r\n\tb=abc"),
        (b"From", b" Sender <s@example.com>"),
        (b"To", b" R <r@example.org>"),
        (b"Subject", b" hello"),
        (b"Date", b" Tue, 1 Apr 2025 10:00:00 +0000"),
        (b"Message-ID", b" <x@example.com>"),
        (b"X-Mailer", b" ferry"),
    ]
    # Every field the shared table tracks is here, so both implementations are checked on it.
    assert {n.lower() for n, _ in fields[:8]} == set(_tables.HEADER_FIELDS)
    data = b"".join(n + b":" + v + b"\r\n" for n, v in fields) + b"\r\nBody: not a header\r\n"
    scan = impl.scan_headers(data)
    assert not scan.malformed
    assert data[scan.end :] == b"Body: not a header\r\n"
    assert [(data[a:b], data[c:d]) for a, b, c, d in scan.fields] == fields
    assert scan.received == 2
    assert scan.dkim_signature is True
    spans = [scan.from_, scan.to, scan.subject, scan.date, scan.message_id]
    got = [data[s[0] : s[1]] for s in spans if s is not None]
    assert got == [v for n, v in fields[3:8]]


def test_never_raises_for_huge_and_odd_input(impl: Any) -> None:
    assert impl.scan_headers(b"x" * 100_000).astuple() == expect(0, [], malformed=True)
    data = b"A: " + b"b" * 50_000 + b"\r\n" + b" c\r\n" * 1000
    scan = impl.scan_headers(data)
    assert scan.fields == [(0, 1, 2, len(data) - 2)]
    assert (scan.end, scan.malformed) == (len(data), True)


def test_rejects_non_bytes(impl: Any) -> None:
    with pytest.raises(TypeError):
        impl.scan_headers("From: a\r\n\r\n")
    with pytest.raises(TypeError):
        impl.scan_headers(bytearray(b"From: a\r\n\r\n"))


def test_result_object(impl: Any) -> None:
    a = impl.scan_headers(b"From: a\r\n\r\n")
    b = impl.scan_headers(b"From: a\r\n\r\n")
    c = impl.scan_headers(b"From: bc\r\n\r\n")
    assert a == b
    assert a != c
    assert a != object()
    with pytest.raises(TypeError):
        hash(a)
    assert repr(a).startswith("HeaderScan(end=11, fields=1,")
    a.fields = []
    assert a.astuple()[1] == ()


@needs_both
def test_results_compare_across_implementations() -> None:
    (_, py), (_, c) = IMPLS
    data = b"From: a\r\nX: y\r\n\r\n"
    assert py.scan_headers(data) == c.scan_headers(data)
    assert c.scan_headers(data) == py.scan_headers(data)
    assert repr(py.scan_headers(data)) == repr(c.scan_headers(data))
    assert py.scan_headers(data) != c.scan_headers(data + b"x", 3)


def test_selector_exports() -> None:
    assert headers.__all__ == ["HeaderScan", "scan_headers"]
    assert headers.COMPILED == BOTH
    module = IMPLS[-1][1]
    assert headers.scan_headers is module.scan_headers
    assert headers.HeaderScan is module.HeaderScan


# Header-ish tokens, so random input reaches every branch (not just "no colon").
TOKENS = [
    b"From",
    b"to",
    b"Received",
    b"DKIM-Signature",
    b"Message-ID",
    b"subject",
    b"DATE",
    b"X",
    b":",
    b" ",
    b"\t",
    b"\r\n",
    b"\n",
    b"\r",
    b"a",
    b"\x00",
    b"\xff",
    b"\x7f",
]
header_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(TOKENS), max_size=80).map(b"".join),
)


def check_invariants(data: bytes, limit: int, scan: Any) -> None:
    """What any scan must satisfy, whatever the input."""
    n = len(data) if limit <= 0 else min(limit, len(data))
    assert 0 <= scan.end <= n
    previous = 0
    for name_start, name_end, value_start, value_end in scan.fields:
        assert previous <= name_start < name_end < value_start <= value_end <= scan.end
        assert data[value_start - 1] == ord(":")
        name = data[name_start:name_end]
        assert b":" not in name
        assert name[-1:] not in (b" ", b"\t")
        assert data[name_start] not in b" \t"
        previous = value_end
    tracked = {
        "message_id": b"message-id",
        "from_": b"from",
        "to": b"to",
        "subject": b"subject",
        "date": b"date",
    }
    names = [data[a:b].lower() for a, b, _, _ in scan.fields]
    values = [(c, d) for _, _, c, d in scan.fields]
    for attr, name in tracked.items():
        first = next((v for nm, v in zip(names, values, strict=True) if nm == name), None)
        assert getattr(scan, attr) == first
    assert scan.received == names.count(b"received")
    assert scan.dkim_signature == (b"dkim-signature" in names)
    # Every CR and LF of the section read is in a CRLF, or the scan says it is not.
    read = data[: scan.end]
    crlf_only = read.count(b"\r") == read.count(b"\n") == read.count(b"\r\n")
    assert scan.bare_line_ends is (not crlf_only)
    if not scan.malformed:
        # Only an empty line ends a well-formed section.
        head = data[: scan.end]
        assert head in (b"\n", b"\r\n") or head.endswith((b"\n\n", b"\n\r\n"))


@fixture_ok
@given(data=header_bytes, limit=st.integers(min_value=-2, max_value=250))
def test_never_raises_and_spans_are_ordered(impl: Any, data: bytes, limit: int) -> None:
    scan = impl.scan_headers(data, limit)
    check_invariants(data, limit, scan)
    if limit > 0:
        assert scan == impl.scan_headers(data[:limit])


@needs_both
@given(data=header_bytes, limit=st.integers(min_value=-2, max_value=250))
def test_both_implementations_agree(data: bytes, limit: int) -> None:
    (_, py), (_, c) = IMPLS
    assert py.scan_headers(data, limit).astuple() == c.scan_headers(data, limit).astuple()
    assert (py.scan_headers(data, limit).bare_line_ends
            is c.scan_headers(data, limit).bare_line_ends)


names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=20,
).map(str.encode)
value_lines = st.lists(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(
        str.encode
    ),
    min_size=1,
    max_size=3,
)


@fixture_ok
@given(fields=st.lists(st.tuples(names, value_lines), max_size=12), body=st.binary(max_size=30))
def test_well_formed_blocks_are_recovered(
    impl: Any, fields: list[tuple[bytes, list[bytes]]], body: bytes
) -> None:
    # Build name ":" value, folding each extra value line with a leading TAB.
    wire = [(name, b"\r\n\t".join(lines)) for name, lines in fields]
    data = b"".join(n + b":" + v + b"\r\n" for n, v in wire) + b"\r\n" + body
    scan = impl.scan_headers(data)
    assert not scan.malformed
    assert data[scan.end :] == body
    assert [(data[a:b], data[c:d]) for a, b, c, d in scan.fields] == wire
    check_invariants(data, 0, scan)

"""Tests of engine.protocol.wire: both implementations against small reference models.

The models below are deliberately written differently from the implementations (whole
input, line by line, no incremental state) so that they check the incremental code rather
than repeat it.  Every table case runs whole and in every chunking; Hypothesis feeds random
bytes in random cuts through the model, the twin and the compiled module.
"""

from __future__ import annotations

import random
import re
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import _speedups
from engine.protocol import wire
from engine.protocol.errors import LineTooLong
from engine.testing.chunkings import chunkings, split_at

IMPLS = _speedups.implementations("wire")


@pytest.fixture(params=[m for _, m in IMPLS], ids=[i for i, _ in IMPLS])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


# Hypothesis tests take the implementation as a parameter (not the function-scoped fixture).
each_impl = pytest.mark.parametrize("impl", [m for _, m in IMPLS], ids=[i for i, _ in IMPLS])
needs_both = pytest.mark.skipif(len(IMPLS) < 2, reason="compiled wire module not in use")
PY = IMPLS[0][1]
C = IMPLS[-1][1]

# Bytes that matter to the framing, and some that do not.
wire_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\r\n.", b".\r\n"]),
    max_size=40,
).map(b"".join)

# ... and any bytes at all, for the twin comparisons.
any_bytes = st.one_of(wire_bytes, st.binary(max_size=64))


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    points = draw(st.lists(st.integers(0, len(data)), max_size=6))
    return split_at(data, tuple(sorted(points)))


# --- reference models ----------------------------------------------------------------


def model_lines(stream: bytes, limit: int) -> tuple[list[Any], bytes]:
    """Events (line or LineTooLong) of a stream read with a fixed limit, and the rest."""
    events: list[Any] = []
    *lines, partial = stream.split(b"\r\n")
    for line in lines:
        events.append(LineTooLong if len(line) + 2 > limit else line)
    if len(partial) > limit:
        partial = b"\r" if partial.endswith(b"\r") else b""
    return events, partial


def model_data(
    stream: bytes, normalize: bool, max_size: int = 0, max_line: int = 0
) -> dict[str, Any]:
    """DATA decoding of a whole stream, line by line (RFC 5321 §4.5.2 read literally)."""
    out = bytearray()
    r: dict[str, Any] = {"size": 0, "bare_cr": 0, "bare_lf": 0, "long_lines": 0, "done": False}
    n = len(stream)
    i = 0
    real = True

    def put(piece: bytes) -> None:
        r["size"] += len(piece)
        out.extend(piece)

    while i < n:
        m = re.compile(rb"[\r\n]").search(stream, i)
        j = m.start() if m else n
        content = stream[i:j]
        if j == n or (stream[j] == 13 and j + 1 == n):
            # The line is not finished: a lone "." waits, the rest is emitted.
            if content != b".":
                put(content[1:] if content.startswith(b".") else content)
            i = n
            break
        if stream[j] == 10:
            kind, width = "LF", 1
        elif stream[j + 1] == 10:
            kind, width = "CRLF", 2
        else:
            kind, width = "CR", 1
        if kind == "CRLF" and real and content == b".":
            r["done"] = True
            i = j + 2
            break
        line = content[1:] if content.startswith(b".") and len(content) > 1 else content
        put(line)
        if max_line and len(line) + 2 > max_line:
            r["long_lines"] += 1
        if kind == "CRLF":
            put(b"\r\n")
        else:
            r["bare_" + kind.lower()] += 1
            if normalize:
                put(b"\r\n")
            else:
                r["size"] += 1
        real = kind == "CRLF"
        i = j + width
    bare = r["bare_cr"] or r["bare_lf"]
    r["oversize"] = bool(max_size) and r["size"] > max_size
    r["ok"] = not r["oversize"] and (normalize or not bare)
    r["body"] = bytes(out) if r["ok"] else b""
    r["consumed"] = i
    return r


def model_bdat(stream: bytes, finished: bool, normalize: bool, max_size: int = 0) -> dict[str, Any]:
    """BDAT decoding of the octets seen so far; ``finished``: the LAST chunk ended."""
    pending = stream.endswith(b"\r") and not finished
    if pending:
        stream = stream[:-1]
    crlf = len(re.findall(rb"\r\n", stream))
    bare_cr = stream.count(b"\r") - crlf
    bare_lf = stream.count(b"\n") - crlf
    body = re.sub(rb"\r\n|\r|\n", b"\r\n", stream) if normalize else stream
    size = len(body)
    oversize = bool(max_size) and size > max_size
    ok = not oversize and (normalize or not (bare_cr or bare_lf))
    return {
        "size": size,
        "bare_cr": bare_cr,
        "bare_lf": bare_lf,
        "oversize": oversize,
        "ok": ok,
        "body": body if ok else b"",
    }


def model_stuff(body: bytes) -> bytes:
    lines = re.split(rb"\r\n|\r|\n", body)
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def data_state(d: Any) -> dict[str, Any]:
    return {
        "size": d.size,
        "bare_cr": d.bare_cr,
        "bare_lf": d.bare_lf,
        "long_lines": d.long_lines,
        "done": d.done,
        "oversize": d.oversize,
        "ok": d.ok,
        "body": d.body(),
    }


def bdat_state(b: Any) -> dict[str, Any]:
    return {
        "size": b.size,
        "bare_cr": b.bare_cr,
        "bare_lf": b.bare_lf,
        "oversize": b.oversize,
        "ok": b.ok,
        "body": b.body(),
    }


def feed_all(dec: Any, chunks: list[bytes]) -> int:
    """Feed chunks as a server would: stop at the first one not wholly consumed."""
    used = 0
    for chunk in chunks:
        k = dec.feed(chunk)
        assert 0 <= k <= len(chunk)
        used += k
        if k < len(chunk):
            assert dec.done
            break
    return used


def pop_all(reader: Any) -> list[Any]:
    events: list[Any] = []
    while True:
        try:
            line = reader.pop_line()
        except LineTooLong as exc:
            assert (exc.code, exc.enhanced, exc.text) == (500, "5.5.2", "Line too long")
            events.append(LineTooLong)
            continue
        if line is None:
            return events
        events.append(line)


# --- the selector ----------------------------------------------------------------------


def test_selector_exports_the_active_implementation() -> None:
    assert set(wire.__all__) == {n for n in dir(PY) if not n.startswith("_")} - {
        "annotations",
        "operator",
        "re",
        "sys",
        "LineTooLong",
    }
    expected = C if wire.COMPILED else PY
    for name in wire.__all__:
        assert getattr(wire, name) is getattr(expected, name)
    assert wire.COMPILED is (len(IMPLS) == 2)


def test_constants(impl: ModuleType) -> None:
    assert impl.BARE_REJECT == "reject"
    assert impl.BARE_NORMALIZE == "normalize"


@pytest.mark.parametrize(
    ("factory", "exc"),
    [
        (lambda m: m.LineReader(-1), ValueError),
        (lambda m: m.LineReader("512"), TypeError),
        (lambda m: m.LineReader(2**64), OverflowError),
        (lambda m: m.DataDecoder(-1), ValueError),
        (lambda m: m.DataDecoder(0, "strict"), ValueError),
        (lambda m: m.DataDecoder(0, None), ValueError),
        (lambda m: m.DataDecoder(0, "reject", -5), ValueError),
        (lambda m: m.BdatReader(-1), ValueError),
        (lambda m: m.BdatReader(0, "REJECT"), ValueError),
        (lambda m: m.dot_stuff("text"), TypeError),
    ],
)
def test_bad_arguments(impl: ModuleType, factory: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        factory(impl)


def test_accepts_buffers(impl: ModuleType) -> None:
    r = impl.LineReader()
    r.push(bytearray(b"NOOP\r"))
    r.push(memoryview(b"\nQ"))
    assert r.pop_line() == b"NOOP"
    assert r.take_rest() == b"Q"
    d = impl.DataDecoder()
    assert d.feed(bytearray(b"x\r\n.\r\n")) == 6
    assert d.body() == b"x\r\n"
    assert impl.dot_stuff(memoryview(b".")) == b"..\r\n.\r\n"


# --- LineReader ------------------------------------------------------------------------

LINE_CASES = [
    # (stream, limit, events, rest)
    (b"", 512, [], b""),
    (b"EHLO a\r\n", 512, [b"EHLO a"], b""),
    (
        b"EHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\r\nDA",
        512,
        [b"EHLO a", b"MAIL FROM:<>", b"RCPT TO:<b@c>"],
        b"DA",
    ),
    (b"\r\n\r\n", 512, [b"", b""], b""),
    # only CRLF ends a line: bare CR and bare LF stay in it
    (b"NOOP\nQUIT\r\n", 512, [b"NOOP\nQUIT"], b""),
    (b"NOOP\rQUIT\r\r\n", 512, [b"NOOP\rQUIT\r"], b""),
    (b"a\n\r\n", 512, [b"a\n"], b""),
    # the limit counts the CRLF: 8 octets fit in 8
    (b"123456\r\n", 8, [b"123456"], b""),
    (b"1234567\r\n", 8, [LineTooLong], b""),
    (b"1234567\r\nNEXT\r\n", 8, [LineTooLong, b"NEXT"], b""),
    (b"123456789012\r\nOK\r\nxyz", 8, [LineTooLong, b"OK"], b"xyz"),
    # a long partial line is dropped, a CR at its end is kept (half of a CRLF)
    (b"123456789012", 8, [], b""),
    (b"123456789012\r", 8, [], b"\r"),
    (b"12345678", 8, [], b"12345678"),
    (b"", 0, [], b""),
    (b"\r\n", 2, [b""], b""),
    (b"\r\n", 1, [LineTooLong], b""),
    (b"\r\n\r\nx", 0, [LineTooLong, LineTooLong], b""),
]


@pytest.mark.parametrize(("stream", "limit", "events", "rest"), LINE_CASES)
def test_line_reader_table(
    impl: ModuleType, stream: bytes, limit: int, events: list[Any], rest: bytes
) -> None:
    assert model_lines(stream, limit) == (events, rest)
    for chunks in chunkings(stream):
        r = impl.LineReader(limit)
        got: list[Any] = []
        for chunk in chunks:
            r.push(chunk)
            got += pop_all(r)
        assert got == events, chunks
        assert r.buffered == len(rest)
        assert r.take_rest() == rest
        assert r.buffered == 0
        assert r.pop_line() is None


def test_line_reader_long_line_is_skipped_not_buffered(impl: ModuleType) -> None:
    r = impl.LineReader(16)
    r.push(b"MAIL FROM:<")
    assert r.pop_line() is None
    for _ in range(1000):
        r.push(b"x" * 100)
        assert r.pop_line() is None
        assert r.buffered <= 17  # never more than limit + 1 octets of one line
    r.push(b"x\r")
    assert r.pop_line() is None
    assert r.buffered == 1
    r.push(b"\nRSET\r\nQU")
    with pytest.raises(LineTooLong) as info:
        r.pop_line()
    assert (info.value.code, info.value.enhanced, info.value.text) == (
        500,
        "5.5.2",
        "Line too long",
    )
    assert r.pop_line() == b"RSET"
    assert r.pop_line() is None
    assert r.take_rest() == b"QU"


def test_line_reader_limit_switching(impl: ModuleType) -> None:
    r = impl.LineReader()
    assert r.limit == 512
    line = b"A" * 800
    r.push(b"AUTH PLAIN\r\n" + line + b"\r\n" + line + b"\r\n")
    assert r.pop_line() == b"AUTH PLAIN"
    r.limit = 12288  # RFC 4954 §4: the server accepts longer AUTH responses
    assert r.limit == 12288
    assert r.pop_line() == line
    r.limit = 512
    with pytest.raises(LineTooLong):
        r.pop_line()
    assert r.pop_line() is None
    with pytest.raises(ValueError):
        r.limit = -1
    with pytest.raises(TypeError):
        r.limit = 1.5
    assert r.limit == 512


def test_line_reader_take_rest_clears_skipping(impl: ModuleType) -> None:
    r = impl.LineReader(4)
    r.push(b"toolongline")
    assert r.pop_line() is None
    assert r.take_rest() == b""
    r.push(b"ok\r\n")
    assert r.pop_line() == b"ok"  # the skip ended with take_rest


def test_line_reader_many_pipelined_lines(impl: ModuleType) -> None:
    # 20,000 lines in one push all come out, in order.  That this stays linear (the reader
    # compacts its buffer, never per line) is benchmarks/bench_wire.py's "cost per line".
    lines = [b"RCPT TO:<user%d@example.com>" % i for i in range(20000)]
    r = impl.LineReader()
    r.push(b"\r\n".join(lines) + b"\r\n")
    got = []
    while (line := r.pop_line()) is not None:
        got.append(line)
    assert got == lines
    assert r.buffered == 0


def test_line_reader_repr(impl: ModuleType) -> None:
    r = impl.LineReader(3)
    r.push(b"abcdef")
    assert repr(r) == "<LineReader limit=3 buffered=6>"
    r.pop_line()
    assert repr(r) == "<LineReader limit=3 buffered=0 skipping>"


@each_impl
@given(data=st.data(), stream=any_bytes, limit=st.integers(0, 12))
def test_line_reader_matches_model(
    impl: ModuleType, data: st.DataObject, stream: bytes, limit: int
) -> None:
    chunks = data.draw(cut(stream))
    r = impl.LineReader(limit)
    got: list[Any] = []
    for chunk in chunks:
        r.push(chunk)
        got += pop_all(r)
    events, rest = model_lines(stream, limit)
    assert got == events
    assert r.take_rest() == rest


line_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), any_bytes),
        st.tuples(st.just("pop"), st.integers(1, 3)),
        st.tuples(st.just("limit"), st.integers(0, 12)),
        st.tuples(st.just("rest"), st.none()),
    ),
    max_size=25,
)


@needs_both
@given(ops=line_ops, limit=st.integers(0, 12))
def test_line_reader_twins_agree(ops: list[tuple[str, Any]], limit: int) -> None:
    readers = [m.LineReader(limit) for _, m in IMPLS]
    for op, arg in ops:
        results = []
        for r in readers:
            if op == "push":
                results.append(r.push(arg))
            elif op == "pop":
                res: list[Any] = []
                for _ in range(arg):
                    try:
                        res.append(r.pop_line())
                    except LineTooLong as exc:
                        res.append(exc)
                results.append(res)
            elif op == "limit":
                r.limit = arg
                results.append(r.limit)
            else:
                results.append(r.take_rest())
            results.append((r.buffered, repr(r)))
        assert results[:2] == results[2:]


# --- DataDecoder -----------------------------------------------------------------------

NEXT = b"MAIL FROM:<>\r\n"

DATA_CASES = [
    # (stream before NEXT, normalized body) -- all without bare line endings
    (b".\r\n", b""),
    (b"\r\n.\r\n", b"\r\n"),
    (b"Subject: x\r\n\r\nhello\r\n.\r\n", b"Subject: x\r\n\r\nhello\r\n"),
    (b"..\r\n.\r\n", b".\r\n"),
    (b"...\r\n.\r\n", b"..\r\n"),
    (b"a\r\n..b\r\n.c\r\n.\r\n", b"a\r\n.b\r\nc\r\n"),
    (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n"),
    (b"\x00.\r\n.\r\n", b"\x00.\r\n"),
    (b"a.\r\n.\r\n", b"a.\r\n"),
    (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
]


@pytest.mark.parametrize("policy", ["reject", "normalize"])
@pytest.mark.parametrize(("stream", "body"), DATA_CASES)
def test_data_table(impl: ModuleType, policy: str, stream: bytes, body: bytes) -> None:
    full = stream + NEXT
    for chunks in chunkings(full):
        d = impl.DataDecoder(bare_eol=policy)
        assert feed_all(d, chunks) == len(stream), chunks
        assert d.done and d.ok
        assert d.body() == body
        assert d.size == len(body)
        assert (d.bare_cr, d.bare_lf, d.long_lines, d.oversize) == (0, 0, 0, False)
        assert d.feed(NEXT) == 0  # after the end nothing more is taken


SMUGGLING = [
    # (vector, normalized body, bare CR, bare LF) with "A" before and "B\r\n" after
    (b"\n.\n", b"A\r\n.\r\nB\r\n", 0, 2),
    (b"\n.\r\n", b"A\r\n.\r\nB\r\n", 0, 1),
    (b"\r\n.\n", b"A\r\n.\r\nB\r\n", 0, 1),
    (b"\r.\r", b"A\r\n.\r\nB\r\n", 2, 0),
    (b"\r.\n", b"A\r\n.\r\nB\r\n", 1, 1),
    (b"\n.\r", b"A\r\n.\r\nB\r\n", 1, 1),
    (b"\r.\r\n", b"A\r\n.\r\nB\r\n", 1, 0),
    (b"\r\n.\r\r\n", b"A\r\n.\r\n\r\nB\r\n", 1, 0),
    (b"\r\r\n.\r\r\n", b"A\r\n\r\n.\r\n\r\nB\r\n", 2, 0),
    (b"\r\n\x00.\r\n", b"A\r\n\x00.\r\nB\r\n", 0, 0),
]


@pytest.mark.parametrize("policy", ["reject", "normalize"])
@pytest.mark.parametrize(("vector", "body", "bare_cr", "bare_lf"), SMUGGLING)
def test_smuggling_never_ends_data(
    impl: ModuleType, policy: str, vector: bytes, body: bytes, bare_cr: int, bare_lf: int
) -> None:
    stream = b"A" + vector + b"B\r\n.\r\n"
    full = stream + b"RCPT TO:<victim@x>\r\n"
    bare = bare_cr + bare_lf
    ok = policy == "normalize" or bare == 0
    for chunks in chunkings(full):
        d = impl.DataDecoder(bare_eol=policy)
        assert feed_all(d, chunks) == len(stream), chunks
        assert d.done
        assert (d.bare_cr, d.bare_lf) == (bare_cr, bare_lf)
        assert d.ok is ok
        assert d.body() == (body if ok else b"")
        # under "reject" each bare ending counts one octet, under "normalize" two
        assert d.size == len(body) - (0 if policy == "normalize" else bare)


def test_smuggling_vector_alone_never_ends(impl: ModuleType) -> None:
    for vector, *_ in SMUGGLING:
        for policy in ("reject", "normalize"):
            d = impl.DataDecoder(bare_eol=policy)
            stream = b"A" + vector + b"B" + vector + b"MAIL FROM:<>\r\n"
            assert d.feed(stream) == len(stream)
            assert not d.done


@pytest.mark.parametrize(
    ("stream", "body"),
    [
        (b"\n..x\r\n.\r\n", b"\r\n.x\r\n"),  # a bare LF ends a line for unstuffing
        (b"a\r..x\n.\r\n.\r\n", b"a\r\n.x\r\n.\r\n"),
        (b".\n\r\n.\r\n", b".\r\n\r\n"),  # "." LF at the start: kept
        (b".\n.\r\n.\r\n", b".\r\n.\r\n"),  # "." CRLF after a bare LF: kept
        (b"a\r\r\n.\r\n", b"a\r\n\r\n"),  # bare CR then a real CRLF: the end
        (b"\r", None),
    ],
)
def test_data_normalize(impl: ModuleType, stream: bytes, body: bytes | None) -> None:
    for chunks in chunkings(stream):
        d = impl.DataDecoder(bare_eol="normalize")
        assert feed_all(d, chunks) == len(stream)
        if body is None:
            assert not d.done
            assert d.size == 0 and d.bare_cr == 0  # a CR at the end is undecided
        else:
            assert d.done and d.ok
            assert d.body() == body
            assert d.bare_cr + d.bare_lf >= 1


def test_data_oversize_reads_to_terminator(impl: ModuleType) -> None:
    body = b"".join(b"line %04d of the message\r\n" % i for i in range(200))
    stream = body + b".\r\n"
    full = stream + NEXT
    for size in (64, 256, 4096, 8192):
        chunks = [full[i : i + size] for i in range(0, len(full), size)]
        d = impl.DataDecoder(max_size=1000)
        used = feed_all(d, chunks)
        assert used == len(stream)
        assert full[used:] == NEXT  # the next command stays for the command parser
        assert d.done and d.oversize and not d.ok
        assert d.size == len(body)  # counted on past the limit
        assert d.body() == b""
    exact = impl.DataDecoder(max_size=len(body))
    assert exact.feed(stream) == len(stream)
    assert exact.ok and not exact.oversize and exact.body() == body


def test_data_long_lines(impl: ModuleType) -> None:
    stream = b"12345678\r\n123456789\r\n..2345678\r\n...345678\r\n\r\n.\r\n"
    for chunks in chunkings(stream):
        d = impl.DataDecoder(max_line=10)
        assert feed_all(d, chunks) == len(stream)
        # 9+2 and "..345678" + 2 = 10 after unstuffing is fine; "...345678" → 10 too
        assert d.long_lines == 1
        assert d.ok


def test_data_byte_at_a_time(impl: ModuleType) -> None:
    stream = b"From: a\r\n\r\n..x\r\n\ry\nz\r\n.\r\n" + NEXT
    for policy in ("reject", "normalize"):
        d = impl.DataDecoder(bare_eol=policy)
        used = 0
        for i in range(len(stream)):
            k = d.feed(stream[i : i + 1])
            used += k
            if d.done:
                break
            assert k == 1
        assert used == len(stream) - len(NEXT)
        assert (d.bare_cr, d.bare_lf) == (1, 1)
        assert d.body() == (
            b"From: a\r\n\r\n.x\r\n\r\ny\r\nz\r\n" if policy == "normalize" else b""
        )


def test_data_body_before_done_and_repr(impl: ModuleType) -> None:
    d = impl.DataDecoder()
    assert d.feed(b"abc\r\n.") == 6
    assert not d.done
    assert d.body() == b"abc\r\n"  # the leading dot waits for the next byte
    assert d.size == 5
    assert repr(d) == "<DataDecoder done=False size=5 ok=True bare_cr=0 bare_lf=0 long_lines=0>"
    assert d.feed(b"") == 0


def test_data_body_is_stable_while_decoding(impl: ModuleType) -> None:
    d = impl.DataDecoder()
    assert d.feed(b"abc\r\n") == 5
    first = d.body()
    assert d.feed(b"def\r\n.\r\nQUIT\r\n") == 8
    assert first == b"abc\r\n"  # a body handed out is never written again
    assert d.body() == b"abc\r\ndef\r\n"
    assert d.body() == d.body()


def test_keyword_arguments(impl: ModuleType) -> None:
    r = impl.LineReader(limit=20)
    r.push(data=b"x\r\n")
    assert r.pop_line() == b"x"
    d = impl.DataDecoder(max_size=10, bare_eol=impl.BARE_NORMALIZE, max_line=5)
    assert d.feed(data=b"\n.\r\n") == 4
    assert d.bare_lf == 1 and not d.done
    b = impl.BdatReader(max_size=10, bare_eol=impl.BARE_REJECT)
    b.start_chunk(count=1, last=True)
    assert b.feed(data=b"z") == 1
    assert b.body() == b"z"
    assert impl.dot_stuff(body=b"a") == b"a\r\n.\r\n"


def mixed_body(seed: int, size: int) -> bytes:
    """A long body of ordinary lines with every kind of awkward line mixed in."""
    rnd = random.Random(seed)
    pieces = [
        b"x" * 70 + b"\r\n",
        b".leading dot\r\n",
        b"..\r\n",
        b"\r\n",
        b"bare lf\n",
        b"bare cr\rx",
        b"\r\r\n",
        b".\n",
        b"\n.\r\n",
        b"a\x00b\r\n",
        b"." + b"y" * 30,
    ]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(pieces)
    return bytes(out)


@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_data_long_mixed_body_matches_model(impl: ModuleType, policy: str) -> None:
    stream = mixed_body(7, 20000) + b"\r\n.\r\n" + NEXT
    want = model_data(stream, policy == "normalize", 0, 40)
    assert want.pop("consumed") == len(stream) - len(NEXT)
    assert want["done"] and want["bare_cr"] and want["bare_lf"] and want["long_lines"]
    for size in (1, 7, 76, 1000, 4096, 65536):
        d = impl.DataDecoder(0, policy, 40)
        used = feed_all(d, [stream[i : i + size] for i in range(0, len(stream), size)])
        assert used == len(stream) - len(NEXT)
        assert data_state(d) == want


@each_impl
@given(
    data=st.data(),
    stream=wire_bytes,
    normalize=st.booleans(),
    max_size=st.integers(0, 30),
    max_line=st.integers(0, 8),
)
def test_data_matches_model(
    impl: ModuleType,
    data: st.DataObject,
    stream: bytes,
    normalize: bool,
    max_size: int,
    max_line: int,
) -> None:
    chunks = data.draw(cut(stream))
    d = impl.DataDecoder(max_size, "normalize" if normalize else "reject", max_line)
    seen = b""
    for chunk in chunks:
        seen += chunk[: d.feed(chunk)]
        want = model_data(seen, normalize, max_size, max_line)
        assert want.pop("consumed") == len(seen)
        assert data_state(d) == want
    assert len(seen) == model_data(stream, normalize)["consumed"]


@needs_both
@given(
    data=st.data(),
    stream=any_bytes,
    normalize=st.booleans(),
    max_size=st.integers(0, 30),
    max_line=st.integers(0, 8),
)
def test_data_twins_agree(
    data: st.DataObject, stream: bytes, normalize: bool, max_size: int, max_line: int
) -> None:
    chunks = data.draw(cut(stream))
    policy = "normalize" if normalize else "reject"
    py, c = PY.DataDecoder(max_size, policy, max_line), C.DataDecoder(max_size, policy, max_line)
    for chunk in chunks:
        assert py.feed(chunk) == c.feed(chunk)
        assert data_state(py) == data_state(c)
        assert repr(py) == repr(c)


canonical_bodies = st.lists(
    st.lists(st.sampled_from([b".", b"a", b" ", b"\x00", b"\xff", b".."]), max_size=6).map(
        b"".join
    ),
    max_size=8,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


@each_impl
@given(data=st.data(), body=canonical_bodies)
def test_dot_stuff_round_trip(impl: ModuleType, data: st.DataObject, body: bytes) -> None:
    stuffed = impl.dot_stuff(body)
    full = stuffed + NEXT
    chunks = data.draw(cut(full))
    d = impl.DataDecoder(bare_eol="reject")
    assert feed_all(d, chunks) == len(stuffed)
    assert d.done and d.ok
    assert d.body() == body
    assert d.size == len(body)


@each_impl
@given(data=st.data(), body=wire_bytes)
def test_dot_stuff_any_body_decodes_to_its_canonical_form(
    impl: ModuleType, data: st.DataObject, body: bytes
) -> None:
    stuffed = impl.dot_stuff(body)
    assert stuffed == model_stuff(body)
    canonical = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if canonical and not canonical.endswith(b"\r\n"):
        canonical += b"\r\n"
    d = impl.DataDecoder()
    assert feed_all(d, data.draw(cut(stuffed + NEXT))) == len(stuffed)
    assert d.done and d.ok and (d.bare_cr, d.bare_lf) == (0, 0)
    assert d.body() == canonical


# --- dot_stuff -------------------------------------------------------------------------

STUFF_CASES = [
    (b"", b".\r\n"),
    (b"x", b"x\r\n.\r\n"),
    (b"x\r\n", b"x\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\n.b\r.c\r\n", b"a\r\n..b\r\n..c\r\n.\r\n"),
    (b"\r\r\n", b"\r\n\r\n.\r\n"),
    (b"x\r", b"x\r\n.\r\n"),
    (b"\n", b"\r\n.\r\n"),
    (b"a.b\r\n..\r\n", b"a.b\r\n...\r\n.\r\n"),
]


@pytest.mark.parametrize(("body", "out"), STUFF_CASES)
def test_dot_stuff_table(impl: ModuleType, body: bytes, out: bytes) -> None:
    assert model_stuff(body) == out
    assert impl.dot_stuff(body) == out


@needs_both
@given(body=any_bytes)
def test_dot_stuff_twins_agree(body: bytes) -> None:
    assert PY.dot_stuff(body) == C.dot_stuff(body)


# --- BdatReader ------------------------------------------------------------------------


def bdat_run(
    impl: ModuleType,
    chunks: list[tuple[bytes, bool]],
    policy: str,
    max_size: int = 0,
    feeds: int = 1,
) -> Any:
    b = impl.BdatReader(max_size, policy)
    for octets, last in chunks:
        b.start_chunk(len(octets), last)
        step = max(1, -(-len(octets) // feeds))
        for i in range(0, len(octets), step):
            piece = octets[i : i + step]
            tail = b"NEXT" if i + step >= len(octets) else b""  # a pipelined command
            assert b.feed(piece + tail) == len(piece)
        assert b.chunk_done
    return b


def test_bdat_zero_last(impl: ModuleType) -> None:
    b = impl.BdatReader()
    assert b.chunk_done and not b.done
    b.start_chunk(0, True)
    assert b.done and b.chunk_done and b.ok
    assert b.body() == b"" and b.size == 0
    assert b.feed(b"MAIL") == 0
    with pytest.raises(ValueError):
        b.start_chunk(1, True)


def test_bdat_chunks_and_zero_last(impl: ModuleType) -> None:
    b = bdat_run(impl, [(b"Subject: x\r\n\r\n", False), (b".hi\r\n", False)], "reject")
    assert not b.done
    b.start_chunk(0, True)
    assert b.done and b.ok
    assert b.body() == b"Subject: x\r\n\r\n.hi\r\n"  # no unstuffing in BDAT
    assert b.size == 19


def test_bdat_start_chunk_errors(impl: ModuleType) -> None:
    b = impl.BdatReader()
    b.start_chunk(5, False)
    assert not b.chunk_done
    assert b.feed(b"abc") == 3
    with pytest.raises(ValueError):
        b.start_chunk(2, True)  # two octets of the first chunk are still due
    assert b.feed(b"defgh") == 2
    with pytest.raises(ValueError):
        b.start_chunk(-1, True)
    with pytest.raises(TypeError):
        b.start_chunk(1.0, True)
    b.start_chunk(1, True)
    assert b.feed(b"!") == 1
    assert b.done and b.body() == b"abcde!"
    with pytest.raises(ValueError):
        b.start_chunk(0, True)


@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_bdat_crlf_split_across_chunks(impl: ModuleType, policy: str) -> None:
    b = bdat_run(impl, [(b"a\r", False), (b"\nb\r", False), (b"\n", True)], policy)
    assert b.done and b.ok and (b.bare_cr, b.bare_lf) == (0, 0)
    assert b.body() == b"a\r\nb\r\n"
    c = bdat_run(impl, [(b"a\r", False), (b"b", False), (b"\n\r", True)], policy)
    assert (c.bare_cr, c.bare_lf) == (2, 1)  # CR|b, LF at a chunk start, CR at the end
    assert c.ok is (policy == "normalize")
    assert c.body() == (b"a\r\nb\r\n\r\n" if policy == "normalize" else b"")
    assert c.size == (8 if policy == "normalize" else 5)


def test_bdat_pending_cr_before_zero_last(impl: ModuleType) -> None:
    b = bdat_run(impl, [(b"x\r", False)], "normalize")
    assert b.bare_cr == 0 and b.size == 1
    b.start_chunk(0, True)
    assert b.done and b.bare_cr == 1
    assert b.body() == b"x\r\n"


def test_bdat_discard(impl: ModuleType) -> None:
    b = impl.BdatReader()
    b.start_chunk(10, False)
    assert b.feed(b"01234") == 5
    b.discard()
    assert not b.ok
    assert b.feed(b"56789BDAT") == 5  # the refused chunk is still consumed
    assert b.chunk_done and b.body() == b""
    b.start_chunk(3, True)  # later pipelined chunks are read too (RFC 3030 §4)
    assert b.feed(b"abc") == 3
    assert b.done and not b.ok and b.body() == b""
    assert b.size == 13


def test_bdat_oversize(impl: ModuleType) -> None:
    b = bdat_run(impl, [(b"x" * 50, False), (b"y" * 50, True)], "reject", max_size=80, feeds=7)
    assert b.done and b.oversize and not b.ok
    assert b.size == 100 and b.body() == b""


def test_bdat_byte_at_a_time(impl: ModuleType) -> None:
    octets = b"a\r\nb\rc\nd\r\r\n."
    b = impl.BdatReader(0, "normalize")
    b.start_chunk(len(octets), True)
    for i in range(len(octets)):
        assert b.feed(octets[i : i + 1]) == 1
    assert b.done
    assert (b.bare_cr, b.bare_lf) == (2, 1)
    assert b.body() == b"a\r\nb\r\nc\r\nd\r\n\r\n."
    assert repr(b).startswith("<BdatReader done=True remaining=0 size=15 ok=True")


bdat_plan = st.lists(st.tuples(any_bytes, st.lists(st.integers(0, 40), max_size=3)), max_size=4)


@each_impl
@given(
    plan=bdat_plan,
    normalize=st.booleans(),
    max_size=st.integers(0, 40),
    discard_at=st.integers(0, 6),
)
def test_bdat_matches_model(
    impl: ModuleType,
    plan: list[tuple[bytes, list[int]]],
    normalize: bool,
    max_size: int,
    discard_at: int,
) -> None:
    b = impl.BdatReader(max_size, "normalize" if normalize else "reject")
    seen = b""
    for n, (octets, cuts) in enumerate(plan):
        last = n == len(plan) - 1
        b.start_chunk(len(octets), last)
        if n == discard_at:
            b.discard()
        for piece in split_at(octets + b"BDAT", tuple(sorted(c for c in cuts if c <= len(octets)))):
            k = b.feed(piece)
            seen += piece[:k]
            want = model_bdat(seen, last and b.chunk_done, normalize, max_size)
            if n >= discard_at:
                want["ok"], want["body"] = False, b""
            assert bdat_state(b) == want
        assert b.chunk_done
    assert b.done is bool(plan)


@needs_both
@given(plan=bdat_plan, normalize=st.booleans(), max_size=st.integers(0, 40))
def test_bdat_twins_agree(
    plan: list[tuple[bytes, list[int]]], normalize: bool, max_size: int
) -> None:
    policy = "normalize" if normalize else "reject"
    readers = [m.BdatReader(max_size, policy) for _, m in IMPLS]
    for n, (octets, cuts) in enumerate(plan):
        for r in readers:
            r.start_chunk(len(octets), n == len(plan) - 1)
        for piece in split_at(octets + b"x", tuple(sorted(c for c in cuts if c <= len(octets)))):
            used = [r.feed(piece) for r in readers]
            assert used[0] == used[1]
            states = [(bdat_state(r), r.chunk_done, r.done, repr(r)) for r in readers]
            assert states[0] == states[1]

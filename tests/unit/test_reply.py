"""SMTP reply parser and formatter (engine.protocol.reply): a table on both implementations
in every chunking, limits, the dead-parser rule, format/parse round trips, and random
bytes in random chunkings through both twins compared."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.protocol import reply as reply_module
from engine.protocol.errors import ReplyError
from engine.testing.chunkings import chunkings, split_at

IMPLS = _speedups.implementations("reply")
BOTH = len(IMPLS) == 2
needs_both = pytest.mark.skipif(not BOTH, reason="compiled reply module not in use")

MALFORMED = "Malformed reply line"
MISMATCH = "Reply code mismatch in multi-line reply"
TOO_LONG = "Reply line too long"
TOO_MANY = "Too many reply lines"

# The impl fixture hands out a stateless module, so reusing it across examples is safe.
fixture_ok = settings(
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture]
)


@pytest.fixture(params=[m for _, m in IMPLS], ids=[i for i, _ in IMPLS])
def impl(request: pytest.FixtureRequest) -> Any:
    return request.param


Outcome = tuple[list[tuple[Any, ...]], str | None, int]


def feed(impl: Any, chunks: list[bytes], **limits: int) -> Outcome:
    """Push each chunk and pop every reply it completes, as a client does.

    Returns (replies as astuple(), error text or None, buffered at the end).
    """
    parser = impl.ReplyParser(**limits)
    replies: list[tuple[Any, ...]] = []
    for chunk in chunks:
        parser.push(chunk)
        while True:
            try:
                got = parser.pop_reply()
            except ReplyError as exc:
                assert (exc.code, exc.enhanced) == (421, "4.5.0")
                assert type(exc) is ReplyError
                return replies, exc.text, parser.buffered
            if got is None:
                break
            replies.append(got.astuple())
    return replies, None, parser.buffered


# (id, wire, limits, replies as (code, enhanced, lines), error text, buffered at the end)
CASES: list[tuple[str, bytes, dict[str, int], list[tuple[Any, ...]], str | None, int]] = [
    ("one line", b"250 OK\r\n", {}, [(250, "", ("OK",))], None, 0),
    (
        "multi-line",
        b"250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
        {},
        [(250, "", ("mx.example.com", "PIPELINING", "SIZE 1000"))],
        None,
        0,
    ),
    ("code alone is a final line", b"250\r\n", {}, [(250, "", ("",))], None, 0),
    ("empty texts", b"250-\r\n250 \r\n", {}, [(250, "", ("", ""))], None, 0),
    ("bare LF ends a line", b"221 bye\n", {}, [(221, "", ("bye",))], None, 0),
    ("two replies", b"220 hi\r\n250 ok\r\n", {}, [(220, "", ("hi",)), (250, "", ("ok",))], None, 0),
    ("enhanced code", b"250 2.1.0 Sender ok\r\n", {}, [(250, "2.1.0", ("Sender ok",))], None, 0),
    (
        "enhanced code on every line is removed from each",
        b"550-5.1.1 No such\r\n550-5.1.1\r\n550 5.1.1 user\r\n",
        {},
        [(550, "5.1.1", ("No such", "", "user"))],
        None,
        0,
    ),
    (
        "only the first line's code counts; other codes stay in the text",
        b"250-2.1.0 a\r\n250 2.1.5 b\r\n",
        {},
        [(250, "2.1.0", ("a", "2.1.5 b"))],
        None,
        0,
    ),
    (
        "no enhanced code on the first line: none at all",
        b"250-hello\r\n250 2.1.0 x\r\n",
        {},
        [(250, "", ("hello", "2.1.0 x"))],
        None,
        0,
    ),
    ("enhanced code alone", b"250 2.1.0\r\n", {}, [(250, "2.1.0", ("",))], None, 0),
    ("largest enhanced code", b"450 4.999.999 x\r\n", {}, [(450, "4.999.999", ("x",))], None, 0),
    (
        "class must match the reply code",
        b"250 5.1.1 x\r\n",
        {},
        [(250, "", ("5.1.1 x",))],
        None,
        0,
    ),
    ("3xx has no enhanced class", b"354 2.0.0 go\r\n", {}, [(354, "", ("2.0.0 go",))], None, 0),
    ("no separator after the code", b"250 2.1.0x\r\n", {}, [(250, "", ("2.1.0x",))], None, 0),
    ("tab is not a separator", b"250 2.1.0\tx\r\n", {}, [(250, "", ("2.1.0\tx",))], None, 0),
    ("four-digit subject", b"250 2.1000.0 x\r\n", {}, [(250, "", ("2.1000.0 x",))], None, 0),
    ("four-digit detail", b"250 2.1.0000 x\r\n", {}, [(250, "", ("2.1.0000 x",))], None, 0),
    ("missing detail", b"250 2.1. x\r\n", {}, [(250, "", ("2.1. x",))], None, 0),
    (
        "a prefix of the code on a later line stays",
        b"250-2.1.0 a\r\n250 2.1.00 b\r\n",
        {},
        [(250, "2.1.0", ("a", "2.1.00 b"))],
        None,
        0,
    ),
    (
        "controls become ?, TAB stays",
        b"250 a\x00b\x7fc\td\re\x1b\r\n",
        {},
        [(250, "", ("a?b?c\td?e?",))],
        None,
        0,
    ),
    ("CR CR LF: one CR is text", b"250 x\r\r\n", {}, [(250, "", ("x?",))], None, 0),
    (
        "UTF-8, invalid octets replaced",
        b"250 caf\xc3\xa9 \xff\r\n",
        {},
        [(250, "", ("caf\u00e9 \ufffd",))],
        None,
        0,
    ),
    ("not a code", b"hello\r\n", {}, [], MALFORMED, 7),
    ("empty line", b"\r\n", {}, [], MALFORMED, 2),
    ("two digits", b"25\r\n", {}, [], MALFORMED, 4),
    ("first digit 6", b"600 x\r\n", {}, [], MALFORMED, 7),
    ("first digit 1", b"150 x\r\n", {}, [], MALFORMED, 7),
    ("second digit 6", b"260 x\r\n", {}, [], MALFORMED, 7),
    ("third digit a letter", b"25a x\r\n", {}, [], MALFORMED, 7),
    ("fourth character", b"250x\r\n", {}, [], MALFORMED, 6),
    ("tab after the code", b"250\tx\r\n", {}, [], MALFORMED, 7),
    ("mismatched codes", b"250-a\r\n251 b\r\n", {}, [], MISMATCH, 14),
    (
        "replies before a broken line come out first",
        b"220 ok\r\nxyz\r\n250 never\r\n",
        {},
        [(220, "", ("ok",))],
        MALFORMED,
        5,
    ),
    ("incomplete reply waits", b"250-a\r\n250 b", {}, [], None, 12),
    (
        "bytes after a reply are buffered",
        b"220 Ready\r\nEVIL",
        {},
        [(220, "", ("Ready",))],
        None,
        4,
    ),
    (
        "max_lines lines are fine",
        b"250-a\r\n250-b\r\n250 c\r\n",
        {"max_lines": 3},
        [(250, "", ("a", "b", "c"))],
        None,
        0,
    ),
    ("one line more", b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n", {"max_lines": 3}, [], TOO_MANY, 28),
    (
        "max_lines counts per reply",
        b"250-a\r\n250 b\r\n250-c\r\n250 d\r\n",
        {"max_lines": 2},
        [(250, "", ("a", "b")), (250, "", ("c", "d"))],
        None,
        0,
    ),
    (
        "max_line octets are fine",
        b"250 123456\r\n",
        {"max_line": 10},
        [(250, "", ("123456",))],
        None,
        0,
    ),
    ("one octet more", b"250 1234567\r\n", {"max_line": 10}, [], TOO_LONG, 11),
    (
        "a bare CR before CRLF counts",
        b"250 12345\r\r\n",
        {"max_line": 10},
        [(250, "", ("12345?",))],
        None,
        0,
    ),
    ("too long with bare LF", b"250 1234567\n", {"max_line": 10}, [], TOO_LONG, 11),
    ("partial line at the limit waits", b"250 123456", {"max_line": 10}, [], None, 10),
    ("partial line at the limit plus CR waits", b"250 123456\r", {"max_line": 10}, [], None, 11),
    ("partial line over the limit fails", b"250 1234567", {"max_line": 10}, [], TOO_LONG, 11),
    (
        "a too-long line after a reply and a line",
        b"250 ok\r\n250-a\r\n250 1234567",
        {"max_line": 10},
        [(250, "", ("ok",))],
        TOO_LONG,
        18,
    ),
    ("too long beats malformed", b"xxxxxxxxxxxx\r\n", {"max_line": 10}, [], TOO_LONG, 11),
]


@pytest.mark.parametrize(
    ("wire", "limits", "replies", "error", "buffered"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_table_in_every_chunking(
    impl: Any,
    wire: bytes,
    limits: dict[str, int],
    replies: list[tuple[Any, ...]],
    error: str | None,
    buffered: int,
) -> None:
    for chunks in chunkings(wire):
        assert feed(impl, chunks, **limits) == (replies, error, buffered), chunks


def test_reply_attributes(impl: Any) -> None:
    parser = impl.ReplyParser()
    parser.push(b"550-5.1.1 No such\r\n550 5.1.1 user here\r\n")
    reply = parser.pop_reply()
    assert (reply.code, reply.enhanced, reply.lines) == (550, "5.1.1", ["No such", "user here"])
    assert reply.text == "No such\nuser here"
    assert reply.astuple() == (550, "5.1.1", ("No such", "user here"))
    assert reply == impl.Reply(550, "5.1.1", ["No such", "user here"])
    assert reply != impl.Reply(550, "5.1.1", ["No such"])
    assert reply != impl.Reply(551, "5.1.1", ["No such", "user here"])
    assert reply != (550, "5.1.1", ("No such", "user here"))
    assert repr(reply) == "Reply(550, '5.1.1', ['No such', 'user here'])"
    with pytest.raises(TypeError):
        hash(reply)
    assert parser.pop_reply() is None


def test_ehlo_byte_at_a_time(impl: Any) -> None:
    wire = (
        b"250-mx.example.com greets you\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n"
        b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n"
    )
    parser = impl.ReplyParser()
    for i in range(len(wire) - 1):
        parser.push(wire[i : i + 1])
        assert parser.pop_reply() is None
        assert parser.buffered == i + 1
    parser.push(wire[-1:])
    reply = parser.pop_reply()
    assert reply.code == 250
    assert reply.lines[0] == "mx.example.com greets you"
    assert reply.lines[-1] == "CHUNKING"
    assert len(reply.lines) == 7
    assert parser.buffered == 0


def test_dead_parser_raises_the_same_error_again(impl: Any) -> None:
    parser = impl.ReplyParser()
    parser.push(b"250 ok\r\n250-a\r\n251 b\r\n")
    assert parser.pop_reply() == impl.Reply(250, "", ["ok"])
    with pytest.raises(ReplyError) as first:
        parser.pop_reply()
    assert first.value.text == MISMATCH
    held = parser.buffered
    assert held == 14
    parser.push(b"250 fine\r\n")  # discarded
    assert parser.buffered == held
    for _ in range(3):
        with pytest.raises(ReplyError) as again:
            parser.pop_reply()
        assert again.value == first.value


def test_huge_line_is_not_buffered(impl: Any) -> None:
    parser = impl.ReplyParser(max_line=100)
    parser.push(b"250 ")
    for _ in range(2000):
        parser.push(b"x" * 7)
        assert parser.buffered <= 101
    with pytest.raises(ReplyError, match=TOO_LONG):
        parser.pop_reply()
    whole = impl.ReplyParser(max_line=100)
    whole.push(b"250 " + b"y" * 1_000_000)
    assert whole.buffered <= 101
    with pytest.raises(ReplyError, match=TOO_LONG):
        whole.pop_reply()


def test_endless_continuation_hits_max_lines(impl: Any) -> None:
    parser = impl.ReplyParser(max_lines=50)
    for _ in range(1000):
        parser.push(b"250-more\r\n")
        assert parser.buffered <= 51 * 10  # at most max_lines + 1 lines are ever held
    with pytest.raises(ReplyError, match=TOO_MANY):
        parser.pop_reply()


def test_starttls_injection_is_visible(impl: Any) -> None:
    # RFC 3207 §4.2: the client must see bytes that came after the 220.
    parser = impl.ReplyParser()
    parser.push(b"220 2.0.0 Ready to start TLS\r\n250 injected\r\n")
    assert parser.pop_reply() == impl.Reply(220, "2.0.0", ["Ready to start TLS"])
    assert parser.buffered == 14
    garbage = impl.ReplyParser()
    garbage.push(b"220 go\r\n\x16\x03\x01junk\r\n")
    assert garbage.pop_reply().code == 220
    assert garbage.buffered == 9


def test_push_needs_bytes_and_limits_are_checked(impl: Any) -> None:
    parser = impl.ReplyParser()
    with pytest.raises(TypeError):
        parser.push("250 ok\r\n")
    with pytest.raises(TypeError):
        parser.push(bytearray(b"250 ok\r\n"))
    parser.push(b"")
    assert parser.pop_reply() is None
    with pytest.raises(ValueError):
        impl.ReplyParser(max_line=-1)
    with pytest.raises(ValueError):
        impl.ReplyParser(max_lines=-1)


FORMAT_CASES = [
    (250, "", ["OK"], b"250 OK\r\n"),
    (250, "", ["first", "last"], b"250-first\r\n250 last\r\n"),
    (250, "2.1.0", ["first", "last"], b"250-2.1.0 first\r\n250 2.1.0 last\r\n"),
    (250, "2.1.0", [""], b"250 2.1.0\r\n"),
    (250, "", [""], b"250 \r\n"),
    (354, "", ["Start mail input"], b"354 Start mail input\r\n"),
    (554, "5.7.1", ["caf\u00e9"], "554 5.7.1 caf\u00e9\r\n".encode()),
    (200, "", ["x"], b"200 x\r\n"),
    (559, "5.999.999", ["x"], b"559 5.999.999 x\r\n"),
]


@pytest.mark.parametrize(("code", "enhanced", "lines", "wire"), FORMAT_CASES)
def test_format_reply(impl: Any, code: int, enhanced: str, lines: list[str], wire: bytes) -> None:
    assert impl.format_reply(code, enhanced, lines) == wire
    parser = impl.ReplyParser()
    parser.push(wire)
    assert parser.pop_reply() == impl.Reply(code, enhanced, lines)


@pytest.mark.parametrize(
    ("code", "enhanced", "lines"),
    [
        (199, "", ["x"]),
        (600, "", ["x"]),
        (360, "", ["second digit 6"]),
        (299, "", ["second digit 9"]),
        ("250", "", ["x"]),
        (250.0, "", ["x"]),
        (True, "", ["x"]),
        (250, "", ["a\rb"]),
        (250, "", ["ok", "a\nb"]),
        (250, "", ["a\0b"]),
        (250, "", []),
        (250, "5.1.1", ["class mismatch"]),
        (354, "2.0.0", ["3xx has no class"]),
        (250, "2.1", ["short"]),
        (250, "2.1.0 ", ["trailing space"]),
        (250, "2.1.0000", ["long detail"]),
        (250, "\u0662.1.0", ["non-ASCII digit"]),
        (250, "", ["\ud800"]),
    ],
)
def test_format_reply_rejects(impl: Any, code: Any, enhanced: str, lines: list[str]) -> None:
    with pytest.raises(ValueError):
        impl.format_reply(code, enhanced, lines)


def test_format_reply_types(impl: Any) -> None:
    with pytest.raises(TypeError):
        impl.format_reply(250, None, ["x"])
    with pytest.raises(TypeError):
        impl.format_reply(250, "", [b"x"])


@needs_both
def test_results_compare_across_implementations() -> None:
    (_, py), (_, c) = IMPLS
    assert py.Reply(250, "", ["a"]) == c.Reply(250, "", ["a"])
    assert c.Reply(250, "", ["a"]) == py.Reply(250, "", ["a"])
    assert c.Reply(250, "", ["a"]) != py.Reply(250, "", ["b"])
    assert repr(py.Reply(250, "2.0.0", ["a"])) == repr(c.Reply(250, "2.0.0", ["a"]))


def test_selector_exports() -> None:
    assert reply_module.__all__ == ["Reply", "ReplyParser", "format_reply"]
    assert reply_module.COMPILED == BOTH
    module = IMPLS[-1][1]
    for name in reply_module.__all__:
        assert getattr(reply_module, name) is getattr(module, name)


# --- properties ---------------------------------------------------------------------------

TOKENS = [
    b"250",
    b"550",
    b"220",
    b"354",
    b"-",
    b" ",
    b"\r\n",
    b"\n",
    b"\r",
    b"2.1.0",
    b"5.1.1",
    b"5.1.1 ",
    b"2.",
    b"ok",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"\t",
    b"x" * 9,
]
reply_bytes = st.one_of(
    st.binary(max_size=120),
    st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join),
)
limits = st.fixed_dictionaries({"max_line": st.integers(0, 24), "max_lines": st.integers(0, 5)})


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random points (some chunks may be empty)."""
    points = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return split_at(data, tuple(sorted(points)))


def trace(impl: Any, chunks: list[bytes], limits: dict[str, int]) -> list[Any]:
    """Everything observable, step by step: replies, errors (class and text), buffered."""
    parser = impl.ReplyParser(**limits)
    events: list[Any] = []
    for chunk in chunks:
        parser.push(chunk)
        while True:
            try:
                got = parser.pop_reply()
            except Exception as exc:  # the class is part of what must agree
                events.append((type(exc), getattr(exc, "text", None), parser.buffered))
                break
            if got is None:
                break
            events.append(got.astuple())
        events.append(parser.buffered)
    return events


def outcome(events: list[Any]) -> list[Any]:
    """What must not depend on where the chunks were cut: the replies, then the first
    error (class and text), then buffered once everything was pushed."""
    seen: list[Any] = []
    for event in events:
        if isinstance(event, tuple):
            if isinstance(event[0], type):
                seen.append(event[:2])
                break
            seen.append(event)
    return [*seen, events[-1] if events else 0]


@fixture_ok
@given(data=st.data(), wire=reply_bytes, lim=limits)
def test_chunking_does_not_matter(
    impl: Any, data: st.DataObject, wire: bytes, lim: dict[str, int]
) -> None:
    whole = outcome(trace(impl, [wire], lim))
    assert outcome(trace(impl, data.draw(cut(wire)), lim)) == whole
    assert outcome(trace(impl, [wire[i : i + 1] for i in range(len(wire))], lim)) == whole


@needs_both
@given(data=st.data(), wire=reply_bytes, lim=limits)
def test_both_implementations_agree(data: st.DataObject, wire: bytes, lim: dict[str, int]) -> None:
    (_, py), (_, c) = IMPLS
    chunks = data.draw(cut(wire))
    assert trace(py, chunks, lim) == trace(c, chunks, lim)
    assert trace(py, [wire], lim) == trace(c, [wire], lim)


@needs_both
@given(wire=reply_bytes, lim=limits)
def test_both_implementations_agree_byte_at_a_time(wire: bytes, lim: dict[str, int]) -> None:
    (_, py), (_, c) = IMPLS
    chunks = [wire[i : i + 1] for i in range(len(wire))]
    assert trace(py, chunks, lim) == trace(c, chunks, lim)


text_line = st.text(
    alphabet=st.characters(
        codec="utf-8",  # no lone surrogates
        exclude_characters="".join(map(chr, [*range(0x20), 0x7F])),
    ),
    max_size=20,
)


@st.composite
def valid_reply(draw: st.DrawFn) -> tuple[int, str, list[str]]:
    code = draw(st.integers(200, 599).filter(lambda c: c // 10 % 10 <= 5))
    enhanced = ""
    if code // 100 != 3 and draw(st.booleans()):
        enhanced = "{}.{}.{}".format(
            code // 100,
            draw(st.from_regex(r"\A[0-9]{1,3}\Z")),
            draw(st.from_regex(r"\A[0-9]{1,3}\Z")),
        )
    lines = draw(st.lists(text_line, min_size=1, max_size=5))
    if not enhanced and re.match(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |\Z)", lines[0]):
        # A first line that opens with a status would be read back as the enhanced code
        # (when its class fits): not a valid input for the round trip.
        lines[0] = "x" + lines[0]
    return code, enhanced, lines


@fixture_ok
@given(parts=valid_reply(), data=st.data())
def test_format_then_parse_round_trips(
    impl: Any, parts: tuple[int, str, list[str]], data: st.DataObject
) -> None:
    code, enhanced, lines = parts
    wire = impl.format_reply(code, enhanced, lines)
    parser = impl.ReplyParser(max_line=10_000)
    for chunk in data.draw(cut(wire)):
        parser.push(chunk)
    assert parser.pop_reply() == impl.Reply(code, enhanced, lines)
    assert parser.pop_reply() is None
    assert parser.buffered == 0

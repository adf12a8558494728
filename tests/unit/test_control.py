"""The control channel's sans-I/O half: request framing and parsing, no sockets."""

from __future__ import annotations

import orjson
import pytest

from engine.ops.control import (
    COMMANDS,
    MAX_IDS,
    MAX_REQUEST,
    ControlError,
    LineReader,
    Request,
    encode_reply,
    parse_request,
)
from engine.testing.chunkings import chunkings


def feed_all(reader: LineReader, chunks: list[bytes]) -> list[bytes | None]:
    return [line for chunk in chunks for line in reader.feed(chunk)]


def test_lines_in_any_chunking() -> None:
    stream = b'{"command":"stats"}\r\n\n{"command":"suspended"}\n  \npartial'
    expected = [b'{"command":"stats"}', b'{"command":"suspended"}']
    for chunks in chunkings(stream):
        assert feed_all(LineReader(), chunks) == expected


def test_an_over_long_line_is_reported_once_and_not_buffered() -> None:
    reader = LineReader(limit=10)
    out = feed_all(reader, [b"x" * 8, b"y" * 8, b"z" * 100, b"tail\nok\n"])
    assert out == [None, b"ok"]
    assert len(reader._buf) == 0
    assert reader.feed(b"0123456789A\n") == [None]  # over the limit within one feed


@pytest.mark.parametrize(("line", "parsed"), [
    (b'{"command": "stats"}', Request("stats")),
    (b'{"command": "suspended"}', Request("suspended")),
    (b'{"command": "suspend", "destination": " Example.COM "}',
     Request("suspend", "Example.COM")),
    (b'{"command": "resume", "destination": "[IPv6:::1]"}', Request("resume", "[IPv6:::1]")),
    # Ids in any case, with spaces around; a repeated id is asked about once.
    (b'{"command": "hold", "ids": ["' + b"ab" * 12 + b'", " ' + b"AB" * 12 + b' ", "'
     + b"01" * 12 + b'"]}', Request("hold", ids=(b"\xab" * 12, b"\x01" * 12))),
    (b'{"command": "remove", "ids": ["' + b"01" * 12 + b'"], "report": true}',
     Request("remove", ids=(b"\x01" * 12,), report=True)),
    (b'{"command": "remove", "ids": ["' + b"01" * 12 + b'"]}',
     Request("remove", ids=(b"\x01" * 12,))),
    (b'{"command": "retry", "destination": "example.com"}', Request("retry", "example.com")),
    (b'{"command": "retry", "ids": ["' + b"01" * 12 + b'"]}',
     Request("retry", ids=(b"\x01" * 12,))),
])
def test_good_requests(line: bytes, parsed: Request) -> None:
    assert parse_request(line) == parsed


@pytest.mark.parametrize(("line", "words"), [
    (b"suspend example.com", "not JSON"),
    (b'{"command": "suspend"', "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"stats"', "must be a JSON object"),
    (b"{}", '"command" (a string) is required; one of alerts, hold, metrics, queues, release, '
            "reload, remove, resume, retry, stats, suppress, suppressions, suspend, "
            "suspended, unsuppress"),
    (b'{"command": 5}', '"command" (a string) is required'),
    (b'{"command": "flush"}', 'unknown command "flush"; one of alerts, hold, metrics, queues'),
    (b'{"command": "suspend"}', 'suspend: "destination" is required'),
    (b'{"command": "suspend", "destination": 5}', '"destination" must be a string'),
    (b'{"command": "suspend", "destination": "  "}', "must not be empty"),
    (b'{"command": "suspend", "destination": "a b"}', "spaces or control characters"),
    (b'{"command": "suspend", "destination": "a\\r\\nb"}', "spaces or control characters"),
    (b'{"command": "resume", "destination": "' + b"x" * 301 + b'"}', "longer than 300"),
    (b'{"command": "stats", "destination": "x"}', 'stats: unknown field "destination"'),
    (b'{"command": "suspend", "destination": "x", "all": true}', 'unknown field "all"'),
    (b'{"command": "hold"}', 'hold: "ids" is required'),
    (b'{"command": "hold", "ids": []}', '"ids" must be a list of queue ids'),
    (b'{"command": "hold", "ids": "0190"}', '"ids" must be a list of queue ids'),
    (b'{"command": "hold", "ids": [5]}', '"ids" must be a list of queue ids'),
    (b'{"command": "hold", "ids": ["0190"]}', 'not a queue id: "0190"'),
    (b'{"command": "hold", "ids": ["' + b"A" * 24 + b'"], "report": true}',
     'hold: unknown field "report"'),
    (b'{"command": "remove", "ids": ["' + b"A" * 24 + b'"], "report": 1}',
     '"report" must be true or false'),
    (b'{"command": "retry"}', 'retry: "destination" or "ids" is required'),
    (b'{"command": "retry", "destination": "x", "ids": ["' + b"A" * 24 + b'"]}',
     '"destination" or "ids", not both'),
    (b'{"command": "release", "destination": "x"}', 'unknown field "destination"'),
    (b'{"command": "reload", "file": "/etc/passwd"}', 'reload: unknown field "file"'),
    (orjson.dumps({"command": "hold", "ids": ["A" * 24] * (MAX_IDS + 1)}),
     f"at most {MAX_IDS} per request"),
])
def test_bad_requests_say_what_is_wrong(line: bytes, words: str) -> None:
    with pytest.raises(ControlError) as caught:
        parse_request(line)
    assert words in str(caught.value)


def test_echoed_values_are_quoted_and_short() -> None:
    with pytest.raises(ControlError) as caught:
        parse_request(orjson.dumps({"command": "x\r\n" + "y" * 500}))
    text = str(caught.value)
    # The value is cut to 60 characters; the rest is the list of commands.
    assert "\r" not in text and "\n" not in text and len(text) < 240


def test_a_request_with_the_most_ids_fits_in_a_line() -> None:
    line = orjson.dumps({"command": "remove", "ids": ["AB" * 12] * MAX_IDS, "report": True})
    assert len(line) < MAX_REQUEST


def test_replies_are_one_line_each() -> None:
    reply = encode_reply({"ok": False, "error": "a\nb"})
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert orjson.loads(reply) == {"ok": False, "error": "a\nb"}


def test_every_command_is_documented_with_a_help_text() -> None:
    assert set(COMMANDS) == {"suspend", "resume", "suspended", "stats", "queues", "hold",
                             "release", "remove", "retry", "reload", "suppress",
                             "unsuppress", "suppressions", "metrics", "alerts"}
    assert all(spec.help for spec in COMMANDS.values())
    assert MAX_REQUEST >= 1024


def test_only_a_trusted_peer_names_the_operator() -> None:
    from engine.ops.control import operator

    claimed = parse_request(b'{"command": "suspended", "by": "alice"}')
    assert claimed.by == "alice"
    assert operator(claimed, "ferry", trusted=True) == "alice"
    with pytest.raises(ControlError, match="only a node's supervisor names the operator"):
        operator(claimed, "mallory", trusted=False)
    plain = parse_request(b'{"command": "suspended"}')
    assert operator(plain, "bob", trusted=False) == "bob"
    assert operator(plain, "", trusted=True) == "unknown"
    for bad in (b'5', b'"a\\nb"', b'"' + b"x" * 65 + b'"'):
        with pytest.raises(ControlError, match='"by" must be a name'):
            parse_request(b'{"command": "suspended", "by": ' + bad + b"}")

"""The protocol log on a real file system: line format, sanitising (Hypothesis on arbitrary
bytes, checked lossless by an independent unescaper), AUTH redaction, buffering, rotation,
the switched-off log, and I/O trouble (missing, removed or full disk) that never raises."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.ops import _logline_py, logline, protolog
from engine.ops._logline_py import CRLF_LINES, LF_LINES, ONE, stamp_end
from engine.ops.protolog import (
    FLUSH_BYTES,
    GENERATIONS,
    MAX_TEXT,
    ProtocolLog,
    format_timestamp,
    sanitise,
)
from engine.testing.clock import ManualClock
from engine.testing.wait import until, wait_for

LINE = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\t([^\t]*)\t([^\t]*)\t([<>*])\t([^\t]*)"
)
ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|(.))", re.S)
SIMPLE = {"t": b"\t", "n": b"\n", "r": b"\r", "\\": b"\\"}
# Characters that must never reach a log line raw.
FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def unescape(text: str) -> bytes:
    """Independent inverse of the documented escaping: \\xNN raw byte, \\uNNNN code point."""
    out = bytearray()
    pos = 0
    for m in ESCAPE.finditer(text):
        out += text[pos : m.start()].encode()
        if m.group(1):
            out.append(int(m.group(1), 16))
        elif m.group(2):
            out += chr(int(m.group(2), 16)).encode("utf-8", "surrogatepass")
        else:
            out += SIMPLE[m.group(3)]  # KeyError: an escape the docs do not define
        pos = m.end()
    out += text[pos:].encode()
    return bytes(out)


def lines_of(path: Path) -> list[tuple[str, ...]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    rows = []
    for raw in data.decode("utf-8").split("\n")[:-1]:
        m = LINE.fullmatch(raw)
        assert m is not None, raw
        rows.append(m.groups())
    return rows


def texts(path: Path) -> list[str]:
    return [row[4] for row in lines_of(path)]


# --- format ------------------------------------------------------------------------------


def test_line_format_directions_and_reply_lines(tmp_path: Path) -> None:
    before = time.time()
    with ProtocolLog(tmp_path, "default") as log:
        assert log.enabled and log.path == tmp_path / "protocol-default.log"
        s = log.session("S1", "192.0.2.7:41000")
        s.event("connect")
        s.send(b"220 mx.test ESMTP\r\n")
        s.recv(b"EHLO client.test\r\n")
        s.send(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
        s.recv(b"QUIT")
        s.event("disconnect: quit")
    after = time.time()
    rows = lines_of(tmp_path / "protocol-default.log")
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        ("S1", "192.0.2.7:41000", "*", "connect"),
        ("S1", "192.0.2.7:41000", ">", "220 mx.test ESMTP"),
        ("S1", "192.0.2.7:41000", "<", "EHLO client.test"),
        ("S1", "192.0.2.7:41000", ">", "250-mx.test"),
        ("S1", "192.0.2.7:41000", ">", "250-PIPELINING"),
        ("S1", "192.0.2.7:41000", ">", "250 SIZE 1000"),
        ("S1", "192.0.2.7:41000", "<", "QUIT"),
        ("S1", "192.0.2.7:41000", "*", "disconnect: quit"),
    ]
    for row in rows:
        stamp = datetime.strptime(row[0], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        assert math.floor(before * 1000) / 1000 <= stamp <= after
    assert log.dropped == 0 and not log.enabled


def test_file_mode_is_0640(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ProtocolLog(tmp_path, "m").close()
    finally:
        os.umask(old)
    assert (tmp_path / "protocol-m.log").stat().st_mode & 0o777 == 0o640


def test_format_timestamp() -> None:
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(1714566896.789) == "2024-05-01T12:34:56.789Z"
    # Truncated, never rounded into the next second.
    assert format_timestamp(math.nextafter(2.0, 0.0)) == "1970-01-01T00:00:01.999Z"
    assert format_timestamp(1.0005) == "1970-01-01T00:00:01.000Z"


def test_session_id_and_client_cannot_forge_fields(tmp_path: Path) -> None:
    with ProtocolLog(tmp_path, "c") as log:
        log.session("S\t2\n", "a\tb").recv(b"NOOP")
    (row,) = lines_of(tmp_path / "protocol-c.log")
    assert row[1:] == ("S\\t2\\n", "a\\tb", "<", "NOOP")


def test_connector_name_must_be_a_plain_file_name(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "", ".hidden", "a\x00b"):
        with pytest.raises(ValueError):
            ProtocolLog(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


# --- sanitising --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"MAIL FROM:<a@b.test>", "MAIL FROM:<a@b.test>"),
        (b"a\r\nb", "a\\r\\nb"),
        (b"nul\x00", "nul\\x00"),
        (b"t\tab", "t\\tab"),
        (b"esc\x1b[2J", "esc\\x1b[2J"),
        (b"del\x7f", "del\\x7f"),
        (b"back\\slash", "back\\\\slash"),
        (b"\xff\xfe", "\\xff\\xfe"),
        ("caf\u00e9".encode(), "caf\u00e9"),
        (b"nel\xc2\x85", "nel\\u0085"),
        ("ls\u2028ps\u2029".encode(), "ls\\u2028ps\\u2029"),
        ("rlo\u202e".encode(), "rlo\\u202e"),
        ("dots\u2026".encode(), "dots\\u2026"),
        (b"\xe2\x80", "\\xe2\\x80"),  # a cut UTF-8 sequence is raw bytes
    ],
)
def test_sanitise_table(raw: bytes, shown: str) -> None:
    assert sanitise(raw) == shown
    assert unescape(shown) == raw


def test_truncation_keeps_whole_escapes() -> None:
    assert sanitise(b"a" * MAX_TEXT) == "a" * MAX_TEXT
    cut = sanitise(b"a" * (MAX_TEXT + 1))
    assert len(cut) == MAX_TEXT and cut == "a" * (MAX_TEXT - 1) + "\u2026"
    cut = sanitise(b"\x00" * MAX_TEXT)
    assert cut == "\\x00" * ((MAX_TEXT - 1) // 4) + "\u2026"
    cut = sanitise(b"ab" + "\u2028".encode() * 500)
    assert cut.endswith("\u2026") and len(cut) <= MAX_TEXT
    assert unescape(cut[:-1]) == b"ab" + "\u2028".encode() * ((MAX_TEXT - 3) // 6)
    assert sanitise("e" * 5000) == "e" * (MAX_TEXT - 1) + "\u2026"
    assert sanitise(b"x" * 100_000) == "x" * (MAX_TEXT - 1) + "\u2026"


def check_field(raw: bytes, text: str) -> None:
    assert FORBIDDEN.search(text) is None
    assert len(text) <= MAX_TEXT
    if text.endswith("\u2026"):
        # Truncated: what is shown is an exact prefix of what was sent.
        assert raw.startswith(unescape(text[:-1]))
        assert len(unescape(text[:-1])) < len(raw)
    else:
        assert unescape(text) == raw


@given(st.binary(max_size=3000))
def test_sanitise_is_lossless_and_safe_on_any_bytes(raw: bytes) -> None:
    check_field(raw, sanitise(raw))


@given(st.lists(st.binary(max_size=1200), min_size=1, max_size=5))
def test_any_received_bytes_make_exactly_one_line_each(chunks: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        log = ProtocolLog(Path(d), "h")
        session = log.session("S", "c")
        for raw in chunks:
            session.recv(raw)
        log.close()
        data = (Path(d) / "protocol-h.log").read_bytes()
    text = data.decode("utf-8")
    # splitlines() knows more line breaks than LF; none of them may appear inside a line.
    assert len(text.splitlines()) == len(chunks) == data.count(b"\n")
    for raw, line in zip(chunks, text.split("\n"), strict=False):
        m = LINE.fullmatch(line)
        assert m is not None
        check_field(raw.removesuffix(b"\r\n"), m.group(5))


@given(st.text(max_size=1500))
def test_any_event_text_makes_one_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        log = ProtocolLog(Path(d), "e")
        log.session("S", "c").event(text)  # lone surrogates included: must not raise
        log.close()
        data = (Path(d) / "protocol-e.log").read_bytes()
    assert data.count(b"\n") == 1 and len(data.decode().splitlines()) == 1
    m = LINE.fullmatch(data.decode()[:-1])
    assert m is not None
    shown = m.group(5)
    assert FORBIDDEN.search(shown) is None and len(shown) <= MAX_TEXT
    if not shown.endswith("\u2026"):
        assert unescape(shown) == text.encode("utf-8", "surrogatepass")


# --- secrets -----------------------------------------------------------------------------


def test_auth_payloads_are_never_written(tmp_path: Path) -> None:
    with ProtocolLog(tmp_path, "auth") as log:
        s = log.session("S", "c")
        s.recv(b"AUTH PLAIN dGVzdABzZWNyZXQ=\r\n", secret=True)
        s.recv(b"auth login\r\n", secret=True)
        s.send(b"334 VXNlcm5hbWU6\r\n")
        s.recv(b"c2VjcmV0dXNlcg==\r\n", secret=True)
        s.redact_next()
        s.recv(b"c2VjcmV0cGFzcw==\r\n")
        s.recv(b"AUTH PLAIN =", secret=True)
        s.recv(b"AUTH c2VjcmV0bWVjaA", secret=True)  # credentials where the mechanism goes
        s.recv(b"AUTH SCRAM-SHA-256 biwsbj11c2VyLHI9", secret=True)
        s.recv(b"NOOP")  # redact_next covered one line only
    path = tmp_path / "protocol-auth.log"
    assert texts(path) == [
        "AUTH PLAIN ****",
        "AUTH LOGIN",
        "334 VXNlcm5hbWU6",
        "****",
        "****",
        "AUTH PLAIN ****",
        "AUTH ****",
        "AUTH SCRAM-SHA-256 ****",
        "NOOP",
    ]
    for secret in (b"dGVzdABzZWNyZXQ", b"c2VjcmV0", b"biwsbj11"):
        assert secret not in path.read_bytes()


@given(st.binary(max_size=300))
def test_any_secret_line_shows_at_most_verb_and_known_mechanism(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        log = ProtocolLog(Path(d), "s")
        log.session("S", "c").recv(raw, secret=True)
        log.close()
        (text,) = texts(Path(d) / "protocol-s.log")
    m = re.fullmatch(r"\*\*\*\*|AUTH( \*\*\*\*|( [A-Z0-9-]+)( \*\*\*\*)?)?", text)
    assert m is not None, text
    if m.group(2):
        assert m.group(2)[1:].encode() == raw.split()[1].upper()


# --- buffering and rotation --------------------------------------------------------------


def test_buffered_until_flush_or_64k(tmp_path: Path) -> None:
    path = tmp_path / "protocol-b.log"
    log = ProtocolLog(tmp_path, "b", flush_interval=3600)
    s = log.session("S", "c")
    s.recv(b"NOOP")
    assert path.read_bytes() == b""
    log.sync()
    assert texts(path) == ["NOOP"]
    line = b"X" * 900
    n = FLUSH_BYTES // len(line) + 1  # the last one takes the buffer past FLUSH_BYTES
    for _ in range(n):
        s.recv(line)
    # Handed to the writer by size, with no flush (about FLUSH_BYTES at once), and
    # nothing lost.
    wait_for(lambda: path.stat().st_size >= FLUSH_BYTES - 2 * len(line), 10,
             "the lines handed over by size")
    log.close()
    assert len(texts(path)) == n + 1


def test_flushes_when_interval_has_passed(tmp_path: Path) -> None:
    path = tmp_path / "protocol-i.log"
    clock = ManualClock()
    log = ProtocolLog(tmp_path, "i", flush_interval=0.5, clock=clock)
    s = log.session("S", "c")
    s.recv(b"ONE")
    clock.advance(0.25)
    s.recv(b"TWO")
    protolog._WRITER.sync()  # whatever was handed over is written by now
    assert texts(path) == []  # within the interval: still buffered, not handed over
    clock.advance(0.25)
    s.recv(b"THREE")
    wait_for(lambda: texts(path) == ["ONE", "TWO", "THREE"], 10, "the flush by time")
    log.close()


def test_run_flusher(tmp_path: Path) -> None:
    path = tmp_path / "protocol-r.log"
    log = ProtocolLog(tmp_path, "r", flush_interval=0.02)

    async def go() -> list[str]:
        task = asyncio.create_task(log.run_flusher())
        log.session("S", "c").recv(b"HELO x")
        # Flushed by the flusher's clock, not by a size or a close.
        seen: list[str] = await until(lambda: texts(path), 10, "the flusher's first flush")
        log.session("S", "c").recv(b"QUIT")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(go()) == ["HELO x"]
    protolog._WRITER.sync()
    assert texts(path) == ["HELO x", "QUIT"]  # flushed on the way out
    log.close()


def test_rotation_keeps_five_generations_in_order(tmp_path: Path) -> None:
    max_bytes = 2000
    log = ProtocolLog(tmp_path, "rot", max_bytes=max_bytes)
    s = log.session("S", "c")
    total = 400
    for i in range(total):
        s.event(f"line {i:05d}")
        log.sync()
    log.close()
    base = tmp_path / "protocol-rot.log"
    files = [base.with_name(f"{base.name}.{g}") for g in range(GENERATIONS, 0, -1)] + [base]
    assert all(f.exists() for f in files)
    assert not base.with_name(f"{base.name}.{GENERATIONS + 1}").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)
    kept: list[str] = []
    for f in files:
        assert 0 < f.stat().st_size <= max_bytes
        kept += texts(f)
    # The newest lines, contiguous and in order, across the generations.
    assert kept == [f"line {i:05d}" for i in range(total - len(kept), total)]
    assert len(kept) < total and log.dropped == 0


def test_a_torn_last_line_is_ended_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "protocol-t.log"
    path.write_bytes(b"half a li")
    with ProtocolLog(tmp_path, "t") as log:
        log.session("S", "c").recv(b"RSET")
    first, second, end = path.read_bytes().split(b"\n")
    assert first == b"half a li" and second.endswith(b"\t<\tRSET") and end == b""


def test_outside_rotation_is_followed(tmp_path: Path) -> None:
    path = tmp_path / "protocol-o.log"
    with ProtocolLog(tmp_path, "o") as log:
        s = log.session("S", "c")
        s.recv(b"ONE")
        log.sync()
        path.rename(tmp_path / "moved.log")
        path.touch()  # logrotate's "create" mode: a new file at the old name
        s.recv(b"TWO")
        log.sync()
        path.rename(tmp_path / "moved2.log")  # and without a new file
        s.recv(b"THREE")
    assert texts(tmp_path / "moved.log") == ["ONE"]
    assert texts(tmp_path / "moved2.log") == ["TWO"]
    assert texts(path) == ["THREE"]


# --- switched off, closed, and I/O trouble -------------------------------------------------


def test_disabled_does_nothing_and_creates_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    log = ProtocolLog(None, "off")
    assert not log.enabled and log.path is None
    s = log.session("S1", "c")
    assert (s.session_id, s.client) == ("S1", "c")
    for _ in range(10):
        s.recv(b"EHLO x")
        s.recv(b"AUTH PLAIN x", secret=True)
        s.redact_next()
        s.send(b"250 ok\r\n")
        s.event("connect")
    log.sync()
    asyncio.run(log.run_flusher())  # returns at once
    log.close()
    assert list(tmp_path.iterdir()) == []
    assert log.dropped == 0 and log.last_error is None


def test_closed_log_counts_late_lines(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, "late")
    s = log.session("S", "c")
    s.recv(b"QUIT")
    log.close()
    log.close()
    s.event("disconnect")
    s.send(b"221 bye\r\n")
    assert log.dropped == 2
    # Several lines in one call are counted one by one.
    s.send(b"250-one\r\n250 two\r\n")
    s.recv_data(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\npartial")
    s.recv_end()
    assert log.dropped == 7
    assert texts(tmp_path / "protocol-late.log") == ["QUIT"]


@pytest.mark.parametrize("kind", ["missing", "is-a-file"])
def test_unusable_directory_does_not_raise(tmp_path: Path, kind: str) -> None:
    directory = tmp_path / "nope"
    if kind == "is-a-file":
        directory.write_bytes(b"")
    log = ProtocolLog(directory, "u")
    assert log.enabled and log.last_error is not None
    s = log.session("S", "c")
    for _ in range(3):
        s.recv(b"NOOP")
    log.sync()
    s.send(b"250 a\r\n250 b\r\n")
    log.close()
    assert log.dropped == 5


def test_removed_directory_drops_then_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log = ProtocolLog(directory, "gone")
    s = log.session("S", "c")
    s.recv(b"ONE")
    log.sync()
    shutil.rmtree(directory)
    s.recv(b"TWO")
    s.recv(b"THREE")
    log.sync()
    assert log.dropped == 2 and log.last_error is not None
    directory.mkdir()
    s.recv(b"FOUR")
    log.close()
    assert log.dropped == 2
    assert texts(directory / "protocol-gone.log") == ["FOUR"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_does_not_raise(tmp_path: Path) -> None:
    # /dev/full answers every write with ENOSPC: a real full disk, no mocks.
    (tmp_path / "protocol-full.log").symlink_to("/dev/full")
    log = ProtocolLog(tmp_path, "full", flush_interval=3600)
    assert log.last_error is None
    s = log.session("S", "c")
    s.send(b"220 hi\r\n250 ok\r\n")
    s.recv(b"NOOP")
    log.sync()
    assert log.dropped == 3 and log.last_error is not None
    for _ in range(FLUSH_BYTES // 100 + 1):
        s.recv(b"X" * 100)  # flushes by size inside recv: still no exception
    log.close()
    assert log.dropped == 3 + FLUSH_BYTES // 100 + 1


PARTIAL_WRITE = r"""
import resource, sys
from pathlib import Path
from engine.ops.protolog import ProtocolLog

# Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE is cut short and the next one
# fails with EFBIG: a real partial write, like a disk filling up mid-write.
log = ProtocolLog(Path(sys.argv[1]), "p", flush_interval=3600)
s = log.session("S", "c")
s.recv(b"FIRST")
log.sync()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (250, hard))
for i in range(5):
    s.recv(b"LOST %d" % i + b"x" * 40)
log.sync()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
s.recv(b"LAST")
log.close()
print(log.dropped)
"""


def test_partial_write_is_taken_back(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PARTIAL_WRITE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.split() == ["5"]
    assert texts(tmp_path / "protocol-p.log") == ["FIRST", "LAST"]


# --- the send side ------------------------------------------------------------------------


def test_send_side_file_name_cannot_meet_a_receive_side_one(tmp_path: Path) -> None:
    # A receive connector named "send-x" and a send connector named "x": two files.
    with ProtocolLog(tmp_path, "send-x") as recv, ProtocolLog(tmp_path, "x", side="send") as out:
        recv.session("R", "c").event("receive")
        out.session("S", "c").event("send")
    assert texts(tmp_path / "protocol-send-x.log") == ["receive"]
    assert texts(tmp_path / "send-protocol-x.log") == ["send"]


def test_sent_secrets_are_masked(tmp_path: Path) -> None:
    with ProtocolLog(tmp_path, "out", side="send") as log:
        s = log.session("S", "127.0.0.1:25")
        s.send(b"AUTH PLAIN AGFwcABzM2NyZXQ=\r\n", secret=True)
        s.send(b"AUTH LOGIN\r\n", secret=True)
        s.send(b"YXBw\r\n", secret=True)
        s.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    path = tmp_path / "send-protocol-out.log"
    assert texts(path) == ["AUTH PLAIN ****", "AUTH LOGIN", "****", "MAIL FROM:<a@b.test>",
                           "RCPT TO:<c@d.test>"]
    assert b"AGFwcABzM2NyZXQ" not in path.read_bytes() and b"YXBw" not in path.read_bytes()
    assert {row[3] for row in lines_of(path)} == {">"}


@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), min_size=1,
                max_size=6),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=8), st.booleans())
def test_received_stream_logs_the_same_lines_however_it_is_cut(
        lines: list[bytes], cuts: list[int], ended: bool) -> None:
    # A server's replies arrive in any chunking: one log line per line, as if whole; a
    # last line without its LF is logged when the stream ends.
    stream = b"".join(line + b"\r\n" for line in lines)
    if not ended:
        stream = stream[:-2]
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    with tempfile.TemporaryDirectory() as d:
        with ProtocolLog(Path(d), "cut", side="send") as log, \
                ProtocolLog(Path(d), "whole", side="send") as whole:
            s, w = log.session("S", "c"), whole.session("S", "c")
            for chunk in chunks:
                s.recv_data(chunk)
            s.recv_end()
            for line in lines:
                w.recv(line)
        got = texts(Path(d) / "send-protocol-cut.log")
        want = texts(Path(d) / "send-protocol-whole.log")
    if not ended and lines[-1] == b"":
        want.pop()  # an empty unfinished line is no line
    assert got == want


# --- buffered raw, written in chunks: the same bytes as line by line ----------------------

#: Pieces of what a session logs: the printable ASCII that SMTP mostly is, and the bytes
#: that make a chunk take the slow path (escapes, cuts, odd line ends).
_PIECE = st.sampled_from([b"250 ok", b"MAIL FROM:<a@b.test>", b" ", b"X" * 400, b"\r", b"\n",
                          b"\r\n", b"\\", b"\x00", b"\x7f", b"\xc3\xa9", b"\xe2\x80\xa8",
                          b"\xff"]) | st.binary(max_size=1)
_CHUNK = st.lists(_PIECE, max_size=12).map(b"".join)
_CALL = st.tuples(st.sampled_from(["send", "recv", "recv_data", "event"]),
                  _CHUNK,
                  # The clock's steps: nothing, a little, across a millisecond or a second.
                  st.sampled_from([0.0, 1e-7, 0.0004, 0.001, 0.9996, 1.0]))


def reference_lines(calls: list[tuple[str, bytes, float]], start: float) -> bytes:
    """What the protocol log writes, built line by line from the documented format with the
    module's own sanitise() and format_timestamp() (tested above on their own)."""
    out = []
    now = start
    partial = b""
    lines: Sequence[bytes | str]
    for op, data, step in calls:
        now += step
        stamp = format_timestamp(now)
        if op == "recv":
            lines, arrow = [data.removesuffix(b"\r\n")], "<"
        elif op == "recv_data":
            parts = (partial + data).split(b"\n")
            partial = parts.pop()[: 4 * MAX_TEXT + 8]
            lines, arrow = [p.removesuffix(b"\r") for p in parts], "<"
        elif op == "event":
            lines, arrow = [data.decode("utf-8", "replace")], "*"
        else:
            parts = data.split(b"\r\n")
            if parts and not parts[-1]:
                parts.pop()
            lines, arrow = parts, ">"
        out += [f"{stamp}\tS\tc\t{arrow}\t{sanitise(line)}\n" for line in lines]
    return "".join(out).encode("utf-8", "backslashreplace")


@settings(max_examples=300, deadline=None)
@given(st.lists(_CALL, max_size=12), st.floats(min_value=0, max_value=4e9))
# A CR or LF that does not end a line, in a chunk that is otherwise printable ASCII.
@example([("recv_data", b"250 a\rb\r\n250 ok\r\n", 0.0)], 5.0)
@example([("send", b"MAIL a\rb\r\nRCPT\r\n", 0.0), ("send", b"DATA\nx\r\n", 0.0)], 5.0)
@example([("send", b"X" * 1200 + b"\r\nok", 0.0), ("recv_data", b"Y" * 1200 + b"\n", 0.0)], 5.0)
def test_buffered_chunks_are_written_as_lines_one_by_one(
        calls: list[tuple[str, bytes, float]], start: float) -> None:
    clock = ManualClock(start)
    with tempfile.TemporaryDirectory() as d:
        log = ProtocolLog(Path(d), "r", flush_interval=3600, clock=clock)
        s = log.session("S", "c")
        for op, data, step in calls:
            clock.advance(step)
            if op == "event":
                s.event(data.decode("utf-8", "replace"))
            else:
                getattr(s, op)(data)
        log.close()
        got = (Path(d) / "protocol-r.log").read_bytes()
    assert got == reference_lines(calls, start)


@settings(max_examples=500, deadline=None)
@given(st.floats(min_value=0, max_value=4e9))
def test_a_stamp_is_reused_exactly_while_the_time_shows_the_same(t: float) -> None:
    end = stamp_end(t)
    assert end > t
    assert format_timestamp(math.nextafter(end, -math.inf)) == format_timestamp(t)
    assert format_timestamp(end) != format_timestamp(t)


def test_lines_beyond_the_writers_bound_are_dropped_not_queued(tmp_path: Path) -> None:
    # A disk that stopped answering must not make the loop wait nor memory grow.
    log = ProtocolLog(tmp_path, "m", flush_interval=3600)
    s = log.session("S", "c")
    s.send(b"250-a\r\n250 b\r\n")
    s.recv(b"NOOP")
    lines = log._buf.lines
    chunk = log._buf.take()
    writer = protolog._Writer()
    writer._pending = protolog.MAX_PENDING + 1 - len(chunk)  # a disk that stopped answering
    writer.hand_over(log, chunk, lines)
    assert log.dropped == 3
    log.close()
    assert texts(tmp_path / "protocol-m.log") == []


# --- the compiled renderer and its twin: the same bytes for any entries -------------------

_RENDERERS = _speedups.implementations("logline")
_HEAD = st.sampled_from([b"\tS\tc\t<\t", b"\tdefault-1f\t127.0.0.1\t>\t", b""])
_TEXT = st.text(max_size=40) | st.sampled_from(["connect", "message 1159 octets",
                                                 "x" * 1001, "a\\b", "\u2026", "\ud800"])
_ENTRY = st.one_of(
    st.tuples(st.just(ONE), st.binary(max_size=1) | _CHUNK | _TEXT),
    st.tuples(st.sampled_from([CRLF_LINES, LF_LINES]), _CHUNK),
    # recv_data hands over only chunks that end in LF
    st.tuples(st.just(LF_LINES), _CHUNK.map(lambda b: b + b"\n")),
)


@pytest.mark.parametrize(("impl", "module"), _RENDERERS, ids=[i for i, _ in _RENDERERS])
@settings(max_examples=300, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from([0.0, 1e-7, 0.0004, 0.001, 0.9996, 1.0]),
                                  _HEAD, _ENTRY), max_size=10),
       start=st.floats(min_value=0, max_value=4e9),
       limit=st.integers(min_value=0, max_value=400),
       due=st.sampled_from([-math.inf, 0.0, 0.001, 1.0, math.inf]))
@example(entries=[(0.0, b"\tS\tc\t<\t", (LF_LINES, b"\r\n\r\n"))], start=5.0,
         limit=1 << 20, due=math.inf)
@example(entries=[(0.0, b"", (CRLF_LINES, b"a\r\r\nb\r\n"))], start=5.0,
         limit=1 << 20, due=math.inf)
# Stamps that are not 24 characters (a year before 1000, after 9999): formatted each time.
@example(entries=[(0.0, b"", (ONE, b"x")), (0.0004, b"", (ONE, "y"))], start=-1e11,
         limit=1 << 20, due=math.inf)
@example(entries=[(0.0, b"", (ONE, b"x")), (1.0, b"", (ONE, b"y"))], start=253402300799.5,
         limit=1 << 20, due=math.inf)
def test_compiled_renderer_writes_the_twins_bytes(
        impl: str, module: ModuleType,
        entries: list[tuple[float, bytes, tuple[int, bytes | str]]],
        start: float, limit: int, due: float) -> None:
    now = start
    buffered: list[_logline_py.Entry] = []
    for step, head, (kind, data) in entries:
        now += step
        buffered.append((now, head, data, kind))
    assert module.render(buffered) == _logline_py.render(buffered)
    # The buffer the log renders into: the same size and line count as it fills, and the
    # same answer to "due to be handed over?" (by its size limit or its due time).
    mine, twin = module.Lines(limit), _logline_py.Lines(limit)
    mine.due = twin.due = start + due
    for entry in buffered:
        said = mine.add(*entry)
        assert said is twin.add(*entry)
        assert said is (mine.size >= limit or entry[0] >= start + due)
        assert (mine.size, mine.lines) == (twin.size, twin.lines)
    assert mine.take() == twin.take() == _logline_py.render(buffered)
    assert (mine.size, mine.lines) == (0, 0)


def test_the_log_renders_with_the_selected_module(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, "m", flush_interval=3600)
    assert type(log._buf) is logline.Lines
    assert _speedups.active["logline"] == logline.COMPILED
    log.close()


class _Owner:
    """What a session log needs of its ProtocolLog: a buffer, a clock, a flush that keeps
    what the buffer hands over (so both twins' hand-overs can be compared too)."""

    def __init__(self, lines: _logline_py.Lines, start: float) -> None:
        self._buf = lines
        self.now = start
        self.chunks: list[bytes] = []

    def _clock(self) -> float:
        return self.now

    def flush(self) -> None:
        self.chunks.append(self._buf.take())


_FIELD = st.text(max_size=12) | st.sampled_from(["0001abcd", "127.0.0.1:2525", "a\tb", "\\"])
_SESSION_CALL = st.one_of(
    st.tuples(st.sampled_from(["send", "recv"]), _CHUNK, st.booleans()),
    st.tuples(st.just("recv"), st.sampled_from([b"AUTH PLAIN dGVzdA==\r\n", b"AUTH LOGIN",
                                                 b"AUTH X y", b"dGVzdA=="]), st.booleans()),
    st.tuples(st.sampled_from(["recv_data"]), _CHUNK, st.just(False)),
    st.tuples(st.just("event"), _TEXT, st.just(False)),
    st.tuples(st.sampled_from(["recv_end", "redact_next"]), st.just(b""), st.just(False)),
)


@pytest.mark.parametrize(("impl", "module"), _RENDERERS, ids=[i for i, _ in _RENDERERS])
@settings(max_examples=300, deadline=None)
@given(session_id=_FIELD, client=_FIELD,
       calls=st.lists(st.tuples(_SESSION_CALL, st.sampled_from([0.0, 0.0004, 1.0])),
                      max_size=12),
       limit=st.integers(min_value=0, max_value=300))
def test_compiled_session_log_writes_the_twins_bytes(
        impl: str, module: ModuleType, session_id: str, client: str,
        calls: list[tuple[tuple[str, bytes | str, bool], float]], limit: int) -> None:
    owners = [_Owner(module.Lines(limit), 5.0), _Owner(_logline_py.Lines(limit), 5.0)]
    sessions = [module.SessionLog(owners[0], session_id, client),
                _logline_py.SessionLog(owners[1], session_id, client)]
    off = module.SessionLog(None, session_id, client)
    for (name, data, secret), step in calls:
        for owner, session in zip(owners, sessions, strict=True):
            owner.now += step
            args = () if name in ("recv_end", "redact_next") else (data,)
            kwargs = {"secret": secret} if name in ("send", "recv") else {}
            getattr(session, name)(*args, **kwargs)
        getattr(off, name)(*(() if name in ("recv_end", "redact_next") else (data,)))
    for owner in owners:
        owner.flush()
    assert owners[0].chunks == owners[1].chunks
    assert (sessions[0].session_id, sessions[0].client) == (session_id, client)
    assert owners[0]._buf.size == 0


def test_lines_are_stamped_by_the_wall_clock(tmp_path: Path) -> None:
    # The default clock is time.time, which the compiled session log reads in C: each
    # stamp lies between the time.time() readings taken around its line.
    log = ProtocolLog(tmp_path, "w")
    session = log.session("S", "c")
    bounds = []
    for _ in range(50):
        before = time.time()
        session.event("tick")
        bounds.append((format_timestamp(before), format_timestamp(time.time())))
    log.close()
    stamps = [row[0] for row in lines_of(tmp_path / "protocol-w.log")]
    assert len(stamps) == len(bounds)
    for stamp, (low, high) in zip(stamps, bounds, strict=True):
        assert low <= stamp <= high

"""Pure-Python twin of ``engine._ext.wire``: SMTP line framing and message-body transfer.

Owns the octet level of SMTP (RFC 5321 §2.3.8, §4.1.1.4, §4.5.2; RFC 3030): splitting
command lines on CRLF with a length limit, decoding a DATA body up to ``<CRLF>.<CRLF>``
(unstuffing, bare CR/LF detection, size and line-length accounting), reading BDAT chunks
by exact octet count, and dot-stuffing an outbound body.  This is where SMTP smuggling is
stopped: only a real CRLF ends a line, and only ``<CRLF>.<CRLF>`` ends a message.

It must never import asyncio, sockets or logging, hold a transport, or parse commands:
bytes in, lines / body bytes / counts out.  Every name, signature, result and exception
here must match the compiled module exactly (the twin tests compare them byte for byte).
"""

from __future__ import annotations

import operator
import re
import sys

from engine.protocol import _tables
from engine.protocol._tables import BARE_NORMALIZE, BARE_REJECT
from engine.protocol.errors import LineTooLong

__all__ = [
    "BARE_NORMALIZE",
    "BARE_REJECT",
    "BdatReader",
    "DataDecoder",
    "LineReader",
    "dot_stuff",
]

_CR = 13
_LF = 10
_DOT = 46

# DataDecoder states.  At a line start the decoder also remembers whether that start
# follows a real CRLF (or the start of the body): only then can "." CRLF end the message.
_BOL = 0  # at the start of a line
_MID = 1  # inside a line, everything so far emitted
_BDOT = 2  # a "." at the start of a line, not yet emitted
_DOTCR = 3  # "." then CR at the start of a line, not yet emitted
_PCR = 4  # a CR inside or ending a line whose successor is not seen yet

_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def _as_bytes(data: object) -> bytes:
    # Accept any contiguous buffer (bytearray, memoryview) but work on immutable bytes.
    if isinstance(data, bytes):
        return data
    return memoryview(data).tobytes()  # type: ignore[arg-type]


def _check_size(value: object, name: str) -> int:
    number = operator.index(value)  # type: ignore[arg-type]
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number}")
    if number > sys.maxsize:
        raise OverflowError(f"{name} is too large: {number}")
    return number


def _check_policy(bare_eol: object) -> bool:
    """True for BARE_NORMALIZE, False for BARE_REJECT; ValueError for anything else."""
    if bare_eol == BARE_REJECT:
        return False
    if bare_eol == BARE_NORMALIZE:
        return True
    raise ValueError(f"bare_eol must be 'reject' or 'normalize', got {bare_eol!r}")


class LineReader:
    """Incremental splitter of command lines: only CRLF ends a line (RFC 5321 §2.3.8).

    ``limit`` is the longest acceptable line in octets including its CRLF (RFC 5321
    §4.5.3.1.4: 512 for commands; RFC 4954 §4 lets the server raise it for AUTH). A line
    over the limit is consumed through its CRLF and reported as LineTooLong; while its CRLF
    has not arrived, every ``pop_line`` that finds no complete line drops what it holds of
    it (keeping at most a trailing CR that may be half of the CRLF).
    """

    __slots__ = ("_buf", "_limit", "_pos", "_scan", "_skipping")

    def __init__(self, limit: int = _tables.COMMAND_LINE_LIMIT) -> None:
        self._limit = _check_size(limit, "limit")
        self._buf = bytearray()
        self._pos = 0  # start of the first byte not yet returned
        self._scan = 0  # no CR of a CRLF lies before this offset
        self._skipping = False  # discarding the rest of an over-long line

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = _check_size(value, "limit")

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def push(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        data = _as_bytes(data)
        if not data:
            return
        pos = self._pos
        buf = self._buf
        # Compact only when the consumed front is at least half the buffer: each consumed
        # byte pays for at most one moved byte, so many pipelined lines stay O(n).
        if pos and pos * 2 >= len(buf):
            del buf[:pos]
            self._scan -= pos
            self._pos = 0
        buf += data

    def pop_line(self) -> bytes | None:
        """The next line without its CRLF, None if none is complete; LineTooLong if over."""
        buf = self._buf
        pos = self._pos
        idx = buf.find(b"\r\n", self._scan)
        if idx < 0:
            end = len(buf)
            if self._skipping or end - pos > self._limit:
                # Over the limit with no CRLF yet: drop it, keep a CR that may pair with
                # the next LF, and remember to refuse the line when its CRLF comes.
                self._skipping = True
                keep = 1 if end > pos and buf[end - 1] == _CR else 0
                del buf[: end - keep]
                self._pos = pos = 0
                end = keep
            self._scan = max(pos, end - 1)
            return None
        nxt = idx + 2
        self._pos = nxt
        self._scan = nxt
        if self._skipping:
            self._skipping = False
            raise LineTooLong(_tables.LINE_TOO_LONG)
        if nxt - pos > self._limit:
            raise LineTooLong(_tables.LINE_TOO_LONG)
        return bytes(buf[pos:idx])

    def take_rest(self) -> bytes:
        """Every byte not yet returned as a line (the start of a body); empties the reader."""
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0
        self._skipping = False
        return rest

    def __repr__(self) -> str:
        skip = " skipping" if self._skipping else ""
        return f"<LineReader limit={self._limit} buffered={self.buffered}{skip}>"


class _BodyReader:
    """The kept body, its size and the bare CR / bare LF counts of a message being received.

    Accounting: under "normalize" a bare CR or LF is written and counted as the two octets
    of the CRLF it becomes; under "reject" it counts as one octet and the body is no longer
    kept.  Past ``max_size`` the body is dropped but counting goes on.
    """

    __slots__ = (
        "_bare_cr",
        "_bare_lf",
        "_discarded",
        "_done",
        "_keep",
        "_max_size",
        "_normalize",
        "_out",
        "_size",
    )

    def __init__(self, max_size: int, bare_eol: str) -> None:
        self._max_size = _check_size(max_size, "max_size")
        self._normalize = _check_policy(bare_eol)
        self._out = bytearray()
        self._keep = True
        self._discarded = False  # BdatReader.discard(): keep nothing more, never ``ok``
        self._done = False
        self._size = 0
        self._bare_cr = 0
        self._bare_lf = 0

    @property
    def done(self) -> bool:
        return self._done

    @property
    def size(self) -> int:
        return self._size

    @property
    def oversize(self) -> bool:
        return self._max_size > 0 and self._size > self._max_size

    @property
    def bare_cr(self) -> int:
        return self._bare_cr

    @property
    def bare_lf(self) -> int:
        return self._bare_lf

    @property
    def ok(self) -> bool:
        if self._discarded or (self._max_size > 0 and self._size > self._max_size):
            return False
        return self._normalize or not (self._bare_cr or self._bare_lf)

    def _put(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._keep:
            if self._max_size and self._size > self._max_size:
                # Over the limit: stop keeping, but go on reading to the end.
                self._keep = False
                self._out = bytearray()
            else:
                self._out += piece

    def _bare(self, c: int) -> None:
        if c == _CR:
            self._bare_cr += 1
        else:
            self._bare_lf += 1
        if self._normalize:
            self._put(b"\r\n")
        else:
            self._size += 1
            if self._keep:
                self._keep = False
                self._out = bytearray()


class DataDecoder(_BodyReader):
    """Incremental decoder of a DATA body up to ``<CRLF>.<CRLF>`` (RFC 5321 §4.1.1.4).

    Unstuffs (§4.5.2), counts bare CR / bare LF (§2.3.8), octets and over-long lines, and
    keeps the canonical body while it is acceptable.  A bare CR or LF never takes part in
    the end-of-data sequence, whatever the policy.

    Accounting: ``size`` counts the decoded octets; under "normalize" a bare CR or LF
    counts as the two octets of the CRLF it becomes, under "reject" as one octet.  Bytes
    whose meaning depends on what comes next (a CR, a "." at a line start) are counted
    when it arrives.  A line's length for ``long_lines`` is its decoded content plus 2.
    """

    __slots__ = ("_linelen", "_long_lines", "_max_line", "_real", "_state")

    def __init__(self, max_size: int = 0, bare_eol: str = BARE_REJECT, max_line: int = 0) -> None:
        super().__init__(max_size, bare_eol)
        self._max_line = _check_size(max_line, "max_line")
        self._state = _BOL
        self._real = True  # the body starts at a line start that may hold the terminator
        self._linelen = 0
        self._long_lines = 0

    # --- results ---------------------------------------------------------------------

    @property
    def long_lines(self) -> int:
        return self._long_lines

    def body(self) -> bytes:
        """The decoded body in canonical CRLF, without the terminator; b"" unless ``ok``."""
        return bytes(self._out) if self.ok else b""

    def __repr__(self) -> str:
        return (
            f"<DataDecoder done={self._done} size={self._size} ok={self.ok} "
            f"bare_cr={self._bare_cr} bare_lf={self._bare_lf} long_lines={self._long_lines}>"
        )

    # --- output ----------------------------------------------------------------------

    def _line_end(self, linelen: int) -> None:
        # RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
        if self._max_line and linelen + 2 > self._max_line:
            self._long_lines += 1

    # --- input -----------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Decode ``data``; return how many of its bytes belong to the body (to the end)."""
        if self._done:
            return 0
        data = _as_bytes(data)
        n = len(data)
        state = self._state
        real = self._real
        linelen = self._linelen
        max_line = self._max_line
        find = data.find
        i = 0
        ncr = nlf = -1  # next CR / LF at or after i (n when none)
        rs = re_ = 0  # run of input bytes to emit verbatim, [rs, re_)
        while i < n:
            if ncr < i:
                ncr = find(b"\r", i)
                if ncr < 0:
                    ncr = n
            if nlf < i:
                nlf = find(b"\n", i)
                if nlf < 0:
                    nlf = n
            if state == _BOL:
                if nlf < n and ncr + 1 == nlf:
                    # The common case: a whole line ending in a real CRLF, no CR inside.
                    start = i
                    clen = ncr - i
                    if data[i] == _DOT:
                        if clen == 1:
                            if real:
                                i = nlf + 1  # "." CRLF after CRLF: end of data
                                self._done = True
                                break
                        else:
                            start = i + 1  # RFC 5321 §4.5.2: drop the stuffed dot
                            clen -= 1
                    if start != re_:
                        if re_ > rs:
                            self._put(data[rs:re_])
                        rs = start
                    re_ = nlf + 1
                    if max_line and clen + 2 > max_line:
                        self._long_lines += 1
                    real = True
                    i = nlf + 1
                    continue
                c = data[i]
                if c == _DOT:
                    state = _BDOT
                    i += 1
                elif c == _CR:
                    state = _PCR
                    i += 1
                elif c == _LF:
                    if re_ > rs:
                        self._put(data[rs:re_])
                    rs = re_ = 0
                    self._line_end(0)
                    self._bare(_LF)
                    real = False
                    i += 1
                else:
                    state = _MID
            elif state == _MID:
                q = ncr if ncr < nlf else nlf
                if q > i:
                    if i != re_:
                        if re_ > rs:
                            self._put(data[rs:re_])
                        rs = i
                    re_ = q
                    linelen += q - i
                    i = q
                if i < n:
                    if i == ncr:
                        if i + 1 < n and data[i + 1] == _LF:
                            if i != re_:
                                if re_ > rs:
                                    self._put(data[rs:re_])
                                rs = i
                            re_ = i + 2
                            self._line_end(linelen)
                            linelen = 0
                            state = _BOL
                            real = True
                            i += 2
                        else:
                            state = _PCR
                            i += 1
                    else:
                        if re_ > rs:
                            self._put(data[rs:re_])
                        rs = re_ = 0
                        self._line_end(linelen)
                        linelen = 0
                        self._bare(_LF)
                        state = _BOL
                        real = False
                        i += 1
            else:
                # Pending states: flush the run first, the next byte decides.
                if re_ > rs:
                    self._put(data[rs:re_])
                rs = re_ = 0
                c = data[i]
                if state == _BDOT:
                    if c == _CR:
                        state = _DOTCR
                        i += 1
                    elif c == _LF:
                        # "." then bare LF: a lone-dot line that is not a terminator.
                        self._put(b".")
                        self._line_end(1)
                        linelen = 0
                        self._bare(_LF)
                        state = _BOL
                        real = False
                        i += 1
                    else:
                        state = _MID  # the stuffed dot is dropped
                elif state == _DOTCR:
                    if c == _LF:
                        i += 1
                        if real:
                            self._done = True
                            break
                        # "." CRLF after a bare line ending: kept, never a terminator.
                        self._put(b".\r\n")
                        self._line_end(1)
                        linelen = 0
                        state = _BOL
                        real = True
                    else:
                        self._put(b".")
                        self._line_end(1)
                        linelen = 0
                        self._bare(_CR)
                        state = _BOL
                        real = False
                else:  # _PCR
                    self._line_end(linelen)
                    linelen = 0
                    state = _BOL
                    if c == _LF:
                        self._put(b"\r\n")
                        real = True
                        i += 1
                    else:
                        self._bare(_CR)
                        real = False
        if re_ > rs:
            self._put(data[rs:re_])
        self._state = state
        self._real = real
        self._linelen = linelen
        return i


class BdatReader(_BodyReader):
    """Reader of a CHUNKING body (RFC 3030 §2-§4): exact octet counts, no unstuffing.

    Bare CR / bare LF are detected across chunk and feed boundaries exactly as in
    DataDecoder (a CR ending one chunk and an LF starting the next make a CRLF; a CR at
    the very end of the LAST chunk is bare) and the same policies and ``size`` rules apply.
    """

    __slots__ = ("_cr", "_last", "_remaining")

    def __init__(self, max_size: int = 0, bare_eol: str = BARE_REJECT) -> None:
        super().__init__(max_size, bare_eol)
        self._last = False
        self._cr = False  # a CR ended the octets seen so far; the next octet decides
        self._remaining = 0

    @property
    def chunk_done(self) -> bool:
        return self._remaining == 0

    def body(self) -> bytes:
        """The message received so far (no unstuffing); b"" unless ``ok``."""
        return bytes(self._out) if self.ok else b""

    def __repr__(self) -> str:
        return (
            f"<BdatReader done={self._done} remaining={self._remaining} size={self._size} "
            f"ok={self.ok} bare_cr={self._bare_cr} bare_lf={self._bare_lf}>"
        )

    def start_chunk(self, count: int, last: bool) -> None:
        """Expect ``count`` more octets (``BDAT count [LAST]``); ValueError mid-chunk or done."""
        if self._done:
            raise ValueError("the message is already complete")
        if self._remaining:
            raise ValueError("the previous chunk is not finished")
        count = _check_size(count, "count")
        self._remaining = count
        self._last = bool(last)
        if count == 0 and self._last:
            self._finish()  # BDAT 0 LAST (RFC 3030 §2)

    def discard(self) -> None:
        """Keep nothing more of this message (RFC 3030 §4: a refused chunk is still read)."""
        self._discarded = True
        self._keep = False
        self._out = bytearray()

    def feed(self, data: bytes) -> int:
        """Take at most the rest of the current chunk from ``data``; return how many."""
        data = _as_bytes(data)
        k = min(len(data), self._remaining)
        if k == 0:
            return 0
        self._scan(data[:k] if k < len(data) else data)
        self._remaining -= k
        if self._remaining == 0 and self._last:
            self._finish()
        return k

    def _finish(self) -> None:
        if self._cr:
            self._cr = False
            self._bare(_CR)
        self._done = True

    def _scan(self, piece: bytes) -> None:
        if self._cr:
            self._cr = False
            if piece[0] == _LF:
                self._put(b"\r\n")
                piece = piece[1:]
            else:
                self._bare(_CR)
        if piece.endswith(b"\r"):
            self._cr = True
            piece = piece[:-1]
        crlf = piece.count(b"\r\n")
        bare_cr = piece.count(b"\r") - crlf
        bare_lf = piece.count(b"\n") - crlf
        if not (bare_cr or bare_lf):
            self._put(piece)
            return
        self._bare_cr += bare_cr
        self._bare_lf += bare_lf
        if self._normalize:
            self._put(_ANY_EOL.sub(b"\r\n", piece))
        else:
            self._size += len(piece)
            self._keep = False
            self._out = bytearray()


def dot_stuff(body: bytes) -> bytes:
    """The DATA transfer form of ``body`` (RFC 5321 §4.5.2), terminator included.

    Bare CR and bare LF become CRLF, a final CRLF is added to a non-empty body lacking
    one, every line starting with "." gets another, and ".\\r\\n" is appended.
    """
    body = _as_bytes(body)
    if not body:
        return b".\r\n"
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        body = _ANY_EOL.sub(b"\r\n", body)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body[0] == _DOT:
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"

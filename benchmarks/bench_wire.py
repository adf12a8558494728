"""Wire-layer throughput: the compiled modules, their pure-Python twins and a stdlib baseline.

Run: ``.venv/bin/python benchmarks/bench_wire.py [--quick]``

Measures, in one run: DATA decoding and dot-stuffing on 1 KiB, 100 KiB and 10 MiB bodies
(MB/s), command parsing (commands/s), header scanning (MB/s), and splitting 20,000
pipelined command lines pushed at once (lines/s), with the per-line cost at 20,000 lines
against 2,000 (1.0 when the line reader is linear, as it must be: one that moved its
buffer per line would be about 10).  The baseline is the best
plain-Python approach with the bytes built-ins (``find``/``replace``/``split``) that a Python
MTA would write; it checks less than Ferry does (no incremental feeding, no per-line
bare CR/LF accounting), so the ratio flatters the baseline.  Inputs are generated.
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import re
import time
from collections.abc import Callable
from types import ModuleType

from engine import _speedups

CHUNK = 64 * 1024


def make_body(size: int, seed: int = 1) -> bytes:
    """A canonical CRLF body of ~76-character lines, some starting with a dot."""
    rnd = random.Random(seed)
    words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b".dotted", b"mail", b"ferry"]
    out = bytearray(b"Subject: benchmark\r\nFrom: a@example.com\r\n\r\n")
    while len(out) < size:
        line = b" ".join(rnd.choice(words) for _ in range(12))[:76]
        out += line + b"\r\n"
    return bytes(out[:size].rsplit(b"\r\n", 1)[0] + b"\r\n")


def best_of(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call, best of several timed batches."""
    n, best = 1, float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = (time.perf_counter() - t0) / n
        best = min(best, elapsed)
        if time.perf_counter() > deadline:
            return best
        if elapsed * n < 0.05:
            n *= 2


def decode_with(wire: ModuleType, stuffed: bytes) -> Callable[[], bytes]:
    def run() -> bytes:
        dec = wire.DataDecoder(0)
        for i in range(0, len(stuffed), CHUNK):
            dec.feed(stuffed[i : i + CHUNK])
        assert dec.done
        return bytes(dec.body())

    return run


def decode_baseline(stuffed: bytes) -> Callable[[], bytes]:
    def run() -> bytes:
        buf = bytearray()
        for i in range(0, len(stuffed), CHUNK):  # the same incremental arrival
            buf += stuffed[i : i + CHUNK]
        end = buf.find(b"\r\n.\r\n")
        body = bytes(buf[: end + 2])
        if body.count(b"\n") != body.count(b"\r\n") or body.count(b"\r") != body.count(b"\r\n"):
            raise ValueError("bare line ending")
        return body.replace(b"\r\n..", b"\r\n.")

    return run


def stuff_baseline(body: bytes) -> Callable[[], bytes]:
    def run() -> bytes:
        out = body.replace(b"\r\n.", b"\r\n..")
        if out.startswith(b"."):
            out = b"." + out
        return out + b".\r\n"

    return run


COMMANDS = [
    b"MAIL FROM:<sender@example.com> SIZE=12345 BODY=8BITMIME",
    b"RCPT TO:<user@example.net>",
    b"RCPT TO:<someone.else@mail.example.org> NOTIFY=FAILURE,DELAY",
    b"DATA",
    b"EHLO client.example.org",
    b"RSET",
    b"NOOP",
    b"QUIT",
]

_BASELINE_RE = re.compile(rb"(?i)^(MAIL FROM|RCPT TO):\s*<([^>]*)>((?: [A-Za-z0-9-]+(?:=\S+)?)*)$")


def command_baseline(line: bytes) -> object:
    """A regex parser of the kind a Python MTA writes (checks far less than Ferry's)."""
    verb = line[:4].upper()
    if verb in (b"MAIL", b"RCPT"):
        m = _BASELINE_RE.match(line)
        if m is None:
            raise ValueError(line)
        params = dict(p.partition(b"=")[::2] for p in m.group(3).split())
        return verb, m.group(2).decode(), params
    return verb, line[5:].decode()


PIPELINED = [b"RCPT TO:<user%d@example.com>" % i for i in range(20000)]


def lines_with(wire: ModuleType, count: int) -> Callable[[], None]:
    stream = b"\r\n".join(PIPELINED[:count]) + b"\r\n"

    def run() -> None:
        reader = wire.LineReader()
        reader.push(stream)
        while reader.pop_line() is not None:
            pass

    return run


def lines_baseline(count: int) -> Callable[[], object]:
    stream = b"\r\n".join(PIPELINED[:count]) + b"\r\n"
    return lambda: stream.split(b"\r\n")


def row(name: str, figures: dict[str, float], unit: str) -> str:
    c, py, base = figures.get("c"), figures["py"], figures["baseline"]
    cells = [f"{name:<28}"]
    for v in (c, py, base):
        cells.append(f"{v:>12,.1f}" if v is not None else f"{'-':>12}")
    ratio_py = f"{c / py:>8.1f}x" if c else f"{'-':>9}"
    ratio_base = f"{c / base:>8.1f}x" if c else f"{'-':>9}"
    return " ".join(cells) + f" {ratio_py} {ratio_base}  {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    args = parser.parse_args()
    seconds = 0.3 if args.quick else 1.5
    impls = {
        name: dict(_speedups.implementations(name)) for name in ("wire", "command", "headers")
    }
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}; "
          f"Python {platform.python_version()}; {_speedups.status()}")
    print(f"{'subject':<28} {'compiled':>12} {'pure twin':>12} {'baseline':>12} "
          f"{'c/py':>9} {'c/base':>9}")

    for size, label in ((1024, "1 KiB"), (100 * 1024, "100 KiB"), (10 * 1024 * 1024, "10 MiB")):
        body = make_body(size)
        stuffed = impls["wire"]["py"].dot_stuff(body)
        mb = len(stuffed) / 1e6
        figures = {k: mb / best_of(decode_with(m, stuffed), seconds)
                   for k, m in impls["wire"].items()}
        figures["baseline"] = mb / best_of(decode_baseline(stuffed), seconds)
        print(row(f"DATA decode {label}", figures, "MB/s"))
        figures = {k: mb / best_of(functools.partial(m.dot_stuff, body), seconds)
                   for k, m in impls["wire"].items()}
        figures["baseline"] = mb / best_of(stuff_baseline(body), seconds)
        print(row(f"dot-stuff {label}", figures, "MB/s"))

    def per_command(parse: Callable[[bytes], object]) -> Callable[[], None]:
        def run() -> None:
            for line in COMMANDS:
                parse(line)
        return run

    n = len(COMMANDS)
    figures = {k: n / best_of(per_command(m.parse_command), seconds)
               for k, m in impls["command"].items()}
    figures["baseline"] = n / best_of(per_command(command_baseline), seconds)
    print(row("command parse (mix)", figures, "commands/s"))

    import email.parser

    header_block = make_headers()
    hmb = len(header_block) / 1e6
    figures = {k: hmb / best_of(functools.partial(m.scan_headers, header_block), seconds)
               for k, m in impls["headers"].items()}
    bp = email.parser.BytesHeaderParser()
    figures["baseline"] = hmb / best_of(lambda: bp.parsebytes(header_block), seconds)
    print(row("header scan (3 KB block)", figures, "MB/s"))

    many, few = len(PIPELINED), len(PIPELINED) // 10
    per_line = {k: best_of(lines_with(m, many), seconds) / many
                for k, m in impls["wire"].items()}
    figures = {k: 1 / v for k, v in per_line.items()}
    figures["baseline"] = many / best_of(lines_baseline(many), seconds)
    print(row(f"pipelined lines ({many:,})", figures, "lines/s"))
    growth = {k: v / (best_of(lines_with(impls["wire"][k], few), seconds) / few)
              for k, v in per_line.items()}
    print(f"line reader, cost per line at {many:,} lines over {few:,} (1.0 = linear): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in growth.items()))


def make_headers() -> bytes:
    fields = [b"Received: from mx%d.example.net (mx%d.example.net [192.0.2.%d])\r\n"
              b"\tby relay.example.com with ESMTPS id abc%d\r\n\tfor <user@example.com>; "
              b"Thu, 26 Nov 2026 20:00:00 +0000\r\n" % (i, i, i, i) for i in range(8)]
    fields += [b"X-Header-%d: value number %d with some text in it\r\n" % (i, i)
               for i in range(16)]
    fields += [b"From: Sender <sender@example.com>\r\n", b"To: user@example.com\r\n",
               b"Subject: a benchmark message\r\n", b"Date: Thu, 26 Nov 2026 20:00:00 +0000\r\n",
               b"Message-ID: <abc@example.com>\r\n", b"MIME-Version: 1.0\r\n"]
    return b"".join(fields) + b"\r\nbody\r\n"


if __name__ == "__main__":
    main()

"""DKIM signing throughput: signatures per second on one core, and what a second thread adds.

Run: ``.venv/bin/python benchmarks/bench_dkim.py [--seconds S] [--rounds N]``

Signs generated messages of 1 KiB and 100 KiB (relaxed/relaxed, the default header list,
over-signing) with engine.message.dkim's Signer, RSA-2048 and Ed25519, one thread; the
baseline is dkimpy's ``dkim.sign`` (pure-Python canonicalisation, and RSA by Python's own
big-integer ``pow``) on the same messages and RSA key, in the same run, alternating with
ours so the shared machine's drift weighs on both.  dkimpy signs Ed25519 only with PyNaCl,
which is not installed: that row has no baseline.  Prints the best round of each cell, the
ratio ours/dkimpy, and the issue's target (>= 2,000 RSA-2048 signatures/s per core).

Then the same signing in two threads at once against one (about 2x on two idle cores if
``cryptography`` releases the GIL while OpenSSL signs, 1x if not; on the shared machine
the other core is often busy), and a test of the GIL that the load does not blur: with a
switch interval of 1000 s, how many signatures a worker thread makes before the main
thread runs again (only a released GIL lets it).  That decides that signatures run off
the event loop (engine.message.dkim's docstring).

Last, ``--beside-busy``: RSA-2048 signatures made in a worker thread while the main thread
runs Python without pause (what the signing thread meets in ``ferry serve``: a busy event
loop), one call per signature through ``cryptography`` (the twin: one release of the GIL
each, then a wait of up to the 5 ms switch interval to get it back), one per signature
through the compiled module, and batches of 50 through the compiled module (one release
a batch, as the signing agent makes them): the worker's wall time and CPU per signature.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from collections.abc import Callable

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine import _speedups
from engine.message.dkim import Signer, private_pem
from engine.testing.gil import gil_handoff


def message(size: int) -> bytes:
    header = (b"From: Application <app@example.com>\r\nTo: user@example.net\r\n"
              b"Subject: Your receipt  for order 1234\r\nDate: Mon, 7 Dec 2026 00:00:00 +0000\r\n"
              b"Message-ID: <1234.5678@example.com>\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"Thank you for your order.  It ships\t today; details follow below. \r\n"
    body = line * ((size - len(header)) // len(line) + 1)
    return header + body[: size - len(header) - 2] + b"\r\n"


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    calls, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - started)


def threaded_rate(fn: Callable[[], object], seconds: float, threads: int) -> float:
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def work(slot: int) -> None:
        while time.perf_counter() < stop:
            fn()
            counts[slot] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def beside_busy(fn: Callable[[], object], signatures: int) -> tuple[float, float]:
    """(wall µs, thread CPU µs) per signature of ``fn`` (``signatures`` of them) in this
    thread while another thread runs Python all the time."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    finally:
        stop.set()
        busy.join()
    return wall / signatures * 1e6, cpu / signatures * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per timed cell")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (best of)")
    parser.add_argument("--beside-busy", action="store_true", help="only the signing "
                        "thread beside a busy one (issue 15, seventh pass)")
    args = parser.parse_args()
    if args.beside_busy:
        print_beside_busy(args.rounds)
        return
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = private_pem(rsa_key)
    print(f"{'key':<10}{'message':>9}{'ferry sig/s':>13}{'dkimpy sig/s':>14}{'ratio':>8}")
    for label, key in (("RSA-2048", rsa_key), ("Ed25519", ed_key)):
        signer = Signer("example.com", "s1", key)
        for size in (1024, 100 * 1024):
            data = message(size)
            ours_fn = functools.partial(signer.sign, data)
            base_fn = (functools.partial(dkim.sign, data, b"s1", b"example.com", rsa_pem)
                       if label == "RSA-2048" else None)
            ours = base = 0.0
            for _ in range(args.rounds):
                ours = max(ours, rate(ours_fn, args.seconds))
                if base_fn is not None:
                    base = max(base, rate(base_fn, args.seconds))
            shown = f"{base:>14,.0f}{ours / base:>7.1f}x" if base else f"{'(no PyNaCl)':>14}{'':>8}"
            print(f"{label:<10}{size // 1024:>6} KiB{ours:>13,.0f}{shown}")
    print("target: >= 2,000 RSA-2048 signatures/s per core (1 KiB)")
    print()
    print(f"{'threads':<18}{'key':>10}{'1 thread/s':>12}{'2 threads/s':>13}{'gain':>7}")
    for label, key in (("RSA-2048", rsa_key), ("Ed25519", ed_key)):
        signer = Signer("example.com", "s1", key)
        data = message(1024)
        only = functools.partial(signer.signature, signer.prepare(data))
        for what, fn in (("Signer.sign 1 KiB", functools.partial(signer.sign, data)),
                         ("OpenSSL sign only", only)):
            one = max(threaded_rate(fn, args.seconds, 1) for _ in range(args.rounds))
            two = max(threaded_rate(fn, args.seconds, 2) for _ in range(args.rounds))
            print(f"{what:<18}{label:>10}{one:>12,.0f}{two:>13,.0f}{two / one:>6.2f}x")
    print()
    # Ed25519 goes through engine.message.pkey: compiled, it keeps the GIL (300 here).
    for label, key in (("RSA-2048", rsa_key), ("Ed25519", ed_key)):
        signer = Signer("example.com", "s1", key)
        seen = gil_handoff(functools.partial(signer.signature, signer.prepare(message(1024))))
        print(f"GIL handoff, {label} sign: the main thread ran again after {seen} of 300 "
              "signatures (300: never released)")



def print_beside_busy(rounds: int, signatures: int = 400, batch: int = 50) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    modules = dict(_speedups.implementations("pkey"))
    digests = [bytes([i % 256]) * 32 for i in range(signatures)]

    def one_by_one(signer: object) -> Callable[[], object]:
        return lambda: [signer.sign_digests([d]) for d in digests]  # type: ignore[attr-defined]

    def batches(signer: object) -> Callable[[], object]:
        return lambda: [signer.sign_digests(digests[i : i + batch])  # type: ignore[attr-defined]
                        for i in range(0, signatures, batch)]

    cells = [("cryptography, one a call", one_by_one(modules["py"].RsaSigner(der)))]
    if "c" in modules:
        compiled = modules["c"].RsaSigner(der)
        cells += [("compiled, one a call", one_by_one(compiled)),
                  (f"compiled, {batch} a call", batches(compiled))]
    print(f"RSA-2048 in a thread beside a busy one, {signatures} signatures, median of "
          f"{rounds}")
    print(f"{'calls':<26}{'wall µs/sig':>12}{'CPU µs/sig':>12}")
    for name, fn in cells:
        runs = sorted(beside_busy(fn, signatures) for _ in range(rounds))
        wall, cpu = runs[len(runs) // 2]
        print(f"{name:<26}{wall:>12,.0f}{cpu:>12,.0f}")


if __name__ == "__main__":
    main()

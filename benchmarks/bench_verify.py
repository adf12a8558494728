"""The verify agent's cost per message: SPF + DKIM + DMARC with cached DNS answers, against
dkimpy verifying the same message's DKIM signature alone.

Run: ``.venv/bin/python benchmarks/bench_verify.py [--messages N] [--size BYTES]`` (a few
seconds with the defaults).

Set-up: a DnsResponder (engine.testing.dns) on loopback serves the sender's SPF record, the
DKIM key (RSA-2048) and the DMARC record; one Lookup is warmed by a first message, so the
measured messages cost no DNS round trip (the case of a busy MX, where one domain sends
many messages within its TTLs).  Each message is signed once by dkimpy (relaxed/relaxed,
From, To, Subject, Date, Message-ID).

- ``ferry``: ``VerifyAgent.mail`` then ``.data`` per message, one after the other on one
  uvloop loop: the SPF evaluation, DKIM (body hash, header hash, RSA verify), the DMARC
  policy and alignment, and the Authentication-Results field.
- ``dkimpy``: ``dkim.verify`` of the same bytes with the key from a dict (its ``dnsfunc``),
  DKIM only: no SPF, no DMARC, no field.

``--concurrency N`` keeps N messages in flight (as N sessions would).  With the compiled
engine._ext.pkey the verify agent checks the signatures on the loop, at once; with the
pure-Python twin it makes them in a thread, in batches, and one message at a time then
pays a thread hand-off each (latency more than cost).

Prints messages/s for each and the ratio ferry / dkimpy.  Ferry does more work per message
than the baseline, so a ratio near 1 means the SPF, DMARC and field cost little beside
the signature.

``--cpu``: instead, the thread CPU (``time.thread_time_ns``, which the neighbours' load on
a shared machine does not inflate as it does the wall clock) of DKIM's part alone, µs a
message, the best of ``--rounds`` rounds of ``--messages`` messages: ``dkim.verify_now``
with the key's answer cached (a new ``Message`` each time, so its header scan counts, and
each result's ``method_result()``, which the verify agent writes into its field), the
public-key check alone (OpenSSL), and the verify agent's whole data stage.  The garbage
collector is tuned as ``ferry serve`` tunes it (engine.app.tune_gc: young collections made
rare), else they take ~2 µs a message here that the server does not spend.  Run it with
``PYTHONPATH`` set to each tree to compare two of them (it uses their public names only).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib
import ipaddress
import textwrap
import time
from collections.abc import Callable

import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.agents.api import Message, Session, Transaction, Verdict
from engine.agents.dns import Lookup
from engine.agents.verify import VerifyAgent
from engine.app import tune_gc
from engine.message import dkim, pkey
from engine.protocol.command import parse_command
from engine.testing.dns import DnsResponder

dkimpy = importlib.import_module("dkim")  # no type information: imported by name

CLIENT = "192.0.2.10"


def make_message(size: int, key_pem: bytes) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, size // len(line))
    header = (b"From: Shop <news@shop.test>\r\nTo: you@ferry.test\r\nSubject: offers\r\n"
              b"Date: Mon, 07 Dec 2026 00:00:00 +0000\r\nMessage-ID: <1@shop.test>\r\n\r\n")
    data = header + body
    signature: bytes = dkimpy.sign(data, b"s1", b"shop.test", key_pem,
                                   canonicalize=(b"relaxed", b"relaxed"))
    return signature + data


async def ferry(dns: DnsResponder, data: bytes, count: int, concurrency: int = 1) -> float:
    lookup = Lookup((dns.host, dns.port))
    agent = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id="mx.ferry.test")
    await agent.start()
    session = Session("smtp-1", "mx", ipaddress.ip_address(CLIENT), helo="out.shop.test")
    mail = parse_command(b"MAIL FROM:<bounce@shop.test>")

    async def one() -> None:
        tx = Transaction(mail)
        agent.mail(session, tx)
        answer = agent.data(session, tx, Message(data))  # at once when every answer is cached
        verdict = answer if isinstance(answer, Verdict) else await answer
        assert "dmarc=pass" in verdict.headers[1].value, verdict

    async def some(n: int) -> None:
        for _ in range(n):
            await one()

    await one()  # warm the cache
    start = time.perf_counter()
    await asyncio.gather(*(some(count // concurrency) for _ in range(concurrency)))
    return concurrency * (count // concurrency) / (time.perf_counter() - start)


def _best(rounds: int, count: int, run: Callable[[int], int]) -> float:
    """The least of ``rounds`` calls of ``run(count)`` (each returning the thread CPU it
    timed, ns), µs per item."""
    return min(run(count) for _ in range(rounds)) / count / 1e3


async def cpu(dns: DnsResponder, data: bytes, public_der: bytes, count: int, rounds: int
              ) -> dict[str, float]:
    """The thread CPU of DKIM's parts (see the docstring), µs a message."""
    lookup = Lookup((dns.host, dns.port))
    first = await dkim.verify(Message(data), lookup)  # the key's answer now cached
    assert [r.result for r in first] == ["pass"], first

    def verify_now(n: int) -> int:
        messages = [Message(data) for _ in range(n)]
        start = time.thread_time_ns()
        for message in messages:
            results = dkim.verify_now(message, lookup)
            assert isinstance(results, list)
            for result in results:
                result.method_result()
        return time.thread_time_ns() - start

    # The RSA check alone: the floor of verify_now.
    sig = dkim.parse_tag_list(data[data.index(b":") + 1 : data.index(b"\r\nFrom:")].decode())
    b = base64.b64decode("".join(sig["b"].split()))
    verifier = pkey.Verifier("rsa", public_der)
    digest = hashlib.sha256(b"x").digest()

    def check(n: int) -> int:
        start = time.thread_time_ns()
        for _ in range(n):
            verifier.verify(b, digest)
        return time.thread_time_ns() - start

    agent = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id="mx.ferry.test")
    await agent.start()
    session = Session("smtp-1", "mx", ipaddress.ip_address(CLIENT), helo="out.shop.test")
    mail = parse_command(b"MAIL FROM:<bounce@shop.test>")
    answer = agent.data(session, Transaction(mail), Message(data))
    if not isinstance(answer, Verdict):
        await answer  # the SPF and DMARC answers cached (and the checker's thread started)

    def stage(n: int) -> int:
        messages = [Message(data) for _ in range(n)]
        start = time.thread_time_ns()
        for message in messages:
            tx = Transaction(mail)
            agent.mail(session, tx)
            verdict = agent.data(session, tx, message)
            assert isinstance(verdict, Verdict), "an answer was not cached"
        return time.thread_time_ns() - start

    parts = {"dkim.verify_now + method_result": _best(rounds, count, verify_now),
             "of which the RSA check (OpenSSL)": _best(rounds, count, check)}
    if pkey.HOLDS_GIL:  # else the agent has the checks made in a thread, not timed here
        parts["verify agent data stage (SPF+DKIM+DMARC)"] = _best(rounds, count, stage)
    return parts


def baseline(data: bytes, txt: bytes, count: int) -> float:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return txt

    assert dkimpy.verify(data, dnsfunc=dnsfunc)
    start = time.perf_counter()
    for _ in range(count):
        dkimpy.verify(data, dnsfunc=dnsfunc)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024, help="body bytes")
    parser.add_argument("--concurrency", type=int, default=1, help="messages in flight at "
                        "once (the DKIM checks of those waiting share a thread hand-off)")
    parser.add_argument("--cpu", action="store_true", help="thread CPU of DKIM's parts "
                        "in process instead (see above)")
    parser.add_argument("--rounds", type=int, default=7, help="--cpu: rounds (best of)")
    args = parser.parse_args()

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    record = f"v=DKIM1; k=rsa; p={public}"
    zone = f"""
shop.test.               300 IN TXT "v=spf1 ip4:{CLIENT} -all"
_dmarc.shop.test.        300 IN TXT "v=DMARC1; p=reject"
s1._domainkey.shop.test. 300 IN TXT {" ".join(f'"{p}"' for p in textwrap.wrap(record, 200))}
"""
    data = make_message(args.size, key_pem)
    if args.cpu:
        tune_gc()
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        with DnsResponder(zone) as dns:
            parts = uvloop.run(cpu(dns, data, der, args.messages, args.rounds))
        print(f"message {len(data)} bytes, thread CPU µs a message, best of {args.rounds} "
              f"x {args.messages}")
        for what, value in parts.items():
            print(f"{what:<44}{value:8.1f}")
        return
    with DnsResponder(zone) as dns:
        ours = uvloop.run(ferry(dns, data, args.messages, max(1, args.concurrency)))
    theirs = baseline(data, record.encode(), args.messages)
    print(f"message {len(data)} bytes, {args.messages} messages, {args.concurrency} in "
          "flight, one loop")
    print(f"ferry  verify (SPF+DKIM+DMARC, cached DNS): {ours:8.0f} messages/s")
    print(f"dkimpy verify (DKIM only, key from a dict): {theirs:8.0f} messages/s")
    print(f"ratio ferry / dkimpy: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()

"""The verify stage as the server runs it, in process: thread CPU per message of the
agents' chain at MAIL and at the end of data, with every DNS answer cached.

Run: ``FERRY_REQUIRE_EXTENSIONS=1 PYTHONPATH=. .venv/bin/python
benchmarks/bench_verify_stage.py [--messages N] [--repeats R] [--profile]`` (a few
seconds).  To compare two trees, run each tree's own copy, alternated, several times.

Set-up (bench_relay.py ``--verify``'s message and records): a DnsResponder
(engine.testing.dns) on loopback serves the sender's SPF record, the DKIM key (RSA-2048)
and a p=reject DMARC record; the 1 KiB message is signed once by dkimpy
(relaxed/relaxed over From, To, Subject, Message-ID).  The chain is the one a receive
connector with ``verify = ["spf", "dkim", "dmarc"]`` has (relay control, then the
verify agent); a first message fills the Lookup's cache and the SPF cache, so the
measured messages are a busy sender's mail within its TTLs.

Per message, what ``SmtpSession`` does on the loop: a Transaction, ``Chain.run(MAIL)``
and ``tx.note``, then ``Chain.screens`` and ``Chain.screen_now`` (``await
Chain.screen`` in a tree without it, as its session did) (the data stage: SPF
from the cache, DKIM, DMARC, the verdict, then the header edit that adds the
Authentication-Results field).  Measured with ``time.thread_time_ns`` (CPU of this thread
only, steadier than the wall clock on a shared machine): the minimum over R repeats of N
messages.  What the stage costs around DKIM (``dkim.verify_now``, another module's work)
is measured directly: the stage again with ``verify_now`` replaced by a function that
returns the first message's result at once (the header's items, ``Message.items``, which
DKIM makes and DMARC's From shares, are then made by the From); ``verify_now`` alone
(with its ``Message`` and items) is timed too.

Prints the figures in µs a message and the SHA-256 of the stored bytes and of the
verdict, which must be equal between two trees whose behaviour is the same.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import dataclasses
import hashlib
import importlib
import ipaddress
import itertools
import pstats
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.agents import authres
from engine.agents.api import Message, Session, Stage, Transaction, Verdict
from engine.agents.chain import Chain, Screened
from engine.agents.dns import Lookup
from engine.agents.relay import RelayAgent, RelayPolicy
from engine.agents.verify import VerifyAgent
from engine.message import dkim
from engine.protocol.command import parse_command
from engine.testing.dns import DnsResponder

dkimpy = importlib.import_module("dkim")  # no type information: imported by name

CLIENT = "127.0.0.1"
SENDER = "sender@shop.test"
RECIPIENT = "rcpt@ferry.test"


def signed_message(size: int) -> tuple[bytes, str]:
    """bench_relay.py's --verify message of ``size`` body bytes, and the zone for it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    record = " ".join(f'"{part}"' for part in textwrap.wrap(f"v=DKIM1; k=rsa; p={public}", 200))
    zone = (f'shop.test. 3600 IN TXT "v=spf1 ip4:{CLIENT} -all"\n'
            f'_dmarc.shop.test. 3600 IN TXT "v=DMARC1; p=reject"\n'
            f"s1._domainkey.shop.test. 3600 IN TXT {record}\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = line * max(1, size // len(line))
    data = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n"
            "Message-ID: <bench@shop.test>\r\n\r\n").encode() + body
    signature: bytes = dkimpy.sign(data, b"s1", b"shop.test", pem,
                                   canonicalize=(b"relaxed", b"relaxed"))
    return signature + data, zone


def best_of(repeats: int, count: int, run: Callable[[int], None]) -> float:
    """The least thread CPU of ``repeats`` runs of ``count`` calls, in µs a call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time_ns()
        run(count)
        best = min(best, (time.thread_time_ns() - start) / count / 1e3)
    return best


async def measure(dns: DnsResponder, data: bytes, count: int, repeats: int,
                  profile: bool) -> None:
    lookup = Lookup((dns.host, dns.port))
    agent = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id="mx.ferry.test")
    await agent.start()
    relay = RelayAgent(RelayPolicy(["ferry.test"], [ipaddress.ip_network("192.0.2.0/24")]))
    chain = Chain([relay, agent])
    view = Session("smtp-1", "default", ipaddress.ip_address(CLIENT), helo="out.shop.test",
                   esmtp=True)
    mail = parse_command(f"MAIL FROM:<{SENDER}>".encode())
    rcpt = parse_command(f"RCPT TO:<{RECIPIENT}>".encode())
    screen_now = getattr(chain, "screen_now", None)

    async def message() -> Screened:
        # engine.server.session: _on_mail, _envelope_verdict, _on_rcpt's recipient (relay
        # control's RCPT stage is not the verify stage's), then _message.
        tx = Transaction(mail)
        verdict = chain.run(Stage.MAIL, view, tx)
        assert isinstance(verdict, Verdict)
        tx.note(verdict)
        tx.recipients += (rcpt,)
        assert chain.screens(view, tx)
        if screen_now is None:  # a tree before Chain.screen_now: the session awaited this
            return await chain.screen(view, tx, data)
        screened = screen_now(view, tx, data)
        return screened if isinstance(screened, Screened) else await screened

    first = await message()  # the DNS answers and the SPF result cached from here on
    screened = await message()
    assert first == screened and screened.refused is None and not screened.held
    assert b"dmarc=pass" in screened.data[:600], screened.data[:600]

    def stage(n: int) -> None:
        for _ in range(n):
            # The stage never waits with every answer cached (and the compiled pkey):
            # one send runs the coroutine to its end, as the session's await does.
            coro = message()
            try:
                coro.send(None)
            except StopIteration:
                continue
            raise AssertionError("the stage waited: an answer was not cached")

    def verify_now(n: int) -> None:
        for _ in range(n):
            dkim.verify_now(Message(data), lookup)

    digest = hashlib.sha256(screened.data).hexdigest()[:16]
    verdict = hashlib.sha256(repr(screened).encode()).hexdigest()[:16]
    print(f"message {len(data)} bytes, stored {len(screened.data)} bytes "
          f"(sha256 {digest}, screened {verdict})")
    whole = best_of(repeats, count, stage)
    dkim_part = best_of(repeats, count, verify_now)
    signatures = dkim.verify_now(Message(data), lookup)
    assert isinstance(signatures, list)
    real = dkim.verify_now

    def known(message: Message, lookup: Lookup, **_: object) -> list[dkim.DkimResult]:
        return signatures

    dkim.verify_now = known
    try:
        assert await message() == screened
        rest = best_of(repeats, count, stage)
        if profile:
            profiler = cProfile.Profile()
            profiler.runcall(stage, count)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    finally:
        dkim.verify_now = real
    # The same message again and again (as bench_relay.py's smtp-source sends it) finds
    # DKIM's line of the field made already; real mail brings a new header.b each time.
    fresh = iter([dataclasses.replace(signatures[0].method_result(),
                                      props=(("header.d", "shop.test"), ("header.s", "s1"),
                                             ("header.b", f"{n:08x}")))
                  for n in range(count * (repeats + 1))])

    def new_lines(n: int) -> None:
        for result in itertools.islice(fresh, n):  # each result once
            authres.format_field("mx.ferry.test", [result])

    new_lines(count)  # authres's caches full (and forgetting) from here on
    first_seen = best_of(repeats, count, new_lines)
    print(f"stage (MAIL + screen) {whole:7.1f} µs/message   ({1e6 / whole:,.0f} messages/s)")
    print(f"dkim.verify_now       {dkim_part:7.1f} µs/message")
    print(f"stage around DKIM     {rest:7.1f} µs/message   (verify_now answered from memory)")
    print(f"field, a new DKIM line {first_seen:6.1f} µs/message   (format_field, each header.b "
          "new: real traffic)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000, help="messages a repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=1024, help="body bytes")
    parser.add_argument("--profile", action="store_true", help="the stage around "
                        "verify_now under cProfile too (tottime, top 40)")
    parser.add_argument("--keep", type=Path, help="a directory for the signed message and "
                        "its zone, made by the first run and read by the next: runs of two "
                        "trees then verify the same bytes and must print the same digests")
    args = parser.parse_args()
    if args.keep is not None and (args.keep / "zone.txt").exists():
        data, zone = (args.keep / "message.eml").read_bytes(), (args.keep / "zone.txt").read_text()
    else:
        data, zone = signed_message(args.size)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            (args.keep / "message.eml").write_bytes(data)
            (args.keep / "zone.txt").write_text(zone)
    with DnsResponder(zone, ".") as dns:
        uvloop.run(measure(dns, data, args.messages, args.repeats, args.profile))


if __name__ == "__main__":
    main()

"""DKIM signing through a real server: [[dkim_sign]] in the file, mail over SMTP from a
client that may relay is stored signed (RSA and Ed25519), under this server's Received
field; a client that may not relay gets no signature.  The stored bytes are verified by
our verifier and by dkimpy, keys served by a loopback DNS responder."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.agents.api import Message
from engine.agents.dns import Lookup
from engine.config import DkimSignConfig, HttpConfig, HttpToken
from engine.message.dkim import fold_txt, key_record, private_pem, verify
from engine.queue.records import id_bytes
from engine.testing.dns import DnsResponder
from engine.testing.rawsmtp import one_message
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.integration.conftest import FerryToml

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ZONE = "".join(f"{sel}._domainkey.example.com. 300 IN TXT {fold_txt(key_record(key))}\n"
               for sel, key in (("r1", RSA_KEY), ("e1", ED_KEY)))
BODY = (b"From: App <app@example.com>\r\nTo: user@example.org\r\nSubject: receipt\r\n"
        b"Date: Mon, 7 Dec 2026 00:00:00 +0000\r\nMessage-ID: <r.1@example.com>\r\n\r\n"
        b"Thank you.\r\n")

Start = Callable[[bool], RunningFerry]
#: Where the counting sink of tests/integration/conftest.py listens.
SINK_ADDRESSES = ["127.0.10.1"]
TRUSTED, APP = "t" * 32, "a" * 32


@pytest.fixture
def start(tmp_path: Path, ferry_toml: FerryToml) -> Start:
    """``start(relay)``: a server signing for example.com; the test client (127.0.0.1) may
    relay or not."""
    (tmp_path / "rsa.pem").write_bytes(private_pem(RSA_KEY))
    (tmp_path / "ed.pem").write_bytes(private_pem(ED_KEY))

    def run(relay: bool) -> RunningFerry:
        return ferry_toml("""[[dkim_sign]]
domain = "example.com"
selector = "r1"
key_file = "rsa.pem"
[[dkim_sign]]
domain = "example.com"
selector = "e1"
key_file = "ed.pem"
""", relay=relay)

    return run


def send(ferry: RunningFerry) -> bytes:
    """One message to user@example.org; the stored bytes."""
    reply = one_message(ferry.host, ferry.port, BODY, mail=b"app@example.com",
                        rcpt=b"user@example.org")
    assert reply.code == 250, reply
    return ferry.store.body(id_bytes(" ".join(reply.lines).rsplit(" ", 1)[1]))


@pytest.fixture(scope="module")
def responder() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as server:
        yield server


def test_relayed_mail_is_stored_signed_twice(start: Start, responder: DnsResponder) -> None:
    stored = send(start(True))
    fields = [line.split(b":")[0] for line in stored.split(b"\r\n\r\n")[0].split(b"\r\n")
              if line[:1] not in (b" ", b"\t")]
    # This server's Received field on top (added after signing, and never signed).
    assert fields[:3] == [b"Received", b"DKIM-Signature", b"DKIM-Signature"]
    assert stored.endswith(BODY)

    assert results_of(responder, stored) == [("pass", "e1"), ("pass", "r1")]

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        async def go() -> bytes | None:
            answer = await Lookup(responder.address).query(name.decode(), "TXT")
            return answer.records[0].encode() if answer.records else None

        return asyncio.run(go())

    # dkimpy checks the first signature it finds: put the RSA one first (no PyNaCl here).
    assert dkim.verify(_rsa_on_top(stored), dnsfunc=txt)


def _rsa_on_top(stored: bytes) -> bytes:
    """The message with its RSA DKIM-Signature field moved to the top."""
    header, _, body = stored.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    rsa_field = next(f for f in fields if f.startswith(b"DKIM-Signature:") and b"rsa" in f)
    fields.remove(rsa_field)
    return b"\r\n".join([rsa_field, *fields]) + b"\r\n\r\n" + body


def test_mail_of_a_client_that_may_not_relay_is_not_signed(start: Start) -> None:
    stored = send(start(False))
    assert b"DKIM-Signature" not in stored and stored.endswith(BODY)


def results_of(responder: DnsResponder, data: bytes) -> list[tuple[str, str]]:
    async def check() -> list[tuple[str, str]]:
        found = await verify(Message(data), Lookup(responder.address))
        return sorted((r.result, r.selector) for r in found)

    return asyncio.run(check())


def test_injected_mail_is_delivered_as_it_was_signed(tmp_path: Path, sink: CountingSink,
                                                     responder: DnsResponder) -> None:
    """Over HTTP: a trusted token's mail is signed before it is stored, and the signatures
    still verify where it is delivered (the stored bytes are the delivered bytes); an
    untrusted token's mail (it may not relay) is delivered unsigned."""
    (tmp_path / "rsa.pem").write_bytes(private_pem(RSA_KEY))
    (tmp_path / "ed.pem").write_bytes(private_pem(ED_KEY))
    config = ferry_config(tmp_path / "spool")
    tokens = {"relay": HttpToken(token=TRUSTED, scopes=("inject",), trusted=True),
              "app": HttpToken(token=APP, scopes=("inject",))}
    config = dataclasses.replace(
        config, accepted_domains=("example.org",),
        http=HttpConfig(listen=(("127.0.0.1", 0),), tokens=tokens, trust_loopback=False),
        delivery=dataclasses.replace(config.delivery, paused=False,
                                     smarthost=("127.0.10.1", sink.port)),
        dkim_sign=(DkimSignConfig("example.com", "r1", tmp_path / "rsa.pem"),
                   DkimSignConfig("example.com", "e1", tmp_path / "ed.pem")))
    with RunningFerry(config) as ferry:
        assert ferry.app.http is not None
        url = f"http://{ferry.app.http.addresses[0]}/api/v1/messages"

        async def post(token: str) -> int:
            doc = {"from": "app@example.com", "recipients": ["user@example.org"],
                   "content": BODY.decode()}
            async with aiohttp.ClientSession() as session, session.post(
                    url, json=doc, headers={"Authorization": f"Bearer {token}"}) as answer:
                return answer.status

        assert asyncio.run(post(TRUSTED)) == 200
        wait_for(lambda: len(sink.state.messages) == 1)
        assert asyncio.run(post(APP)) == 200
        wait_for(lambda: len(sink.state.messages) == 2)
    signed, unsigned = (m.body for m in sink.state.messages)
    assert results_of(responder, signed) == [("pass", "e1"), ("pass", "r1")]
    assert b"DKIM-Signature" not in unsigned

"""DKIM against a real DNS server on loopback (engine.testing.dns): our signatures verified
by dkimpy, dkimpy's signatures verified by ours, and every verification result.

dkimpy looks keys up through ``dnsfunc``, here a dnspython query to the same responder.
dkimpy needs PyNaCl for Ed25519, which the venv lacks: our Ed25519 signatures are checked
by OpenDKIM instead (tests/interop/test_opendkim.py) and by our verifier here.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import dkim  # type: ignore[import-untyped]
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.agents.api import Message, MethodResult
from engine.agents.batch import ThreadBatches
from engine.agents.dns import Lookup
from engine.message.dkim import (
    INLINE_KEY_BITS,
    DkimResult,
    Signer,
    fold_txt,
    key_record,
    parse_tag_list,
    signatures_valid,
    verify,
    verify_now,
)
from engine.testing.dns import DnsResponder

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
SHORT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
# RFC 8301 §3.2 lets verifiers accept 1024 bits, not fewer: a 512-bit public key (any odd
# modulus loads; nothing is ever verified with it, the size is checked first).
TINY_KEY = rsa.RSAPublicNumbers(65537, (1 << 511) + 0x2468ACF1).public_key()
# Now, not a fixed date: dkimpy refuses a t= in the future.
NOW = int(time.time())


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def txt(name: str, value: str) -> str:
    return f"{name}._domainkey.example.com. 300 IN TXT {fold_txt(value)}\n"


ZONE = (
    "example.com. 300 IN A 192.0.2.1\n"
    + txt("rsa", key_record(RSA_KEY))
    + txt("ed", key_record(ED_KEY))
    + txt("short", key_record(SHORT_KEY))
    + txt("tiny", "v=DKIM1; k=rsa; p=" + base64.b64encode(TINY_KEY.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode())
    + txt("revoked", "v=DKIM1; k=rsa; p=")
    + txt("mismatch", key_record(ED_KEY).replace("k=ed25519", "k=rsa"))
)

MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
    b"\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def responder() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as server:
        server.servfail.add("temp._domainkey.example.com")
        yield server


def dnsfunc(responder: DnsResponder):  # type: ignore[no-untyped-def]
    """dkimpy's key lookup, answered by the responder over UDP (TCP when truncated)."""
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        query = dns.message.make_query(text, dns.rdatatype.TXT)
        reply, _ = dns.query.udp_with_fallback(query, responder.host, timeout=timeout,
                                               port=responder.port)
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None

    return lookup


def our_verify(responder: DnsResponder, data: bytes, now: float = NOW,
               max_signatures: int = 5) -> list[DkimResult]:
    """Our results for ``data``, checked twice: with the key looked up, then with its
    answer cached (verify_now's path without waiting, when it can take it): the same."""
    async def run() -> list[DkimResult]:
        lookup = Lookup(responder.address)
        first = await verify(Message(data), lookup, now=now, max_signatures=max_signatures)
        again = verify_now(Message(data), lookup, now=now, max_signatures=max_signatures)
        assert (again if isinstance(again, list) else await again) == first
        # The public-key operations made in a thread, as the verify agent has them: with
        # the keys cached, and looked up first.
        for keys in (lookup, Lookup(responder.address)):
            threaded = verify_now(Message(data), keys, now=now,
                                  max_signatures=max_signatures,
                                  checker=ThreadBatches(signatures_valid))
            assert (threaded if isinstance(threaded, list) else await threaded) == first
        return first

    return asyncio.run(run())


def test_a_cached_key_verifies_without_waiting(responder: DnsResponder) -> None:
    signed = MESSAGE
    for selector, key in (("ed", ED_KEY), ("rsa", RSA_KEY)):
        signed = signer(selector, key).sign(signed) + signed

    async def run() -> tuple[object, object]:
        lookup = Lookup(responder.address)
        first = verify_now(Message(signed), lookup, now=NOW)  # keys not cached yet
        assert not isinstance(first, list)
        return await first, verify_now(Message(signed), lookup, now=NOW)

    first, again = asyncio.run(run())
    assert isinstance(again, list)
    assert [r.result for r in again] == ["pass", "pass"]
    assert again == first


def test_a_key_longer_than_4096_bits_is_used_off_the_loop() -> None:
    """RFC 8301 §3.2 lets a sender publish a key longer than 4096 bits: it verifies, but in
    the executor (INLINE_KEY_BITS), even when cached: verify_now gives an awaitable, where
    a 2048-bit key's cached check gives its results at once (the test above)."""
    long_key = rsa.generate_private_key(public_exponent=65537, key_size=INLINE_KEY_BITS + 64)
    signed = signer("long", long_key).sign(MESSAGE) + MESSAGE

    async def run() -> tuple[object, object]:
        lookup = Lookup(server.address)
        first = verify_now(Message(signed), lookup, now=NOW)
        assert not isinstance(first, list)
        results = await first  # the key is cached now
        again = verify_now(Message(signed), lookup, now=NOW)
        assert not isinstance(again, list)
        return results, await again

    with DnsResponder("example.com. 300 IN A 192.0.2.1\n"
                      + txt("long", key_record(long_key))) as server:
        first, again = asyncio.run(run())
    assert [r.result for r in again] == ["pass"]  # type: ignore[attr-defined]
    assert again == first


def signer(selector: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
           **kw: object) -> Signer:
    return Signer("example.com", selector, key, clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def dkimpy_sign(selector: str, key: rsa.RSAPrivateKey, data: bytes = MESSAGE,
                **kw: object) -> bytes:
    return dkim.sign(data, selector.encode(), b"example.com", pem(key),  # type: ignore[no-any-return]
                     **kw) + data


# --- our signatures, dkimpy's verdict -------------------------------------------------------

@pytest.mark.parametrize("canon", [("relaxed", "relaxed"), ("simple", "simple"),
                                   ("relaxed", "simple"), ("simple", "relaxed")])
@pytest.mark.parametrize("oversign", [True, False])
def test_dkimpy_verifies_our_rsa_signature(responder: DnsResponder,
                                           canon: tuple[str, str], oversign: bool) -> None:
    signed = signer("rsa", RSA_KEY, canon=canon, oversign=oversign).sign(MESSAGE) + MESSAGE
    assert dkim.verify(signed, dnsfunc=dnsfunc(responder))
    assert our_verify(responder, signed)[0].result == "pass"


def test_dkimpy_sees_oversigning(responder: DnsResponder) -> None:
    """A Subject added above an over-signed one breaks the signature; without over-signing
    it does not (that is the attack §5.4.2 closes)."""
    forged = b"Subject: Pay now\r\n"
    for oversign, survives in ((True, False), (False, True)):
        field = signer("rsa", RSA_KEY, oversign=oversign).sign(MESSAGE)
        assert dkim.verify(field + forged + MESSAGE, dnsfunc=dnsfunc(responder)) is survives
        ours = our_verify(responder, field + forged + MESSAGE)[0]
        assert (ours.result == "pass") is survives, ours


# --- dkimpy's signatures, our verdict -------------------------------------------------------

@pytest.mark.parametrize("canon", [(b"relaxed", b"relaxed"), (b"simple", b"simple"),
                                   (b"relaxed", b"simple"), (b"simple", b"relaxed")])
def test_we_verify_dkimpy_signatures(responder: DnsResponder,
                                     canon: tuple[bytes, bytes]) -> None:
    signed = dkimpy_sign("rsa", RSA_KEY, canonicalize=canon)
    [result] = our_verify(responder, signed)
    assert result.result == "pass", result
    b = signed.split(b" b=")[1].replace(b"\r\n", b"").replace(b" ", b"")[:8].decode()
    assert result.method_result() == MethodResult("dkim", "pass", "", (
        ("header.d", "example.com"), ("header.i", "@example.com"), ("header.s", "rsa"),
        ("header.b", b)))


def test_body_length_tag(responder: DnsResponder) -> None:
    """l= (dkimpy's length=True): text appended after signing still passes, with a note
    that says how much of the body is signed."""
    signed = dkimpy_sign("rsa", RSA_KEY, length=True)
    assert our_verify(responder, signed)[0].note == ""
    [result] = our_verify(responder, signed + b"Unsigned postscript.\r\n")
    assert result.result == "pass"
    # The message's two empty lines at its end are no longer at the end: they count now.
    signed_length = int(parse_tag_list(signed.split(b"\r\n\r\n")[0].decode()
                                       .partition(":")[2])["l"])
    assert result.note == f"l= signs {signed_length} of {signed_length + 4 + 22} body octets"
    assert result.method_result().reason == result.note


def test_rsa_sha1_is_refused(responder: DnsResponder) -> None:
    signed = dkimpy_sign("rsa", RSA_KEY, signature_algorithm=b"rsa-sha1")
    [result] = our_verify(responder, signed)
    assert (result.result, result.reason) == ("policy", "rsa-sha1 is not accepted (RFC 8301 §3.1)")


def test_key_sizes(responder: DnsResponder) -> None:
    """1024 bits is the least a verifier accepts (RFC 8301 §3.2); 512 is refused."""
    assert our_verify(responder, dkimpy_sign("short", SHORT_KEY))[0].result == "pass"
    [result] = our_verify(responder, dkimpy_sign("tiny", SHORT_KEY))
    assert result.result == "policy" and result.reason.startswith("key too short (512 bits")


# --- results --------------------------------------------------------------------------------

def test_ed25519_passes(responder: DnsResponder) -> None:
    signed = signer("ed", ED_KEY).sign(MESSAGE) + MESSAGE
    [result] = our_verify(responder, signed)
    assert (result.result, result.algorithm, result.selector) == ("pass", "ed25519-sha256", "ed")


def test_dual_signature(responder: DnsResponder) -> None:
    """RFC 8463 §3's dual signing: an RSA and an Ed25519 signature, both pass."""
    signed = MESSAGE
    for selector, key in (("ed", ED_KEY), ("rsa", RSA_KEY)):
        signed = signer(selector, key).sign(signed) + signed
    assert [r.result for r in our_verify(responder, signed)] == ["pass", "pass"]
    assert dkim.verify(signed, dnsfunc=dnsfunc(responder))  # dkimpy checks the top one (RSA)


def test_bad_body_hash(responder: DnsResponder) -> None:
    signed = signer("rsa", RSA_KEY).sign(MESSAGE) + MESSAGE
    [result] = our_verify(responder, signed.replace(b"We lost", b"We won"))
    assert (result.result, result.reason) == ("fail", "bad body hash")


def test_bad_signature(responder: DnsResponder) -> None:
    signed = signer("ed", ED_KEY).sign(MESSAGE) + MESSAGE
    [result] = our_verify(responder, signed.replace(b"dinner", b"lunch"))
    assert (result.result, result.reason) == ("fail", "signature did not verify")
    assert result.method_result().prop("header.d") == "example.com"


@pytest.mark.parametrize(("selector", "result", "reason"), [
    ("absent", "permerror", "no key"),                  # NXDOMAIN
    ("revoked", "permerror", "key revoked"),            # p= empty
    ("mismatch", "permerror", "key type k=rsa does not match a=ed25519-sha256"),
    ("temp", "temperror", "key lookup failed"),         # SERVFAIL
])  # fmt: skip
def test_key_problems(responder: DnsResponder, selector: str, result: str, reason: str) -> None:
    signed = signer(selector, ED_KEY).sign(MESSAGE) + MESSAGE
    [got] = our_verify(responder, signed)
    assert got.result == result and got.reason.startswith(reason), got
    assert got.selector == selector


def test_expired_signature(responder: DnsResponder) -> None:
    signed = signer("rsa", RSA_KEY, lifetime=3600).sign(MESSAGE) + MESSAGE
    assert our_verify(responder, signed, now=NOW + 3599)[0].result == "pass"
    [result] = our_verify(responder, signed, now=NOW + 3601)
    assert (result.result, result.reason) == ("policy", "signature expired")


@pytest.mark.parametrize(("field", "result", "reason"), [
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=to; bh=AA==; b=AA==",
     "permerror", "From is not signed"),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; h=from; bh=AA==; b=AA==",
     "permerror", "signature missing required tag s="),
    (b"DKIM-Signature: v=1; a=rsa-md5; d=example.com; s=rsa; h=from; bh=AA==; b=AA==",
     "neutral", "unknown algorithm"),
    (b"DKIM-Signature: v=1; v=1; a=rsa-sha256", "permerror", "bad signature syntax"),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa; h=from; i=x@evil.test; "
     b"bh=AA==; b=AA==", "permerror", "i= is not in the d= domain"),
])  # fmt: skip
def test_malformed_signatures(responder: DnsResponder, field: bytes, result: str,
                              reason: str) -> None:
    [got] = our_verify(responder, field + b"\r\n" + MESSAGE)
    assert got.result == result and got.reason.startswith(reason), got


def test_unsigned_and_max_signatures(responder: DnsResponder) -> None:
    assert our_verify(responder, MESSAGE) == []
    signed = MESSAGE
    for _ in range(4):
        signed = signer("ed", ED_KEY).sign(signed) + signed
    assert len(our_verify(responder, signed, max_signatures=3)) == 3


def test_large_body_verifies_in_a_thread(responder: DnsResponder) -> None:
    """A large body (hashed in the executor, in 64 KiB chunks): same verdicts."""
    big = MESSAGE + b"A line of text that repeats  \t \r\n" * 20_000
    signed = big
    for canon in (("relaxed", "relaxed"), ("simple", "simple")):
        signed = signer("rsa", RSA_KEY, canon=canon).sign(signed) + signed
    assert [r.result for r in our_verify(responder, signed)] == ["pass", "pass"]
    assert dkim.verify(signed, dnsfunc=dnsfunc(responder))

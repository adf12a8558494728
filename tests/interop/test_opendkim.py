"""Our DKIM signatures verified by OpenDKIM (``opendkim-testmsg``, Debian's opendkim-tools),
which looks the keys up in a DNS responder serving this module's zone on 127.0.0.1:53 in
private namespaces (engine.testing.opendkim); and OpenDKIM's own signature judged by ours.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.agents.api import Message
from engine.agents.dns import Lookup
from engine.message.dkim import Signer, fold_txt, key_record, private_pem, verify
from engine.testing import opendkim
from engine.testing.dns import DnsResponder

pytestmark = pytest.mark.skipif(opendkim.unavailable() is not None,
                                reason=str(opendkim.unavailable()))

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ZONE = "$TTL 300\n" + "".join(
    f"{sel}._domainkey.example.com. IN TXT {fold_txt(key_record(key))}\n"
    for sel, key in (("rsa", RSA_KEY), ("ed", ED_KEY), ("wrong", OTHER_KEY)))

# OpenDKIM wants the fields RFC 5322 §3.6 requires (Date, From) and signs Message-ID.
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
           b"Subject: interop  with\r\n\tOpenDKIM\r\nDate: Mon, 7 Dec 2026 00:00:00 +0000\r\n"
           b"Message-ID: <opendkim.1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain\r\n\r\nHello  \t there.\r\n\r\n.\r\nBye.\r\n\r\n\r\n")


@pytest.mark.parametrize("canon", [("relaxed", "relaxed"), ("simple", "simple"),
                                   ("relaxed", "simple"), ("simple", "relaxed")])
@pytest.mark.parametrize("selector", ["rsa", "ed"])
def test_opendkim_verifies_our_signature(selector: str, canon: tuple[str, str]) -> None:
    key = RSA_KEY if selector == "rsa" else ED_KEY
    signed = Signer("example.com", selector, key, canon=canon).sign(MESSAGE) + MESSAGE  # type: ignore[arg-type]
    result = opendkim.verify(signed, ZONE)
    assert result.returncode == 0, result.stderr
    # The same bytes with one body octet changed: OpenDKIM does check.
    changed = opendkim.verify(signed.replace(b"Bye.", b"Bye!"), ZONE)
    assert changed.returncode != 0 and "Bad signature" in changed.stderr


def test_opendkim_looks_the_key_up() -> None:
    """The wrong published key fails; so OpenDKIM used the responder's record."""
    signed = Signer("example.com", "wrong", RSA_KEY).sign(MESSAGE) + MESSAGE
    assert opendkim.verify(signed, ZONE).returncode != 0


def test_we_refuse_opendkim_testmsg_rsa_sha1(tmp_path: Path) -> None:
    """opendkim-testmsg can only sign with rsa-sha1, which RFC 8301 §3.1 forbids verifiers
    to accept: we say "policy", not "pass"."""
    key_file = tmp_path / "rsa.pem"
    key_file.write_bytes(private_pem(RSA_KEY))
    signed = subprocess.run([opendkim.TESTMSG, "-C", "-d", "example.com", "-s", "rsa", "-k",
                             str(key_file)], input=MESSAGE, capture_output=True, timeout=60)
    assert signed.returncode == 0, signed.stderr
    assert b"a=rsa-sha1;" in signed.stdout

    async def check() -> list[tuple[str, str]]:
        with DnsResponder(ZONE) as responder:
            found = await verify(Message(signed.stdout), Lookup(responder.address))
        return [(r.result, r.reason) for r in found]

    assert asyncio.run(check()) == [("policy", "rsa-sha1 is not accepted (RFC 8301 §3.1)")]

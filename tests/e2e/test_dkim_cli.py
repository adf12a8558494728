"""``ferry dkim keygen``: the key it writes signs, and the zone line it prints, served by a
DNS responder, verifies the signature (ours and dkimpy's verifier)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import dns.message
import dns.query
import dns.rdatatype
import pytest

from engine.agents.api import Message
from engine.agents.dns import Lookup
from engine.message.dkim import Signer, load_signing_key, verify
from engine.testing.dns import DnsResponder

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: keys\r\n\r\nHello.\r\n"


def keygen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "dkim", "keygen", *args],
                          capture_output=True, text=True, timeout=60, env=ENV)


@pytest.mark.parametrize("flags", [[], ["--ed25519"], ["--bits", "3072"]])
def test_keygen_key_and_record_verify(tmp_path: Path, flags: list[str]) -> None:
    out = keygen("Example.COM", "s2026", "--out", str(tmp_path), *flags)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "example.com.s2026.pem"
    kind = "Ed25519" if flags == ["--ed25519"] else f"RSA {flags[1] if flags else 2048} bits"
    assert out.stderr == f"wrote {path} ({kind}, mode 0600)\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert out.stdout.startswith("s2026._domainkey.example.com. IN TXT ")
    # Every character-string of the record fits in 255 octets (RFC 1035 §3.3.14).
    assert all(len(part) <= 255 for part in out.stdout.split('"')[1::2])
    signed = Signer("example.com", "s2026", load_signing_key(path)).sign(MESSAGE) + MESSAGE
    # The line as a zone file holds it (keygen prints no TTL: the zone's $TTL applies).
    with DnsResponder("$TTL 300\n" + out.stdout) as responder:
        async def run() -> list[str]:
            found = await verify(Message(signed), Lookup(responder.address))
            return [r.result for r in found]

        assert asyncio.run(run()) == ["pass"]
        if flags != ["--ed25519"]:  # dkimpy verifies Ed25519 only with PyNaCl
            def txt(name: bytes, timeout: float = 5) -> bytes | None:
                reply = dns.query.udp_with_fallback(
                    dns.message.make_query(name.decode(), dns.rdatatype.TXT),
                    responder.host, timeout=timeout, port=responder.port)[0]
                return b"".join(next(iter(reply.answer[0])).strings) if reply.answer else None

            assert dkim.verify(signed, dnsfunc=txt)


def test_keygen_refuses(tmp_path: Path) -> None:
    assert keygen("example.com", "a", "--ed25519", "--out", str(tmp_path)).returncode == 0
    again = keygen("example.com", "a", "--out", str(tmp_path))
    assert again.returncode == 1 and "File exists" in again.stderr  # never overwritten
    short = keygen("example.com", "b", "--bits", "1024", "--out", str(tmp_path))
    assert short.returncode == 2 and "2048 bits or more" in short.stderr
    bad = keygen("exa mple.com", "c", "--out", str(tmp_path))
    assert bad.returncode == 2 and "is not a DNS name" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.com.a.pem"]

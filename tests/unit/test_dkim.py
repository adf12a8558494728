"""DKIM's parts that need no DNS: tag lists (RFC 6376 §3.2), canonicalisation (§3.4 and
its §3.4.5 example), the streaming body canonicalisers against one-shot, the signature
field's shape, signing keys."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.message._canon_py import without_b
from engine.message.dkim import (
    DkimError,
    DkimKeyError,
    RelaxedBody,
    Signer,
    SimpleBody,
    _base64,
    _Field,
    body_hash,
    fold_txt,
    key_record,
    load_signing_key,
    parse_tag_list,
    relaxed_header,
)
from engine.testing.chunkings import chunkings, fed

# RFC 6376 §3.4.5: the example message, and what each canonicalisation makes of it.
EXAMPLE_HEADER = [(b"A", b" X"), (b"B ", b" Y\t\r\n\tZ  ")]
EXAMPLE_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_example_relaxed() -> None:
    assert [relaxed_header(n, v) for n, v in EXAMPLE_HEADER] == [b"a:X\r\n", b"b:Y Z\r\n"]
    assert fed(RelaxedBody, [EXAMPLE_BODY]) == b" C\r\nD E\r\n"


def test_rfc6376_example_simple() -> None:
    assert fed(SimpleBody, [EXAMPLE_BODY]) == b" C \r\nD \t E\r\n"


@pytest.mark.parametrize(("body", "simple", "relaxed"), [
    (b"", b"\r\n", b""),                       # §3.4.3 / §3.4.4: the empty body
    (b"\r\n\r\n", b"\r\n", b""),               # only empty lines
    (b"x", b"x\r\n", b"x\r\n"),                # no CRLF at the end: one is added
    (b"x  \r\n \t \r\n", b"x  \r\n \t \r\n", b"x\r\n"),  # a line of blanks is empty in relaxed
    (b"a\r\n\r\nb\r\n\r\n", b"a\r\n\r\nb\r\n", b"a\r\n\r\nb\r\n"),  # inner empty lines stay
    (b"a\rb\r\n", b"a\rb\r\n", b"a\rb\r\n"),  # a bare CR is text
])  # fmt: skip
def test_body_edges(body: bytes, simple: bytes, relaxed: bytes) -> None:
    assert fed(SimpleBody, [body]) == simple
    assert fed(RelaxedBody, [body]) == relaxed
    # body_hash (one update of the buffer for simple) agrees with the stream.
    assert body_hash(body, "simple") == (hashlib.sha256(simple).digest(), len(simple))
    assert body_hash(body, "relaxed") == (hashlib.sha256(relaxed).digest(), len(relaxed))


def test_every_chunking_of_the_example() -> None:
    for kind in (SimpleBody, RelaxedBody):
        whole = fed(kind, [EXAMPLE_BODY])
        for chunks in chunkings(EXAMPLE_BODY, pair_limit=0):
            assert fed(kind, chunks) == whole, chunks


_BODY = st.lists(st.sampled_from([b" ", b"\t", b"\r\n", b"\r", b"\n", b"a", b"bc ", b"  \r\n"]),
                 max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(body=_BODY, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_streaming_equals_one_shot(body: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    for kind in (SimpleBody, RelaxedBody):
        assert fed(kind, chunks) == fed(kind, [body])


def test_a_line_longer_than_a_chunk() -> None:
    # Passed on before its end; the result must not change (runs across the cut).
    body = b"x" + b" " * 70_000 + b"y" * 70_000 + b"  \t\r\n"
    expected = b"x y" + b"y" * 69_999 + b"\r\n"
    assert fed(RelaxedBody, [body]) == expected
    assert fed(RelaxedBody, [body[i : i + 4096] for i in range(0, len(body), 4096)]) \
        == expected


def test_body_length_limit() -> None:
    digest, length = body_hash(b"hello\r\nworld\r\n", "simple", limit=7)
    assert digest == hashlib.sha256(b"hello\r\n").digest() and length == 14


@pytest.mark.parametrize(("text", "tags"), [
    ("v=1; a=rsa-sha256; d=example.net", {"v": "1", "a": "rsa-sha256", "d": "example.net"}),
    ("v=1;a=x;", {"v": "1", "a": "x"}),                     # a trailing ";"
    (" k = rsa ;\r\n\tp = AB\r\n CD ", {"k": "rsa", "p": "AB\r\n CD"}),  # FWS kept inside
    ("n=", {"n": ""}),
])  # fmt: skip
def test_tag_list(text: str, tags: dict[str, str]) -> None:
    assert parse_tag_list(text) == tags


@pytest.mark.parametrize("text", ["v=1; v=2", "v=1; junk", "1v=2", "a=b;;c=d"])
def test_bad_tag_lists(text: str) -> None:
    with pytest.raises(DkimError):
        parse_tag_list(text)


# §3.7's b= removal as it was written first (a regular expression): the split at ";"
# that replaced it must give the same bytes for any field value.
_B_TAG = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*", re.DOTALL)


@pytest.mark.parametrize("value", [
    b" v=1; a=rsa-sha256; bh=AB=; b=CD\r\n EF==; d=x", b" b=XY", b"b =  Z", b" bh=1;b\t=2",
    b" v=1; bh=Q; h=from", b" b", b"; ;b=;b=Z", b" x=b=1; b=2", b"\r\n\tb\r\n =abc;d=e",
])  # fmt: skip
def test_without_b_cases(value: bytes) -> None:
    _check_without_b(value)


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"b", b"bh", b"=", b";", b" ", b"\t", b"\r\n", b"x", b"B"]),
                max_size=14).map(b"".join))
def test_without_b_matches_the_regex(value: bytes) -> None:
    _check_without_b(value)


def _check_without_b(value: bytes) -> None:
    field = _Field(b"dkim-signature", b"DKIM-Signature:" + value, 15)
    expected = b"DKIM-Signature:" + _B_TAG.sub(lambda m: m.group(1), value, count=1)
    assert without_b(field) == (b"dkim-signature", expected, 15)
    # The verifier's header data (engine.message.canon, both implementations) removes the
    # same value: simple canonicalisation of the signature field alone is the field.
    for _, impl in _speedups.implementations("canon"):
        assert impl.header_data([], (), field, False) == expected


@pytest.mark.parametrize(("value", "decoded"), [
    ("Zm9v", b"foo"), ("Zm9v\r\n YmFy", b"foobar"), (" Zm8= ", b"fo"), ("", b""),
])  # fmt: skip
def test_base64_values(value: str, decoded: bytes) -> None:
    assert _base64(value, "b=") == decoded  # FWS anywhere inside is not part of the value


@pytest.mark.parametrize("value", ["Zm9", "Zm9v!", "Zm=9v", "Zm9vé"])
def test_bad_base64_values(value: str) -> None:
    # Strict base64 (RFC 6376 §2.11): padding only at the end, nothing outside the
    # alphabet, no non-ASCII; a permanent error, never an exception of another kind.
    with pytest.raises(DkimError, match="b= is not base64"):
        _base64(value, "b=")


MESSAGE = (b"From: Joe <joe@example.com>\r\nTo: x@example.net\r\nSubject: hi\r\n"
           b"Subject: again\r\n\r\nbody\r\n")


def test_signature_field_shape() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    field = Signer("Example.COM", "sel", key, headers=("From", "To", "Subject", "Cc"),
                   oversign=("from", "subject", "cc"), clock=lambda: 1_700_000_000).sign(MESSAGE)
    assert field.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert field.endswith(b"\r\n") and not field.endswith(b"\r\n\r\n")
    lines = field[:-2].split(b"\r\n")
    assert all(len(line) < 78 for line in lines)
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:])
    tags = parse_tag_list(field.decode().partition(":")[2])
    assert tags["d"] == "example.com" and tags["t"] == "1700000000"
    # From once + over-signed, To once (not over-signed), Subject twice + 1, Cc absent: 1.
    assert tags["h"].replace("\r\n", "").replace(" ", "") == \
        "from:from:to:subject:subject:subject:cc"
    assert "l" not in tags


def test_signing_needs_from() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(DkimError, match="no From"):
        Signer("example.com", "s", key).sign(b"To: x@example.net\r\n\r\nbody\r\n")


def write_key(path: Path, key: object, password: bytes | None = None) -> Path:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


def test_load_signing_keys(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    assert isinstance(load_signing_key(write_key(tmp_path / "r.pem", rsa_key)),
                      rsa.RSAPrivateKey)
    loaded = load_signing_key(write_key(tmp_path / "e.pem", ed_key))
    assert key_record(loaded) == key_record(ed_key)
    assert key_record(loaded).startswith("v=DKIM1; k=ed25519; p=")


@pytest.mark.parametrize(("make", "password", "why"), [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), None,
     "1024 bits; DKIM signing needs 2048"),
    (lambda: ec.generate_private_key(ec.SECP256R1()), None, "RSA .2048\\+ bits. or Ed25519"),
    (lambda: ed25519.Ed25519PrivateKey.generate(), b"secret", "encrypted with a passphrase"),
])  # fmt: skip
def test_unusable_signing_keys(tmp_path: Path, make: object, password: bytes | None,
                               why: str) -> None:
    path = write_key(tmp_path / "k.pem", make(), password)  # type: ignore[operator]
    with pytest.raises(DkimKeyError, match=why) as info:
        load_signing_key(path)
    assert str(path) in str(info.value)


def test_missing_and_non_pem_key_files(tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError, match="cannot read"):
        load_signing_key(tmp_path / "absent.pem")
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(DkimKeyError, match="no PEM private key"):
        load_signing_key(tmp_path / "cert.pem")


def test_fold_txt() -> None:
    assert fold_txt("v=DKIM1; p=") == '"v=DKIM1; p="'
    value = "x" * 600
    folded = fold_txt(value)
    strings = [s.strip().strip('"') for s in folded.strip("( )").split("\n")]
    assert [len(s) for s in strings] == [255, 255, 90] and "".join(strings) == value

"""DKIM's public-key operations (engine.message.pkey) on both implementations: the compiled
one (OpenSSL's libcrypto, holding the GIL but for a batch of RSA signatures) and its twin
(``cryptography``) make the same Ed25519 and RSA signatures, accept the same signatures and
refuse the same keys."""

from __future__ import annotations

import ctypes.util
import functools
import hashlib
from types import ModuleType

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.message import pkey
from engine.testing.gil import gil_handoff

IMPLS = _speedups.implementations("pkey")
IDS = [name for name, _ in IMPLS]
MODULES = [module for _, module in IMPLS]

ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ED_RAW = bytes(range(32))
ED_PUBLIC = ED_KEY.public_key().public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_DER = RSA_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
RSA_PKCS1 = RSA_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.PKCS1)
EC_DER = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_der(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
                form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
                password: bytes = b"") -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.DER, form, encryption)


RSA_PRIVATE = private_der(RSA_KEY)

#: Key lengths the Hypothesis test draws from: RFC 8301 §3.2's range and beyond it (more
#: than 4,096 bits, a length not a multiple of 8, the 1,024 bits verifiers still take).
RSA_BITS = (1024, 1031, 2048, 3072, 4104)


@functools.cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return RSA_KEY if bits == 2048 else rsa.generate_private_key(65537, bits)


def rsa_sign(digest: bytes) -> bytes:
    return RSA_KEY.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def test_the_selector_holds_the_gil_only_when_compiled() -> None:
    assert pkey.HOLDS_GIL is pkey.COMPILED
    assert [m.HOLDS_GIL for m in MODULES] == [name == "c" for name in IDS]


def test_the_compiled_module_signs_with_libsodium_where_the_system_has_it() -> None:
    # libsodium's Ed25519 signature costs half of OpenSSL 3.0's; the module opens the
    # library at import and falls back to OpenSSL without it (the other tests hold both
    # to the same signatures as cryptography's).
    compiled = dict(IMPLS).get("c")
    if compiled is None:
        pytest.skip("the compiled module is not built")
    expected = "libsodium" if ctypes.util.find_library("sodium") else "openssl"
    assert expected == compiled.ED25519_SIGNER


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_rfc8032_test_vector(impl: ModuleType) -> None:
    # RFC 8032 §7.1, TEST 2: one octet, 0x72.
    private = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
    public = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
    signature = bytes.fromhex(
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")
    assert impl.Ed25519Signer(private).sign(b"\x72") == signature
    assert impl.Verifier("ed25519", public).verify(signature, b"\x72")
    assert not impl.Verifier("ed25519", public).verify(signature, b"\x73")


@settings(max_examples=100, deadline=None)
@given(private=st.binary(min_size=32, max_size=32), data=st.binary(max_size=300))
def test_signatures_of_any_key_are_cryptographys(private: bytes, data: bytes) -> None:
    # Whichever library signs (libsodium or OpenSSL), the bytes are RFC 8032's.
    expected = ed25519.Ed25519PrivateKey.from_private_bytes(private).sign(data)
    assert {impl.Ed25519Signer(private).sign(data) for impl in MODULES} == {expected}


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), flip=st.integers(min_value=0, max_value=63))
def test_both_implementations_sign_and_verify_alike(data: bytes, flip: int) -> None:
    signatures = {impl.Ed25519Signer(ED_RAW).sign(data) for impl in MODULES}
    assert signatures == {ED_KEY.sign(data)}  # deterministic: the same bytes everywhere
    [good] = signatures
    bad = bytearray(good)
    bad[flip] ^= 1
    for impl in MODULES:
        verifier = impl.Verifier("ed25519", ED_PUBLIC)
        assert verifier.verify(good, data)
        assert not verifier.verify(bytes(bad), data)
        assert not verifier.verify(good[:-1], data)


@settings(max_examples=20, deadline=None)
@given(text=st.binary(max_size=100), flip=st.integers(min_value=0, max_value=255))
def test_both_implementations_check_rsa_alike(text: bytes, flip: int) -> None:
    digest = hashlib.sha256(text).digest()
    good = rsa_sign(digest)
    bad = bytearray(good)
    bad[flip] ^= 1
    for impl in MODULES:
        verifier = impl.Verifier("rsa", RSA_DER)
        assert verifier.kind == "rsa" and verifier.bits == 2048
        assert verifier.verify(good, digest)
        assert not verifier.verify(bytes(bad), digest)
        assert not verifier.verify(good, hashlib.sha256(text + b"!").digest())
        assert not verifier.verify(good, digest + b"\x00")  # not a SHA-256 digest
        assert not verifier.verify(b"", digest)


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
@pytest.mark.parametrize(("kind", "public"), [
    ("rsa", b""), ("rsa", RSA_DER[:-1]), ("rsa", RSA_DER + b"\x00"), ("rsa", EC_DER),
    ("rsa", ED_PUBLIC), ("rsa", RSA_PKCS1), ("ed25519", ED_PUBLIC[:-1]), ("ed25519", RSA_DER),
    ("dsa", RSA_DER),
], ids=["empty", "short", "trailing", "ec", "raw-ed25519", "pkcs1", "ed-short", "ed-der",
        "unknown-kind"])
def test_both_implementations_refuse_the_same_keys(impl: ModuleType, kind: str,
                                                   public: bytes) -> None:
    with pytest.raises(ValueError):
        impl.Verifier(kind, public)


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_a_private_key_of_the_wrong_size_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.Ed25519Signer(ED_RAW[:31])


@pytest.mark.skipif("c" not in IDS, reason="the compiled module is not in use")
def test_the_compiled_operations_keep_the_gil() -> None:
    compiled = dict(IMPLS)["c"]
    signer = compiled.Ed25519Signer(ED_RAW)
    verifier = compiled.Verifier("rsa", RSA_DER)
    digest = hashlib.sha256(b"x").digest()
    signature = rsa_sign(digest)

    def both() -> None:
        signer.sign(digest)
        verifier.verify(signature, digest)

    assert gil_handoff(both, 100) == 100


def outcomes(results: list[bytes | ValueError]) -> list[bytes | type[Exception]]:
    return [type(r) if isinstance(r, Exception) else r for r in results]


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from(RSA_BITS), pkcs1=st.booleans(),
       digests=st.lists(st.one_of(st.binary(min_size=32, max_size=32),
                                  st.binary(max_size=40)), max_size=4))
def test_rsa_signatures_of_any_key_are_cryptographys(bits: int, pkcs1: bool,
                                                     digests: list[bytes]) -> None:
    # RSA PKCS#1 v1.5 is deterministic (RFC 8017 §8.2.1): both implementations, and
    # cryptography itself, give the same octets for every key and digest; a digest that
    # is not 32 octets gets a ValueError in its place, the others their signatures.
    key = rsa_key(bits)
    der = private_der(key, serialization.PrivateFormat.TraditionalOpenSSL if pkcs1
                      else serialization.PrivateFormat.PKCS8)
    expected = [key.sign(d, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
                if len(d) == 32 else ValueError for d in digests]
    for impl in MODULES:
        signer = impl.RsaSigner(der)
        assert signer.bits == bits
        assert outcomes(signer.sign_digests(digests)) == expected
        assert outcomes(signer.sign_digests(iter(digests))) == expected  # any iterable


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_rsa_signatures_check_and_take_any_bytes(impl: ModuleType) -> None:
    digest = hashlib.sha256(b"x").digest()
    signer = impl.RsaSigner(bytearray(RSA_PRIVATE))
    assert signer.sign_digests([]) == []
    [from_view, from_bytes] = signer.sign_digests([memoryview(digest), digest])
    assert from_view == from_bytes == rsa_sign(digest)
    assert impl.Verifier("rsa", RSA_DER).verify(from_bytes, digest)
    with pytest.raises(TypeError):
        signer.sign_digests(["not bytes"])


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
@pytest.mark.parametrize("private", [
    b"", RSA_PRIVATE[:-1], RSA_PRIVATE + b"\x00", RSA_DER,
    private_der(ED_KEY), private_der(ec.generate_private_key(ec.SECP256R1())),
    private_der(RSA_KEY, password=b"secret"),
], ids=["empty", "short", "trailing", "public", "ed25519", "ec", "encrypted"])
def test_both_implementations_refuse_the_same_private_keys(impl: ModuleType,
                                                           private: bytes) -> None:
    with pytest.raises(ValueError):
        impl.RsaSigner(private)


@pytest.mark.skipif("c" not in IDS, reason="the compiled module is not in use")
def test_the_compiled_rsa_signatures_release_the_gil() -> None:
    # For the signing thread: the batch is signed outside the GIL (the loop runs on).
    signer = dict(IMPLS)["c"].RsaSigner(RSA_PRIVATE)
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(4)]
    assert gil_handoff(lambda: signer.sign_digests(digests), 20) < 20

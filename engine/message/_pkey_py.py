"""The pure-Python twin of engine._ext.pkey: the same operations through ``cryptography``.

Ed25519 signatures (RFC 8032 PureEdDSA, RFC 8463 §3), RSA PKCS#1 v1.5 signatures of SHA-256
digests (RFC 8017 §8.2.1, RFC 6376 §3.3.1) and signature checks (Ed25519, or RSA PKCS#1
v1.5 over a SHA-256 digest), with the compiled module's names, results and exceptions.
``cryptography`` releases the GIL inside each operation (:data:`HOLDS_GIL` False), so its
callers hand the operations to a thread (engine.agents.batch) rather than make them on
the event loop.  It must never do I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

__all__ = ["HOLDS_GIL", "Ed25519Signer", "RsaSigner", "Verifier"]

#: The operations release the GIL (``cryptography``): costly on an event loop.
HOLDS_GIL: Final = False

_PKCS1: Final = padding.PKCS1v15()
_SHA256: Final = utils.Prehashed(hashes.SHA256())


class Ed25519Signer:
    """An Ed25519 private key (the 32 raw octets of RFC 8032 §5.1.5); ``sign(data)`` is
    the 64-octet signature of ``data``.  ValueError for a key that is not 32 octets."""

    __slots__ = ("_key",)

    def __init__(self, private: bytes) -> None:
        if len(private) != 32:
            raise ValueError("an Ed25519 private key is 32 octets")
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(private))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))


class RsaSigner:
    """An RSA private key (DER: PKCS#8 PrivateKeyInfo, or PKCS#1 RSAPrivateKey) that signs
    SHA-256 digests with PKCS#1 v1.5 (RFC 8017 §8.2.1, as RFC 6376 §3.3.1 has rsa-sha256
    use it).  ``sign_digests(digests)`` is the list of their signatures, with a ValueError
    in the place of a digest that is not 32 octets or that OpenSSL could not sign.
    ValueError for a key that is not an RSA private key.  (``cryptography`` releases the
    GIL once per signature, where the compiled module releases it once per list.)"""

    __slots__ = ("_key",)

    def __init__(self, private: bytes) -> None:
        try:
            # Unchecked, as OpenSSL's d2i in the compiled module (the check costs ~40 ms
            # for 2,048 bits, seconds beyond 4,096): the signing key was checked when
            # cryptography loaded it from its file (engine.message.dkim.load_signing_key).
            loaded = serialization.load_der_private_key(bytes(private), password=None,
                                                        unsafe_skip_rsa_key_validation=True)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            loaded = None  # not DER, trailing octets, encrypted, or an unknown algorithm
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError("not an RSA private key")
        self._key = loaded

    @property
    def bits(self) -> int:
        return self._key.key_size

    def sign_digests(self, digests: Iterable[bytes]) -> list[bytes | ValueError]:
        out: list[bytes | ValueError] = []
        for digest in [bytes(d) for d in digests]:
            if len(digest) != 32:
                out.append(ValueError("a SHA-256 digest is 32 octets"))
                continue
            try:
                out.append(self._key.sign(digest, _PKCS1, _SHA256))
            except ValueError:
                out.append(ValueError("OpenSSL could not make the RSA signature"))
        return out


class Verifier:
    """A public key that checks signatures: ``kind`` "ed25519" (``public``: the 32 raw
    octets; ``verify`` checks PureEdDSA over ``data``) or "rsa" (``public``: DER
    SubjectPublicKeyInfo; ``verify`` checks PKCS#1 v1.5 of a SHA-256 ``data`` digest).
    ValueError for a key OpenSSL does not read as that kind."""

    __slots__ = ("_key", "kind")

    def __init__(self, kind: str, public: bytes) -> None:
        self.kind = kind
        self._key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
        if kind == "ed25519":
            if len(public) != 32:
                raise ValueError("an Ed25519 public key is 32 octets")
            self._key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(public))
        elif kind == "rsa":
            try:
                # SubjectPublicKeyInfo only, as the compiled module's d2i_PUBKEY reads.
                loaded = serialization.load_der_public_key(bytes(public))
            except (ValueError, UnsupportedAlgorithm):
                loaded = None
            if (not isinstance(loaded, rsa.RSAPublicKey)
                    or loaded.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                    != bytes(public)):
                raise ValueError(f"not an {kind} public key")
            self._key = loaded
        else:
            raise ValueError(f"unknown key kind {kind!r}")

    @property
    def bits(self) -> int:
        return 256 if isinstance(self._key, ed25519.Ed25519PublicKey) else self._key.key_size

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(bytes(signature), bytes(data))
            elif len(data) != 32:
                return False  # not a SHA-256 digest: OpenSSL refuses it too
            else:
                self._key.verify(bytes(signature), bytes(data), _PKCS1, _SHA256)
        except InvalidSignature:
            return False
        return True

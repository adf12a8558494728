"""The pure-Python twin of engine._ext.pkey: the same operations through ``cryptography``.

Ed25519 signatures (RFC 8032 PureEdDSA, RFC 8463 §3) and signature checks (Ed25519, or RSA
PKCS#1 v1.5 over a SHA-256 digest: RFC 6376 §3.3.1), with the compiled module's names,
results and exceptions.  ``cryptography`` releases the GIL inside each operation
(:data:`HOLDS_GIL` False), so its callers hand the operations to a thread
(engine.agents.batch) rather than make them on the event loop.  It must never do I/O.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

__all__ = ["HOLDS_GIL", "Ed25519Signer", "Verifier"]

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

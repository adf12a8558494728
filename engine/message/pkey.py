"""DKIM's public-key operations: an Ed25519 signature, RSA PKCS#1 v1.5 signatures of
SHA-256 digests (a batch at a time, for a thread) and a signature check (Ed25519, or RSA
PKCS#1 v1.5 over a SHA-256 digest), the keys made once and used for every message.

Import it from here: this selector picks the compiled module (engine._ext.pkey, built from
ext/pkey.pyx against OpenSSL's libcrypto) or its pure-Python twin (engine.message._pkey_py,
``cryptography``).  Both give the same results; they differ in :data:`HOLDS_GIL`: the
compiled operations keep the GIL, so the event loop can make them at their own cost (tens
of microseconds) where ``cryptography``'s, which release it, cost the loop a GIL round trip
each and go to a thread instead (engine.agents.batch).  ``RsaSigner`` is for that thread in
both: it releases the GIL, the compiled one once for a whole list of digests, the twin once
per signature.  It must never do I/O.
"""

from engine import _speedups
from engine.message._pkey_py import HOLDS_GIL, Ed25519Signer, RsaSigner, Verifier

__all__ = ["HOLDS_GIL", "Ed25519Signer", "RsaSigner", "Verifier"]
COMPILED = _speedups.select("pkey", __all__, globals())

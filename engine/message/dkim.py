"""DKIM (RFC 6376): canonicalisation, signing and verification, with OpenSSL's signatures.

Owns the DKIM algorithm: the tag lists of signatures and key records (§3.2, §3.6.1), header
and body canonicalisation "simple" and "relaxed" (§3.4), which header fields a signature
covers and over-signing (§5.4.2: ``h=`` names a field once more than the message has it,
so nobody can add one without breaking the signature), the DKIM-Signature field that
:class:`Signer` builds, and :func:`verify`, which checks every signature of a message
against the key published at ``SELECTOR._domainkey.DOMAIN`` and says pass / fail / neutral
/ temperror / permerror / policy per signature, as RFC 8601 §2.7.1 names them.  A
signature's tags are parsed and checked (§6.1.1) by engine.message.canon's
``signature_tags``, compiled for the common signature, whose pure-Python twin holds the
rules and every problem's reason.

Algorithms: rsa-sha256 and ed25519-sha256 (RFC 8463: PureEdDSA over the SHA-256 hash of
the header data).  rsa-sha1 and RSA keys under 1024 bits are refused on verification, as
RFC 8301 §3.1-§3.2 requires ("policy"); signing keys must be RSA of 2048 bits or more, or
Ed25519.  The signature itself is computed by OpenSSL (engine.message.pkey, and
``cryptography``): pure-Python RSA is far too slow for bulk mail.

Bodies can be large (35 MiB by default): the body is hashed from a memoryview of the
message, simple canonicalisation in one ``update`` of the untouched buffer, relaxed in one
call of engine.message.canon up to :data:`ONE_SHOT` and beyond in 64 KiB chunks through
:class:`RelaxedBody`, a streaming canonicaliser whose output does not depend on how the
body is cut (Hypothesis tests hold both to that).

Where the CPU work runs (measured on this project's 2-core machine, benchmarks/README.md):
an RSA-2048 signature costs about 0.3 ms, an Ed25519 one about 0.035-0.045 ms, a
verification 0.02-0.06 ms, relaxed body canonicalisation 0.15-1.3 ms per MiB (compiled;
3-6 ms in Python).
``cryptography`` releases the GIL while OpenSSL signs and verifies (pyca/cryptography
#14370 for RSA, #15164 for Ed25519), so an operation made on the event loop costs the loop
a GIL round trip: in ``ferry serve`` another thread (the queue writer's feeder, the
tracking log's) takes the GIL meanwhile, and profiles showed a 35 µs Ed25519 signature
costing the loop 220 µs, a 28 µs RSA verification 250 µs.  So the public-key operations go
through engine.message.pkey: compiled (OpenSSL's libcrypto, ``pkey.HOLDS_GIL``) they keep
the GIL and are made on the loop at their own cost: Ed25519 signatures
(:attr:`Signer.inline`, the signing agent signs at once) and every verification (the
verify agent passes no :class:`Checker`).  Otherwise (the pure-Python twin, and RSA
signatures, too long for the loop) they go to a thread in batches (engine.agents.batch):
the signing agent's executor jobs, the verify agent's :class:`Checker`.  The signing agent
prepares the digests on the loop (:meth:`Signer.prepare`) and hands only them over; the
compiled RSA signer signs a whole batch's in one release of the GIL
(:meth:`Signer.signatures`), which ``cryptography`` releases once per signature: each
release cost the thread a wait of up to the switch interval for the loop to give the GIL
back.  Bodies are hashed in pieces under 2 KiB, which hashlib hashes holding the GIL too.
:func:`verify` checks on the loop when the body is under :data:`VERIFY_INLINE_BYTES` and in
the executor otherwise (hashing a large body), and :func:`verify_now` returns the results
at once, without a coroutine, when the keys' answers are cached and no public-key
operation is left to wait for.

It must never open a socket or a file itself (the key record comes through the
``engine.agents.dns.Lookup`` handed in; :func:`load_signing_key` reads the one file it is
given), never log, and never decide policy beyond the RFCs (what a "fail" means for the
mail is the DMARC / verify agent's business).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.agents.api import Message, MethodResult
from engine.agents.dns import DnsPermError, DnsTempError
from engine.message import pkey
from engine.message._canon_py import Canon, Result, base64_value, tag_list
from engine.message._canon_py import Signature as _Tags
from engine.message._canon_py import no_fws as _no_fws
from engine.message._canon_py import squeeze as _squeeze
from engine.message._canon_py import trailing_crlfs as _trailing_crlfs
from engine.message.canon import COMPILED as canon_compiled
from engine.message.canon import header_data, relaxed_body, relaxed_fields, signature_tags

if TYPE_CHECKING:
    from engine.agents.dns import Answer, Lookup

__all__ = [
    "DEFAULT_HEADERS",
    "INLINE_KEY_BITS",
    "MIN_SIGNING_BITS",
    "MIN_VERIFY_BITS",
    "VERIFY_INLINE_BYTES",
    "Check",
    "Checker",
    "DkimError",
    "DkimKeyError",
    "DkimResult",
    "Prepared",
    "RelaxedBody",
    "Signer",
    "SigningKey",
    "SimpleBody",
    "algorithm_of",
    "body_hash",
    "fold_txt",
    "generate_key",
    "key_record",
    "load_signing_key",
    "parse_tag_list",
    "private_pem",
    "relaxed_header",
    "signature_valid",
    "signatures_valid",
    "verify",
    "verify_now",
]

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: The fields signed by default: RFC 6376 §5.4.1's list, less the Resent-* trace fields a
#: forwarder may add, plus RFC 8058's one-click unsubscribe pair (mailbox providers check
#: that List-Unsubscribe-Post is signed).
DEFAULT_HEADERS: Final = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "In-Reply-To", "References",
    "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-ID", "Content-Description", "Sender", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive", "Feedback-ID",
)  # fmt: skip

#: RFC 8301 §3.2: verifiers must not accept RSA keys under 1024 bits; signers must use
#: at least 1024 and should use 2048 (§3.2 of the same) — this project requires 2048.
MIN_VERIFY_BITS: Final = 1024
MIN_SIGNING_BITS: Final = 2048

#: Verification stays on the loop below this many body octets (see the docstring): with
#: the compiled canonicalisation a 256 KiB body costs ~200 µs to hash (mostly SHA-256),
#: with the pure-Python one a 32 KiB body about as much.
VERIFY_INLINE_BYTES: Final = 256 * 1024 if canon_compiled else 32 * 1024

#: RSA keys longer than this are checked in the executor, never on the loop.  RFC 8301 §3.2
#: has verifiers take 1024 to 4096 bits and allows longer keys, which the sender chooses;
#: a check's cost grows with the square of the length (OpenSSL takes up to 16,384 bits:
#: ~16 times a 4,096-bit key's), too much to hold the loop for.
INLINE_KEY_BITS: Final = 4096

#: hashlib releases the GIL to hash 2048 octets or more at once (HASHLIB_GIL_MINSIZE),
#: which on the event loop costs a round trip of the GIL (see the docstring): bodies are
#: fed to it in pieces of this size (a multiple of SHA-256's 64-octet block).
PIECE: Final = 1984

#: Relaxed bodies up to this size are canonicalised in one call (engine.message.canon),
#: larger ones in chunks of :data:`CHUNK` (bounded temporary copies).
ONE_SHOT: Final = 1024 * 1024
CHUNK: Final = 64 * 1024

#: A line of the DKIM-Signature field stays under 78 characters (RFC 5322 §2.1.1).
LINE: Final = 76

#: How many shapes of header (the signed fields' names in order) a signer remembers.
PLANS: Final = 256


class DkimError(ValueError):
    """A signature or key record that does not parse (a permanent error)."""


class DkimKeyError(ValueError):
    """A signing key that cannot be used; the message names the file and why."""


# --- tag lists (§3.2) ----------------------------------------------------------------------

def parse_tag_list(text: str) -> dict[str, str]:
    """The tags of a tag list, ``name=value; ...``, values with surrounding whitespace
    removed (inner whitespace kept: each tag's reader decides).  DkimError for a tag
    without "=", an invalid name or a tag given twice (§3.2: "MUST NOT" repeat)."""
    tags = tag_list(text)
    if isinstance(tags, str):
        raise DkimError(tags)
    return tags


def _base64(value: str, what: str) -> bytes:
    decoded = base64_value(value)
    if decoded is None:
        raise DkimError(f"{what} is not base64")
    return decoded


# --- canonicalisation (§3.4) ---------------------------------------------------------------

def relaxed_header(name: bytes, value: bytes) -> bytes:
    """§3.4.2: the name lower-cased, the value unfolded, whitespace runs one space, none
    around the value; ``name:value`` and CRLF."""
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    return b"%s:%s\r\n" % (name.strip(b" \t").lower(), _squeeze(value).strip(b" \t"))


class _Sink(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


class _Counter:
    """Hashes at most ``limit`` octets (the l= tag) and counts what it was offered."""

    __slots__ = ("hasher", "left", "offered")

    def __init__(self, hasher: _Sink, limit: int | None) -> None:
        self.hasher = hasher
        self.left = limit
        self.offered = 0

    def update(self, data: bytes | memoryview) -> None:
        self.offered += len(data)
        if self.left is None:
            _feed(self.hasher, data)
        elif self.left > 0:
            piece = data[: self.left]
            self.left -= len(piece)
            _feed(self.hasher, piece)


def _feed(hasher: _Sink, data: bytes | memoryview) -> None:
    """``hasher.update(data)`` in pieces that hashlib hashes holding the GIL (:data:`PIECE`)."""
    if len(data) <= PIECE:
        hasher.update(data)
        return
    view = memoryview(data)
    for start in range(0, len(view), PIECE):
        hasher.update(view[start : start + PIECE])


class SimpleBody:
    """§3.4.3 as a stream: the body as it is, less the empty lines at its end, ending with
    one CRLF (a missing body is one CRLF).  Feed chunks cut anywhere, then ``finish()``."""

    __slots__ = ("_cr", "_pending", "sink")

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self._pending = 0  # CRLFs seen at the end and not yet passed on
        self._cr = False  # the last chunk ended in a CR that may begin a CRLF

    def feed(self, chunk: bytes | memoryview) -> None:
        data = bytes(chunk)
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if not data:
            return
        k = _trailing_crlfs(data)
        if 2 * k == len(data):
            self._pending += k
            return
        self.sink.update(b"\r\n" * self._pending + data[: len(data) - 2 * k])
        self._pending = k

    def finish(self) -> None:
        if self._cr:
            self.sink.update(b"\r\n" * self._pending + b"\r")
        # Whatever was passed on ends in a line's content: one CRLF ends it, or is the
        # whole canonical form of an empty body.
        self.sink.update(b"\r\n")


class RelaxedBody:
    """§3.4.4 as a stream: whitespace at line ends removed, runs of whitespace one space,
    empty lines at the end removed, a non-empty body ending in CRLF, an empty one empty.
    Lines are canonicalised whole (a partial line waits for its end), except that a line
    longer than a chunk is passed on up to its last non-whitespace octet."""

    __slots__ = ("_content", "_pending", "_tail", "sink")

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self._tail = b""  # the line being read
        self._pending = 0  # CRLFs at the end of the canonical output, not passed on yet
        self._content = False  # anything passed on yet

    def _emit(self, canonical: bytes) -> None:
        k = _trailing_crlfs(canonical)
        if 2 * k == len(canonical):
            self._pending += k
            return
        self.sink.update(b"\r\n" * self._pending + canonical[: len(canonical) - 2 * k])
        self._pending = k
        self._content = True

    def feed(self, chunk: bytes | memoryview) -> None:
        data = self._tail + chunk if self._tail else bytes(chunk)
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) > CHUNK:
                # A very long line: pass on its text up to the last octet that is not
                # whitespace or CR, which no later octet can change.
                last = len(data.rstrip(b" \t\r"))
                if last:
                    self._emit(_squeeze(data[:last]))
                    data = data[last:]
            self._tail = data
            return
        self._tail = data[cut:]
        # Runs squeezed first, so whitespace at a line's end is one space at most.
        self._emit(_squeeze(data[:cut]).replace(b" \r\n", b"\r\n"))

    def finish(self) -> None:
        if self._tail:
            line = _squeeze(self._tail).rstrip(b" ")
            self._tail = b""
            if line:
                self._emit(line)
        if self._content:
            self.sink.update(b"\r\n")


def body_hash(body: bytes | memoryview, canon: Canon, limit: int | None = None
              ) -> tuple[bytes, int]:
    """(SHA-256 of the canonical body, or of its first ``limit`` octets; the canonical
    body's length)."""
    view = memoryview(body)
    if canon == "relaxed" and limit is None and len(view) <= ONE_SHOT:
        # The common case (no l=, a body of ordinary size), without the counting sink.
        canonical = relaxed_body(view)
        if len(canonical) <= PIECE:
            return hashlib.sha256(canonical).digest(), len(canonical)
        hasher = hashlib.sha256()
        _feed(hasher, canonical)
        return hasher.digest(), len(canonical)
    hasher = hashlib.sha256()
    sink = _Counter(hasher, limit)
    if canon == "simple":
        # The buffer itself, in one update: only its trailing empty lines are examined.
        end = len(view)
        while end >= 2 and view[end - 2 : end].tobytes() == b"\r\n":
            end -= 2
        if end:
            sink.update(view[:end])
        sink.update(b"\r\n")
    elif len(view) <= ONE_SHOT:
        sink.update(relaxed_body(view))
    else:
        stream = RelaxedBody(sink)
        for start in range(0, len(view), CHUNK):
            stream.feed(view[start : start + CHUNK])
        stream.finish()
    return hasher.digest(), sink.offered


# --- header fields -------------------------------------------------------------------------


class _Field(NamedTuple):
    """A header field (a tuple: made for every field of every message signed or
    verified, where a frozen dataclass's __init__ costs three times as much)."""

    name: bytes  # lower-cased
    raw: bytes  # "Name: value" as in the message, folding kept, without the final CRLF
    colon: int  # offset of the value (after the colon) in raw


#: A header field as the verifier keeps every field of a message (``Message.items()``): a
#: plain tuple made by the compiled engine.message.canon (a _Field costs ~0.4 µs to make;
#: only signature fields become one).
_Item = tuple[bytes, bytes, int]


def _header_data(selected: Iterable[_Item | None], how: Canon) -> bytes:
    if how == "simple":
        return b"".join(f[1] + b"\r\n" for f in selected if f is not None)
    return relaxed_fields(selected)


def _signed_digest(selected: Sequence[_Item | None], signature_field: _Item,
                   canon: Canon) -> bytes:
    """§3.7: the SHA-256 of the selected fields and then the signature field (its b=
    empty), canonicalised, the last without its final CRLF (one buffer, one pass of the
    compiled canonicalisation)."""
    return hashlib.sha256(_header_data((*selected, signature_field), canon)[:-2]).digest()


# --- keys ----------------------------------------------------------------------------------


def algorithm_of(key: SigningKey) -> str:
    return "ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa-sha256"


def load_signing_key(path: Path) -> SigningKey:
    """The private key in the PEM file ``path``; DkimKeyError (naming the file) when it
    cannot be read, is encrypted, or is neither RSA of 2048+ bits nor Ed25519."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY-----" not in pem:
        raise DkimKeyError(f"{path} holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise DkimKeyError(f"{path} is encrypted with a passphrase; Ferry needs it "
                           "unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"{path} does not load as a private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_SIGNING_BITS:
            raise DkimKeyError(f"{path} is an RSA key of {key.key_size} bits; DKIM signing "
                               f"needs {MIN_SIGNING_BITS} or more (RFC 8301 §3.2)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{path} is a {type(key).__name__.removeprefix('_')} key; DKIM "
                       "signs with RSA (2048+ bits) or Ed25519 (RFC 8463)")


def generate_key(ed25519_key: bool = False, bits: int = MIN_SIGNING_BITS) -> SigningKey:
    """A new signing key: Ed25519, or RSA of ``bits`` (at least 2048) with e = 65537."""
    if ed25519_key:
        return ed25519.Ed25519PrivateKey.generate()
    if bits < MIN_SIGNING_BITS:
        raise DkimKeyError(f"an RSA signing key needs {MIN_SIGNING_BITS} bits or more "
                           f"(RFC 8301 §3.2), not {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: SigningKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM, the form :func:`load_signing_key` reads."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_record(key: SigningKey) -> str:
    """The TXT record to publish at SELECTOR._domainkey.DOMAIN (§3.6.1, RFC 8463 §4.2)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def fold_txt(value: str, size: int = 255) -> str:
    """A TXT value as zone-file character-strings of at most ``size`` octets each
    (RFC 1035 §3.3.14: one string holds 255), in parentheses when there are several."""
    strings = [f'"{value[i : i + size]}"' for i in range(0, len(value), size)] or ['""']
    if len(strings) == 1:
        return strings[0]
    return "( " + "\n\t".join(strings) + " )"


def _ed25519_signer(key: ed25519.Ed25519PrivateKey) -> pkey.Ed25519Signer:
    return pkey.Ed25519Signer(key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption()))


def _rsa_signer(key: SigningKey) -> pkey.RsaSigner:
    assert isinstance(key, rsa.RSAPrivateKey)
    return pkey.RsaSigner(key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


# --- signing -------------------------------------------------------------------------------


def _fold_tags(tokens: Sequence[str]) -> tuple[list[str], str]:
    """The field's lines up to an empty b=: the tokens (each ending in its own ";" or ":")
    separated by one space, lines under 78 characters; (the full lines, the last line,
    which ends in " b=").  All but the last token (bh=, new in every signature) are
    folded once per second and header shape (:func:`_fold_prefix`)."""
    done, line = _fold_prefix(tuple(tokens[:-1]))
    lines = list(done)
    lines, line = _fold_token(lines, line, tokens[-1])
    if len(line) + 6 > LINE:
        lines.append(line)
        line = ""
    return lines, line + " b="


def _fold_token(lines: list[str], line: str, token: str) -> tuple[list[str], str]:
    if len(line) + 1 + len(token) > LINE:
        lines.append(line)
        line = ""
    return lines, line + " " + token


@functools.lru_cache(maxsize=64)
def _fold_prefix(tokens: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """:func:`_fold_tags`'s state after ``tokens``: (the full lines, the line begun)."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for token in tokens:
        lines, line = _fold_token(lines, line, token)
    return tuple(lines), line


def _fold(folded: tuple[list[str], str], b64: str) -> str:
    """The field value from :func:`_fold_tags`'s lines, b= with its base64 cut across
    lines (FWS inside b= and around h='s colons is ignored by verifiers, §3.5).  The tags
    are folded once per signature, for the hashed (empty b=) and the final field."""
    lines, line = list(folded[0]), folded[1]
    rest = b64
    while rest:
        room = LINE - len(line)
        if room < 8:
            lines.append(line)
            line, room = " ", LINE - 1
        line, rest = line + rest[:room], rest[room:]
    lines.append(line)
    return "\r\n".join(lines)[len("DKIM-Signature:") :]


@functools.lru_cache(maxsize=512)
def _h_tokens(names: tuple[str, ...]) -> tuple[str, ...]:
    """h= as tokens cut after colons, each short enough for a line (cached: most mail of
    one sender has the same fields)."""
    tokens: list[str] = []
    current = "h="
    for i, name in enumerate(names):
        part = name + (":" if i < len(names) - 1 else ";")
        if len(current) + len(part) > LINE - 2 and current != "h=":
            tokens.append(current)
            current = ""
        current += part
    tokens.append(current)
    return tuple(tokens)


class Prepared(NamedTuple):
    """A signature made up to its public-key operation (:meth:`Signer.prepare`)."""

    #: The field's tags folded up to an empty b= (:func:`_fold_tags`).
    folded: tuple[list[str], str]
    #: The SHA-256 of the canonical header data and signature field (§3.7).
    digest: bytes


class Signer:
    """Signs messages for ``domain`` with ``selector``'s ``private_key``.

    ``headers``: the fields to sign (From is always signed, §5.4); each is listed in h= as
    many times as the message has it, plus once more when over-signed.  ``oversign``:
    True (the default) for every signed field, False for none, or a collection of names.
    ``canon``: (header, body) canonicalisation.  ``lifetime``: seconds after which the
    signature expires (x=, §3.5), None for none.  The signature never uses l= (§8.2: it
    lets anyone append).
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key: SigningKey,
        headers: Sequence[str] = DEFAULT_HEADERS,
        oversign: bool | Collection[str] = True,
        canon: tuple[Canon, Canon] = ("relaxed", "relaxed"),
        *,
        lifetime: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for c in canon:
            if c not in ("simple", "relaxed"):
                raise ValueError(f"canonicalisation must be simple or relaxed, not {c!r}")
        self.domain = domain.lower().rstrip(".")
        self.selector = selector.lower()
        self.key = private_key
        self.algorithm = algorithm_of(private_key)
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash; rsa-sha256 (§3.3.1) PKCS#1 v1.5
        # over it: both made by engine.message.pkey.
        self._ed25519 = (_ed25519_signer(private_key)
                         if isinstance(private_key, ed25519.Ed25519PrivateKey) else None)
        self._rsa = None if self._ed25519 is not None else _rsa_signer(private_key)
        #: The signature is cheap and made holding the GIL (Ed25519, compiled): the
        #: signing agent makes it on the event loop, at its own cost and no hand-off.
        self.inline = self._ed25519 is not None and pkey.HOLDS_GIL
        names = [h.lower() for h in headers]
        if "from" not in names:
            names.insert(0, "from")
        self.headers: tuple[str, ...] = tuple(dict.fromkeys(names))
        if oversign is True:
            self.oversign = frozenset(self.headers)
        elif oversign is False:
            self.oversign = frozenset()
        else:
            self.oversign = frozenset(h.lower() for h in oversign)
        #: (name, name as bytes, 1 when over-signed) for each signed field.
        self._plan = tuple((n, n.encode(), int(n in self.oversign)) for n in self.headers)
        self._wanted = frozenset(raw for _, raw, _ in self._plan)
        #: h= and the fields' order by the signed fields' names (:meth:`_plan_for`).
        self._plans: dict[tuple[bytes, ...], tuple[tuple[str, ...], tuple[int, ...]]] = {}
        self.canon = canon
        #: The tags every signature of this signer begins with (§3.5).
        self._tags = ("v=1;", f"a={self.algorithm};", f"c={canon[0]}/{canon[1]};",
                      f"d={self.domain};", f"s={self.selector};")
        self.lifetime = lifetime
        self.clock = clock

    def _signed(self, message: Message) -> tuple[tuple[str, ...], list[_Item]]:
        """(h=, the fields it selects in h='s order) in one pass over the plan: each
        signed name as many times as the message has the field, plus once when
        over-signed (§5.4.2: the extra one selects nothing, the "null string"), its
        fields from the bottom up (§5.4.2), which is what the verifier's selection
        (engine.message.canon ``header_data``) gives for h=.  The fields are the
        message's items (``Message.items()``: the signing agent's From already made
        them)."""
        wanted = self._wanted
        fields = [f for f in message.items() if f[0] in wanted]
        names = tuple([f[0] for f in fields])
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plan_for(names)
        h, order = plan
        return h, [fields[i] for i in order]

    def _plan_for(self, names: tuple[bytes, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(h=, the order in which to take the fields) for a message whose signed fields
        are ``names``, top down; kept for the next message with the same fields (a bulk
        sender's mail all has the same)."""
        if b"from" not in names:
            raise DkimError("the message has no From field (RFC 5322 §3.6: required)")
        at: dict[bytes, list[int]] = {}
        for i, present in enumerate(names):
            at.setdefault(present, []).append(i)
        h: list[str] = []
        order: list[int] = []
        for name, raw, over in self._plan:
            found = at.get(raw)
            if found:
                h += [name] * (len(found) + over)
                order += reversed(found)
            elif over:
                h.append(name)
        if len(self._plans) >= PLANS:
            self._plans.clear()  # bounded: mail of many shapes starts again
        plan = self._plans[names] = (tuple(h), tuple(order))
        return plan

    def value(self, message: bytes | Message) -> str:
        """The DKIM-Signature field's value for ``message`` (canonical CRLF bytes, or the
        agents' view of them, whose header items are then made once): what follows
        "DKIM-Signature:", folded, starting with a space."""
        prepared = self.prepare(message)
        return self.finish(prepared, self.signature(prepared))

    def prepare(self, message: bytes | Message) -> Prepared:
        """Everything of :meth:`value` before the public-key operation: the field's tags
        and the digest to sign (pure Python, under the GIL, where :meth:`signature` is
        OpenSSL's, outside it)."""
        view = message if isinstance(message, Message) else Message(message)
        h, selected = self._signed(view)
        bh, _ = body_hash(view.body(), self.canon[1])
        now = int(self.clock())
        tokens = [*self._tags, f"t={now};"]
        if self.lifetime is not None:
            tokens.append(f"x={now + max(1, int(self.lifetime))};")
        tokens += [*_h_tokens(h), f"bh={base64.b64encode(bh).decode()};"]
        folded = _fold_tags(tokens)
        unsigned = _fold(folded, "")
        own = _Field(b"dkim-signature", b"DKIM-Signature:" + unsigned.encode(), 15)
        return Prepared(folded, _signed_digest(selected, own, self.canon[0]))

    def signature(self, prepared: Prepared) -> bytes:
        """The signature of a prepared digest (OpenSSL; an RSA one releases the GIL)."""
        if self._ed25519 is not None:  # the inline signer's one call a message, no list
            return self._ed25519.sign(prepared.digest)
        [signature] = self.signatures([prepared.digest])
        if isinstance(signature, Exception):
            raise signature
        return signature

    def signatures(self, digests: Sequence[bytes]) -> list[bytes | ValueError]:
        """The signatures of many prepared digests in one call, for a thread: RSA ones in
        one release of the GIL (the compiled engine.message.pkey), not one each, so the
        batch waits once to take the GIL back from the event loop.  An item that cannot
        be signed gets a ValueError in its place."""
        if self._rsa is not None:
            return self._rsa.sign_digests(digests)
        assert self._ed25519 is not None
        out: list[bytes | ValueError] = []
        for digest in digests:
            try:
                out.append(self._ed25519.sign(digest))
            except ValueError as exc:
                out.append(exc)
        return out

    @staticmethod
    def finish(prepared: Prepared, signature: bytes) -> str:
        """The field's value from :meth:`prepare`'s tags and the signature."""
        return _fold(prepared.folded, base64.b64encode(signature).decode())

    def sign(self, message: bytes) -> bytes:
        """The whole field to prepend: ``DKIM-Signature: ...\\r\\n``."""
        return b"DKIM-Signature:" + self.value(message).encode() + b"\r\n"


# --- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimResult:
    """One signature's result (RFC 8601 §2.7.1) and the identifiers it names."""

    result: Result
    reason: str = ""
    #: d=, s=, i= (as given, else "@" + d, §3.5), the first 8 characters of b= (RFC 6008).
    domain: str = ""
    selector: str = ""
    identity: str = ""
    b: str = ""
    algorithm: str = ""
    #: With l=: how much of the body the signature covers (unsigned text may follow).
    note: str = ""

    def method_result(self) -> MethodResult:
        d, i, s, b = self.domain, self.identity, self.selector, self.b
        if d and i and s and b:  # every signature that got as far as its key
            props: tuple[tuple[str, str], ...] = (
                ("header.d", d), ("header.i", i), ("header.s", s), ("header.b", b))
        else:
            props = tuple((k, v) for k, v in (("header.d", d), ("header.i", i),
                                              ("header.s", s), ("header.b", b)) if v)
        return MethodResult("dkim", self.result, self.reason or self.note, props)


def _made(result: Result, reason: str, sig: _Signature, note: str) -> DkimResult:
    """A signature's :class:`DkimResult`, its fields set through their slots' descriptors
    (what the frozen dataclass's ``__init__`` does with eight ``object.__setattr__``
    calls, at about twice the cost)."""
    made = _new_result(DkimResult)
    _set_result(made, result)
    _set_reason(made, reason)
    _set_domain(made, sig.domain)
    _set_selector(made, sig.selector)
    _set_identity(made, sig.identity)
    _set_b(made, sig.header_b)
    _set_algorithm(made, sig.algorithm)
    _set_note(made, note)
    return made


_new_result = object.__new__
(_set_result, _set_reason, _set_domain, _set_selector, _set_identity, _set_b, _set_algorithm,
 _set_note) = (getattr(DkimResult, f.name).__set__ for f in dataclasses.fields(DkimResult))


class _Problem(Exception):
    def __init__(self, result: Result, reason: str) -> None:
        super().__init__(reason)
        self.result: Result = result
        self.reason = reason


class _Signature:
    """One DKIM-Signature field (a ``Message.items()`` item) and its checked tags
    (engine.message.canon ``signature_tags``), and its key once found."""

    __slots__ = ("algorithm", "b", "bh", "body_canon", "domain", "field", "header_b",
                 "header_canon", "identity", "key", "key_name", "limit", "names", "selector",
                 "subdomain")

    def __init__(self, field: _Item, tags: _Tags) -> None:
        self.field = field
        (self.algorithm, self.header_canon, self.body_canon, self.names, self.limit, self.bh,
         self.b, self.domain, self.selector, self.identity, self.header_b, self.key_name,
         self.subdomain) = tags
        self.key: PublicKey | None = None


#: A key record's key, ready to check signatures (engine.message.pkey).
PublicKey = pkey.Verifier


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """A key record as parsed (§3.6.1), or why it cannot be used (``problem``)."""

    key: PublicKey | None
    kind: str = ""
    #: t= flags ("y" testing, "s" no subdomains in i=).
    flags: frozenset[str] = frozenset()
    problem: tuple[Result, str] | None = None
    #: The problem is the key's own (p= does not decode): a k= that does not match the
    #: signature's algorithm is the better reason, so it is checked first.
    late: bool = False


@functools.lru_cache(maxsize=4096)
def _key_record(text: str) -> _KeyRecord:
    """The record ``text`` parsed, cached by its text: a sender's mail all names the same
    key, and decoding an RSA key costs more than checking a signature with it."""
    def bad(reason: str, result: Result = "permerror", kind: str = "") -> _KeyRecord:
        return _KeyRecord(None, kind, problem=(result, reason), late=bool(kind))

    try:
        tags = parse_tag_list(text)
    except DkimError as exc:
        return bad(f"bad key record: {exc}")
    if tags.get("v", "DKIM1") != "DKIM1":
        return bad(f"bad key record version v={tags['v']}")
    if "p" not in tags:
        return bad("key record has no p=")
    if "h" in tags and "sha256" not in [h.strip().lower() for h in tags["h"].split(":")]:
        return bad("key does not allow sha256 (h=)")
    if "s" in tags and not {"*", "email"} & {s.strip().lower() for s in tags["s"].split(":")}:
        return bad("key is not for email (s=)")
    flags = frozenset(f.strip().lower() for f in tags.get("t", "").split(":"))
    if not _no_fws(tags["p"]):
        return bad("key revoked")
    kind = tags.get("k", "rsa").lower()
    try:
        data = _base64(tags["p"], "key p=")
    except DkimError as exc:
        return bad(str(exc), kind=kind)
    key: PublicKey
    if kind == "ed25519":
        try:
            key = pkey.Verifier("ed25519", data)
        except ValueError:
            return bad("bad Ed25519 key", kind=kind)
    elif kind == "rsa":
        try:
            # SubjectPublicKeyInfo as published in practice, or §3.6.1's RSAPublicKey.
            loaded = serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            return bad("bad RSA key", kind=kind)
        if not isinstance(loaded, rsa.RSAPublicKey):
            return bad("key p= is not an RSA key", kind=kind)
        if loaded.key_size < MIN_VERIFY_BITS:
            return bad(f"key too short ({loaded.key_size} bits, RFC 8301 §3.2)", "policy",
                       kind=kind)
        key = pkey.Verifier("rsa", loaded.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    else:
        return _KeyRecord(None, kind, flags)  # k= unknown: _key reports the mismatch
    return _KeyRecord(key, kind, flags)


async def _key(lookup: Lookup, sig: _Signature) -> PublicKey:
    """§6.1.2: the public key from SELECTOR._domainkey.DOMAIN; _Problem when none."""
    name = sig.key_name
    try:
        answer = await lookup.query(name, "TXT")
    except DnsTempError as exc:
        raise _Problem("temperror", f"key lookup failed: {exc}") from None
    except DnsPermError:
        raise _Problem("permerror", f"bad key name {name}") from None
    return _key_of(answer, sig)


def _cached_key(lookup: Lookup, sig: _Signature) -> PublicKey | _Problem | None:
    """:func:`_key` from the lookup's cache without waiting: the key, the problem, or
    None when the answer is not cached."""
    try:
        answer = lookup.cached(sig.key_name, "TXT")
    except DnsTempError as exc:
        return _Problem("temperror", f"key lookup failed: {exc}")
    if answer is None:
        return None
    try:
        return _key_of(answer, sig)
    except _Problem as p:
        # Without its traceback: kept as a value, the exception would hold this frame and
        # through it the caller's, the message among its locals, in a reference cycle
        # that only the (rarely run: app.tune_gc) cyclic collector frees.
        return p.with_traceback(None)


def _key_of(answer: Answer, sig: _Signature) -> PublicKey:
    """The key in the answer to the key lookup, checked against the signature."""
    if not answer.records:
        raise _Problem("permerror", "no key")
    record = _key_record(answer.records[0])
    if record.problem is not None and not record.late:
        raise _Problem(*record.problem)
    # §3.6.1 t=s: the i= domain must be d= itself, not a subdomain.
    if sig.subdomain and "s" in record.flags:
        raise _Problem("permerror", "key forbids subdomains in i= (t=s)")
    wanted = sig.algorithm.partition("-")[0]
    if record.kind != wanted:
        raise _Problem("permerror", f"key type k={record.kind} does not match a={sig.algorithm}")
    if record.problem is not None:
        raise _Problem(*record.problem)
    assert record.key is not None
    return record.key


def _prepare_check(sig: _Signature, fields: Sequence[_Item], body: memoryview,
                   bodies: dict[tuple[Canon, int | None], tuple[bytes, int]]
                   ) -> tuple[bytes, str]:
    """§6.1.3 up to the public-key operation: the body hash compared, the digest of the
    header data; (the digest, the l= note), _Problem when the body hash differs."""
    limit = sig.limit
    key = (sig.body_canon, limit)
    hashed = bodies.get(key)
    if hashed is None:
        hashed = bodies[key] = body_hash(body, sig.body_canon, limit)
    digest, length = hashed
    if limit is not None and limit > length:
        raise _Problem("permerror", f"l={limit} is longer than the body ({length})")
    if digest != sig.bh:
        raise _Problem("fail", "bad body hash")
    # §3.7 in one compiled call (engine.message.canon): selection, b= emptied, canonical.
    signed = hashlib.sha256(header_data(fields, sig.names, sig.field,
                                        sig.header_canon == "relaxed")).digest()
    if limit is not None and limit < length:
        return signed, f"l= signs {limit} of {length} body octets"
    return signed, ""


#: A signature's public-key check: (the key, b=, the digest it signs).
Check = tuple["PublicKey | None", bytes, bytes]


def signature_valid(check: Check) -> bool:
    """The public-key operation of one signature (OpenSSL: engine.message.pkey, which
    releases the GIL unless compiled, ``pkey.HOLDS_GIL``)."""
    key, b, signed = check
    return key is not None and key.verify(b, signed)


def signatures_valid(checks: Sequence[Check]) -> list[bool]:
    """:func:`signature_valid` of each of one message's checks (for a thread)."""
    return [signature_valid(check) for check in checks]


class Checker(Protocol):
    """Where :func:`verify_now` has the public-key operations done: the verify agent's
    batches in a thread (engine.agents.batch.ThreadBatches of :func:`signatures_valid`)."""

    def submit(self, item: Sequence[Check], /) -> asyncio.Future[list[bool]]: ...


def _unusable(field: _Item, result: Result, reason: str) -> DkimResult:
    """The result of a signature whose tags are unusable, with what its tags name."""
    try:
        tags = parse_tag_list(field[1][field[2] :].decode("utf-8", "surrogateescape"))
    except DkimError:
        tags = {}
    domain = tags.get("d", "").lower().rstrip(".")
    return DkimResult(
        result, reason, domain=domain, selector=tags.get("s", "").lower(),
        identity=tags.get("i", f"@{domain}" if domain else ""),
        b=_no_fws(tags.get("b", ""))[:8], algorithm=tags.get("a", "").lower(),
    )  # fmt: skip


def _check_all(ready: Sequence[tuple[int, _Signature]], fields: Sequence[_Item],
               body: memoryview) -> list[tuple[Result, str, str]]:
    """§6.1.3 for each signature: the body hash, then the public-key check; (result,
    reason, the l= note)."""
    bodies: dict[tuple[Canon, int | None], tuple[bytes, int]] = {}
    out: list[tuple[Result, str, str]] = []
    for _, sig in ready:
        try:
            signed, note = _prepare_check(sig, fields, body, bodies)
        except _Problem as p:
            out.append((p.result, p.reason, ""))
            continue
        if signature_valid((sig.key, sig.b, signed)):
            out.append(("pass", "", note))
        else:
            out.append(("fail", "signature did not verify", ""))
    return out


class _Work:
    """One message's signatures between parsing and checking (:func:`verify_now`)."""

    __slots__ = ("fields", "parsed", "results")

    def __init__(self, message: Message, max_signatures: int, now: float | None) -> None:
        when = time.time() if now is None else now
        self.fields = fields = message.items()
        results: list[DkimResult | None] = []
        parsed: list[tuple[int, _Signature]] = []
        self.results, self.parsed = results, parsed
        for field in fields:
            if field[0] != b"dkim-signature":
                continue
            if len(results) == max_signatures:
                break
            # §6.1.1 in one compiled call: the tags, checked (a tuple), or why not.
            tags = signature_tags(field[1], field[2], when)
            if len(tags) == 2:
                results.append(_unusable(field, *tags))
            else:
                parsed.append((len(results), _Signature(field, tags)))
                results.append(None)

    def keyed(self, keys: Sequence[PublicKey | BaseException]) -> list[tuple[int, _Signature]]:
        """The signatures whose key was found, the others' results set."""
        ready: list[tuple[int, _Signature]] = []
        for (i, sig), key in zip(self.parsed, keys, strict=True):
            if isinstance(key, _Problem):
                self.results[i] = _made(key.result, key.reason, sig, "")
            elif isinstance(key, BaseException):
                raise key
            else:
                sig.key = key
                ready.append((i, sig))
        return ready

    def done(self, ready: Sequence[tuple[int, _Signature]],
             checked: Sequence[tuple[Result, str, str]]) -> list[DkimResult]:
        results = self.results
        for (i, sig), (result, reason, note) in zip(ready, checked, strict=True):
            results[i] = _made(result, reason, sig, note)
        return [r for r in results if r is not None]

    def check(self, ready: Sequence[tuple[int, _Signature]], body: memoryview,
              checker: Checker | None) -> list[DkimResult] | Awaitable[list[DkimResult]]:
        """The results of the signatures whose key was found, a small body hashed here:
        at once without a ``checker``, else once it has made the public-key operations
        in its thread, where they do not cost the loop a GIL round trip each
        (engine.agents.batch)."""
        if checker is None:
            return self.done(ready, _check_all(ready, self.fields, body))
        outcomes: list[tuple[Result, str, str]] = []
        checks: list[Check] = []
        bodies: dict[tuple[Canon, int | None], tuple[bytes, int]] = {}
        for _, sig in ready:
            try:
                signed, note = _prepare_check(sig, self.fields, body, bodies)
            except _Problem as p:
                outcomes.append((p.result, p.reason, ""))
                continue
            outcomes.append(("pass", "", note))
            checks.append((sig.key, sig.b, signed))
        if not checks:
            return self.done(ready, outcomes)
        return self.checked(ready, outcomes, checker.submit(checks))

    async def checked(self, ready: Sequence[tuple[int, _Signature]],
                      outcomes: list[tuple[Result, str, str]],
                      valid: asyncio.Future[list[bool]]) -> list[DkimResult]:
        """The results once the checker has done the public-key operations of the
        signatures whose outcome is "pass" so far, in order."""
        answers = iter(await valid)
        for i, outcome in enumerate(outcomes):
            if outcome[0] == "pass" and not next(answers):
                outcomes[i] = ("fail", "signature did not verify", "")
        return self.done(ready, outcomes)

    async def finish(self, message: Message, lookup: Lookup,
                     checker: Checker | None = None) -> list[DkimResult]:
        """Keys looked up concurrently; a large body hashed in the executor."""
        keys = await asyncio.gather(*(_key(lookup, sig) for _, sig in self.parsed),
                                    return_exceptions=True)
        ready = self.keyed(keys)
        if not ready:
            return self.done((), ())
        body = message.body()
        if len(body) < VERIFY_INLINE_BYTES and _inline(ready):
            found = self.check(ready, body, checker)
            return found if isinstance(found, list) else await found
        return await self.off_loop(ready, body)

    async def off_loop(self, ready: Sequence[tuple[int, _Signature]],
                       body: memoryview) -> list[DkimResult]:
        """The results with the body hashed and the keys used in the executor."""
        checked = await asyncio.get_running_loop().run_in_executor(
            None, _check_all, ready, self.fields, body)
        return self.done(ready, checked)


def _inline(ready: Sequence[tuple[int, _Signature]]) -> bool:
    """Every key is short enough to be used on the loop (:data:`INLINE_KEY_BITS`)."""
    for _, sig in ready:  # noqa: SIM110 (all() of a generator: a frame more, ~0.5 µs)
        if sig.key is not None and sig.key.bits > INLINE_KEY_BITS:
            return False
    return True


def verify_now(message: Message, lookup: Lookup, *, max_signatures: int = 5,
               now: float | None = None, checker: Checker | None = None
               ) -> list[DkimResult] | Awaitable[list[DkimResult]]:
    """:func:`verify`'s results at once when every key's answer is cached and the body is
    small (a bulk sender's mail: no coroutine, no task, nothing to wait for); else an
    awaitable of them, which finishes the work already done (nothing is parsed twice).
    With a ``checker``, the public-key operations of a small message are handed to it
    (and the results are an awaitable of them)."""
    work = _Work(message, max_signatures, now)
    if not work.parsed:
        return work.done((), ())
    if len(message.data) - message.header_end >= VERIFY_INLINE_BYTES:
        return work.finish(message, lookup)
    keys: list[PublicKey | BaseException] = []
    for _, sig in work.parsed:
        key = _cached_key(lookup, sig)
        if key is None:
            return work.finish(message, lookup, checker)
        keys.append(key)
    ready = work.keyed(keys)
    if not ready:
        return work.done((), ())
    if not _inline(ready):
        return work.off_loop(ready, message.body())
    return work.check(ready, message.body(), checker)


async def verify(message: Message, lookup: Lookup, *, max_signatures: int = 5,
                 now: float | None = None) -> list[DkimResult]:
    """One result per DKIM-Signature field of ``message``, top down, at most
    ``max_signatures`` of them (§4.2 lets a verifier limit the work a message costs);
    an empty list for an unsigned message.  Keys are looked up concurrently."""
    answer = verify_now(message, lookup, max_signatures=max_signatures, now=now)
    return answer if isinstance(answer, list) else await answer

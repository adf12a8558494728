"""DKIM signing of outbound mail: the ``[[dkim_sign]]`` keys, which of them sign a message,
and the agent that adds the DKIM-Signature fields at the sign stage.

A message is signed when the client may relay (its mail is outbound) and the domain of
the first mailbox of its From: field (RFC 5322 §3.6.2: the author, which DMARC aligns
with) is an entry's ``domain``, or is below it and the entry says ``subdomains``.  The
most specific matching domain wins; every entry of that domain signs, so an RSA and an
Ed25519 key for one domain give two signatures (RFC 8463 §3 suggests signing with both
while verifiers learn Ed25519).  The stage runs once, before the message is stored: a
retry delivers the stored, signed bytes and never signs again.

The keys are loaded and checked once, when the agent is built (and by ``ferry serve``'s
preflight and ``ferry config check``, through :func:`key_problems`).  The signature
itself is engine.message.dkim's; this module owns only the matching.  It must never sign
mail of a client that may not relay (anyone could then have our domain's signature on
their text), and never read a file after start.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Awaitable, Iterator, Sequence
from email.utils import getaddresses
from typing import TYPE_CHECKING, ClassVar, Final

from engine.agents.api import (
    ACCEPT,
    Agent,
    HeaderChange,
    Message,
    Session,
    Transaction,
    Verdict,
)
from engine.agents.batch import ThreadBatches
from engine.config import Config, ConfigError, DkimSignConfig
from engine.message.dkim import (
    DEFAULT_HEADERS,
    VERIFY_INLINE_BYTES,
    DkimKeyError,
    Prepared,
    Signer,
    SigningKey,
    load_signing_key,
)

if TYPE_CHECKING:
    from engine.agents import AgentContext

__all__ = ["DkimSigner", "build_signer", "from_domain", "key_problems", "signers_from"]

#: A signing failure is a bug or a broken key: the client retries later rather than
#: have unsigned mail refused by the large mailbox providers.
FAIL_OPEN: Final = False
TIMEOUT: Final = 10.0


# The common forms, "addr@domain" and "Display Name <addr@domain>" with no quotes, comments,
# groups or lists, read without the email package (getaddresses costs ~25 µs a message).
_ATOMS = r'[^\s"(),:;<>@\\\[\]]+'
_PLAIN = re.compile(rf'[^"(),:;<>@\\]*<{_ATOMS}@({_ATOMS})>\s*|\s*{_ATOMS}@({_ATOMS})\s*')


def from_domain(message: Message) -> str:
    """The domain of the first mailbox of the From: field, lower-case ("" when none)."""
    value = message.get("From")
    if not value:
        return ""
    plain = _PLAIN.fullmatch(value)
    if plain is not None:
        return (plain.group(1) or plain.group(2)).lower().rstrip(".")
    for _name, address in getaddresses([value]):
        if "@" in address:
            return address.rpartition("@")[2].strip().lower().rstrip(".")
    return ""


def _signer(entry: DkimSignConfig, key: SigningKey) -> Signer:
    return Signer(entry.domain, entry.selector, key, headers=entry.headers or DEFAULT_HEADERS,
                  oversign=entry.oversign)


def _load(entries: Sequence[DkimSignConfig]) -> tuple[list[Signer], list[str]]:
    """The signers of ``entries`` and the problems (one line each, dotted key first)."""
    signers: list[Signer] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(entries):
        try:
            signer = _signer(entry, load_signing_key(entry.key_file))
        except DkimKeyError as exc:
            problems.append(f"dkim_sign[{i}].key_file: {exc}")
            continue
        # One key per algorithm and domain: rotating keys is a change of selector.
        where = (entry.domain, signer.algorithm)
        if where in seen:
            problems.append(f"dkim_sign[{i}].key_file: a second {signer.algorithm} key for "
                            f"{entry.domain} (dkim_sign[{seen[where]}] has one); sign with "
                            "one key per algorithm, and rotate by changing the selector")
        seen.setdefault(where, i)
        signers.append(signer)
    return signers, problems


def key_problems(config: Config) -> list[str]:
    """Why the [[dkim_sign]] keys cannot be used (engine.ops.preflight)."""
    return _load(config.dkim_sign)[1]


def signers_from(config: Config) -> list[Signer]:
    """Every [[dkim_sign]] entry's signer; ConfigError naming each bad key."""
    signers, problems = _load(config.dkim_sign)
    if problems:
        raise ConfigError(problems)
    return signers


class DkimSigner(Agent):
    """Adds a DKIM-Signature field per matching key at the sign stage."""

    name: ClassVar[str] = "dkim_sign"

    def __init__(self, signers: Sequence[Signer], subdomains: Sequence[bool], *,
                 timeout: float = TIMEOUT, fail_open: bool = FAIL_OPEN) -> None:
        super().__init__(timeout=timeout, fail_open=fail_open)
        self._exact: dict[str, list[Signer]] = {}
        self._below: dict[str, list[Signer]] = {}
        for signer, below in zip(signers, subdomains, strict=True):
            self._exact.setdefault(signer.domain, []).append(signer)
            if below:
                self._below.setdefault(signer.domain, []).append(signer)
        self._batches: ThreadBatches[_Items, _Signed] = ThreadBatches(batch=_sign_batch)

    def signers_for(self, domain: str) -> list[Signer]:
        """The signers of the most specific entry domain that covers ``domain``."""
        if not domain:
            return []
        found = self._exact.get(domain)
        if found:
            return found
        labels = domain.split(".")
        for i in range(1, len(labels)):
            found = self._below.get(".".join(labels[i:]))
            if found:
                return found
        return []

    def sign(self, session: Session, tx: Transaction, message: Message
             ) -> Verdict | Awaitable[Verdict]:
        if not session.may_relay:
            return ACCEPT
        signers = self.signers_for(from_domain(message))
        if not signers:
            return ACCEPT
        if all(signer.inline for signer in signers):
            # Ed25519 with the compiled engine.message.pkey, which keeps the GIL: ~45 µs
            # on the loop, less than a hand-off to a thread and back (benchmarks/README.md,
            # issue 15, third pass), and the verdict comes without a task.
            return _verdict([signer.value(message) for signer in signers])
        # Else the signatures in a thread: an RSA signature (~260 µs) is too long for the
        # loop, and cryptography (the twin) releases the GIL in each, which on the loop
        # costs a GIL round trip (engine.agents.batch).  The digests are prepared here
        # (the compiled canonicalisation: tens of µs at 1 KiB) and only they go to the
        # thread, where the compiled RsaSigner signs a whole batch's in one release of the
        # GIL: the batch waits once, not once a message, for the busy loop to give the
        # GIL back (benchmarks/README.md, issue 15, seventh pass; with cryptography's one
        # release per signature this split measured no better, second pass).  A large
        # body is hashed in the thread instead, as verification does beyond the same size.
        if len(message.data) > VERIFY_INLINE_BYTES:
            return self._signed([(signer, message.data) for signer in signers])
        return self._signed([(signer, signer.prepare(message)) for signer in signers])

    async def _signed(self, items: _Items) -> Verdict:
        signed = await self._batches.submit(items)
        return _verdict([Signer.finish(prepared, signature) for prepared, signature in signed])


#: One message's signers, each with its prepared signature (:meth:`Signer.prepare`), or
#: with the message when its body is too large to hash on the loop.
_Items = Sequence[tuple[Signer, Prepared | bytes]]
#: One message's prepared signatures, each with its public-key signature.
_Signed = list[tuple[Prepared, bytes]]


def _sign_batch(batch: Sequence[_Items]) -> list[_Signed | Exception]:
    """Every message's signatures, in the signing thread: each signer's digests of the
    whole batch in one call (:meth:`Signer.signatures`); a message that could not be
    prepared or signed gets its exception, the others their signatures."""
    ready: list[list[tuple[Signer, Prepared]] | Exception] = []
    digests: dict[Signer, list[bytes]] = {}
    for items in batch:
        try:
            mine = [(signer, p if isinstance(p, Prepared) else signer.prepare(p))
                    for signer, p in items]
        except Exception as exc:  # reported through the message's own future
            ready.append(exc)
            continue
        ready.append(mine)
        for signer, prepared in mine:
            digests.setdefault(signer, []).append(prepared.digest)
    made: dict[Signer, Iterator[bytes | Exception]] = {}
    for signer, wanted in digests.items():
        try:
            made[signer] = iter(signer.signatures(wanted))
        except Exception as exc:  # the key itself: every message it signs fails
            made[signer] = itertools.repeat(exc)
    out: list[_Signed | Exception] = []
    for message in ready:
        if isinstance(message, Exception):
            out.append(message)
            continue
        signed: _Signed = []
        failed: Exception | None = None
        for signer, prepared in message:
            signature = next(made[signer])
            if isinstance(signature, Exception):
                failed = failed or signature
            else:
                signed.append((prepared, signature))
        out.append(failed if failed is not None else signed)
    return out


def _verdict(values: Sequence[str]) -> Verdict:
    return Verdict(headers=tuple(HeaderChange("add", "DKIM-Signature", v) for v in values))


def build_signer(ctx: AgentContext) -> DkimSigner | None:
    """The signing agent of ``ctx.config``'s [[dkim_sign]] entries; None without any."""
    config = ctx.config
    if not config.dkim_sign:
        return None
    return DkimSigner(signers_from(config), [e.subdomains for e in config.dkim_sign])

"""DMARC (RFC 7489): the author domain, policy discovery, identifier alignment, the result
and the policy a failing message gets.

Owns the DMARC rules only.  The inputs are what the caller already established: the raw
From field values of the message, the domain SPF authenticated for MAIL FROM (with its
result) and the d= of each DKIM signature (with its result).  It reads the policy records
through the shared cached :class:`~engine.agents.dns.Lookup` and computes the
organizational domain from the Public Suffix List (the ``publicsuffixlist`` package, whose
bundled list is loaded once, in a thread: :func:`load_public_suffix_list`).

The report addresses (``rua``, ``ruf``) and ``fo``/``rf``/``ri`` are parsed and kept on
the record, but no report is ever sent from here.  It must never verify SPF or DKIM
itself, never decide the SMTP reply (the verify agent maps the disposition to an action
by configuration) and never block the loop.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from functools import cache, lru_cache
from typing import Final, Literal

from publicsuffixlist import PublicSuffixList

from engine.agents.api import MethodResult
from engine.agents.dns import Answer, DnsPermError, DnsTempError, Lookup

__all__ = [
    "Authenticated",
    "AuthorError",
    "DmarcRecord",
    "DmarcResult",
    "Policy",
    "RecordError",
    "aligned",
    "author_domains",
    "check",
    "discover",
    "discover_now",
    "evaluate",
    "load_public_suffix_list",
    "organizational_domain",
    "parse_record",
    "worst",
]

Disposition = Literal["none", "quarantine", "reject"]
Alignment = Literal["r", "s"]
Result = Literal["pass", "fail", "none", "temperror", "permerror"]

_DISPOSITIONS: Final[tuple[Disposition, ...]] = ("none", "quarantine", "reject")

#: RFC 7489 §6.6.4: a message that the pct sample leaves out gets the next weaker policy
#: ("reject" → "quarantine", "quarantine" → "none").
_WEAKER: Final[dict[Disposition, Disposition]] = {
    "reject": "quarantine", "quarantine": "none", "none": "none"}

# RFC 7489 §6.4: dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ]; a URI is
# scheme ":" something (RFC 3986 §3), which is all a receiver that sends no reports needs.
_URI: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s!,]+(?:![0-9]+[kmgtKMGT]?)?")
_FO: Final = re.compile(r"[01ds](?::[01ds])*")


# --- organizational domain (RFC 7489 §3.2) ------------------------------------------------


@cache
def load_public_suffix_list() -> PublicSuffixList:
    """The Public Suffix List bundled with ``publicsuffixlist`` (ICANN and private
    sections, as RFC 7489 §3.2 names the list without a section).  Loading takes tens of
    milliseconds: call it once in a thread before the first message (the verify agent's
    ``start``)."""
    return PublicSuffixList()


#: Distinct domains remembered by the two caches below: a busy MX sees the same few
#: thousand sending domains again and again, and both answers depend on the text alone.
CACHE_SIZE: Final = 8192


@lru_cache(maxsize=CACHE_SIZE)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label.  A domain that is itself a public
    suffix (or unknown to the list's rules) is its own organizational domain."""
    domain = domain.lower().rstrip(".")
    private = load_public_suffix_list().privatesuffix(domain)
    return private if private else domain


def aligned(mode: Alignment, author: str, identifier: str) -> bool:
    """RFC 7489 §3.1: strict needs the very same domain, relaxed the same organizational
    domain (case-insensitive both; a trailing dot never matters)."""
    author, identifier = author.lower().rstrip("."), identifier.lower().rstrip(".")
    if not author or not identifier:
        return False
    if author == identifier:
        return True
    return mode == "r" and organizational_domain(author) == organizational_domain(identifier)


# --- the author domain (RFC 7489 §6.6.1) --------------------------------------------------


class AuthorError(ValueError):
    """The message has no single usable From field (RFC 5322 §3.6 requires exactly one,
    holding at least one mailbox): DMARC cannot name an author domain."""


def author_domains(from_values: Sequence[str]) -> tuple[str, ...]:
    """The distinct domains of the mailboxes in the message's From field, in order,
    lower-case and in A-labels (RFC 7489 §6.6.1).  ``from_values`` are the raw values of
    every From field.  AuthorError when there is no From, more than one From field, a
    mailbox without a domain, or no mailbox at all."""
    if not from_values:
        raise AuthorError("no From field")
    if len(from_values) > 1:
        raise AuthorError(f"{len(from_values)} From fields")
    return _domains_of(from_values[0])


@lru_cache(maxsize=CACHE_SIZE)
def _domains_of(raw: str) -> tuple[str, ...]:
    value = " ".join(raw.replace("\r\n", " ").split())
    addresses = [address for _, address in getaddresses([value])]
    if not addresses or any(not address for address in addresses):
        raise AuthorError("no mailbox in From")
    domains: list[str] = []
    for address in addresses:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            raise AuthorError(f"a From mailbox without a domain: {address[:80]!r}")
        normal = _a_label(domain)
        if normal not in domains:
            domains.append(normal)
    return tuple(domains)


def _a_label(domain: str) -> str:
    """§6.6.1: a U-label domain is converted to A-labels for the lookups."""
    domain = domain.lower().rstrip(".")
    if domain.isascii():
        if not re.fullmatch(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*", domain):
            raise AuthorError(f"From domain is not a domain name: {domain[:80]!r}")
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise AuthorError(f"From domain is not a domain name: {domain[:80]!r}") from None


# --- the record (RFC 7489 §6.3, §6.4) -----------------------------------------------------


class RecordError(ValueError):
    """A TXT record that starts with v=DMARC1 but cannot be used (§6.6.3 step 6)."""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """One DMARC policy record.  Only ``p``, ``sp``, ``pct``, ``adkim`` and ``aspf``
    decide anything here; the rest is kept for whoever sends reports."""

    p: Disposition
    #: The subdomain policy; None when the record has no (valid) sp= (then p applies).
    sp: Disposition | None = None
    pct: int = 100
    adkim: Alignment = "r"
    aspf: Alignment = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400


@lru_cache(maxsize=CACHE_SIZE)
def parse_record(text: str) -> DmarcRecord:
    """Parse a record that starts with ``v=DMARC1`` (the caller discards the others,
    §6.6.3 step 2).  Unknown tags are ignored and a bad optional value falls back to its
    default (§6.3); a missing or bad ``p`` (or a bad ``sp``) makes the record p=none when
    ``rua`` holds a valid URI, else RecordError (§6.6.3 step 6)."""
    tags: dict[str, str] = {}
    parts = [part.strip(" \t") for part in text.split(";")]
    for i, part in enumerate(parts):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip(" \t").lower(), value.strip(" \t")
        if i == 0 and (name != "v" or value != "DMARC1"):
            raise RecordError("the first tag is not v=DMARC1")
        if not eq:
            continue  # not a tag: ignored like an unknown one (§6.3)
        tags.setdefault(name, value)
    rua = _uris(tags.get("rua", ""))
    ruf = _uris(tags.get("ruf", ""))
    p = _disposition(tags.get("p"))
    sp = _disposition(tags["sp"]) if "sp" in tags else None
    if p is None or ("sp" in tags and sp is None):
        if not rua:
            raise RecordError("no valid p= and no valid rua=")
        p, sp = "none", None
    return DmarcRecord(
        p=p, sp=sp, pct=_pct(tags.get("pct")),
        adkim=_alignment(tags.get("adkim")), aspf=_alignment(tags.get("aspf")),
        rua=rua, ruf=ruf,
        fo=tags["fo"] if _FO.fullmatch(tags.get("fo", "")) else "0",
        rf=tags.get("rf") or "afrf",
        ri=int(tags["ri"]) if tags.get("ri", "").isdigit() else 86400,
    )


def _disposition(value: str | None) -> Disposition | None:
    if value is None:
        return None
    lower = value.lower()
    for d in _DISPOSITIONS:
        if lower == d:
            return d
    return None


def _alignment(value: str | None) -> Alignment:
    return "s" if value is not None and value.lower() == "s" else "r"


def _pct(value: str | None) -> int:
    if value is None or not value.isdigit() or int(value) > 100:
        return 100
    return int(value)


def _uris(value: str) -> tuple[str, ...]:
    return tuple(u for u in (part.strip(" \t") for part in value.split(",")) if _URI.fullmatch(u))


# --- policy discovery (RFC 7489 §6.6.3) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """What policy discovery found for one author domain."""

    #: The author (From) domain the discovery was for.
    domain: str
    #: "found", "none" (no record, several, or an unusable one), "temperror" (the DNS
    #: could not answer), "permerror" (the domain cannot be looked up).
    status: Literal["found", "none", "temperror", "permerror"]
    record: DmarcRecord | None = None
    #: The domain whose _dmarc record was used (the author's or its organizational one).
    source: str = ""
    reason: str = ""


async def discover(lookup: Lookup, domain: str) -> Policy:
    """§6.6.3: the record at _dmarc.<domain>, else at _dmarc.<organizational domain>."""
    for source in _sources(domain):
        try:
            answer = await lookup.txt(f"_dmarc.{source}")
        except DnsTempError as exc:
            return Policy(domain, "temperror", source=source, reason=str(exc))
        except DnsPermError as exc:
            return Policy(domain, "permerror", source=source, reason=str(exc))
        policy = _policy(domain, source, answer)
        if policy is not None:
            return policy
    return Policy(domain, "none", reason="no DMARC record")


def discover_now(lookup: Lookup, domain: str) -> Policy | Awaitable[Policy]:
    """:func:`discover`'s policy at once when the answers it needs are cached (a busy
    MX's case: no coroutine, no task), else an awaitable of it."""
    for source in _sources(domain):
        try:
            answer = lookup.cached(f"_dmarc.{source}", "TXT")
        except DnsTempError as exc:
            return Policy(domain, "temperror", source=source, reason=str(exc))
        if answer is None:
            return discover(lookup, domain)
        policy = _policy(domain, source, answer)
        if policy is not None:
            return policy
    return Policy(domain, "none", reason="no DMARC record")


@lru_cache(maxsize=CACHE_SIZE)
def _sources(domain: str) -> tuple[str, ...]:
    """Where the record is looked for, in order: the domain, its organizational domain."""
    return tuple(dict.fromkeys((domain, organizational_domain(domain))))


@lru_cache(maxsize=CACHE_SIZE)
def _policy(domain: str, source: str, answer: Answer) -> Policy | None:
    """The policy the answer at _dmarc.<source> gives, None when it has no record (step
    3: look at the organizational domain next).  Cached by the answer (a frozen value):
    the same answer always gives the same policy."""
    # Step 2: records that do not start with v=DMARC1 are discarded.
    texts = [t for t in answer.records if _version_tag(t)]
    if not texts:
        return None
    if len(texts) > 1:
        # Step 5: several records → no DMARC processing for this message.
        return Policy(domain, "none", source=source,
                      reason=f"{len(texts)} DMARC records at _dmarc.{source}")
    try:
        record = parse_record(texts[0])
    except RecordError as exc:
        return Policy(domain, "none", source=source, reason=f"_dmarc.{source}: {exc}")
    return Policy(domain, "found", record, source)


def _version_tag(text: str) -> bool:
    name, _, rest = text.partition("=")
    return name.strip(" \t").lower() == "v" and rest.lstrip(" \t").split(";")[0].strip(
        " \t") == "DMARC1"


# --- the result (RFC 7489 §4.2, §6.6.2, §6.6.4) -------------------------------------------


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC outcome for a message.  ``disposition`` is what the domain owner asks for
    this message after the pct sample ("none" unless the result is fail)."""

    result: Result
    #: The author domain reported as header.from ("" when there was none).
    from_domain: str = ""
    reason: str = ""
    record: DmarcRecord | None = None
    #: The requested policy for the author domain (p, or sp for a subdomain of the
    #: record's domain); "" without a record.
    policy: Disposition | Literal[""] = ""
    disposition: Disposition = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False

    def method_result(self) -> MethodResult:
        """RFC 7489 §11.2: method "dmarc" with header.from; for a message judged under a
        policy, the comment names it (p=, sp= and the disposition actually applied, as
        the big receivers write it) and policy.dmarc carries the disposition."""
        props: tuple[tuple[str, str], ...] = ()
        if self.from_domain:
            props = (("header.from", self.from_domain),)
        reason = self.reason
        if self.record is not None:
            sp = f" sp={self.record.sp}" if self.record.sp else ""
            reason = f"p={self.record.p}{sp} dis={self.disposition}"
            if self.result == "fail":
                props += (("policy.dmarc", self.disposition),)
        return MethodResult("dmarc", self.result, reason, props)


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The identifiers SPF and DKIM established, as DMARC aligns them (§4.2): the domain
    SPF checked for MAIL FROM (the HELO domain for the null sender, RFC 7208 §2.4) with its
    result, and each DKIM signature's (result, d=)."""

    spf_result: str = "none"
    spf_domain: str = ""
    dkim: tuple[tuple[str, str], ...] = field(default=())


def evaluate(policy: Policy, auth: Authenticated,
             sample: Callable[[], float] = random.random) -> DmarcResult:
    """The DMARC result for one author domain from its discovered policy (§6.6.2) and
    the disposition under p/sp and pct (§6.6.4).  ``sample`` draws from [0, 1) for the pct
    sampling (tests pass a fixed one)."""
    domain = policy.domain
    if policy.status != "found" or policy.record is None:
        result: Result = "temperror" if policy.status == "temperror" else (
            "permerror" if policy.status == "permerror" else "none")
        return DmarcResult(result, domain, policy.reason)
    record = policy.record
    spf_ok = auth.spf_result == "pass" and aligned(record.aspf, domain, auth.spf_domain)
    dkim_ok = any(r == "pass" and aligned(record.adkim, domain, d) for r, d in auth.dkim)
    # §6.3 sp: the subdomain policy is for subdomains of the domain the record was found
    # at, never for that domain itself (a subdomain with its own record uses its p).
    requested = record.p
    if domain != policy.source and record.sp is not None:
        requested = record.sp
    if spf_ok or dkim_ok:
        return DmarcResult("pass", domain, "", record, requested, "none", spf_ok, dkim_ok)
    # An aligned identifier whose check could not be done (the DNS failed) might have
    # passed: a temperror (RFC 7489 §11.2: "a later attempt might produce a final
    # result"), so no policy is enforced on a DNS hiccup.
    if (auth.spf_result == "temperror" and aligned(record.aspf, domain, auth.spf_domain)) or any(
            r == "temperror" and aligned(record.adkim, domain, d) for r, d in auth.dkim):
        return DmarcResult("temperror", domain, "an aligned identifier could not be checked",
                           record, requested)
    disposition = requested if sample() * 100 < record.pct else _WEAKER[requested]
    return DmarcResult("fail", domain, "", record, requested, disposition)


#: How results of several author domains rank: the worst one is the message's (§6.6.1,
#: "apply the most strict policy selected among the checks that fail").
_RANK: Final[dict[str, int]] = {"pass": 0, "none": 1, "permerror": 2, "temperror": 3,
                                "fail": 4}


def worst(results: Iterable[DmarcResult]) -> DmarcResult:
    """The strictest of several author domains' results (a From with many domains)."""
    return max(results, key=lambda r: (_RANK[r.result], _DISPOSITIONS.index(r.disposition)))


async def check(lookup: Lookup, from_values: Sequence[str], auth: Authenticated,
                sample: Callable[[], float] = random.random) -> DmarcResult:
    """The whole DMARC check of a message: author domains, discovery, evaluation.  A
    message without a single usable From field is a permerror (§6.6.1: forbidden by RFC
    5322, so no policy applies to it)."""
    try:
        domains = author_domains(from_values)
    except AuthorError as exc:
        return DmarcResult("permerror", reason=str(exc))
    policies = await asyncio.gather(*(discover(lookup, d) for d in domains))
    return worst(evaluate(p, auth, sample) for p in policies)

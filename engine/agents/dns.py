"""DNS for the agents: TXT, A, AAAA, MX and PTR lookups on dnspython's asyncio resolver,
with a TTL cache shared by every agent (SPF, DKIM keys, DMARC policies, DNS lists).

An answer says whether the name exists (RFC 7208 §4.6.4 counts "void lookups": NXDOMAIN
and empty answers alike, but SPF and DMARC tell them apart elsewhere), and a lookup that
could not be answered (SERVFAIL, timeout, refused) raises :class:`DnsTempError`, which the
agents turn into their "temperror" results; a malformed name raises :class:`DnsPermError`.
Answers are cached for their TTL (negative answers for the SOA minimum, capped), and
concurrent lookups of the same question share one query.

It must never block the loop and never decide policy: it returns what the DNS said.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from engine.routing.mx import new_resolver, nxdomain_ttl, settle

__all__ = ["Answer", "DnsError", "DnsPermError", "DnsTempError", "Lookup", "RecordType"]

RecordType = Literal["TXT", "A", "AAAA", "MX", "PTR"]

#: Negative answers are kept at most this long (RFC 2308 §5 lets the SOA minimum rule;
#: a day-long negative TTL would hide a record the owner just published).
MAX_NEGATIVE_TTL: Final = 900.0


class DnsError(Exception):
    pass


class DnsTempError(DnsError):
    """The lookup could not be answered now (SERVFAIL, timeout, no server reachable)."""


class DnsPermError(DnsError):
    """The name cannot be looked up at all (not a valid domain name)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What the DNS said.  ``records`` by type: TXT the character-strings of each record
    joined (RFC 7208 §3.3), A/AAAA the address text, MX "preference host", PTR the host;
    host names lower-case without the final dot."""

    name: str
    rdtype: RecordType
    #: "ok" (records, maybe none: NODATA) or "nxdomain".
    status: Literal["ok", "nxdomain"]
    records: tuple[str, ...] = ()
    #: The AD bit of the response (RFC 4035 §3.2.3): meaningful only from a validating
    #: resolver that the operator trusts.
    authenticated: bool = False

    @property
    def void(self) -> bool:
        """NXDOMAIN or no records of the type (RFC 7208 §4.6.4)."""
        return not self.records


@dataclass(slots=True)
class _Entry:
    value: Answer | DnsTempError
    expires: float


class Lookup:
    """Cached lookups against ``nameserver`` (host, port), or the system's resolvers
    when None.  ``timeout`` bounds one query to one server, ``lifetime`` a whole lookup
    with its retries; a failure (temporary error) is cached ``failure_ttl`` seconds, so a
    dead zone does not cost a full timeout per message."""

    def __init__(
        self,
        nameserver: tuple[str, int] | None = None,
        *,
        timeout: float = 3.0,
        lifetime: float = 6.0,
        max_entries: int = 50_000,
        failure_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # DO asks for the AD bit (RFC 4035 §3.2.1), which Answer.authenticated reports.
        self._resolver = new_resolver(nameserver, timeout=timeout, lifetime=lifetime,
                                      ednsflags=dns.flags.DO)
        self.max_entries = max_entries
        self.failure_ttl = failure_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        #: Queries sent (cache misses), for metrics and tests.
        self.queries = 0

    async def query(self, name: str, rdtype: RecordType) -> Answer:
        """The answer for ``name``/``rdtype``; DnsTempError or DnsPermError."""
        name = name.lower().rstrip(".")
        key = (rdtype, name)
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > self._clock():
                self._cache.move_to_end(key)
                if isinstance(entry.value, DnsTempError):
                    raise DnsTempError(*entry.value.args)
                return entry.value
            del self._cache[key]
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(name, rdtype))
            self._inflight[key] = future
            future.add_done_callback(lambda f: settle(self._inflight, key, f))
        # shield: one caller giving up (its agent's budget ran out) must not cancel the
        # query other callers wait for.
        return await asyncio.shield(future)

    def cached(self, name: str, rdtype: RecordType) -> Answer | None:
        """The live cached answer to ``name``/``rdtype`` without awaiting anything: None
        when none is cached (the caller then awaits :meth:`query`), DnsTempError when a
        failure is.  The agents' synchronous path for a busy sender's mail, whose answers
        are all cached: no coroutine, no task (benchmarks/README.md, issue 15)."""
        key = (rdtype, name.lower().rstrip("."))
        entry = self._cache.get(key)
        if entry is None or entry.expires <= self._clock():
            return None
        self._cache.move_to_end(key)
        if isinstance(entry.value, DnsTempError):
            raise DnsTempError(*entry.value.args)
        return entry.value

    def now(self) -> float:
        """The time on the clock the cache's expiry times are read from."""
        return self._clock()

    def valid_until(self, keys: Iterable[tuple[str, RecordType]]) -> float | None:
        """When the first of the cached answers to ``keys`` (name and type, as given to
        :meth:`query`) expires: until then a query for any of them gives the same answer.
        None when there are no keys or one of them has no live answer cached (a failure,
        an answer with TTL 0, or one already gone), so nothing derived from them may be
        kept."""
        now = self._clock()
        until: float | None = None
        for name, rdtype in keys:
            entry = self._cache.get((rdtype, name.lower().rstrip(".")))
            if entry is None or entry.expires <= now or isinstance(entry.value, DnsTempError):
                return None
            until = entry.expires if until is None else min(until, entry.expires)
        return until

    async def txt(self, name: str) -> Answer:
        return await self.query(name, "TXT")

    async def ptr(self, address: str) -> Answer:
        """The PTR records of an IP address (its reverse name is built here)."""
        return await self.query(dns.reversename.from_address(address).to_text(), "PTR")

    def _store(self, key: tuple[str, str], value: Answer | DnsTempError, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = _Entry(value, self._clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _fetch(self, name: str, rdtype: RecordType) -> Answer:
        key = (rdtype, name)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DnsPermError(f"{name!r} is not a domain name ({type(exc).__name__})") from None
        self.queries += 1
        try:
            answer = await self._resolver.resolve(
                qname, dns.rdatatype.from_text(rdtype), search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            ttl = nxdomain_ttl(exc)
            result = Answer(name, rdtype, "nxdomain")
            self._store(key, result, min(ttl, MAX_NEGATIVE_TTL))
            return result
        except (dns.exception.Timeout, dns.resolver.NoNameservers,
                dns.resolver.LifetimeTimeout) as exc:
            error = DnsTempError(f"{rdtype} {name}: {type(exc).__name__}")
            self._store(key, error, self.failure_ttl)
            raise error from None
        except dns.exception.DNSException as exc:
            error = DnsTempError(f"{rdtype} {name}: {exc}")
            self._store(key, error, self.failure_ttl)
            raise error from None
        ad = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            ttl = float(answer.chaining_result.minimum_ttl)
            result = Answer(name, rdtype, "ok", (), ad)
            self._store(key, result, min(ttl, MAX_NEGATIVE_TTL))
            return result
        result = Answer(name, rdtype, "ok", tuple(_text(rd, rdtype) for rd in answer.rrset), ad)
        self._store(key, result, float(answer.rrset.ttl))
        return result


def _text(rd: object, rdtype: RecordType) -> str:
    if rdtype == "TXT":
        strings: tuple[bytes, ...] = rd.strings  # type: ignore[attr-defined]
        return b"".join(strings).decode("utf-8", "surrogateescape")
    if rdtype == "MX":
        host = rd.exchange.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
        return f"{rd.preference} {host}"  # type: ignore[attr-defined]
    if rdtype == "PTR":
        return str(rd.target.to_text(omit_final_dot=True).lower())  # type: ignore[attr-defined]
    return str(rd.address)  # type: ignore[attr-defined]


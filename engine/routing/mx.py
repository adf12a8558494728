"""MX resolution: a domain → the hosts to try, in order, with their addresses, cached.

Owns the DNS side of routing (RFC 5321 §5.1): the MX lookup, preference order with random
shuffling among equal preferences, the implicit MX (a domain without MX records is its
own mail host), the null MX (RFC 7505), the A/AAAA lookups of the MX hosts (IPv4 first),
and the translation of DNS outcomes into :class:`~engine.routing.api.RouteError`:

==============================================  =========  =====  ========
outcome                                         permanent  code   enhanced
==============================================  =========  =====  ========
NXDOMAIN for the domain                         yes        550    5.1.2
null MX ("0 .", RFC 7505 §3)                    yes        556    5.1.10
no MX and no A/AAAA for the domain              yes        550    5.1.2
MX hosts exist, none of them has an address     yes        550    5.4.4
an invalid domain name                          yes        550    5.1.2
timeout, SERVFAIL, REFUSED, anything else       no         451    4.4.3
==============================================  =========  =====  ========

"No addresses anywhere" is permanent because the DNS answered definitively (NODATA or
NXDOMAIN for every name asked); Postfix bounces the same case.  A temporary failure of
any one lookup that leaves no address makes the whole answer temporary instead.

Answers are cached per record set: an MX set per domain and an address set per host name,
each for its TTL (for an address set, the smaller of the A and AAAA TTLs), so many domains
hosted at one provider share the provider's address lookups, and a combined answer is
never older than the smallest TTL it was built from.  Negative answers (NXDOMAIN, NODATA)
are cached for the SOA minimum of RFC 2308 §5, capped at ``max_negative_ttl``; temporary
failures are never cached.  The cache holds at most ``max_entries`` record sets and drops
the least recently used.  Concurrent lookups of one record set share one query.

DNSSEC (RFC 7672 §2.1): when the operator marks the resolver validating, queries ask for
the AD bit (RFC 6840 §5.7) and the MX lookup remembers whether its answer carried it
(:meth:`MxResolver.mx_secure`); :meth:`MxResolver.tlsa` looks up the TLSA records of a
host (``_25._tcp.<host>``) the same way, cached for their TTL.  Nothing here decides what a
secure answer means: engine.tlspolicy does.

It must never hold delivery state, choose send connectors or open SMTP connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TLSA
import dns.resolver

from engine.config import Config
from engine.ops.figures import DNS_SECONDS, Histogram
from engine.routing.api import Host, RouteError

__all__ = ["MxAnswer", "MxResolver", "TlsaAnswer"]

_T = TypeVar("_T")

#: What _peek returns for a record set that is not cached (or has expired).
_MISS: Final = object()

#: RFC 2308 §5 allows negative caching up to the SOA minimum; a long one would keep a
#: freshly created domain unreachable, so it is capped.
MAX_NEGATIVE_TTL: Final = 300.0


@dataclass(frozen=True, slots=True)
class MxAnswer:
    """The hosts of a domain and the site they form ("mx:" + sorted MX names)."""

    site: str
    hosts: tuple[Host, ...]
    #: True when the domain had no MX records and is its own mail host (RFC 5321 §5.1).
    implicit: bool = False


#: One TLSA record: (usage, selector, matching type, certificate association data).
Tlsa = tuple[int, int, int, bytes]


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The TLSA records of one host and port (empty: none published) and whether the
    answer was validated (the AD bit from a resolver marked validating)."""

    records: tuple[Tlsa, ...]
    secure: bool


@dataclass(frozen=True, slots=True)
class _Failure:
    """A cached permanent failure; a fresh RouteError is raised from it on each hit."""

    text: str
    code: int
    enhanced: str

    def error(self) -> RouteError:
        return RouteError(self.text, permanent=True, code=self.code, enhanced=self.enhanced)


@dataclass(slots=True)
class _Entry:
    value: object
    expires: float


# What the MX lookup of a domain found: the (preference, host name) pairs; () for no MX
# records (implicit MX); None for a null MX.
_MxSet = tuple[tuple[int, str], ...] | None
# The addresses of one host name: (IPv4, IPv6).
_Addresses = tuple[tuple[str, ...], tuple[str, ...]]


def _temporary(domain: str, why: str) -> RouteError:
    return RouteError(
        f"DNS lookup for {domain} failed temporarily ({why})",
        permanent=False,
        code=451,
        enhanced="4.4.3",
    )


def _why(err: BaseException) -> str:
    if isinstance(err, dns.exception.Timeout):
        return "timeout"
    if isinstance(err, dns.resolver.NoNameservers):
        return "no nameserver answered: SERVFAIL or REFUSED"
    return type(err).__name__


def _names(domain: str, mx_set: _MxSet) -> tuple[str, ...]:
    """The host names whose addresses an MX answer needs: the MX names (once each), the
    domain itself for an implicit MX, none for a null MX."""
    if mx_set is None:
        return ()
    return tuple(dict.fromkeys(name for _, name in mx_set)) if mx_set else (domain,)


def _plain(name: dns.name.Name) -> str:
    """A DNS name as Ferry writes host names: lower-case, no trailing dot."""
    return name.to_text(omit_final_dot=True).lower()


def new_resolver(nameserver: tuple[str, int] | None, *, timeout: float, lifetime: float,
                 ednsflags: int = 0) -> dns.asyncresolver.Resolver:
    """dnspython's asyncio resolver asking ``nameserver`` (host, port) only, or the
    system's resolvers (/etc/resolv.conf) when None; also engine.agents.dns's."""
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    # RFC 6891 §6.2.5: 1232 octets avoids fragmentation on any path (DNS flag day 2020).
    resolver.use_edns(0, ednsflags, 1232)
    return resolver


def nxdomain_ttl(err: dns.resolver.NXDOMAIN) -> float:
    """The negative TTL an NXDOMAIN answer carries (its SOA minimum, RFC 2308 §5); 0 when
    it carries none."""
    try:
        responses = cast(dict[dns.name.Name, dns.message.QueryMessage], err.kwargs["responses"])
        response = next(iter(responses.values()))
        return float(response.resolve_chaining().minimum_ttl)
    except (StopIteration, KeyError, dns.exception.DNSException):
        return 0.0


def settle(inflight: dict[Any, Any], key: object, future: asyncio.Future[Any]) -> None:
    """A shared lookup ended: forget it in ``inflight`` and mark its exception retrieved
    (nobody may be waiting any more)."""
    if inflight.get(key) is future:
        del inflight[key]
    if not future.cancelled():
        future.exception()


class MxResolver:
    """MX and address lookups on dnspython's asyncio resolver, with a TTL cache.

    ``nameserver`` (host, port) asks that server only (``--dns``, test labs); None uses
    the system's configuration (/etc/resolv.conf).  ``timeout`` bounds one query to one
    server, ``lifetime`` a whole lookup with its retries.  ``clock`` (monotonic seconds)
    decides cache expiry.
    """

    def __init__(
        self,
        nameserver: tuple[str, int] | None = None,
        *,
        timeout: float = 3.0,
        lifetime: float = 10.0,
        max_entries: int = 100_000,
        max_queries: int = 1000,
        max_negative_ttl: float = MAX_NEGATIVE_TTL,
        clock: Callable[[], float] = time.monotonic,
        validating: bool = False,
    ) -> None:
        self._resolver = new_resolver(nameserver, timeout=timeout, lifetime=lifetime)
        #: The resolver validates DNSSEC (DeliveryConfig.dnssec_validating): ask for the AD
        #: bit (RFC 6840 §5.7) and trust it.
        self.validating = validating
        if validating:
            self._resolver.flags = dns.flags.RD | dns.flags.AD
        #: domain → whether its MX answer had the AD bit (only when ``validating``).
        self._mx_ad: dict[str, bool] = {}
        #: Told of each domain whose MX set is looked up (not found in the cache), so
        #: that a lookup the delivery needs next runs beside this one (engine.tlspolicy's
        #: MTA-STS record); it must not wait or raise.
        self.prefetch: Callable[[str], None] | None = None
        self.max_entries = max_entries
        self.max_negative_ttl = max_negative_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[object]] = {}
        #: Bounds the queries in flight (see DeliveryConfig.dns_max_queries).
        self._slots = asyncio.Semaphore(max_queries)
        #: Seconds per query sent (cache misses only; its wait for a slot not counted),
        #: for metrics.
        self.query_seconds = Histogram(DNS_SECONDS)

    @classmethod
    def from_config(
        cls, config: Config, *, timeout: float = 3.0, lifetime: float = 10.0
    ) -> MxResolver:
        """The resolver for ``config.delivery.dns`` (the ``--dns`` flag)."""
        return cls(config.delivery.dns, timeout=timeout, lifetime=lifetime,
                   max_queries=config.delivery.dns_max_queries,
                   validating=config.delivery.dnssec_validating)

    # --- public lookups ------------------------------------------------------------------

    async def mx_hosts(self, domain: str, port: int) -> tuple[Host, ...]:
        """The hosts to try for ``domain``, best first: MX preference order, equal
        preferences shuffled per call, each MX name's IPv4 addresses before its IPv6 ones.
        Raises RouteError (see the module's table)."""
        return (await self.mx(domain, port)).hosts

    async def mx(self, domain: str, port: int) -> MxAnswer:
        """:meth:`mx_hosts` with the site the hosts form."""
        domain = domain.lower().rstrip(".")
        answer = self.mx_cached(domain, port)
        if answer is not None:
            return answer
        if self.prefetch is not None and self._peek(("MX", domain)) is _MISS:
            self.prefetch(domain)
        mx_set = await self._cached(("MX", domain), lambda: self._lookup_mx(domain))
        names = _names(domain, mx_set)
        found = await asyncio.gather(*(self._addresses(domain, name) for name in names),
                                     return_exceptions=True)
        by_name: dict[str, _Addresses] = {}
        temporary: RouteError | None = None
        for name, result in zip(names, found, strict=True):
            if isinstance(result, RouteError) and not result.permanent:
                temporary = temporary or result
            elif isinstance(result, BaseException):
                raise result
            else:
                by_name[name] = result
        return self._answer(domain, port, mx_set, by_name, temporary)

    def mx_cached(self, domain: str, port: int) -> MxAnswer | None:
        """:meth:`mx` when every answer it needs is cached, without waiting (no task, no
        turn of the event loop); None when it would have to ask.  Raises RouteError."""
        domain = domain.lower().rstrip(".")
        mx_set = self._peek(("MX", domain))
        if mx_set is _MISS:
            return None
        by_name: dict[str, _Addresses] = {}
        for name in _names(domain, mx_set):
            found = self._peek(("ADDR", name))
            if found is _MISS:
                return None
            by_name[name] = found
        return self._answer(domain, port, mx_set, by_name)

    def _answer(self, domain: str, port: int, mx_set: _MxSet, by_name: dict[str, _Addresses],
                temporary: RouteError | None = None) -> MxAnswer:
        """The answer from the domain's MX set and the addresses found for its names (for
        an implicit MX, the domain's own); ``temporary``: a lookup that failed for now."""
        if mx_set is None:
            raise RouteError(
                f"{domain} does not accept mail: it has a null MX (RFC 7505)",
                permanent=True,
                code=556,
                enhanced="5.1.10",
            )
        if not mx_set:
            # RFC 5321 §5.1: no MX records → the domain itself, preference 0.
            if domain not in by_name:
                assert temporary is not None
                raise temporary
            own = self._as_hosts(domain, by_name[domain], port, 0,
                                 f"{domain} has no MX and no address records", "5.1.2")
            return MxAnswer(f"mx:{domain}", own, implicit=True)
        names = [name for _, name in mx_set]
        hosts: list[Host] = []
        seen: set[str] = set()
        for preference, name in self._ordered(mx_set):
            v4, v6 = by_name.get(name, ((), ()))
            for address in (*v4, *v6):
                if address not in seen:
                    seen.add(address)
                    hosts.append(Host(name, address, port, preference))
        if not hosts:
            if temporary is not None:
                raise temporary
            raise RouteError(
                f"no MX host of {domain} has an address ({', '.join(sorted(set(names)))})",
                permanent=True,
                code=550,
                enhanced="5.4.4",
            )
        return MxAnswer("mx:" + ",".join(sorted(set(names))), tuple(hosts))

    async def addresses(self, name: str, port: int, preference: int = 0) -> tuple[Host, ...]:
        """The A then AAAA addresses of a host name (an IP address is returned as it is),
        as Hosts.  Raises RouteError when there are none."""
        hosts = self.addresses_cached(name, port, preference)
        if hosts is not None:
            return hosts
        name = name.lower().rstrip(".")
        return self._as_hosts(name, await self._addresses(name, name), port, preference)

    def addresses_cached(self, name: str, port: int,
                         preference: int = 0) -> tuple[Host, ...] | None:
        """:meth:`addresses` when the answer is cached (or ``name`` is an IP address),
        without waiting; None when it would have to ask."""
        name = name.lower().rstrip(".")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            return (Host(name, name, port, preference),)
        found = self._peek(("ADDR", name))
        return None if found is _MISS else self._as_hosts(name, found, port, preference)

    @staticmethod
    def _as_hosts(name: str, addresses: _Addresses, port: int, preference: int,
                  missing: str = "", enhanced: str = "5.4.4") -> tuple[Host, ...]:
        """``name``'s A then AAAA addresses as Hosts; a permanent 550 ``missing`` when it
        has none."""
        v4, v6 = addresses
        if not v4 and not v6:
            raise RouteError(missing or f"host {name} has no address records",
                             permanent=True, code=550, enhanced=enhanced)
        return tuple(Host(name, a, port, preference) for a in (*v4, *v6))

    async def query(self, name: str, rdtype: dns.rdatatype.RdataType
                    ) -> dns.resolver.Answer | float:
        """One uncached query through this resolver's bound on queries in flight (for
        engine.tlspolicy's MTA-STS record): the answer, or NXDOMAIN's negative TTL as a
        float.  Raises dnspython's errors, and RouteError for an invalid name."""
        return await self._query(self._qname(name), rdtype)

    def clear(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()
        self._mx_ad.clear()

    def mx_secure(self, domain: str) -> bool:
        """Whether the last MX answer for ``domain`` was validated (AD bit, resolver marked
        validating); False for an implicit MX (RFC 7672 §2.2.1 needs the MX RRset or the
        domain's own address records to be secure: not tracked, so not trusted)."""
        return self._mx_ad.get(domain.lower().rstrip("."), False)

    async def tlsa(self, name: str, port: int) -> TlsaAnswer:
        """The TLSA records of ``_<port>._tcp.<name>`` (RFC 7672 §2.2), cached for their
        TTL.  NXDOMAIN or NODATA is no records; SERVFAIL, a timeout and every other error
        raise a temporary RouteError (RFC 7672 §2.2: the client must not downgrade)."""
        owner = f"_{port}._tcp.{name.lower().rstrip('.')}"
        return await self._cached(("TLSA", owner), lambda: self._lookup_tlsa(owner))

    async def _lookup_tlsa(self, owner: str) -> TlsaAnswer:
        qname = self._qname(owner)
        try:
            answer = await self._query(qname, dns.rdatatype.TLSA)
        except dns.exception.DNSException as err:
            raise _temporary(owner, _why(err)) from None
        if isinstance(answer, float):
            value = TlsaAnswer((), False)
            self._store(("TLSA", owner), value, self._negative_ttl(answer))
            return value
        secure = self.validating and bool(answer.response.flags & dns.flags.AD)
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            value = TlsaAnswer((), secure)
            self._store(("TLSA", owner), value, self._negative_ttl(ttl))
            return value
        records = tuple((int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
                        for rd in answer.rrset if isinstance(rd, dns.rdtypes.ANY.TLSA.TLSA))
        value = TlsaAnswer(records, secure)
        self._store(("TLSA", owner), value, ttl)
        return value

    def __len__(self) -> int:
        return len(self._cache)

    # --- ordering ------------------------------------------------------------------------

    @staticmethod
    def _ordered(mx_set: tuple[tuple[int, str], ...]) -> list[tuple[int, str]]:
        """Preference order; RFC 5321 §5.1: equal preferences in random order, so that the
        load spreads over the hosts of one preference."""
        if len(mx_set) == 1:
            return list(mx_set)
        groups: dict[int, list[str]] = {}
        for preference, name in mx_set:
            groups.setdefault(preference, []).append(name)
        out: list[tuple[int, str]] = []
        for preference in sorted(groups):
            names = list(dict.fromkeys(groups[preference]))
            random.shuffle(names)
            out += [(preference, n) for n in names]
        return out

    # --- the cache -----------------------------------------------------------------------

    def _peek(self, key: tuple[str, str]) -> Any:
        """The cached value of ``key`` (a cached failure is raised), or _MISS."""
        entry = self._cache.get(key)
        if entry is None:
            return _MISS
        if entry.expires <= self._clock():
            del self._cache[key]
            return _MISS
        self._cache.move_to_end(key)
        if isinstance(entry.value, _Failure):
            raise entry.value.error()
        return entry.value

    async def _cached(self, key: tuple[str, str], fetch: Callable[[], Awaitable[_T]]) -> _T:
        value = self._peek(key)
        if value is not _MISS:
            return cast(_T, value)
        future = self._inflight.get(key)
        if future is None:
            started: asyncio.Future[object] = asyncio.ensure_future(fetch())
            self._inflight[key] = future = started
            started.add_done_callback(lambda f: settle(self._inflight, key, f))
        # shield: one caller giving up (a cancelled delivery) must not cancel the query
        # that other callers wait for.
        return cast(_T, await asyncio.shield(future))

    def close(self) -> None:
        """Give up every lookup in flight (the server stops): nothing waits for them any
        more, and a query to a server that does not answer would hold its socket open
        until the lifetime ends, past the event loop's."""
        for future in list(self._inflight.values()):
            future.cancel()

    def _store(self, key: tuple[str, str], value: object, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = _Entry(value, self._clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _negative_ttl(self, ttl: float) -> float:
        return min(ttl, self.max_negative_ttl)

    # --- the lookups ---------------------------------------------------------------------

    def _qname(self, domain: str) -> dns.name.Name:
        try:
            return dns.name.from_text(domain)
        except dns.exception.DNSException as err:
            raise RouteError(
                f"{domain} is not a valid domain name ({type(err).__name__})",
                permanent=True,
                code=550,
                enhanced="5.1.2",
            ) from None

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer | float:
        """The answer, or the negative TTL for NXDOMAIN (as a float)."""
        try:
            async with self._slots:
                started = time.monotonic()
                try:
                    return await self._resolver.resolve(
                        qname, rdtype, search=False, raise_on_no_answer=False
                    )
                finally:
                    self.query_seconds.observe(time.monotonic() - started)
        except dns.resolver.NXDOMAIN as err:
            return nxdomain_ttl(err)

    async def _lookup_mx(self, domain: str) -> _MxSet:
        key = ("MX", domain)
        qname = self._qname(domain)
        try:
            answer = await self._query(qname, dns.rdatatype.MX)
        except dns.exception.DNSException as err:
            raise _temporary(domain, _why(err)) from None
        if isinstance(answer, float):
            failure = _Failure(f"{domain}: no such domain (NXDOMAIN)", 550, "5.1.2")
            self._store(key, failure, self._negative_ttl(answer))
            raise failure.error()
        ttl = float(answer.chaining_result.minimum_ttl)
        if self.validating:
            if len(self._mx_ad) >= self.max_entries:
                self._mx_ad.clear()
            self._mx_ad[domain] = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            self._store(key, (), self._negative_ttl(ttl))
            return ()
        records = [rd for rd in answer.rrset if isinstance(rd, dns.rdtypes.ANY.MX.MX)]
        # RFC 7505 §3: a null MX is the single record "0 ."; a root target among other
        # records is no host at all and is skipped.
        value: _MxSet
        if len(records) == 1 and records[0].exchange == dns.name.root:
            value = None
        else:
            value = tuple(
                (int(rd.preference), _plain(rd.exchange))
                for rd in records
                if rd.exchange != dns.name.root
            )
        self._store(key, value, ttl)
        return value

    async def _addresses(self, domain: str, name: str) -> _Addresses:
        return await self._cached(("ADDR", name), lambda: self._lookup_addresses(domain, name))

    async def _lookup_addresses(self, domain: str, name: str) -> _Addresses:
        qname = self._qname(name)
        results = await asyncio.gather(
            self._query(qname, dns.rdatatype.A),
            self._query(qname, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        lists: list[tuple[str, ...]] = []
        ttls: list[float] = []
        failed: BaseException | None = None
        for result in results:
            if isinstance(result, dns.exception.DNSException):
                failed = failed or result
                lists.append(())
            elif isinstance(result, BaseException):
                raise result
            elif isinstance(result, float):
                lists.append(())
                ttls.append(self._negative_ttl(result))
            elif result.rrset is None:
                lists.append(())
                ttls.append(self._negative_ttl(float(result.chaining_result.minimum_ttl)))
            else:
                lists.append(tuple(rd.to_text() for rd in result.rrset))
                ttls.append(float(result.chaining_result.minimum_ttl))
        v4, v6 = lists
        if failed is not None:
            if not v4 and not v6:
                raise _temporary(domain if domain == name else f"{name} (MX of {domain})",
                                 _why(failed))  # fmt: skip
            # Half an answer is used now but not cached: the next lookup asks again.
            return v4, v6
        self._store(("ADDR", name), (v4, v6), min(ttls))
        return v4, v6

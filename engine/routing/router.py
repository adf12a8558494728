"""The router: recipient domain → destination at ingest, destination → route at delivery.

Owns the choice of the way out.  At ingest :meth:`ConfiguredRouter.destination` records a
name that needs no DNS: ``local:<domain>`` for a local (authoritative) domain, the address
literal itself (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), or the domain, lower-cased
without its trailing dot.  The send connector is chosen later, by :meth:`resolve`, so that
a configuration change applies to mail already queued.  :meth:`resolve_cached` gives the
same route without waiting when every DNS answer it needs is cached (the scheduler routes
most groups that way, without a task); both build it from one plan of the answers needed.

Choosing a send connector (the Exchange rules): among the connectors whose address spaces
match the domain, the most specific match wins (an exact domain beats the longest
``*.suffix``, which beats ``*``); among those, the lowest cost; connectors of equal cost
share the load (one is picked at random per call).  Connectors the caller names in
``exclude`` are skipped and the next one is taken, but only among the connectors of the
most specific match: mail for a partner domain is never handed to the general ``*``
connector because the partner's connector (perhaps with verified TLS and AUTH) is down.
An address literal matches only ``*``.

Failover (Exchange's model): the scheduler reports a smarthost connector none of whose
hosts took a connection with :meth:`connector_failed` and until when to leave it alone
(its retry interval); until then the next-cheapest connector of the same match takes its
mail, and afterwards the cheaper one is chosen again.  When every connector of the match
is marked, the marks are ignored (the cheapest is chosen as usual): a mark only ever
moves mail to another connector, it never leaves mail without a route.

Implicit connectors: ``delivery.smarthost`` (the ``--smarthost`` flag) is a ``*``
connector named "delivery.smarthost" with cost 0, below any configured one; with no
[[send]] and no smarthost at all, a ``*`` connector named "" delivers by DNS MX on
``delivery.mx_port``.  With [[send]] connectors, a domain none of them matches has no
route: a temporary 451 4.4.4 (RFC 3463 X.4.4, unable to route), so that the operator can
add a connector before the mail expires.

AUTH: a route carries ``auth`` only for a smarthost connector; when the connector does
not allow plaintext AUTH, the route's TLS is raised to at least "required", so the client
(which sees only the route) never sends the password in clear (RFC 4954 §4); when it does,
the route says so (``plaintext_auth``) and the client sends it without TLS.

It must never hold delivery state (retries, limits, connections are the scheduler's; the
failure marks are values the scheduler hands over, each with its end) and never does DNS
in :meth:`destination`.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

from engine.config import IMPLICIT_SMARTHOST, Config, LocalConfig, SendConfig
from engine.routing.api import Host, Route, RouteError, TlsMode
from engine.routing.mx import MxAnswer, MxResolver

__all__ = ["LOCAL_PREFIX", "ConfiguredRouter", "accepted_domains", "match_rank"]

#: Destinations of local domains start with this.
LOCAL_PREFIX: Final = "local:"
#: Destinations a router keeps (Router.destination): the domains of recent recipients.
DESTINATIONS: Final = 4096

#: Specificity of a match: an exact domain, a "*.suffix" (plus the suffix's length), "*".
_EXACT: Final = 2
_SUFFIX: Final = 1
_ANY: Final = 0


def match_rank(space: str, domain: str) -> tuple[int, int] | None:
    """How specifically address space ``space`` matches ``domain`` (higher is more
    specific), or None when it does not match.  ``domain`` is normalised; an address
    literal ("[...]") is matched by "*" only."""
    if space == "*":
        return (_ANY, 0)
    if domain.startswith("["):
        return None
    if space.startswith("*."):
        suffix = space[2:]
        if domain == suffix or domain.endswith("." + suffix):
            return (_SUFFIX, len(suffix))
        return None
    return (_EXACT, 0) if domain == space else None


def accepted_domains(config: Config) -> tuple[str, ...]:
    """The domains the relay policy must accept from anyone: ``accepted_domains`` and every
    [[local]] domain (mail for a domain delivered here must be receivable)."""
    local = (d for lc in config.local for d in lc.domains)
    return tuple(dict.fromkeys((*config.accepted_domains, *local)))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _literal(destination: str) -> str | None:
    """The IP address of an address literal (RFC 5321 §4.1.3), or None if it is not one."""
    inner = destination[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            return str(ipaddress.IPv6Address(inner[5:]))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Need:
    """One DNS answer a route needs: a domain's MX hosts, or a host name's addresses."""

    name: str
    port: int
    preference: int = 0
    mx: bool = False


# What a _Need got: the MX answer, the addresses, or why there are none.
_Answer = MxAnswer | tuple[Host, ...] | RouteError


@dataclass(frozen=True, slots=True)
class _Plan:
    """A route to build once ``needs`` are answered (in order; resolve and
    resolve_cached differ only in how they get the answers)."""

    needs: tuple[_Need, ...]
    build: Callable[[list[_Answer]], Route]


@dataclass(frozen=True, slots=True)
class _Connector:
    config: SendConfig
    #: The port for MX hosts (the connector's, else delivery.mx_port).
    mx_port: int


class ConfiguredRouter:
    """The Router (engine.routing.api) for a Config: send connectors, local domains, MX."""

    def __init__(self, config: Config, resolver: MxResolver,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.resolver = resolver
        self._clock = clock
        #: send connector name → until when it is skipped (see connector_failed)
        self._failed: dict[str, float] = {}
        mx_port = config.delivery.mx_port
        connectors = [_Connector(sc, sc.port or mx_port) for sc in config.send]
        if config.delivery.smarthost is not None:
            implicit = SendConfig(
                IMPLICIT_SMARTHOST, ("*",), cost=0, smarthosts=(config.delivery.smarthost,)
            )
            connectors.append(_Connector(implicit, mx_port))
        elif not config.send:
            connectors.append(_Connector(SendConfig("", ("*",)), mx_port))
        self._connectors = tuple(connectors)
        #: the connectors with smarthosts: the only ones connector_failed marks
        self._relays = frozenset(c.config.name for c in connectors if c.config.smarthosts)
        self._local_exact: dict[str, LocalConfig] = {}
        self._local_suffix: list[tuple[str, LocalConfig]] = []
        for lc in config.local:
            for domain in lc.domains:
                if domain.startswith("*."):
                    self._local_suffix.append((domain[2:], lc))
                else:
                    self._local_exact[domain] = lc
        # The longest suffix first, so that the most specific entry wins.
        self._local_suffix.sort(key=lambda item: -len(item[0]))
        self._hostname = config.hostname.lower().rstrip(".")
        #: the pool of the connectors that name none ([egress] pool)
        self._pool = config.egress.pool
        #: destination()'s answers by the domain as given: a function of this router's
        #: tables alone (set here, never changed; a reload builds a new router), asked
        #: once per recipient at ingest, a bulk injection's thousands for a few domains.
        self._destinations: dict[str, str] = {}

    @property
    def connectors(self) -> tuple[SendConfig, ...]:
        """Every send connector, implicit ones included."""
        return tuple(c.config for c in self._connectors)

    # --- ingest --------------------------------------------------------------------------

    def destination(self, domain: str) -> str:
        found = self._destinations.get(domain)
        if found is None:
            found = self._destination(domain)
            if len(self._destinations) >= DESTINATIONS:
                self._destinations.clear()  # bounded: a flood of domains costs no memory
            self._destinations[domain] = found
        return found

    def _destination(self, domain: str) -> str:
        domain = domain.lower().rstrip(".") or self._hostname
        if domain.startswith("["):
            address = _literal(domain) if domain.endswith("]") else None
            if address is None:
                return domain
            return f"[IPv6:{address}]" if ":" in address else f"[{address}]"
        if self.local(domain) is not None:
            return LOCAL_PREFIX + domain
        return domain

    def local(self, domain: str) -> LocalConfig | None:
        """The [[local]] table that covers ``domain`` (normalised), or None."""
        found = self._local_exact.get(domain)
        if found is not None:
            return found
        for suffix, lc in self._local_suffix:
            if domain == suffix or domain.endswith("." + suffix):
                return lc
        return None

    # --- delivery ------------------------------------------------------------------------

    def connector_failed(self, name: str, until: float) -> None:
        """No host of send connector ``name`` took a connection: choose the next-cheapest
        connector of the same match instead until ``until`` (epoch seconds).  Only a
        smarthost connector is marked: an MX connector's hosts are the destination's, and
        one unreachable domain says nothing about the connector's other domains."""
        if name in self._relays:
            self._failed[name] = until

    def choose(self, domain: str, exclude: frozenset[str] = frozenset()) -> SendConfig:
        """The send connector for ``domain`` (normalised) now; RouteError if none."""
        return self._choose(domain, exclude).config

    def _choose(self, domain: str, exclude: frozenset[str]) -> _Connector:
        best: tuple[int, int] | None = None
        level: list[_Connector] = []
        for connector in self._connectors:
            ranks = [match_rank(s, domain) for s in connector.config.address_spaces]
            rank = max((r for r in ranks if r is not None), default=None)
            if rank is None:
                continue
            if best is None or rank > best:
                best, level = rank, [connector]
            elif rank == best:
                level.append(connector)
        if not level:
            raise RouteError(
                f"no send connector's address space matches {domain}",
                permanent=False,
                code=451,
                enhanced="4.4.4",
            )
        left = [c for c in level if c.config.name not in exclude]
        if not left:
            names = ", ".join(sorted(repr(c.config.name) for c in level))
            raise RouteError(
                f"every send connector for {domain} failed ({names})",
                permanent=False,
                code=451,
                enhanced="4.4.4",
            )
        if self._failed:
            left = self._working(left)
        cheapest = min(c.config.cost for c in left)
        return random.choice([c for c in left if c.config.cost == cheapest])

    def _working(self, level: list[_Connector]) -> list[_Connector]:
        """``level`` without the connectors marked failed, or all of it when every one is
        marked (a mark moves mail elsewhere, never leaves it without a route)."""
        now = self._clock()
        failed = self._failed
        for name in [name for name, until in failed.items() if until <= now]:
            del failed[name]
        working = [c for c in level if c.config.name not in failed]
        return working or level

    async def resolve(self, destination: str, exclude: frozenset[str] = frozenset()) -> Route:
        plan = self._plan(destination, exclude)
        answers: list[_Answer] = []
        for need in plan.needs:
            try:
                if need.mx:
                    answers.append(await self.resolver.mx(need.name, need.port))
                else:
                    answers.append(await self.resolver.addresses(need.name, need.port,
                                                                 need.preference))
            except RouteError as err:
                answers.append(err)
        return plan.build(answers)

    def resolve_cached(self, destination: str,
                       exclude: frozenset[str] = frozenset()) -> Route | None:
        """:meth:`resolve` when every DNS answer the route needs is cached, without waiting
        (no task, no turn of the event loop); None when it would have to ask."""
        plan = self._plan(destination, exclude)
        answers: list[_Answer] = []
        for need in plan.needs:
            found: _Answer | None
            try:
                if need.mx:
                    found = self.resolver.mx_cached(need.name, need.port)
                else:
                    found = self.resolver.addresses_cached(need.name, need.port,
                                                           need.preference)
            except RouteError as err:
                found = err
            if found is None:
                return None
            answers.append(found)
        return plan.build(answers)

    def _plan(self, destination: str, exclude: frozenset[str]) -> _Plan:
        """The DNS answers ``destination``'s route needs and how it is built from them;
        raises RouteError for what needs no DNS to refuse."""
        domain = destination.removeprefix(LOCAL_PREFIX).lower().rstrip(".")
        if not domain:
            raise RouteError(
                f"empty destination {destination!r}", permanent=True, code=550, enhanced="5.1.2"
            )
        literal: str | None = None
        if domain.startswith("["):
            literal = _literal(domain) if domain.endswith("]") else None
            if literal is None:
                raise RouteError(
                    f"{destination} is not a valid address literal (RFC 5321 §4.1.3)",
                    permanent=True,
                    code=550,
                    enhanced="5.1.3",
                )
        else:
            # The configuration at delivery time decides: a domain made local after its
            # mail was queued is delivered locally, and one no longer local goes out.
            lc = self.local(domain)
            if lc is not None:
                return self._local_plan(destination, lc)
        connector = self._choose(domain, exclude)
        sc = connector.config
        if sc.smarthosts:
            return _Plan(tuple(_Need(name, port, preference) for preference, (name, port)
                               in enumerate(sc.smarthosts)),
                         partial(self._smarthost_route, destination, sc))
        if literal is not None:
            hosts = (Host(literal, literal, connector.mx_port),)
            site = f"literal:{_hostport(literal, connector.mx_port)}"
            return _Plan((), lambda _: self._route(destination, site, hosts, sc))
        return _Plan((_Need(domain, connector.mx_port, mx=True),),
                     partial(self._mx_route, destination, sc))

    def _route(self, destination: str, site: str, hosts: tuple[Host, ...], sc: SendConfig,
               tls: TlsMode | None = None, auth: tuple[str, str] | None = None) -> Route:
        """A route through send connector ``sc`` (its TLS mode unless ``tls`` is given)."""
        return Route(
            destination=destination,
            site=site,
            hosts=hosts,
            protocol=sc.protocol,
            tls=sc.tls if tls is None else tls,
            auth=auth,
            plaintext_auth=auth is not None and sc.allow_plaintext_auth,
            connector=sc.name,
            pool=sc.pool or self._pool,
            implicit_tls=sc.implicit_tls and bool(sc.smarthosts),
        )

    def _mx_route(self, destination: str, sc: SendConfig, answers: list[_Answer]) -> Route:
        (answer,) = answers
        if isinstance(answer, RouteError):
            raise answer
        assert isinstance(answer, MxAnswer)
        return self._route(destination, answer.site, answer.hosts, sc)

    def _smarthost_route(self, destination: str, sc: SendConfig,
                         answers: list[_Answer]) -> Route:
        hosts: list[Host] = []
        failure: RouteError | None = None
        for answer in answers:
            if isinstance(answer, RouteError):
                failure = failure or answer
            else:
                assert isinstance(answer, tuple)
                hosts += answer
        if not hosts:
            assert failure is not None
            # A smarthost that does not resolve is this server's configuration problem
            # (or the DNS's), never the recipient's: defer, do not bounce.
            raise RouteError(
                f"send connector {sc.name!r}: {failure.text}",
                permanent=False,
                code=451,
                enhanced="4.4.3",
            )
        tls: TlsMode = sc.tls
        auth = (sc.auth_user, sc.auth_password) if sc.auth_user else None
        if auth is not None and not sc.allow_plaintext_auth and tls in ("off", "opportunistic",
                                                                        "none", "may"):
            tls = "required"
        site = "smarthost:" + ",".join(_hostport(h, p) for h, p in sc.smarthosts)
        return self._route(destination, site, tuple(hosts), sc, tls, auth)

    @staticmethod
    def _local_plan(destination: str, lc: LocalConfig) -> _Plan:
        if lc.lmtp is None:
            maildir = Route(
                destination=destination,
                site=f"maildir:{lc.maildir}",
                hosts=(),
                protocol="maildir",
                tls="off",
                maildir=lc.maildir,
            )
            return _Plan((), lambda _: maildir)
        name, port = lc.lmtp

        def lmtp(answers: list[_Answer]) -> Route:
            (hosts,) = answers
            if isinstance(hosts, RouteError):
                raise RouteError(
                    f"LMTP server {_hostport(name, port)}: {hosts.text}",
                    permanent=False,
                    code=451,
                    enhanced="4.4.3",
                )
            assert isinstance(hosts, tuple)
            return Route(
                destination=destination,
                site=f"lmtp:{_hostport(name, port)}",
                hosts=hosts,
                protocol="lmtp",
                tls="opportunistic",
            )

        return _Plan((_Need(name, port),), lmtp)

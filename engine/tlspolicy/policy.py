"""The decision: what TLS one destination's delivery needs, and then one host's.

:meth:`TlsPolicy.decision` combines the route's level (its [[send]] ``tls``), the
per-domain override ([delivery] ``tls_policy``), MTA-STS (MX delivery only, when
[delivery] ``mta_sts`` is on) and whether DANE may apply (the resolver is marked
validating and the destination's MX answer was validated) into a frozen, hashable
:class:`Decision`: the SMTP client pools connections per decision, so mail under a
stricter policy never travels over a connection opened under a looser one.  Decisions
are cached per (destination, route TLS), and equal decisions (every destination without a
policy of its own at one level) share a site's pool: the client asks :meth:`TlsPolicy.cached` (one
dict lookup and a clock read) for each delivery and waits for :meth:`decision` only when
the MTA-STS record is due for a look.

:meth:`TlsPolicy.host` turns a decision into a :class:`HostTls` for one host, just before
connecting to it: DANE wins over MTA-STS where usable validated TLSA records exist (RFC
7672 §2.2, RFC 8461 §2); a TLSA lookup that fails defers (never downgrades); an MTA-STS
``enforce`` policy skips hosts its ``mx`` patterns do not list.  A refusal is
:class:`TlsRefusal`, whose text is the 4xx reply the recipients get if no host is left.

Failed handshakes are remembered per host for [delivery] ``tls_failure_memory``
(Postfix's TLS failure cache): meanwhile a host at level ``may`` is not offered a
handshake again (clear text, as it would be after the failure), so a broken TLS stack
does not cost every message a failed connection.

It must never open connections itself (engine.tlspolicy.sts fetches policies; the client
connects).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from engine.routing.api import Host, Route, RouteError
from engine.routing.mx import MxResolver, Tlsa
from engine.tlspolicy.dane import usable
from engine.tlspolicy.levels import Level, level_of
from engine.tlspolicy.sts import StsCache, StsPolicy
from engine.tlspolicy.tlsrpt import ReportPolicy, TlsReports

__all__ = ["Decision", "HostTls", "TlsPolicy", "TlsRefusal", "static_decision"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The TLS a destination's delivery needs (a pool key: frozen and hashable)."""

    level: Level
    #: The destination's MTA-STS policy (enforce or testing), None without one.
    sts: StsPolicy | None = None
    #: Look up TLSA records for the hosts (validating resolver, validated MX answer).
    dane: bool = False
    #: TLS from the first byte (RFC 8314) instead of STARTTLS.
    implicit: bool = False


@dataclass(frozen=True, slots=True)
class HostTls:
    """What one connection to one host must have.

    ``verify``: "" (no check), "ca" (CA roots and the host name, by OpenSSL), "mta-sts"
    (the same, required by an enforce policy) or "dane" (``tlsa`` matched after the
    handshake).  ``report``: check as MTA-STS would but only report a failure (a testing
    policy).  ``why`` says what asks for it, for the replies.
    """

    starttls: bool = True
    required: bool = False
    verify: str = ""
    tlsa: tuple[Tlsa, ...] = ()
    report: StsPolicy | None = None
    why: str = ""


#: An MX route's decision is made again after this long (seconds), MTA-STS or not.
DECISION_TTL: Final = 300.0
#: Decisions kept at most (one per destination and route TLS).
MAX_DECISIONS: Final = 100_000

#: What each level means for a host when neither DANE nor MTA-STS applies.
_PLAIN: Final[dict[str, HostTls]] = {
    "none": HostTls(starttls=False),
    "may": HostTls(),
    "dane": HostTls(),
    "encrypt": HostTls(required=True, why="TLS security level encrypt"),
    "verify": HostTls(required=True, verify="ca", why="TLS security level verify"),
}
_NO_TLS: Final = HostTls(starttls=False, why="a recent TLS failure of this host")


class TlsRefusal(Exception):
    """This host may not be used under the policy; ``text`` is the 4xx reply."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def static_decision(route: Route) -> Decision:
    """The decision from the route alone (no policy object: tests, LMTP)."""
    return Decision(level_of(route.tls), implicit=route.implicit_tls)


class TlsPolicy:
    """Per-destination TLS decisions from the configuration, MTA-STS and DANE."""

    def __init__(self, *, overrides: Mapping[str, str] | None = None,
                 sts: StsCache | None = None, resolver: MxResolver | None = None,
                 failure_memory: float = 0.0, reports: TlsReports | None = None) -> None:
        self.overrides = {d: level_of(v) for d, v in (overrides or {}).items()}
        self.sts = sts
        #: The resolver whose AD bits DANE trusts (None or not validating: no DANE).
        self.resolver = resolver if resolver is not None and resolver.validating else None
        self.failure_memory = failure_memory
        #: TLS-RPT counts (engine.tlspolicy.tlsrpt); None: no reports.
        self.reports = reports
        #: (destination, route TLS, implicit) → (decision, until when, monotonic).
        self._decisions: dict[tuple[str, str, bool], tuple[Decision, float]] = {}
        #: "address:port" → until when a failed handshake is remembered (monotonic).
        self._failed: dict[str, float] = {}

    # --- per destination ------------------------------------------------------------------

    def cached(self, route: Route) -> Decision | None:
        """The decision for ``route`` if it is known and fresh, without waiting."""
        return self.cached_for(route.destination, route.tls, route.implicit_tls)

    def cached_for(self, destination: str, tls: str, implicit: bool) -> Decision | None:
        """:meth:`cached` by the route's parts (a follow-on message carries only its
        destination; the scheduler matched the rest of the route)."""
        found = self._decisions.get((destination, tls, implicit))
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    async def decision(self, route: Route) -> Decision:
        """The decision for ``route``: looks at MTA-STS when it is due."""
        destination = route.destination
        level = self.overrides.get(destination) or level_of(route.tls)
        if route.auth is not None and not route.plaintext_auth and level in ("none", "may"):
            level = "encrypt"  # RFC 4954 §4: never a password in clear unless asked for
        mx = route.site.startswith("mx:")
        dane = (mx and self.resolver is not None and level in ("may", "dane", "dane-only")
                and self.resolver.mx_secure(destination))
        if level == "may" and dane:
            level = "dane"  # DANE on whenever the resolver is marked validating
        sts: StsPolicy | None = None
        until = float("inf")
        if mx and self.sts is not None and level in ("may", "encrypt", "verify", "dane"):
            now = time.monotonic()
            found = self.sts.cached(destination, now)
            if found is None:
                sts = await self.sts.policy(destination)
                found = self.sts.cached(destination, time.monotonic())
                until = found[1] if found is not None else now
            else:
                sts, until = found
            if sts is not None:
                until = min(until, now + sts.max_age)
        if mx:
            # The MX answer's AD bit may change; an MX route's decision is made afresh now
            # and then even without MTA-STS.
            until = min(until, time.monotonic() + DECISION_TTL)
        decision = Decision(level, sts, dane, route.implicit_tls)
        decisions = self._decisions
        if len(decisions) >= MAX_DECISIONS:
            decisions.clear()  # made again from the caches, one lookup each
        decisions[(destination, route.tls, route.implicit_tls)] = (decision, until)
        return decision

    # --- per host ---------------------------------------------------------------------

    async def host(self, decision: Decision, host: Host) -> HostTls:
        """What a connection to ``host`` needs under ``decision``; TlsRefusal when the
        host may not be used (a deferral for the recipients when no host is left)."""
        return await host_tls(self, decision, host)

    def failed(self, host: Host) -> None:
        """A handshake with ``host`` failed: remember it for ``failure_memory``."""
        if self.failure_memory > 0:
            if len(self._failed) > 10_000:
                now = time.monotonic()
                self._failed = {k: v for k, v in self._failed.items() if v > now}
            self._failed[f"{host.address}:{host.port}"] = time.monotonic() + self.failure_memory

    def failed_recently(self, host: Host) -> bool:
        until = self._failed.get(f"{host.address}:{host.port}")
        return until is not None and until > time.monotonic()

    async def close(self) -> None:
        if self.sts is not None:
            await self.sts.close()
        if self.reports is not None:
            await self.reports.close()


async def host_tls(policy: TlsPolicy | None, decision: Decision, host: Host) -> HostTls:
    """:meth:`TlsPolicy.host`; with no policy object, the level alone decides."""
    level = decision.level
    where = f"{host.name}[{host.address}]:{host.port}"
    if policy is not None and decision.dane and policy.resolver is not None:
        try:
            answer = await policy.resolver.tlsa(host.name, host.port)
        except RouteError as exc:
            # RFC 7672 §2.2: a TLSA lookup that fails must not lead to a downgrade.
            raise TlsRefusal(f"451 4.7.5 TLSA lookup for {where} failed: {exc.text}") from None
        if answer.secure and answer.records:
            records = usable(answer.records)
            if records:
                return HostTls(required=True, verify="dane", tlsa=records,
                               why=f"DANE TLSA records of {host.name}")
            # RFC 7672 §3.1.3: TLSA records, none usable: TLS, but unauthenticated.
            return HostTls(required=True, why=f"unusable DANE TLSA records of {host.name}")
    if level == "dane-only":
        raise TlsRefusal(f"451 4.7.5 {where} has no DNSSEC-validated TLSA records "
                         "(TLS security level dane-only)")
    sts = decision.sts
    if sts is not None and sts.mode == "enforce":
        if not sts.allows(host.name):
            raise TlsRefusal(f"451 4.7.5 {host.name} is not an MX host listed by the MTA-STS "
                             f"policy of {sts.domain} (RFC 8461 §4.1)")
        return HostTls(required=True, verify="mta-sts",
                       why=f"the MTA-STS policy of {sts.domain}")
    plain = _PLAIN.get(level, _PLAIN["may"])
    if not plain.required and plain.starttls:
        if policy is not None and policy.failed_recently(host):
            return _NO_TLS
        if sts is not None:  # testing: deliver, report what enforce would have refused
            return HostTls(report=sts)
    return plain


def report_policy(destination: str, decision: Decision, need: HostTls) -> ReportPolicy | None:
    """The policy a TLS-RPT report names for a session (RFC 8460 §4.4), None when the
    session was under none (such sessions are not counted)."""
    if need.tlsa:
        return ReportPolicy("tlsa", destination,
                            tuple(f"{u} {s} {m} {d.hex()}" for u, s, m, d in need.tlsa))
    sts = decision.sts
    if sts is None:
        return None
    return ReportPolicy("sts", destination,
                        ("version: STSv1", f"mode: {sts.mode}",
                         *(f"mx: {m}" for m in sts.mx), f"max_age: {sts.max_age}"), sts.mx)

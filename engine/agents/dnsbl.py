"""DNS block and allow lists (RFC 5782), checked when a client connects.

Owns the "dnsbl" agent: for each connecting client it asks every configured list at once
whether the client's address is listed, and refuses the connection with 554 (RFC 5321 §3.1:
a server may answer 554 in place of the 220 greeting, and then must accept only QUIT) when
the block lists that list the client weigh enough.  The query name is the address reversed
below the list's zone: IPv4 octets (RFC 5782 §2.1, 192.0.2.99 → 99.2.0.192.zen.example),
IPv6 nibbles (§2.4, 32 of them); an IPv4-mapped IPv6 client is looked up as its IPv4
address.  A listing is an A record (§2.3) whose address is one of the zone's return codes;
the reply text names the list and carries the list's TXT record when it has one.

Scoring follows Postfix's postscreen_dnsbl_sites: each block list has a weight, the weights
of the lists that list the client are added, and the client is refused when the sum reaches
``threshold`` (with the defaults, weight 1 and threshold 1, any one list refuses).  An allow
list (a DNSWL) that lists the client, or an ``allow_networks`` entry that holds it, bypasses
every block list.

Answers in 127.255.255.0/24 are the lists' own error codes (Spamhaus: .254 "query through
a public resolver", .255 "too many queries"): they are logged and never count, whatever a
zone's ``codes`` say.  A zone that cannot be asked (SERVFAIL, timeout: DnsTempError) does
not count for this client and is logged (at most once a minute per zone), and neither does
a zone that has not answered within 60 % of the agent's ``timeout`` (the others still
decide); failing open or closed when the whole agent fails is the chain's business.

It must never write to a socket or keep per-client state: the DNS cache (engine.agents.dns)
remembers the answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from engine.agents.api import ACCEPT, Agent, Session, Verdict, reject
from engine.agents.dns import DnsError, Lookup
from engine.agents.networks import IPAddress, Networks, unmap
from engine.config import DNSBL_DEFAULT_CODES, DNSBL_ERROR_CODES

if TYPE_CHECKING:
    from engine.config import Config, DnsblAgentConfig

__all__ = ["DnsblAgent", "Zone", "build_dnsbl", "query_name"]

log = logging.getLogger("ferry.agents")

#: The lists' error answers (see the module docstring), left out of the default codes.
ERROR_CODES: Final = DNSBL_ERROR_CODES
#: The default reply text; ``; {txt}`` is left out when the list has no TXT record.
DEFAULT_REPLY: Final = "Service unavailable; client [{client}] blocked using {zone}"
#: A TXT record is data from a stranger: printable ASCII only in a reply, and short (RFC
#: 5321 §4.5.3.1.5 caps a reply line at 512 octets with its code).
MAX_TXT: Final = 200
MAX_TEXT: Final = 400
#: Seconds between two log lines about the same failing zone.
LOG_EVERY: Final = 60.0
#: Shares of the agent's time budget for the A queries (all zones at once) and then the
#: TXT query of a refused client: a zone that does not answer in time does not count, and
#: the others still decide (were the whole budget spent waiting for it, the chain would
#: count the agent as failed and a listed client would pass with "fail open").
A_SHARE: Final = 0.6
TXT_SHARE: Final = 0.3

CodeRange = tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]


@dataclass(frozen=True, slots=True)
class Zone:
    """One list: its zone, whether it blocks or allows, the answers that count, its weight
    and its reply template ("" for :data:`DEFAULT_REPLY`)."""

    zone: str
    allow: bool = False
    codes: tuple[CodeRange, ...] = DNSBL_DEFAULT_CODES
    weight: int = 1
    reply: str = ""

    def counts(self, address: str) -> bool:
        """Whether the A answer ``address`` is a listing here."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        return ip not in ERROR_CODES and any(low <= ip <= high for low, high in self.codes)


def query_name(ip: IPAddress, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone`` (RFC 5782 §2.1 and §2.4)."""
    ip = unmap(ip)
    # reverse_pointer is "4.3.2.1.in-addr.arpa" / "<32 nibbles>.ip6.arpa": the same
    # reversal, under another suffix.
    return f"{ip.reverse_pointer.rsplit('.', 2)[0]}.{zone}"


def printable(text: str, limit: int) -> str:
    """``text`` with anything but printable ASCII replaced by "?", cut to ``limit``."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


class _Context(Protocol):
    """What the factory needs of engine.agents.AgentContext."""

    @property
    def config(self) -> Config: ...

    @property
    def lookup(self) -> Lookup: ...


class DnsblAgent(Agent):
    """The "dnsbl" agent (see the module docstring)."""

    name = "dnsbl"

    def __init__(self, zones: Sequence[Zone], lookup: Lookup, *, threshold: int = 1,
                 allow_networks: Networks | None = None, timeout: float = 10.0,
                 fail_open: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(timeout=timeout, fail_open=fail_open)
        self.zones = tuple(zones)
        self.lookup = lookup
        self.threshold = threshold
        self.allow_networks = allow_networks or Networks()
        self._clock = clock
        #: zone → when a failure of it was last logged.
        self._logged: dict[str, float] = {}

    def connect(self, session: Session) -> Verdict | Awaitable[Verdict]:
        ip = unmap(session.client_ip)
        if not self.zones or ip in self.allow_networks:
            return ACCEPT
        return self._check(ip)

    async def _check(self, ip: IPAddress) -> Verdict:
        listed = await asyncio.gather(*(self._listed(zone, ip) for zone in self.zones))
        hits = [zone for zone, codes in zip(self.zones, listed, strict=True) if codes]
        allowed = [zone.zone for zone in hits if zone.allow]
        if allowed:
            log.debug("dnsbl: %s allowed by %s", ip, ", ".join(allowed))
            return ACCEPT
        score = sum(zone.weight for zone in hits)
        if not hits or score < self.threshold:
            return ACCEPT
        # The reply names the heaviest list (the first of them in the configured order).
        named = max(hits, key=lambda zone: zone.weight)
        txt = await self._txt(named, ip)
        return reject(self._text(named, ip, txt), code=554, enhanced="5.7.1",
                      reason=f"client [{ip}] listed by "
                             + ", ".join(f"{z.zone} ({', '.join(c)})"
                                         for z, c in zip(self.zones, listed, strict=True) if c)
                             + f"; score {score}")

    async def _listed(self, zone: Zone, ip: IPAddress) -> tuple[str, ...]:
        """The counting answers of ``zone`` for ``ip`` (none: not listed, or not known)."""
        try:
            async with asyncio.timeout(self.timeout * A_SHARE):
                answer = await self.lookup.query(query_name(ip, zone.zone), "A")
        except (DnsError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.timeout * A_SHARE:g} s"
            self._warn(zone.zone, f"dnsbl: {zone.zone} not asked for [{ip}], so it does not "
                                  f"count: {why}")
            return ()
        errors = [a for a in answer.records if _in_error_range(a)]
        if errors:
            self._warn(zone.zone, f"dnsbl: {zone.zone} refused the query for [{ip}] with "
                                  f"{', '.join(errors)} (an error code, not a listing: see "
                                  "the list's usage terms)")
        return tuple(a for a in answer.records if zone.counts(a))

    async def _txt(self, zone: Zone, ip: IPAddress) -> str:
        try:
            async with asyncio.timeout(self.timeout * TXT_SHARE):
                answer = await self.lookup.query(query_name(ip, zone.zone), "TXT")
        except (DnsError, TimeoutError):
            return ""  # the reply goes out without it
        return printable(answer.records[0], MAX_TXT) if answer.records else ""

    def _text(self, zone: Zone, ip: IPAddress, txt: str) -> str:
        if zone.reply:
            text = zone.reply.format(client=ip, zone=zone.zone, txt=txt)
        else:
            text = DEFAULT_REPLY.format(client=ip, zone=zone.zone) + (f"; {txt}" if txt else "")
        return printable(text, MAX_TEXT)

    def _warn(self, zone: str, message: str) -> None:
        now = self._clock()
        last = self._logged.get(zone)
        if last is None or now - last >= LOG_EVERY:
            self._logged[zone] = now
            log.warning(message)


def _in_error_range(address: str) -> bool:
    try:
        return ipaddress.IPv4Address(address) in ERROR_CODES
    except ValueError:
        return False


def zones_of(config: DnsblAgentConfig) -> tuple[Zone, ...]:
    return tuple(Zone(zone=z.zone.lower(), allow=z.kind == "allow", codes=z.codes,
                      weight=z.weight, reply=z.reply) for z in config.zones)


def build_dnsbl(ctx: _Context) -> DnsblAgent | None:
    """The "dnsbl" agent of ``[agents.dnsbl]``, on the shared DNS lookup; None when no
    zone is configured (there is nothing to ask)."""
    config = ctx.config.agents.dnsbl
    if not config.zones:
        return None
    return DnsblAgent(zones_of(config), ctx.lookup, threshold=config.threshold,
                      allow_networks=Networks(config.allow_networks),
                      timeout=config.timeout, fail_open=config.fail == "open")

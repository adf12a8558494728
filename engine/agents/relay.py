"""Relay control: who may relay, and which recipients anyone else may send to.

Owns the open-relay rules.  A client may relay (send to any domain) when its address lies
in a relay network, or when it authenticated and authenticated relaying is allowed.  Any
other client may only send to the accepted domains, and only to plain addresses there:
routing tricks that ask the next hop to forward the mail onwards (the percent hack, bang
paths, quoted local parts holding "@", address-literal domains) are refused, because a
downstream system that honours them would turn this server into an open relay.
<Postmaster> is always accepted (RFC 5321 §4.5.1).

:class:`RelayAgent` puts these rules on the hook API (engine.agents.api) as the first agent
of every receive connector's chain.  It decides from what the caller hands it and must
never do I/O (no DNS, no files, no
logging), never parse SMTP (the caller passes the recipient's local part as written and its
domain, as engine.protocol.command parsed them) and never hold per-session state.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from engine.agents.api import ACCEPT, Action, Agent, Session, Transaction, Verdict

if TYPE_CHECKING:
    from engine.protocol.command import Command

__all__ = ["S554_RELAY_DENIED", "RelayAgent", "RelayPolicy"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The reply for a recipient this client may not send to (RFC 3463 §3.8: X.7.1, delivery
#: not authorized).
S554_RELAY_DENIED: Final[tuple[int, str, str]] = (554, "5.7.1", "Relay access denied")

# Characters a domain may hold here: LDH labels plus "_" (seen in the wild in host names),
# dots between them, and any non-ASCII character (U-labels under SMTPUTF8, RFC 6531).
# Anything else ("%", "!", "@", "[", ":", quotes, space) can only be a routing trick or
# garbage, so it is never an accepted domain, not even under a "*." entry.
_DOMAIN_ASCII: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

# The IPv4-mapped block (RFC 4291 §2.5.5.2).
_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def _normalise_domain(domain: str) -> str:
    """Lower-case, one trailing dot dropped (an absolute name is the same domain)."""
    domain = domain.lower()
    return domain[:-1] if domain.endswith(".") else domain


def _plain_domain(domain: str) -> bool:
    """A normalised domain made of non-empty labels of safe characters only."""
    if not domain or domain.startswith(".") or domain.endswith(".") or ".." in domain:
        return False
    return all(c in _DOMAIN_ASCII or c > "\x7f" for c in domain)


#: The most client addresses whose relay answer is remembered.
_MEMO_SIZE: Final = 4096


def _unmap(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it stands for (dual-stack sockets)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _unmap_network(net: IPNetwork) -> IPNetwork:
    """A network inside ::ffff:0:0/96 as the IPv4 network it stands for."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        base = int(net.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((base, net.prefixlen - 96))
    return net


class RelayPolicy:
    """The open-relay rules for one receive connector.

    ``accepted_domains``: domains this server takes mail for.  An entry matches exactly
    (case-insensitive, a trailing dot ignored); an entry "*.example.com" matches every
    subdomain of example.com at any depth, but not example.com itself.
    ``relay_networks``: clients in these networks may relay anywhere.
    ``relay_authenticated``: an authenticated client may relay anywhere.
    """

    __slots__ = ("_exact", "_networks4", "_networks6", "_relays", "_suffixes",
                 "relay_authenticated")

    def __init__(
        self,
        accepted_domains: Iterable[str],
        relay_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
        relay_authenticated: bool = True,
    ) -> None:
        exact: set[str] = set()
        suffixes: set[str] = set()
        for entry in accepted_domains:
            domain = _normalise_domain(entry)
            wildcard = domain.startswith("*.")
            if wildcard:
                domain = domain[2:]
            if not _plain_domain(domain):
                raise ValueError(f"accepted domain {entry!r} is not a domain or *.domain")
            if wildcard:
                suffixes.add("." + domain)
            else:
                exact.add(domain)
        networks4: list[ipaddress.IPv4Network] = []
        networks6: list[ipaddress.IPv6Network] = []
        for net in relay_networks:
            net = _unmap_network(net)
            if isinstance(net, ipaddress.IPv4Network):
                networks4.append(net)
            elif isinstance(net, ipaddress.IPv6Network):
                networks6.append(net)
            else:
                raise TypeError(f"relay network {net!r} is not an IPv4Network or IPv6Network")
        self._exact: frozenset[str] = frozenset(exact)
        self._suffixes: frozenset[str] = frozenset(suffixes)
        self._networks4: tuple[ipaddress.IPv4Network, ...] = tuple(networks4)
        self._networks6: tuple[ipaddress.IPv6Network, ...] = tuple(networks6)
        self.relay_authenticated = relay_authenticated
        #: may_relay's answer per client address (a pure function of the networks above,
        #: asked at each connection and each RCPT; clients come back from few addresses).
        self._relays: dict[IPAddress, bool] = {}

    def is_accepted_domain(self, domain: str) -> bool:
        """``domain`` (as written: any case, maybe a trailing dot) is one we take mail for.

        Address literals and anything that is not a plain dotted name never are.
        """
        domain = _normalise_domain(domain)
        if not _plain_domain(domain):
            return False
        if domain in self._exact:
            return True
        if self._suffixes:
            # Try every proper suffix that starts at a dot: a.b.example.com tries
            # .b.example.com, then .example.com, then .com.
            dot = domain.find(".")
            while dot > 0:
                if domain[dot:] in self._suffixes:
                    return True
                dot = domain.find(".", dot + 1)
        return False

    def may_relay(
        self, client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address, authenticated: bool
    ) -> bool:
        """This client may send to any domain (relay network, or authenticated and allowed)."""
        if authenticated and self.relay_authenticated:
            return True
        known = self._relays.get(client_ip)
        if known is not None:
            return known
        ip = _unmap(client_ip)
        if ip.version == 4:
            found = any(ip in net for net in self._networks4)
        else:
            found = any(ip in net for net in self._networks6)
        if len(self._relays) >= _MEMO_SIZE:
            self._relays.clear()  # bounded: a scan from many addresses starts it afresh
        self._relays[client_ip] = found
        return found

    def check_rcpt(
        self,
        local: str,
        domain: str,
        client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        authenticated: bool,
    ) -> tuple[int, str, str] | None:
        """None to accept the recipient, else the reply: :data:`S554_RELAY_DENIED`.

        ``local`` is the local part as written (quotes and backslash escapes included),
        ``domain`` the domain or address literal; both "" parts of <Postmaster> are
        (local "Postmaster" in any case, domain "").
        """
        if self.may_relay(client_ip, authenticated):
            return None
        if not domain:
            # <Postmaster> with no domain must always be accepted (RFC 5321 §4.5.1).
            return None if local.lower() == "postmaster" else S554_RELAY_DENIED
        # Routing tricks in the local part: "%" (user%other@accepted, the percent hack),
        # "!" (UUCP bang path), "@" (only possible quoted: "user@other"@accepted).  A next
        # hop that honours one of them forwards the mail to a domain we never checked.
        if "%" in local or "!" in local or "@" in local:
            return S554_RELAY_DENIED
        # Address literals ([192.0.2.1], [IPv6:...]) and odd characters fail here too.
        if not self.is_accepted_domain(domain):
            return S554_RELAY_DENIED
        return None


class RelayAgent(Agent):
    """Relay control on the hook API: the first agent of every chain, at RCPT.

    ``policy`` is swapped by a reload (engine.ops.reload); a session asks the policy of now
    at its next RCPT."""

    name = "relay"

    def __init__(self, policy: RelayPolicy) -> None:
        super().__init__(timeout=1.0, fail_open=False)
        self.policy = policy

    def rcpt(self, session: Session, tx: Transaction, rcpt: Command) -> Verdict:
        refusal = self.policy.check_rcpt(rcpt.local, rcpt.domain, session.client_ip,
                                         bool(session.auth_user))
        return ACCEPT if refusal is None else _RELAY_DENIED


_RELAY_DENIED: Final = Verdict(Action.REJECT, S554_RELAY_DENIED, reason="relay access denied")

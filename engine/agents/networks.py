"""Client addresses against configured networks, for the agents that exempt or allow some
clients by address (``[agents.dnsbl] allow_networks``, ``[agents.ratelimit] exempt``).

A client on a dual-stack socket arrives as an IPv4-mapped IPv6 address (RFC 4291
§2.5.5.2); it is matched, looked up and counted as the IPv4 address it stands for.

It decides membership only: no I/O, no policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["IPAddress", "IPNetwork", "Networks", "unmap"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def unmap(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it stands for; others as given."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Networks:
    """A set of networks that answers ``ip in networks`` (IPv4-mapped addresses unmapped)."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        nets = tuple(networks)
        self._v4 = tuple(n for n in nets if isinstance(n, ipaddress.IPv4Network))
        self._v6 = tuple(n for n in nets if isinstance(n, ipaddress.IPv6Network))

    def __contains__(self, ip: IPAddress) -> bool:
        if not (self._v4 or self._v6):
            return False  # the common case, asked at every stage: no generator made
        ip = unmap(ip)
        if isinstance(ip, ipaddress.IPv4Address):
            return any(ip in net for net in self._v4)
        return any(ip in net for net in self._v6)

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

"""The routing contract shared by the router, the scheduler and the delivery agents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

#: A route's TLS: the security levels of engine.tlspolicy (Postfix's names), and the
#: older names of [[send]] tls that stay valid ("off" = none, "opportunistic" = may,
#: "required" = encrypt).
TlsMode = Literal["off", "opportunistic", "required", "verify", "none", "may", "encrypt",
                  "dane", "dane-only"]
Protocol_ = Literal["smtp", "lmtp", "maildir"]


@dataclass(frozen=True, slots=True)
class Host:
    """One server to try: ``name`` as found in MX/smarthost, ``address`` the IP to dial."""

    name: str
    address: str
    port: int
    preference: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Source:
    """An egress source ([egress.sources."NAME"]): the local address a connection binds
    to ("" = the system's choice) and the name it gives in EHLO ("" = the hostname).

    Compared and hashed by identity (``eq=False``): the scheduler's shaping makes one
    per source and configuration, and the client's pool key hashes it per message, which
    a generated ``__hash__`` would do in Python."""

    name: str
    address: str = ""
    ehlo: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    """Where one destination's mail goes now.

    ``site`` names the set of servers behind the destination (KumoMTA's site: the sorted
    MX host names, or "smarthost:host:port"); domains hosted at one provider share a site,
    and with it one queue, one connection pool and one set of limits.
    """

    destination: str
    site: str
    hosts: tuple[Host, ...]
    protocol: Protocol_ = "smtp"
    tls: TlsMode = "opportunistic"
    #: (user, password) for AUTH at a smarthost; None for no AUTH.
    auth: tuple[str, str] | None = None
    #: The send connector's ``allow_plaintext_auth``: send ``auth`` over a connection
    #: without TLS (RFC 4954 §4 advises against it; the operator asked for it).
    plaintext_auth: bool = False
    #: Maildir root for protocol "maildir" (a template with {domain} and {local}).
    maildir: str = ""
    #: The send connector that produced this route ("" for plain MX delivery).
    connector: str = ""
    #: TLS from the first byte (RFC 8314, port 465) instead of STARTTLS: smarthosts only.
    implicit_tls: bool = False
    #: The egress pool its connector names ("" = none); the scheduler picks a source.
    pool: str = ""
    #: The egress source picked for this delivery (the scheduler sets it; None = the
    #: system's address and the hostname).  Connections are pooled per source.
    source: Source | None = None
    #: Messages over one connection before it is closed; 0 = the agent's setting
    #: (a shaping rule's ``max_messages_per_connection``).
    max_messages: int = 0

    def shaped(self, source: Source | None, max_messages: int) -> Route:
        """This route from ``source`` with ``max_messages`` per connection (the scheduler's
        shaping; built directly: ``dataclasses.replace`` costs twice as much per group)."""
        return Route(self.destination, self.site, self.hosts, self.protocol, self.tls,
                     self.auth, self.plaintext_auth, self.maildir, self.connector,
                     self.implicit_tls, self.pool, source, max_messages)


class RouteError(Exception):
    """No route now.  ``permanent`` failures (null MX, no such domain) fail the recipients;
    temporary ones (DNS timeout, SERVFAIL) defer them."""

    def __init__(self, text: str, *, permanent: bool, code: int, enhanced: str) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent
        self.code = code
        self.enhanced = enhanced


class Router(Protocol):
    def destination(self, domain: str) -> str:
        """The destination recorded for a recipient domain at ingest (no DNS lookups)."""
        ...

    def connector_failed(self, name: str, until: float) -> None:
        """No host of send connector ``name`` took a connection: until ``until`` (epoch
        seconds) the routes avoid it when another connector of the same match is left."""
        ...

    async def resolve(self, destination: str, exclude: frozenset[str] = frozenset()) -> Route:
        """The route for a destination; ``exclude`` names send connectors to skip (fail
        over to the next cheapest).  Raises RouteError."""
        ...

    def resolve_cached(self, destination: str,
                       exclude: frozenset[str] = frozenset()) -> Route | None:
        """``resolve`` without waiting: None when a DNS answer it needs is not cached."""
        ...

"""The delivery agents' contract: one message, some recipients, one route → results."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from engine.queue.records import Envelope, RcptState
from engine.routing.api import Route, Source


class Peer(NamedTuple):
    """Where a delivery went, for the tracking log: the next hop's host name, its
    "IP:port" ("" for a local delivery), the TLS of the connection ("TLSv1.3
    TLS_AES_256_GCM_SHA384", "" in clear) and how its certificate was verified.  One per
    connection, shared by its results."""

    host: str
    address: str = ""
    tls: str = ""
    #: How the certificate was verified (engine.tlspolicy): "ca", "mta-sts", "dane-ee",
    #: "dane-ta", or "" (not checked, or no TLS).
    tls_verified: str = ""


#: The peer of a local delivery (a Maildir).
LOCAL = Peer("local")


@dataclass(frozen=True, slots=True)
class RcptResult:
    """What happened to one recipient (its index in the envelope).

    ``state`` is DELIVERED, DEFERRED or FAILED; ``reply`` is the server's reply as text
    ("550 5.1.1 No such user", control characters already removed) or a local reason;
    ``remote`` names the host that gave it ("" when none did); ``dsn_offered`` is True
    when the next hop advertised DSN, so NOTIFY, ORCPT and ENVID were passed on and that
    hop answers for the notices from here (RFC 3461 §5.2.1); ``peer`` is where the
    reply came from (None when no connection was made).
    """

    index: int
    state: RcptState
    reply: str
    remote: str = ""
    dsn_offered: bool = False
    peer: Peer | None = None


class Pending(Protocol):
    """A follow-on message an agent took: its results, once its transaction is over."""

    async def results(self) -> list[RcptResult]:
        ...


@dataclass(frozen=True, slots=True)
class Settled:
    """A follow-on message an agent refused before sending anything: its results."""

    out: list[RcptResult]

    async def results(self) -> list[RcptResult]:
        return self.out


@dataclass(eq=False, slots=True)
class FollowOn:
    """A next message, prepared by the caller (envelope and body loaded), that an agent
    may send right behind the one being delivered, on the same connection (RFC 2920
    §3.1: the next MAIL, RCPTs and DATA may follow the message content in one write).
    ``handle`` is None until the agent takes it; then it is the agent's hold on it."""

    envelope: Envelope
    recipients: list[int]
    body: bytes
    handle: Pending | None = None


#: The next messages a caller offers one connection, in order: the agent pops from the
#: left when a 354 arrives (no call back into the caller from the connection's reads);
#: the caller keeps it filled and collects each message taken with ``resume``.
FollowOns = deque[FollowOn]


class DeliveryAgent(Protocol):
    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[int], body: bytes,
        follow_ons: FollowOns | None = None,
    ) -> list[RcptResult]:
        """Deliver ``body`` to ``envelope.recipients[i] for i in recipients``; never raises
        for delivery problems (they are results), only for programming errors.  An agent
        may take messages from ``follow_ons`` (one behind each message it sends) to send
        them on the same connection; it sets their ``handle``."""
        ...

    def takes_follow_ons(self, route: Route) -> bool:
        """Whether ``deliver`` to ``route`` may take messages from ``follow_ons`` (a
        caller prepares none otherwise)."""
        ...

    async def resume(self, job: FollowOn) -> list[RcptResult]:
        """The results of a message taken from ``follow_ons``; as ``deliver`` returns them."""
        ...

    async def close(self) -> None:
        """Close pooled connections."""
        ...

    async def retire_idle(self, site: str, source: Source | None) -> None:
        """Close one idle pooled connection to ``site`` from ``source``, if there is one,
        and return once its socket is closed (a lease on it may then be given back)."""
        ...

"""The delivery agents' contract: one message, some recipients, one route → results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.queue.records import Envelope, RcptState
from engine.routing.api import Route


@dataclass(frozen=True, slots=True)
class RcptResult:
    """What happened to one recipient (its index in the envelope).

    ``state`` is DELIVERED, DEFERRED or FAILED; ``reply`` is the server's reply as text
    ("550 5.1.1 No such user", control characters already removed) or a local reason;
    ``remote`` names the host that gave it ("" when none did); ``dsn_offered`` says that
    the next hop advertised DSN, so NOTIFY, ORCPT and ENVID were passed on with the message
    and DSNs are its business from there (RFC 3461 §4: a "relayed" DSN is due only when
    it did not).
    """

    index: int
    state: RcptState
    reply: str
    remote: str = ""
    dsn_offered: bool = False


@dataclass(eq=False, slots=True)
class FollowOn:
    """A next message the caller offers to send right behind the one being delivered, on
    the same connection (RFC 2920 §3.1: the next MAIL, RCPTs and DATA may follow the
    message content in one write).  ``handle`` is the agent's: the transaction it started
    for it, or its results when it refused it before sending anything."""

    envelope: Envelope
    recipients: list[int]
    body: bytes
    handle: object = None


#: Called by an agent when it could send a next message behind the current one; returns
#: the message (and the caller must then collect it with ``resume``) or None.
Follow = Callable[[], FollowOn | None]


class DeliveryAgent(Protocol):
    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[int], body: bytes,
        follow: Follow | None = None,
    ) -> list[RcptResult]:
        """Deliver ``body`` to ``envelope.recipients[i] for i in recipients``; never raises
        for delivery problems (they are results), only for programming errors.  An agent
        may call ``follow`` (at most once per message it sends) to pipeline a next message
        on the same connection."""
        ...

    async def resume(self, job: FollowOn) -> list[RcptResult]:
        """The results of a message taken through ``follow``; as ``deliver`` returns them."""
        ...

    async def close(self) -> None:
        """Close pooled connections."""
        ...

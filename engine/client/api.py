"""The delivery agents' contract: one message, some recipients, one route → results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.queue.records import Envelope, RcptState
from engine.routing.api import Route


@dataclass(frozen=True, slots=True)
class RcptResult:
    """What happened to one recipient (its index in the envelope).

    ``state`` is DELIVERED, DEFERRED or FAILED; ``reply`` is the server's reply as text
    ("550 5.1.1 No such user", control characters already removed) or a local reason;
    ``remote`` names the host that gave it ("" when none did).
    """

    index: int
    state: RcptState
    reply: str
    remote: str = ""


class DeliveryAgent(Protocol):
    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[int], body: bytes
    ) -> list[RcptResult]:
        """Deliver ``body`` to ``envelope.recipients[i] for i in recipients``; never raises
        for delivery problems (they are results), only for programming errors."""
        ...

    async def close(self) -> None:
        """Close pooled connections."""
        ...

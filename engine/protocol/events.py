"""Names shared by the server and client state machines."""

from __future__ import annotations

from typing import Final


class NeedData:
    """The type of :data:`NEED_DATA`."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when the buffered input holds no complete event.
NEED_DATA: Final = NeedData()

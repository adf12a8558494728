"""What the content scanners (engine.agents.rspamd, engine.agents.clamav) share: the part
of the agent context their factories read, the message cut into chunks that are views of
its buffer (never copies), and the clean-up of a scanner's words before they reach a reply,
a header field or a log line.

A scanner's answer is text from another program that read the message: a virus name, an
rspamd symbol's options (which quote URLs and addresses from the message) or its SMTP
message.  None of it may bring a CR, LF, NUL or any other control character into a reply or
a header (DESIGN.md, wire rules), nor make a line longer than a reply or header line may be.

Must never do I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from engine.agents.dns import Lookup
    from engine.config import Config

__all__ = ["CHUNK_SIZE", "ScannerContext", "chunks", "printable"]

#: Bytes per chunk sent to a scanner: large enough for few system calls, small enough that
#: one chunk, drained before the next is written, is all a connection holds in its buffers.
CHUNK_SIZE: Final = 64 << 10


class ScannerContext(Protocol):
    """What a scanner's factory reads of engine.agents' AgentContext."""

    @property
    def config(self) -> Config: ...

    @property
    def hostname(self) -> str: ...

    @property
    def lookup(self) -> Lookup: ...


#: Printable US-ASCII, space included (RFC 5321 §4.2 reply text, RFC 5322 §2.2 field body).
_KEEP: Final = frozenset(chr(c) for c in range(0x20, 0x7F))


def printable(text: str, limit: int = 200, drop: str = "") -> str:
    """``text`` with every character that is not printable US-ASCII (or is in ``drop``)
    replaced by "?", runs of white space made one space, cut to ``limit`` characters
    ("..." marks a cut)."""
    cleaned = "".join(c if c in _KEEP and c not in drop else "?" for c in text)
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def chunks(data: bytes | memoryview, size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """``data`` in slices of ``size`` bytes, each a view of the same buffer."""
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start:start + size]

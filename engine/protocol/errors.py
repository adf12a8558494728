"""The exception classes of the wire layer, shared by every compiled module and its twin.

Both implementations raise these very classes, so the twin tests can assert identical
exception types.  Each carries the SMTP reply it maps to, so the server state machine can
answer without a table of its own: ``code`` (int), ``enhanced`` (RFC 3463 status, "" when
none applies) and ``text`` (safe to send: never holds CR, LF or NUL from the wire).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: the peer broke the protocol; the reply says how."""

    code: int = 500
    enhanced: str = "5.5.2"

    def __init__(self, text: str, code: int | None = None, enhanced: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        if code is not None:
            self.code = code
        if enhanced is not None:
            self.enhanced = enhanced

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and isinstance(other, ProtocolError)
            and (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)
        )

    def __hash__(self) -> int:
        return hash((type(self), self.code, self.enhanced, self.text))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r}, code={self.code}, enhanced={self.enhanced!r})"


class LineTooLong(ProtocolError):
    """A line exceeded its limit; it was consumed up to its CRLF and discarded (500 5.5.2)."""

    code = 500
    enhanced = "5.5.2"


class CommandError(ProtocolError):
    """A command line that cannot be accepted as written (500, 501, 502, 504, 553, 555)."""

    code = 501
    enhanced = "5.5.4"


class ReplyError(ProtocolError):
    """The server's reply broke RFC 5321 §4.2 (bad code, mixed codes, over a cap)."""

    code = 421
    enhanced = "4.5.0"

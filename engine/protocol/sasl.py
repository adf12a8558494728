"""Sans-I/O SASL mechanisms, server side, for SMTP AUTH (RFC 4954).

A mechanism turns the client's base64 lines into one of three outcomes: a
:class:`Challenge` to send after ``334``, the decoded :class:`Credentials` (the
application checks them and replies 235 or 535), or a :class:`SaslFailure` to reply with
as it is.  ``ServerConnection`` (``engine.protocol.server``) frames the exchange: it
emits ``AuthStart(mechanism, initial)`` and ``AuthResponse(data)`` events and handles
the client's ``*`` cancel itself; the glue feeds those strings to the mechanism made by
:func:`mechanism` and answers the event with what comes back.

Offered here: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login).  Both send the
password in the clear, so the server offers them only under TLS by default (RFC 4954 §4).

Decoding is strict: base64 must be canonical (RFC 4648 §3.3, no whitespace or junk);
names and passwords must be UTF-8, at most ``max_octets`` octets each, never contain
NUL, and names (authorization and authentication identities) contain no control
characters, so they can reach a log line or a trace header safely (DESIGN.md "Wire
rules").  Names are compared as sent: no SASLprep (RFC 4013) normalisation is applied.

This module must never do I/O, log, or decide whether credentials are good: that is
``engine.server.auth``.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Final, Protocol

#: RFC 4954 §4 does not bound a credential; this does (each field, in octets).
DEFAULT_MAX_OCTETS: Final = 1024

#: The mechanisms :func:`mechanism` can make, in the order a server would offer them.
MECHANISMS: Final = ("PLAIN", "LOGIN")

#: draft-murchison-sasl-login §2: the server's prompts, base64 of "Username:" and
#: "Password:" (clients ignore the text, but some expect exactly these).
LOGIN_USERNAME_PROMPT: Final = "VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT: Final = "UGFzc3dvcmQ6"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 <text>``; ``text`` is already base64 (``""`` for an empty challenge)."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client claims; the application verifies ``password`` for ``username``.

    ``authzid`` is the identity to act as (RFC 4616 §2), ``""`` when the client asked
    for none.  The password is kept out of ``repr`` so logging the object cannot leak it.
    """

    authzid: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslFailure:
    """End the exchange with this reply (RFC 4954 §4, §6)."""

    code: int
    enhanced: str
    text: str


SaslResult = Challenge | Credentials | SaslFailure

# RFC 4954 §4: a response that is not base64 ends the exchange with 501 5.5.2.
F501_CANNOT_DECODE: Final = SaslFailure(501, "5.5.2", "Cannot decode response")
# RFC 4954 §4: "*" cancels; the server state machine answers it before we see it.
F501_CANCELLED: Final = SaslFailure(501, "5.0.0", "Authentication cancelled")
# RFC 4954 §6: 535 5.7.8 for credentials that cannot be right, before any lookup.
F535_MALFORMED: Final = SaslFailure(535, "5.7.8", "Malformed PLAIN message")
F535_NUL: Final = SaslFailure(535, "5.7.8", "NUL not allowed in credentials")
F535_CONTROL: Final = SaslFailure(535, "5.7.8", "Control characters not allowed in names")
F535_UTF8: Final = SaslFailure(535, "5.7.8", "Credentials must be UTF-8")
F535_TOO_LONG: Final = SaslFailure(535, "5.7.8", "Credentials too long")
F535_EMPTY: Final = SaslFailure(535, "5.7.8", "Empty username or password")


class ServerMechanism(Protocol):
    """One SASL exchange on the server side; make a new one for every AUTH command."""

    def start(self, initial: str | None) -> SaslResult:
        """Begin with the AUTH command's initial response as sent (``"="`` = empty)."""
        ...

    def step(self, response: str) -> SaslResult:
        """Continue with one client response line (base64, without CRLF)."""
        ...


def mechanism(name: str, *, max_octets: int = DEFAULT_MAX_OCTETS) -> ServerMechanism:
    """A fresh server-side exchange for ``name`` (case-insensitive); ValueError if unknown.

    ``max_octets`` bounds each of authzid, username and password after decoding.
    """
    if max_octets < 1:
        raise ValueError("max_octets must be positive")
    upper = name.upper()
    if upper == "PLAIN":
        return _Plain(max_octets)
    if upper == "LOGIN":
        return _Login(max_octets)
    raise ValueError(f"unsupported SASL mechanism: {name!r}")


# --- decoding helpers ------------------------------------------------------------------


def _b64(text: str, max_decoded: int) -> bytes | SaslFailure:
    """Strict base64 to bytes; refuses before decoding anything that must decode too long."""
    # 4 base64 characters carry 3 octets; anything longer cannot fit and is not decoded.
    if len(text) > 4 * -(-max_decoded // 3):
        return F535_TOO_LONG
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:  # binascii.Error, or a non-ASCII str
        return F501_CANNOT_DECODE


def _text(raw: bytes, max_octets: int, *, name: bool) -> str | SaslFailure:
    """One credential field as str, or why it is refused."""
    if b"\0" in raw:
        return F535_NUL
    if len(raw) > max_octets:
        return F535_TOO_LONG
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return F535_UTF8
    # Names end up in log lines and trace headers: no CR, LF or other C0/DEL controls.
    if name and any(c < " " or c == "\x7f" for c in text):
        return F535_CONTROL
    return text


def _initial(initial: str) -> str:
    """RFC 4954 §4: a lone "=" is the zero-length initial response (a response, not a
    request for a challenge: only an AUTH command without one asks for that)."""
    return "" if initial == "=" else initial


class _Exchange:
    """Shared bookkeeping: one start, then steps until an outcome that ends the exchange."""

    def __init__(self, max_octets: int) -> None:
        self._max = max_octets
        self._started = False
        self._done = False

    def _begin(self) -> None:
        if self._started:
            raise RuntimeError("SASL exchange already started")
        self._started = True

    def _check_step(self) -> None:
        if not self._started or self._done:
            raise RuntimeError("SASL step outside a running exchange")

    def _end(self, result: SaslResult) -> SaslResult:
        if not isinstance(result, Challenge):
            self._done = True
        return result


class _Plain(_Exchange):
    """RFC 4616: one message ``[authzid] NUL authcid NUL passwd``, client first."""

    def start(self, initial: str | None) -> SaslResult:
        self._begin()
        if initial is None:
            # No initial response: ask for the message with an empty challenge (RFC 4954
            # §4, "334 " followed by nothing).
            return Challenge("")
        return self._end(self._message(_initial(initial)))

    def step(self, response: str) -> SaslResult:
        self._check_step()
        if response == "*":
            return self._end(F501_CANCELLED)
        return self._end(self._message(response))

    def _message(self, text: str) -> SaslResult:
        # Three fields and two separators; the encoded form is bounded accordingly.
        raw = _b64(text, 3 * self._max + 2)
        if isinstance(raw, SaslFailure):
            return raw
        parts = raw.split(b"\0")
        if len(parts) != 3:
            # Fewer than two NULs is malformed; more means a NUL inside the password.
            return F535_MALFORMED if len(parts) < 3 else F535_NUL
        fields: list[str] = []
        for i, part in enumerate(parts):
            value = _text(part, self._max, name=i < 2)
            if isinstance(value, SaslFailure):
                return value
            fields.append(value)
        authzid, username, password = fields
        # RFC 4616 §2: authcid and passwd are 1*SAFE; authzid may be empty.
        if not username or not password:
            return F535_EMPTY
        return Credentials(authzid, username, password)


class _Login(_Exchange):
    """draft-murchison-sasl-login: server first, username then password, one line each."""

    def __init__(self, max_octets: int) -> None:
        super().__init__(max_octets)
        self._username: str | None = None

    def start(self, initial: str | None) -> SaslResult:
        self._begin()
        if initial is None:
            return Challenge(LOGIN_USERNAME_PROMPT)
        # Not in the draft, but common (and harmless): the username as initial response
        # ("=", an empty one, is an empty username and fails like one).
        return self._end(self._take_username(_initial(initial)))

    def step(self, response: str) -> SaslResult:
        self._check_step()
        if response == "*":
            return self._end(F501_CANCELLED)
        if self._username is None:
            return self._end(self._take_username(response))
        value = self._field(response, name=False)
        if isinstance(value, SaslFailure):
            return self._end(value)
        return self._end(Credentials("", self._username, value))

    def _take_username(self, text: str) -> SaslResult:
        value = self._field(text, name=True)
        if isinstance(value, SaslFailure):
            return value
        self._username = value
        return Challenge(LOGIN_PASSWORD_PROMPT)

    def _field(self, text: str, *, name: bool) -> str | SaslFailure:
        raw = _b64(text, self._max)
        if isinstance(raw, SaslFailure):
            return raw
        value = _text(raw, self._max, name=name)
        if value == "":
            return F535_EMPTY
        return value

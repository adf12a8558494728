"""The TLS security levels of a destination (Postfix's smtp_tls_security_level names).

==========  ==============================================================================
level       what the client does
==========  ==============================================================================
none        no STARTTLS
may         STARTTLS when offered, certificate not checked (RFC 7435 opportunistic
            security); clear text when not offered or after a remembered failure
encrypt     TLS or no delivery; certificate not checked (today's "required")
verify      TLS with a certificate valid for the host name (CA roots or delivery.ca_file)
dane        DANE (RFC 7672) where validated TLSA records exist, else MTA-STS, else may
dane-only   DANE or no delivery
==========  ==============================================================================

The older [[send]] names stay valid: "off" = none, "opportunistic" = may, "required" =
encrypt.
"""

from __future__ import annotations

from typing import Final, Literal

Level = Literal["none", "may", "encrypt", "verify", "dane", "dane-only"]

#: Every name [[send]] tls and [delivery] tls_policy accept → its level.
LEVEL_OF: Final[dict[str, Level]] = {
    "off": "none", "opportunistic": "may", "required": "encrypt",
    "none": "none", "may": "may", "encrypt": "encrypt", "verify": "verify",
    "dane": "dane", "dane-only": "dane-only",
}  # fmt: skip


def level_of(mode: str) -> Level:
    """The level of a route's TLS mode; ValueError for an unknown name."""
    try:
        return LEVEL_OF[mode]
    except KeyError:
        raise ValueError(f"unknown TLS security level {mode!r}") from None

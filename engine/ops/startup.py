"""Start-up warnings: a configuration that loads and runs, but that an operator most likely
does not mean for a server facing the world.

:func:`startup_warnings` looks at the configuration and the addresses the receive
connectors actually bound, and returns one sentence per finding; engine.app logs each as
a WARNING on the ``ferry`` logger.  What it checks:

- the hostname is not a fully qualified domain name (the default is ``localhost`` on a
  machine without one): it is the 220 greeting and the EHLO name Ferry sends, and other
  servers may refuse or score a client whose EHLO name is not a FQDN (RFC 5321 §4.1.1.1);
- ``relay_networks`` wider than the loopback on a connector bound to an address other than
  the loopback: more clients than the machine itself may relay through it (an open relay
  when the networks are wide);
- AUTH offered without TLS (no STARTTLS, not implicit): passwords cross the network in
  clear (RFC 4954 §4).

It must never refuse to start (that is engine.ops.daemon's and engine.config's job) and
never touch the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from engine.config import Config, Network, ReceiveConfig
from engine.ops.daemon import is_loopback

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _within_loopback(net: Network) -> bool:
    return any(net.version == lo.version and net.subnet_of(lo)  # type: ignore[arg-type]
               for lo in _LOOPBACK)


def _hostname(config: Config) -> list[str]:
    if "." in config.hostname:
        return []
    return [f'HOSTNAME {config.hostname!r} IS NOT A FULLY QUALIFIED DOMAIN NAME: it is the '
            "greeting and the EHLO name Ferry sends to other servers, which may refuse "
            "mail from it; set hostname = \"mail.example.com\" in the configuration "
            "(or --hostname)"]


def _relay(rc: ReceiveConfig, bound: Sequence[str]) -> list[str]:
    public = [a for a in bound if not is_loopback(a)]
    wide = [str(net) for net in rc.relay_networks if not _within_loopback(net)]
    if not public or not wide:
        return []
    return [f"receive connector {rc.name} listens on {', '.join(public)} and lets "
            f"{', '.join(wide)} relay without AUTH (relay_networks): check that only your "
            "own clients are in those networks"]


def _clear_auth(config: Config, rc: ReceiveConfig) -> list[str]:
    offers_auth = bool(config.users) and bool(rc.auth_mechanisms) and rc.allow_plaintext_auth
    if not offers_auth or rc.tls != "off":
        return []
    return [f"receive connector {rc.name} offers AUTH without TLS (tls = \"off\", "
            "allow_plaintext_auth = true): passwords cross the network in clear"]


def startup_warnings(config: Config, bound: Mapping[str, Sequence[str]]) -> list[str]:
    """One sentence per finding; ``bound`` maps a receive connector's name to the
    addresses it listens on ("HOST:PORT", "[v6]:PORT")."""
    found = _hostname(config)
    for rc in config.receive:
        found += _relay(rc, bound.get(rc.name, ()))
        found += _clear_auth(config, rc)
    return found

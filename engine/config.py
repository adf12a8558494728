"""The configuration: read the TOML file, validate every key, hand out frozen dataclasses.

This module owns the configuration's shape, its defaults and its error messages.  The file
is read with stdlib ``tomllib`` and checked by private pydantic v2 models (unknown keys are
errors, types are strict: ``"25"`` is not a port, ``true`` is not a number); the result is
converted to the plain frozen dataclasses below, which are all the rest of the code sees.
No other module imports pydantic.

Every problem becomes one line of :class:`ConfigError` that starts with the dotted path of
the offending key (``receive[0].max_message_size: must be a positive integer (got -5)``);
all problems found are listed at once, so an operator fixes the file in one pass.  Values
that the file could hold as secrets (password hashes) are never echoed in a message.

Relative paths in a file are taken relative to the directory of that file, so the same file
works whatever the working directory; paths of the embedded default and of overrides are
relative to the working directory.

It must never open sockets, create the spool, start anything or import the engine's other
parts: loading a configuration has no effect besides reading the file (and checking that
certificate files exist).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import string
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    model_validator,
)

__all__ = [
    "DEFAULT_TOML",
    "IMPLICIT_SMARTHOST",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "LocalConfig",
    "LogConfig",
    "Network",
    "Overrides",
    "QueueConfig",
    "ReceiveConfig",
    "SendConfig",
    "load_config",
    "parse_hostport",
    "parse_size",
]

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: The configuration used when no file is given: one receive connector on 127.0.0.1:2525
#: that relays for loopback clients only, delivery by DNS MX, the spool in ./ferry-spool.
#: Every other key takes the dataclass defaults below.
DEFAULT_TOML: Final = """\
# Ferry's embedded default configuration.
spool = "./ferry-spool"

[[receive]]
name = "default"
listen = ["127.0.0.1:2525"]
relay_networks = ["127.0.0.0/8", "::1/128"]
"""


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is one line per problem.

    ``problems`` holds the same lines as a tuple.  Each line starts with the dotted path of
    the offending key (``receive[0].cert_file: ...``), except for problems with the file
    itself (not found, not TOML), which name the file.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        lines = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(lines))
        self.problems: tuple[str, ...] = lines


# --- the configuration the rest of the code uses ----------------------------------------


@dataclass(frozen=True)
class QueueConfig:
    """The LMDB queue database (``engine.queue.lmdb_store.LmdbQueue`` arguments)."""

    #: "fsync": every commit is synced, acknowledged mail survives power loss;
    #: "os": the OS flushes, acknowledged mail survives a crash of the process only.
    durability: Literal["fsync", "os"] = "fsync"
    map_size: int = 256 * MiB
    max_map_size: int = 64 * GiB
    #: Below this much free disk new mail gets a 4xx (back pressure); 0 = off.
    min_free_disk: int = 512 * MiB
    max_pending: int = 10_000
    batch_limit: int = 2_000


def _loopback() -> tuple[Network, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _everyone() -> tuple[Network, ...]:
    return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass(frozen=True)
class ReceiveConfig:
    """One receive connector: where it listens, whom it serves, and its limits."""

    name: str = "default"
    #: (host, port) pairs; port 0 binds an ephemeral port (tests).
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 2525),)
    #: Clients outside these networks are refused at connect.
    remote_ranges: tuple[Network, ...] = field(default_factory=_everyone)
    #: "starttls" offers STARTTLS (RFC 3207); "required" also refuses MAIL before it;
    #: "implicit" is TLS from the first byte (RFC 8314 §3, port 465).
    tls: Literal["off", "starttls", "required", "implicit"] = "off"
    cert_file: Path | None = None
    key_file: Path | None = None
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    #: AUTH without TLS sends the password in clear (RFC 4954 §4 advises against it).
    allow_plaintext_auth: bool = False
    #: Clients in these networks may relay to any domain.
    relay_networks: tuple[Network, ...] = field(default_factory=_loopback)
    #: Authenticated clients may relay to any domain.
    relay_authenticated: bool = True
    max_message_size: int = 35 * MiB
    max_recipients: int = 1000
    max_messages_per_connection: int = 1000
    max_connections: int = 2000
    max_connections_per_ip: int = 100
    #: 4xx/5xx replies tolerated before 421 and close.
    max_errors: int = 20
    #: RFC 5321 §4.5.3.2.7: the server timeout is at least 5 minutes.
    idle_timeout: float = 300.0
    #: Seconds allowed for a whole message body.
    data_timeout: float = 600.0
    #: Bytes per second during DATA after ``data_rate_grace`` seconds; 0 = off.
    min_data_rate: int = 1024
    data_rate_grace: float = 10.0
    #: Seconds to wait before the 220; a client that talks first gets 554 (an early
    #: talker is a spam engine that does not wait for the greeting).  0 = greet at once.
    greet_delay: float = 0.0
    max_auth_failures: int = 3
    #: RFC 5321 §6.3: a message with more Received headers than this is looping.
    max_received_headers: int = 100
    #: A bare CR or LF in DATA: "reject" (5xx) or "normalize" to CRLF (DESIGN.md wire rules).
    bare_eol: Literal["reject", "normalize"] = "reject"
    protocol_log: bool = False
    #: Text of the 220 greeting; "" means "<hostname> ESMTP Ferry" (see :meth:`banner`).
    greeting: str = ""
    #: RFC 5321 §4.5.3.1.4: a command line is at least 512 octets with its CRLF.
    max_command_line: int = 512
    #: RFC 5321 §4.5.3.1.6: a text line is at least 1000 octets with its CRLF.
    max_text_line: int = 1000
    #: Refuse a group-ending command pipelined with more input (RFC 2920 §3.1).
    strict_pipelining: bool = True
    #: Refuse MAIL before a successful AUTH (a submission port, RFC 6409 §4.3: 530 5.7.0).
    require_auth: bool = False
    #: A line over 1,000 octets (RFC 5321 §4.5.3.1.6): "wrap" it with CRLF SPACE at
    #: ingest (Postfix's smtp_line_length_limit), or "reject" the message (554 5.6.0).
    long_lines: Literal["wrap", "reject"] = "wrap"

    def banner(self, hostname: str) -> str:
        """The greeting text after "220 ": the configured one or "<hostname> ESMTP Ferry"."""
        return self.greeting or f"{hostname} ESMTP Ferry"


@dataclass(frozen=True)
class DomainLimits:
    """Limits for the site one destination domain resolves to; None keeps the default."""

    max_connections: int | None = None
    max_rate: float | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    """Outbound delivery: by DNS MX (default) or everything through a smarthost."""

    smarthost: tuple[str, int] | None = None
    #: The nameserver to ask (host, port); None = the system resolver configuration.
    dns: tuple[str, int] | None = None
    #: DNS queries in flight at once (a restart with mail for thousands of domains must
    #: not flood the resolver: a burst beyond its receive buffer is dropped, and each
    #: dropped query costs a timeout).
    dns_max_queries: int = 1000
    #: CA certificates (PEM) that ``tls = "verify"`` trusts; None: the system's store
    #: (Postfix's smtp_tls_CAfile): for a smarthost with a certificate from a private CA.
    ca_file: Path | None = None
    mx_port: int = 25
    max_per_domain: int = 20
    #: Messages per second to one site (a destination's server set); 0 = no limit.
    max_rate: float = 0.0
    #: Messages over one outbound connection before it is closed.
    max_messages_per_connection: int = 100
    #: Send the next queued message's envelope behind the current body (RFC 2920 §3.1)
    #: to next hops that offer PIPELINING.
    pipeline_messages: bool = True
    #: Recipients of one message in one transaction (RFC 5321 §4.5.3.1.8: at least 100).
    max_recipients_per_transaction: int = 100
    #: The first retry delay; later ones double up to ``max_retry_interval``.
    retry_interval: float = 300.0
    max_retry_interval: float = 4 * 3600.0
    #: A message still queued this long after arrival fails with a DSN (RFC 5321 §4.5.4.1).
    max_queue_lifetime: float = 5 * 86400.0
    #: A site that accepted no connection is left alone this long.
    down_period: float = 60.0
    #: Due (message, destination) groups held in memory at once (the active window).
    window: int = 50_000
    #: Start with delivery paused (mail is accepted and queued only).
    paused: bool = False
    #: A message queued this long when a recipient is deferred gets one delay notice
    #: (RFC 3464 action "delayed") to its sender; 0 = off (Postfix's default too: bulk
    #: senders rarely want them).  Must be shorter than ``max_queue_lifetime``.
    delay_notice_after: float = 0.0
    #: Per-domain overrides of max_per_domain / max_rate ([delivery.domains."gmail.com"]).
    domains: Mapping[str, DomainLimits] = field(default_factory=dict)


SendTls: TypeAlias = Literal["off", "opportunistic", "required", "verify"]


@dataclass(frozen=True)
class SendConfig:
    """One send connector: which recipient domains it serves, at what cost, and how.

    An address space is "example.com" (that domain only), "*.example.com" (the domain and
    every subdomain) or "*" (everything); the most specific match wins, then the lowest
    cost (engine.routing.router).  No smarthosts means delivery by DNS MX.
    """

    name: str
    address_spaces: tuple[str, ...]
    cost: int = 1
    #: (host, port) pairs tried in this order; empty = look up the MX hosts.
    smarthosts: tuple[tuple[str, int], ...] = ()
    #: "verify" is "required" plus certificate and host name verification.
    tls: SendTls = "opportunistic"
    #: AUTH (RFC 4954) to the smarthosts; "" for none.  Both or neither.
    auth_user: str = ""
    auth_password: str = field(default="", repr=False)
    #: AUTH over a connection without TLS sends the password in clear.
    allow_plaintext_auth: bool = False
    protocol: Literal["smtp", "lmtp"] = "smtp"
    #: Port of the MX hosts; None = delivery.mx_port (25 unless a test lab changes it).
    port: int | None = None


@dataclass(frozen=True)
class LocalConfig:
    """Authoritative domains delivered here: into a Maildir, or handed to an LMTP server.

    Exactly one of ``maildir`` (a path template with {domain} and {local}) and ``lmtp``.
    """

    domains: tuple[str, ...]
    maildir: str = ""
    lmtp: tuple[str, int] | None = None


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: None here means ``spool / "log"``; :func:`load_config` always fills it in.
    protocol_log_dir: Path | None = None


@dataclass(frozen=True)
class Config:
    """The whole configuration.  ``load_config`` builds it; nothing mutates it."""

    hostname: str = field(default_factory=socket.getfqdn)
    spool: Path = Path("./ferry-spool")
    #: Lower-case, no trailing dot; "*.example.com" matches every subdomain.
    accepted_domains: tuple[str, ...] = ()
    #: Where RCPT TO:<Postmaster> goes (RFC 5321 §4.5.1); "" = postmaster@<hostname>.
    postmaster: str = ""
    #: user → password hash ("scrypt$...", engine.server.auth.hash_password); read-only.
    users: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    queue: QueueConfig = field(default_factory=QueueConfig)
    receive: tuple[ReceiveConfig, ...] = field(default_factory=lambda: (ReceiveConfig(),))
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    #: Send connectors, [[send]]; none (and no delivery.smarthost) = everything by DNS MX.
    send: tuple[SendConfig, ...] = ()
    #: Local (authoritative) domains, [[local]]; mail for them is accepted from anyone.
    local: tuple[LocalConfig, ...] = ()


@dataclass(frozen=True)
class Overrides:
    """Settings from ``ferry serve`` flags; they win over the file.

    ``listen`` replaces the listen addresses of the first receive connector and
    ``relay_from`` (CIDRs) its relay networks; ``accept_domains`` are added to the accepted
    domains; every other field replaces the setting of the same name.  An empty tuple or
    None means "not given".
    """

    listen: tuple[tuple[str, int], ...] = ()
    spool: str | None = None
    relay_from: tuple[str, ...] = ()
    accept_domains: tuple[str, ...] = ()
    smarthost: tuple[str, int] | None = None
    hostname: str | None = None
    dns: tuple[str, int] | None = None
    mx_port: int | None = None
    max_per_domain: int | None = None
    retry_interval: float | None = None


# --- value checkers ------------------------------------------------------------------------
#
# Each checker takes a value as TOML produced it and returns the converted value, or raises
# _Invalid.  The pydantic models call them through PlainValidator; the overrides call them
# directly.  _Invalid may carry several problems, each at a path below the key checked
# (a list index, a user name), so that every bad element of an array is reported.

_Loc: TypeAlias = tuple[str | int, ...]
_R = TypeVar("_R")


class _Invalid(ValueError):
    def __init__(self, message: str, at: _Loc = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[_Loc, str]] = [(at, message)]

    @classmethod
    def many(cls, problems: Sequence[tuple[_Loc, str]]) -> _Invalid:
        err = cls(problems[0][1], problems[0][0])
        err.problems = list(problems)
        return err


def _as_written(seconds: float) -> str:
    """Seconds as the operator wrote them: the model keeps floats, the file said 3600."""
    return str(int(seconds)) if seconds.is_integer() else str(seconds)


def _show(value: object) -> str:
    """A value as the operator wrote it in TOML, shortened, for "(got ...)"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str | list):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: object) -> int:
    if not _is_int(value) or cast(int, value) <= 0:
        raise _Invalid(f"must be a positive integer (got {_show(value)})")
    return cast(int, value)


def _int_or_off(value: object) -> int:
    if not _is_int(value) or cast(int, value) < 0:
        raise _Invalid(f"must be an integer >= 0, where 0 means off (got {_show(value)})")
    return cast(int, value)


def _int_at_least(minimum: int, why: str) -> Callable[[object], int]:
    def check(value: object) -> int:
        if not _is_int(value):
            raise _Invalid(f"must be an integer (got {_show(value)})")
        if cast(int, value) < minimum:
            raise _Invalid(f"must be at least {minimum}, {why} (got {_show(value)})")
        return cast(int, value)

    return check


def _port(value: object) -> int:
    if not _is_int(value) or not 1 <= cast(int, value) <= 65535:
        raise _Invalid(f"must be a port number from 1 to 65535 (got {_show(value)})")
    return cast(int, value)


def _seconds(value: object) -> float:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise _Invalid(f"must be a positive number of seconds (got {_show(value)})")
    return float(number)


def _zero_or_more(unit: str) -> Callable[[object], float]:
    def check(value: object) -> float:
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number) or number < 0:
            raise _Invalid(f"must be a number of {unit}, 0 or more (got {_show(value)})")
        return float(number)

    return check


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false (got {_show(value)})")
    return value


def _choice(*options: str) -> Callable[[object], str]:
    listed = ", ".join(f'"{o}"' for o in options)

    def check(value: object) -> str:
        if isinstance(value, str) and value in options:
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), options, n=1)
            if close:
                hint = f'; did you mean "{close[0]}"?'
        raise _Invalid(f"must be one of {listed} (got {_show(value)}{hint})")

    return check


def _string_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        raise _Invalid(f"must be an array of {what} (got {_show(value)})")
    bad = [
        ((i,), f"must be a string (got {_show(v)})")
        for i, v in enumerate(value)
        if not isinstance(v, str)
    ]
    if bad:
        raise _Invalid.many(bad)
    return cast(list[str], value)


def _each(value: object, what: str, check: Callable[[str], _R]) -> tuple[_R, ...]:
    """Apply ``check`` to every string of an array, reporting every bad element."""
    items = _string_list(value, what)
    out: list[_R] = []
    bad: list[tuple[_Loc, str]] = []
    for i, item in enumerate(items):
        try:
            out.append(check(item))
        except _Invalid as err:
            bad.extend(((i, *at), msg) for at, msg in err.problems)
    if bad:
        raise _Invalid.many(bad)
    return tuple(out)


# --- sizes

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_UNITS: Final = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "ki": KiB, "kib": KiB,
    "m": 10**6, "mb": 10**6, "mi": MiB, "mib": MiB,
    "g": 10**9, "gb": 10**9, "gi": GiB, "gib": GiB,
    "t": 10**12, "tb": 10**12, "ti": 1 << 40, "tib": 1 << 40,
}  # fmt: skip


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as "256MiB", "1GiB", "35MB", "10k" (≥ 0).

    Decimal units (k, kB, M, MB, G, GB, T, TB) are powers of 1000; binary ones (KiB, MiB,
    GiB, TiB, or Ki, Mi, ...) powers of 1024; units are case-insensitive.  ConfigError for
    anything else, a negative size, or a fraction of a byte.
    """
    try:
        return _size(value)
    except _Invalid as err:
        raise ConfigError(str(err)) from None


def _size(value: object) -> int:
    usage = 'an integer or a string such as "35MiB", "1GiB", "10k"'
    if _is_int(value):
        if cast(int, value) < 0:
            raise _Invalid(f"must be a size in bytes >= 0 (got {_show(value)})")
        return cast(int, value)
    if not isinstance(value, str):
        raise _Invalid(f"must be a size in bytes: {usage} (got {_show(value)})")
    match = _SIZE.fullmatch(value.strip())
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise _Invalid(f"must be a size in bytes: {usage} (got {_show(value)})")
    try:
        exact = Decimal(match.group(1)) * unit
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise _Invalid(f"must be a size in bytes: {usage} (got {_show(value)})") from None
    if exact != exact.to_integral_value():
        raise _Invalid(f"is not a whole number of bytes (got {_show(value)})")
    return int(exact)


def _positive_size(value: object) -> int:
    if _is_int(value) and cast(int, value) <= 0:
        raise _Invalid(f"must be a positive integer (got {_show(value)})")
    size = _size(value)
    if size == 0:
        raise _Invalid(f"must be a positive size (got {_show(value)})")
    return size


# --- names, domains and addresses

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _domain_problem(text: str) -> str | None:
    """Why ``text`` (no trailing dot) is not an LDH domain name (RFC 1035 §2.3.1), or None."""
    if not text:
        return "is empty"
    if not text.isascii():
        return "must be an ASCII domain name (write an internationalised name as xn--...)"
    if len(text) > 253:
        return "is longer than 253 characters"
    labels = text.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            return (
                f"is not a valid domain name: label {_show(label)} must be 1 to 63 letters,"
                " digits or hyphens, not starting or ending with a hyphen"
            )
    if all(label.isdigit() for label in labels):
        return "looks like an IPv4 address but is not one"
    return None


def _hostname(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string (got {_show(value)})")
    name = value[:-1] if value.endswith(".") else value
    problem = _domain_problem(name)
    if problem:
        raise _Invalid(f"{problem} (got {_show(value)})")
    return name


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _mailbox(value: object) -> str:
    """local@domain with a dot-atom local part (RFC 5321 §4.1.2) and a host name."""
    if isinstance(value, str):
        local, _, domain = value.rpartition("@")
        if _DOT_ATOM.fullmatch(local) and _domain_problem(domain) is None:
            return value
    raise _Invalid(f'must be an address such as "postmaster@example.com" (got {_show(value)})')


def _domain_pattern(value: str) -> str:
    name = value.lower()
    name = name[:-1] if name.endswith(".") else name
    base = name[2:] if name.startswith("*.") else name
    problem = _domain_problem(base)
    if problem:
        raise _Invalid(f"{problem} (got {_show(value)})")
    return name


def _domains(value: object) -> tuple[str, ...]:
    # Duplicates are harmless; drop them and keep the order the operator wrote.
    return tuple(dict.fromkeys(_each(value, "domain names", _domain_pattern)))


def _network(value: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Invalid(
            f'is not an IP network in CIDR notation such as "192.0.2.0/24" or '
            f'"2001:db8::/32" (got {_show(value)})'
        ) from None
    raise _Invalid(f'has host bits set (got {_show(value)}; did you mean "{loose}"?)')


def _networks(value: object) -> tuple[Network, ...]:
    return tuple(dict.fromkeys(_each(value, "CIDR networks", _network)))


def _host_problem(host: str) -> str | None:
    """Why ``host`` (brackets removed) is neither an IP address nor a host name, or None."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{_show(host)} is not an IPv6 address"
        return None
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return None
    problem = _domain_problem(host)
    return f"host {_show(host)} {problem}" if problem else None


def _split_hostport(text: str, default_port: int | None) -> tuple[str, int]:
    """``parse_hostport`` raising _Invalid; the message names ``text``."""
    form = 'HOST:PORT, such as "127.0.0.1:2525", "[::1]:2525" or "mx.example:25"'
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\[\]]*)\](?::([^:]*))?", text)
        if match is None:
            raise _Invalid(f"is not {form} (got {_show(text)})")
        host, port_text = match.group(1), match.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(
                f"{_show(host)} in brackets is not an IPv6 address (got {_show(text)})"
            ) from None
    else:
        host, colon, port_text_or_empty = text.rpartition(":")
        if not colon:
            host, port_text = text, None
        elif ":" in host:
            raise _Invalid(f'an IPv6 address needs brackets, as in "[::1]:25" (got {_show(text)})')
        else:
            port_text = port_text_or_empty
        problem = _host_problem(host)
        if problem:
            raise _Invalid(f"{problem} (got {_show(text)})")
    if port_text is None:
        if default_port is None:
            raise _Invalid(f"needs a port: {form} (got {_show(text)})")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise _Invalid(f"port must be a number from 0 to 65535 (got {_show(text)})")
    return host, int(port_text)


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """(host, port) from "127.0.0.1:2525", "[::1]:2525" or "mx.example:25".

    IPv6 addresses must be in brackets; the host is returned without them.  Without a port,
    ``default_port`` is used, or ConfigError if it is None.  Port 0 is accepted (a listen
    address with port 0 binds an ephemeral port); destinations in the configuration refuse
    it.  ConfigError for anything else.
    """
    if not isinstance(text, str):
        raise ConfigError(f"not HOST:PORT text (got {_show(text)})")
    try:
        return _split_hostport(text, default_port)
    except _Invalid as err:
        raise ConfigError(str(err)) from None


def _listen(value: object) -> tuple[tuple[str, int], ...]:
    addresses = _each(value, '"HOST:PORT" strings', lambda t: _split_hostport(t, None))
    if not addresses:
        raise _Invalid('must list at least one "HOST:PORT" address')
    return addresses


def _destination(default_port: int) -> Callable[[object], tuple[str, int]]:
    def check(value: object) -> tuple[str, int]:
        if not isinstance(value, str):
            raise _Invalid(f'must be a "HOST:PORT" string (got {_show(value)})')
        host, port = _split_hostport(value, default_port)
        if port == 0:
            raise _Invalid(f"port must be from 1 to 65535 (got {_show(value)})")
        return host, port

    return check


def _nameserver(value: object) -> tuple[str, int]:
    host, port = _destination(53)(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(
            f"must be the IP address of a nameserver, optionally with a port, "
            f'such as "127.0.0.1:53" or "[::1]:53" (got {_show(value)})'
        ) from None
    return host, port


# --- other values

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _connector_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _Invalid(
            "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (got {_show(value)})"
        )
    return value


_MECHANISMS: Final = ("PLAIN", "LOGIN")


def _mechanism(value: str) -> str:
    if value.upper() not in _MECHANISMS:
        raise _Invalid(f'must be "PLAIN" or "LOGIN" (got {_show(value)})')
    return value.upper()


def _mechanisms(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_each(value, "SASL mechanism names", _mechanism)))


def _greeting(value: object) -> str:
    # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with "220 " and CRLF; replies
    # are ASCII, and a CR or LF here would split the reply (DESIGN.md wire rules).
    if not isinstance(value, str):
        raise _Invalid(f"must be a string (got {_show(value)})")
    if not all(" " <= c <= "~" for c in value):
        raise _Invalid(f"must be printable ASCII on one line (got {_show(value)})")
    if len(value) > 506:
        raise _Invalid(f"must be at most 506 characters to fit one reply line (got {len(value)})")
    return value


def _users(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table of user = password hash (got {_show(value)})")
    bad: list[tuple[_Loc, str]] = []
    for user, hashed in value.items():
        if not user or not all(" " < c != "\x7f" for c in user):
            bad.append(
                ((user,), "a user name must be non-empty, without spaces or control characters")
            )
        # Never echo the value: an operator who put a plain password here must not see it
        # copied into logs.
        elif not isinstance(hashed, str) or not hashed.startswith("scrypt$"):
            bad.append(
                (
                    (user,),
                    "must be a password hash made by hash_password "
                    '("scrypt$..."), never a plain password',
                )
            )
    if bad:
        raise _Invalid.many(bad)
    return MappingProxyType(dict(value))


def _plain_path(value: object) -> Path:
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _Invalid(f"must be a non-empty path string (got {_show(value)})")
    return Path(value).expanduser()


def _path(value: object, info: ValidationInfo) -> Path:
    """A path from the file: a relative one is taken from the file's directory."""
    path = _plain_path(value)
    base = cast(dict[str, Any], info.context or {}).get("base")
    return base / path if base is not None and not path.is_absolute() else path


def _existing_file(value: object, info: ValidationInfo) -> Path:
    path = _path(value, info)
    if not path.exists():
        raise _Invalid(f"file not found: {path}")
    if not path.is_file():
        raise _Invalid(f"is not a regular file: {path}")
    return path


# --- send connectors and local domains


def _address_space(value: str) -> str:
    return "*" if value == "*" else _domain_pattern(value)


def _address_spaces(value: object) -> tuple[str, ...]:
    spaces = tuple(dict.fromkeys(_each(value, "address spaces", _address_space)))
    if not spaces:
        raise _Invalid('must list at least one address space ("example.com", "*.example.com", "*")')
    return spaces


def _smarthosts(value: object) -> tuple[tuple[str, int], ...]:
    return tuple(dict.fromkeys(_each(value, '"HOST:PORT" strings', _destination(25))))


def _auth_user(value: object) -> str:
    if not isinstance(value, str) or not value or not all(" " <= c != "\x7f" for c in value):
        raise _Invalid(
            f"must be a non-empty string without control characters (got {_show(value)})"
        )
    return value


def _secret(value: object) -> str:
    # Never echo the value: it is a password.
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _Invalid("must be a non-empty string without NUL (the value is not shown)")
    return value


def _template(value: object, info: ValidationInfo) -> str:
    """A Maildir path template: {domain} and {local} only; relative to the file's directory."""
    path = _path(value, info)
    text = str(path)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        raise _Invalid(f"is not a valid template: {err} (got {_show(value)})") from None
    unknown = [f for f in fields if f not in ("domain", "local")]
    if unknown:
        raise _Invalid(
            f"may only use {{domain}} and {{local}}, not {{{unknown[0]}}} (got {_show(value)})"
        )
    return text


def _lmtp_server(value: object) -> tuple[str, int]:
    # RFC 2033 §5: LMTP must not be offered on port 25 and has no port of its own, so the
    # port is always written out.
    if not isinstance(value, str):
        raise _Invalid(f'must be a "HOST:PORT" string (got {_show(value)})')
    host, port = _split_hostport(value, None)
    if port == 0:
        raise _Invalid(f"port must be from 1 to 65535 (got {_show(value)})")
    return host, port


# --- the models (private: pydantic stays inside this module) --------------------------------
#
# Every field is optional and None by default: TOML has no null, so None means "not in the
# file", and only the fields the file sets are passed on to the dataclasses, whose defaults
# are the only defaults.


def _v(check: Callable[..., Any]) -> PlainValidator:
    return PlainValidator(check)


_PosInt = Annotated[int, _v(_positive_int)]
_Seconds = Annotated[float, _v(_seconds)]
_SecondsOrOff = Annotated[float, _v(_zero_or_more("seconds"))]
_RateOrOff = Annotated[float, _v(_zero_or_more("messages per second"))]
_Bool = Annotated[bool, _v(_bool)]
_Networks = Annotated[tuple[Network, ...], _v(_networks)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    def given(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class _QueueModel(_Model):
    durability: Annotated[Literal["fsync", "os"], _v(_choice("fsync", "os"))] | None = None
    map_size: Annotated[int, _v(_positive_size)] | None = None
    max_map_size: Annotated[int, _v(_positive_size)] | None = None
    min_free_disk: Annotated[int, _v(_size)] | None = None
    max_pending: _PosInt | None = None
    batch_limit: _PosInt | None = None

    @model_validator(mode="after")
    def _map_fits(self) -> _QueueModel:
        built = QueueConfig(**self.given())
        if built.map_size > built.max_map_size:
            raise _Invalid(
                f"must not be larger than queue.max_map_size ({built.map_size} > "
                f"{built.max_map_size})",
                ("map_size",),
            )
        return self


_TLS_MODES: Final = ("off", "starttls", "required", "implicit")


class _ReceiveModel(_Model):
    name: Annotated[str, _v(_connector_name)] | None = None
    listen: Annotated[tuple[tuple[str, int], ...], _v(_listen)] | None = None
    remote_ranges: _Networks | None = None
    tls: Annotated[str, _v(_choice(*_TLS_MODES))] | None = None
    cert_file: Annotated[Path, _v(_existing_file)] | None = None
    key_file: Annotated[Path, _v(_existing_file)] | None = None
    auth_mechanisms: Annotated[tuple[str, ...], _v(_mechanisms)] | None = None
    allow_plaintext_auth: _Bool | None = None
    relay_networks: _Networks | None = None
    relay_authenticated: _Bool | None = None
    max_message_size: Annotated[int, _v(_positive_size)] | None = None
    max_recipients: _PosInt | None = None
    max_messages_per_connection: _PosInt | None = None
    max_connections: _PosInt | None = None
    max_connections_per_ip: _PosInt | None = None
    max_errors: _PosInt | None = None
    idle_timeout: _Seconds | None = None
    data_timeout: _Seconds | None = None
    min_data_rate: Annotated[int, _v(_int_or_off)] | None = None
    data_rate_grace: _SecondsOrOff | None = None
    greet_delay: _SecondsOrOff | None = None
    max_auth_failures: _PosInt | None = None
    max_received_headers: _PosInt | None = None
    bare_eol: Annotated[str, _v(_choice("reject", "normalize"))] | None = None
    protocol_log: _Bool | None = None
    greeting: Annotated[str, _v(_greeting)] | None = None
    max_command_line: Annotated[int, _v(_int_at_least(512, "RFC 5321 §4.5.3.1.4"))] | None = None
    max_text_line: Annotated[int, _v(_int_at_least(1000, "RFC 5321 §4.5.3.1.6"))] | None = None
    strict_pipelining: _Bool | None = None
    require_auth: _Bool | None = None
    long_lines: Annotated[str, _v(_choice("wrap", "reject"))] | None = None

    @model_validator(mode="after")
    def _tls_has_cert(self) -> _ReceiveModel:
        if self.remote_ranges is not None and not self.remote_ranges:
            raise _Invalid(
                "must not be empty (every client would be refused; use "
                '["0.0.0.0/0", "::/0"] for everyone)',
                ("remote_ranges",),
            )
        if self.tls not in (None, "off"):
            missing = [
                ((key,), f'is required when tls = "{self.tls}"')
                for key in ("cert_file", "key_file")
                if getattr(self, key) is None
            ]
            if missing:
                raise _Invalid.many(missing)
        return self


class _DomainLimitsModel(_Model):
    max_connections: _PosInt | None = None
    max_rate: _RateOrOff | None = None


class _DeliveryModel(_Model):
    smarthost: Annotated[tuple[str, int], _v(_destination(25))] | None = None
    dns: Annotated[tuple[str, int], _v(_nameserver)] | None = None
    dns_max_queries: _PosInt | None = None
    ca_file: Annotated[Path, _v(_existing_file)] | None = None
    mx_port: Annotated[int, _v(_port)] | None = None
    max_per_domain: _PosInt | None = None
    max_rate: _RateOrOff | None = None
    max_messages_per_connection: _PosInt | None = None
    pipeline_messages: _Bool | None = None
    max_recipients_per_transaction: _PosInt | None = None
    retry_interval: _Seconds | None = None
    max_retry_interval: _Seconds | None = None
    max_queue_lifetime: _Seconds | None = None
    down_period: _Seconds | None = None
    window: _PosInt | None = None
    paused: _Bool | None = None
    delay_notice_after: _SecondsOrOff | None = None
    domains: dict[str, _DomainLimitsModel] | None = None

    @model_validator(mode="after")
    def _notice_before_expiry(self) -> _DeliveryModel:
        after = self.delay_notice_after
        lifetime = self.max_queue_lifetime or DeliveryConfig.max_queue_lifetime
        if after and after >= lifetime:
            raise _Invalid(
                f"must be shorter than delivery.max_queue_lifetime ({_as_written(after)} >= "
                f"{_as_written(lifetime)}): the message would fail before its delay notice; "
                "0 turns notices off",
                ("delay_notice_after",),
            )
        return self


_SEND_TLS: Final = ("off", "opportunistic", "required", "verify")


class _SendModel(_Model):
    name: Annotated[str, _v(_connector_name)] | None = None
    address_spaces: Annotated[tuple[str, ...], _v(_address_spaces)] | None = None
    cost: _PosInt | None = None
    smarthosts: Annotated[tuple[tuple[str, int], ...], _v(_smarthosts)] | None = None
    tls: Annotated[str, _v(_choice(*_SEND_TLS))] | None = None
    auth_user: Annotated[str, _v(_auth_user)] | None = None
    auth_password: Annotated[str, _v(_secret)] | None = None
    allow_plaintext_auth: _Bool | None = None
    protocol: Annotated[str, _v(_choice("smtp", "lmtp"))] | None = None
    port: Annotated[int, _v(_port)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _SendModel:
        bad: list[tuple[_Loc, str]] = [
            ((key,), "is required in a [[send]] connector")
            for key in ("name", "address_spaces")
            if getattr(self, key) is None
        ]
        if (self.auth_user is None) != (self.auth_password is None):
            have, need = (
                ("auth_user", "auth_password")
                if self.auth_password is None
                else ("auth_password", "auth_user")
            )
            bad.append(((need,), f"is required when {have} is set (both or neither)"))
        if self.auth_user is not None and not self.smarthosts:
            bad.append(
                (("auth_user",), "AUTH is only sent to smarthosts, and this connector has none")
            )
        if self.auth_user is not None and self.tls == "off" and not self.allow_plaintext_auth:
            # RFC 4954 §4: a password over a connection without TLS is readable by anyone
            # on the path; the operator has to ask for that explicitly.
            bad.append(
                (
                    ("tls",),
                    'is "off" but AUTH is configured: the password would be sent in clear '
                    "(set allow_plaintext_auth = true to allow it)",
                )
            )
        if self.port is not None and self.smarthosts:
            bad.append((("port",), "applies to MX hosts only; give smarthost ports in smarthosts"))
        if bad:
            raise _Invalid.many(bad)
        return self


class _LocalModel(_Model):
    domains: Annotated[tuple[str, ...], _v(_domains)] | None = None
    maildir: Annotated[str, _v(_template)] | None = None
    lmtp: Annotated[tuple[str, int], _v(_lmtp_server)] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> _LocalModel:
        bad: list[tuple[_Loc, str]] = []
        if not self.domains:
            bad.append((("domains",), "must list at least one domain"))
        if (self.maildir is None) == (self.lmtp is None):
            bad.append(
                (
                    ("maildir",),
                    'needs exactly one of maildir = "/path/{domain}/{local}" and '
                    'lmtp = "HOST:PORT"',
                )
            )
        if bad:
            raise _Invalid.many(bad)
        return self


class _LogModel(_Model):
    level: Annotated[str, _v(_choice("debug", "info", "warning", "error"))] | None = None
    protocol_log_dir: Annotated[Path, _v(_path)] | None = None


class _ConfigModel(_Model):
    hostname: Annotated[str, _v(_hostname)] | None = None
    spool: Annotated[Path, _v(_path)] | None = None
    accepted_domains: Annotated[tuple[str, ...], _v(_domains)] | None = None
    postmaster: Annotated[str, _v(_mailbox)] | None = None
    users: Annotated[Mapping[str, str], _v(_users)] | None = None
    queue: _QueueModel | None = None
    receive: list[_ReceiveModel] | None = None
    delivery: _DeliveryModel | None = None
    log: _LogModel | None = None
    send: list[_SendModel] | None = None
    local: list[_LocalModel] | None = None

    @model_validator(mode="after")
    def _has_connector(self) -> _ConfigModel:
        if self.receive is not None and not self.receive:
            raise _Invalid("needs at least one [[receive]] connector", ("receive",))
        return self

    def build(self) -> Config:
        given = self.given()
        if "delivery" in given:
            delivery = given["delivery"].given()
            if "domains" in delivery:
                delivery["domains"] = {
                    name.lower().rstrip("."): DomainLimits(**limits.given())
                    for name, limits in delivery["domains"].items()
                }
            given["delivery"] = DeliveryConfig(**delivery)
        for key, model in (("queue", QueueConfig), ("log", LogConfig)):
            if key in given:
                given[key] = model(**given[key].given())
        if "receive" in given:
            given["receive"] = tuple(ReceiveConfig(**r.given()) for r in given["receive"])
        if "send" in given:
            given["send"] = tuple(SendConfig(**m.given()) for m in given["send"])
        if "local" in given:
            given["local"] = tuple(LocalConfig(**m.given()) for m in given["local"])
        return Config(**given)


_TABLES: Final[dict[str, type[_Model]]] = {
    "": _ConfigModel, "queue": _QueueModel, "receive": _ReceiveModel,
    "delivery": _DeliveryModel, "log": _LogModel, "send": _SendModel, "local": _LocalModel,
    "delivery.domains": _DomainLimitsModel,
}  # fmt: skip

# --- error messages ------------------------------------------------------------------------


def _dotted(loc: _Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            quoted = json.dumps(part, ensure_ascii=False)
            out += f".{quoted}" if out else quoted
    return out


def _unknown_key(loc: _Loc) -> str:
    """ "unknown key 'receive[0].max_mesage_size' (did you mean ...?)" for a key no model has."""
    parent, key = loc[:-1], str(loc[-1])
    # A table inside a table of named entries ([delivery.domains."x"]) has its own model.
    table = f"{parent[0]}.{parent[1]}" if len(parent) == 3 else str(parent[0]) if parent else ""
    model = _TABLES.get(table, _ConfigModel)
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    hint = f" (did you mean '{_dotted((*parent, close[0]))}'?)" if close else ""
    return f"unknown key '{_dotted(loc)}'{hint}"


_ARRAYS_OF_TABLES: Final = (("receive",), ("send",), ("local",))


def _messages(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in error.errors():
        loc = err["loc"]
        kind = err["type"]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _Invalid):
            lines.extend(f"{_dotted((*loc, *at))}: {msg}" for at, msg in cause.problems)
            continue
        got = _show(err.get("input"))
        if kind == "extra_forbidden":
            lines.append(_unknown_key(loc))
        elif kind in ("list_type", "tuple_type") and loc in _ARRAYS_OF_TABLES:
            table = loc[0]
            lines.append(
                f"{table}: must be an array of tables: write [[{table}]], not [{table}] (got {got})"
            )
        elif kind in ("list_type", "tuple_type"):
            lines.append(f"{_dotted(loc)}: must be an array (got {got})")
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            lines.append(f"{_dotted(loc)}: must be a table (got {got})")
        else:  # pragma: no cover - every field has a checker; kept for safety
            lines.append(f"{_dotted(loc)}: {err['msg']} (got {got})")
    return lines


# --- loading ------------------------------------------------------------------------------


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {name}") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file is a directory: {name}") from None
    except OSError as err:
        raise ConfigError(f"cannot read configuration file {name}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{name}: not valid UTF-8 at byte {err.start} (TOML files are UTF-8)"
        ) from None
    except tomllib.TOMLDecodeError as err:
        # The message already ends with "(at line L, column C)".
        raise ConfigError(f"{name}: invalid TOML: {err}") from None


def _override(problems: list[str], name: str, value: Any, check: Callable[[Any], _R]) -> _R:
    """``check(value)``, or record its problems under "overrides.<name>" and return value."""
    try:
        return check(value)
    except _Invalid as err:
        problems.extend(f"{_dotted(('overrides', name, *at))}: {msg}" for at, msg in err.problems)
        return cast(_R, value)


def _listen_pair(pair: object) -> tuple[str, int]:
    if not (
        isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and _is_int(pair[1])
    ):
        raise _Invalid(f"must be a (host, port) pair (got {pair!r})")
    host, port = pair
    problem = _host_problem(host)
    if problem:
        raise _Invalid(problem)
    if not 0 <= port <= 65535:
        raise _Invalid(f"port must be from 0 to 65535 (got {port})")
    return host, port


def _destination_pair(pair: object) -> tuple[str, int]:
    host, port = _listen_pair(pair)
    if port == 0:
        raise _Invalid("port must be from 1 to 65535 (got 0)")
    return host, port


def _nameserver_pair(pair: object) -> tuple[str, int]:
    host, port = _destination_pair(pair)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid(f"must be the IP address of a nameserver (got {_show(host)})") from None
    return host, port


def _pairs(value: object) -> tuple[tuple[str, int], ...]:
    bad: list[tuple[_Loc, str]] = []
    out: list[tuple[str, int]] = []
    for i, pair in enumerate(cast(Sequence[object], value)):
        try:
            out.append(_listen_pair(pair))
        except _Invalid as err:
            bad.append(((i,), str(err)))
    if bad:
        raise _Invalid.many(bad)
    return tuple(out)


def _apply(config: Config, ov: Overrides) -> tuple[Config, list[str]]:
    """The configuration with the overrides applied, and the overrides' problems."""
    problems: list[str] = []
    top: dict[str, Any] = {}
    delivery: dict[str, Any] = {}
    first: dict[str, Any] = {}
    if ov.hostname is not None:
        top["hostname"] = _override(problems, "hostname", ov.hostname, _hostname)
    if ov.spool is not None:
        top["spool"] = _override(problems, "spool", ov.spool, _plain_path)
    if ov.accept_domains:
        added = _override(problems, "accept_domains", list(ov.accept_domains), _domains)
        top["accepted_domains"] = tuple(dict.fromkeys((*config.accepted_domains, *added)))
    if ov.listen:
        first["listen"] = _override(problems, "listen", ov.listen, _pairs)
    if ov.relay_from:
        first["relay_networks"] = _override(problems, "relay_from", list(ov.relay_from), _networks)
    if ov.smarthost is not None:
        delivery["smarthost"] = _override(problems, "smarthost", ov.smarthost, _destination_pair)
    if ov.dns is not None:
        delivery["dns"] = _override(problems, "dns", ov.dns, _nameserver_pair)
    if ov.mx_port is not None:
        delivery["mx_port"] = _override(problems, "mx_port", ov.mx_port, _port)
    if ov.max_per_domain is not None:
        delivery["max_per_domain"] = _override(
            problems, "max_per_domain", ov.max_per_domain, _positive_int
        )
    if ov.retry_interval is not None:
        delivery["retry_interval"] = _override(
            problems, "retry_interval", ov.retry_interval, _seconds
        )
    if problems:
        return config, problems
    receive = config.receive
    if first:
        receive = (dataclasses.replace(receive[0], **first), *receive[1:])
    config = dataclasses.replace(
        config,
        **top,
        receive=receive,
        delivery=dataclasses.replace(config.delivery, **delivery),
    )
    return config, problems


def _collide(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """True when binding both addresses must fail (same port; same host or a wildcard).

    A wildcard bind takes the port on every address of its family, so "0.0.0.0:25" and
    "127.0.0.1:25" cannot both be bound.  Port 0 (ephemeral) never collides.
    """
    (host_a, port_a), (host_b, port_b) = a, b
    if port_a != port_b or port_a == 0:
        return False
    if host_a == host_b:
        return True
    same_family = (":" in host_a) == (":" in host_b)
    return same_family and bool({host_a, host_b} & {"0.0.0.0", "::"})


def _cross_checks(config: Config) -> list[str]:
    """Problems between connectors, checked after the overrides are applied."""
    problems: list[str] = []
    names: dict[str, int] = {}
    bound: list[tuple[tuple[str, int], str]] = []
    for i, rc in enumerate(config.receive):
        if rc.name in names:
            problems.append(
                f"receive[{i}].name: {_show(rc.name)} is already the name of "
                f"receive[{names[rc.name]}] (names must be unique)"
            )
        names.setdefault(rc.name, i)
        for j, address in enumerate(rc.listen):
            here = f"receive[{i}].listen[{j}]"
            for other, where in bound:
                if _collide(address, other):
                    host, port = address
                    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    problems.append(f"{here}: {shown} collides with {where}")
                    break
            bound.append((address, here))
    return problems + _routing_checks(config)


#: Names of the send connectors that engine.routing makes up: for delivery.smarthost, and
#: the DNS MX connector used when there is no [[send]] at all ("" for plain MX delivery).
IMPLICIT_SMARTHOST: Final = "delivery.smarthost"


def _routing_checks(config: Config) -> list[str]:
    """Send connector names are unique and not reserved; a local domain is listed once."""
    problems: list[str] = []
    names: dict[str, int] = {}
    for i, sc in enumerate(config.send):
        if sc.name == IMPLICIT_SMARTHOST:
            problems.append(
                f"send[{i}].name: {_show(sc.name)} is reserved for the connector that "
                "delivery.smarthost makes"
            )
        elif sc.name in names:
            problems.append(
                f"send[{i}].name: {_show(sc.name)} is already the name of "
                f"send[{names[sc.name]}] (names must be unique)"
            )
        names.setdefault(sc.name, i)
    seen: dict[str, str] = {}
    for i, lc in enumerate(config.local):
        for j, domain in enumerate(lc.domains):
            here = f"local[{i}].domains[{j}]"
            if domain in seen:
                problems.append(f"{here}: {_show(domain)} is already listed at {seen[domain]}")
            seen.setdefault(domain, here)
    return problems


def load_config(path: str | os.PathLike[str] | None, overrides: Overrides | None = None) -> Config:
    """Read, validate and return the configuration; ConfigError lists every problem.

    ``path=None`` loads :data:`DEFAULT_TOML`.  ``overrides`` (from ``ferry serve`` flags)
    win over the file.  ``log.protocol_log_dir`` is filled in (``spool / "log"``) when the
    file leaves it out, after the overrides, so it follows an overridden spool.
    """
    if path is None:
        raw = tomllib.loads(DEFAULT_TOML)
        base: Path | None = None
    else:
        raw = _read(path)
        base = Path(os.fspath(path)).absolute().parent
    try:
        model = _ConfigModel.model_validate(raw, context={"base": base})
    except ValidationError as err:
        raise ConfigError(_messages(err)) from None
    config = model.build()
    if overrides is not None:
        config, problems = _apply(config, overrides)
        if problems:
            raise ConfigError(problems)
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(problems)
    if config.log.protocol_log_dir is None:
        log = dataclasses.replace(config.log, protocol_log_dir=config.spool / "log")
        config = dataclasses.replace(config, log=log)
    return config

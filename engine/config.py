"""The configuration: read the TOML file, merge the command-line flags, validate every key,
hand out frozen dataclasses.

This module owns the configuration's shape, its defaults and its error messages.  Each key
is declared exactly once, as a field of one of the frozen dataclasses below: its type
(with the checker that validates it, ``Annotated[..., _v(check)]``), its default and its
comment.  The file is read with stdlib ``tomllib``, the ``ferry serve`` flags are merged
into that raw table (:data:`FLAGS`), and pydantic's ``TypeAdapter`` validates the result
straight into the dataclasses (unknown keys are errors, types are strict: every field has
its own checker, so ``"25"`` is not a port and ``true`` is not a number).  Components are
handed these dataclasses themselves (``ReceiveConfig`` to a receive connector,
``DeliveryConfig`` to the scheduler, ...), never hand copies of their fields.  No other
module imports pydantic.

Every problem becomes one line of :class:`ConfigError` that starts with the dotted path of
the offending key (``receive[0].max_message_size: must be a positive integer (got -5)``),
and names the flag when a flag set it (``delivery.mx_port (--mx-port): ...``); all problems
found are listed at once, so an operator fixes the file in one pass.  Values that the file
could hold as secrets (password hashes, AUTH passwords) are never echoed in a message.

Relative paths in a file are taken relative to the directory of that file, so the same file
works whatever the working directory; paths of the embedded default and of flags are
relative to the working directory.

To add a key: add one field to its dataclass (its type annotated with a checker from the
"value checkers" section or a new one, its default, a comment that says why), add its row
to its section's table in docs/configuration.md, and read it where it takes effect (the
component is handed the dataclass: a [[receive]] key is ``SmtpSession.config.<key>``, a
[delivery] key ``Scheduler.settings.<key>``).  A check of several keys of one table goes
in that table's ``_check_*`` function, one across tables in :func:`_check_config`.  A new
table is a dataclass, a field of its parent and a row of :data:`TABLES`; a new flag is an
argparse line (engine.cli.common.add_key_flags) and a row of :data:`FLAGS`.
``tests/integration/test_config_seam.py`` fails until the key is documented and read.

It must never open sockets, create the spool, start anything or import the engine's other
parts: loading a configuration has no effect besides reading the file (and checking that
certificate files exist).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import itertools
import json
import math
import os
import re
import socket
import string
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, cast

from pydantic import (
    AfterValidator,
    ConfigDict,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)

__all__ = [
    "ALERT_METRICS",
    "BOUNCE_CATEGORIES",
    "DEFAULT_TOML",
    "FLAGS",
    "IMPLICIT_SMARTHOST",
    "TABLES",
    "AlertConfig",
    "AlertsConfig",
    "AutomationRule",
    "BounceRuleConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DkimSignConfig",
    "DomainLimits",
    "EgressConfig",
    "EgressPool",
    "EgressSource",
    "HttpConfig",
    "HttpToken",
    "LocalConfig",
    "LogConfig",
    "Network",
    "QueueConfig",
    "ReceiveConfig",
    "SendConfig",
    "ServerConfig",
    "ShapingConfig",
    "ShapingRule",
    "SuppressionConfig",
    "TrackingConfig",
    "WebhookConfig",
    "default_hostname",
    "dotted_key",
    "load_config",
    "name_flags",
    "parse_hostport",
    "parse_shaping",
    "parse_size",
    "tracking_dir",
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


# --- value checkers ------------------------------------------------------------------------
#
# Each checker takes a value as TOML produced it and returns the converted value, or raises
# _Invalid.  The dataclass fields name them through _v() (pydantic's PlainValidator), so
# pydantic's own coercion never runs.  _Invalid may carry several problems, each at a path
# below the key checked (a list index, a user name), so that every bad element of an array
# is reported.
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


def _finite(value: object) -> float | None:
    """The value as a float when TOML gave a finite number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


#: A duration's units, as sizes have theirs: "30s", "5m", "4h", "5d", "1w", or several
#: of them in a row ("1h30m"); a plain number is seconds.
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_SPAN_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_USAGE: Final = 'or a duration such as "30s", "5m", "4h", "5d"'


def _duration(value: object) -> float | None:
    """Seconds from a TOML number or a duration string ("5m", "1h30m"), else None."""
    number = _finite(value)
    if number is not None or not isinstance(value, str):
        return number
    text = value.replace(" ", "").lower()
    parts = _SPAN.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    if len(parts) > 1 and not all(u for _, u in parts):
        return None  # "1h30" is ambiguous: 30 what?
    return float(sum(Decimal(n) * _SPAN_UNITS[u] for n, u in parts))


def _seconds(value: object) -> float:
    number = _duration(value)
    if number is None or number <= 0:
        raise _Invalid(f"must be a positive number of seconds {_DURATION_USAGE} "
                       f"(got {_show(value)})")
    return number


def _zero_or_more(unit: str) -> Callable[[object], float]:
    def check(value: object) -> float:
        number = _finite(value)
        if number is None or number < 0:
            raise _Invalid(f"must be a number of {unit}, 0 or more (got {_show(value)})")
        return number

    return check


def _seconds_or_off(value: object) -> float:
    number = _duration(value)
    if number is None or number < 0:
        raise _Invalid(f"must be a number of seconds, 0 or more, {_DURATION_USAGE} "
                       f"(got {_show(value)})")
    return number


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


def _listen_or_none(value: object) -> tuple[tuple[str, int], ...]:
    if value == [] or value == ():
        return ()
    return _listen(value)


def _token_names(tokens: Mapping[str, _R]) -> Mapping[str, _R]:
    # A token's name is who acted in logs and events: the rules of connector names.
    for name in tokens:
        _connector_name(name)
    return tokens


def _destination(default_port: int | None) -> Callable[[object], tuple[str, int]]:
    """A destination's checker; ``default_port`` None: the port must be written out."""
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
                    "must be a password hash made by `ferry passwd` "
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


# RFC 2033 §5: LMTP must not be offered on port 25 and has no port of its own, so the
# port is always written out.
_lmtp_server = _destination(None)


def _remote_ranges(value: object) -> tuple[Network, ...]:
    ranges = _networks(value)
    if not ranges:
        raise _Invalid(
            'must not be empty (every client would be refused; use ["0.0.0.0/0", "::/0"] '
            "for everyone)"
        )
    return ranges


# --- how a field names its checker ---------------------------------------------------------


def _v(check: Callable[..., Any]) -> PlainValidator:
    """The field's checker (it gets the value as TOML produced it)."""
    return PlainValidator(check)


def _after(check: Callable[[Any], list[tuple[_Loc, str]]]) -> AfterValidator:
    """A check of a whole table once each of its keys is valid: ``check`` lists problems
    as (path below the table, message)."""

    def run(value: _R) -> _R:
        bad = check(value)
        if bad:
            raise _Invalid.many(bad)
        return value

    return AfterValidator(run)


_PosInt = Annotated[int, _v(_positive_int)]
_Size = Annotated[int, _v(_positive_size)]
_Seconds = Annotated[float, _v(_seconds)]
_SecondsOrOff = Annotated[float, _v(_seconds_or_off)]
_RateOrOff = Annotated[float, _v(_zero_or_more("messages per second"))]
_Bool = Annotated[bool, _v(_bool)]
_Networks = Annotated[tuple[Network, ...], _v(_networks)]
_HostPort = tuple[str, int]

#: Unknown keys are errors (with a "did you mean"), in every table.
_TABLE: Final = ConfigDict(extra="forbid")


# --- the configuration: one declaration per key ------------------------------------------


@dataclass(frozen=True)
class QueueConfig:
    """[queue]: the LMDB queue database (``engine.queue.lmdb_store.LmdbQueue`` arguments)."""

    __pydantic_config__ = _TABLE

    #: "fsync": every commit is synced, acknowledged mail survives power loss;
    #: "os": the OS flushes, acknowledged mail survives a crash of the process only.
    durability: Annotated[Literal["fsync", "os"], _v(_choice("fsync", "os"))] = "fsync"
    map_size: _Size = 256 * MiB
    max_map_size: _Size = 64 * GiB
    #: Below this much free disk new mail gets a 4xx (back pressure); 0 = off.
    min_free_disk: Annotated[int, _v(_size)] = 512 * MiB
    max_pending: _PosInt = 10_000
    batch_limit: _PosInt = 2_000
    #: Under load, how long a commit smaller than the last one waits for more writes
    #: (engine.queue.writer_process._Grouping); 0 = commit at once.
    commit_linger: _SecondsOrOff = 0.005


def _check_queue(q: QueueConfig) -> list[tuple[_Loc, str]]:
    found: list[tuple[_Loc, str]] = []
    if q.map_size > q.max_map_size:
        found.append((("map_size",), f"must not be larger than queue.max_map_size "
                                     f"({q.map_size} > {q.max_map_size})"))
    if q.commit_linger > 1:
        # Every acknowledgement under load may wait this long: a second is already absurd.
        found.append((("commit_linger",), f"must be at most 1 second (got {q.commit_linger})"))
    return found


def _loopback() -> tuple[Network, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _everyone() -> tuple[Network, ...]:
    return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


_TLS_MODES: Final = ("off", "starttls", "required", "implicit")
_ReceiveTls: TypeAlias = Literal["off", "starttls", "required", "implicit"]


@dataclass(frozen=True)
class ReceiveConfig:
    """[[receive]]: one receive connector, where it listens, whom it serves, its limits."""

    __pydantic_config__ = _TABLE

    name: Annotated[str, _v(_connector_name)] = "default"
    #: (host, port) pairs; port 0 binds an ephemeral port (tests).
    listen: Annotated[tuple[_HostPort, ...], _v(_listen)] = (("127.0.0.1", 2525),)
    #: Clients outside these networks are refused at connect.
    remote_ranges: Annotated[tuple[Network, ...], _v(_remote_ranges)] = field(
        default_factory=_everyone)
    #: "starttls" offers STARTTLS (RFC 3207); "required" also refuses MAIL before it;
    #: "implicit" is TLS from the first byte (RFC 8314 §3, port 465).
    tls: Annotated[_ReceiveTls, _v(_choice(*_TLS_MODES))] = "off"
    cert_file: Annotated[Path, _v(_existing_file)] | None = None
    key_file: Annotated[Path, _v(_existing_file)] | None = None
    auth_mechanisms: Annotated[tuple[str, ...], _v(_mechanisms)] = ("PLAIN", "LOGIN")
    #: AUTH without TLS sends the password in clear (RFC 4954 §4 advises against it).
    allow_plaintext_auth: _Bool = False
    #: Clients in these networks may relay to any domain.
    relay_networks: _Networks = field(default_factory=_loopback)
    #: Authenticated clients may relay to any domain.
    relay_authenticated: _Bool = True
    max_message_size: _Size = 35 * MiB
    max_recipients: _PosInt = 1000
    max_messages_per_connection: _PosInt = 1000
    max_connections: _PosInt = 2000
    max_connections_per_ip: _PosInt = 100
    #: 4xx/5xx replies tolerated before 421 and close.
    max_errors: _PosInt = 20
    #: RFC 5321 §4.5.3.2.7: the server timeout is at least 5 minutes.
    idle_timeout: _Seconds = 300.0
    #: Seconds allowed for a whole message body.
    data_timeout: _Seconds = 600.0
    #: Bytes per second during DATA after ``data_rate_grace`` seconds; 0 = off.
    min_data_rate: Annotated[int, _v(_int_or_off)] = 1024
    data_rate_grace: _SecondsOrOff = 10.0
    #: Seconds to wait before the 220; a client that talks first gets 554 (an early
    #: talker is a spam engine that does not wait for the greeting).  0 = greet at once.
    greet_delay: _SecondsOrOff = 0.0
    max_auth_failures: _PosInt = 3
    #: RFC 5321 §6.3: a message with more Received headers than this is looping.
    max_received_headers: _PosInt = 100
    #: A bare CR or LF in DATA: "reject" (5xx) or "normalize" to CRLF (DESIGN.md wire rules).
    bare_eol: Annotated[Literal["reject", "normalize"], _v(_choice("reject", "normalize"))] = (
        "reject")
    protocol_log: _Bool = False
    #: Text of the 220 greeting; "" means "<hostname> ESMTP Ferry" (see :meth:`banner`).
    greeting: Annotated[str, _v(_greeting)] = ""
    #: RFC 5321 §4.5.3.1.4: a command line is at least 512 octets with its CRLF.
    max_command_line: Annotated[int, _v(_int_at_least(512, "RFC 5321 §4.5.3.1.4"))] = 512
    #: RFC 5321 §4.5.3.1.6: a text line is at least 1000 octets with its CRLF.
    max_text_line: Annotated[int, _v(_int_at_least(1000, "RFC 5321 §4.5.3.1.6"))] = 1000
    #: Refuse a group-ending command pipelined with more input (RFC 2920 §3.1).
    strict_pipelining: _Bool = True
    #: Refuse MAIL before a successful AUTH (a submission port, RFC 6409 §4.3: 530 5.7.0).
    require_auth: _Bool = False
    #: A line over 1,000 octets (RFC 5321 §4.5.3.1.6): "wrap" it with CRLF SPACE at
    #: ingest (Postfix's smtp_line_length_limit), or "reject" the message (554 5.6.0).
    long_lines: Annotated[Literal["wrap", "reject"], _v(_choice("wrap", "reject"))] = "wrap"
    #: Policy agents run for this connector's sessions, in this order, after relay control
    #: (engine.agents): built-in "ratelimit", "dnsbl", "verify", "rspamd", "clamav", or the
    #: name of an [agents.custom."NAME"] table.  Each is set up in its [agents.NAME] table.
    agents: Annotated[tuple[str, ...], _v(_agent_list)] = ()
    #: Mail authentication to check at the end of data (RFC 7208, 6376, 7489); the results
    #: go into one Authentication-Results field (RFC 8601).  Non-empty runs the "verify"
    #: agent: where it stands in ``agents``, else before every other end-of-data agent.
    verify: Annotated[tuple[str, ...], _v(_verify_methods)] = ()

    def banner(self, hostname: str) -> str:
        """The greeting text after "220 ": the configured one or "<hostname> ESMTP Ferry"."""
        return self.greeting or f"{hostname} ESMTP Ferry"


def _check_receive(rc: ReceiveConfig) -> list[tuple[_Loc, str]]:
    if rc.tls == "off":
        return []
    return [((key,), f'is required when tls = "{rc.tls}"')
            for key in ("cert_file", "key_file") if getattr(rc, key) is None]


def _check_connectors(receive: tuple[ReceiveConfig, ...]) -> list[tuple[_Loc, str]]:
    return [((), "needs at least one [[receive]] connector")] if not receive else []


@dataclass(frozen=True)
class DomainLimits:
    """[delivery.domains."example.com"]: limits for the site one destination domain
    resolves to; None keeps the [delivery] default."""

    __pydantic_config__ = _TABLE

    max_connections: _PosInt | None = None
    max_rate: _RateOrOff | None = None


def _tls_rpt_contact(value: object) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise _Invalid(f"must be a string on one line (got {_show(value)})")
    return value


def _tls_policy(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(f"must be a table of domain = level (got {_show(value)})")
    out: dict[str, str] = {}
    for name, level in value.items():
        domain = str(name).lower().rstrip(".")
        problem = _domain_problem(domain)
        if problem is not None:
            raise _Invalid(f"{_show(name)}: {problem}")
        if level not in _SEND_TLS:
            raise _Invalid(f"{_show(name)}: must be one of "
                           f"{', '.join(repr(m) for m in _SEND_TLS)} (got {_show(level)})")
        out[domain] = level
    return MappingProxyType(out)


def _domain_keys(domains: Mapping[str, DomainLimits]) -> dict[str, DomainLimits]:
    return {name.lower().rstrip("."): limits for name, limits in domains.items()}


@dataclass(frozen=True)
class DeliveryConfig:
    """[delivery]: outbound delivery, by DNS MX (default) or everything through a
    smarthost; the scheduler's settings (``engine.scheduler``) and the SMTP agents'."""

    __pydantic_config__ = _TABLE

    smarthost: Annotated[_HostPort, _v(_destination(25))] | None = None
    #: The nameserver to ask (host, port); None = the system resolver configuration.
    dns: Annotated[_HostPort, _v(_nameserver)] | None = None
    #: DNS queries in flight at once (a restart with mail for thousands of domains must
    #: not flood the resolver: a burst beyond its receive buffer is dropped, and each
    #: dropped query costs a timeout).
    dns_max_queries: _PosInt = 1000
    #: CA certificates (PEM) that ``tls = "verify"`` trusts; None: the system's store
    #: (Postfix's smtp_tls_CAfile): for a smarthost with a certificate from a private CA.
    ca_file: Annotated[Path, _v(_existing_file)] | None = None
    mx_port: Annotated[int, _v(_port)] = 25
    max_per_domain: _PosInt = 20
    #: Messages per second to one site (a destination's server set); 0 = no limit.
    max_rate: _RateOrOff = 0.0
    #: Messages over one outbound connection before it is closed.
    max_messages_per_connection: _PosInt = 100
    #: Send the next queued message's envelope behind the current body (RFC 2920 §3.1)
    #: to next hops that offer PIPELINING.
    pipeline_messages: _Bool = True
    #: Recipients of one message in one transaction (RFC 5321 §4.5.3.1.8: at least 100).
    max_recipients_per_transaction: _PosInt = 100
    #: The first retry delay; later ones double up to ``max_retry_interval``.
    retry_interval: _Seconds = 300.0
    max_retry_interval: _Seconds = 4 * 3600.0
    #: A message still queued this long after arrival fails with a DSN (RFC 5321 §4.5.4.1).
    max_queue_lifetime: _Seconds = 5 * 86400.0
    #: A site that accepted no connection is left alone this long.
    down_period: _Seconds = 60.0
    #: Due (message, destination) groups held in memory at once (the active window).
    window: _PosInt = 50_000
    #: Start with delivery paused (mail is accepted and queued only).
    paused: _Bool = False
    #: A message queued this long when a recipient is deferred gets one delay notice
    #: (RFC 3464 action "delayed") to its sender; 0 = off (Postfix's default too: bulk
    #: senders rarely want them).  Must be shorter than ``max_queue_lifetime``.
    delay_notice_after: _SecondsOrOff = 0.0
    #: Unexpected errors in a row while processing a message, or crashes in a row with it
    #: in flight, that move it to the poison state (left for the operator).
    poison_after: _PosInt = 2
    #: Per-domain overrides of max_per_domain / max_rate ([delivery.domains."gmail.com"]),
    #: keyed by the lower-case domain without a trailing dot.
    domains: Annotated[Mapping[str, DomainLimits], AfterValidator(_domain_keys)] = field(
        default_factory=dict)
    #: The send protocol log of the connections that no [[send]] connector makes: straight
    #: to DNS MX, or to ``smarthost`` (engine.client.smtp, engine.ops.protolog).
    protocol_log: _Bool = False
    #: Per-domain outbound TLS security levels (engine.tlspolicy), keyed by the lower-case
    #: destination domain: they win over the route's [[send]] ``tls`` (Postfix's
    #: smtp_tls_policy_maps).
    tls_policy: Annotated[Mapping[str, str], _v(_tls_policy)] = field(
        default_factory=lambda: MappingProxyType({}))
    #: Honour MTA-STS (RFC 8461) for delivery by DNS MX (KumoMTA's default too).
    mta_sts: _Bool = True
    #: Limits of one MTA-STS policy fetch (RFC 8461 §3.3 leaves them to the sender).
    mta_sts_fetch_timeout: _Seconds = 10.0
    mta_sts_max_policy_size: _Size = 64 * KiB
    #: Test labs only: the port of the MTA-STS policy hosts (RFC 8461 §3.3 says 443).
    mta_sts_port: Annotated[int, _v(_port)] = 443
    #: The resolver (``dns``, or the system's) validates DNSSEC: its AD bit is trusted,
    #: and DANE (RFC 7672) applies to MX delivery.  Never set it for a resolver across an
    #: untrusted network (RFC 6698 §1.3 / RFC 7672 §2.1.1).
    dnssec_validating: _Bool = False
    #: A failed TLS handshake with a host is remembered this long: where the level allows
    #: clear text it is not tried again meanwhile (Postfix's TLS failure cache); 0 = off.
    tls_failure_memory: _SecondsOrOff = 600.0
    #: Send TLS-RPT (RFC 8460) aggregate reports to the domains whose MTA-STS or DANE
    #: policy applied, every ``tls_rpt_interval`` (RFC 8460 §4.1 suggests a day).
    tls_rpt: _Bool = False
    tls_rpt_interval: _Seconds = 86400.0
    #: The report's "contact-info" (RFC 8460 §4.4); "" = postmaster@<hostname>.
    tls_rpt_contact: Annotated[str, _v(_tls_rpt_contact)] = ""


def _check_delivery(d: DeliveryConfig) -> list[tuple[_Loc, str]]:
    after, lifetime = d.delay_notice_after, d.max_queue_lifetime
    if after and after >= lifetime:
        return [(("delay_notice_after",),
                 f"must be shorter than delivery.max_queue_lifetime ({_as_written(after)} >= "
                 f"{_as_written(lifetime)}): the message would fail before its delay notice; "
                 "0 turns notices off")]
    return []


_SEND_TLS: Final = ("off", "opportunistic", "required", "verify", "none", "may", "encrypt",
                    "dane", "dane-only")
SendTls: TypeAlias = Literal["off", "opportunistic", "required", "verify", "none", "may",
                             "encrypt", "dane", "dane-only"]


@dataclass(frozen=True)
class SendConfig:
    """[[send]]: one send connector, which recipient domains it serves, at what cost, how.

    An address space is "example.com" (that domain only), "*.example.com" (the domain and
    every subdomain) or "*" (everything); the most specific match wins, then the lowest
    cost (engine.routing.router).  No smarthosts means delivery by DNS MX.
    """

    __pydantic_config__ = _TABLE

    name: Annotated[str, _v(_connector_name)]
    address_spaces: Annotated[tuple[str, ...], _v(_address_spaces)]
    cost: _PosInt = 1
    #: (host, port) pairs tried in this order; empty = look up the MX hosts.
    smarthosts: Annotated[tuple[_HostPort, ...], _v(_smarthosts)] = ()
    #: "verify" is "required" plus certificate and host name verification.
    tls: Annotated[SendTls, _v(_choice(*_SEND_TLS))] = "opportunistic"
    #: AUTH (RFC 4954) to the smarthosts; "" for none.  Both or neither.
    auth_user: Annotated[str, _v(_auth_user)] = ""
    auth_password: Annotated[str, _v(_secret)] = field(default="", repr=False)
    #: AUTH over a connection without TLS sends the password in clear; the route carries
    #: this to the SMTP client (engine.routing.api.Route.plaintext_auth).
    allow_plaintext_auth: _Bool = False
    protocol: Annotated[Literal["smtp", "lmtp"], _v(_choice("smtp", "lmtp"))] = "smtp"
    #: Port of the MX hosts; None = delivery.mx_port (25 unless a test lab changes it).
    port: Annotated[int, _v(_port)] | None = None
    #: Write this connector's outbound conversations to its send protocol log.
    protocol_log: _Bool = False
    #: The [egress.pools."NAME"] its connections leave from; "" = ``egress.pool``.
    pool: Annotated[str, _v(_pool_name)] = ""
    #: TLS from the first byte to the smarthosts (RFC 8314 §3.3, port 465), not STARTTLS.
    implicit_tls: _Bool = False


def _check_send(sc: SendConfig) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    if bool(sc.auth_user) != bool(sc.auth_password):
        have, need = (("auth_user", "auth_password") if not sc.auth_password
                      else ("auth_password", "auth_user"))
        bad.append(((need,), f"is required when {have} is set (both or neither)"))
    if sc.auth_user and not sc.smarthosts:
        bad.append((("auth_user",), "AUTH is only sent to smarthosts, and this connector has none"))
    if sc.auth_user and sc.tls == "off" and not sc.allow_plaintext_auth:
        # RFC 4954 §4: a password over a connection without TLS is readable by anyone on
        # the path; the operator has to ask for that explicitly.
        bad.append((("tls",), 'is "off" but AUTH is configured: the password would be sent '
                              "in clear (set allow_plaintext_auth = true to allow it)"))
    if sc.implicit_tls and not sc.smarthosts:
        bad.append((("implicit_tls",), "applies to smarthosts only (MX hosts speak STARTTLS "
                                       "on port 25)"))
    if sc.implicit_tls and sc.tls in ("off", "none"):
        bad.append((("tls",), f'is "{sc.tls}" but implicit_tls is set'))
    if sc.port is not None and sc.smarthosts:
        bad.append((("port",), "applies to MX hosts only; give smarthost ports in smarthosts"))
    return bad


# --- egress sources and shaping (engine.scheduler.shaping) ---------------------------------


def _pool_name(value: object) -> str:
    return "" if value == "" else _connector_name(value)


def _local_address(value: object) -> str:
    if value == "":
        return ""
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        raise _Invalid(f'must be an IP address of this machine such as "192.0.2.10", or "" '
                       f"for the one the system picks (got {_show(value)})") from None


def _hostname_or_empty(value: object) -> str:
    return "" if value == "" else _hostname(value)


def _date_or_empty(value: object) -> str:
    import datetime

    if value == "":
        return ""
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value.isoformat()  # a TOML local date (warmup_start = 2026-12-01)
    try:
        return datetime.date.fromisoformat(value if isinstance(value, str) else "").isoformat()
    except ValueError:
        raise _Invalid(f'must be a date such as "2026-12-01" (got {_show(value)})') from None


def _caps(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"must be a non-empty array of daily caps (got {_show(value)})")
    bad: list[tuple[_Loc, str]] = []
    for i, item in enumerate(value):
        if not _is_int(item) or item <= 0:
            bad.append(((i,), f"must be a positive integer (got {_show(item)})"))
    if bad:
        raise _Invalid.many(bad)
    caps = tuple(cast(list[int], value))
    if any(b < a for a, b in itertools.pairwise(caps)):
        raise _Invalid(f"must not decrease from one day to the next (got {_show(list(caps))})")
    return caps


def _weights(value: object) -> Mapping[str, int]:
    if not isinstance(value, dict) or not value:
        raise _Invalid(f'must be a table of source names and weights such as {{ a = 1, b = 2 }} '
                       f"(got {_show(value)})")
    bad: list[tuple[_Loc, str]] = []
    out: dict[str, int] = {}
    for name, weight in value.items():
        try:
            out[_connector_name(name)] = _positive_int(weight)
        except _Invalid as err:
            bad += [((name, *at), msg) for at, msg in err.problems]
    if bad:
        raise _Invalid.many(bad)
    return MappingProxyType(out)


def _mx_suffix(value: str) -> str:
    name = value.lower().rstrip(".")
    problem = _domain_problem(name.lstrip("."))
    if problem:
        raise _Invalid(f"{problem} (got {_show(value)})")
    return name


def _mx_suffixes(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_each(value, "host names or suffixes", _mx_suffix)))


def _failure_code(value: object) -> int | None:
    if not _is_int(value) or not 400 <= cast(int, value) <= 599:
        raise _Invalid(f"must be a reply code from 400 to 599 (got {_show(value)})")
    return cast(int, value)


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _enhanced(value: object) -> str:
    if isinstance(value, str) and (value == "" or _ENHANCED.fullmatch(value)):
        return value
    raise _Invalid(f'must be an enhanced status code such as "4.7.28" (got {_show(value)})')


def _factor(value: object) -> float:
    number = _finite(value)
    if number is None or not 0 < number <= 1:
        raise _Invalid(f"must be a number above 0 and at most 1 (got {_show(value)})")
    return number


#: The warm-up plan of a new source when ``warmup_caps`` is left out: messages per day to
#: one site, day 1 first; from the day after the last, no warm-up cap (docs/shaping.md).
DEFAULT_WARMUP: Final = (50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000,
                         100_000)


@dataclass(frozen=True)
class EgressSource:
    """[egress.sources."NAME"]: one local address that outbound connections leave from,
    with the EHLO name that goes with it (its PTR name, for the receivers' checks)."""

    __pydantic_config__ = _TABLE

    #: The local IP address connections bind to; "" = the one the system picks.
    address: Annotated[str, _v(_local_address)] = ""
    #: The EHLO name sent from this address; "" = ``hostname``.
    ehlo: Annotated[str, _v(_hostname_or_empty)] = ""
    #: The first day of this (new) address's warm-up, "YYYY-MM-DD" (UTC); "" = none.
    warmup_start: Annotated[str, _v(_date_or_empty)] = ""
    #: Messages per day to one site during the warm-up, day 1 first.
    warmup_caps: Annotated[tuple[int, ...], _v(_caps)] = DEFAULT_WARMUP


@dataclass(frozen=True)
class EgressPool:
    """[egress.pools."NAME"]: sources that share a destination's mail, by weight."""

    __pydantic_config__ = _TABLE

    #: source name → weight (a share of the groups in proportion to it).
    sources: Annotated[Mapping[str, int], _v(_weights)]


@dataclass(frozen=True)
class EgressConfig:
    """[egress]: the local addresses outbound mail leaves from (KumoMTA's egress sources
    and pools, PowerMTA's virtual MTAs).  None configured = the system's choice and
    ``hostname``, as before."""

    __pydantic_config__ = _TABLE

    sources: Mapping[str, EgressSource] = field(default_factory=dict)
    pools: Mapping[str, EgressPool] = field(default_factory=dict)
    #: The pool of the connections no [[send]] with a ``pool`` makes; "" = no pool.
    pool: Annotated[str, _v(_pool_name)] = ""


def _check_egress(e: EgressConfig) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    for name, pool in e.pools.items():
        bad += [(("pools", name, "sources", source), "is not a source: add an "
                 f'[egress.sources."{source}"] table')
                for source in pool.sources if source not in e.sources]
    if e.pool and e.pool not in e.pools:
        bad.append((("pool",), f"{_show(e.pool)} is not a pool: add an "
                               f'[egress.pools."{e.pool}"] table'))
    return bad


_RateOrNone = Annotated[float, _v(_zero_or_more("messages"))] | None


@dataclass(frozen=True)
class ShapingRule:
    """[[shaping.rules]]: limits for the sites whose MX host names end in one of
    ``mx_suffixes``, or for the recipient domains in ``domains``; None keeps the limit of
    the next matching rule, else [delivery]'s."""

    __pydantic_config__ = _TABLE

    name: Annotated[str, _v(_connector_name)]
    #: ".google.com" matches every host under google.com; a name without a dot in front
    #: matches that host only.
    mx_suffixes: Annotated[tuple[str, ...], _v(_mx_suffixes)] = ()
    domains: Annotated[tuple[str, ...], _v(_domains)] = ()
    max_connections: _PosInt | None = None
    max_messages_per_connection: _PosInt | None = None
    max_per_second: _RateOrNone = None
    max_per_minute: _RateOrNone = None
    max_per_hour: _RateOrNone = None
    #: Messages per UTC day from one source to the site.
    daily_cap: _PosInt | None = None
    #: The pool this site's mail leaves from, over the send connector's; "" = theirs.
    pool: Annotated[str, _v(_pool_name)] = ""


def _check_rule(r: ShapingRule) -> list[tuple[_Loc, str]]:
    if not r.mx_suffixes and not r.domains:
        return [(("mx_suffixes",), "a rule needs mx_suffixes or domains to match")]
    return []


_ACTIONS: Final = ("suspend", "throttle")


@dataclass(frozen=True)
class AutomationRule:
    """[[shaping.automation]]: a reply that matches ``code``, ``enhanced`` and ``text``
    (each one set) suspends the (source, site) that got it, or lowers its limits, for
    ``duration``; then it is restored."""

    __pydantic_config__ = _TABLE

    name: Annotated[str, _v(_connector_name)]
    #: Only for these sites (as in [[shaping.rules]]); both empty = every site.
    mx_suffixes: Annotated[tuple[str, ...], _v(_mx_suffixes)] = ()
    domains: Annotated[tuple[str, ...], _v(_domains)] = ()
    code: Annotated[int, _v(_failure_code)] | None = None
    enhanced: Annotated[str, _v(_enhanced)] = ""
    #: A regular expression searched in the reply text (case-insensitive).
    text: Annotated[str, _v(_regex)] = ""
    action: Annotated[Literal["suspend", "throttle"], _v(_choice(*_ACTIONS))] = "suspend"
    duration: _Seconds = 600.0
    #: "throttle": connections to the (source, site) meanwhile.
    max_connections: _PosInt | None = None
    #: "throttle": its message rate multiplied by this (a limit of 0, none, stays none).
    rate_factor: Annotated[float, _v(_factor)] = 1.0
    #: "throttle": messages per second meanwhile (over rate_factor).
    max_rate: _RateOrNone = None


def _check_automation(a: AutomationRule) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    if a.code is None and not a.enhanced and not a.text:
        bad.append((("code",), "a rule needs code, enhanced or text to match a reply"))
    if (a.action == "throttle" and a.max_connections is None and a.max_rate is None
            and a.rate_factor == 1.0):
        bad.append((("action",), '"throttle" needs max_connections, max_rate or a '
                                 "rate_factor below 1"))
    return bad


@dataclass(frozen=True)
class ShapingConfig:
    """[shaping]: traffic shaping by provider and automation on replies
    (engine.scheduler.shaping, docs/shaping.md)."""

    __pydantic_config__ = _TABLE

    #: Apply the shipped rules for the large providers (engine/scheduler/shaping.toml)
    #: after the configured ones.
    defaults: _Bool = True
    rules: tuple[Annotated[ShapingRule, _after(_check_rule)], ...] = ()
    automation: tuple[Annotated[AutomationRule, _after(_check_automation)], ...] = ()


def parse_shaping(raw: Mapping[str, Any]) -> ShapingConfig:
    """A [shaping] table (the shipped defaults' file) checked as the configuration's is."""
    try:
        return TypeAdapter(ShapingConfig).validate_python(dict(raw))
    except ValidationError as err:
        raise ConfigError([_line(loc, msg, {}) for loc, msg in _problems(err)]) from None


@dataclass(frozen=True)
class LocalConfig:
    """[[local]]: authoritative domains delivered here, into a Maildir or handed to an LMTP
    server.  Exactly one of ``maildir`` (a path template with {domain} and {local}) and
    ``lmtp``."""

    __pydantic_config__ = _TABLE

    domains: Annotated[tuple[str, ...], _v(_domains)] = ()
    maildir: Annotated[str, _v(_template)] = ""
    lmtp: Annotated[_HostPort, _v(_lmtp_server)] | None = None


def _check_local(lc: LocalConfig) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    if not lc.domains:
        bad.append((("domains",), "must list at least one domain"))
    if bool(lc.maildir) == (lc.lmtp is not None):
        bad.append((("maildir",), 'needs exactly one of maildir = "/path/{domain}/{local}" and '
                                  'lmtp = "HOST:PORT"'))
    return bad


_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogConfig:
    """[log]: the process log (engine.cli sets the logging level from it) and where
    protocol logs go."""

    __pydantic_config__ = _TABLE

    level: Annotated[Literal["debug", "info", "warning", "error"], _v(_choice(*_LEVELS))] = (
        "info")
    #: None here means ``spool / "log"``; :func:`load_config` always fills it in.
    protocol_log_dir: Annotated[Path, _v(_path)] | None = None
    #: "text": one line for a person; "json": one object a line for a log shipper
    #: (engine.ops.logfmt; the mail log's fields become keys).
    format: Annotated[Literal["text", "json"], _v(_choice("text", "json"))] = "text"


@dataclass(frozen=True)
class TrackingConfig:
    """[tracking]: the message tracking log (``engine.ops.tracking.TrackingLog``)."""

    __pydantic_config__ = _TABLE

    #: On by default, as Exchange's: the operator's record of every message's life.
    enabled: _Bool = True
    #: None means :func:`tracking_dir` of the spool (so it follows ``--spool``).
    dir: Annotated[Path, _v(_path)] | None = None
    #: A file is rotated before it passes this size, or when its first record is older.
    max_file_size: _Size = 100 * MiB
    max_file_age: _Seconds = 86400.0
    #: Retention: rotated files older than this are deleted (0 = kept whatever their age)...
    max_age: _SecondsOrOff = 30 * 86400.0
    #: ...and the oldest ones while all the files take more than this (0 = no limit).
    max_total_size: Annotated[int, _v(_size)] = GiB
    #: Write the Subject: of each message in RECEIVE (it is content: off by default).
    subject: _Bool = False


#: What a bearer token of ``[http.tokens]`` may do (engine.http.api.Scope).
HTTP_SCOPES: Final = ("inject", "read", "admin")


def _token(value: object) -> str:
    # A bearer token is a password: long enough not to be guessed, printable so it fits
    # an Authorization header (RFC 6750 §2.1: b64token characters), never echoed.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._~+/=-]{16,512}", value):
        raise _Invalid("must be 16 to 512 characters of A-Z a-z 0-9 . _ ~ + / = - "
                       "(e.g. the output of: openssl rand -hex 32)")
    return value


def _scopes(value: object) -> tuple[str, ...]:
    return _each(value, "scopes", _choice(*HTTP_SCOPES))


@dataclass(frozen=True)
class HttpToken:
    """[http.tokens."name"]: one bearer token of the HTTP API and what it may do; the
    name is who it is in logs and events (``by``)."""

    __pydantic_config__ = _TABLE

    token: Annotated[str, _v(_token)] = ""
    #: "inject" (POST messages), "read" (metrics, views, tracking), "admin" (verbs).
    scopes: Annotated[tuple[str, ...], _v(_scopes)] = ("read",)
    #: Its injections may go to any domain (like a relay network); an untrusted token's
    #: recipients must be in the accepted domains (engine.http.inject).
    trusted: _Bool = False


def _check_token(t: HttpToken) -> list[tuple[_Loc, str]]:
    return [(("token",), "is required")] if not t.token else []


@dataclass(frozen=True)
class HttpConfig:
    """[http]: the HTTP listener of ``ferry serve`` (engine.http): metrics, health, the
    injection and admin APIs.  Off while ``listen`` is empty."""

    __pydantic_config__ = _TABLE

    #: (host, port) pairs; empty = no HTTP listener.
    listen: Annotated[tuple[_HostPort, ...], _v(_listen_or_none)] = ()
    #: Clients from the loopback (127.0.0.0/8, ::1) may do everything without a token.
    trust_loopback: _Bool = True
    tokens: Annotated[Mapping[str, Annotated[HttpToken, _after(_check_token)]],
                      AfterValidator(_token_names)] = field(
        default_factory=lambda: MappingProxyType({}))
    #: HTTPS when both are set (one certificate for every HTTP listen address).
    cert_file: Annotated[Path, _v(_existing_file)] | None = None
    key_file: Annotated[Path, _v(_existing_file)] | None = None
    #: A request body over this many bytes gets 413 (an injection with attachments).
    max_body_size: _Size = 50 * MiB
    #: Seconds for a request's body to arrive once its header did (408 after).
    request_timeout: _Seconds = 60.0
    #: Seconds an idle keep-alive connection stays open.
    idle_timeout: _Seconds = 75.0
    # The injection API (engine.http.inject, docs/inject.md): the receive side's rules.
    #: The receive connector name of injected mail (envelopes, RECEIVE events).
    connector: Annotated[str, _v(_connector_name)] = "http"
    #: A message (its RFC 5322 text, as stored) over this size gets 413.
    max_message_size: _Size = 35 * MiB
    #: Recipients of one request (one request may carry a bulk send).
    max_recipients: _PosInt = 10_000
    #: The bytes one request may queue in all (its personalised messages together): 413.
    max_request_queued_size: _Size = 256 * MiB
    #: A lone CR, or LF line ends mixed with CRLF, in raw content: "reject" (400) or
    #: "normalize" to CRLF (content with LF line ends only is canonicalised either way).
    bare_eol: Annotated[Literal["reject", "normalize"], _v(_choice("reject", "normalize"))] = (
        "reject")
    #: A line over 1,000 octets (RFC 5321 §4.5.3.1.6): "wrap" it or "reject" (400).
    long_lines: Annotated[Literal["wrap", "reject"], _v(_choice("wrap", "reject"))] = "wrap"
    #: RFC 5321 §6.3: a message with more Received fields than this is looping (400).
    max_received_headers: _PosInt = 100
    #: Seconds an Idempotency-Key is remembered (a retry within it queues nothing).
    idempotency_window: _Seconds = 86400.0
    #: GET /metrics: the destinations with most mail waiting that get series of their own
    #: (the rest add up as "(other)"), so a queue for 50,000 domains stays a small scrape;
    #: 0 = no per-destination series (and no walk of the queue's index).
    metrics_destinations: Annotated[int, _v(_int_or_off)] = 100
    #: Policy agents for injected mail, at the end of data (engine.agents; like
    #: [[receive]] agents, without relay control: the tokens decide who may relay).  The
    #: DKIM signers sign injected mail whatever this lists.
    agents: Annotated[tuple[str, ...], _v(_agent_list)] = ()


def _check_http(h: HttpConfig) -> list[tuple[_Loc, str]]:
    if (h.cert_file is None) != (h.key_file is None):
        missing = "key_file" if h.key_file is None else "cert_file"
        return [((missing,), "is required when the other of cert_file/key_file is set")]
    return []


#: The tracking log's event names (engine.ops.events.Kind; a unit test keeps them equal):
#: what a [[webhook]] may ask for.
EVENT_KINDS: Final = ("RECEIVE", "DEFER", "DELIVER", "FAIL", "EXPIRE", "DSN", "SUSPEND",
                      "RESUME", "HOLD", "RELEASE", "RETRY", "REMOVE", "POISON", "TLS_FAIL",
                      "ALERT", "THROTTLE")


def _event(value: str) -> str:
    if value in EVENT_KINDS:
        return value
    close = difflib.get_close_matches(value.upper(), EVENT_KINDS, n=1)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    raise _Invalid(f"is not an event of the tracking log: {', '.join(EVENT_KINDS)} "
                   f"(got {_show(value)}{hint})")


def _events(value: object) -> tuple[str, ...]:
    kinds = _each(value, "event names", _event)
    if not kinds:
        raise _Invalid(f"must name at least one event of {', '.join(EVENT_KINDS)}")
    return tuple(dict.fromkeys(kinds))


def _url(value: object) -> str:
    """An http or https URL with a host.  The URL is echoed when it is wrong, except its
    user information (a password may be written there)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value:
        raise _Invalid(f'must be an "http://" or "https://" URL (got {_show(value)})')
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as err:
        raise _Invalid(f"is not a valid URL: {err}") from None
    shown = _show(value) if "@" not in parts.netloc else "the value is not shown"
    if parts.scheme not in ("http", "https"):
        raise _Invalid(f'must be an "http://" or "https://" URL ({shown})')
    if not parts.hostname or any(c in value for c in " \r\n\t"):
        raise _Invalid(f"must name a host, without spaces ({shown})")
    return value


@dataclass(frozen=True)
class WebhookConfig:
    """[[webhook]]: a receiver of the tracking log's events (engine.ops.webhooks): they are
    queued in the queue database and POSTed in signed batches until it answers 2xx."""

    __pydantic_config__ = _TABLE

    name: Annotated[str, _v(_connector_name)]
    url: Annotated[str, _v(_url)]
    #: HMAC-SHA256 key of X-Ferry-Signature; never echoed.
    secret: Annotated[str, _v(_secret)] = field(repr=False)
    #: The tracking log's event names to send (engine.ops.events.Kind).
    events: Annotated[tuple[str, ...], _v(_events)] = ("DELIVER", "DEFER", "FAIL", "EXPIRE",
                                                      "DSN")
    #: Most events in one POST.
    batch_size: _PosInt = 100
    #: Seconds for one POST, from connecting to the end of the answer.
    timeout: _Seconds = 10.0
    #: After a failed POST, wait this long, doubled after each further failure, up to
    #: max_retry_interval.
    retry_interval: _Seconds = 1.0
    max_retry_interval: _Seconds = 300.0
    #: Events kept waiting at most: past it the oldest are dropped (a dead receiver must
    #: not fill the disk).
    max_backlog: _PosInt = 100_000
    #: CA certificates (PEM) that verify an https receiver, instead of the system's.
    ca_file: Annotated[Path, _v(_existing_file)] | None = None


def _check_webhook(w: WebhookConfig) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    if w.max_retry_interval < w.retry_interval:
        bad.append((("max_retry_interval",), f"must be at least retry_interval "
                    f"({_as_written(w.retry_interval)}) (got {_as_written(w.max_retry_interval)})"))
    if w.ca_file is not None and not w.url.startswith("https:"):
        bad.append((("ca_file",), "applies to an https:// url only"))
    return bad


_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")


def _account(value: object) -> str:
    """A user or group name as /etc/passwd and /etc/group spell it; "" = not set.  Whether
    it exists is checked at start (engine.ops.daemon), not when the file is read."""
    if not isinstance(value, str) or not (value == "" or _ACCOUNT.fullmatch(value)):
        raise _Invalid("must be a user or group name: 1 to 32 letters, digits, '_', '.' or "
                       f"'-', not starting with '.' or '-' (got {_show(value)})")
    return value


#: More workers than this is a typo, not a machine (each is a process with its own queue).
MAX_WORKERS: Final = 256


def _workers(value: object) -> int:
    """A count of worker processes, or "auto": one per core this process may use."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if not _is_int(value) or not 1 <= cast(int, value) <= MAX_WORKERS:
        raise _Invalid(f'must be "auto" or a number of processes from 1 to {MAX_WORKERS} '
                       f"(got {_show(value)})")
    return cast(int, value)


@dataclass(frozen=True)
class ServerConfig:
    """[server]: the ``ferry serve`` process itself (engine.ops.daemon): whom it runs as."""

    __pydantic_config__ = _TABLE

    #: Switch to this user once the listeners are bound (root binds port 25, the user
    #: reads client bytes and owns the spool); "" = stay who started Ferry.
    user: Annotated[str, _v(_account)] = ""
    #: The group to switch to; "" = the user's primary group.
    group: Annotated[str, _v(_account)] = ""
    #: Let Ferry run as root on an address other than the loopback, without ``user``.
    allow_root: _Bool = False
    #: Worker processes, each an event loop on a queue shard of its own
    #: (engine.cluster.supervisor); "auto" = the cores this process may run on.
    workers: Annotated[int, _v(_workers)] = 1



# --- bounce classes and the suppression list


#: The categories of a failed or deferred delivery (engine.scheduler.bounces, which owns
#: the table that gives them; docs/bounces.md): what a [[bounce_rule]] may name and what
#: [suppression] auto_categories lists.
BOUNCE_CATEGORIES: Final = ("bad-mailbox", "bad-domain", "inactive", "quota", "too-large",
                            "content", "policy", "routing", "dns", "tls", "protocol",
                            "expired", "other")
_ENHANCED_PREFIX = re.compile(r"[245](?:\.\d{1,3}){0,2}")


def _enhanced_prefix(value: object) -> str:
    """An enhanced status code or its first parts (RFC 3463 §2): "5", "5.7", "5.7.1"."""
    if not isinstance(value, str) or not (value == "" or _ENHANCED_PREFIX.fullmatch(value)):
        raise _Invalid('must be an enhanced status code or its start, like "5.1.1", "5.7" '
                       f'or "4" (RFC 3463) (got {_show(value)})')
    return value


def _reply_code(value: object) -> int:
    """An SMTP reply code 200-599, or 0 (any)."""
    if not _is_int(value) or not (cast(int, value) == 0 or 200 <= cast(int, value) <= 599):
        raise _Invalid(f"must be a reply code from 200 to 599, or 0 for any (got {_show(value)})")
    return cast(int, value)


def _regex(value: object) -> str:
    """A Python regular expression (matched case-insensitively, anywhere in the text)."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a regular expression (got {_show(value)})")
    try:
        re.compile(value)
    except re.error as err:
        raise _Invalid(f"is not a valid regular expression: {err} (got {_show(value)})"
                       ) from None
    return value


@dataclass(frozen=True)
class BounceRuleConfig:
    """[[bounce_rule]]: an operator's bounce class, tried in order before the shipped table
    (engine.scheduler.bounces); every condition given must hold."""

    __pydantic_config__ = _TABLE

    #: What a reply that matches is (one of BOUNCE_CATEGORIES).
    category: Annotated[str, _v(_choice(*BOUNCE_CATEGORIES))]
    #: The reply code (550); 0 = any.
    code: Annotated[int, _v(_reply_code)] = 0
    #: The enhanced status code, or its start ("5.7" matches 5.7.1 and 5.7.26); "" = any.
    enhanced: Annotated[str, _v(_enhanced_prefix)] = ""
    #: A regular expression searched in the reply, case-insensitively; "" = any.
    text: Annotated[str, _v(_regex)] = ""


def _check_bounce_rule(r: BounceRuleConfig) -> list[tuple[_Loc, str]]:
    if not (r.code or r.enhanced or r.text):
        return [(("category",), "the rule needs at least one of code, enhanced or text "
                 "(it would match every reply)")]
    return []


def _categories(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_each(value, "categories", _choice(*BOUNCE_CATEGORIES))))


@dataclass(frozen=True)
class SuppressionConfig:
    """[suppression]: the suppression list (engine.queue suppressed table,
    engine.agents.suppress): recipients mail is no longer accepted for."""

    __pydantic_config__ = _TABLE

    #: Refuse suppressed recipients (at RCPT for relaying clients, at injection over
    #: HTTP) and add the hard failures; off = the list is kept but neither read nor grown.
    enabled: _Bool = True
    #: Bounce categories whose failures (FAIL, never DEFER) add the recipient by itself.
    auto_categories: Annotated[tuple[str, ...], _v(_categories)] = (
        "bad-mailbox", "bad-domain", "inactive")
    #: Entries added automatically are dropped after this long (0 = kept until removed);
    #: the operator's own entries never expire.
    max_age: _SecondsOrOff = 0.0


# --- alerts


#: What an [[alert]] rule watches (engine.ops.alerts reads each one; docs/alerts.md).
ALERT_METRICS: Final = ("queue_depth", "oldest_message_age", "deferral_ratio",
                        "back_pressure", "free_disk", "tls_failures")
#: The metrics a ``destination`` selects (the others are one figure for the whole server).
ALERT_PER_DESTINATION: Final = frozenset({"queue_depth", "oldest_message_age",
                                          "deferral_ratio", "tls_failures"})
#: The metrics counted over the rule's ``window`` (the others are read as they are now).
ALERT_WINDOWED: Final = frozenset({"deferral_ratio", "tls_failures"})


def _count(value: object) -> float:
    if not _is_int(value) or cast(int, value) < 0:
        raise _Invalid(f"must be a whole number, 0 or more (got {_show(value)})")
    return float(cast(int, value))


def _ratio(value: object) -> float:
    """A fraction from 0 to 1, or a percentage written as text ("30%")."""
    number = _finite(value)
    if isinstance(value, str) and re.fullmatch(r"\d+(?:\.\d+)?%", value.strip()):
        number = float(value.strip()[:-1]) / 100
    if number is None or not 0 <= number <= 1:
        raise _Invalid(f'must be a fraction from 0 to 1 or a percentage such as "30%" '
                       f"(got {_show(value)})")
    return number


def _flag(value: object) -> float:
    if value not in (0, 1) or isinstance(value, bool):
        raise _Invalid(f"must be 0 or 1 (back_pressure is 1 while the queue refuses mail) "
                       f"(got {_show(value)})")
    return 1.0 if value == 1 else 0.0


#: How each metric's threshold is written: its unit is the metric's own.
_THRESHOLDS: Final[Mapping[str, Callable[[object], float]]] = MappingProxyType({
    "queue_depth": _count, "oldest_message_age": _seconds_or_off, "deferral_ratio": _ratio,
    "back_pressure": _flag, "free_disk": lambda v: float(_size(v)), "tls_failures": _count,
})  # fmt: skip


def _threshold_text(value: object) -> float | str:
    # Checked against the metric in _check_alert: "5m" is a duration for one metric and
    # five megabytes for another.
    if isinstance(value, str) or _finite(value) is not None:
        return cast(float | str, value)
    raise _Invalid(f"must be a number or a string such as \"10GiB\", \"1h\", \"30%\" "
                   f"(got {_show(value)})")


def _alert_destination(value: object) -> str:
    if value == "*":
        return value
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise _Invalid('must be a destination as `ferry queue queues` names it ("gmail.com") '
                       f'or "*" for each destination separately (got {_show(value)})')
    return value.lower().rstrip(".")


@dataclass(frozen=True)
class AlertConfig:
    """[[alert]]: one rule of engine.ops.alerts.  It fires once ``metric`` has been
    ``above`` (or ``below``) its threshold for ``lasting`` seconds, and clears at the first
    evaluation where it is not."""

    __pydantic_config__ = _TABLE

    #: Who it is in the log line and the ALERT event; unique.
    name: Annotated[str, _v(_connector_name)] = ""
    metric: Annotated[str, _v(_choice(*ALERT_METRICS))] = ""
    #: "" = the whole server; a destination; "*" = each destination as its own alert.
    destination: Annotated[str, _v(_alert_destination)] = ""
    #: The threshold, in the metric's unit (:meth:`threshold`); exactly one of the two.
    above: Annotated[float | str, _v(_threshold_text)] | None = None
    below: Annotated[float | str, _v(_threshold_text)] | None = None
    #: How long the condition must hold before the alert fires (Prometheus's ``for``,
    #: a Python keyword: no key can have that name here); 0 = at once.
    lasting: _SecondsOrOff = 0.0
    #: The span the counted metrics (deferral_ratio, tls_failures) are counted over.
    window: _Seconds = 600.0
    severity: Annotated[Literal["warning", "error"], _v(_choice("warning", "error"))] = (
        "warning")

    def threshold(self) -> tuple[Literal["above", "below"], float]:
        """("above" or "below", the threshold in the metric's unit: messages, seconds, a
        fraction, 0/1, bytes, failures); the table check made sure it converts."""
        side: Literal["above", "below"] = "above" if self.above is not None else "below"
        raw = self.above if self.above is not None else self.below
        return side, _THRESHOLDS[self.metric](raw)


def _check_alert(a: AlertConfig) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    if not a.name:
        bad.append((("name",), "is required"))
    if not a.metric:
        bad.append((("metric",), "is required: one of " + ", ".join(ALERT_METRICS)))
    if (a.above is None) == (a.below is None):
        bad.append((("above",), "needs exactly one of above and below"))
    elif a.metric:
        side, raw = ("above", a.above) if a.above is not None else ("below", a.below)
        try:
            _THRESHOLDS[a.metric](raw)
        except _Invalid as err:
            bad.append(((side,), f"for {a.metric}: {err}"))
    if a.destination and a.metric and a.metric not in ALERT_PER_DESTINATION:
        bad.append((("destination",), f"{a.metric} is one figure for the whole server; "
                                      "leave destination out"))
    return bad


def _check_alert_names(alerts: tuple[AlertConfig, ...]) -> list[tuple[_Loc, str]]:
    seen: dict[str, int] = {}
    bad: list[tuple[_Loc, str]] = []
    for i, a in enumerate(alerts):
        if a.name and a.name in seen:
            bad.append(((i, "name"), f"{_show(a.name)} is already the name of "
                                     f"alert[{seen[a.name]}] (names must be unique)"))
        seen.setdefault(a.name, i)
    return bad


@dataclass(frozen=True)
class AlertsConfig:
    """[alerts]: how the [[alert]] rules are evaluated (engine.ops.alerts)."""

    __pydantic_config__ = _TABLE

    #: Seconds between two evaluations of every rule (each reads the queue's figures).
    interval: _Seconds = 10.0


# --- policy agents (engine.agents) ---------------------------------------------------------

#: The agents Ferry ships, by the name [[receive]] agents lists them with.
BUILTIN_AGENTS: Final = ("ratelimit", "dnsbl", "verify", "rspamd", "clamav")
VERIFY_METHODS: Final = ("spf", "dkim", "dmarc")


def _agent_list(value: object) -> tuple[str, ...]:
    names = _each(value, "agent names", _agent_name)
    if len(set(names)) != len(names):
        raise _Invalid(f"lists an agent twice (got {_show(list(names))})")
    return names


def _agent_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", value):
        raise _Invalid("must be an agent name: letters, digits, '_', '.', '-' "
                       f"(got {_show(value)})")
    return value


def _verify_methods(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_each(value, "methods", _choice(*VERIFY_METHODS))))


@dataclass(frozen=True)
class _AgentTable:
    """The two keys of every [agents.*] table: the time budget of one call and what a
    failure (an exception, the budget blown, the daemon down) means."""

    __pydantic_config__ = _TABLE

    #: Seconds one call of the agent may take; past it the call counts as failed.
    timeout: _Seconds = 10.0
    #: "open": a failed call accepts (mail flows while the agent is down); "closed": it
    #: answers 451 4.7.1 (mail waits at the client until the agent is back).
    fail: Annotated[Literal["open", "closed"], _v(_choice("open", "closed"))] = "open"


_IntOrOff = Annotated[int, _v(_int_or_off)]


@dataclass(frozen=True)
class RateLimitAgentConfig(_AgentTable):
    """[agents.ratelimit]: per client address and per authenticated user (anvil)."""

    #: Connections one client address may open per minute (0: no limit); past it, 421.
    connections_per_minute: _IntOrOff = 0
    #: Connections one client address may hold open at once (Postfix's default, 50).
    concurrent_connections: _IntOrOff = 50
    #: Messages (MAIL commands) per minute from one unauthenticated client address.
    messages_per_minute: _IntOrOff = 0
    #: Recipients (RCPT commands) per minute from one unauthenticated client address.
    recipients_per_minute: _IntOrOff = 0
    #: Successful AUTHs as one user per minute (0: no limit); past it, 421.
    user_connections_per_minute: _IntOrOff = 0
    #: Sessions authenticated as one user open at once (0: no limit).
    user_concurrent_connections: _IntOrOff = 0
    #: Messages per minute from sessions authenticated as one user.
    user_messages_per_minute: _IntOrOff = 0
    #: Recipients per minute from sessions authenticated as one user.
    user_recipients_per_minute: _IntOrOff = 0
    #: AUTH failures one client address may have per hour, across connections, before
    #: it is locked out (0: no limit).
    auth_failures_per_hour: _IntOrOff = 10
    #: How long a locked-out client address gets 421 for every AUTH.
    auth_lockout: _Seconds = 900.0
    #: The wait before the answer to each failed AUTH (slows a password guesser).
    auth_failure_delay: _SecondsOrOff = 1.0
    #: Client addresses no limit applies to.
    exempt: _Networks = ()
    #: IPv6 clients are counted per network of this prefix length (RFC 6177: a site gets
    #: a /48 to /64, so one attacker holds a whole /64 of addresses).
    ipv6_prefix: Annotated[int, _v(_prefix_length)] = 64
    #: Most client addresses and users tracked at once; past it the least recently seen
    #: are forgotten (the memory bound: docs/agents-ratelimit.md).
    max_keys: _PosInt = 100_000


def _check_ratelimit(rl: RateLimitAgentConfig) -> list[tuple[_Loc, str]]:
    if rl.auth_failure_delay >= rl.timeout:
        # The delay is spent inside the auth stage's call: past the time budget the chain
        # counts the call as failed, and a failed call fails open.
        return [(("auth_failure_delay",), f"must be shorter than timeout "
                 f"({_as_written(rl.timeout)}) (got {_as_written(rl.auth_failure_delay)})")]
    return []


#: Answers a list gives when it refuses the query rather than answering it (Spamhaus keeps
#: 127.255.255.0/24 for those: .254 "query via a public resolver", .255 "excessive number
#: of queries"); they never count as a listing.
DNSBL_ERROR_CODES: Final = ipaddress.IPv4Network("127.255.255.0/24")
#: What counts by default: any answer in 127.0.0.0/8 (RFC 5782 §2.3) but the error codes.
DNSBL_DEFAULT_CODES: Final = ((ipaddress.IPv4Address("127.0.0.0"),
                               ipaddress.IPv4Address("127.255.254.255")),)
_REPLY_FIELDS: Final = ("client", "zone", "txt")


def _code_range(value: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """ "127.0.0.2", "127.0.0.2-127.0.0.11" or "127.0.0.0/24" as (first, last)."""
    first, dash, last = value.partition("-")
    try:
        if dash:
            low, high = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
        elif "/" in value:
            net = ipaddress.IPv4Network(value, strict=True)
            low, high = net.network_address, net.broadcast_address
        else:
            low = high = ipaddress.IPv4Address(value)
    except ValueError:
        raise _Invalid('must be an IPv4 address, a range such as "127.0.0.2-127.0.0.11" or '
                       f'a network such as "127.0.0.0/24" (got {_show(value)})') from None
    if low > high:
        raise _Invalid(f"is a range whose end is before its start (got {_show(value)})")
    return low, high


def _codes(value: object) -> tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...]:
    codes = _each(value, "return codes", _code_range)
    if not codes:
        raise _Invalid("must not be empty (nothing would count; remove the zone instead)")
    return codes


def _reply_text(value: object) -> str:
    if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
        raise _Invalid(f"must be a string without CR, LF or NUL (got {_show(value)})")
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value)
                 if f is not None]
    except ValueError as err:
        raise _Invalid(f"is not a valid template: {err} (got {_show(value)})") from None
    # A format spec ("{txt:>9999999}") or a conversion is not needed, and a width could
    # make the reply any length.
    unknown = [f if not (spec or conv) else f"{f}{'!' + conv if conv else ''}:{spec}"
               for f, spec, conv in parts if spec or conv or f not in _REPLY_FIELDS]
    if unknown:
        raise _Invalid(f"may only use {{client}}, {{zone}} and {{txt}}, not {{{unknown[0]}}} "
                       f"(got {_show(value)})")
    return value


def _prefix_length(value: object) -> int:
    if not _is_int(value) or not 1 <= cast(int, value) <= 128:
        raise _Invalid(f"must be a prefix length from 1 to 128 (got {_show(value)})")
    return cast(int, value)


@dataclass(frozen=True)
class DnsblZoneConfig:
    """[[agents.dnsbl.zones]]: one DNS list (RFC 5782), a block list or an allow list."""

    __pydantic_config__ = _TABLE

    #: The list's DNS zone ("zen.spamhaus.org"); the client's address is looked up below it.
    zone: Annotated[str, _v(_hostname)] = ""
    #: "block": a listed client is refused (when the weights reach the threshold);
    #: "allow" (a DNSWL): a listed client bypasses every block list.
    kind: Annotated[str, _v(_choice("block", "allow"))] = "block"
    #: The A answers that count as listed; the default: 127.0.0.0/8 but 127.255.255.0/24.
    codes: Annotated[tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...],
                     _v(_codes)] = DNSBL_DEFAULT_CODES
    #: What a listing here adds to the client's score (block lists; postscreen's weights).
    weight: _PosInt = 1
    #: The reply text to a refused client, with {client}, {zone} and {txt}; "" = the
    #: default, "Service unavailable; client [{client}] blocked using {zone}; {txt}".
    reply: Annotated[str, _v(_reply_text)] = ""


def _check_dnsbl(d: DnsblAgentConfig) -> list[tuple[_Loc, str]]:
    bad: list[tuple[_Loc, str]] = []
    seen: set[str] = set()
    for i, z in enumerate(d.zones):
        if not z.zone:
            bad.append((("zones", i, "zone"), "is required"))
        elif z.zone.lower() in seen:
            bad.append((("zones", i, "zone"), f"lists {_show(z.zone)} twice"))
        seen.add(z.zone.lower())
    return bad


@dataclass(frozen=True)
class DnsblAgentConfig(_AgentTable):
    """[agents.dnsbl]: DNS block and allow lists, checked at connect."""

    #: The lists, [[agents.dnsbl.zones]], all queried at once for each connecting client.
    zones: tuple[DnsblZoneConfig, ...] = ()
    #: A client is refused when the weights of the block lists that list it add up to this.
    threshold: _PosInt = 1
    #: Clients in these networks are never looked up (a static allow list).
    allow_networks: _Networks = ()


def _hostname_or_default(value: object) -> str:
    """A host name, or "" for the default (the server's [hostname])."""
    return "" if value == "" else _hostname(value)


@dataclass(frozen=True)
class VerifyAgentConfig(_AgentTable):
    """[agents.verify]: SPF, DKIM and DMARC verification and Authentication-Results."""

    #: The authserv-id of our Authentication-Results field (RFC 8601 §2.5), and the one
    #: whose fields arriving from outside are removed as forged; "" = the server's hostname.
    authserv_id: Annotated[str, _v(_hostname_or_default)] = ""
    #: What a DMARC fail with the domain's policy (after pct) becomes: "enforce": p=reject
    #: → 550 5.7.1, p=quarantine → hold; "quarantine": both → hold; "tag": only the
    #: Authentication-Results field says so (the mailbox's filters decide).
    dmarc_policy: Annotated[Literal["enforce", "quarantine", "tag"], _v(
        _choice("enforce", "quarantine", "tag"))] = "enforce"
    #: An SPF "fail" that no DMARC policy rules on (the author domain has no DMARC
    #: record, or "dmarc" is not verified): "tag" only records it; "reject" answers
    #: 550 5.7.23 (RFC 7372).  With a DMARC policy, DMARC decides (RFC 7489 §10.1).
    spf_fail: Annotated[Literal["tag", "reject"], _v(_choice("tag", "reject"))] = "tag"
    #: SPF results kept, by client address, MAIL FROM and HELO, each until the first of
    #: the DNS answers it came from expires (engine.agents.spf.SpfCache); 0 = off.
    spf_cache: Annotated[int, _v(_int_or_off)] = 10_000


def _field_name_or_off(value: object) -> str:
    """A header field name (RFC 5322 §3.6.8: printable ASCII but ":"), or "" for off."""
    if not isinstance(value, str) or not all("!" <= c <= "~" and c != ":" for c in value):
        raise _Invalid(f'must be a header field name (letters, digits, "-"), or "" for none '
                       f"(got {_show(value)})")
    return value


def _clamd_address(value: object) -> str:
    """A clamd socket: "unix:/absolute/path" (its LocalSocket) or "HOST:PORT" (TCPSocket)."""
    if isinstance(value, str) and value.startswith("unix:"):
        if not value[5:].startswith("/") or "\x00" in value:
            raise _Invalid('a Unix socket must be an absolute path, as in '
                           f'"unix:/run/clamav/clamd.ctl" (got {_show(value)})')
        return value
    _destination(None)(value)
    return cast(str, value)


@dataclass(frozen=True)
class RspamdAgentConfig(_AgentTable):
    """[agents.rspamd]: anti-spam with rspamd's HTTP protocol (/checkv2)."""

    #: rspamd's normal worker (or its proxy); /checkv2 is posted there.
    url: Annotated[str, _v(_url)] = "http://127.0.0.1:11333"
    #: Sent as rspamd's Password header, for a worker or proxy that asks for one; never
    #: echoed.  "" sends none.
    password: Annotated[str, _v(_secret)] = field(default="", repr=False)
    #: What rspamd's "reject" becomes: "reject" (550 5.7.1), "hold" (quarantine) or "tag"
    #: (accept with the spam headers), so an operator can quarantine instead of refusing.
    reject_action: Annotated[Literal["reject", "hold", "tag"],
                             _v(_choice("reject", "hold", "tag"))] = "reject"
    #: What "soft reject" becomes: "tempfail" (451 4.7.1), "hold" or "tag".
    soft_reject_action: Annotated[Literal["tempfail", "hold", "tag"],
                                  _v(_choice("tempfail", "hold", "tag"))] = "tempfail"
    #: What "greylist" becomes: "tempfail" (451 4.7.1, the client retries later), "tag",
    #: or "accept" (the result header only).
    greylist_action: Annotated[Literal["tempfail", "tag", "accept"],
                               _v(_choice("tempfail", "tag", "accept"))] = "tempfail"
    #: The field that carries the score, the required score and the symbols, added to
    #: every scanned message (one claiming it on arrival is replaced).
    header: Annotated[str, _v(_field_name_or_off)] = "X-Spamd-Result"
    #: "NAME: Yes" on mail rspamd calls spam (tag, add header, rewrite subject); "" = none.
    spam_header: Annotated[str, _v(_field_name_or_off)] = "X-Spam"
    #: Larger messages are not scanned (accepted with a log line): scanning them costs
    #: more than it finds, as with rspamd's own milter.
    max_size: _Size = 20 * MiB


@dataclass(frozen=True)
class ClamavAgentConfig(_AgentTable):
    """[agents.clamav]: anti-malware with clamd's INSTREAM."""

    #: A scanner that cannot scan must not let mail through unscanned: closed by default.
    fail: Annotated[Literal["open", "closed"], _v(_choice("open", "closed"))] = "closed"
    #: clamd's socket: "unix:/path" (its LocalSocket; Debian's is below) or "HOST:PORT"
    #: (its TCPSocket).
    address: Annotated[str, _v(_clamd_address)] = "unix:/run/clamav/clamd.ctl"
    #: What a virus found means: "reject" (554 5.7.1 naming it) or "hold" (quarantine).
    action: Annotated[Literal["reject", "hold"], _v(_choice("reject", "hold"))] = "reject"
    #: Larger messages are not sent: at most clamd's StreamMaxLength (25M in Debian's
    #: clamd.conf), past which clamd answers an error instead of a verdict.
    max_size: _Size = 25 * MiB
    #: A message over max_size: "accept" it unscanned (logged) or "tempfail" (451 4.7.1).
    on_oversize: Annotated[Literal["accept", "tempfail"],
                           _v(_choice("accept", "tempfail"))] = "accept"
    #: Scans at once; more wait their turn (clamd has MaxThreads workers).
    max_concurrent: _PosInt = 10
    #: "NAME: clamav at <hostname>" on every clean message scanned; "" = none.
    scanned_header: Annotated[str, _v(_field_name_or_off)] = ""


def _factory(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(
            r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        raise _Invalid(f'must be "package.module:name" (got {_show(value)})')
    return value


def _options(value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"must be a table (got {_show(value)})")
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class CustomAgentConfig(_AgentTable):
    """[agents.custom."NAME"]: an agent of your own (docs/agents.md)."""

    #: "package.module:name": called with ``options`` as keyword arguments plus ``timeout``
    #: and ``fail_open``, it returns the engine.agents.api.Agent.
    factory: Annotated[str, _v(_factory)] = ""
    #: Keyword arguments for the factory.
    options: Annotated[Mapping[str, Any], _v(_options)] = field(
        default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class AgentsConfig:
    """[agents]: the policy agents' settings (engine.agents); [[receive]] agents says which
    run for which connector, in what order."""

    __pydantic_config__ = _TABLE

    ratelimit: Annotated[RateLimitAgentConfig, _after(_check_ratelimit)] = field(
        default_factory=RateLimitAgentConfig)
    dnsbl: Annotated[DnsblAgentConfig, _after(_check_dnsbl)] = field(
        default_factory=DnsblAgentConfig)
    verify: VerifyAgentConfig = field(default_factory=VerifyAgentConfig)
    rspamd: RspamdAgentConfig = field(default_factory=RspamdAgentConfig)
    clamav: ClamavAgentConfig = field(default_factory=ClamavAgentConfig)
    custom: Mapping[str, CustomAgentConfig] = field(
        default_factory=lambda: MappingProxyType({}))


def _check_agent_names(config: Config) -> list[tuple[_Loc, str]]:
    """Every name in [[receive]] agents is a built-in agent or an [agents.custom] table,
    and a custom agent does not take a built-in's name."""
    bad: list[tuple[_Loc, str]] = []
    custom = config.agents.custom
    for name in custom:
        if name in BUILTIN_AGENTS:
            bad.append((("agents", "custom", name), f"{_show(name)} is the name of a built-in "
                                                    "agent (choose another)"))
        elif not custom[name].factory:
            bad.append((("agents", "custom", name, "factory"), "is required"))
    known = (*BUILTIN_AGENTS, *custom)
    lists: list[tuple[_Loc, tuple[str, ...]]] = [
        (("receive", i, "agents"), rc.agents) for i, rc in enumerate(config.receive)]
    lists.append((("http", "agents"), config.http.agents))
    for where, names in lists:
        for j, name in enumerate(names):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                bad.append(((*where, j), f"{_show(name)} is neither a built-in agent "
                                         f"({', '.join(BUILTIN_AGENTS)}) nor an "
                                         f"[agents.custom] table{hint}"))
    if "verify" in config.http.agents:
        bad.append((("http", "agents"), '"verify" checks mail from other servers, not '
                                        "injected mail"))
    return bad


# --- DKIM signing (engine.agents.dkim) -------------------------------------------------------

#: A header field name (RFC 5322 §3.6.8: printable ASCII but ":").
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def _selector(value: object) -> str:
    """A DKIM selector: one or more DNS labels (RFC 6376 §3.1 allows sub-selectors)."""
    if not isinstance(value, str) or _domain_problem(value) is not None:
        raise _Invalid(f"must be a selector: DNS labels of letters, digits and hyphens, "
                       f'such as "mail2024" (got {_show(value)})')
    return value.lower()


def _dkim_domain(value: object) -> str:
    return _hostname(value).lower()


def _field_name(value: str) -> str:
    if not _FIELD_NAME.fullmatch(value):
        raise _Invalid(f"is not a header field name (got {_show(value)})")
    return value.lower()


def _field_names(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_each(value, "header field names", _field_name)))


def _oversign(value: object) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if not isinstance(value, list):
        raise _Invalid(f"must be true, false or an array of header field names "
                       f"(got {_show(value)})")
    return _field_names(value)


@dataclass(frozen=True)
class DkimSignConfig:
    """[[dkim_sign]]: one DKIM signing key (engine.agents.dkim): outbound mail whose From:
    domain matches ``domain`` is signed with it before it is stored."""

    __pydantic_config__ = _TABLE

    #: The signing domain (d=, RFC 6376 §3.5); mail whose From: address is in it is signed.
    domain: Annotated[str, _v(_dkim_domain)]
    #: The selector (s=): the public key is published at SELECTOR._domainkey.DOMAIN.
    selector: Annotated[str, _v(_selector)]
    #: The private key, PEM: RSA of 2048 bits or more, or Ed25519 (the algorithm follows
    #: the key); checked when the server starts and by ``ferry config check``.
    key_file: Annotated[Path, _v(_existing_file)]
    #: The header fields to sign; empty = engine.message.dkim.DEFAULT_HEADERS.  From is
    #: always signed (RFC 6376 §5.4).
    headers: Annotated[tuple[str, ...], _v(_field_names)] = ()
    #: Over-sign (§5.4.2: list a field once more than the message has it, so no copy can
    #: be added): true for every signed field, false for none, or the fields to over-sign.
    oversign: Annotated[bool | tuple[str, ...], _v(_oversign)] = True
    #: Also sign mail whose From: domain is below ``domain`` (d= stays ``domain``: DMARC's
    #: relaxed alignment accepts it).
    subdomains: _Bool = False


def _check_dkim_sign(entries: tuple[DkimSignConfig, ...]) -> list[tuple[_Loc, str]]:
    """A (domain, selector) pair is given once."""
    seen: dict[tuple[str, str], int] = {}
    bad: list[tuple[_Loc, str]] = []
    for i, e in enumerate(entries):
        key = (e.domain, e.selector)
        if key in seen:
            bad.append(((i, "selector"), f"{_show(e.selector)} for {_show(e.domain)} is "
                                         f"already dkim_sign[{seen[key]}]"))
        seen.setdefault(key, i)
    return bad


def default_hostname() -> str:
    """The machine's fully qualified name, or "localhost" when it has none (a name without
    a dot is no use to other servers; engine.ops.startup warns about it at start)."""
    name = socket.getfqdn().rstrip(".")
    return name if "." in name and _domain_problem(name) is None else "localhost"


# --- limits shared by several nodes


def _redis_url(value: object) -> str:
    """A Redis URL: redis://, rediss:// (TLS) or unix:// (a socket path).  Its password is
    never echoed."""
    from urllib.parse import urlsplit

    if value == "":
        return ""
    if not isinstance(value, str):
        raise _Invalid(f'must be a "redis://host:port/db" URL (got {_show(value)})')
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as err:
        raise _Invalid(f"is not a valid URL: {err}") from None
    shown = _show(value) if "@" not in parts.netloc else "the value is not shown"
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _Invalid(f'must be a "redis://", "rediss://" or "unix://" URL ({shown})')
    if (parts.scheme == "unix" and not parts.path) or (
            parts.scheme != "unix" and not parts.hostname):
        raise _Invalid(f"must name a host (or a socket path for unix://) ({shown})")
    return value


def _share(value: object) -> float:
    number = _finite(value)
    if number is None or not 0 < number <= 1:
        raise _Invalid(f"must be a fraction above 0 and at most 1 (got {_show(value)})")
    return number


def _key_prefix(value: object) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise _Invalid(f'must be a non-empty text without spaces, like "ferry:" '
                       f"(got {_show(value)})")
    return value


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: per-site limits shared with other Ferry nodes through one Redis
    (engine.cluster.limits; docs/cluster.md).  No ``redis`` = no cluster, no Redis needed."""

    __pydantic_config__ = _TABLE

    #: The Redis every node of the cluster uses ("redis://host:6379/0"); "" = none.
    redis: Annotated[str, _v(_redis_url)] = field(default="", repr=False)
    #: This node's name in Redis (who holds a lease); "" = the server's hostname.
    node: Annotated[str, _v(_hostname_or_empty)] = ""
    #: The start of every key this cluster writes (two clusters may share one Redis).
    prefix: Annotated[str, _v(_key_prefix)] = "ferry:"
    #: A connection lease lives this long unless its node renews it (every third of it):
    #: how soon the leases of a node that died return to the others.
    lease_ttl: _Seconds = 30.0
    #: The longest one Redis call may take before the node falls back to its share.
    timeout: _Seconds = 0.5
    #: The part of each limit (connections, messages per second) a node uses on its own
    #: while Redis is unreachable; 1 / the number of nodes keeps the sum exact.
    share: Annotated[float, _v(_share)] = 0.5
    #: How often a node that lost Redis asks it again.
    probe_interval: _Seconds = 5.0
    #: How soon a site whose connections are all leased (by any node) asks again.
    lease_wait: _Seconds = 0.25
    #: How often a node reads the cluster's suspended destinations (the operator's
    #: suspend and resume on one node reach the others within this).
    sync_interval: _Seconds = 5.0


@dataclass(frozen=True)
class Config:
    """The whole configuration.  ``load_config`` builds it; nothing mutates it."""

    __pydantic_config__ = _TABLE

    hostname: Annotated[str, _v(_hostname)] = field(default_factory=default_hostname)
    spool: Annotated[Path, _v(_path)] = Path("./ferry-spool")
    #: Lower-case, no trailing dot; "*.example.com" matches every subdomain.
    accepted_domains: Annotated[tuple[str, ...], _v(_domains)] = ()
    #: Where RCPT TO:<Postmaster> goes (RFC 5321 §4.5.1); "" = postmaster@<hostname>.
    postmaster: Annotated[str, _v(_mailbox)] = ""
    #: user → password hash ("scrypt$...", engine.server.auth.hash_password); read-only.
    users: Annotated[Mapping[str, str], _v(_users)] = field(
        default_factory=lambda: MappingProxyType({}))
    queue: Annotated[QueueConfig, _after(_check_queue)] = field(default_factory=QueueConfig)
    receive: Annotated[
        tuple[Annotated[ReceiveConfig, _after(_check_receive)], ...], _after(_check_connectors)
    ] = field(default_factory=lambda: (ReceiveConfig(),))
    delivery: Annotated[DeliveryConfig, _after(_check_delivery)] = field(
        default_factory=DeliveryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    #: Send connectors, [[send]]; none (and no delivery.smarthost) = everything by DNS MX.
    send: tuple[Annotated[SendConfig, _after(_check_send)], ...] = ()
    #: Local (authoritative) domains, [[local]]; mail for them is accepted from anyone.
    local: tuple[Annotated[LocalConfig, _after(_check_local)], ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    http: Annotated[HttpConfig, _after(_check_http)] = field(default_factory=HttpConfig)
    #: Alert rules, [[alert]] (engine.ops.alerts); none = nothing is evaluated.
    alert: Annotated[tuple[Annotated[AlertConfig, _after(_check_alert)], ...],
                     _after(_check_alert_names)] = ()
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    #: Delivery webhooks, [[webhook]]; none = no events leave the server by HTTP.
    webhook: tuple[Annotated[WebhookConfig, _after(_check_webhook)], ...] = ()
    #: Settings of the policy agents (engine.agents), [agents.*].
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    #: DKIM signing keys, [[dkim_sign]] (engine.agents.dkim); none = nothing is signed.
    dkim_sign: Annotated[tuple[DkimSignConfig, ...], _after(_check_dkim_sign)] = ()
    #: Egress sources and pools, [egress] (engine.scheduler.shaping).
    egress: Annotated[EgressConfig, _after(_check_egress)] = field(default_factory=EgressConfig)
    #: Traffic shaping and automation on replies, [shaping] (docs/shaping.md).
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    #: The operator's bounce classes, [[bounce_rule]], tried before the shipped table.
    bounce_rule: tuple[Annotated[BounceRuleConfig, _after(_check_bounce_rule)], ...] = ()
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    #: Limits shared with other nodes through Redis, [cluster] (engine.cluster).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


#: Every table of the file and its dataclass ("" is the top level; "delivery.domains" the
#: tables inside [delivery.domains]).  The seam test and the "did you mean" read it.
TABLES: Final[Mapping[str, type]] = MappingProxyType({
    "": Config, "queue": QueueConfig, "receive": ReceiveConfig, "delivery": DeliveryConfig,
    "log": LogConfig, "send": SendConfig, "local": LocalConfig, "tracking": TrackingConfig,
    "delivery.domains": DomainLimits, "server": ServerConfig, "http": HttpConfig,
    "http.tokens": HttpToken, "alert": AlertConfig, "alerts": AlertsConfig,
    "webhook": WebhookConfig, "agents": AgentsConfig,
    "agents.ratelimit": RateLimitAgentConfig, "agents.dnsbl": DnsblAgentConfig,
    "agents.verify": VerifyAgentConfig, "agents.rspamd": RspamdAgentConfig,
    "agents.clamav": ClamavAgentConfig, "agents.custom": CustomAgentConfig,
    "agents.dnsbl.zones": DnsblZoneConfig,
    "dkim_sign": DkimSignConfig,
    "egress": EgressConfig, "egress.sources": EgressSource, "egress.pools": EgressPool,
    "shaping": ShapingConfig, "shaping.rules": ShapingRule,
    "shaping.automation": AutomationRule,
    "bounce_rule": BounceRuleConfig, "suppression": SuppressionConfig,
    "cluster": ClusterConfig,
})  # fmt: skip


# --- checks across tables ------------------------------------------------------------------


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


#: Names of the send connectors that engine.routing makes up: for delivery.smarthost, and
#: the DNS MX connector used when there is no [[send]] at all ("" for plain MX delivery).
IMPLICIT_SMARTHOST: Final = "delivery.smarthost"


def _check_config(config: Config) -> list[tuple[_Loc, str]]:
    """Connector names are unique (and not reserved), listen addresses do not collide, a
    local domain is listed once."""
    bad: list[tuple[_Loc, str]] = []
    names: dict[str, int] = {}
    bound: list[tuple[tuple[str, int], str]] = []
    for i, rc in enumerate(config.receive):
        if rc.name in names:
            bad.append((("receive", i, "name"), f"{_show(rc.name)} is already the name of "
                        f"receive[{names[rc.name]}] (names must be unique)"))
        names.setdefault(rc.name, i)
        for j, address in enumerate(rc.listen):
            here = f"receive[{i}].listen[{j}]"
            for other, where in bound:
                if _collide(address, other):
                    host, port = address
                    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    bad.append((("receive", i, "listen", j), f"{shown} collides with {where}"))
                    break
            bound.append((address, here))
    names = {}
    for i, sc in enumerate(config.send):
        if sc.name == IMPLICIT_SMARTHOST:
            bad.append((("send", i, "name"), f"{_show(sc.name)} is reserved for the connector "
                                             "that delivery.smarthost makes"))
        elif sc.name in names:
            bad.append((("send", i, "name"), f"{_show(sc.name)} is already the name of "
                                             f"send[{names[sc.name]}] (names must be unique)"))
        names.setdefault(sc.name, i)
    seen: dict[str, str] = {}
    for i, lc in enumerate(config.local):
        for j, domain in enumerate(lc.domains):
            if domain in seen:
                bad.append((("local", i, "domains", j),
                            f"{_show(domain)} is already listed at {seen[domain]}"))
            seen.setdefault(domain, f"local[{i}].domains[{j}]")
    bad += _check_inject(config)
    bad += _check_agent_names(config)
    bad += _check_pools(config)
    hooks: dict[str, int] = {}
    for i, w in enumerate(config.webhook):
        if w.name in hooks:
            bad.append((("webhook", i, "name"), f"{_show(w.name)} is already the name of "
                                                f"webhook[{hooks[w.name]}] (names must be unique)"))
        hooks.setdefault(w.name, i)
    return bad


def _check_pools(config: Config) -> list[tuple[_Loc, str]]:
    """Every pool a send connector or a shaping rule names is declared."""
    pools = config.egress.pools
    named: list[tuple[_Loc, str]] = [(("send", i, "pool"), sc.pool)
                                     for i, sc in enumerate(config.send)]
    named += [(("shaping", "rules", i, "pool"), r.pool)
              for i, r in enumerate(config.shaping.rules)]
    return [(loc, f"{_show(name)} is not a pool: add an [egress.pools.\"{name}\"] table")
            for loc, name in named if name and name not in pools]


def _check_inject(config: Config) -> list[tuple[_Loc, str]]:
    """Injected mail's receive connector name is its own: the log, ``ferry queue`` and
    the tracking log tell it from every [[receive]] connector."""
    for i, rc in enumerate(config.receive):
        if rc.name == config.http.connector:
            return [(("http", "connector"), f"{_show(rc.name)} is already the name of "
                                            f"receive[{i}] (names must be unique)")]
    return []


@functools.cache
def _adapter() -> TypeAdapter[Config]:
    # Built on first use: ``ferry --version`` and ``ferry queue`` never pay for it.
    return TypeAdapter(Annotated[Config, _after(_check_config)])


# --- error messages ------------------------------------------------------------------------


def dotted_key(loc: Sequence[str | int]) -> str:
    """A key's path as errors, ``ferry config`` and reloads name it: ``receive[0].listen``,
    ``delivery.domains."gmail.com".max_connections``."""
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
    """ "unknown key 'receive[0].max_mesage_size' (did you mean ...?)" for a key no table has."""
    parent, key = loc[:-1], str(loc[-1])
    # A table inside a table of named entries ([delivery.domains."x"]) has its own dataclass.
    table = f"{parent[0]}.{parent[1]}" if len(parent) == 3 else str(parent[0]) if parent else ""
    names = [f.name for f in dataclasses.fields(TABLES.get(table, Config))]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f" (did you mean '{dotted_key((*parent, close[0]))}'?)" if close else ""
    return f"unknown key '{dotted_key(loc)}'{hint}"


_ARRAYS_OF_TABLES: Final = (("receive",), ("send",), ("local",), ("alert",), ("webhook",),
                             ("dkim_sign",), ("bounce_rule",))
_NOT_A_TABLE: Final = ("dataclass_type", "dataclass_exact_type", "dict_type", "model_type")


def _problems(error: ValidationError) -> list[tuple[_Loc, str]]:
    """(key path, message) for every problem; unknown keys last, with no path (the message
    names the key)."""
    found: list[tuple[_Loc, str]] = []
    unknown: list[tuple[_Loc, str]] = []
    for err in error.errors():
        loc = err["loc"]
        kind = err["type"]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _Invalid):
            found.extend(((*loc, *at), msg) for at, msg in cause.problems)
            continue
        got = _show(err.get("input"))
        if kind == "unexpected_keyword_argument":
            unknown.append(((), _unknown_key(loc)))
        elif kind in ("missing", "missing_argument"):
            what = "entry" if loc[0] in ("webhook", "dkim_sign", "bounce_rule",
                                         "shaping") else "connector"
            found.append((loc, f"is required in a [[{loc[0]}]] {what}"))
        elif kind in ("list_type", "tuple_type") and loc in _ARRAYS_OF_TABLES:
            table = loc[0]
            found.append((loc, f"must be an array of tables: write [[{table}]], not [{table}] "
                               f"(got {got})"))
        elif kind in ("list_type", "tuple_type"):
            found.append((loc, f"must be an array (got {got})"))
        elif kind in _NOT_A_TABLE:
            found.append((loc, f"must be a table (got {got})"))
        else:  # pragma: no cover - every field has a checker; kept for safety
            found.append((loc, f"{err['msg']} (got {got})"))
    return found + unknown


# --- command-line flags ---------------------------------------------------------------------

#: The ``ferry serve`` flags that set a key, and the key (``receive[0]`` is the first
#: receive connector).  ``load_config`` merges them into the file's raw tables before
#: validation, so a flag's value meets the key's own checker and a problem names the flag.
#: ``--accept-domain`` adds to the file's accepted domains; every other flag replaces the
#: file's value.  A flag's value is the text given on the command line (a list of texts
#: for repeatable flags); a number key takes it as a TOML number when it reads as one.
FLAGS: Final[Mapping[str, _Loc]] = MappingProxyType({
    "--hostname": ("hostname",),
    "--spool": ("spool",),
    "--accept-domain": ("accepted_domains",),
    "--listen": ("receive", 0, "listen"),
    "--relay-from": ("receive", 0, "relay_networks"),
    "--smarthost": ("delivery", "smarthost"),
    "--dns": ("delivery", "dns"),
    "--mx-port": ("delivery", "mx_port"),
    "--max-per-domain": ("delivery", "max_per_domain"),
    "--retry-interval": ("delivery", "retry_interval"),
    "--log-level": ("log", "level"),
    "--http": ("http", "listen"),
    "--workers": ("server", "workers"),
})  # fmt: skip

_NUMBER_FLAGS: Final = frozenset({"--mx-port", "--max-per-domain", "--retry-interval",
                                   "--workers"})
_NUMBER = re.compile(r"[+-]?(\d+)(\.\d+)?([eE][+-]?\d+)?")


def _flag_value(flag: str, value: object, base: Path | None) -> object:
    """The flag's text as TOML would have given it for the key."""
    if not isinstance(value, str):
        return value
    if flag in _NUMBER_FLAGS:
        match = _NUMBER.fullmatch(value.strip())
        if match:
            return float(value) if match.group(2) or match.group(3) else int(value)
    if flag == "--spool" and base is not None and value and "\0" not in value:
        # A path on the command line is from the working directory, not from the file's.
        return os.path.join(os.getcwd(), os.path.expanduser(value))
    return value


def _table(raw: dict[str, Any], loc: _Loc) -> dict[str, Any] | None:
    """The table that holds ``loc``'s key, made when the file has none (the first
    [[receive]] too); None when the file's value there is not a table (its own problem)."""
    table: Any = raw
    for part, after in itertools.pairwise(loc):
        if isinstance(table, dict) and part not in table:
            table[part] = [{}] if isinstance(after, int) else {}
        try:
            table = table[part]
        except (KeyError, IndexError, TypeError):
            return None
    return table if isinstance(table, dict) else None


def _merge_flags(raw: dict[str, Any], flags: Mapping[str, object],
                 base: Path | None) -> dict[_Loc, str]:
    """Put the flags' values into ``raw``; the key path each flag set → the flag."""
    origins: dict[_Loc, str] = {}
    for flag, given in flags.items():
        loc = FLAGS[flag]
        value = _flag_value(flag, given, base)
        table = _table(raw, loc)
        if table is None:
            continue
        key = str(loc[-1])
        if flag == "--accept-domain" and key in table:
            if not isinstance(table[key], list):
                continue  # the flag adds to the file's list: a bad value stays the file's
            start = len(table[key])
            table[key] = [*table[key], *cast(list[object], value)]
            origins.update({(*loc, i): flag for i in range(start, len(table[key]))})
        else:
            table[key] = value
            origins[loc] = flag
    return origins


def _line(loc: _Loc, message: str, origins: Mapping[_Loc, str]) -> str:
    if not loc:
        return message
    flag = next((f for at, f in origins.items() if loc[: len(at)] == at), None)
    return f"{dotted_key(loc)}{f' ({flag})' if flag else ''}: {message}"


def name_flags(lines: Sequence[str], flags: Iterable[str]) -> list[str]:
    """Problem lines of checks made after loading ("spool: ..."), with the flag that set
    the key named as :func:`load_config` names it ("spool (--spool): ...")."""
    keys = {dotted_key(FLAGS[flag]): flag for flag in flags}
    out: list[str] = []
    for line in lines:
        key, sep, rest = line.partition(": ")
        flag = next((f for k, f in keys.items()
                     if key == k or key.startswith((f"{k}.", f"{k}["))), None)
        out.append(f"{key} ({flag}): {rest}" if flag and sep else line)
    return out


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


def load_config(path: str | os.PathLike[str] | None,
                flags: Mapping[str, object] | None = None) -> Config:
    """Read, validate and return the configuration; ConfigError lists every problem.

    ``path=None`` loads :data:`DEFAULT_TOML`.  ``flags`` (``ferry serve`` flags that were
    given, by name, see :data:`FLAGS`) win over the file.  ``log.protocol_log_dir`` is
    filled in (``spool / "log"``) when the file leaves it out, so it follows the spool.
    """
    if path is None:
        raw = tomllib.loads(DEFAULT_TOML)
        base: Path | None = None
    else:
        raw = _read(path)
        base = Path(os.fspath(path)).absolute().parent
    origins = _merge_flags(raw, flags or {}, base)
    try:
        config = _adapter().validate_python(raw, context={"base": base})
    except ValidationError as err:
        raise ConfigError([_line(loc, msg, origins) for loc, msg in _problems(err)]) from None
    if config.log.protocol_log_dir is None:
        log = dataclasses.replace(config.log, protocol_log_dir=config.spool / "log")
        config = dataclasses.replace(config, log=log)
    return config


def tracking_dir(spool: Path) -> Path:
    """Where the tracking log is when ``[tracking] dir`` is not set: the server writes
    there and ``ferry track --spool`` looks there."""
    return spool / "log" / "tracking"

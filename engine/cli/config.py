"""``ferry config check`` and ``ferry config show``: the configuration as Ferry would use it.

``check`` loads the file with the same flags ``ferry serve`` takes, then runs the checks of
``engine.ops.preflight`` (files, directories, cross-field advice), and lists every problem,
one line each starting with its dotted key: exit 0 when the server would start with it, 2
when not.  ``show`` prints the effective configuration (file, defaults and flags merged)
as TOML, or JSON with ``--json``; it never prints a password or a password hash.

Neither opens the queue, binds a socket or creates anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.cli.common import add_key_flags, flags_from, load_from_args
from engine.config import Config, ConfigError, name_flags

#: What a secret is shown as; it still passes the key's checker, so ``show``'s output
#: loads again (with the secrets to fill in).
MASKED_HASH = "scrypt$(masked)"
MASKED = "(masked)"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser(
        "config", help="check the configuration, or show it as Ferry would use it",
        description="Check a configuration file (and the files it names), or print the "
        "effective configuration. Takes the flags of ferry serve, which win over the file.")
    sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check", help="list every problem, one per line (exit 0: good, 2: problems)",
        description="Load the configuration as ferry serve would, check the certificate "
        "and key files, the CA file and the spool directory, and the settings that load but "
        "would not work. Exit 0 when ferry serve would start with it, 2 when not.")
    add_key_flags(check)
    show = sub.add_parser(
        "show", help="print the effective configuration (defaults and flags merged), "
        "secrets masked",
        description="Print the configuration after defaults and flags, as TOML (or JSON); "
        "passwords and password hashes are masked.")
    add_key_flags(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")


# --- show ------------------------------------------------------------------------------


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plain(value: object) -> Any:
    """The value as the file would write it (strings, numbers, arrays, tables)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # None and "" mean "not set" (derived or off); TOML has no null, and the keys'
        # checkers refuse "", so they are left out as a file would leave them out.  A
        # secret is declared with repr=False (engine.config: auth_password): masked.
        return {f.name: _plain(getattr(value, f.name)) if f.repr else MASKED
                for f in dataclasses.fields(value) if getattr(value, f.name) not in (None, "")}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return _hostport(value[0], value[1])
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def effective(config: Config) -> dict[str, Any]:
    """The configuration as plain data, secrets masked."""
    data: dict[str, Any] = _plain(config)
    data["users"] = {user: MASKED_HASH for user in config.users}
    return data


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    return name if _BARE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (the same escapes).
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(_value(v) for v in value) + "]"


def _is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text for ``data``: its plain keys first, then its tables and arrays of tables."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and not _is_tables(v)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + to_toml(v, name)
        elif _is_tables(v):
            for table in v:
                out += f"\n[[{name}]]\n" + to_toml(table, name)
    return out


# --- the command ----------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from engine.ops.preflight import advice, file_problems

    where = args.config or "the embedded default"
    try:
        config = load_from_args(args)
    except ConfigError as exc:
        problems: list[str] = list(exc.problems)
        warnings: list[str] = []
    else:
        problems, warnings = advice(config)
        given = flags_from(args)
        problems = name_flags(file_problems(config) + problems, given)
        warnings = name_flags(warnings, given)
    for line in problems:
        print(line)
    for line in warnings:
        print(f"warning: {line}")
    if problems:
        print(f"ferry config: {len(problems)} problem{'s' if len(problems) > 1 else ''} "
              f"in {where}", file=sys.stderr)
        return 2
    print(f"ferry config: {where} is good", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        config = load_from_args(args)
    except ConfigError as exc:
        print(f"ferry: configuration error: {exc}", file=sys.stderr)
        return 2
    data = effective(config)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        source = args.config or "the embedded default"
        print(f"# The effective configuration: {source}, defaults and flags; secrets "
              f"masked.\n{to_toml(data)}", end="")
    return 0


def config_main(args: argparse.Namespace) -> int:
    return _check(args) if args.config_command == "check" else _show(args)

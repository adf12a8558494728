"""What every ``ferry`` subcommand shares: ``--config``, the spool it names, the flags that
set configuration keys.

A subcommand calls :func:`add_config_argument` (and :func:`add_spool_argument` when it
reads the spool) at its argument setup, then :func:`spool_from` for the spool directory:
``--spool`` when given, else the configuration file's ``spool``, else the embedded
default's.  ``ferry serve`` and ``ferry config`` take the key flags (:func:`add_key_flags`,
one argparse line per row of ``engine.config.FLAGS``) and load with
:func:`load_from_args`.  This module prints nothing and never exits.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import Config

DEFAULT_SPOOL = "./ferry-spool"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: the embedded default)")


def add_spool_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool", metavar="DIR",
                        help="spool directory (default: the configuration's spool, "
                        f"{DEFAULT_SPOOL} without --config)")


def spool_from(args: argparse.Namespace) -> Path:
    """The spool directory: ``--spool``, else ``--config``'s ``spool``, else the default.

    ConfigError when the configuration file has to be read and cannot be used.
    """
    spool = getattr(args, "spool", None)
    if spool:
        return Path(spool)
    if getattr(args, "config", None) is None:
        return Path(DEFAULT_SPOOL)
    from engine.config import load_config

    return load_config(args.config).spool


def add_key_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that set a configuration key (``engine.config.FLAGS``), and --config."""
    add_config_argument(parser)
    parser.add_argument("--listen", metavar="HOST:PORT", action="append", default=[],
                        help="listen address of the first receive connector (repeatable)")
    parser.add_argument("--spool", metavar="DIR", help="spool directory (queue, logs)")
    parser.add_argument("--relay-from", metavar="CIDR", action="append", default=[],
                        help="clients allowed to relay without AUTH (repeatable)")
    parser.add_argument("--accept-domain", metavar="DOMAIN", action="append", default=[],
                        help="accept mail for this domain from anyone (repeatable)")
    parser.add_argument("--smarthost", metavar="HOST:PORT",
                        help="route all outbound mail here")
    parser.add_argument("--hostname", metavar="NAME",
                        help="this server's name (greeting, Received fields)")
    parser.add_argument("--dns", metavar="HOST:PORT", help="resolve with this nameserver")
    parser.add_argument("--mx-port", metavar="PORT",
                        help="connect to MX hosts on this port instead of 25")
    parser.add_argument("--max-per-domain", metavar="N",
                        help="default concurrent connections per destination")
    parser.add_argument("--retry-interval", metavar="DURATION",
                        help='first retry delay, seconds or "30s", "5m", "4h"; the backoff '
                        "grows from it")
    parser.add_argument("--http", metavar="HOST:PORT", action="append", default=[],
                        help="HTTP listener for metrics, health and the APIs (repeatable; "
                        "[http] listen)")
    parser.add_argument("--workers", metavar="N",
                        help='worker processes, each on a core and a queue shard of its own '
                        '("auto": one per core; [server] workers)')
    parser.add_argument("--log-level", metavar="LEVEL",
                        help="debug, info, warning or error (default: [log] level, info)")


def flags_from(args: argparse.Namespace) -> dict[str, object]:
    """The key flags given on the command line, by name (``engine.config.FLAGS``)."""
    from engine.config import FLAGS

    # Every flag but --config sets a configuration key: its value is checked there.
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in FLAGS}
    return {k: v for k, v in given.items() if v not in (None, [])}


def load_from_args(args: argparse.Namespace) -> Config:
    """The configuration from ``--config`` and the key flags given; ConfigError if bad."""
    from engine.config import load_config

    return load_config(args.config, flags_from(args))

"""Entry point of the ``ferry`` console script.

Parses arguments and prints; it holds no logic of its own and must never import the
compiled modules directly (``engine._speedups`` reports which implementation is active).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

from engine import __version__, _speedups
from engine.cli import queue


def version_text() -> str:
    return (
        f"ferry {__version__} (Python {platform.python_version()}, "
        f"{platform.python_implementation()})\n{_speedups.status()}"
    )


class _VersionAction(argparse.Action):
    """Like argparse's version action, but computes the text only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kw: object) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Ferry: a high-throughput SMTP delivery engine."
    )
    parser.add_argument(
        "--version", action=_VersionAction, nargs=0, help="print the version and which "
        "wire implementation (compiled or pure Python) is active, then exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the MTA (an embedded default when no --config is given)",
        description="Run Ferry. Flags override the configuration file.")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT", action="append", default=[],
                       help="listen address of the first receive connector (repeatable)")
    serve.add_argument("--spool", metavar="DIR", help="spool directory (queue, logs)")
    serve.add_argument("--relay-from", metavar="CIDR", action="append", default=[],
                       help="clients allowed to relay without AUTH (repeatable)")
    serve.add_argument("--accept-domain", metavar="DOMAIN", action="append", default=[],
                       help="accept mail for this domain from anyone (repeatable)")
    serve.add_argument("--smarthost", metavar="HOST:PORT", help="route all outbound mail here")
    serve.add_argument("--hostname", metavar="NAME", help="this server's name (greeting, "
                       "Received fields)")
    serve.add_argument("--dns", metavar="HOST:PORT", help="resolve with this nameserver")
    serve.add_argument("--mx-port", metavar="PORT",
                       help="connect to MX hosts on this port instead of 25")
    serve.add_argument("--max-per-domain", metavar="N",
                       help="default concurrent connections per destination")
    serve.add_argument("--retry-interval", metavar="SECONDS",
                       help="first retry delay; the backoff grows from it")
    serve.add_argument("--log-level", metavar="LEVEL",
                       help="debug, info, warning or error (default: [log] level, info)")
    commands.add_parser("passwd", help="print a password hash for the [users] table",
                        add_help=False)
    queue.add_parser(commands)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from engine.config import FLAGS, ConfigError, load_config

    # Every flag but --config sets a configuration key: its value is checked there.
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in FLAGS}
    try:
        config = load_config(args.config, {k: v for k, v in given.items() if v not in (None, [])})
    except ConfigError as exc:
        print(f"ferry: configuration error: {exc}", file=sys.stderr)
        return 2
    # Where log lines are written; [log] level and format are applied by engine.app.
    from engine.ops import logfmt

    logfmt.install(sys.stderr)
    import uvloop

    from engine.app import serve

    try:
        return uvloop.run(serve(config))
    except OSError as exc:  # e.g. the listen address is taken
        print(f"ferry: cannot start: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["passwd"]:
        from engine.server.auth import passwd_main

        return passwd_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "queue":
        return queue.queue_main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the ``ferry`` console script.

Parses arguments and prints; it holds no logic of its own and must never import the
compiled modules directly (``engine._speedups`` reports which implementation is active).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence

from engine import __version__, _speedups
from engine.cli import config, dkim, queue, reload, suppress, track
from engine.cli.common import add_key_flags, flags_from, load_from_args, spool_from
from engine.server.auth import PASSWD_DESCRIPTION, add_passwd_arguments


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
    add_key_flags(serve)
    passwd = commands.add_parser("passwd", help="print a password hash for the [users] table",
                                 description=PASSWD_DESCRIPTION)
    add_passwd_arguments(passwd)
    queue.add_parser(commands)
    track.add_parser(commands)
    config.add_parser(commands)
    reload.add_parser(commands)
    dkim.add_parser(commands)
    suppress.add_parser(commands)
    man = commands.add_parser(
        "man", help="print a manual page (roff), or write them all",
        description="Print the manual page of ferry or of one of its commands, in roff "
        "(man -l - reads it), or write every page into a directory.")
    page = man.add_argument("page", metavar="COMMAND", nargs="?",
                            help="the command whose page to print (default: ferry's own)")
    man.add_argument("--write", metavar="DIR", help="write ferry.1 and ferry-COMMAND.1 for "
                     "every command into DIR instead")
    completion = commands.add_parser(
        "completion", help="print a shell completion script (bash or zsh)",
        description="Print a completion script for ferry: source <(ferry completion bash), "
        "or source <(ferry completion zsh) in ~/.zshrc after compinit.")
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    page.choices = list(commands.choices)  # every command, this one and those after it too
    return parser


def run_man(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.cli import manpage

    if args.write:
        for path in manpage.write_pages(parser, Path(args.write)):
            print(path)
        return 0
    print(manpage.page(parser, args.page), end="")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from engine.config import ConfigError
    from engine.ops.preflight import check_files

    try:
        config = load_from_args(args)
        # Before the queue opens: certificates and keys, the spool (engine.ops.preflight).
        check_files(config, flags_from(args))
    except ConfigError as exc:
        print(f"ferry: configuration error: {exc}", file=sys.stderr)
        return 2
    # Where log lines are written; [log] level and format are applied by engine.app.
    from engine.ops import logfmt

    logfmt.install(sys.stderr)
    import uvloop

    from engine.app import serve
    from engine.cluster.fanout import node_control
    from engine.cluster.node import coordinator_for
    from engine.cluster.supervisor import node_size, supervise

    path = args.config  # read again, with the same flags, at each reload
    try:
        if node_size(config) > 1:
            return uvloop.run(supervise(config, path, flags_from(args),
                                        services=[coordinator_for, node_control]))
        return uvloop.run(serve(config, path, flags_from(args)))
    except OSError as exc:  # e.g. the listen address is taken
        print(f"ferry: cannot start: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; output to a closed pipe (``ferry queue list | head``) ends quietly."""
    try:
        try:
            code = _dispatch(list(sys.argv[1:] if argv is None else argv))
        finally:  # also after --help and --version (SystemExit): fail here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice (signal module docs, "Note on SIGPIPE"): point stdout at
        # /dev/null so the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe stopped
    return code


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["passwd"]:
        from engine.server.auth import passwd_main

        return passwd_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "queue":
        from engine.config import ConfigError

        try:
            args.spool = str(spool_from(args))
        except ConfigError as exc:
            print(f"ferry: configuration error: {exc}", file=sys.stderr)
            return 2
        return queue.queue_main(args)
    if args.command == "reload":
        from engine.config import ConfigError

        try:
            args.spool = str(spool_from(args))
        except ConfigError as exc:
            # The spool (and so the server) is named by the file that does not load: the
            # same problems would refuse the reload.
            print(f"ferry reload: configuration error (the server was not asked; --spool "
                  f"asks it anyway):\n{exc}", file=sys.stderr)
            return 2
        return reload.reload_main(args)
    if args.command == "suppress":
        from engine.config import ConfigError

        try:
            args.spool = str(spool_from(args))
        except ConfigError as exc:
            print(f"ferry: configuration error: {exc}", file=sys.stderr)
            return 2
        return suppress.suppress_main(args)
    if args.command == "config":
        return config.config_main(args)
    if args.command == "man":
        return run_man(parser, args)
    if args.command == "completion":
        from engine.cli.completion import script

        print(script(parser, args.shell), end="")
        return 0
    if args.command == "track":
        return track.track_main(args)
    if args.command == "dkim":
        return dkim.dkim_main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

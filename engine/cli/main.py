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
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

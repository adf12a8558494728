"""``ferry reload``: ask the running ``ferry serve`` to read its configuration again.

The server reads the file and the flags it was started with (``--config`` here only finds
the spool, and so the control socket: ``engine.ops.control``); this command prints what
it answered.  Exit status: 0 applied (keys that need a restart are listed, the rest runs),
2 the configuration was refused (its problems are printed; the server runs on with the
configuration it had), 1 no server answered.  It holds no logic of its own.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import add_config_argument, add_spool_argument

DESCRIPTION = (
    "Make the running ferry serve read its configuration file (and the flags it was "
    "started with) again and apply it without a restart: routes, send connectors, limits, "
    "accepted domains, users, tokens, TLS certificates. A configuration with a problem is "
    "refused whole and the server keeps the one it runs. Exit status 2 when refused, 1 "
    "when no server answers. SIGHUP to the server does the same.")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "reload", help="make the running server re-read its configuration",
        description=DESCRIPTION)
    add_config_argument(parser)
    add_spool_argument(parser)  # engine.cli.main resolves it (spool_from) before reload_main


def reload_main(args: argparse.Namespace) -> int:
    from engine.ops import control

    try:
        reply = control.request(control.socket_path(args.spool), {"command": "reload"})
    except (OSError, ValueError) as exc:  # ControlUnavailable, a timeout, a bad reply
        print(f"ferry reload: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        errors = reply.get("errors")
        if not isinstance(errors, list):  # not a refused configuration: the request failed
            print(f"ferry reload: the server refused: {reply.get('error')}", file=sys.stderr)
            return 1
        print("ferry reload: configuration refused; the server runs on with the one it "
              "had:", file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    applied, restart = reply.get("applied", []), reply.get("restart", [])
    count = len(applied)
    print(f"reloaded: {count} change{'' if count == 1 else 's'} applied" if applied else
          "reloaded: nothing to change")
    for key in applied:
        print(f"  applied: {key}")
    for item in restart:
        print(f"  needs a restart: {item.get('key')} ({item.get('why')})")
    return 0

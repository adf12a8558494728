"""``ferry suppress``: the suppression list (add, remove, list; docs/suppression.md).

With a running ``ferry serve`` on the spool, every action goes through its control socket
(``engine.ops.control``: the server's list in memory and its queue writer change
together); with none, the queue database is opened directly, under the spool's lock (so
no server can start meanwhile): on a stopped node of several workers, ``add`` and
``remove`` change every shard's list (each worker keeps its own: engine.cluster.shards),
``list`` shows worker 0's, as the running node's control channel does.  It holds no
logic of its own: the list is ``engine.queue.suppression``, the operations
``engine.ops.suppressions``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from engine.cli.common import add_config_argument, add_spool_argument
from engine.config import BOUNCE_CATEGORIES

DESCRIPTION = (
    "The suppression list: recipients whose mail is refused at RCPT (clients that may "
    "relay) and at injection over HTTP. Hard bounces add to it by themselves ([suppression] "
    "auto_categories); these actions add, remove and list entries, through the running "
    "server when one runs on the spool, else in the queue database directly.")

_CHOICES = ", ".join(BOUNCE_CATEGORIES)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("suppress", help="add, remove and list suppressed "
                                 "recipients", description=DESCRIPTION)
    add_config_argument(parser)
    add_spool_argument(parser)  # engine.cli.main resolves it (spool_from) first
    sub = parser.add_subparsers(dest="suppress_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="suppress an address (it replaces an entry there)")
    add.add_argument("address")
    add.add_argument("--reason", default="", help="why (shown in the refusal)")
    add.add_argument("--category", default="", choices=BOUNCE_CATEGORIES, metavar="CATEGORY",
                     help=f"a bounce category to file it under: {_CHOICES}")
    remove = sub.add_parser("remove", help="take an address off the list")
    remove.add_argument("address")
    lister = sub.add_parser("list", help="the entries, in address order")
    lister.add_argument("--json", action="store_true", help="one JSON object per line")
    lister.add_argument("--category", default="", choices=BOUNCE_CATEGORIES,
                        metavar="CATEGORY",
                        help=f"only the entries of this bounce category: {_CHOICES}")


def _fail(text: str) -> int:
    print(f"ferry suppress: {text}", file=sys.stderr)
    return 1


def _ask(spool: str, message: dict[str, Any]) -> dict[str, Any] | None:
    """The running server's reply; None when no server runs on the spool.  Raises
    RuntimeError with the server's refusal."""
    from engine.ops import control

    try:
        reply = control.request(control.socket_path(spool), message)
    except control.ControlUnavailable:
        return None
    if not reply.get("ok"):
        raise RuntimeError(f"the server refused: {reply.get('error')}")
    return reply


def _every_shard(spool: str, action: Callable[[Any], int], create: bool = False) -> int:
    """``action(store)`` on the queue database of every shard of a stopped node (each
    worker keeps its own suppression list: engine.cluster.shards), shard 0 first."""
    from engine.cluster.shards import shard_indexes, shard_spool

    for index in shard_indexes(Path(spool)):
        status = _stopped(str(shard_spool(Path(spool), index)), action, create)
        if status:
            return status
    return 0


def _stopped(spool: str, action: Callable[[Any], int], create: bool = False) -> int:
    """``action(store)`` on the queue database of a spool no server runs on."""
    import lmdb

    from engine.ops.daemon import SpoolBusy, SpoolLock, StartError
    from engine.queue.lmdb_store import LmdbQueue

    path = Path(spool) / "queue"
    if not create and not (path / "data.mdb").exists():
        return _fail(f"no queue database in {path}")
    Path(spool).mkdir(parents=True, exist_ok=True)
    lock = SpoolLock(Path(spool))
    try:
        lock.acquire()
    except SpoolBusy as exc:  # a server runs, but its control socket does not answer
        return _fail(f"{exc}; its control socket does not answer")
    except StartError as exc:
        return _fail(str(exc))
    try:
        store = LmdbQueue(path, min_free_disk=0)
    except (OSError, lmdb.Error) as exc:
        lock.release()
        return _fail(f"cannot open the queue database in {path}: {exc}")
    try:
        return action(store)
    finally:
        store.close_sync()
        lock.release()


def _print(entry: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(entry) + b"\n")
        return
    added = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["added"]))
    print(f"{entry['address']:<40} {entry['category'] or '-':<12} {entry['source']:<9} "
          f"{added}  {entry['reason']}")


def _add(args: argparse.Namespace) -> int:
    from engine.queue.suppression import SuppressionError, add_stopped

    reply = _ask(args.spool, {"command": "suppress", "address": args.address,
                              "reason": args.reason, "category": args.category})
    added: list[str] = [reply["address"]] if reply is not None else []
    if reply is None:
        def stopped(store: Any) -> int:
            try:
                added.append(add_stopped(store, args.address, args.reason,
                                         args.category).address)
            except SuppressionError as exc:
                return _fail(str(exc))
            return 0

        status = _every_shard(args.spool, stopped, create=True)
        if status:
            return status
    print(f"suppressed {added[0]}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from engine.queue.suppression import SuppressionError, remove_stopped

    reply = _ask(args.spool, {"command": "unsuppress", "address": args.address})
    if reply is not None:
        removed = bool(reply["removed"])
    else:
        found: list[bool] = []

        def stopped(store: Any) -> int:
            try:
                found.append(remove_stopped(store, args.address))
            except SuppressionError as exc:
                return _fail(str(exc))
            return 0

        status = _every_shard(args.spool, stopped)
        if status:
            return status
        removed = any(found)
    if not removed:
        return _fail(f"{args.address} is not suppressed")
    print(f"removed {args.address} from the suppression list")
    return 0


def _entries(args: argparse.Namespace) -> Iterator[dict[str, Any]] | None:
    """The entries, page by page from the server; None when no server runs."""
    first = _ask(args.spool, {"command": "suppressions", "category": args.category})
    if first is None:
        return None

    def pages(reply: dict[str, Any]) -> Iterator[dict[str, Any]]:
        while True:
            yield from reply["entries"]
            if not reply["next"]:
                return
            nxt = _ask(args.spool, {"command": "suppressions", "category": args.category,
                                    "after": reply["next"]})
            if nxt is None:
                raise RuntimeError("the server went away")
            reply = nxt

    return pages(first)


def _list(args: argparse.Namespace) -> int:
    from engine.queue.suppression import read_entries

    entries = _entries(args)
    shown = 0
    if entries is None:
        def stopped(store: Any) -> int:
            nonlocal shown
            for entry in read_entries(store):
                if not args.category or entry.category == args.category:
                    _print(entry.to_json(), args.json)
                    shown += 1
            return 0

        status = _stopped(args.spool, stopped)
        if status:
            return status
    else:
        for doc in entries:
            _print(doc, args.json)
            shown += 1
    if not shown and not args.json:
        print("no address is suppressed", file=sys.stderr)
    return 0


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": _add, "remove": _remove, "list": _list}


def suppress_main(args: argparse.Namespace) -> int:
    try:
        return _ACTIONS[args.suppress_command](args)
    except (OSError, ValueError, RuntimeError) as exc:  # a timeout, a bad reply, a refusal
        return _fail(str(exc))

"""``ferry queue``: the queue viewer (list, show, stats) over the queue database.

Reads through ``LmdbQueue`` (LMDB lets it share the spool with a running ``ferry serve``);
it prints and changes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import CORRUPT, Envelope, RcptState, RecordError, id_bytes, id_text

STATES = [s.value for s in RcptState if s not in (RcptState.DELIVERED,)] + [CORRUPT]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser("queue", help="look at the queue (list, show, stats)",
                                description="The queue viewer. It changes nothing.")
    queue.add_argument("--spool", metavar="DIR", default="./ferry-spool",
                       help="spool directory (default ./ferry-spool)")
    sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    lister = sub.add_parser("list", help="queued messages, oldest first")
    lister.add_argument("--state", choices=STATES, help="only messages with a recipient "
                        "in this state")
    lister.add_argument("--destination", metavar="DEST", help="only messages with recipients "
                        "waiting for this destination (a domain, local:<domain>, [literal])")
    lister.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    show = sub.add_parser("show", help="one message: envelope, recipients, headers")
    show.add_argument("queue_id")
    sub.add_parser("stats", help="how many messages, recipients by state, corrupt records")


def _span(seconds: float) -> str:
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _age(arrival: float) -> str:
    return _span(time.time() - arrival)


def _summary(env: Envelope) -> str:
    states = Counter(r.state.value for r in env.recipients)
    return " ".join(f"{n} {state}" for state, n in sorted(states.items()))


def _ids(store: LmdbQueue, args: argparse.Namespace) -> list[bytes]:
    if args.destination:
        return store.ids_for_hop(args.destination, args.limit)
    if args.state:
        return store.ids_in_state(args.state, args.limit)
    seen: dict[bytes, None] = {}
    for state in (RcptState.PENDING, RcptState.DEFERRED, RcptState.SUSPENDED):
        for qid in store.ids_in_state(state.value, args.limit):
            seen[qid] = None
    return sorted(seen)[: args.limit]


def _list(store: LmdbQueue, args: argparse.Namespace) -> int:
    print(f"{'queue id':<24}  {'age':>5}  {'size':>9}  sender → recipients")
    for qid in _ids(store, args):
        try:
            env = store.get(qid)
        except KeyError:
            continue
        except RecordError as exc:
            print(f"{id_text(qid):<24}  corrupt: {exc}")
            continue
        print(f"{id_text(qid):<24}  {_age(env.arrival):>5}  {env.size:>9}  "
              f"<{env.sender}> → {len(env.recipients)} ({_summary(env)})")
    return 0


def _show(store: LmdbQueue, args: argparse.Namespace) -> int:
    try:
        qid = id_bytes(args.queue_id)
        env = store.get(qid)
    except (ValueError, KeyError):
        print(f"ferry queue: no message {args.queue_id}", file=sys.stderr)
        return 1
    except RecordError as exc:
        print(f"{args.queue_id}: corrupt record: {exc}")
        return 1
    print(f"queue id:   {id_text(qid)}\narrival:    {time.ctime(env.arrival)} "
          f"({_age(env.arrival)} ago)\nexpires:    "
          f"{time.ctime(env.expires) if env.expires else 'never'}\nsender:     <{env.sender}>"
          f"\nsize:       {env.size}\nmessage-id: {env.message_id}\nfrom:       "
          f"{env.client_address} via {env.receive_connector}"
          + (f" as {env.auth_user}" if env.auth_user else ""))
    for r in env.recipients:
        wait = r.due - time.time()
        when = f", next try in {_span(wait)}" if wait > 0 else ""
        print(f"  <{r.address}> → {r.next_hop}: {r.state.value}, {r.attempts} attempts{when}")
        if r.last_reply:
            print(f"      last reply: {r.last_reply}")
    body = store.body(qid)
    print("\n" + body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace"))
    return 0


def _stats(store: LmdbQueue, args: argparse.Namespace) -> int:
    print(f"messages: {store.count()}")
    for state in STATES:
        print(f"  with {state} recipients: {len(store.ids_in_state(state, 10**9))}")
    for qid, reason in store.corrupt():
        print(f"corrupt {id_text(qid)}: {reason}")
    return 0


def queue_main(args: argparse.Namespace) -> int:
    path = Path(args.spool) / "queue"
    if not (path / "data.mdb").exists():
        print(f"ferry queue: no queue database in {path}", file=sys.stderr)
        return 1
    store = LmdbQueue(path, min_free_disk=0)
    try:
        action = {"list": _list, "show": _show, "stats": _stats}[args.queue_command]
        return action(store, args)
    finally:
        store.close_sync()

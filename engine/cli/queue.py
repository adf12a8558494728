"""``ferry queue``: the queue viewer (list, show, stats) and the operator's controls
(suspend, resume, suspended; hold, release, remove, retry).

The viewer reads through the ``QueueStore`` interface (the LMDB store: LMDB lets it share
the spool with a running ``ferry serve``) and changes nothing.  The controls never touch
the queue database: they ask the running server over its control socket
(``engine.ops.control``), which does the work, so there is one writer and the server's
memory agrees with the queue.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.ops import control
from engine.queue.api import QueueStore
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import CORRUPT, Envelope, RcptState, RecordError, id_bytes, id_text

STATES = [s.value for s in RcptState if s not in (RcptState.DELIVERED,)] + [CORRUPT]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser(
        "queue", help="look at the queue (list, show, stats); suspend and resume destinations; "
        "hold, release, remove and retry messages",
        description="The queue viewer (list, show, stats: they change nothing) and the "
        "controls of a running ferry serve (suspend, resume, suspended; hold, release, "
        "remove, retry).")
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
    for name, what in (("suspend", "hold the mail for DEST in the running server (it stays "
                        "queued, state suspended) until resumed"),
                       ("resume", "deliver DEST's mail again")):
        action = sub.add_parser(name, help=what)
        action.add_argument("destination", metavar="DEST", help="a domain, local:<domain> "
                            "or [address literal], as `ferry queue list` shows it")
    sub.add_parser("suspended", help="the destinations the running server holds")
    for name, what in (("hold", "hold messages in the running server: never delivered "
                        "nor expired until released"),
                       ("release", "release held or poisoned messages: delivered now, "
                        "their lifetime counting from here")):
        action = sub.add_parser(name, help=what)
        action.add_argument("ids", metavar="ID", nargs="+", help="queue ids, as `ferry "
                            "queue list` shows them")
    remove = sub.add_parser("remove", help="delete messages from the queue of the running "
                            "server")
    remove.add_argument("ids", metavar="ID", nargs="+", help="queue ids")
    remove.add_argument("--report", action="store_true", help="send the sender a "
                        "non-delivery report (one per message) for the recipients not "
                        "yet delivered")
    remove.add_argument("--yes", action="store_true", help="needed to remove more than "
                        "one message")
    retry = sub.add_parser("retry", help="try now, ignoring the retry time: a "
                           "destination's deferred mail, or messages (--message)")
    retry.add_argument("destination", metavar="DEST", nargs="?", help="a domain, "
                       "local:<domain> or [address literal]; its site's down mark is "
                       "cleared too")
    retry.add_argument("--message", metavar="ID", nargs="+", dest="ids", help="these "
                       "messages instead of a destination")


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


def _ids(store: QueueStore, args: argparse.Namespace) -> list[bytes]:
    if args.destination:
        return store.ids_for_hop(args.destination, args.limit)
    if args.state:
        return store.ids_in_state(args.state, args.limit)
    seen: dict[bytes, None] = {}
    for state in (RcptState.PENDING, RcptState.DEFERRED, RcptState.SUSPENDED,
                  RcptState.HELD, RcptState.POISON):
        for qid in store.ids_in_state(state.value, args.limit):
            seen[qid] = None
    return sorted(seen)[: args.limit]


def _list(store: QueueStore, args: argparse.Namespace) -> int:
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


def _show(store: QueueStore, args: argparse.Namespace) -> int:
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


def _stats(store: QueueStore, args: argparse.Namespace) -> int:
    print(f"messages: {store.count()}")
    for state in STATES:
        print(f"  with {state} recipients: {len(store.ids_in_state(state, 10**9))}")
    for qid, reason in store.corrupt():
        print(f"corrupt {id_text(qid)}: {reason}")
    return 0


def _ask(args: argparse.Namespace, message: dict[str, Any]) -> control.Reply | None:
    """The running server's reply, or None after printing why there is none."""
    return _ask_at(args.spool, message)


def _ask_at(spool: str | Path, message: dict[str, Any]) -> control.Reply | None:
    try:
        reply = control.request(control.socket_path(spool), message)
    except (OSError, ValueError) as exc:  # ControlUnavailable, a timeout, a bad reply
        print(f"ferry queue: {exc}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"ferry queue: the server refused: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def _suspend(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "suspend", "destination": args.destination})
    if reply is None:
        return 1
    print(f"suspended {reply['destination']}: {reply['recipients']} recipients held")
    return 0


def _resume(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "resume", "destination": args.destination})
    if reply is None:
        return 1
    note = "" if reply.get("was_suspended") else " (it was not suspended)"
    print(f"resumed {reply['destination']}: {reply['recipients']} recipients back in the "
          f"queue{note}")
    return 0


def _suspended(args: argparse.Namespace) -> int:
    reply = _ask(args, {"command": "suspended"})
    if reply is None:
        return 1
    for destination in reply["destinations"]:
        print(destination)
    if not reply["destinations"]:
        print("no destination is suspended", file=sys.stderr)
    return 0


# --- the verbs on messages: each takes a list of ids (a filter's matches, e.g.) ---------

#: What each verb did, for its summary line.
_DONE = {"hold": "held", "release": "released", "remove": "removed", "retry": "retried"}
#: Why a queued message was left alone, per verb.
_UNCHANGED = {"hold": "already held or poisoned, or nothing left to deliver",
              "release": "not held or poisoned",
              "remove": "not removed: its record is corrupt, or it kept changing (ask "
                        "again)",
              "retry": "no deferred recipient"}


def message_verb(spool: str | Path, verb: str, ids: Sequence[str],
                 **fields: Any) -> int:
    """Ask the running server to ``verb`` (hold, release, remove, retry) the messages
    ``ids`` (queue ids as printed), in requests of at most ``control.MAX_IDS``; print
    what it did.  0 when every message was found, 1 otherwise."""
    wanted: list[str] = []
    for text in ids:
        try:
            wanted.append(id_text(id_bytes(text.strip())))
        except ValueError:
            print(f"ferry queue: not a queue id: {text!r}", file=sys.stderr)
            return 1
    changed, unchanged, missing, reports = [], [], [], []
    for start in range(0, len(wanted), control.MAX_IDS):
        reply = _ask_at(spool, {"command": verb, "ids": wanted[start:start + control.MAX_IDS],
                                **fields})
        if reply is None:
            return 1
        changed += reply["changed"]
        unchanged += reply["unchanged"]
        missing += reply["missing"]
        reports += reply.get("reports", [])
    for qid in changed:
        print(f"{_DONE[verb]} {qid}")
    for qid in unchanged:
        print(f"ferry queue: {qid}: {_UNCHANGED[verb]}", file=sys.stderr)
    for qid in missing:
        print(f"ferry queue: no message {qid}", file=sys.stderr)
    if reports:
        print(f"non-delivery reports queued: {' '.join(reports)}")
    return 1 if missing else 0


def hold(spool: str | Path, ids: Sequence[str]) -> int:
    return message_verb(spool, "hold", ids)


def release(spool: str | Path, ids: Sequence[str]) -> int:
    return message_verb(spool, "release", ids)


def remove(spool: str | Path, ids: Sequence[str], report: bool = False,
           yes: bool = False) -> int:
    """Remove messages; more than one needs ``yes`` (a filter that matches more than
    meant must not empty the queue)."""
    if len(set(ids)) > 1 and not yes:
        print(f"ferry queue: this removes {len(set(ids))} messages; add --yes to do it",
              file=sys.stderr)
        return 1
    return message_verb(spool, "remove", ids, report=report)


def retry_messages(spool: str | Path, ids: Sequence[str]) -> int:
    return message_verb(spool, "retry", ids)


def retry_destination(spool: str | Path, destination: str) -> int:
    reply = _ask_at(spool, {"command": "retry", "destination": destination})
    if reply is None:
        return 1
    print(f"retried {reply['destination']}: {reply['recipients']} recipients due now")
    return 0


def _retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.destination):
        print("ferry queue: retry takes a destination or --message ID..., one of the two",
              file=sys.stderr)
        return 2
    if args.ids:
        return retry_messages(args.spool, args.ids)
    return retry_destination(args.spool, args.destination)


_CONTROLS = {"suspend": _suspend, "resume": _resume, "suspended": _suspended,
             "hold": lambda args: hold(args.spool, args.ids),
             "release": lambda args: release(args.spool, args.ids),
             "remove": lambda args: remove(args.spool, args.ids, args.report, args.yes),
             "retry": _retry}


def queue_main(args: argparse.Namespace) -> int:
    if args.queue_command in _CONTROLS:
        return _CONTROLS[args.queue_command](args)
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

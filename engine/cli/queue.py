"""``ferry queue``: the queue viewer (list, show, stats, queues, export) and the operator's
controls (suspend, resume, suspended; hold, release, remove, retry).

The viewer reads through the ``QueueStore`` interface (the LMDB store: LMDB lets it share
the spool with a running ``ferry serve``, and it works as well on a stopped spool) and
changes nothing; its views live in ``engine.ops.views`` and its filters in
``engine.ops.select``.  ``queues`` asks a running server first (its scheduler knows the
rates, what is in flight, which sites are down and which destinations it cannot route),
and reads the spool alone when none runs.  On a node of several workers the viewer reads
every shard as one queue (``engine.cluster.nodeview.ShardedQueue``) and the controls ask
the supervisor's socket, which asks every worker (``engine.cluster.fanout``); what it says
of a worker that did not answer is printed on the standard error.  The controls never touch
the queue database: they ask the running server over its control socket
(``engine.ops.control``), which does the work, so there is one writer and the server's
memory agrees with the queue.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import lmdb
import orjson

from engine.cli.common import add_config_argument, add_spool_argument
from engine.cluster.nodeview import open_shards
from engine.ops import control
from engine.ops.select import STATES, Filter, add_filter_arguments, select, select_ids
from engine.ops.views import as_delivered, header_text, listing, message_detail, queue_rows
from engine.queue.api import QueueStore
from engine.queue.records import Envelope, RecordError, id_bytes, id_text
from engine.scheduler.scheduler import load_suspended


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = commands.add_parser(
        "queue", help="look at the queue (list, show, stats, queues, export); suspend and "
        "resume destinations; hold, release, remove and retry messages",
        description="The queue viewer (list, show, stats, queues, export: they change "
        "nothing, and work on a stopped spool too) and the controls of a running ferry "
        "serve (suspend, resume, suspended; hold, release, remove, retry).")
    add_config_argument(queue)
    add_spool_argument(queue)  # engine.cli.main resolves it (spool_from) before queue_main
    sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    lister = sub.add_parser("list", help="queued messages, oldest first, with filters",
                            description="Queued messages, oldest first (Get-Message). "
                            "Without --state, only recipients still waiting count.")
    add_filter_arguments(lister)
    lister.add_argument("--limit", type=int, default=100,
                        help="show at most this many (100; 0: all); the table says "
                        "\"N of M shown\" when there are more")
    show = sub.add_parser("show", help="one message: envelope, each recipient's state, "
                          "attempts, last reply and next retry, headers")
    show.add_argument("queue_id")
    stats = sub.add_parser("stats", help="how many messages, recipients by state, corrupt "
                           "records")
    queues = sub.add_parser("queues", help="one line per next hop: state, messages, "
                            "recipients, rates, last error, next retry (Get-Queue)")
    export = sub.add_parser("export", help="the message as it will be delivered (trace "
                            "fields included), RFC 5322, on standard output or --out")
    export.add_argument("queue_id")
    export.add_argument("--out", metavar="FILE", help="write it to FILE instead")
    for reader in (lister, show, stats, queues):
        reader.add_argument("--json", action="store_true",
                            help="JSON, one object per line")
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
        _add_targets(action)
    remove = sub.add_parser("remove", help="delete messages from the queue of the running "
                            "server")
    _add_targets(remove)
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


def _add_targets(action: argparse.ArgumentParser) -> None:
    """The messages a verb acts on: queue ids, or every message ``list``'s filters match."""
    action.add_argument("ids", metavar="ID", nargs="*", help="queue ids, as `ferry queue "
                        "list` shows them; or none, and filters")
    add_filter_arguments(action)


def _targets(args: argparse.Namespace) -> list[str] | None:
    """The ids given, or those of the messages the filters match (read from the spool);
    None after saying why there are none to act on."""
    filt = Filter.from_args(args)
    if args.ids:
        if filt != Filter():
            print("ferry queue: give queue ids or filters, not both", file=sys.stderr)
            return None
        return list(args.ids)
    if filt == Filter():
        print("ferry queue: give queue ids, or filters (as for list) to act on every "
              "message they match", file=sys.stderr)
        return None
    found: list[str] = []

    def collect(store: QueueStore, _: argparse.Namespace) -> int:
        found.extend(id_text(qid) for qid in select_ids(store, filt))
        return 0

    if _with_store(args, collect):
        return None
    if not found:
        print("ferry queue: no message matches", file=sys.stderr)
    return found


def _act(args: argparse.Namespace, verb: Callable[[list[str]], int]) -> int:
    """``verb`` on the messages ``args`` name (:func:`_targets`)."""
    ids = _targets(args)
    return 1 if ids is None else (verb(ids) if ids else 0)


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


def _json_line(doc: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")


def _list(store: QueueStore, args: argparse.Namespace) -> int:
    found = select(store, Filter.from_args(args), args.limit or None)
    if args.json:
        for doc in listing(found):
            _json_line(doc)
    else:
        print(f"{'queue id':<24}  {'age':>5}  {'size':>9}  sender → recipients")
        for env in found.envelopes:
            print(f"{id_text(env.queue_id):<24}  {_age(env.arrival):>5}  {env.size:>9}  "
                  f"<{env.sender}> → {len(env.recipients)} ({_summary(env)})")
        for qid, reason in found.corrupt:
            print(f"{id_text(qid):<24}  corrupt: {reason}")
    shown = len(found.envelopes) + len(found.corrupt)
    if shown < found.total:
        # On the standard error with --json, so the standard output stays one object a line.
        print(f"{shown} of {found.total} shown (--limit {args.limit})",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _load(store: QueueStore, text: str) -> tuple[bytes, Envelope] | None:
    """The message ``text`` names, or None after saying why there is none."""
    try:
        qid = id_bytes(text)
        return qid, store.get(qid)
    except (ValueError, KeyError):
        print(f"ferry queue: no message {text}", file=sys.stderr)
    except RecordError as exc:
        print(f"ferry queue: {text}: corrupt record: {exc}", file=sys.stderr)
    return None


def _show(store: QueueStore, args: argparse.Namespace) -> int:
    found = _load(store, args.queue_id)
    if found is None:
        return 1
    qid, env = found
    body = store.body(qid)
    if args.json:
        _json_line(message_detail(env, body))
        return 0
    headers = header_text(body)
    print(f"queue id:   {id_text(qid)}\narrival:    {_stamp(env.arrival)} "
          f"({_age(env.arrival)} ago)\nexpires:    "
          f"{_stamp(env.expires) if env.expires else 'never'}\nsender:     <{env.sender}>"
          f"\nsize:       {env.size}\nmessage-id: {env.message_id}\nfrom:       "
          f"{env.client_address} via {env.receive_connector}"
          + (f" as {env.auth_user}" if env.auth_user else ""))
    now = time.time()
    for r in env.recipients:
        when = ""
        if r.state.value in ("pending", "deferred"):
            wait = r.due - now
            when = (f", next try in {_span(wait)} ({_stamp(r.due)})" if wait > 0
                    else ", due now")
        print(f"  <{r.address}> → {r.next_hop}: {r.state.value}, {r.attempts} attempts{when}")
        if r.last_reply:
            print(f"      last reply: {r.last_reply}")
    print("\n" + headers)
    return 0


def _stamp(epoch: float) -> str:
    """A time as the operator reads it next to the tracking log: UTC, ISO 8601."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _stats(store: QueueStore, args: argparse.Namespace) -> int:
    counts = {state: len(store.ids_in_state(state, 10**9)) for state in STATES}
    corrupt = store.corrupt()
    if args.json:
        _json_line({"messages": store.count(), "states": counts,
                    "corrupt": [{"id": id_text(q), "reason": r} for q, r in corrupt]})
        return 0
    print(f"messages: {store.count()}")
    for state in STATES:
        print(f"  with {state} recipients: {counts[state]}")
    for qid, reason in corrupt:
        print(f"corrupt {id_text(qid)}: {reason}")
    return 0


def _export(store: QueueStore, args: argparse.Namespace) -> int:
    found = _load(store, args.queue_id)
    if found is None:
        return 1
    message = as_delivered(store.body(found[0]))
    if args.out:
        Path(args.out).write_bytes(message)
    else:
        sys.stdout.buffer.write(message)
        sys.stdout.flush()
    return 0


def _queues(args: argparse.Namespace) -> int:
    """From the running server when one answers, else from the spool alone."""
    rows: list[dict[str, Any]] = []
    try:
        reply = control.request(control.socket_path(args.spool), {"command": "queues"})
    except control.ControlUnavailable:
        reply = None
    except (OSError, ValueError) as exc:  # a timeout, a bad reply
        print(f"ferry queue: {exc}", file=sys.stderr)
        return 1
    if reply is not None:
        _warn(reply)
    if reply is not None and not reply.get("ok"):
        print(f"ferry queue: the server refused: {reply.get('error')}", file=sys.stderr)
        return 1
    if reply is not None:
        rows = reply["queues"]
    else:
        def from_spool(store: QueueStore, _: argparse.Namespace) -> int:
            rows.extend(row.to_json() for row in
                        queue_rows(store, None, load_suspended(store)).rows)
            return 0

        status = _with_store(args, from_spool)
        if status:
            return status
        print("ferry queue: no server runs on this spool: from the queue alone, without "
              "rates, in-flight or down sites", file=sys.stderr)
    if args.json:
        for row in rows:
            _json_line(row)
        return 0
    print(f"{'destination':<28} {'state':<11} {'msgs':>6} {'rcpts':>6} {'in/min':>7} "
          f"{'out/min':>7}  {'next retry':<20} last error")
    now = time.time()
    for row in rows:
        rates = [f"{row[k]:>7.1f}" if row[k] is not None else f"{'-':>7}"
                 for k in ("in_per_minute", "out_per_minute")]
        retry = "-"
        if row["next_retry"]:
            when = datetime.fromisoformat(row["next_retry"]).timestamp()
            retry = f"{row['next_retry'][11:19]} (in {_span(when - now)})"
        print(f"{row['destination']:<28} {row['state']:<11} {row['messages']:>6} "
              f"{row['recipients']:>6} {rates[0]} {rates[1]}  {retry:<20} "
              f"{row['last_error'] or '-'}")
    if not rows:
        print("no mail is queued", file=sys.stderr)
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
    _warn(reply)
    if not reply.get("ok"):
        print(f"ferry queue: the server refused: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def _warn(reply: control.Reply) -> None:
    """What a node's control channel says of workers that did not answer or refused
    (engine.cluster.fanout): the reply is the others' alone."""
    for warning in reply.get("warnings", ()):
        print(f"ferry queue: {warning}", file=sys.stderr)


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
             "hold": lambda a: _act(a, lambda ids: hold(a.spool, ids)),
             "release": lambda a: _act(a, lambda ids: release(a.spool, ids)),
             "remove": lambda a: _act(a, lambda ids: remove(a.spool, ids, a.report, a.yes)),
             "retry": _retry}


_READERS: dict[str, Callable[[QueueStore, argparse.Namespace], int]] = {
    "list": _list, "show": _show, "stats": _stats, "export": _export}


def _with_store(args: argparse.Namespace,
                action: Callable[[QueueStore, argparse.Namespace], int]) -> int:
    """``action`` on the spool's queue databases, read directly (the server may run or
    not: LMDB readers share them with the server's writers): every shard of a node of
    several workers, as one queue (engine.cluster.nodeview.ShardedQueue)."""
    path = Path(args.spool) / "queue"
    try:
        store = open_shards(Path(args.spool))
    except (OSError, lmdb.Error) as exc:  # not readable by this user, a damaged file
        print(f"ferry queue: cannot open the queue database in {path}: {exc}",
              file=sys.stderr)
        return 1
    try:
        if not store.shards:
            print(f"ferry queue: no queue database in {path}", file=sys.stderr)
            return 1
        return action(store, args)
    finally:
        store.close_sync()


def queue_main(args: argparse.Namespace) -> int:
    if args.queue_command in _CONTROLS:
        return _CONTROLS[args.queue_command](args)
    if args.queue_command == "queues":
        return _queues(args)
    return _with_store(args, _READERS[args.queue_command])

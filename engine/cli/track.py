"""``ferry track``: search the message tracking log, like Exchange's Get-MessageTrackingLog.

Reads the files of the tracking directory (``engine.ops.tracking``: the rotated ones and
the current one, in time order) and prints the records that match every filter given, as
a table or (``--json``) one record per line as logged.  It needs no running server and
changes nothing.  The search itself (its filters, and how it stays fast on large logs) is
``engine.ops.tracksearch``, shared with the admin API's ``GET /api/v1/tracking``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from engine.cli.common import add_config_argument, add_spool_argument, spool_from
from engine.cluster.nodeview import tracking_records
from engine.config import ConfigError
from engine.ops.events import Event, Kind
from engine.ops.tracking import parse_time
from engine.ops.tracksearch import EVENTS, Query, search, unknown_events

__all__ = ["Query", "add_parser", "log_dir", "log_dirs", "row", "search", "track_main"]

#: The fields a table row shows for each kind, after time, event, id and recipient; a
#: kind not listed shows every field it has.
_DETAIL: dict[str, tuple[str, ...]] = {
    "RECEIVE": ("sender", "recipients", "client", "helo", "connector", "auth", "tls",
                "size", "subject"),
    "DELIVER": ("host", "address", "tls", "tls_verified", "reply", "attempt", "delay",
                "connector"),
    "DEFER": ("host", "address", "reply", "attempt", "retry"),
    "FAIL": ("host", "address", "reply", "attempt"),
    "EXPIRE": ("reply", "delay"),
    "DSN": ("action", "dsn_id", "recipients"),
    "SUSPEND": ("destination", "recipients"),
    "RESUME": ("destination", "recipients"),
}
_HEAD = ("time", "event", "id", "message_id", "recipient")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    track = commands.add_parser(
        "track", help="search the message tracking log (Get-MessageTrackingLog)",
        description="Search the message tracking log: every filter given must match. "
        "Times are ISO 8601 (UTC unless they name an offset).")
    track.add_argument("--message-id", metavar="ID",
                       help="the Message-ID header, with or without <angle brackets>")
    track.add_argument("--queue-id", metavar="ID", help="the queue id (a DSN's own id also "
                       "finds the DSN event that made it)")
    track.add_argument("--sender", metavar="ADDR", help="every event of the messages from "
                       "this envelope sender")
    track.add_argument("--recipient", metavar="ADDR", help="events about this recipient")
    track.add_argument("--event", metavar="EVENT", action="append", default=[],
                       type=str.upper, help="only this event (repeatable): "
                       + ", ".join(k.value for k in Kind))
    track.add_argument("--start", metavar="TIME", help="records at or after this time")
    track.add_argument("--end", metavar="TIME", help="records before this time")
    add_config_argument(track)
    add_spool_argument(track)
    track.add_argument("--dir", metavar="DIR", help="the tracking log directory itself "
                       "(default: --config's [tracking] dir, else <spool>/log/tracking)")
    track.add_argument("--json", action="store_true",
                       help="one JSON record per line, as logged")


def log_dir(args: argparse.Namespace) -> Path:
    """The directory searched: --dir, else --config's ``[tracking] dir``, else the
    default place under the spool (:func:`engine.cli.common.spool_from`).  ConfigError
    when the configuration file cannot be used."""
    from engine.config import load_config, tracking_dir

    if args.dir:
        return Path(args.dir)
    if args.config is not None and not args.spool:
        config = load_config(args.config)
        return config.tracking.dir or tracking_dir(config.spool)
    return tracking_dir(spool_from(args))


def log_dirs(args: argparse.Namespace) -> list[Path]:
    """Every directory searched: :func:`log_dir`, and on a node of several workers each
    shard's (engine.cluster.shards.tracking_dirs) unless ``--dir`` names one.
    ConfigError when the configuration file cannot be used."""
    from engine.cluster.shards import shard_indexes, shard_spool, tracking_dirs
    from engine.config import load_config, tracking_dir

    if args.dir:
        return [Path(args.dir)]
    if args.config is not None and not args.spool:
        return tracking_dirs(load_config(args.config))
    spool = Path(spool_from(args))
    return [tracking_dir(shard_spool(spool, i)) for i in shard_indexes(spool)]


def _time(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise SystemExit(f"ferry track: {flag}: not an ISO 8601 time: {text!r}") from None


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def row(r: Event) -> str:
    """One table line: time, event, queue id, recipient, then the kind's fields."""
    head = f"{r.get('time', '')}  {r.get('event', ''):<8} {r.get('id', '')}"
    rcpt = r.get("recipient")
    parts = [head] + ([str(rcpt)] if rcpt else [])
    keys = _DETAIL.get(str(r.get("event")))
    if keys is None:
        keys = tuple(k for k in r if k not in _HEAD)
    parts += [f"{k}={_cell(r[k])}" for k in keys if k in r and r[k] not in ("", None)]
    mid = r.get("message_id")
    if mid and r.get("event") == "RECEIVE":
        parts.append(f"message_id=<{mid}>")
    return "  ".join(parts)


def track_main(args: argparse.Namespace) -> int:
    query = Query(message_id=args.message_id, queue_id=args.queue_id, sender=args.sender,
                  recipient=args.recipient, events=args.event,
                  start=_time(args.start, "--start"), end=_time(args.end, "--end"))
    unknown = unknown_events(query.events)
    if unknown:
        print(f"ferry track: --event: unknown event {', '.join(unknown)} (one of "
              f"{', '.join(EVENTS)})", file=sys.stderr)
        return 2
    try:
        directories = log_dirs(args)
    except ConfigError as exc:
        print(f"ferry track: configuration error: {exc}", file=sys.stderr)
        return 2
    if not directories[0].is_dir():
        print(f"ferry track: no tracking log in {directories[0]} (give --spool or --dir)",
              file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    found = 0
    try:
        for record in tracking_records(directories, query):
            found += 1
            if args.json:
                out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            else:
                out.write(row(record).encode("utf-8", "backslashreplace") + b"\n")
        out.flush()
    except BrokenPipeError:  # `ferry track ... | head`: not an error
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not found and not args.json:
        print("no matching records", file=sys.stderr)
    return 0

"""One worker of a node: the program ``python -m engine.cluster.worker SPEC``.

The supervisor (``engine.cluster.supervisor``) starts it with SPEC, a JSON object: the
configuration's file and ``ferry serve`` flags (read here again, as a reload would), the
worker's index, the node's worker counts and spool, the descriptors of the listening
sockets it passed down (per receive connector, and the HTTP listener's),
and the descriptor on which the worker says it serves.  The worker is then a whole
``ferry serve`` on its queue shard (``engine.app.serve`` with a ``WorkerRole``): it
recovers its shard, switches user, serves, and stops cleanly on SIGTERM.

It dies with the supervisor (``PR_SET_PDEATHSIG``: SIGTERM, so it still stops cleanly)
and must never bind a listening socket of its own or touch another worker's shard.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from engine.cluster.role import WorkerRole
from engine.cluster.shards import shard_config

#: prctl(2)'s option that sends a signal when the parent ends.
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGTERM this process when the supervisor ends, however it ends (kill -9 too)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's stop still reaches us
        pass


class _Tagged(logging.Filter):
    """Names the worker in every log line (the logger's name: "ferry.queue[w1]")."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.tag = f"[w{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.tag):
            record.name += self.tag
        return True


def _sockets(fds: list[int]) -> list[socket.socket]:
    return [socket.socket(fileno=fd) for fd in fds]


def main(argv: list[str] | None = None) -> int:
    spec: dict[str, Any] = json.loads((argv or sys.argv[1:])[0])
    die_with_parent()
    if os.getppid() != spec["parent"]:
        return 1  # the supervisor ended before prctl: nobody to serve for
    from engine.config import ConfigError, load_config
    from engine.ops import logfmt

    index = int(spec["index"])
    logfmt.install(sys.stderr).addFilter(_Tagged(index))
    try:
        node = load_config(spec["path"], spec["flags"])
        config = shard_config(node, index)
    except ConfigError as exc:
        print(f"ferry worker {index}: configuration error: {exc}", file=sys.stderr)
        return 2
    role = WorkerRole(index=index, count=int(spec["count"]), size=int(spec["size"]),
                      spool=Path(spec["spool"]),
                      listeners=[_sockets(fds) for fds in spec["listeners"]],
                      http=_sockets(spec["http"]), node=node)
    ready = int(spec["ready"])

    def started(_: object) -> None:
        os.write(ready, b"ready\n")
        os.close(ready)

    import uvloop

    from engine.app import serve

    try:
        return uvloop.run(serve(config, spec["path"], spec["flags"], role=role,
                                started=started))
    except OSError as exc:
        print(f"ferry worker {index}: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Where each worker of a node keeps its queue, logs and sockets (``[server] workers``).

A node with N workers is N queue shards under one spool: worker 0 owns the spool itself
(so a spool written with one worker is shard 0 of a node with more, unchanged), worker
``i`` ≥ 1 owns ``<spool>/workers/<i>/`` as its spool.  Each shard is a whole queue
database with its own writer process, in-flight journal, tracking log and protocol logs:
a message is queued, delivered, retried, reported and tracked by the worker that took
it.  What is node-wide lives beside the shards in ``<spool>/workers/``: every worker's
control socket (``control-<i>.sock``; ``<spool>/control.sock`` is the supervisor's, which
answers for the whole node), its private HTTP socket (``http-<i>.sock``) and the socket of
the node's limits (``limits.sock``).

A directory the configuration names outside the spool (``[tracking] dir``, ``[log]
protocol_log_dir``) gets a ``worker-<i>`` subdirectory for workers 1 and up; one inside
the spool follows the shard.  Readers (``ferry track``, ``ferry queue``) take every shard
:func:`shard_indexes` finds, so mail a node queued with more workers than it runs now is
still seen (and the supervisor starts a worker for it: see ``engine.cluster.supervisor``).

This module only names paths; it must never open a queue, a socket or a log.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from engine.config import Config

#: The directory of the node's shards 1.. and its sockets, under the spool.
WORKERS_DIR: Final = "workers"


def workers_dir(spool: Path) -> Path:
    return Path(spool) / WORKERS_DIR


def shard_spool(spool: Path, index: int) -> Path:
    """The spool worker ``index`` runs on."""
    return Path(spool) if index == 0 else workers_dir(spool) / str(index)


def shard_indexes(spool: Path) -> list[int]:
    """0 and every shard directory with a queue database in it, in order."""
    found = {0}
    base = workers_dir(spool)
    if base.is_dir():
        for entry in base.iterdir():
            if entry.name.isdigit() and int(entry.name) > 0 and (entry / "queue").is_dir():
                found.add(int(entry.name))
    return sorted(found)


def worker_control_path(spool: Path, index: int) -> Path:
    """Worker ``index``'s own control socket (the supervisor's is ``<spool>/control.sock``)."""
    return workers_dir(spool) / f"control-{index}.sock"


def worker_http_path(spool: Path, index: int) -> Path:
    """Worker ``index``'s private HTTP socket: the keyed injections the node's other
    workers forward to it (engine.http.forward)."""
    return workers_dir(spool) / f"http-{index}.sock"


def limits_path(spool: Path) -> Path:
    """The socket of the node's limits (engine.cluster.node), served by the supervisor."""
    return workers_dir(spool) / "limits.sock"


def shard_dir(directory: Path, spool: Path, index: int) -> Path:
    """``directory`` as worker ``index`` uses it: inside the spool it follows the shard,
    outside it gets a ``worker-<i>`` subdirectory (worker 0 keeps it as it is)."""
    if index == 0:
        return directory
    try:
        inside = Path(directory).relative_to(spool)
    except ValueError:
        return Path(directory) / f"worker-{index}"
    return shard_spool(spool, index) / inside


def shard_config(config: Config, index: int) -> Config:
    """The configuration worker ``index`` runs: its own spool and log directories."""
    if index == 0:
        return config
    spool = config.spool
    log = config.log
    if log.protocol_log_dir is not None:
        log = dataclasses.replace(log, protocol_log_dir=shard_dir(log.protocol_log_dir,
                                                                  spool, index))
    tracking = config.tracking
    if tracking.dir is not None:
        tracking = dataclasses.replace(tracking, dir=shard_dir(tracking.dir, spool, index))
    return dataclasses.replace(config, spool=shard_spool(spool, index), log=log,
                               tracking=tracking)


def tracking_dirs(config: Config) -> list[Path]:
    """Every shard's tracking log directory (``ferry track`` reads them all)."""
    from engine.config import tracking_dir

    out = []
    for index in shard_indexes(config.spool):
        shard = shard_config(config, index)
        out.append(shard.tracking.dir or tracking_dir(shard.spool))
    return out

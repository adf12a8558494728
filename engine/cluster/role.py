"""What makes an :class:`engine.app.App` one worker of a node (``[server] workers``).

The supervisor (``engine.cluster.supervisor``) binds every listening socket and hands each
worker its copies; the worker's App serves those instead of binding its own, runs on its
queue shard (``engine.cluster.shards``), takes its shard's lock rather than the spool's
(the supervisor holds that one), and asks the node, not itself alone, for limits.
This module holds data only; it must never start anything.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import Config


@dataclass(slots=True)
class WorkerRole:
    #: This worker's number: 0 owns the spool itself, i >= 1 ``<spool>/workers/<i>``.
    index: int
    #: The workers of the node that accept mail ([server] workers); a worker past them
    #: only delivers what its shard still holds (a node restarted with fewer workers).
    count: int
    #: The worker processes of the node, those that accept and those that only deliver.
    size: int
    #: The node's spool (the configuration this worker runs names its shard instead).
    spool: Path
    #: The sockets of each receive connector, in [[receive]] order (empty: none).
    listeners: list[list[socket.socket]] = field(default_factory=list)
    #: This worker's copies of the HTTP listener's sockets (none for one that drains).
    http: list[socket.socket] = field(default_factory=list)
    #: The node's configuration, before ``shard_config`` made this worker's of it (its
    #: spool and log directories are the node's: the admin API reads every shard's).
    node: Config | None = None

    @property
    def drains(self) -> bool:
        """Whether this worker only delivers what its shard holds (and ends once it is
        empty): its shard is one of a larger run's."""
        return self.index >= self.count

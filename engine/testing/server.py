"""Run a whole Ferry (the composition root) in a background thread, for tests and benchmarks.

``RunningFerry(config)`` starts ``engine.app.App`` on its own uvloop loop in a thread and
exposes the bound address and the queue, so blocking clients (smtplib, swaks, Postfix's
smtp-source) can talk to it over real sockets from the test's thread.  ``stop()`` runs the
real shutdown path.  Never used by the running server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from engine.app import App
from engine.config import Config, load_config
from engine.ops.events import Sink
from engine.queue.lmdb_store import LmdbQueue

T = TypeVar("T")


def ferry_config(spool: Path, **receive: Any) -> Config:
    """The embedded default on an ephemeral loopback port, with receive-connector changes.

    Delivery is paused: a test that delivers turns it on and points ``delivery.dns`` at
    a responder on loopback, so no test ever asks the system's resolver or leaves 127/8.
    """
    config = load_config(None, {"--listen": ["127.0.0.1:0"], "--spool": str(spool),
                                "--hostname": "ferry.test"})
    first = dataclasses.replace(config.receive[0], **receive)
    queue = dataclasses.replace(config.queue, min_free_disk=0)
    delivery = dataclasses.replace(config.delivery, paused=True, dns=("127.0.0.1", 9))
    return dataclasses.replace(config, receive=(first, *config.receive[1:]), queue=queue,
                               delivery=delivery)


class RunningFerry:
    """``sinks``: event sinks (``engine.ops.events``) added before the start, so they see
    what the start itself emits (e.g. a message poisoned by the crash rule).  ``path``:
    the file ``config`` was loaded from, read again by ``app.reload()``."""

    def __init__(self, config: Config, sinks: Iterable[Sink] = (), *,
                 path: Path | None = None, control_path: Path | None = None,
                 node_control: Path | None = None, node_index: int = 0) -> None:
        """``control_path``: the App's control socket (a worker of a node's:
        ``engine.cluster.shards.worker_control_path``); ``node_control``: the node's
        (``App.node_control``), ``node_index``: which worker of it this is."""
        self.config = config
        self.app = App(config, path=path, control_path=control_path)
        self.app.node_control = node_control
        self.app.node_index = node_index
        for sink in sinks:
            self.app.events.add(sink)
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ferry-app",
                                        daemon=True)
        self._thread.start()
        try:
            self.call(self.app.start())
        except BaseException:
            self._halt()
            raise
        host, _, port = self.app.addresses[0].rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)

    @property
    def store(self) -> LmdbQueue:
        assert self.app.store is not None
        return self.app.store

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.app.stop())
        finally:
            self._halt()

    def _halt(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> RunningFerry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The supervisor of a node of several workers: ``ferry serve`` with ``[server] workers``
above 1 (or shards left by an earlier run with more).

What it does, in order: as the user who started Ferry (root, to bind port 25), it makes
the spool and its ``workers/`` directory (given to ``[server] user``), takes the spool's
lock (so a second ``ferry serve`` on the spool still refuses), and binds every listener
once per accepting worker with SO_REUSEPORT (the kernel spreads connections over the
workers; ``engine.server.service.bind_shared``), the HTTP listener likewise.  It
starts the node's services (the limits every worker asks, ``engine.cluster.node``; the
control channel that answers for the whole node, ``engine.cluster.fanout``), then one
worker process per shard (``engine.cluster.worker``) with its sockets, and tells systemd
it is ready once every worker serves.

Like Postfix's master it stays who started it, so that it can start a worker again as
root (which loads its TLS keys and switches user itself); it reads no byte from the
network.  A worker that ends unasked is started again on the same shard and sockets,
after a pause that doubles while it keeps failing (up to :data:`MAX_PAUSE`): its shard's
recovery requeues what it had in flight (at-least-once: at most those are sent again),
and connections that arrive meanwhile wait in its sockets' backlog; a worker that only
drained a larger run's shard and ended on its own (status 0, its shard empty) is not.
SIGTERM/SIGINT stop every worker cleanly (each finishes its sessions and commits) before
the supervisor ends; SIGHUP reloads every worker.  A worker that fails before it ever
served stops the node: a configuration or a port problem is not cured by starting again.

It must never open a queue, accept a connection or deliver mail itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from engine.cluster.shards import shard_indexes, workers_dir
from engine.config import Config, ConfigError, load_config
from engine.ops import logfmt
from engine.ops.daemon import Account, SpoolLock, lookup, prepare_spool
from engine.ops.reload import why_restart
from engine.ops.sdnotify import Notifier
from engine.server.service import bind_shared

log = logging.getLogger("ferry.node")

#: The longest pause before a worker that keeps failing is started again (seconds).
MAX_PAUSE: Final = 30.0
#: A worker that served this long before it ended starts again at once (seconds).
STEADY: Final = 10.0
#: Environment a worker must not inherit: only the supervisor speaks to systemd.
_SYSTEMD_ENV: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class NodeService(Protocol):
    """A part of the node the supervisor runs beside its workers (limits, control)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def node_size(config: Config) -> int:
    """The worker processes a node on this spool runs: ``[server] workers``, or more when
    the spool holds shards of an earlier run with more (they must still be delivered)."""
    return max(config.server.workers, shard_indexes(config.spool)[-1] + 1)


@dataclass(slots=True)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    pause: float = 0.0
    #: It served once: from then on a failure to start again does not stop the node.
    served: bool = False
    #: It only drained a larger run's shard, and ended once the shard was empty.
    done: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """``path`` and ``flags``: what ``config`` was loaded from; every worker loads the
    same (and again at each reload), so the node runs one configuration."""

    def __init__(self, config: Config, path: str | os.PathLike[str] | None = None,
                 flags: Mapping[str, object] | None = None) -> None:
        self.config = config
        self.path = None if path is None else str(Path(path).absolute())
        self.flags = dict(flags or {})
        self.spool = Path(config.spool).absolute()
        self.count = config.server.workers
        self.size = node_size(config)
        self.lock = SpoolLock(self.spool)
        self.workers = [_Worker(i) for i in range(self.size)]
        #: Per worker: its sockets per receive connector (workers past ``count``: none).
        self._listeners: list[list[list[socket.socket]]] = []
        #: Per accepting worker: its copies of the HTTP listener's sockets.
        self._http: list[list[socket.socket]] = []
        #: The node's services, started before the workers and stopped after them.
        self.services: list[NodeService] = []
        #: Factories of the node's services, called once the supervisor has prepared
        #: (they read its spool and its account: engine.cluster.node, .fanout).
        self.make_services: list[Callable[[Supervisor], NodeService]] = []
        self.account: Account | None = None
        self.notify = Notifier()
        self._stopping = asyncio.Event()
        self._failed: str | None = None

    # --- start ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """As root still: the spool, its lock and the listening sockets."""
        cfg = self.config
        self.account = account = lookup(cfg.server.user, cfg.server.group)
        prepare_spool(self.spool, account)
        prepare_spool(workers_dir(self.spool), account)
        self.lock.acquire(account)
        per_connector: list[list[list[socket.socket]]] = []
        try:
            for rc in cfg.receive:
                per_connector.append(bind_shared(rc.listen, self.count))
            self._listeners = [[copies[i] for copies in per_connector] if i < self.count
                               else [] for i in range(self.size)]
            if cfg.http.listen:
                self._http = bind_shared(cfg.http.listen, self.count)
        except BaseException:
            for sock in (s for copies in per_connector for socks in copies for s in socks):
                sock.close()
            self._close_sockets()
            self.lock.release()
            raise

    def _close_sockets(self) -> None:
        for sock in (s for per in self._listeners for socks in per for s in socks):
            sock.close()
        for sock in (s for socks in self._http for s in socks):
            sock.close()

    def addresses(self) -> list[str]:
        from engine.server.service import address_of

        return [address_of(s) for socks in (self._listeners[0] if self._listeners else [])
                for s in socks]

    async def run(self) -> int:
        """Run the node until SIGTERM or SIGINT; 0 after a clean stop, 1 when a worker
        could not start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        reloads: set[asyncio.Task[None]] = set()

        def hangup() -> None:
            task = loop.create_task(self.reload())
            reloads.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, hangup)
        logging.getLogger("ferry").setLevel(self.config.log.level.upper())
        logfmt.use(self.config.log.format)
        try:
            self.prepare()
            log.info("node of %d workers on %s%s", self.count, self.spool,
                     f" (and {self.size - self.count} delivering what their shards hold)"
                     if self.size > self.count else "")
            for make in self.make_services:
                service = make(self)
                await service.start()
                self.services.append(service)
            started = await asyncio.gather(*(self._start(w) for w in self.workers))
            if all(started):
                self.notify.ready(f"accepting mail on {', '.join(self.addresses())} with "
                                  f"{self.count} workers")
                self.notify.start_watchdog()
                log.info("all %d workers serve", self.size)
                for worker in self.workers:
                    worker.watcher = loop.create_task(self._watch(worker))
                await self._stopping.wait()
            self.notify.stopping("stopping: every worker finishes its sessions and commits")
            await self._stop_workers()
        finally:
            for service in reversed(self.services):
                await service.stop()
            self._close_sockets()
            self.lock.release()
            self.notify.close()
        if self._failed:
            log.error("node stopped: %s", self._failed)
            return 1
        log.info("node stopped")
        return 0

    async def _start(self, worker: _Worker) -> bool:
        """Start ``worker``'s process and wait until it serves; False if it ended first
        (at the node's start, that stops the node)."""
        ready_r, ready_w = os.pipe()
        listeners = [[s.fileno() for s in per] for per in self._listeners[worker.index]]
        http = ([s.fileno() for s in self._http[worker.index]]
                if worker.index < len(self._http) else [])
        spec: dict[str, object] = {
            "path": self.path, "flags": self.flags, "index": worker.index,
            "count": self.count, "size": self.size, "spool": str(self.spool),
            "listeners": listeners, "http": http,
            "ready": ready_w, "parent": os.getpid(),
        }
        fds = [fd for per in listeners for fd in per] + http + [ready_w]
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.cluster.worker", json.dumps(spec),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=fds, env=env)
        except BaseException:
            os.close(ready_r)  # no process to read from: a retry must not leak it
            raise
        finally:
            os.close(ready_w)
        worker.started = time.monotonic()
        try:
            said = await asyncio.to_thread(os.read, ready_r, 64)
        finally:
            os.close(ready_r)
        if said.startswith(b"ready"):
            log.info("worker %d serves (pid %d)", worker.index, worker.process.pid)
            worker.served = True
            return True
        code = await worker.process.wait()
        why = f"worker {worker.index} ended before it served ({_status(code)})"
        log.error("%s", why)
        if not worker.served:
            self._failed = why
            self._stopping.set()
        return False

    async def _watch(self, worker: _Worker) -> None:
        """Start ``worker`` again each time it ends unasked."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping.is_set():
                return
            if code == 0 and worker.index >= self.count:
                # A shard of a larger run, delivered: nothing to start again for.
                worker.done = True
                log.info("worker %d delivered what its shard held and ended", worker.index)
                return
            lasted = time.monotonic() - worker.started
            worker.pause = 0.0 if lasted >= STEADY else min(MAX_PAUSE,
                                                             max(1.0, 2 * worker.pause))
            log.error("worker %d (pid %d) ended (%s) after %.0f s; starting it again%s",
                      worker.index, worker.process.pid, _status(code), lasted,
                      f" in {worker.pause:g} s" if worker.pause else "")
            if worker.pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), worker.pause)
                if self._stopping.is_set():
                    return
            # It served before: a failure to start now is its shard's or the machine's;
            # the others go on, and this one is tried again after a longer pause.
            try:
                await self._start(worker)
            except OSError as exc:
                # No process at all (fork or exec failed: memory, a process limit, the
                # interpreter replaced by an upgrade).  Raised here it ended this watch,
                # and the worker was never started again; instead the ended process stays
                # the one waited for, and the next round pauses longer and tries again.
                worker.started = time.monotonic()
                log.error("worker %d could not be started again: %s", worker.index, exc)

    # --- stop and reload -----------------------------------------------------------------

    async def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.watcher is not None:
                worker.watcher.cancel()
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is not None:
                code = await worker.process.wait()
                if code:
                    log.warning("worker %d stopped with %s", worker.index, _status(code))

    async def reload(self) -> None:
        """SIGHUP: check the configuration here, then have every worker reload it."""
        try:
            new = await asyncio.to_thread(load_config, self.path, self.flags)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused: %s", line)
            return
        if new.server.workers != self.count:
            log.warning("reload: server.workers changed but needs a restart (%s); %d stay",
                        why_restart("server.workers"), self.count)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGHUP)


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


async def supervise(config: Config, path: str | os.PathLike[str] | None = None,
                    flags: Mapping[str, object] | None = None,
                    services: list[Callable[[Supervisor], NodeService]] | None = None,
                    ) -> int:
    supervisor = Supervisor(config, path, flags)
    supervisor.make_services += services or []
    return await supervisor.run()


__all__ = ["MAX_PAUSE", "NodeService", "Supervisor", "node_size", "supervise"]

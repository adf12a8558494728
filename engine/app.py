"""The composition root: builds every part from the configuration, starts and stops them.

Order at start: the queue database (recovery happens as it opens), the router, delivery
agents and scheduler, the control channel (``engine.ops.control``), then the receive
connectors.  Order at stop (SIGTERM/SIGINT): close the control channel, stop
listening and send 421 to open sessions, let pending commits finish, stop the scheduler
(deliveries in flight finish and record their outcomes), close pooled connections, then
close the queue (its writer drains first).
Nothing else in the code constructs these parts; this module holds no protocol logic.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path

from engine import __version__, _speedups
from engine.agents.relay import RelayPolicy
from engine.client.api import DeliveryAgent
from engine.client.maildir import MaildirAgent
from engine.client.smtp import SmtpAgent
from engine.config import Config
from engine.ops.control import ControlServer, ControlUnavailable, check_free, socket_path
from engine.ops.events import Events
from engine.ops.protolog import ProtocolLog
from engine.queue.lmdb_store import LmdbQueue
from engine.routing.mx import MxResolver
from engine.routing.router import ConfiguredRouter, accepted_domains
from engine.scheduler.inflight import FILE_NAME as INFLIGHT_FILE
from engine.scheduler.inflight import InFlightJournal
from engine.scheduler.policy import Limits
from engine.scheduler.scheduler import Scheduler
from engine.server.auth import Authenticator
from engine.server.ingest import Ingest
from engine.server.service import Connector

log = logging.getLogger("ferry")


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: LmdbQueue | None = None
        self.scheduler: Scheduler | None = None
        self.agents: dict[str, DeliveryAgent] = {}
        self.connectors: list[Connector] = []
        self.control: ControlServer | None = None
        self.addresses: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        #: the event stream every part reports to; sinks are added as configured
        self.events = Events()

    async def start(self) -> None:
        cfg = self.config
        q = cfg.queue
        # [log] level (a --log-level flag was merged into it) for Ferry's loggers, ferry.*;
        # the handler and format are the CLI's (engine.cli.main).
        logging.getLogger("ferry").setLevel(cfg.log.level.upper())
        # Before the queue opens: a second server on this spool stops here, untouched.
        check_free(socket_path(cfg.spool))
        self.store = store = LmdbQueue(
            Path(cfg.spool) / "queue", durability=q.durability, map_size=q.map_size,
            max_map_size=q.max_map_size, min_free_disk=q.min_free_disk,
            max_pending=q.max_pending, batch_limit=q.batch_limit,
            # A process, not a thread: see engine.queue.writer_process (the GIL).
            writer="process",
        )
        log.info("ferry %s starting; %s", __version__, _speedups.status())
        log.info("%s", store.describe())
        router = ConfiguredRouter(cfg, MxResolver.from_config(cfg))
        d = cfg.delivery
        # Keep as many idle connections per site as it may have workers, or a busy site
        # closes and reopens connections between messages.
        idle = Limits(d).most_connections()
        ca_file = str(d.ca_file) if d.ca_file is not None else None
        self.agents = {"smtp": SmtpAgent(cfg.hostname,
                                         max_messages_per_connection=d.max_messages_per_connection,
                                         max_idle_per_site=idle, ca_file=ca_file,
                                         pipeline_messages=d.pipeline_messages),
                       "lmtp": SmtpAgent(cfg.hostname, lmtp=True, max_idle_per_site=idle,
                                         ca_file=ca_file),
                       "maildir": MaildirAgent(hostname=cfg.hostname)}
        self.scheduler = scheduler = Scheduler(store, router, self.agents, hostname=cfg.hostname,
                                               settings=d, events=self.events,
                                               journal=InFlightJournal(
                                                   Path(cfg.spool) / INFLIGHT_FILE))
        scheduler.start()
        control = ControlServer(socket_path(cfg.spool), scheduler, router.destination)
        try:
            await control.start()
        except ControlUnavailable as exc:
            log.warning("control channel off (ferry queue suspend/resume will not work): %s",
                        exc)
        else:
            self.control = control
            log.info("control channel on %s", control.path)
        ingest = Ingest(store, cfg.hostname, router.destination,
                        lifetime=cfg.delivery.max_queue_lifetime, queued=scheduler.wake,
                        postmaster=cfg.postmaster, events=self.events)
        authenticator = Authenticator(cfg.users)
        accepted = accepted_domains(cfg)
        log_dir = cfg.log.protocol_log_dir or Path(cfg.spool) / "log"
        if any(rc.protocol_log for rc in cfg.receive):
            log_dir.mkdir(parents=True, exist_ok=True)
        for rc in cfg.receive:
            connector = Connector(
                rc, hostname=cfg.hostname, store=store,
                relay=RelayPolicy(accepted, rc.relay_networks, rc.relay_authenticated),
                authenticator=authenticator, ingest=ingest,
                protolog=ProtocolLog(log_dir if rc.protocol_log else None, rc.name),
                auth_enabled=bool(cfg.users),
            )
            self.connectors.append(connector)
            bound = await connector.start()
            self.addresses += bound
            log.info("receive connector %s listening on %s (tls=%s)", rc.name,
                     ", ".join(bound), rc.tls)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_logs())

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for connector in self.connectors:
                connector.protolog.flush()

    async def stop(self) -> None:
        log.info("stopping: 421 to open sessions, finishing pending commits")
        if self.control is not None:
            await self.control.stop()
        await asyncio.gather(*(c.stop() for c in self.connectors))
        if self.scheduler is not None:
            await self.scheduler.stop()
        await asyncio.gather(*(agent.close() for agent in self.agents.values()))
        if self._flusher is not None:
            self._flusher.cancel()
        self.events.close()
        if self.store is not None:
            await self.store.close()
        log.info("stopped")


#: Allocations between young collections (CPython's default is 700), and how many
#: young collections per middle one and middle ones per full one.
GC_THRESHOLDS = (500_000, 20, 100)


def tune_gc() -> None:
    """Tune the cyclic garbage collector for a long-running server; call once started.

    With the default thresholds the collector took 35-45% of the CPU in the fan-out
    benchmark (perf: ``gc_collect_main``, ``visit_decref``, ``visit_reachable``): tens of
    thousands of long-lived objects (window entries, thousands of connections and their
    tasks) were walked again at every middle and full collection, and deliveries that
    wait a second on the next hop live long enough to be promoted.  Objects from start-up
    are moved out of the collector's sight (``gc.freeze``), and collections are made rare;
    delivery code does not rely on the collector (reference cycles are its exception, not
    its rule), so garbage between collections stays bounded by the young threshold.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; exit status 0 after a clean stop."""
    app = App(config)
    await app.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    return 0

"""The composition root: builds every part from the configuration, starts and stops them.

Order at start: as the user who started Ferry (root, to bind port 25), the spool (made
and given to ``[server] user``), its lock (``engine.ops.daemon``: one server per spool),
the TLS certificates and the listening sockets (bound, not yet served); then the switch
to ``[server] user``; then the queue database (recovery happens as it opens; its writer
process starts as that user), the tracking log and the webhooks (their events waiting
in the queue are sent again), the router, delivery agents and scheduler, the control
channel (``engine.ops.control``), and last the receive connectors start serving the
sockets.  Order at stop (SIGTERM/SIGINT): close the control channel, stop
listening and send 421 to open sessions, let pending commits finish, stop the scheduler
(deliveries in flight finish and record their outcomes), close pooled connections, stop
the webhook senders, close the event hub (the webhooks' last events are handed to the
queue's writer), then close the queue (its writer drains first).
A reload (SIGHUP, ``ferry reload``: :meth:`App.reload`) reads the file and the flags the
server was started with again; ``engine.ops.reload`` says what changes, and each part
takes its share through its own ``reconfigure``, or nothing changes at all.
Nothing else in the code constructs these parts; this module holds no protocol logic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from engine import __version__, _speedups
from engine.agents import Agents
from engine.agents.chain import Chain
from engine.agents.dns import Lookup
from engine.agents.relay import RelayPolicy
from engine.client.api import DeliveryAgent
from engine.client.maildir import MaildirAgent
from engine.client.smtp import SmtpAgent
from engine.cluster.limits import SharedLimits
from engine.cluster.node import start_worker_limits
from engine.cluster.role import WorkerRole
from engine.cluster.shards import shard_config, worker_control_path, workers_dir
from engine.cluster.suspensions import SuspensionSync
from engine.config import (
    IMPLICIT_SMARTHOST,
    Config,
    ConfigError,
    load_config,
    name_flags,
    tracking_dir,
)
from engine.ops import logfmt
from engine.ops.alerts import Alerts, QueueFigures
from engine.ops.control import ControlServer, ControlUnavailable, ask, socket_path
from engine.ops.daemon import SpoolLock, check_root, drop_privileges, lookup, prepare_spool
from engine.ops.events import Events
from engine.ops.maillog import MailLog
from engine.ops.operations import Operations
from engine.ops.preflight import file_problems
from engine.ops.pressure import PressureLog
from engine.ops.protolog import ProtocolLog
from engine.ops.readiness import CheckProvider, firing_alerts
from engine.ops.reload import Plan, Reconfigure, ReloadResult, plan, why_restart
from engine.ops.sdnotify import Notifier
from engine.ops.startup import startup_warnings
from engine.ops.tracking import TrackingLog
from engine.ops.webhooks import Webhooks, shown_url
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.suppression import Entry, SuppressionList
from engine.routing.mx import MxResolver
from engine.routing.router import ConfiguredRouter, accepted_domains
from engine.scheduler import bounces, shaping
from engine.scheduler.inflight import FILE_NAME as INFLIGHT_FILE
from engine.scheduler.inflight import InFlightJournal
from engine.scheduler.scheduler import Scheduler
from engine.server.auth import Authenticator
from engine.server.ingest import Ingest
from engine.server.service import Connector, address_of, bind_listeners, receive_tls
from engine.tlspolicy.policy import TlsPolicy
from engine.tlspolicy.sts import STS_FILE, StsCache
from engine.tlspolicy.tlsrpt import TlsReports

if TYPE_CHECKING:
    from engine.cluster.nodeview import NodeOperations
    from engine.http.server import HttpServer
    from engine.ops.metrics import Metrics

log = logging.getLogger("ferry")


class App:
    """``path`` and ``flags``: the file and the ``ferry serve`` key flags the configuration
    was loaded from (None: the embedded default), read again at each reload."""

    def __init__(self, config: Config, *, path: str | os.PathLike[str] | None = None,
                 flags: Mapping[str, object] | None = None,
                 notifier: Notifier | None = None,
                 control_path: Path | None = None,
                 role: WorkerRole | None = None) -> None:
        self.config = config
        #: This process's part in a node of several workers (engine.cluster.supervisor);
        #: None: Ferry is one process.
        self.role = role
        #: Where the control channel listens (a worker of a node: engine.cluster.shards).
        self.control_path = control_path or socket_path(config.spool)
        #: The node's control socket when this App is a worker of a node of several
        #: (engine.cluster.fanout.NodeControl, the supervisor's ``<spool>/control.sock``),
        #: set before start; None: a node of one.  With it, the admin API and GET /metrics
        #: answer for every worker (engine.cluster.nodeview), and every worker keeps its
        #: metrics while [http] is on (the one a scrape reaches gathers them over the
        #: control channel).
        self.node_control: Path | None = (
            socket_path(role.spool) if role is not None and role.size > 1 else None)
        #: Which worker of the node this is (its shard's number; tests running two Apps
        #: as a node set it with ``node_control``).
        self.node_index = 0 if role is None else role.index
        #: The node's operations for the admin API (made at start when ``node_control``).
        self.node_operations: NodeOperations | None = None
        self.store: LmdbQueue | None = None
        self.scheduler: Scheduler | None = None
        #: the cluster's shared suspensions ([cluster]; engine.cluster.suspensions)
        self.cluster_sync: SuspensionSync | None = None
        self.agents: dict[str, DeliveryAgent] = {}
        self.connectors: list[Connector] = []
        self.control: ControlServer | None = None
        #: The [http] listener (engine.http), None while [http] listen is empty.
        self.http: HttpServer | None = None
        if config.http.listen and (role is None or role.http):
            # Imported only when on: aiohttp and prometheus_client take about 13 MB of
            # every process that loads them (measured with ru_maxrss).
            from engine.http.server import HttpServer

            self.http = HttpServer(self)
        self.addresses: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self.pressure: PressureLog | None = None
        #: What turns an arrival into a queued message (SMTP sessions and the injection API).
        self.ingest: Ingest | None = None
        #: The send protocol logs that are on (engine.client.smtp writes them).
        self.send_logs: list[ProtocolLog] = []
        #: the event stream every part reports to; sinks are added as configured
        self.events = Events()
        #: held from start to the end of the process: one server per spool (a worker of a
        #: node: one per shard; the supervisor holds the spool's)
        self.lock = SpoolLock(Path(config.spool) if role is None
                              else workers_dir(role.spool) / str(role.index))
        #: The policy agents (engine.agents), built at start.
        self.policy: Agents | None = None
        #: The agents of injected mail (engine.http.inject): [http] agents and the signers.
        self.http_chain: Chain | None = None
        #: The [[alert]] rules' evaluator (engine.ops.alerts); ``alerts.active()`` is the
        #: alerts firing now.  Made at start, once the queue is open.
        self.alerts: Alerts | None = None
        #: the operator's views and verbs, behind the control channel and the admin API
        self.operations: Operations | None = None
        #: Readiness checks beyond the built-in ones (engine.ops.readiness): a part that
        #: can make the server unready adds a provider here.
        self.readiness: list[CheckProvider] = []
        #: The [[webhook]] senders and their sink (engine.ops.webhooks), once the queue is
        #: open; ``backlog()`` is the events waiting per webhook.
        self.webhooks: Webhooks | None = None
        self._webhooks_on = False
        #: GET /metrics (engine.ops.metrics): made at start while [http] is on, else None.
        self.metrics: Metrics | None = None
        #: The MX resolver of the router (its figures are read by metrics).
        self.resolver: MxResolver | None = None
        # What a reload reads again (absolute: the working directory may change).
        self.path = None if path is None else Path(path).absolute()
        self.flags: Mapping[str, object] = dict(flags or {})
        #: systemd's notification socket (serve's; one that sends nothing otherwise)
        self.notifier = notifier or Notifier({})
        #: Called with the configuration that runs after each reload that was applied:
        #: the hook for parts built outside start() (engine.ops.reload.Reconfigure).
        self.reconfigure: list[Reconfigure] = []
        self.router: ConfiguredRouter | None = None
        #: The suppression list (engine.queue.suppression), loaded once the queue is open.
        self.suppression: SuppressionList | None = None
        self.authenticator: Authenticator | None = None
        self._mail_log: MailLog | None = None
        self._reloading = asyncio.Lock()
        self._background: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        cfg = self.config
        q = cfg.queue
        self._use_log(cfg)
        bounces.configure(cfg.bounce_rule)
        srv = cfg.server
        account = lookup(srv.user, srv.group)
        prepare_spool(Path(cfg.spool), account)
        if self.role is not None:
            prepare_spool(self.lock.path.parent, account)
        # Before the queue opens: a second server on this spool stops here, untouched.
        self.lock.acquire(account)
        listeners: list[list[socket.socket]] = []
        try:
            # As root still: key files are often readable by root only, port 25 needs root.
            contexts = [receive_tls(rc) for rc in cfg.receive]
            if self.role is not None:
                listeners = self.role.listeners or [[] for _ in cfg.receive]
            else:
                listeners = [bind_listeners(rc.listen) for rc in cfg.receive]
            if self.http is not None:
                self.http.bind(self.role.http if self.role is not None else None)
            bound = {rc.name: [address_of(s) for s in socks]
                     for rc, socks in zip(cfg.receive, listeners, strict=True)}
            check_root(os.geteuid(), account, srv.allow_root,
                       [a for addresses in bound.values() for a in addresses]
                       + (self.http.addresses if self.http is not None else []))
            if account is not None:
                drop_privileges(account)
                log.info("running as user %s, group %s", account.name, account.group)
        except BaseException:
            for sock in (s for socks in listeners for s in socks):
                sock.close()
            if self.http is not None:
                self.http.close_sockets()
            self.lock.release()
            raise
        for warning in startup_warnings(cfg, bound):
            log.warning("%s", warning)
        self.store = store = LmdbQueue(
            Path(cfg.spool) / "queue", durability=q.durability, map_size=q.map_size,
            max_map_size=q.max_map_size, min_free_disk=q.min_free_disk,
            max_pending=q.max_pending, batch_limit=q.batch_limit,
            commit_linger=q.commit_linger,
            # A process, not a thread: see engine.queue.writer_process (the GIL).
            writer="process",
        )
        log.info("ferry %s starting; %s", __version__, _speedups.status())
        log.info("%s", store.describe())
        self._start_tracking()
        if self.http is not None or (self.node_control is not None and cfg.http.listen):
            # Before anything emits: the counts start with the server.  A worker of a node
            # counts too (whichever serves GET /metrics gathers every worker's); never otherwise
            # (the counts are a cost per message nobody would read).
            from engine.ops.metrics import Metrics

            self.metrics = Metrics(self)
            self.events.add(self.metrics.counts)
        await self._start_webhooks(store)
        # Back pressure WARNINGs (start, clear); free disk already too low is said now.
        self.pressure = pressure = PressureLog(store)
        pressure.at_start()
        pressure.start()
        self.resolver = MxResolver.from_config(cfg)
        self.router = router = ConfiguredRouter(cfg, self.resolver)
        d = cfg.delivery
        # Keep as many idle connections per site as it may have workers, or a busy site
        # closes and reopens connections between messages.
        idle = shaping.most_connections(cfg)
        ca_file = str(d.ca_file) if d.ca_file is not None else None
        send_logs, mx_logs = self._open_send_logs()
        self.agents = {"smtp": SmtpAgent(cfg.hostname,
                                         max_messages_per_connection=d.max_messages_per_connection,
                                         max_idle_per_site=idle, ca_file=ca_file,
                                         pipeline_messages=d.pipeline_messages,
                                         protocol_logs=send_logs | mx_logs,
                                         events=self.events,
                                         tls_policy=self._tls_policy(cfg, None)),
                       # [delivery] protocol_log is not for [[local]] LMTP servers (their
                       # routes have no connector either): only [[send]] logs here.
                       "lmtp": SmtpAgent(cfg.hostname, lmtp=True, max_idle_per_site=idle,
                                         ca_file=ca_file, protocol_logs=send_logs,
                                         events=self.events),
                       "maildir": MaildirAgent(hostname=cfg.hostname)}
        self.scheduler = scheduler = Scheduler(store, router, self.agents, hostname=cfg.hostname,
                                               settings=d, events=self.events,
                                               journal=InFlightJournal(
                                                   Path(cfg.spool) / INFLIGHT_FILE),
                                               shaping=shaping.from_config(cfg))
        self.suppression = suppression = SuppressionList(store, cfg.suppression,
                                                         bounces.classify)
        log.info("suppression list: %d entries%s", await suppression.load(),
                 "" if cfg.suppression.enabled else " (off: [suppression] enabled = false)")
        scheduler.on_outcomes = suppression.failed
        if self.node_control is not None:
            suppression.shared = self._share_suppressions
        shared: SharedLimits | None = None
        if cfg.cluster.redis:
            scheduler.cluster = shared = await start_cluster(cfg, self.role)
        elif self.role is not None and self.role.size > 1:
            # The node's limits, kept by its supervisor for every worker (engine.cluster.node).
            scheduler.cluster = await start_worker_limits(self.role)
        self.reconfigure.append(self._reconfigure_bounces)
        scheduler.start()
        self.operations = operations = Operations(
            scheduler, router.destination,
            (cfg.tracking.dir or tracking_dir(Path(cfg.spool))) if cfg.tracking.enabled
            else None)
        operations.suppression = suppression
        if shared is not None:
            # Suspensions are the cluster's: shared at once, and looked at every interval.
            self.cluster_sync = SuspensionSync(shared, scheduler,
                                               cfg.cluster.sync_interval)
            operations.cluster = self.cluster_sync
            self.cluster_sync.start()
        control = ControlServer(self.control_path, operations, self._reload_reply)
        if self.metrics is not None:
            control.metrics = self._metrics_text
        control.alerts = lambda: firing_alerts(self)
        if self.node_control is not None:
            from engine.cluster.nodeview import NodeOperations
            from engine.cluster.shards import tracking_dirs

            # The node's spool and directories, whichever worker this is (every worker
            # serves the admin API of the node); the supervisor's socket is in its spool.
            role = self.role
            node = (role.node if role is not None and role.node is not None
                    else dataclasses.replace(cfg, spool=self.node_control.parent))
            self.node_operations = NodeOperations(
                operations, store, self.node_control, Path(node.spool),
                (lambda: tracking_dirs(node)) if node.tracking.enabled else None,
                index=self.node_index)
        self._start_alerts(store)
        try:
            await control.start()
        except ControlUnavailable as exc:
            log.warning("control channel off (ferry queue suspend/resume will not work): %s",
                        exc)
        else:
            self.control = control
            log.info("control channel on %s", control.path)
        if self._webhooks_on and self.webhooks is not None:
            operations.hooks = self.webhooks.rows
        self.ingest = ingest = Ingest(store, cfg.hostname, router.destination,
                        lifetime=cfg.delivery.max_queue_lifetime, queued=scheduler.wake,
                        postmaster=cfg.postmaster, events=self.events,
                        subject=cfg.tracking.enabled and cfg.tracking.subject)
        self.authenticator = authenticator = Authenticator(cfg.users)
        accepted = accepted_domains(cfg)
        # The policy agents: built before the first session, their pools opened here.
        self.policy = agents = Agents(cfg, Lookup(cfg.delivery.dns))
        agents.suppression = suppression
        relays = [RelayPolicy(accepted, rc.relay_networks, rc.relay_authenticated)
                  for rc in cfg.receive]
        chains = [agents.chain(rc, relay) for rc, relay in zip(cfg.receive, relays, strict=True)]
        self.http_chain = agents.http_chain(cfg.http)
        await agents.start()
        log_dir = cfg.log.protocol_log_dir or Path(cfg.spool) / "log"
        if any(rc.protocol_log for rc in cfg.receive):
            log_dir.mkdir(parents=True, exist_ok=True)
        for rc, tls, socks, relay, chain in zip(cfg.receive, contexts, listeners, relays,
                                                chains, strict=True):
            connector = Connector(
                rc, hostname=cfg.hostname, store=store, relay=relay, chain=chain,
                authenticator=authenticator, ingest=ingest,
                protolog=ProtocolLog(log_dir if rc.protocol_log else None, rc.name),
                auth_enabled=bool(cfg.users), pressure=pressure, tls=tls,
            )
            self.connectors.append(connector)
            serving = await connector.start(socks)
            self.addresses += serving
            log.info("receive connector %s listening on %s (tls=%s)", rc.name,
                     ", ".join(serving), rc.tls)
        if self.http is not None:
            await self.http.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_logs())

    def _share_suppressions(self, entries: list[Entry]) -> None:
        """A worker of a node: the entries its bounces added go to every worker's list
        (through the node's control channel; this one's takes them again, unchanged)."""
        node = self.node_control
        if node is None:
            return
        for entry in entries:
            self._spawn_quiet(ask(node, {
                "command": "suppress", "address": entry.address, "reason": entry.reason,
                "category": entry.category, "source": "auto"}, 30.0),
                f"sharing the suppression of {entry.address} with the node")

    def _spawn_quiet(self, work: Coroutine[Any, Any, object], what: str) -> None:
        """Run ``work`` in the background; its failure is logged, never raised."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)

        def done(t: asyncio.Task[object]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("%s failed: %s", what, t.exception())

        task.add_done_callback(done)

    def _reconfigure_bounces(self, config: Config) -> None:
        """[[bounce_rule]] and [suppression] take effect at a reload."""
        bounces.configure(config.bounce_rule)
        if self.suppression is not None:
            self.suppression.reconfigure(config.suppression)

    def _router(self) -> ConfiguredRouter:
        assert self.router is not None
        return self.router

    def _use_log(self, cfg: Config) -> None:
        """[log] level and format (at start and at a reload)."""
        # [log] level (a --log-level flag was merged into it) for Ferry's loggers, ferry.*;
        # the handler is the CLI's (engine.cli.main).
        logging.getLogger("ferry").setLevel(cfg.log.level.upper())
        # One INFO line per event on ferry.mail (engine.ops.maillog), when [log] level lets
        # them out: with no sink listening the producers build no event at all.  (Once
        # added it stays: a level raised later only makes it write nothing.)
        if self._mail_log is None and logging.getLogger("ferry.mail").isEnabledFor(
                logging.INFO):
            self._mail_log = MailLog()
            self.events.add(self._mail_log)
        # [log] format for the handler the CLI installed (none in tests: theirs stays).
        logfmt.use(cfg.log.format)

    # --- reload ------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Read the configuration file and flags again and apply what can be applied
        while running (engine.ops.reload); a configuration with a problem is refused
        whole, the running one stays.  Sessions stay open, queued mail stays queued."""
        if self.scheduler is None or self.router is None:
            # Not before the start is done: READY=1 would tell systemd too early.
            log.warning("reload refused: the server is still starting")
            return ReloadResult.refused(["the server is still starting"])
        async with self._reloading:
            # sd_notify(3): RELOADING=1 first, READY=1 once done, whatever the outcome
            # (systemd has no word for a refused reload: STATUS= and the log say it).
            self.notifier.reloading()
            result = ReloadResult.refused(["the reload failed (logged by the server)"])
            try:
                result = await self._reload()
            finally:
                outcome = "" if result.ok else "reload refused, the configuration stays; "
                self.notifier.ready(f"{outcome}accepting mail on {', '.join(self.addresses)}")
            return result

    def _metrics_text(self) -> bytes:
        """This worker's metrics, for the node's GET /metrics (the control channel's
        ``metrics``); starts the walk of the queue's hops the next answer reads."""
        assert self.metrics is not None
        text = self.metrics.render()
        self.metrics.walk_destinations()
        return text

    async def _reload_reply(self) -> dict[str, object]:
        return (await self.reload()).to_json()

    async def _reload(self) -> ReloadResult:
        try:
            # Files are read in a thread: the loop keeps serving meanwhile.
            new = await asyncio.to_thread(self._read)
            done = plan(self.config, new)
            contexts = await asyncio.to_thread(lambda: [receive_tls(rc)
                                                        for rc in done.config.receive])
            try:
                authenticator = Authenticator(done.config.users)
            except ValueError as exc:  # a hash that says "scrypt$" and is not one
                raise ConfigError(f"users: {exc}") from None
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else (str(exc),)
            for line in problems:
                log.error("reload refused: %s", line)
            log.error("reload refused: the running configuration stays")
            return ReloadResult.refused(problems)
        self._apply(done, contexts, authenticator)
        for hook in self.reconfigure:
            try:
                taken = hook(done.config)
                if inspect.isawaitable(taken):
                    await taken
            except Exception:
                log.exception("reload: %r failed to take the new configuration", hook)
        for key in done.restart:
            log.warning("reload: %s changed but needs a restart (%s); the running value "
                        "stays", key, why_restart(key))
        log.info("configuration reloaded: %s", ", ".join(done.applied) or "no change")
        return ReloadResult.from_plan(done)

    def _read(self) -> Config:
        """The configuration as ``ferry serve`` would load it now; ConfigError if bad."""
        new = load_config(self.path, self.flags)
        if self.role is not None:
            new = shard_config(new, self.role.index)
        problems = file_problems(new)
        if problems:
            raise ConfigError(name_flags(problems, self.flags))
        return new

    def _apply(self, done: Plan, contexts: list[ssl.SSLContext | None],
               authenticator: Authenticator) -> None:
        """Hand ``done.config`` to every part; nothing here may fail (everything that can
        was built before)."""
        assert self.scheduler is not None and self.router is not None
        old, cfg = self.config, done.config
        self._use_log(cfg)
        d = cfg.delivery
        # The DNS cache goes only when the resolver's own settings changed.
        resolver = self.router.resolver if (d.dns, d.dns_max_queries, d.dnssec_validating) == (
            old.delivery.dns, old.delivery.dns_max_queries, old.delivery.dnssec_validating
        ) else MxResolver.from_config(cfg)
        self.resolver = resolver
        self.router = router = ConfiguredRouter(cfg, resolver)
        idle = shaping.most_connections(cfg)
        ca_file = str(d.ca_file) if d.ca_file is not None else None
        for name, agent in self.agents.items():
            if isinstance(agent, SmtpAgent):
                smtp = name == "smtp"
                agent.reconfigure(
                    max_idle_per_site=idle, ca_file=ca_file,
                    max_messages_per_connection=d.max_messages_per_connection if smtp else None,
                    pipeline_messages=d.pipeline_messages if smtp else None,
                    tls_policy=self._tls_policy(cfg, agent.tls_policy) if smtp else None)
        self.scheduler.reconfigure(router, d, shaping.from_config(cfg))
        if self.operations is not None:
            self.operations.normalize = router.destination
        if self.ingest is not None:
            self.ingest.reconfigure(router.destination, lifetime=d.max_queue_lifetime,
                                    postmaster=cfg.postmaster,
                                    subject=cfg.tracking.enabled and cfg.tracking.subject)
        self.authenticator = authenticator
        accepted = accepted_domains(cfg)
        for connector, rc, tls in zip(self.connectors, cfg.receive, contexts, strict=True):
            connector.reconfigure(
                rc, relay=RelayPolicy(accepted, rc.relay_networks, rc.relay_authenticated),
                authenticator=authenticator, auth_enabled=bool(cfg.users), tls=tls)
        if self.http is not None:
            self.http.reconfigure(cfg.http)
        self.config = cfg

    def _start_tracking(self) -> None:
        """Add the message tracking log to the event hub when [tracking] says so."""
        t = self.config.tracking
        if not t.enabled:
            return
        directory = t.dir or tracking_dir(Path(self.config.spool))
        self.events.add(TrackingLog(directory, max_file_size=t.max_file_size,
                                    max_file_age=t.max_file_age, max_age=t.max_age,
                                    max_total_size=t.max_total_size))
        log.info("message tracking log in %s", directory)

    def _start_alerts(self, store: LmdbQueue) -> None:
        """The [[alert]] rules' evaluator, every [alerts] interval (engine.ops.alerts).  On
        a node of several workers worker 0 alone evaluates them, on the queue figures of
        every shard: a threshold is the node's, and a rule fires once."""
        cfg = self.config
        figures: QueueFigures = store
        evaluates = True
        if self.node_operations is not None:
            from engine.cluster.nodeview import NodeFigures

            evaluates = self.node_index == 0
            figures = NodeFigures(store, self.node_operations.view)
        self.alerts = alerts = Alerts(
            cfg.alert if evaluates else (), cfg.alerts.interval, self.events, figures,
            # The router of now (a reload replaces it), as the queue names destinations.
            lambda domain: self._router().destination(domain))
        alerts.start()
        # A reload: new rules and interval (unchanged rules keep their state).
        self.reconfigure.append(lambda new: alerts.reconfigure(
            new.alert if evaluates else (), new.alerts.interval))
        if cfg.alert and evaluates:
            log.info("%d alert rules, evaluated every %g s", len(cfg.alert),
                     cfg.alerts.interval)

    async def _start_webhooks(self, store: LmdbQueue) -> None:
        """The [[webhook]] senders, and their sink on the event hub when there are any
        (started even without: events of webhooks no longer configured are dropped)."""
        self.webhooks = webhooks = Webhooks(self.config.webhook, store)
        await webhooks.start()
        self._webhooks_listen()
        self.reconfigure.append(self.reload_webhooks)

    def _webhooks_listen(self) -> None:
        """Add the webhooks' sink to the hub once there is a webhook (never twice)."""
        webhooks = self.webhooks
        if webhooks is None or not webhooks.hooks:
            return
        log.info("webhooks: %s", ", ".join(
            f"{h.name} → {shown_url(h.config.url)} ({', '.join(h.config.events)})"
            for h in webhooks.hooks.values()))
        if not self._webhooks_on:
            self._webhooks_on = True
            self.events.add(webhooks)
        if self.operations is not None:
            self.operations.hooks = webhooks.rows

    async def reload_webhooks(self, config: Config) -> None:
        """Apply a reloaded configuration's [[webhook]] entries (for the reload path):
        senders added, restarted with new settings, or stopped (engine.ops.webhooks)."""
        if self.webhooks is None:
            return
        await self.webhooks.reconfigure(config.webhook)
        self._webhooks_listen()

    def _tls_policy(self, cfg: Config, old: TlsPolicy | None) -> TlsPolicy:
        """The outbound TLS policy of ``cfg`` (engine.tlspolicy); a reload keeps the MTA-STS
        cache (and its fetched policies) unless its own settings changed."""
        d = cfg.delivery
        resolver = self.resolver
        assert resolver is not None, "the resolver is made first"
        ca_file = str(d.ca_file) if d.ca_file is not None else None
        sts = old.sts if old is not None else None
        settings = (resolver, ca_file, d.mta_sts_fetch_timeout, d.mta_sts_max_policy_size,
                    d.mta_sts_port)
        if not d.mta_sts:
            sts = None
        elif sts is None or sts.settings != settings:
            sts = StsCache(resolver, ca_file=ca_file,
                           timeout=d.mta_sts_fetch_timeout, max_size=d.mta_sts_max_policy_size,
                           port=d.mta_sts_port, path=Path(cfg.spool) / STS_FILE)
        # The MTA-STS record of a new domain is looked up beside its MX records.
        resolver.prefetch = sts.prefetch if sts is not None else None
        reports = old.reports if old is not None else None
        contact = d.tls_rpt_contact or f"postmaster@{cfg.hostname}"
        report_settings = (resolver, cfg.hostname, contact, d.tls_rpt_interval, ca_file)
        if not d.tls_rpt:
            reports = None
        elif reports is None or reports.settings != report_settings:
            # (a reload that changes these starts a new period: the counts so far are lost)
            reports = TlsReports(resolver, organization=cfg.hostname, contact=contact,
                                 interval=d.tls_rpt_interval, ca_file=ca_file)
        return TlsPolicy(overrides=d.tls_policy, sts=sts, resolver=resolver, reports=reports,
                         failure_memory=d.tls_failure_memory)

    def _open_send_logs(self) -> tuple[dict[str, ProtocolLog], dict[str, ProtocolLog]]:
        """The send protocol logs that are on: ([[send]] connector name → its log, the
        implicit connectors' names → the [delivery] log); kept in ``send_logs``."""
        cfg = self.config
        log_dir = cfg.log.protocol_log_dir or Path(cfg.spool) / "log"
        named = [sc.name for sc in cfg.send if sc.protocol_log]
        # engine.routing makes a connector of its own for delivery.smarthost, or (with
        # neither [[send]] nor a smarthost) one named "" for DNS MX: at most one of them
        # exists, and [delivery] protocol_log is its log, a file named after it ("mx" for
        # the second: neither can be a [[send]] name, so no file is shared).
        implicit: str | None = None
        if cfg.delivery.protocol_log:
            if cfg.delivery.smarthost is not None:
                implicit = IMPLICIT_SMARTHOST
            elif not cfg.send:
                implicit = "mx"
            else:
                log.warning("delivery.protocol_log is on, but all mail goes through [[send]] "
                            "connectors: set protocol_log = true on them instead")
        if named or implicit:
            log_dir.mkdir(parents=True, exist_ok=True)
        send = {name: ProtocolLog(log_dir, name, side="send") for name in named}
        mx: dict[str, ProtocolLog] = {}
        if implicit is not None:
            mx[""] = mx[IMPLICIT_SMARTHOST] = ProtocolLog(log_dir, implicit, side="send")
        self.send_logs = [*send.values(), *dict.fromkeys(mx.values())]
        return send, mx

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for connector in self.connectors:
                connector.protolog.flush()
            for send_log in self.send_logs:
                send_log.flush()

    async def stop(self) -> None:
        log.info("stopping: 421 to open sessions, finishing pending commits")
        if self.http is not None:
            await self.http.stop()
        if self.metrics is not None:
            await self.metrics.stop()  # a walk of the queue's index, before the queue closes
        if self.control is not None:
            await self.control.stop()
        if self.node_operations is not None:
            self.node_operations.close()  # the other shards' databases it opened
        if self.pressure is not None:
            self.pressure.stop()
        if self.alerts is not None:
            await self.alerts.stop()
        await asyncio.gather(*(c.stop() for c in self.connectors))
        if self.policy is not None:
            await self.policy.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.resolver is not None:
            self.resolver.close()  # the lookups the scheduler's stop gave up
        await asyncio.gather(*(agent.close() for agent in self.agents.values()))
        if self.cluster_sync is not None:
            await self.cluster_sync.stop()
        if self.scheduler is not None and self.scheduler.cluster is not None:
            await self.scheduler.cluster.stop()  # after the agents' QUITs: leases last
        if self.webhooks is not None:
            await self.webhooks.stop()  # its sink takes events until the hub closes
        if self._flusher is not None:
            self._flusher.cancel()
        for send_log in self.send_logs:
            send_log.close()  # after the agents' QUITs, so those are in it
        self.events.close()
        if self.store is not None:
            await self.store.close()
        self.lock.release()
        log.info("stopped")


async def start_cluster(cfg: Config, role: WorkerRole | None = None) -> SharedLimits:
    """The limits this node shares with the others of [cluster] (engine.cluster.limits);
    a Redis that does not answer yet is not an error: the node starts on its share.  A
    worker of a node is a member of its own (``<node>.w<i>``) with its part of the share."""
    c = cfg.cluster
    node, share = c.node or cfg.hostname, c.share
    if role is not None:
        node, share = f"{node}.w{role.index}", share / role.size
    shared = SharedLimits(c.redis, node, prefix=c.prefix,
                          lease_ttl=c.lease_ttl, timeout=c.timeout, share=share,
                          probe_interval=c.probe_interval, lease_wait=c.lease_wait)
    await shared.start()
    log.info("cluster: node %s, limits %s", shared.node,
             "shared through Redis" if shared.shared else f"at this node's share ({c.share:g})")
    return shared


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


#: How often a worker that only drains its shard looks whether it is empty (seconds).
DRAIN_CHECK: Final = 1.0


async def _until_drained(app: App, stop: asyncio.Event) -> None:
    """A worker past the node's count (its shard is a larger run's): stop once the shard
    holds no message and no webhook event is waiting, so that the supervisor does not
    start it again.  Held or poisoned mail keeps it running: the operator decides."""
    while not stop.is_set():
        await asyncio.sleep(DRAIN_CHECK)
        store, hooks = app.store, app.webhooks
        if store is None or store.count() or (hooks is not None
                                              and any(hooks.backlog().values())):
            continue
        log.info("this shard is empty: its worker ends (remove %s once its logs are no "
                 "longer needed)", app.config.spool)
        stop.set()


async def serve(config: Config, path: str | os.PathLike[str] | None = None,
                flags: Mapping[str, object] | None = None, *,
                role: WorkerRole | None = None, started: Callable[[App], None] | None = None,
                ) -> int:
    """Run until SIGTERM or SIGINT; exit status 0 after a clean stop.  SIGHUP reloads
    the configuration from ``path`` and ``flags`` (what ``config`` was loaded from).
    ``role``: this process is a worker of a node; ``started`` is called once it serves."""
    notify = Notifier()
    app = App(config, path=path, flags=flags, notifier=notify, role=role,
              control_path=None if role is None else worker_control_path(role.spool,
                                                                          role.index))
    # Before starting: the port takes connections (into the kernel's backlog) as soon as
    # it is bound, and a SIGTERM from then on must stop Ferry cleanly, not kill it.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP's default would end the process: from now on it reloads (one at a time; a
    # SIGHUP during start is refused with a log line, the server is not ready for it).
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def hangup() -> None:
        log.info("SIGHUP: reloading the configuration")
        task = loop.create_task(app.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    try:
        await app.start()
        tune_gc()
        # Type=notify: systemd counts Ferry as started once it accepts mail.
        notify.ready(f"accepting mail on {', '.join(app.addresses)}")
        if started is not None:
            started(app)
        notify.start_watchdog()
        watch = (loop.create_task(_until_drained(app, stop))
                 if role is not None and role.drains else None)
        await stop.wait()
        if watch is not None:
            watch.cancel()
        notify.stopping("stopping: finishing sessions and pending commits")
        loop.remove_signal_handler(signal.SIGHUP)
        await asyncio.gather(*reloads, return_exceptions=True)
        await app.stop()
    finally:
        notify.close()
    return 0

"""Receive connectors: listening sockets, who may connect, how many, and with what.

A :class:`Connector` is one configured receive connector at run time: its listeners, the
sans-I/O settings derived from its configuration, its TLS context, its connection
counters (in total and per client address) and its protocol log.  Sessions ask it to be
admitted and tell it when they end; at shutdown it stops listening and asks every session
to finish with 421.  It must never parse SMTP or decide relay policy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.agents.chain import Chain
from engine.agents.relay import RelayAgent, RelayPolicy
from engine.ops.pressure import PressureLog
from engine.ops.protolog import ProtocolLog
from engine.protocol.server import ServerSettings
from engine.queue.api import BackPressure, QueueStore
from engine.server.auth import Authenticator
from engine.server.ingest import Ingest
from engine.server.session import SmtpSession

if TYPE_CHECKING:
    from engine.config import ReceiveConfig

Reply = tuple[int, str, str]

log = logging.getLogger("ferry.server")

S554_ACCESS = (554, "5.7.1", "Access denied")
S421_TOO_MANY = (421, "4.7.0", "Too many connections, try again later")
S421_TOO_MANY_FROM_YOU = (421, "4.7.0", "Too many connections from your address")


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def receive_tls(config: ReceiveConfig) -> ssl.SSLContext | None:
    """The connector's TLS context (None when TLS is off), loaded at start before the
    queue opens and before root is given up (a key file is often readable by root only);
    OSError naming the files when they cannot be used."""
    if config.tls == "off" or not config.cert_file or not config.key_file:
        return None
    try:
        return tls_context(str(config.cert_file), str(config.key_file))
    except (ssl.SSLError, OSError) as exc:
        # What is wrong, in the words of `ferry config check` (which `ferry serve` runs
        # first; this is for every other way of starting the App).
        from engine.ops.preflight import pair_problem

        problem = pair_problem(config.cert_file, config.key_file)
        key, why = problem or ("cert_file", f"{config.cert_file} with {config.key_file}: "
                                            f"{getattr(exc, 'reason', None) or exc}")
        raise OSError(f"receive connector {config.name}: {key}: {why}") from None


#: Connections the kernel queues for a listener before Ferry accepts them.
BACKLOG = 1024
#: The most client addresses :meth:`Connector.peer` remembers.
_PEERS = 4096


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listeners(listen: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """Bound, listening sockets for ``listen`` (every address a host name resolves to),
    made apart from serving them so that root can bind port 25 and a user serve it
    (engine.ops.daemon): the kernel queues connections until :meth:`Connector.start`
    accepts them, and no client byte is read before that.  OSError names the address."""
    return bind_shared(listen, 1)[0]


def bind_shared(listen: Sequence[tuple[str, int]], copies: int) -> list[list[socket.socket]]:
    """``copies`` lists of :func:`bind_listeners`'s sockets, one per worker of a node: each
    address is bound ``copies`` times with SO_REUSEPORT, so the kernel spreads new
    connections over the workers (by a hash of the client's address and port), and a
    port 0 of the configuration is the same port in every copy."""
    socks: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for host, port in listen:
            seen: set[tuple[int, object]] = set()
            for family, kind, proto, _, addr in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                for copy in socks:
                    sock = socket.socket(family, kind, proto)
                    copy.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if copies > 1:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        # As asyncio does: a v6 wildcard must not take the v4 port as well.
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    try:
                        sock.bind(addr)
                    except OSError as exc:
                        raise OSError(exc.errno, f"cannot listen on {_shown(host, port)}: "
                                                 f"{exc.strerror}") from None
                    sock.listen(BACKLOG)
                    # The copies after the first take the port the first was given.
                    addr = sock.getsockname()
    except BaseException:
        for sock in (s for copy in socks for s in copy):
            sock.close()
        raise
    return socks


def address_of(sock: socket.socket) -> str:
    """"HOST:PORT" ("[v6]:PORT") of a bound socket."""
    name = sock.getsockname()
    return _shown(name[0], name[1])


def server_settings(cfg: ReceiveConfig, hostname: str, tls: bool, auth: bool) -> ServerSettings:
    """The sans-I/O settings of one connector, derived from its configuration here and
    nowhere else (``engine.protocol`` never sees the configuration: its limits are
    constructor parameters, DESIGN.md); what TLS and AUTH offer also depends on whether a
    certificate loaded and users exist."""
    return ServerSettings(
        hostname=hostname,
        max_command_line=cfg.max_command_line,
        max_text_line=cfg.max_text_line,
        max_message_size=cfg.max_message_size,
        max_recipients=cfg.max_recipients,
        max_errors=cfg.max_errors,
        bare_eol=cfg.bare_eol,
        starttls=tls and cfg.tls in ("starttls", "required"),
        require_tls=cfg.tls == "required",
        require_auth=cfg.require_auth,
        auth_mechanisms=tuple(cfg.auth_mechanisms) if auth else (),
        auth_requires_tls=not cfg.allow_plaintext_auth,
        implicit_tls=cfg.tls == "implicit",
        strict_pipelining=cfg.strict_pipelining,
    )


class Connector:
    def __init__(
        self,
        config: ReceiveConfig,
        *,
        hostname: str,
        store: QueueStore,
        relay: RelayPolicy,
        authenticator: Authenticator,
        ingest: Ingest,
        protolog: ProtocolLog,
        auth_enabled: bool,
        tls: ssl.SSLContext | None,
        pressure: PressureLog | None = None,
        chain: Chain | None = None,
    ) -> None:
        self.config = config
        #: The policy agents of this connector (engine.agents.chain), relay control first;
        #: relay control alone when none is configured.
        self.chain = chain if chain is not None else Chain([RelayAgent(relay)])
        #: told of each command refused for back pressure (the operator's WARNINGs)
        self.pressure = pressure
        self.name = config.name
        self.hostname = hostname
        self.store = store
        self.relay = relay
        self.authenticator = authenticator
        self.ingest = ingest
        self.protolog = protolog
        #: from :func:`receive_tls`
        self.tls_context = tls
        self.settings = self._settings(auth_enabled)
        self.sessions: set[SmtpSession] = set()
        self.per_ip: Counter[str] = Counter()
        self.servers: list[asyncio.AbstractServer] = []
        #: For metrics (engine.ops.metrics), counted by the sessions on their refusal and
        #: TLS paths: messages and recipients refused, by reply class (index 4 and 5:
        #: 4xx and 5xx), and TLS handshakes done and failed.
        self.refused_messages = [0] * 6
        self.refused_recipients = [0] * 6
        self.tls_handshakes = 0
        self.tls_failures = 0
        #: set when stopping and the last session is gone
        self._drained: asyncio.Event | None = None
        #: :meth:`peer`'s answers: clients reconnect from few addresses.
        self._peers: dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]] = {}

    def _settings(self, auth_enabled: bool) -> ServerSettings:
        s = server_settings(self.config, self.hostname, self.tls_context is not None,
                            auth_enabled)
        tls_possible = s.starttls or s.implicit_tls
        if self.config.require_auth and (not s.auth_mechanisms
                                         or (s.auth_requires_tls and not tls_possible)):
            log.warning("receive connector %s: require_auth is set but AUTH is never offered "
                        "(no [users], auth_mechanisms = [], or no TLS and no "
                        "allow_plaintext_auth): every MAIL gets 530", self.config.name)
        return s

    def reconfigure(self, config: ReceiveConfig, *, relay: RelayPolicy,
                    authenticator: Authenticator, auth_enabled: bool,
                    tls: ssl.SSLContext | None) -> None:
        """A reload (engine.ops.reload): new sessions take ``config``'s limits and
        settings and ``tls``'s certificate; a session already open keeps the settings it
        started with (its SMTP state is built from them) and asks the relay policy and the
        user table of now at its next RCPT or AUTH.  The listen addresses and the choice
        of implicit TLS stay as they were bound (the plan keeps them)."""
        implicit = self.config.tls == "implicit"
        self.config = config
        self.relay = relay
        for agent in self.chain.agents:
            if isinstance(agent, RelayAgent):
                agent.policy = relay
        self.authenticator = authenticator
        if implicit and tls is not None and self.tls_context is not None:
            # The listening sockets hold this context and make each new connection's TLS
            # from it: the new pair goes into it (its files were just loaded into ``tls``,
            # so they load here too, unless they changed in between).
            assert config.cert_file is not None and config.key_file is not None
            try:
                self.tls_context.load_cert_chain(config.cert_file, config.key_file)
            except (ssl.SSLError, OSError) as exc:
                log.error("receive connector %s: the certificate changed during the reload "
                          "and did not load (%s); reload again", config.name, exc)
        else:
            self.tls_context = tls
        self.settings = self._settings(auth_enabled)

    def peer(self, host: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
        """A client's address from its socket's peer name ``host`` (an IPv6 zone dropped),
        and as shown in replies and logs: parsed once per address, not per connection."""
        known = self._peers.get(host)
        if known is None:
            ip = ipaddress.ip_address(host.split("%")[0])
            if len(self._peers) >= _PEERS:
                self._peers.clear()  # bounded: a scan from many addresses starts afresh
            known = self._peers[host] = (ip, str(ip))
        return known

    def admit(self, session: SmtpSession) -> Reply | None:
        """None to serve the session; else the reply that refuses it."""
        ip = session.client_ip
        assert ip is not None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip in net for net in self.config.remote_ranges):
            return S554_ACCESS
        if len(self.sessions) >= self.config.max_connections:
            return S421_TOO_MANY
        if self.per_ip[session.client] >= self.config.max_connections_per_ip:
            return S421_TOO_MANY_FROM_YOU
        self.sessions.add(session)
        self.per_ip[session.client] += 1
        return None

    def pressure_refused(self, problem: BackPressure) -> None:
        """A session refused a command for back pressure (called on that path only)."""
        if self.pressure is not None:
            self.pressure.refused(problem)

    def release(self, session: SmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.per_ip[session.client] -= 1
            if self.per_ip[session.client] <= 0:
                del self.per_ip[session.client]
        if not self.sessions and self._drained is not None:
            self._drained.set()

    async def start(self, sockets: Sequence[socket.socket] | None = None) -> list[str]:
        """Serve ``sockets`` (from :func:`bind_listeners`; bound here when None); the
        addresses actually bound."""
        loop = asyncio.get_running_loop()
        implicit = self.tls_context if self.config.tls == "implicit" else None
        if sockets is None:
            sockets = bind_listeners(self.config.listen)
        bound: list[str] = []
        for sock in sockets:
            server = await loop.create_server(
                lambda: SmtpSession(self), sock=sock, ssl=implicit, backlog=BACKLOG,
                ssl_handshake_timeout=self.config.idle_timeout if implicit else None,
            )
            self.servers.append(server)
            bound.append(address_of(sock))
        return bound

    async def stop(self, grace: float = 30.0) -> None:
        """Stop listening, 421 to every session, wait for pending commits to finish."""
        for server in self.servers:
            server.close()
        self._drained = asyncio.Event()
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for server in self.servers:
            await server.wait_closed()
        self.protolog.close()

"""Policy agents: relay control, rate limits, DNS lists, SPF/DKIM/DMARC, scanners, DKIM
signing — and the registry that builds them from the configuration.

:class:`Agents` is the server's set of agent instances: one per configured name (the
"verify" agent one per distinct ``[[receive]] verify`` list), shared by every connector
that lists it, so a rate limit counts a client across connectors.  :meth:`Agents.chain`
gives a connector its :class:`~engine.agents.chain.Chain`: relay control first, the
suppression list's agent when the server keeps one (engine.agents.suppress), then the
agents of ``[[receive]] agents`` in the order given ("verify" first among them when the
connector sets ``verify`` without listing it), then the signing agents, which act only at
the sign stage.  Each agent's ``timeout`` and ``fail`` come from its ``[agents.NAME]``
table and are set here, so no agent reads them itself.

Agents are called only through the chain (the hook API, engine.agents.api); this package
must never be imported by the protocol layer, and building an agent must not do I/O beyond
reading its files (sockets and pools open in ``Agent.start``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.agents.api import Agent
from engine.agents.chain import Chain, Figures
from engine.agents.dns import Lookup
from engine.agents.relay import RelayAgent, RelayPolicy

if TYPE_CHECKING:
    from engine.config import Config, HttpConfig, ReceiveConfig
    from engine.queue.suppression import SuppressionList

__all__ = ["BUILTIN", "SIGNERS", "AgentContext", "Agents"]


@dataclass(frozen=True)
class AgentContext:
    """What a built-in agent's factory is given."""

    config: Config
    #: The DNS every agent shares ([delivery] dns, ``--dns``).
    lookup: Lookup
    #: The server's name (the default authserv-id, rspamd's MTA-Name).
    hostname: str
    #: The connector's ``verify`` methods (for the "verify" agent; () for the others).
    verify: tuple[str, ...] = ()


#: A built-in agent's factory; None when its configuration asks for nothing.
Factory = Callable[[AgentContext], Agent | None]

#: The built-in agents by the name [[receive]] agents lists them with
#: (engine.config.BUILTIN_AGENTS names the same ones): "module:factory", imported on first
#: use, so a server loads only the agents it runs (SPF, DKIM and DMARC with the Public
#: Suffix List, aiohttp for rspamd), and engine.message.dkim, which imports this package,
#: makes no import cycle.
BUILTIN: dict[str, str] = {
    "ratelimit": "engine.agents.ratelimit:build_ratelimit",
    "dnsbl": "engine.agents.dnsbl:build_dnsbl",
    "verify": "engine.agents.verify:build_verify",
    "rspamd": "engine.agents.rspamd:build_rspamd",
    "clamav": "engine.agents.clamav:build_clamav",
}

#: Agents every chain ends with, built when their top-level key is set (key, "module:
#: factory"; DKIM signing: they act at the sign stage only, on mail the client may relay).
#: Nothing is imported while the key is empty: a server that signs nothing never loads
#: cryptography (8 MiB).
SIGNERS: tuple[tuple[str, str], ...] = (("dkim_sign", "engine.agents.dkim:build_signer"),)


def _load_factory(path: str) -> Callable[..., Agent]:
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj  # type: ignore[no-any-return]


class Agents:
    """Every agent of one server, built from ``config``."""

    def __init__(self, config: Config, lookup: Lookup | None = None) -> None:
        self.config = config
        self.lookup = lookup or Lookup(config.delivery.dns)
        self._built: dict[tuple[str, tuple[str, ...]], Agent] = {}
        self._signers: list[Agent] | None = None
        #: What every chain's agents did (engine.ops.metrics).
        self.figures = Figures()
        #: The server's suppression list: its agent follows relay control in each
        #: receive connector's chain (set before the chains are built; None: no agent).
        self.suppression: SuppressionList | None = None

    @property
    def all(self) -> list[Agent]:
        return [*self._built.values(), *(self._signers or ())]

    def _context(self, verify: tuple[str, ...] = ()) -> AgentContext:
        return AgentContext(self.config, self.lookup, self.config.hostname, verify)

    def get(self, name: str, verify: tuple[str, ...] = ()) -> Agent | None:
        """The instance of agent ``name`` (built on first use)."""
        key = (name, verify if name == "verify" else ())
        agent = self._built.get(key)
        if agent is None:
            agent = self._build(name, key[1])
            if agent is None:
                return None
            self._built[key] = agent
        return agent

    def _build(self, name: str, verify: tuple[str, ...]) -> Agent | None:
        tables: Mapping[str, Any] = {
            "ratelimit": self.config.agents.ratelimit, "dnsbl": self.config.agents.dnsbl,
            "verify": self.config.agents.verify, "rspamd": self.config.agents.rspamd,
            "clamav": self.config.agents.clamav}
        custom = self.config.agents.custom.get(name)
        if custom is not None:
            factory = _load_factory(custom.factory)
            agent = factory(**custom.options, timeout=custom.timeout,
                            fail_open=custom.fail == "open")
            if not isinstance(agent, Agent):
                raise TypeError(f"agents.custom.{name}.factory ({custom.factory}) returned "
                                f"{type(agent).__name__}, not an engine.agents.api.Agent")
            return agent
        path = BUILTIN.get(name)
        if path is None:
            raise ValueError(f"agent {name!r} is not available in this build")
        build: Factory = _load_factory(path)
        built = build(self._context(verify))
        if built is not None:
            table = tables[name]
            built.timeout = table.timeout
            built.fail_open = table.fail == "open"
        return built

    def signers(self) -> list[Agent]:
        if self._signers is None:
            found = (_load_factory(path)(self._context()) for key, path in SIGNERS
                     if getattr(self.config, key))
            self._signers = [agent for agent in found if agent is not None]
        return self._signers

    def chain(self, rc: ReceiveConfig, relay: RelayPolicy) -> Chain:
        """The chain of connector ``rc``: relay control, its agents, the signers."""
        names = list(rc.agents)
        if rc.verify and "verify" not in names:
            names.insert(0, "verify")
        first: list[Agent] = [RelayAgent(relay)]
        if self.suppression is not None:
            from engine.agents.suppress import SuppressAgent

            first.append(SuppressAgent(self.suppression))
        return self._chain(first, names, rc.verify)

    def http_chain(self, http: HttpConfig) -> Chain:
        """The chain of injected mail ([http] agents, then the signers): no relay control
        (the tokens decide who may relay, engine.http.inject)."""
        return self._chain([], list(http.agents), ())

    def _chain(self, first: list[Agent], names: list[str], verify: tuple[str, ...]) -> Chain:
        agents = list(first)
        for name in names:
            if name == "verify" and not verify:
                continue  # listed, but the connector checks nothing
            agent = self.get(name, verify)
            if agent is not None:
                agents.append(agent)
        agents.extend(self.signers())
        return Chain(agents, self.figures)

    async def start(self) -> None:
        for agent in self.all:
            await agent.start()

    async def stop(self) -> None:
        for agent in self.all:
            await agent.stop()


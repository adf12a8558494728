"""What a configuration reload changes: the comparison of the running configuration with
the one just read, and the split of the changes into those applied at once and those that
wait for a restart.

``ferry reload`` and SIGHUP make the App read its file again (with the flags it was
started with) and call :func:`plan` with the running configuration and the new one.  The
plan's ``config`` is what runs after the reload: the new configuration, except that every
key that can only take effect at start (:data:`RESTART`: listen addresses, the spool, the
queue database, the user, the logs that are opened at start...) keeps its running value.
The keys are then derived, never listed by hand: ``applied`` are the dotted keys where the
plan's configuration differs from the running one, ``restart`` those where it differs from
the file (each with why it waits).  A later reload compares with what runs, so a key that
waits for a restart is reported again until the restart.

Receive and send connectors are matched by name (a renamed connector is one removed and
one added); [[local]] entries by position.  A receive connector added or removed needs a
restart (its sockets are bound at start); the running ones stay as they are.

This module is sans-I/O: values in, values out, no files, no sockets, no logging.  It
never decides whether a configuration is valid (``engine.config`` and
``engine.ops.preflight`` do, before a plan is made) and never applies anything
(``engine.app.App.reload`` does, with each part's own ``reconfigure``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.config import Config, ReceiveConfig, SendConfig, dotted_key

__all__ = ["RESTART", "Plan", "Reconfigure", "ReloadResult", "diff", "plan", "why_restart"]

#: A part's hook, called with the configuration that runs once a reload is applied
#: (``App.reconfigure``), one after the other; a coroutine function is awaited.  It must
#: take what it can and never raise.
Reconfigure = Callable[[Config], Awaitable[None] | None]

#: The keys that only take effect at a restart, as key patterns ("[*]" for any connector),
#: and why.  A table name stands for each of its keys not listed on its own.
RESTART: Final[Mapping[str, str]] = {
    "hostname": "the delivery agents, the receive connectors and the reports are built "
                "with it at start (EHLO, greeting, Received fields, DSNs)",
    "spool": "the queue database, its lock and the control socket are opened at start",
    "queue": "the queue database and its writer process are opened at start",
    "server": "the switch of user happens once, at start",
    "server.workers": "the worker processes, their listening sockets and their queue "
                      "shards are set up at start",
    "receive": "a receive connector's sockets are bound at start (as root, before the "
               "switch of user)",
    "receive[*].listen": "listening sockets are bound at start (as root, before the switch "
                         "of user)",
    "receive[*].tls": "a change to or from implicit TLS changes how the listening sockets "
                      "are served",
    "receive[*].protocol_log": "protocol logs are opened at start",
    "log.protocol_log_dir": "protocol logs are opened at start",
    "delivery.protocol_log": "send protocol logs are opened at start",
    "send[*].protocol_log": "send protocol logs are opened at start",
    "tracking": "the tracking log is opened at start (only [tracking] subject is applied "
                "at once)",
    "http.listen": "the HTTP listener's sockets are bound at start",
    "http.cert_file": "the HTTP listener's TLS is set up at start",
    "http.key_file": "the HTTP listener's TLS is set up at start",
    "http.max_body_size": "the HTTP application is built at start",
    "http.idle_timeout": "the HTTP application is built at start",
    "agents": "the policy agents are built at start (their connections and counters)",
    "receive[*].agents": "a receive connector's chain of policy agents is built at start",
    "receive[*].verify": "a receive connector's chain of policy agents is built at start",
    "http.agents": "the chain of policy agents of injected mail is built at start",
    "dkim_sign": "the DKIM signing keys are loaded and the signers built at start",
    "cluster": "the connection to the cluster's Redis and this node's leases are set up at "
               "start",
}


#: The last part of a key pattern: ".name", ."quoted name" or "[*]".
_PARENT: Final = re.compile(r'(\.[A-Za-z0-9_-]+|\."[^"]*"|\[\*\])$')


def why_restart(key: str) -> str:
    """Why a key of :attr:`Plan.restart` waits for a restart (from :data:`RESTART`)."""
    pattern = re.sub(r"\[\d+\]", "[*]", key.split(" (", 1)[0])
    while pattern in RESTART or (shorter := _PARENT.sub("", pattern)) != pattern:
        if pattern in RESTART:
            return RESTART[pattern]
        pattern = shorter
    return "it is read at start only"


# --- the comparison -----------------------------------------------------------------------


def _named(items: Sequence[Any]) -> bool:
    return bool(items) and all(isinstance(i, ReceiveConfig | SendConfig) for i in items)


def _diff(path: tuple[str | int, ...], a: Any, b: Any, out: list[str]) -> None:
    if a == b:
        return
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        for f in dataclasses.fields(a):
            _diff((*path, f.name), getattr(a, f.name), getattr(b, f.name), out)
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        for name in [*a, *(k for k in b if k not in a)]:
            if name in a and name in b:
                _diff((*path, str(name)), a[name], b[name], out)
            else:
                change = "added" if name in b else "removed"
                out.append(f"{dotted_key((*path, str(name)))} ({change})")
    elif isinstance(a, tuple) and isinstance(b, tuple) and (_named(a) or _named(b)):
        # Connectors by name: b's position names the key, a's when it was removed.
        old = {item.name: item for item in a}
        new = {item.name for item in b}
        for i, item in enumerate(b):
            if item.name in old:
                _diff((*path, i), old[item.name], item, out)
            else:
                out.append(f"{dotted_key((*path, i))} (added: {item.name!r})")
        out += [f"{dotted_key((*path, i))} (removed: {item.name!r})"
                for i, item in enumerate(a) if item.name not in new]
    elif (isinstance(a, tuple) and isinstance(b, tuple) and (a or b)
          and all(dataclasses.is_dataclass(i) for i in (*a, *b))):
        for i in range(max(len(a), len(b))):
            if i < len(a) and i < len(b):
                _diff((*path, i), a[i], b[i], out)
            else:
                out.append(f"{dotted_key((*path, i))} ({'added' if i < len(b) else 'removed'})")
    else:
        out.append(dotted_key(path))


def diff(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ (``users.alice (added)``, ``send[1] (added:
    'backup')``); never a value (some are secrets)."""
    out: list[str] = []
    _diff((), old, new, out)
    return out


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    #: what runs after the reload: the new configuration with the restart keys kept
    config: Config
    #: keys that change now
    applied: tuple[str, ...]
    #: keys changed in the file that keep their running value until a restart
    restart: tuple[str, ...]


def _pin_receive(old: ReceiveConfig, new: ReceiveConfig) -> ReceiveConfig:
    keep: dict[str, Any] = {"listen": old.listen, "protocol_log": old.protocol_log,
                            "agents": old.agents, "verify": old.verify}
    if old.tls != new.tls and "implicit" in (old.tls, new.tls):
        keep["tls"] = old.tls
        if new.cert_file is None or new.key_file is None:
            keep["cert_file"], keep["key_file"] = old.cert_file, old.key_file
    return dataclasses.replace(new, **keep)


def plan(old: Config, new: Config) -> Plan:
    """What a reload from ``old`` (running) to ``new`` (the file, validated) does."""
    by_name = {rc.name: rc for rc in new.receive}
    receive = tuple(_pin_receive(rc, by_name[rc.name]) if rc.name in by_name else rc
                    for rc in old.receive)
    old_send = {sc.name: sc for sc in old.send}
    send = tuple(dataclasses.replace(sc, protocol_log=old_send[sc.name].protocol_log
                                     if sc.name in old_send else False)
                 for sc in new.send)
    h = old.http
    config = dataclasses.replace(
        new, hostname=old.hostname, spool=old.spool, queue=old.queue, server=old.server,
        receive=receive, send=send, dkim_sign=old.dkim_sign, agents=old.agents,
        log=dataclasses.replace(new.log, protocol_log_dir=old.log.protocol_log_dir),
        delivery=dataclasses.replace(new.delivery, protocol_log=old.delivery.protocol_log),
        tracking=dataclasses.replace(old.tracking, subject=new.tracking.subject),
        http=dataclasses.replace(new.http, listen=h.listen, cert_file=h.cert_file,
                                 key_file=h.key_file, max_body_size=h.max_body_size,
                                 idle_timeout=h.idle_timeout, agents=h.agents))
    return Plan(config, tuple(diff(old, config)), tuple(diff(config, new)))


# --- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one reload: applied (``ok``) or refused whole (``errors``: one
    line per problem, as ``ferry config check`` prints them)."""

    ok: bool
    applied: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @classmethod
    def refused(cls, errors: Sequence[str]) -> ReloadResult:
        return cls(False, errors=tuple(errors))

    @classmethod
    def from_plan(cls, done: Plan) -> ReloadResult:
        return cls(True, done.applied, done.restart)

    def to_json(self) -> dict[str, Any]:
        """The control channel's reply (engine.ops.control, ``reload``)."""
        if not self.ok:
            return {"ok": False, "error": "configuration refused, the running one stays",
                    "errors": list(self.errors)}
        return {"ok": True, "applied": list(self.applied),
                "restart": [{"key": key, "why": why_restart(key)} for key in self.restart]}

"""Readiness: whether this server should be sent mail now (``GET /readyz``), as a list of
named checks, each passing or failing with the reason an operator can act on.

The built-in checks (:func:`checks`):

- ``queue``: the queue database takes new mail: no back pressure (the writer alive, the
  map not full, the writer not behind: ``QueueStore.pressure``, what every MAIL is
  refused for);
- ``disk``: free space under the queue at or above ``[queue] min_free_disk``;
- ``receive:NAME``: each receive connector is serving every address it listens on;
- ``http``: the HTTP listener is serving every address it listens on.

Other parts add theirs through the composition root: ``App.readiness`` holds providers
(:data:`CheckProvider`), each called at every probe and returning checks of its own.  A
provider must answer at once from state it keeps (no I/O, no waiting): a probe runs on
the event loop.

The ``[[alert]]`` rules that fire now (``engine.ops.alerts``) are detail of the answer
(:func:`firing_alerts`), not checks: a backlog at one destination is no reason for a load
balancer to stop sending this server mail.

This module only looks: it must never change what the server does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.queue.lmdb_txn import mib

if TYPE_CHECKING:
    from engine.app import App


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check: its ``name`` (unique), whether it passes, and why not."""

    name: str
    ok: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason} if self.reason else {"ok": self.ok}


#: More checks for the probe: called each time, answers at once (see the module docstring).
CheckProvider = Callable[[], Iterable[Check]]


def queue_check(app: App) -> Check:
    store = app.store
    if store is None:
        return Check("queue", False, "the queue database is not open")
    problem = store.pressure()
    return Check("queue", problem is None, problem.describe() if problem else "")


def disk_check(app: App) -> Check:
    """Free space under the queue, read now (statvfs: one system call, no waiting)."""
    store = app.store
    if store is None:
        return Check("disk", False, "the queue database is not open")
    try:
        st = os.statvfs(store.path)
    except OSError as exc:
        return Check("disk", False, f"cannot read the free space of {store.path}: {exc}")
    free = st.f_bavail * st.f_frsize
    floor = store.min_free_disk
    if free < floor:
        return Check("disk", False, f"{mib(free)} free in {store.path}, below "
                                    f"queue.min_free_disk {mib(floor)}")
    return Check("disk", True)


def listener_checks(app: App) -> list[Check]:
    out = []
    for connector in app.connectors:
        serving = bool(connector.servers) and all(s.is_serving() for s in connector.servers)
        out.append(Check(f"receive:{connector.name}", serving,
                         "" if serving else "the receive connector is not listening"))
    if app.http is not None:
        serving = app.http.serving()
        out.append(Check("http", serving,
                         "" if serving else "the HTTP listener is not listening on every "
                                            "address of http.listen"))
    return out


def checks(app: App) -> list[Check]:
    """Every check: the built-in ones, then those of ``app.readiness``'s providers."""
    found = [queue_check(app), disk_check(app), *listener_checks(app)]
    for provider in app.readiness:
        found.extend(provider())
    return found


def firing_alerts(app: App) -> list[dict[str, Any]]:
    """The alerts firing now, as the ALERT event describes them (rule, metric, destination,
    severity, value, threshold, since when, summary)."""
    return [alert.as_dict() for alert in app.alerts.active()] if app.alerts is not None else []

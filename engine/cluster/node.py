"""Per-destination limits exact for a whole node of workers, without Redis.

A node with ``[server] workers = N`` runs N schedulers, one per worker process
(engine.cluster.shards).  Each would hold a site's ``max_connections`` and ``max_rate``
on its own, N times the limit for the node.  Here the supervisor runs one
:class:`NodeCoordinator` on the node's limits socket (``shards.limits_path(spool)``), and
each worker's scheduler asks it through a :class:`NodeLimits` (the interface of
engine.cluster.api.ClusterLimits, as the Redis-shared limits of engine.cluster.limits):

- **Connection leases** are counted per key (the scheduler's site name) against the
  limit the worker names.  A lease belongs to the worker's connection to the coordinator:
  when that connection closes (the worker stops, crashes or is killed with -9, the kernel
  closes its socket), every lease it held returns at once.  No expiry, no renewal.
- **Message rates** are one GCRA per key (the scheduler's ``Throttle``) on the
  coordinator's clock: a reservation says how long the worker waits for its slot.
- **Daily caps** (a shaping rule's ``daily_cap``, a source's warm-up caps) are counted
  per key and UTC day for the node, not per worker.

The wire is one line per request on a Unix stream socket, answered in order, so a worker
pipelines its requests on one persistent connection (``A`` acquire, ``G`` rate, ``C``
count are answered; ``R`` release, ``K`` keep and ``N`` add counts are not)::

    A <member> <limit> <key>   → 1 | 0
    R <member> <key>
    K <member> <key>           (a lease held while the coordinator was away)
    G <rate> <key>             → <wait µs> <slot µs>
    C <day> <cap> <key>        → 1 | 0
    N <day> <count> <key>      (sends counted while the coordinator was away)
    H <until ms> <key> <JSON [rule, reply]>   (an automation rule holds the key)

and the coordinator tells a worker, between its answers, ``W <key>`` when another worker
was refused a lease on a key it holds leases on: the worker then ends its connections
beyond its share of that key after their deliveries (the scheduler's ``over_share``),
so the first worker to take a site's leases does not keep them while another's mail for
the site waits; and ``H ...`` (the request's line as another worker sent it) when an
automation rule of the shaping (a ``421 4.7.28`` from a provider) holds a key in another
worker: every worker then holds it until the same time, so the node backs off as one.
The coordinator keeps the holds that have not ended and tells them to a worker that
connects (a worker started again).

Every call of a worker is bounded by ``timeout``.  A coordinator that cannot be reached
(not started, gone, silent) makes the worker fall back to ``share`` (1/N) of each limit
on its own, say so once in its log, and reconnect every ``reconnect_interval``; back in
touch, it registers the leases it holds and the sends it counted, so the coordinator's
counts are true again at once.

The coordinator must never block (every request is answered from memory, in the
callback that read it) and never decide what to deliver; the client never raises
because the coordinator is away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import orjson

from engine.cluster.limits import (
    Lease,
    Reservation,
    ShareFallback,
    _bounded,
    _Local,
    _wait,
    _within,
)
from engine.cluster.shards import limits_path
from engine.ops.control import listen_private, remove_if_ours, temporary_name
from engine.scheduler.policy import Throttle, count_daily

if TYPE_CHECKING:
    from engine.cluster.role import WorkerRole
    from engine.cluster.supervisor import Supervisor

log = logging.getLogger("ferry.cluster")

__all__ = ["CoordinatorFigures", "NodeCoordinator", "NodeLimits", "coordinator_for",
           "start_worker_limits"]

#: Longest request line (a key is a site name: MX hosts, or source@site); a longer one is
#: a worker out of step: its connection is closed (and its leases return).
MAX_LINE: Final = 8192
#: Longest socket path the kernel takes (sun_path is 108 bytes on Linux, with its NUL).
MAX_PATH: Final = 107
#: How often at most a worker is told again that others wait for a key's leases (s).
WANTED_EVERY: Final = 0.1


# --- wiring ----------------------------------------------------------------------------


def coordinator_for(supervisor: Supervisor) -> NodeCoordinator:
    """The node's coordinator, a service of the supervisor (``supervise(...,
    services=[coordinator_for])``): on the node's limits socket, given to the workers'
    account."""
    account = supervisor.account
    return NodeCoordinator(limits_path(supervisor.spool),
                           owner=None if account is None else (account.uid, account.gid))


async def start_worker_limits(role: WorkerRole) -> NodeLimits:
    """A worker's limits (``scheduler.cluster``), started: each worker process of the node
    (those that only deliver too) falls back to 1 / their number of each limit."""
    limits = NodeLimits(limits_path(role.spool), share=1 / role.size,
                        name=f"worker {role.index}")
    await limits.start()
    return limits


# --- the coordinator (the supervisor's) --------------------------------------------------


@dataclass(slots=True)
class CoordinatorFigures:
    granted: int = 0
    refused: int = 0
    #: workers' connections accepted, and closed (each closing returns its leases)
    connected: int = 0
    closed: int = 0
    #: connections closed for a request that could not be read
    bad: int = 0
    #: times a holder of leases was told another worker waits for one (W)
    wanted: int = 0


class NodeCoordinator:
    """The node's limits, served on the Unix socket ``path`` to its workers."""

    def __init__(self, path: Path, *, owner: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        #: (uid, gid) the socket is given to: the supervisor stays root, its workers run as
        #: ``[server] user`` and must be able to connect
        self.owner = owner
        self.figures = CoordinatorFigures()
        #: key → leases held by every worker together
        self.leases: dict[str, int] = {}
        self._rates: dict[str, tuple[float, Throttle]] = {}
        self._counts: dict[str, tuple[int, int]] = {}
        #: key → (until, epoch ms; the H line) of the automation holds told
        self.holds: dict[str, tuple[int, bytes]] = {}
        self._peers: set[_Peer] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0

    def held(self, key: str) -> int:
        return self.leases.get(key, 0)

    def sent(self, key: str, day: int) -> int:
        counted_day, count = self._counts.get(key, (day, 0))
        return count if counted_day == day else 0

    async def start(self) -> None:
        """Listen; a socket left by a supervisor that did not stop cleanly is replaced
        (the spool's lock says no other node runs here)."""
        path = self.path
        temporary = temporary_name(path)
        if len(os.fsencode(temporary)) > MAX_PATH:
            raise OSError(f"node limits socket path {temporary} is longer than "
                          f"{MAX_PATH} bytes (a Unix socket's limit): use a shorter spool path")
        path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server, self._inode = await listen_private(
            path, self.owner, lambda sock: loop.create_unix_server(lambda: _Peer(self),
                                                                   sock=sock))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for peer in list(self._peers):
            peer.close()
        await self._server.wait_closed()
        self._server = None
        remove_if_ours(self.path, self._inode)

    # --- requests: each answered from memory, at once ---------------------------------

    def _acquire(self, peer: _Peer, member: str, limit: int, key: str) -> bytes:
        held = self.leases.get(key, 0)
        if held >= limit:
            self.figures.refused += 1
            self._wanted(peer, key)
            return b"0\n"
        self.figures.granted += 1
        self._keep(peer, member, key)
        return b"1\n"

    def _wanted(self, refused: _Peer, key: str) -> None:
        """Tell the other workers that hold leases on ``key`` that one was refused: each
        ends its connections beyond its share after their deliveries, so a worker with a
        long queue for a site does not keep every lease while another's mail waits
        (without this, the first to take the leases keeps them as long as it has mail).
        At most once per ``WANTED_EVERY`` per worker and key."""
        now = time.monotonic()
        for peer in self._peers:
            if peer is refused or key not in peer.leases:
                continue
            if now - peer.told.get(key, -WANTED_EVERY) >= WANTED_EVERY:
                peer.told[key] = now
                peer.push(b"W " + key.encode() + b"\n")
                self.figures.wanted += 1

    def _keep(self, peer: _Peer, member: str, key: str) -> None:
        members = peer.leases.setdefault(key, set())
        if member not in members:
            members.add(member)
            self.leases[key] = self.leases.get(key, 0) + 1

    def _release(self, peer: _Peer, member: str, key: str) -> None:
        members = peer.leases.get(key)
        if members is None or member not in members:
            return  # taken while the coordinator was away, and never kept here
        members.discard(member)
        if not members:
            del peer.leases[key]
        self._drop(key, 1)

    def _drop(self, key: str, count: int) -> None:
        left = self.leases.get(key, 0) - count
        if left > 0:
            self.leases[key] = left
        else:
            self.leases.pop(key, None)

    def _reserve(self, rate: float, key: str) -> bytes:
        got = self._rates.get(key)
        if got is None or got[0] != rate:
            # A new rate (a reload) starts a new schedule, as the scheduler's own does.
            got = self._rates[key] = (rate, Throttle(rate))
        now = asyncio.get_running_loop().time()
        wait = got[1].wait(now)
        return b"%d %d\n" % (round(wait * 1_000_000), round((now + wait) * 1_000_000))

    def _count(self, day: int, cap: int, key: str) -> bytes:
        return b"1\n" if count_daily(self._counts, key, day, cap) else b"0\n"

    def _add_counts(self, day: int, count: int, key: str) -> None:
        self._counts[key] = (day, self.sent(key, day) + count)

    def _request(self, peer: _Peer, line: bytes) -> bytes | None:
        """The answer to one request line (None: it has none).  ValueError when the line
        is not a request."""
        verb, _, rest = line.partition(b" ")
        if verb == b"A":
            member, limit, key = _fields(rest, 3)
            return self._acquire(peer, member, int(limit), key)
        if verb == b"G":
            rate, key = _fields(rest, 2)
            if not float(rate) > 0:  # also refuses nan
                raise ValueError(f"rate {rate!r}")
            return self._reserve(float(rate), key)
        if verb in (b"C", b"N"):
            day, number, key = _fields(rest, 3)
            if verb == b"C":
                return self._count(int(day), int(number), key)
            self._add_counts(int(day), int(number), key)
            return None
        if verb in (b"R", b"K"):
            member, key = _fields(rest, 2)
            (self._release if verb == b"R" else self._keep)(peer, member, key)
            return None
        if verb == b"H":
            until, key, _ = _fields(rest, 3)
            self._hold(peer, int(until), key, line)
            return None
        raise ValueError(f"unknown request {verb[:16]!r}")

    def _hold(self, peer: _Peer, until: int, key: str, line: bytes) -> None:
        """An automation hold in ``peer``: every other worker is told, and a worker that
        connects later while it lasts (:meth:`holds_now`)."""
        self.holds[key] = (until, line + b"\n")
        for other in self._peers:
            if other is not peer:
                other.push(line + b"\n")

    def holds_now(self) -> bytes:
        """The H lines of the holds that have not ended (the others are forgotten)."""
        now = time.time() * 1000
        for key in [k for k, (until, _) in self.holds.items() if until <= now]:
            del self.holds[key]
        return b"".join(line for _, line in self.holds.values())

    def _closed(self, peer: _Peer) -> None:
        """A worker's connection ended: every lease it held returns now."""
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        self.figures.closed += 1
        for key, members in peer.leases.items():
            self._drop(key, len(members))
        peer.leases.clear()


def _lines(buffer: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """The whole lines of ``buffer`` + ``data``, and what is left of a line after them."""
    buffer += data
    if b"\n" not in data:
        return [], buffer
    *lines, rest = buffer.split(b"\n")
    return lines, rest


def _fields(rest: bytes, count: int) -> list[str]:
    """``count`` fields of a request; the last is the rest of the line (a key)."""
    parts = rest.decode().split(" ", count - 1)
    if len(parts) != count or not parts[-1]:
        raise ValueError(f"expected {count} fields")
    return parts


class _Peer(asyncio.Protocol):
    """One worker's connection: its requests in, its answers out, in order."""

    def __init__(self, coordinator: NodeCoordinator) -> None:
        self.coordinator = coordinator
        #: key → the members (lease names) this worker holds
        self.leases: dict[str, set[str]] = {}
        #: key → when this worker was last told others wait for its leases (monotonic)
        self.told: dict[str, float] = {}
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self.coordinator._peers.add(self)
        self.coordinator.figures.connected += 1
        holds = self.coordinator.holds_now()
        if holds:
            self._transport.write(holds)

    def data_received(self, data: bytes) -> None:
        lines, self._buffer = _lines(self._buffer, data)
        answers = []
        refused = (f"a request longer than {MAX_LINE} bytes"
                   if len(self._buffer) > MAX_LINE else "")
        request = self.coordinator._request
        for line in lines:
            try:
                answer = request(self, line)
            except (ValueError, UnicodeDecodeError) as exc:
                refused = f"{exc}: {line[:80]!r}"
                break
            if answer is not None:
                answers.append(answer)
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))
        if refused:
            self._refuse(refused)  # after the answers to the requests before it

    def _refuse(self, why: str) -> None:
        # A worker out of step with the protocol: closing it returns its leases, and the
        # worker reconnects in step (its held leases registered again).
        log.warning("node limits: closing a worker's connection: %s", why)
        self.coordinator.figures.bad += 1
        if self._transport is not None:
            self._transport.close()  # what was written still goes

    def push(self, line: bytes) -> None:
        if self._transport is not None:
            self._transport.write(line)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.coordinator._closed(self)


# --- the client (each worker's) ----------------------------------------------------------


class NodeLimits(ShareFallback):
    """A worker's view of the node's limits: the coordinator's at ``path`` while it
    answers, else ``share`` of each limit (1 / the number of workers)."""

    def __init__(self, path: Path, *, share: float, name: str = "worker",
                 timeout: float = 0.25, reconnect_interval: float = 0.5,
                 lease_wait: float = 0.25) -> None:
        super().__init__(share, lease_wait)
        self.path = Path(path)
        #: this worker, in the log
        self.name = name
        self.timeout = timeout
        self.reconnect_interval = reconnect_interval
        self._link: _Link | None = None
        self._serial = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._nudge = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        """Connect; a coordinator not there yet is not an error (the worker starts on its
        share and keeps trying)."""
        if not await self._connect():
            self._fall_back("not reachable at start")
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        """Close the connection: the coordinator frees every lease this worker holds."""
        self._stopping = True
        self._nudge.set()
        if self._task is not None:
            await _within(self._task, self.timeout + 0.5)
            self._task = None
        if self._link is not None:
            self._link.close()
            self._link = None
        self._local.clear()

    # --- the interface (engine.cluster.api.ClusterLimits) -------------------------------------

    async def acquire(self, key: str, limit: int) -> Lease | None:
        local = self._local.setdefault(key, _Local())
        member = str(next(self._serial))
        within_share = len(local.leases) < self.mine(limit)
        if self.shared:
            if not within_share and (self._in_grace() or self._is_wanted(key)):
                # Just back (others may not have registered their leases yet), or another
                # worker waits for this key: no more than the share, without asking.
                return self._grant(local, key, member, False, shared=True)
            try:
                got = await self._ask(f"A {member} {limit} {key}\n".encode())
            except asyncio.CancelledError:
                # The caller went away: a lease granted meanwhile is nobody's.  Answered
                # in order, so this release follows the grant (or is ignored).
                if self._link is not None:
                    self._link.send(f"R {member} {key}\n".encode())
                raise
            if got is not None:
                return self._grant(local, key, member, got == b"1", shared=True)
        return self._grant(local, key, member, within_share, shared=False)

    async def release(self, lease: Lease) -> None:
        self._forget(lease)
        if self._link is not None:
            self._link.send(f"R {lease.member} {lease.key}\n".encode())

    async def reserve(self, key: str, rate: float) -> Reservation:
        if rate <= 0:
            return Reservation(0.0, 0)
        if self.shared:
            link = self._link
            got = await self._ask(f"G {rate!r} {key}\n".encode())
            if got is not None:
                wait, _, start = got.partition(b" ")
                if wait.isdigit() and start.isdigit():
                    return Reservation(int(wait) / 1_000_000, int(start))
                if link is not None:  # out of step: a new connection puts it right
                    self._lost(link, f"an answer out of step: {got[:40]!r}")
        return self._reserve_own(key, rate)

    def share_hold(self, key: str, rule: str, until: float, reply: str) -> None:
        if self._link is not None:
            self._link.send(b"H %d %s %s\n" % (round(until * 1000), key.encode(),
                                                orjson.dumps([rule, reply])))

    def _held(self, rest: bytes) -> None:
        """Another worker's automation hold (an H line), handed to ``on_hold``."""
        try:
            until, key, payload = rest.split(b" ", 2)
            rule, reply = orjson.loads(payload)
            held = (key.decode(), str(rule), int(until) / 1000, str(reply))
        except ValueError:
            log.warning("node limits: %s: a hold that cannot be read: %r", self.name,
                        rest[:80])
            return
        if self.on_hold is not None:
            self.on_hold(*held)

    async def count(self, key: str, day: int, cap: int) -> bool:
        if self.shared:
            got = await self._ask(f"C {day} {cap} {key}\n".encode())
            if got is not None:
                return got == b"1"
        # Alone: this worker's share of the cap; what it counts is told to the
        # coordinator when it is back (_connect).
        return self._count_own(key, day, self.mine(cap))

    # --- the connection ------------------------------------------------------------------

    async def _ask(self, line: bytes) -> bytes | None:
        """The coordinator's answer to ``line``, or None (then fallen back) when it gave
        none within ``timeout``."""
        link = self._link
        if link is None:
            self.figures.errors += 1
            return None
        answer = link.ask(line)
        try:
            got = await asyncio.wait_for(answer, self.timeout)
        except TimeoutError:
            self._lost(link, f"no answer within {self.timeout:g} s")
            got = None
        if got is None:
            self.figures.errors += 1
        return got

    def _lost(self, link: _Link, why: str) -> None:
        if self._link is not link:
            return
        self._link = None
        link.close()
        if self.shared and not self._stopping:
            self._fall_back(why)

    def _fall_back(self, why: str) -> None:
        self.shared = False
        self.figures.fallbacks += 1
        self._nudge.set()
        log.warning("node limits: %s: coordinator at %s unreachable (%s): every limit is "
                    "this worker's share (%g) until it answers again", self.name, self.path,
                    why, self.share)

    async def _connect(self) -> bool:
        """Connect, then register the leases held and the sends counted meanwhile."""
        loop = asyncio.get_running_loop()
        try:
            _, link = await _bounded(loop.create_unix_connection(
                lambda: _Link(self), os.fspath(self.path)), self.timeout)
        except (OSError, TimeoutError):
            return False
        held = [f"K {m} {k}\n" for k, local in self._local.items() for m in local.leases]
        counted = [f"N {day} {count} {k}\n" for k, (day, count) in self._counts.items()]
        self._counts.clear()
        if held or counted:
            link.send("".join(held + counted).encode())
        self._link = link
        self.shared = True
        return True

    async def _keep(self) -> None:
        """Reconnect while the coordinator is away."""
        while not self._stopping:
            self._nudge.clear()
            if self.shared:
                await self._nudge.wait()
                continue
            await _wait(self._nudge, self.reconnect_interval)
            if self._stopping:
                return
            if await self._connect():
                # The other workers may still be on their share, their leases not yet
                # registered: keep to the share until each had its turn to reconnect.
                self._grace_until = (asyncio.get_running_loop().time()
                                     + 2 * (self.reconnect_interval + self.timeout))
                log.info("node limits: %s: coordinator at %s answers again: limits are "
                         "the node's", self.name, self.path)


class _Link(asyncio.Protocol):
    """The worker's end of its connection: answers matched to requests in order."""

    def __init__(self, owner: NodeLimits) -> None:
        self.owner = owner
        self._pending: deque[asyncio.Future[bytes | None]] = deque()
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, line: bytes) -> None:
        if self._transport is not None:
            self._transport.write(line)

    def ask(self, line: bytes) -> asyncio.Future[bytes | None]:
        answer: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if self._transport is None:
            answer.set_result(None)
            return answer
        self._pending.append(answer)
        self._transport.write(line)
        return answer

    def data_received(self, data: bytes) -> None:
        lines, self._buffer = _lines(self._buffer, data)
        if len(self._buffer) > MAX_LINE:
            self.owner._lost(self, "an answer too long")
            return
        pending = self._pending
        for line in lines:
            if line[:2] == b"W ":  # not an answer: another worker waits for a lease
                self.owner._wanted(line[2:].decode(errors="replace"))
                continue
            if line[:2] == b"H ":  # not an answer: another worker's automation hold
                self.owner._held(line[2:])
                continue
            if not pending:
                self.owner._lost(self, "an answer to no request")
                return
            answer = pending.popleft()
            if not answer.done():  # its caller gave up (timed out, cancelled)
                answer.set_result(line)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._fail()

    def _fail(self) -> None:
        while self._pending:
            answer = self._pending.popleft()
            if not answer.done():
                answer.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail()
        self.owner._lost(self, "connection closed" if exc is None else str(exc))

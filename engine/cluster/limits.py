"""Per-destination limits shared by the nodes of a cluster through Redis.

Owns the Redis keys (``docs/cluster.md``), the Lua scripts that make each decision in one
atomic step inside Redis, and the fall-back to this node's own share of every limit while
Redis cannot be reached:

- **Connection leases.** A destination key (a site, or a source and a site) has a sorted
  set of leases, each scored with the time it expires.  Taking one removes the expired
  members and adds this node's only while fewer than the limit remain; a node renews its
  leases every third of their lifetime, so a node that dies (kill -9, a network split)
  loses its leases within ``lease_ttl`` and the others may take the whole limit.
- **Message rates.** GCRA (the generic cell rate algorithm, as the scheduler's local
  ``Throttle``): one key per destination holds the theoretical arrival time of the next
  message; a reservation moves it on by 1/rate and says how long to wait.
- **Suspensions.** One hash of suspended destinations, read by every node.
- **Automation holds.** One sorted set of the holds a ``[[shaping.automation]]`` rule put
  on a (source, site), scored with the time each ends: every node holds what another was
  told by a receiver (engine.cluster.suspensions reads it); ended holds are dropped at
  the next one's write.

Every script reads the clock of the Redis server (``TIME``), never the node's: nodes whose
clocks disagree still agree on who holds what.  While Redis is unreachable (a refused
connection, a timeout, an error reply) the node says so once in its log, counts it, and
grants leases and rates from ``share`` of each limit on its own (with two nodes and share
0.5, a limit of 4 becomes 2 each); a probe brings the shared limits back, re-registering
the leases the node holds so the count in Redis is true again at once.

It must never decide what to deliver (the scheduler asks it), never block the event loop
(every call is awaited with a time limit), and never raise a Redis error to its caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from engine.scheduler.policy import Throttle, count_daily

log = logging.getLogger("ferry.cluster")

__all__ = ["Lease", "Reservation", "ShareFallback", "SharedFigures", "SharedLimits"]

#: Take a lease: drop the expired ones, renew ours if present, else add ours when fewer
#: than the limit are held; when refused, mark the key wanted (for ``ttl``: the holders
#: read it at their next renewal).  KEYS[1] the lease set, KEYS[2] its wanted mark; ARGV
#: member, limit, ttl (ms).
_ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or
   redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', ttl)
return 0
"""

#: Renew every lease a node holds (and put back any that expired meanwhile: the
#: connection is open, so the count must say so), and say which of them another node
#: waits for.  KEYS[1..n] the lease sets, KEYS[n+1..2n] their wanted marks, ARGV[1] the
#: ttl (ms), ARGV[2..n+1] the members, one per lease set.  Returns the indexes (1-based)
#: of the wanted ones.
_RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = #ARGV - 1
local wanted = {}
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], 2 * ttl)
  if redis.call('EXISTS', KEYS[n + i]) == 1 then
    table.insert(wanted, i)
  end
end
return wanted
"""

#: GCRA: reserve the next send.  KEYS[1] the rate key; ARGV[1] the interval (µs).
#: Returns {start, now} in µs of the server's clock, as strings (a Lua number returned to
#: Redis is truncated to an integer reply; these are exact integers anyway).
_RESERVE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local start = math.max(now, tat)
redis.call('SET', KEYS[1], string.format('%d', start + interval), 'PX',
           math.ceil((start + interval - now) / 1000) + 1000)
return {string.format('%d', start), string.format('%d', now)}
"""

#: The Redis errors that make a node fall back to its share (redis-py's ConnectionError
#: and TimeoutError are RedisError subclasses; a socket error may surface bare).
_UNREACHABLE: Final = (OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Lease:
    """One connection's place in a destination's limit; ``shared`` when Redis granted it
    (a lease granted from the node's share is registered in Redis when it returns)."""

    key: str
    member: str
    shared: bool


@dataclass(frozen=True, slots=True)
class Reservation:
    """A message-rate slot: ``wait`` seconds from now; ``start`` is the slot's time on
    the clock that granted it (µs of the Redis server's clock, or of this node's loop
    clock when the node's share granted it)."""

    wait: float
    start: int


@dataclass(slots=True)
class SharedFigures:
    """Counters for metrics and the log."""

    granted: int = 0
    refused: int = 0
    #: times Redis became unreachable (shared → own share)
    fallbacks: int = 0
    #: calls that failed and were answered from the node's share
    errors: int = 0
    #: rounds of lease renewals Redis took
    renewals: int = 0


@dataclass(slots=True)
class _Local:
    """What this node holds of one destination key, in any mode."""

    leases: set[str] = field(default_factory=set)
    throttle: Throttle | None = None
    rate: float = 0.0


class ShareFallback:
    """What a client of shared limits holds itself, and its fall-back to its own ``share``
    of every limit while whoever shares them (Redis, or the node's coordinator:
    engine.cluster.node) cannot be reached.  ``shared`` says which is in force."""

    def __init__(self, share: float, lease_wait: float) -> None:
        self.share = share
        #: how soon a caller refused a lease asks again (the scheduler's re-staffing)
        self.lease_wait = lease_wait
        self.figures = SharedFigures()
        #: True while the limits are shared; False while each limit is this one's share.
        self.shared = False
        self._local: dict[str, _Local] = {}
        #: key → leases claimed by over_share and not given back yet
        self._leaving: dict[str, int] = {}
        #: how long word that another waits for a key's leases holds (s)
        self.wanted_for = 4 * lease_wait
        #: key → until when (time.monotonic) this one keeps to its share of it
        self._wanted_until: dict[str, float] = {}
        #: daily counts made on the share: key → (day, count)
        self._counts: dict[str, tuple[int, int]] = {}
        #: until when (loop time) a client back in touch keeps to its share (_in_grace)
        self._grace_until = 0.0
        #: told of another member's automation holds (engine.cluster.api.ClusterLimits)
        self.on_hold: Callable[[str, str, float, str], None] | None = None

    def share_hold(self, key: str, rule: str, until: float, reply: str) -> None:
        """Tell the others of an automation hold: nobody to tell alone (each kind of shared
        limits tells its members its own way)."""

    def mine(self, limit: int) -> int:
        """This one's share of ``limit``: never less than one, or a node alone would
        deliver nothing."""
        return max(1, math.floor(limit * self.share))

    def over_share(self, key: str, limit: int) -> bool:
        """Whether the caller, a connection holding a lease on ``key``, is to end now and
        give its lease back: this one holds more than its share while the limits are not
        shared (taken while they were).  True is a claim: the next callers count this
        lease as gone, so only the extra connections end, never all of them at once."""
        if not self.yielding(key, limit):
            return False
        self._leaving[key] = self._leaving.get(key, 0) + 1
        return True

    def yielding(self, key: str, limit: int) -> bool:
        """Whether this one holds more leases on ``key`` than it should keep now: beyond
        its share while the limits are not shared, or while another waits for a lease on
        it (told lately), counting those already claimed by :meth:`over_share` as gone (no
        claim: the scheduler prepares no follow-on messages for such connections)."""
        return ((not self.shared or self._is_wanted(key))
                and self._kept(key) > self.mine(limit))

    def _is_wanted(self, key: str) -> bool:
        until = self._wanted_until.get(key)
        if until is None:
            return False
        if time.monotonic() > until:
            del self._wanted_until[key]
            return False
        return True

    def _wanted(self, key: str) -> None:
        """Another was refused a lease on ``key``: keep to the share of it a while."""
        self._wanted_until[key] = time.monotonic() + self.wanted_for

    def _kept(self, key: str) -> int:
        return self.held(key) - self._leaving.get(key, 0)

    def held(self, key: str) -> int:
        """Leases this one holds on ``key``."""
        local = self._local.get(key)
        return len(local.leases) if local is not None else 0

    def _in_grace(self) -> bool:
        """Just back in touch: the others may not have registered their leases yet (each
        does at its own next probe), so for a while this one takes no more than its
        share, as while the limits were not shared."""
        return bool(self._grace_until) and (
            asyncio.get_running_loop().time() < self._grace_until)

    def _grant(self, local: _Local, key: str, member: str, ok: bool,
               shared: bool) -> Lease | None:
        if not ok:
            self.figures.refused += 1
            return None
        self.figures.granted += 1
        local.leases.add(member)
        return Lease(key, member, shared)

    def _forget(self, lease: Lease) -> None:
        leaving = self._leaving.get(lease.key, 0)
        if leaving > 1:
            self._leaving[lease.key] = leaving - 1
        elif leaving:
            del self._leaving[lease.key]
        local = self._local.get(lease.key)
        if local is not None:
            local.leases.discard(lease.member)
            if not local.leases and local.throttle is None:
                del self._local[lease.key]

    def _reserve_own(self, key: str, rate: float) -> Reservation:
        """A slot of ``share`` of ``rate`` on this one's own loop clock."""
        local = self._local.setdefault(key, _Local())
        mine = rate * self.share
        if local.throttle is None or local.rate != mine:
            local.throttle, local.rate = Throttle(mine), mine
        now = asyncio.get_running_loop().time()
        wait = local.throttle.wait(now)
        return Reservation(wait, round((now + wait) * 1_000_000))

    def _count_own(self, key: str, day: int, cap: int) -> bool:
        """Count one send to ``key`` on UTC ``day`` against ``cap`` here: whether it may
        go (it is counted then)."""
        return count_daily(self._counts, key, day, cap)

    async def count(self, key: str, day: int, cap: int) -> bool:
        """A send to ``key`` counted against its daily ``cap`` (a shaping rule's or a
        warm-up's): False once ``cap`` sends were counted on UTC ``day``.  Each node's
        own (docs/cluster.md); engine.cluster.node counts for a node's workers."""
        return self._count_own(key, day, cap)


class SharedLimits(ShareFallback):
    """Connection leases and message rates per destination key, shared through the Redis
    at ``url`` by every node that uses the same ``prefix``; ``node`` names this one (in
    its lease members, so ``redis-cli`` shows who holds what)."""

    def __init__(self, url: str, node: str, *, prefix: str = "ferry:", lease_ttl: float = 30.0,
                 timeout: float = 0.5, share: float = 0.5, probe_interval: float = 5.0,
                 lease_wait: float = 0.25, client: Any = None) -> None:
        super().__init__(share, lease_wait)
        #: word that another node waits comes with each renewal (every third of the
        #: lease's lifetime): it holds until the one after
        self.wanted_for = lease_ttl / 3 * 1.5
        self.url = url
        self.node = node
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.probe_interval = probe_interval
        self._client = client
        self._scripts: dict[str, Any] = {}
        self._serial = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        #: set to wake the keeper: Redis was lost, or the node stops
        self._nudge = asyncio.Event()
        self._stopping = False
        #: holds being written (share_hold does not wait for Redis)
        self._writes: set[asyncio.Task[Any]] = set()

    # --- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; an unreachable Redis is not an error (the node starts on its share and
        the probe keeps trying)."""
        if self._client is None:
            import redis.asyncio as aioredis  # only a node with [cluster] needs redis-py
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries inside redis-py: a failed call falls back at once, and the probe
            # decides when Redis is back.
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        for name, text in (("acquire", _ACQUIRE), ("renew", _RENEW), ("reserve", _RESERVE)):
            self._scripts[name] = self._client.register_script(text)
        if await self._ping():
            self.shared = True
        else:
            self._fall_back("not reachable at start")
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        """Give back every lease this node holds and close the connection; bounded by
        ``timeout`` per step whatever Redis does."""
        self._stopping = True
        self._nudge.set()
        if self._task is not None:
            # The keeper ends at its next turn (its calls are bounded); never cancelled
            # in the middle of a Redis call.
            await _within(self._task, 2 * self.timeout + 0.5)
            self._task = None
        if self.shared:
            held = [(self._lease_key(k), m) for k, local in self._local.items()
                    for m in local.leases]
            if held:
                await self._call(self._zrem_all(held))
        self._local.clear()
        if self._client is not None:
            await _within(asyncio.ensure_future(self._client.aclose()), self.timeout)

    async def _zrem_all(self, held: list[tuple[str, str]]) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for key, member in held:
            pipe.zrem(key, member)
        await pipe.execute()

    # --- connection leases ---------------------------------------------------------------

    async def acquire(self, key: str, limit: int) -> Lease | None:
        """A lease on one of ``limit`` connections to ``key`` for the whole cluster, or
        None when all are taken (by any node)."""
        local = self._local.setdefault(key, _Local())
        member = f"{self.node}:{next(self._serial)}"
        within_share = len(local.leases) < self.mine(limit)
        if self.shared:
            if not within_share and (self._in_grace() or self._is_wanted(key)):
                return self._grant(local, key, member, False, shared=True)
            granted = await self._call(self._scripts["acquire"](
                keys=[self._lease_key(key), self._wanted_key(key)],
                args=[member, limit, self._ttl_ms()]))
            if granted is not None:
                return self._grant(local, key, member, bool(granted), shared=True)
        return self._grant(local, key, member, within_share, shared=False)

    async def release(self, lease: Lease) -> None:
        self._forget(lease)
        if self.shared:
            assert self._client is not None
            await self._call(self._client.zrem(self._lease_key(lease.key), lease.member))

    # --- message rates -------------------------------------------------------------------

    async def reserve(self, key: str, rate: float) -> Reservation:
        """The next of ``rate`` messages a second to ``key`` for the whole cluster: how long
        to wait before sending it.  A rate of 0 is no limit."""
        if rate <= 0:
            return Reservation(0.0, 0)
        if self.shared:
            interval = max(1, round(1_000_000 / rate))
            got = await self._call(self._scripts["reserve"](keys=[self._rate_key(key)],
                                                             args=[interval]))
            if got is not None:
                start, server_now = int(got[0]), int(got[1])
                return Reservation((start - server_now) / 1_000_000, start)
        return self._reserve_own(key, rate)

    # --- suspensions ---------------------------------------------------------------------

    async def suspend(self, destination: str, by: str) -> bool:
        """Tell every node that ``by`` suspended ``destination``; False when Redis did not
        take it (engine.cluster.suspensions writes it again later)."""
        if not self.shared:
            return False
        assert self._client is not None
        return await self._call(self._client.hset(self._suspended_key(), destination,
                                                  by)) is not None

    async def resume(self, destination: str) -> bool:
        if not self.shared:
            return False
        assert self._client is not None
        return await self._call(self._client.hdel(self._suspended_key(),
                                                  destination)) is not None

    async def suspended(self) -> dict[str, str] | None:
        """Every suspended destination and who suspended it; None when Redis cannot say."""
        if not self.shared:
            return None
        assert self._client is not None
        got = await self._call(self._client.hgetall(self._suspended_key()))
        if got is None:
            return None
        return {_text(k): _text(v) for k, v in got.items()}

    # --- automation holds ----------------------------------------------------------------

    def share_hold(self, key: str, rule: str, until: float, reply: str) -> None:
        """Tell every node that the automation rule ``rule`` holds ``key`` until ``until``
        (epoch seconds): written in the background, bounded like every call; the others
        read it at their next look (engine.cluster.suspensions).  Lost while Redis is
        away: the hold stays this node's own, as it would be without a cluster."""
        if not self.shared or self._client is None:
            return
        member = orjson.dumps([key, rule, reply[:500], self.node])
        task = asyncio.get_running_loop().create_task(
            self._call(self._put_hold(member, until)))
        self._writes.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._writes.discard)

    async def _put_hold(self, member: bytes, until: float) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        pipe.zremrangebyscore(self._holds_key(), "-inf", time.time())
        pipe.zadd(self._holds_key(), {member: until})
        await pipe.execute()

    async def holds(self) -> list[tuple[str, str, float, str, str]] | None:
        """The automation holds in force that any node shared: (key, rule, until, reply,
        node) each; None when Redis cannot say.  An unreadable member is skipped."""
        if not self.shared:
            return None
        assert self._client is not None
        got = await self._call(self._client.zrangebyscore(
            self._holds_key(), time.time(), "+inf", withscores=True))
        if got is None:
            return None
        out = []
        for member, until in got:
            try:
                key, rule, reply, node = orjson.loads(member)
                out.append((str(key), str(rule), float(until), str(reply), str(node)))
            except (ValueError, TypeError):
                log.warning("cluster: a shared hold that cannot be read: %r", member[:80])
        return out

    # --- the connection to Redis ---------------------------------------------------------

    def _lease_key(self, key: str) -> str:
        return f"{self.prefix}lease:{key}"

    def _wanted_key(self, key: str) -> str:
        return f"{self.prefix}wanted:{key}"

    def _rate_key(self, key: str) -> str:
        return f"{self.prefix}rate:{key}"

    def _suspended_key(self) -> str:
        return f"{self.prefix}suspended"

    def _holds_key(self) -> str:
        return f"{self.prefix}holds"

    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl * 1000))

    async def _call(self, awaitable: Any) -> Any:
        """The call's answer, or None after falling back when Redis did not give one."""
        try:
            return await _bounded(awaitable, self.timeout)
        except _UNREACHABLE as exc:
            self._failed(exc)
        except Exception as exc:
            from redis.exceptions import RedisError

            if not isinstance(exc, RedisError):
                raise
            self._failed(exc)
        return None

    def _failed(self, exc: BaseException) -> None:
        self.figures.errors += 1
        if self.shared:
            self._fall_back(f"{type(exc).__name__}: {exc}".rstrip(": "))

    def _fall_back(self, why: str) -> None:
        self.shared = False
        self.figures.fallbacks += 1
        self._nudge.set()
        log.warning("cluster: Redis at %s unreachable (%s): every limit is this node's "
                    "share (%g) until it answers again", _safe_url(self.url), why, self.share)

    async def _ping(self) -> bool:
        assert self._client is not None
        try:
            return bool(await _bounded(self._client.ping(), self.timeout))
        except Exception as exc:
            from redis.exceptions import RedisError

            if isinstance(exc, (RedisError, *_UNREACHABLE)):
                return False
            raise

    async def _keep(self) -> None:
        """Renew the leases while Redis answers; probe it while it does not."""
        while not self._stopping:
            self._nudge.clear()
            if self.shared:
                if not await _wait(self._nudge, self.lease_ttl / 3) and self.shared:
                    await self._renew()
            else:
                await _wait(self._nudge, self.probe_interval)
                if self._stopping:
                    return
                if await self._ping() and await self._renew():
                    self.shared = True
                    self._grace_until = (asyncio.get_running_loop().time()
                                         + 2 * (self.probe_interval + self.timeout))
                    log.info("cluster: Redis at %s answers again: limits are shared",
                             _safe_url(self.url))

    async def _renew(self) -> bool:
        """Renew (or register again) every lease held; False when Redis did not answer.
        Leases given back while Redis was away are not in it any more for this node:
        they expire there within ``lease_ttl``."""
        held = [(k, m) for k, local in self._local.items() for m in local.leases]
        if not held:
            return True
        got = await self._call(self._scripts["renew"](
            keys=[self._lease_key(k) for k, _ in held] + [self._wanted_key(k) for k, _ in held],
            args=[self._ttl_ms(), *(m for _, m in held)]))
        if got is None:
            return False
        for index in got:
            # Another node was refused one of these keys' leases: keep to the share of it
            # until the next renewal tells again (ShareFallback.yielding).
            self._wanted(held[int(index) - 1][0])
        self.figures.renewals += 1
        return True


async def _bounded(awaitable: Any, seconds: float) -> Any:
    """The answer of ``awaitable`` within ``seconds``, else TimeoutError.  Unlike
    ``asyncio.wait_for``, never waits for the call to finish being cancelled: a client's
    teardown stuck on its own lock must not stall the node (the call is cancelled and left
    to end by itself)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


async def _within(task: asyncio.Future[Any], seconds: float) -> None:
    """Wait up to ``seconds`` for ``task``; past it, cancel it and go on."""
    done, _ = await asyncio.wait((task,), timeout=seconds)
    if not done:
        _abandon(task)
    elif not task.cancelled():
        task.exception()  # retrieved: a failed close is not worth a warning at exit


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` was set within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _safe_url(url: str) -> str:
    """The URL without a password (redis://user:secret@host → redis://user:***@host)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"

"""Client rate limits (Postfix's anvil, Exchange's MessageRateLimit): the "ratelimit" agent.

Owns the counters of what each client address and each authenticated user has done lately,
and the refusals past the configured limits:

=========================  ======  ==============================================  ======
limit                      stage   counted                                         reply
=========================  ======  ==============================================  ======
connections per minute     connect each accepted connection, per client address    421
concurrent connections     connect open connections (less at ``disconnect``)       421
AUTH failures per hour     auth    each failed AUTH, per address, across sessions  421 +
                                   connections; past it a lockout                  lockout
user connections/minute    auth    each successful AUTH as the user                421
user concurrent            auth    sessions authenticated as the user, open        421
messages per minute        mail    each MAIL (per user when authenticated, else    450
                                   per address)
recipients per minute      rcpt    each RCPT (likewise)                            452
=========================  ======  ==============================================  ======

Replies, all naming the limit: 421 4.7.0 at connect and at AUTH (RFC 5321 §3.8: the server
closes the channel; the chain ends the session on a TEMPFAIL at those stages); 450 4.7.1 at
MAIL (RFC 5321 §4.2.2, "mailbox unavailable / not taken", the code Postfix answers for its
message rate); 452 4.7.1 at RCPT (RFC 5321 §4.5.3.1.10: 452 is the "too many recipients"
answer, after which a client delivers the recipients already accepted and tries the others
in a later transaction, which is what a rate asks of it).  Messages are counted at MAIL, not
at the end of data, as Postfix counts "message delivery requests": the refusal comes before
the client sends the body (no bandwidth spent on a message that will be refused), and a
client whose messages are refused later in the transaction still spends its allowance.

Each rate is a GCRA (generic cell rate algorithm, as KumoMTA's throttle): N events per
period allow a burst of N, then one more every period/N; the state is one float per limit
per key, updated in place, so an event costs O(1) and allocates nothing that stays.  After
``auth_failures_per_hour`` failures the next one locks the address out for ``auth_lockout``
seconds (every AUTH, right or wrong, gets 421 4.7.0 meanwhile, so guessing cannot go on)
and the failure count starts afresh when the lockout ends.  Each failed AUTH that does not
lock out is answered only after ``auth_failure_delay`` (the auth stage awaits).

The memory is bounded: at most ``max_keys`` keys (client addresses, IPv6 networks of
``ipv6_prefix``, users) are tracked, in least-recently-used order; a new key evicts stale
ones (nothing counted any more) from the old end, and at the bound the least recently seen
key whatever its state.  Plus one small record per open connection, for ``disconnect``.

One agent instance serves every receive connector that lists "ratelimit", so the limits
hold per client across connectors; with several worker processes each counts its own
clients (a limit holds per process).

It must never write to a socket, block, or keep anything per event.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol

from engine.agents.api import ACCEPT, Agent, Session, Transaction, Verdict, tempfail
from engine.agents.networks import IPAddress, Networks, unmap

if TYPE_CHECKING:
    from engine.config import Config, RateLimitAgentConfig
    from engine.protocol.command import Command

__all__ = ["Rate", "RateLimitAgent", "Tracker", "build_ratelimit"]

MINUTE: Final = 60.0
HOUR: Final = 3600.0

# The slots of an entry's rates (one list of floats per key, allocated once).
CONNECTIONS, MESSAGES, RECIPIENTS, AUTH_FAILURES = range(4)
_SLOTS: Final = 4
#: How many stale entries a new key may evict from the old end (amortised O(1)).
_SWEEP: Final = 2


class Rate:
    """``limit`` events per ``period`` seconds as a GCRA: a burst of ``limit``, then one
    every ``period / limit``.  The state is the theoretical arrival time (TAT), a float
    the caller keeps; :meth:`take` returns the new TAT, or None when over the rate."""

    __slots__ = ("interval", "limit", "period", "tolerance")

    def __init__(self, limit: int, period: float) -> None:
        if limit <= 0 or period <= 0:
            raise ValueError("a rate needs a positive limit and period")
        self.limit = limit
        self.period = period
        self.interval = period / limit
        self.tolerance = period - self.interval

    def take(self, tat: float, now: float) -> float | None:
        tat = max(tat, now)
        if tat - now > self.tolerance:
            return None
        return tat + self.interval


class Entry:
    """What one key (a client address or a user) has done: its rates' TATs, its open
    connections, the end of its AUTH lockout."""

    __slots__ = ("locked_until", "open", "tats")

    def __init__(self) -> None:
        self.tats = [0.0] * _SLOTS
        self.open = 0
        self.locked_until = 0.0

    def stale(self, now: float) -> bool:
        """Nothing counted any more: forgetting it changes no decision."""
        return (self.open == 0 and self.locked_until <= now
                and all(tat <= now for tat in self.tats))


class Tracker:
    """The entries by key, at most ``max_keys`` of them, least recently used first."""

    def __init__(self, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        #: Entries evicted before they were stale (the bound is too low for the load).
        self.evicted_live = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def entry(self, key: str, now: float) -> Entry:
        """The entry of ``key``, made when new; marked most recently used."""
        entries = self._entries
        found = entries.get(key)
        if found is not None:
            entries.move_to_end(key)
            return found
        for _ in range(_SWEEP):
            if not entries:
                break
            oldest = next(iter(entries.values()))
            if not oldest.stale(now):
                break
            entries.popitem(last=False)
        while len(entries) >= self.max_keys:
            _, evicted = entries.popitem(last=False)
            if not evicted.stale(now):
                self.evicted_live += 1
        created = entries[key] = Entry()
        return created

    def take(self, entry: Entry, slot: int, rate: Rate, now: float) -> bool:
        """Count one event against ``rate``; False (nothing counted) when over it."""
        tat = rate.take(entry.tats[slot], now)
        if tat is None:
            return False
        entry.tats[slot] = tat
        return True


@functools.lru_cache(maxsize=4096)
def _address_key(ip: IPAddress, ipv6_prefix: int) -> str:
    """The table's key for a client address (cached: an address's text costs a
    microsecond, and a client's events come in runs)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    shift = 128 - ipv6_prefix
    return f"{ipaddress.IPv6Address(int(ip) >> shift << shift)}/{ipv6_prefix}"


def _rate(limit: int, period: float) -> Rate | None:
    return Rate(limit, period) if limit else None


def _per(rate: Rate) -> str:
    return "a minute" if rate.period == MINUTE else "an hour"


class _Context(Protocol):
    """What the factory needs of engine.agents.AgentContext."""

    @property
    def config(self) -> Config: ...


class RateLimitAgent(Agent):
    """The "ratelimit" agent (see the module docstring).  ``sleep`` is how the delay
    after a failed AUTH is waited (a test passes one it controls)."""

    name = "ratelimit"

    def __init__(self, config: RateLimitAgentConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(timeout=config.timeout, fail_open=config.fail == "open")
        self.exempt = Networks(config.exempt)
        self.ipv6_prefix = config.ipv6_prefix
        self.concurrent = config.concurrent_connections
        self.user_concurrent = config.user_concurrent_connections
        self.connections = _rate(config.connections_per_minute, MINUTE)
        self.messages = _rate(config.messages_per_minute, MINUTE)
        self.recipients = _rate(config.recipients_per_minute, MINUTE)
        self.user_connections = _rate(config.user_connections_per_minute, MINUTE)
        self.user_messages = _rate(config.user_messages_per_minute, MINUTE)
        self.user_recipients = _rate(config.user_recipients_per_minute, MINUTE)
        self.auth_failures = _rate(config.auth_failures_per_hour, HOUR)
        self.auth_lockout = config.auth_lockout
        self.auth_failure_delay = config.auth_failure_delay
        self.tracker = Tracker(config.max_keys, clock)
        self._sleep = sleep
        #: session id → the entries it holds an open connection in ([address, user]).
        self._open: dict[str, list[Entry | None]] = {}

    # --- keys --------------------------------------------------------------------------

    def _address(self, session: Session) -> IPAddress | None:
        """The client's address, unmapped; None when it is exempt."""
        ip = unmap(session.client_ip)
        return None if ip in self.exempt else ip

    def _address_key(self, ip: IPAddress) -> str:
        return _address_key(ip, self.ipv6_prefix)

    @staticmethod
    def _user_key(user: str) -> str:
        # A NUL cannot start an address: the two kinds of key never meet.
        return "\0" + user

    # --- stages ------------------------------------------------------------------------

    def connect(self, session: Session) -> Verdict:
        if not (self.concurrent or self.connections):
            return ACCEPT  # nothing to count at connect: no entry, no record to keep
        ip = self._address(session)
        if ip is None:
            return ACCEPT
        now = self.tracker.clock()
        entry = self.tracker.entry(self._address_key(ip), now)
        if self.concurrent and entry.open >= self.concurrent:
            return tempfail(f"Too many connections from [{ip}]: at most {self.concurrent} "
                            "at once; try again later", 421, "4.7.0")
        rate = self.connections
        if rate is not None and not self.tracker.take(entry, CONNECTIONS, rate, now):
            return tempfail(f"Too many connections from [{ip}]: at most {rate.limit} "
                            f"{_per(rate)}; try again later", 421, "4.7.0")
        entry.open += 1
        self._open[session.session_id] = [entry, None]
        return ACCEPT

    def disconnect(self, session: Session) -> None:
        for entry in self._open.pop(session.session_id, ()):
            if entry is not None:
                entry.open -= 1

    def auth(self, session: Session, user: str, ok: bool) -> Verdict | Awaitable[Verdict]:
        ip = self._address(session)
        if ip is None:
            return ACCEPT
        now = self.tracker.clock()
        rate = self.auth_failures
        if rate is not None:
            entry = self.tracker.entry(self._address_key(ip), now)
            if entry.locked_until > now:
                # Right or wrong, no AUTH is tried while locked out: guessing cannot go on.
                return self._locked(ip, entry.locked_until - now)
            if not ok and not self.tracker.take(entry, AUTH_FAILURES, rate, now):
                entry.locked_until = now + self.auth_lockout
                # A fresh allowance when the lockout ends (the failures are paid for).
                entry.tats[AUTH_FAILURES] = entry.locked_until
                return self._locked(ip, self.auth_lockout,
                                    f" after {rate.limit} failures {_per(rate)}")
        if not ok:
            return self._delayed() if self.auth_failure_delay else ACCEPT
        return self._user_session(session, ip, user, now)

    def mail(self, session: Session, tx: Transaction) -> Verdict:
        found = self._counted(session, MESSAGES, self.messages, self.user_messages)
        if found is None:
            return ACCEPT
        who, rate = found
        return tempfail(f"Too many messages from {who}: at most {rate.limit} {_per(rate)}; "
                        "try again later", 450, "4.7.1")

    def rcpt(self, session: Session, tx: Transaction, rcpt: Command) -> Verdict:
        found = self._counted(session, RECIPIENTS, self.recipients, self.user_recipients)
        if found is None:
            return ACCEPT
        who, rate = found
        return tempfail(f"Too many recipients from {who}: at most {rate.limit} {_per(rate)}; "
                        "try again later", 452, "4.7.1")

    # --- helpers -----------------------------------------------------------------------

    def _counted(self, session: Session, slot: int, per_address: Rate | None,
                 per_user: Rate | None) -> tuple[str, Rate] | None:
        """Count one event of ``slot`` for the session's user (authenticated) or address;
        (who, rate) when it is over the rate, else None."""
        ip = self._address(session)
        if ip is None:
            return None
        user = session.auth_user
        rate = per_user if user else per_address
        if rate is None:
            return None
        key = self._user_key(user) if user else self._address_key(ip)
        now = self.tracker.clock()
        if self.tracker.take(self.tracker.entry(key, now), slot, rate, now):
            return None
        return (f"user {user}" if user else f"[{ip}]"), rate

    def _user_session(self, session: Session, ip: IPAddress, user: str,
                      now: float) -> Verdict:
        held = self._open.get(session.session_id)
        if held is not None and held[1] is not None:
            return ACCEPT  # counted already (RFC 4954 §4 allows one AUTH per session)
        if not (self.user_connections or self.user_concurrent):
            return ACCEPT
        entry = self.tracker.entry(self._user_key(user), now)
        if self.user_concurrent and entry.open >= self.user_concurrent:
            return tempfail(f"Too many sessions as user {user}: at most "
                            f"{self.user_concurrent} at once; try again later", 421, "4.7.0")
        rate = self.user_connections
        if rate is not None and not self.tracker.take(entry, CONNECTIONS, rate, now):
            return tempfail(f"Too many sessions as user {user}: at most {rate.limit} "
                            f"{_per(rate)}; try again later", 421, "4.7.0")
        entry.open += 1
        if held is None:
            # The connect stage counted nothing (no per-address connection limit): hold
            # the user's count alone.
            self._open[session.session_id] = [None, entry]
        else:
            held[1] = entry
        return ACCEPT

    @staticmethod
    def _locked(ip: IPAddress, seconds: float, why: str = "") -> Verdict:
        return tempfail(f"Too many AUTH failures from [{ip}]{why}; locked out, try again "
                        f"in {max(1, round(seconds))} s", 421, "4.7.0")

    async def _delayed(self) -> Verdict:
        await self._sleep(self.auth_failure_delay)
        return ACCEPT


def build_ratelimit(ctx: _Context) -> RateLimitAgent:
    """The "ratelimit" agent of ``[agents.ratelimit]``: build it once, list it on any
    number of connectors."""
    return RateLimitAgent(ctx.config.agents.ratelimit)

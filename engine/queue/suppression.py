"""The suppression list: recipients mail is no longer accepted for, kept with the queue.

Entries live in the queue database's ``suppressed`` table (``engine.queue.lmdb_txn``:
address → :class:`Entry` as orjson) and, in a running server, in a dict loaded once at
start (:meth:`SuppressionList.load`), so a check is one dict lookup whatever the size of
the list (100,000 entries cost nothing measurable per recipient).  The dict holds the
stored bytes, decoded only when an address is found: 100,000 entries load in tens of
milliseconds and are 200,000 strings and bytes, no objects for the collector to walk.
Every change is made in the dict at once and handed to the queue's writer (group commit,
never a write on the event loop); the caller may await the commit.

Who adds: the scheduler, for a recipient that FAILED with a hard bounce category
(``[suppression] auto_categories``: :meth:`SuppressionList.failed`, hooked where the
failure is recorded, classified by the table it is handed: ``engine.scheduler.bounces``);
the operator (``ferry suppress``, the admin API).  Who reads: the suppression agent at
RCPT (``engine.agents.suppress``) and the injection API (``engine.http.inject``).
Addresses are compared in lower case (RFC 5321 §2.4 lets a server treat local parts
case-sensitively, but no large receiver does, and a list that missed ``Bob@`` after
suppressing ``bob@`` would be useless).

Auto entries older than ``max_age`` (when set) no longer count and are deleted when met;
the operator's entries stay until removed.  ``enabled = false`` keeps the list but
neither reads nor grows it.

This module must never know SMTP or HTTP (the reply texts are the agents'), and never
touch LMDB but through the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import orjson

from engine.config import BOUNCE_CATEGORIES, SuppressionConfig
from engine.queue.api import Outcome
from engine.queue.records import Envelope, RcptState

log = logging.getLogger("ferry.suppression")

Source = Literal["auto", "operator"]
#: Longest reason kept (a reply is capped by the client; an operator's text is cut).
MAX_REASON: Final = 500
#: Longest address taken (RFC 5321 §4.5.3.1.3: a path is at most 256 octets).
MAX_ADDRESS: Final = 256


class Store(Protocol):
    """What the list needs of the queue (``engine.queue.lmdb_store.LmdbQueue``)."""

    def suppress_soon(self, puts: Sequence[tuple[bytes, bytes]],
                      deletes: Sequence[bytes] = ()) -> asyncio.Future[tuple[bool, ...]]: ...

    def suppress_sync(self, puts: Sequence[tuple[bytes, bytes]],
                      deletes: Sequence[bytes] = ()) -> tuple[bool, ...]: ...

    def suppressed(self) -> list[tuple[bytes, bytes]]: ...


class SuppressionError(ValueError):
    """An operator's request that cannot be done (a bad address, an unknown category)."""


@dataclass(frozen=True, slots=True)
class Entry:
    address: str
    reason: str
    category: str
    #: POSIX time it was added
    added: float
    source: Source

    def encode(self) -> bytes:
        return orjson.dumps({"reason": self.reason, "category": self.category,
                             "added": self.added, "source": self.source})

    @classmethod
    def decode(cls, address: bytes, value: bytes) -> Entry:
        doc = orjson.loads(value)
        return cls(address.decode(errors="replace"), str(doc.get("reason", "")),
                   str(doc.get("category", "")), float(doc.get("added", 0.0)),
                   "auto" if doc.get("source") == "auto" else "operator")

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "reason": self.reason, "category": self.category,
                "added": self.added, "source": self.source}


def normalize(address: object) -> str:
    """The list's key for an address; SuppressionError when it is not one."""
    if not isinstance(address, str):
        raise SuppressionError("the address must be a string")
    text = address.strip().removeprefix("<").removesuffix(">").lower()
    local, at, domain = text.rpartition("@")
    if not (at and local and domain) or len(text) > MAX_ADDRESS or any(
            c.isspace() or not c.isprintable() for c in text):
        raise SuppressionError(f"not an address: {address[:80]!r}")
    return text


def check_category(category: object) -> str:
    if category in ("", None):
        return ""
    if not isinstance(category, str) or category not in BOUNCE_CATEGORIES:
        raise SuppressionError(f"category must be one of {', '.join(BOUNCE_CATEGORIES)} "
                               f"(got {str(category)[:40]!r})")
    return category


def _clean(reason: object) -> str:
    text = "" if reason is None else str(reason)
    return "".join(c if c.isprintable() else " " for c in text)[:MAX_REASON]


def read_entries(store: Store) -> list[Entry]:
    """Every entry stored (a stopped spool's, or at start); one that does not decode is
    logged and left out, never deleted (an operator put it there)."""
    entries: list[Entry] = []
    for key, value in store.suppressed():
        try:
            entries.append(Entry.decode(key, value))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("suppression entry %r does not decode (%s); ignored", key[:80], exc)
    return entries


class SuppressionList:
    """The list of a running server (see the module docstring)."""

    def __init__(self, store: Store, settings: SuppressionConfig | None = None,
                 classify: Callable[[str], str] | None = None) -> None:
        self.store = store
        self.settings = settings or SuppressionConfig()
        #: a reply → its bounce category (engine.scheduler.bounces.classify: the list
        #: knows no replies itself); None: nothing is added automatically
        self.classify = classify
        #: address → the stored entry (bytes: see the module docstring); :meth:`entry`
        self.entries: dict[str, bytes] = {}
        #: Told of the entries :meth:`failed` adds (a worker of a node: its peers add
        #: them too, engine.app); None: this list is the only one.
        self.shared: Callable[[list[Entry]], None] | None = None

    def reconfigure(self, settings: SuppressionConfig) -> None:
        self.settings = settings

    async def load(self) -> int:
        """Read the stored entries into memory (in a thread: a long list takes a while)."""
        raw = await asyncio.to_thread(self.store.suppressed)
        self.entries = {key.decode(errors="replace"): value for key, value in raw}
        return len(self.entries)

    def entry(self, address: str) -> Entry | None:
        """The entry stored for ``address`` (lower case), whatever its age; None: none or
        one that does not decode (logged; it stays stored: an operator put it there)."""
        raw = self.entries.get(address)
        if raw is None:
            return None
        try:
            return Entry.decode(address.encode(), raw)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("suppression entry %r does not decode (%s); ignored", address[:80], exc)
            return None

    # --- checks (the hot path: one dict lookup) ---------------------------------------

    def check(self, address: str, now: float | None = None) -> Entry | None:
        """The entry that suppresses ``address``; None when mail for it is taken (or the
        list is off)."""
        if not self.settings.enabled or not self.entries:
            return None
        key = address.lower()
        if key not in self.entries:
            return None
        entry = self.entry(key)
        if entry is None:
            return None
        max_age = self.settings.max_age
        if max_age and entry.source == "auto" and (now or time.time()) - entry.added > max_age:
            self._forget(entry.address)
            return None
        return entry

    def _forget(self, address: str) -> None:
        if self.entries.pop(address, None) is not None:
            self._write((), (address.encode(),))

    # --- changes ---------------------------------------------------------------------

    def _write(self, puts: Sequence[tuple[str, bytes]], deletes: Sequence[bytes] = ()
               ) -> asyncio.Future[tuple[bool, ...]]:
        future = self.store.suppress_soon([(a.encode(), raw) for a, raw in puts], deletes)
        future.add_done_callback(_log_failure)
        return future

    async def add(self, address: object, reason: object = "", category: object = "",
                  source: Source = "operator") -> Entry:
        """Add or replace an entry; returns after its commit."""
        entry = Entry(normalize(address), _clean(reason) or "added by the operator",
                      check_category(category), time.time(), source)
        self.entries[entry.address] = raw = entry.encode()
        await self._write([(entry.address, raw)])
        return entry

    async def remove(self, address: object) -> bool:
        """Remove an entry; True when there was one.  Returns after the commit."""
        key = normalize(address)
        self.entries.pop(key, None)
        (found,) = await self._write((), (key.encode(),))
        return found


    # --- the scheduler's hook ---------------------------------------------------------

    def failed(self, env: Envelope, outcomes: Iterable[Outcome]) -> None:
        """Add the recipients of ``outcomes`` that FAILED with a hard category (the
        scheduler's hook: ``Scheduler.on_outcomes``, called as the outcomes go to the
        queue; the entries follow them in the writer's order)."""
        settings, classify = self.settings, self.classify
        if not settings.enabled or not settings.auto_categories or classify is None:
            return
        added: list[tuple[str, bytes]] = []
        made: list[Entry] = []
        now = time.time()
        for o in outcomes:
            if o.state is not RcptState.FAILED or not o.attempted:
                continue  # expiry is not a verdict on the mailbox
            category = classify(o.reply)
            if category not in settings.auto_categories:
                continue
            address = env.recipients[o.recipient].address.lower()
            if address in self.entries or "@" not in address:
                continue
            made.append(entry := Entry(address, _clean(o.reply), category, now, "auto"))
            self.entries[address] = raw = entry.encode()
            added.append((address, raw))
            log.info("suppressed %s (%s)", address, category)
        if made and self.shared is not None:
            self.shared(made)
        if added:
            # On the next turn: after the scheduler has handed these outcomes to the
            # writer (it does so in this turn, or on a call_soon already made), so the
            # entries are committed with the failure or right after it, never before.
            asyncio.get_running_loop().call_soon(self._write, added)


def _log_failure(future: asyncio.Future[tuple[bool, ...]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("storing a change of the suppression list failed: %s", future.exception())


# --- a stopped spool ------------------------------------------------------------------


def add_stopped(store: Store, address: str, reason: str = "",
                category: str = "") -> Entry:
    """``ferry suppress add`` with no server running: straight to the queue database."""
    entry = Entry(normalize(address), _clean(reason) or "added by the operator",
                  check_category(category), time.time(), "operator")
    store.suppress_sync([(entry.address.encode(), entry.encode())])
    return entry


def remove_stopped(store: Store, address: str) -> bool:
    (found,) = store.suppress_sync((), (normalize(address).encode(),))
    return found

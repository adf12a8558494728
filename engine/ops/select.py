"""Which queued messages an operator means: the filters of ``ferry queue list`` (and of the
verbs that act on many messages), and the selection that finds them in a ``QueueStore``.

The filters (:func:`add_filter_arguments`, :class:`Filter`) are Exchange's Get-Message
filters: ``--sender``, ``--recipient``, ``--destination``, ``--state``, ``--older-than``,
``--larger-than`` and ``--error`` (a substring of a recipient's last reply).  The
recipient-level ones (recipient, destination, state, error) must hold for one and the
same recipient: ``--recipient bob@example.com --state deferred`` is a message whose bob
is deferred, not one with bob somewhere and some deferred recipient.

:func:`select` reads the candidates from the narrowest index a filter allows (the hop
index for ``--destination``, the state index for ``--state``, else the ids of every state
that is not final), in queue-id order (arrival order), and decodes a record only when a
filter needs it: with ``--destination`` or ``--state`` alone every id from the index
matches, so only the ones shown are decoded.  It counts every match, so a listing can say
"N of M shown".

It only reads: it must never change the queue, print, or know the command line beyond
adding its arguments to a parser.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engine.queue.api import QueueStore
from engine.queue.records import (
    CORRUPT,
    FINAL_STATES,
    Envelope,
    RcptState,
    Recipient,
    RecordError,
)

#: Ids read from an index in one read transaction.
PAGE = 1000

#: The states a queued message's recipients can be in (final ones leave with the
#: message), and ``corrupt`` for records that do not decode.
OPEN_STATES: tuple[str, ...] = tuple(s.value for s in RcptState if s not in FINAL_STATES)
#: In the enum's order: FINAL_STATES is a set, whose order changes with the process's
#: string hashing, and --help, man pages and completion must not.
STATES: tuple[str, ...] = (*OPEN_STATES, *(s.value for s in RcptState if s in FINAL_STATES),
                           CORRUPT)


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the message filters to ``parser`` (read back with :meth:`Filter.from_args`)."""
    group = parser.add_argument_group("filters (all given must match)")
    group.add_argument("--sender", metavar="ADDR", help="the envelope sender: an address, "
                       "or a domain (example.com or @example.com); <> for the null sender "
                       "(reports)")
    group.add_argument("--recipient", metavar="ADDR", help="a recipient: an address or a "
                       "domain, as --sender")
    group.add_argument("--destination", metavar="DEST", help="a recipient waiting for this "
                       "destination (a domain, local:<domain> or [address literal], as "
                       "`ferry queue queues` names it)")
    group.add_argument("--state", choices=STATES, help="a recipient in this state "
                       "(corrupt: records that do not decode)")
    group.add_argument("--older-than", metavar="SECONDS", type=_seconds,
                       help="arrived more than SECONDS ago")
    group.add_argument("--larger-than", metavar="BYTES", type=_bytes,
                       help="larger than BYTES")
    group.add_argument("--error", metavar="TEXT", help="a recipient whose last reply holds "
                       "TEXT (any case), e.g. 4.7.1 or 'greylisted'")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def _bytes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}")
    return value


def _address(text: str) -> str:
    """An address or domain filter, compared without case; <> is the null sender."""
    text = text.strip()
    return "" if text in ("<>", "") else text.strip("<>").lower()


def _matches_address(want: str, address: str) -> bool:
    """``want`` is an address (whole match), a domain or an @domain (the domain part)."""
    address = address.lower()
    if not want:
        return not address
    if "@" in want.lstrip("@"):
        return address == want
    return address.rpartition("@")[2] == want.lstrip("@").rstrip(".")


def destination_name(text: str) -> str:
    """A destination as the queue records it (``Router.destination``, without the
    configuration: the operator names a local domain as local:<domain>): lower case, no
    trailing dot, an IPv6 literal's tag as RFC 5321 §4.1.3 spells it."""
    name = text.strip().lower().rstrip(".")
    return "[IPv6:" + name[6:] if name.startswith("[ipv6:") else name


@dataclass(frozen=True, slots=True)
class Filter:
    """The filters; None (or an empty Filter) matches every queued message."""

    sender: str | None = None
    recipient: str | None = None
    destination: str | None = None
    state: str | None = None
    older_than: float | None = None
    larger_than: int | None = None
    error: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Filter:
        """The filters :func:`add_filter_arguments` added, as given on the command line."""
        return cls.of(sender=args.sender, recipient=args.recipient,
                      destination=args.destination, state=args.state,
                      older_than=args.older_than, larger_than=args.larger_than,
                      error=args.error)

    @classmethod
    def of(cls, *, sender: str | None = None, recipient: str | None = None,
           destination: str | None = None, state: str | None = None,
           older_than: float | None = None, larger_than: int | None = None,
           error: str | None = None) -> Filter:
        """The filters as an operator gives them (on the command line, in an admin API
        request), compared the way the queue records them; the values are checked by the
        caller (``state`` one of :data:`STATES`, the numbers not negative)."""
        return cls(
            sender=_address(sender) if sender is not None else None,
            recipient=_address(recipient) if recipient is not None else None,
            destination=destination_name(destination) if destination else None,
            state=state, older_than=older_than, larger_than=larger_than,
            error=error.lower() if error else None)

    @property
    def decodes(self) -> bool:
        """Whether a record must be read to tell: not when one index answers alone."""
        return (self.sender is not None or self.recipient is not None
                or self.older_than is not None or self.larger_than is not None
                or self.error is not None
                or (self.destination is not None and self.state is not None))

    def matches(self, env: Envelope, now: float) -> bool:
        if self.sender is not None and not _matches_address(self.sender, env.sender):
            return False
        if self.older_than is not None and env.arrival >= now - self.older_than:
            return False
        if self.larger_than is not None and env.size <= self.larger_than:
            return False
        return any(self._recipient(r) for r in env.recipients)

    def _recipient(self, r: Recipient) -> bool:
        if self.state is not None:
            if r.state.value != self.state:
                return False
        elif r.state in FINAL_STATES:
            return False  # a listing is of what waits; --state delivered shows the rest
        if self.destination is not None and r.next_hop != self.destination:
            return False
        if self.recipient is not None and not _matches_address(self.recipient, r.address):
            return False
        return self.error is None or self.error in r.last_reply.lower()


@dataclass(slots=True)
class Selection:
    """What :func:`select` found: the first ``limit`` matches (oldest first), how many
    match in all, and the records among the candidates that do not decode."""

    envelopes: list[Envelope] = field(default_factory=list)
    total: int = 0
    corrupt: list[tuple[bytes, str]] = field(default_factory=list)


def candidate_ids(store: QueueStore, filt: Filter) -> Iterator[bytes]:
    """Ids that may match, each once, in queue-id (arrival) order, from the narrowest
    index: the hop index, the state index, or the ids of every state that is not final."""
    if filt.destination is not None:
        yield from _paged(store.ids_for_hop, filt.destination)
    elif filt.state is not None:
        yield from _paged(store.ids_in_state, filt.state)
    else:
        # A message can be in several states at once: merged into one ordered set.
        seen: set[bytes] = set()
        for state in OPEN_STATES:
            seen.update(_paged(store.ids_in_state, state))
        yield from sorted(seen)


def _paged(read: Callable[[str, int, bytes], list[bytes]], key: str) -> Iterator[bytes]:
    after = b""
    while True:
        ids = read(key, PAGE, after)
        yield from ids
        if len(ids) < PAGE:
            return
        after = ids[-1]


def matches(store: QueueStore, filt: Filter, now: float | None = None
            ) -> Iterator[Envelope | tuple[bytes, str]]:
    """Every match, oldest first: an Envelope, or (id, reason) for a candidate record that
    does not decode (it matches ``--state corrupt`` only, and is reported, not hidden)."""
    now = time.time() if now is None else now
    for qid in candidate_ids(store, filt):
        try:
            env = store.get(qid)
        except KeyError:
            continue  # delivered since the index was read
        except RecordError as exc:
            if filt.state == CORRUPT and not filt.decodes:
                yield qid, str(exc)
            continue
        if filt.state == CORRUPT:
            continue  # quarantined and rewritten since; not corrupt any more
        if filt.matches(env, now):
            yield env


def select(store: QueueStore, filt: Filter | None = None, limit: int | None = None,
           now: float | None = None) -> Selection:
    """The matches of ``filt`` (see the module docstring), at most ``limit`` of them
    decoded and returned, and the count of all."""
    filt = filt or Filter()
    found = Selection()
    if not filt.decodes and filt.state != CORRUPT:
        # One index answers alone: count from it, decode only what is returned.
        now = time.time() if now is None else now
        for qid in candidate_ids(store, filt):
            if limit is not None and len(found.envelopes) >= limit:
                found.total += 1
                continue
            try:
                env = store.get(qid)
            except KeyError:
                continue
            except RecordError as exc:
                found.corrupt.append((qid, str(exc)))  # listed (and counted), never hidden
                found.total += 1
                continue
            if filt.matches(env, now):
                found.envelopes.append(env)
                found.total += 1
        return found
    for match in matches(store, filt, now):
        if isinstance(match, tuple):
            found.corrupt.append(match)
            found.total += 1
            continue
        found.total += 1
        if limit is None or len(found.envelopes) < limit:
            found.envelopes.append(match)
    return found


def select_ids(store: QueueStore, filt: Filter, now: float | None = None) -> list[bytes]:
    """The queue ids of every message ``filt`` matches, oldest first (for the verbs that
    act on many messages: hold, release, remove)."""
    return [m.queue_id if isinstance(m, Envelope) else m[0]
            for m in matches(store, filt, now)]

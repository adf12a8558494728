"""Queue records: ids, the envelope record and its recipients, their encoding.

An envelope record is orjson with the format version as its first field, so a reader can
refuse a record from a newer Ferry before looking at anything else.  Bodies are stored
apart, once per message.  Queue ids are time-ordered (milliseconds, then a per-process
counter, then random bits), so LMDB keeps them in arrival order and ids from two processes
never collide.

This module must never do I/O or know SMTP: it only shapes data.
"""

from __future__ import annotations

import enum
import itertools
import operator
import os
import struct
import time
from dataclasses import dataclass, field, fields
from typing import Any, Final

import orjson

#: Version of the envelope record; the first key of every record.
RECORD_VERSION: Final = 1

ID_LEN: Final = 12  # 6 bytes ms timestamp, 2 bytes counter, 4 random bytes per process


class RcptState(enum.StrEnum):
    """Per-recipient state.  All but DELIVERED and FAILED are not final: the message stays
    queued.  HELD (an operator's hold) and POISON (processing failed twice, or the message
    was in flight at two crashes in a row) are parked: never tried and never expired until
    an operator releases them (the time parked does not count towards the lifetime)."""

    PENDING = "pending"
    DEFERRED = "deferred"
    SUSPENDED = "suspended"
    HELD = "held"
    POISON = "poison"
    DELIVERED = "delivered"
    FAILED = "failed"


FINAL_STATES: Final = frozenset({RcptState.DELIVERED, RcptState.FAILED})
#: States that only an operator's release ends (no due entry at all; see Envelope.parked).
PARKED_STATES: Final = frozenset({RcptState.HELD, RcptState.POISON})

#: State by its stored value: a dict lookup, not an enum call per recipient decoded.
_STATES: Final = {state.value: state for state in RcptState}

#: A state of a whole message that is not a recipient state: its record did not decode.
CORRUPT: Final = "corrupt"

_counter = itertools.count(int.from_bytes(os.urandom(2), "big"))
#: Random per process: ids from two processes never collide, and no system call per id.
_PROCESS_TAG = os.urandom(4)
_ID = struct.Struct(">QH")


def new_id(now: float | None = None) -> bytes:
    """A new time-ordered queue id (12 bytes): ms, a counter, this process's tag."""
    ms = int((time.time() if now is None else now) * 1000)
    return _ID.pack(ms, next(_counter) & 0xFFFF)[2:] + _PROCESS_TAG


def id_text(queue_id: bytes) -> str:
    """The printable form used in logs, replies and the queue viewer."""
    return queue_id.hex().upper()


def id_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != ID_LEN:
        raise ValueError(f"not a queue id: {text!r}")
    return raw


def id_time(queue_id: bytes) -> float:
    """Arrival time encoded in an id (seconds since the epoch)."""
    return int.from_bytes(queue_id[:6], "big") / 1000


@dataclass(slots=True)
class Recipient:
    """One recipient and where it stands.  ``due`` is when it is next tried (epoch s)."""

    address: str
    next_hop: str
    state: RcptState = RcptState.PENDING
    attempts: int = 0
    due: float = 0.0
    last_reply: str = ""
    #: RFC 3461 §4.1 NOTIFY values, empty when the client gave none.
    notify: tuple[str, ...] = ()
    #: RFC 3461 §4.2 ORCPT ("rfc822;user@example.com"), "" when none.
    orcpt: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def __reduce__(self) -> tuple[type[Recipient], tuple[Any, ...]]:
        return Recipient, _RECIPIENT_FIELDS(self)


@dataclass(slots=True)
class Envelope:
    """Everything the queue knows about one message except its body."""

    sender: str
    recipients: list[Recipient]
    arrival: float = field(default_factory=time.time)
    size: int = 0
    #: RFC 3461 §4.3 RET and §4.4 ENVID.
    ret: str = ""
    envid: str = ""
    smtputf8: bool = False
    body_type: str = ""
    receive_connector: str = ""
    client_address: str = ""
    auth_user: str = ""
    message_id: str = ""
    #: When the message expires whatever its state (epoch s); 0 = never.
    expires: float = 0.0
    queue_id: bytes = b""
    #: The sender has been sent this message's delay notice (RFC 3464 action "delayed"):
    #: there is at most one per message.
    delay_notified: bool = False
    #: Seconds the message spent held or poisoned before its last release, and since when
    #: it is parked now (epoch s; 0 = not parked): its lifetime counts from the release.
    parked: float = 0.0
    parked_since: float = 0.0
    #: Unexpected errors in a row while processing it, and crashes in a row it was in
    #: flight at (kept here to outlive a restart; both reset by a completed attempt): at
    #: the second of either it goes to POISON.
    faults: int = 0
    crashes: int = 0
    #: Why it was moved to POISON ("" when it is not), for the operator.
    poisoned: str = ""

    @property
    def final(self) -> bool:
        return all(r.final for r in self.recipients)

    def __reduce__(self) -> tuple[type[Envelope], tuple[Any, ...]]:
        return Envelope, _ENVELOPE_FIELDS(self)

    def expiry(self, lifetime: float) -> float:
        """When the message expires (epoch s; 0 = never): ``expires`` (or the arrival plus
        ``lifetime`` for a record without it), moved on by the time it spent parked."""
        limit = self.expires or (self.arrival + lifetime if lifetime else 0.0)
        return limit + self.parked if limit else 0.0

    def hops(self) -> dict[str, list[int]]:
        """Next hop → indexes of its recipients that are not final."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.recipients):
            if not r.final:
                out.setdefault(r.next_hop, []).append(i)
        return out


def init_fields(cls: type) -> operator.attrgetter[Any]:
    """All of ``cls``'s fields as one tuple, in the order its __init__ takes them."""
    names = [f.name for f in fields(cls) if f.init]
    if len(names) != len(fields(cls)):
        raise TypeError(f"{cls.__name__}: every field must be an __init__ argument")
    return operator.attrgetter(*names)


# Pickling (the queue writer process's pipe, engine.queue.writer_process): the fields as
# one tuple, given back to __init__ (the classes' __reduce__).  The default for a slots
# dataclass pickles a dict of slot names per object, about twice the work on each side,
# for every message the server hands to the writer (20 fields, and 8 per recipient).
# Derived from the fields, so a field added later crosses the pipe too.
_RECIPIENT_FIELDS: Final = init_fields(Recipient)
_ENVELOPE_FIELDS: Final = init_fields(Envelope)


class RecordError(ValueError):
    """An envelope record that cannot be decoded (it goes to the corrupt state)."""


def encode(env: Envelope) -> bytes:
    # Once per message stored and per record rewritten: attributes tested one by one, not
    # looked up by name in a loop; a state is a str (StrEnum): orjson writes its value.
    doc: dict[str, Any] = {
        "v": RECORD_VERSION,
        "sender": env.sender,
        "arrival": env.arrival,
        "size": env.size,
        "expires": env.expires,
        "rcpts": [
            [r.address, r.next_hop, r.state, r.attempts, r.due, r.last_reply,
             list(r.notify), r.orcpt]
            for r in env.recipients
        ],
    }
    # Optional fields only when set: most mail has none, and records stay small.
    if env.ret:
        doc["ret"] = env.ret
    if env.envid:
        doc["envid"] = env.envid
    if env.body_type:
        doc["body_type"] = env.body_type
    if env.receive_connector:
        doc["receive_connector"] = env.receive_connector
    if env.client_address:
        doc["client_address"] = env.client_address
    if env.auth_user:
        doc["auth_user"] = env.auth_user
    if env.message_id:
        doc["message_id"] = env.message_id
    if env.smtputf8:
        doc["smtputf8"] = True
    if env.delay_notified:
        doc["delay_notified"] = True
    if env.parked:
        doc["parked"] = env.parked
    if env.parked_since:
        doc["parked_since"] = env.parked_since
    if env.faults:
        doc["faults"] = env.faults
    if env.crashes:
        doc["crashes"] = env.crashes
    if env.poisoned:
        doc["poisoned"] = env.poisoned
    return orjson.dumps(doc)


def decode(queue_id: bytes, raw: bytes) -> Envelope:
    """Decode a record; any flaw raises RecordError with a reason worth listing."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RecordError("not a JSON object")
    version = doc.get("v")
    if version != RECORD_VERSION:
        raise RecordError(f"unknown record version {version!r}")
    try:
        recipients = [
            Recipient(str(a), str(h), _STATES[s], int(n), float(d), str(rep),
                      tuple(map(str, notify)), str(orcpt))
            for a, h, s, n, d, rep, notify, orcpt in doc["rcpts"]
        ]
        return Envelope(
            sender=str(doc["sender"]),
            recipients=recipients,
            arrival=float(doc["arrival"]),
            size=int(doc["size"]),
            expires=float(doc["expires"]),
            ret=str(doc.get("ret", "")),
            envid=str(doc.get("envid", "")),
            smtputf8=bool(doc.get("smtputf8", False)),
            body_type=str(doc.get("body_type", "")),
            receive_connector=str(doc.get("receive_connector", "")),
            client_address=str(doc.get("client_address", "")),
            auth_user=str(doc.get("auth_user", "")),
            message_id=str(doc.get("message_id", "")),
            queue_id=queue_id,
            # Absent in records written before delay notices existed: none was sent.
            delay_notified=bool(doc.get("delay_notified", False)),
            # Absent in records written before holds and poison existed: never parked.
            parked=float(doc.get("parked", 0.0)),
            parked_since=float(doc.get("parked_since", 0.0)),
            faults=int(doc.get("faults", 0)),
            crashes=int(doc.get("crashes", 0)),
            poisoned=str(doc.get("poisoned", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"bad field: {exc!r}") from None

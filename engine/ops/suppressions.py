"""The operator's views and verbs on the suppression list, once for both front doors: the
control channel (``ferry suppress``, engine.ops.control) and the admin API
(``/api/v1/suppressions``, engine.http.admin).  Each door parses its transport into the
values these take and answers the documents they return.

- ``add``: an entry (address, reason, category) of source "operator"; it replaces an
  entry already there.  Answers the entry.
- ``remove``: answers ``{"address": ..., "removed": true|false}``.
- ``listing``: entries in address order, at most ``limit``, after the address ``after``
  (paging), of one ``category`` when given; ``next`` is the address to go on after ("" at
  the end), ``total`` how many the list holds.

Bad input raises ``OperationError`` (a 400 / an error reply).  This module must never
know a transport, and never touch the store but through the list.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Final

from engine.ops.operations import OperationError, Operations
from engine.queue.suppression import (
    SuppressionError,
    SuppressionList,
    check_category,
    normalize,
)

log = logging.getLogger("ferry.control")

#: Entries one listing answers when the request does not say; at most MAX_LIMIT.
DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 10_000


def suppression_of(operations: Operations) -> SuppressionList:
    found = operations.suppression
    if found is None:
        raise OperationError("this server keeps no suppression list")
    return found


def _text(value: object, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OperationError(f'"{name}" must be a string')
    return value


async def add(operations: Operations, address: object, reason: object, category: object,
              by: str, source: object = "operator") -> dict[str, Any]:
    """``source``: "operator", or "auto" for an entry another worker of the node added
    from a bounce (engine.queue.suppression ``SuppressionList.shared``)."""
    suppression = suppression_of(operations)
    if source not in ("operator", "auto"):
        raise OperationError(f'source must be "operator" or "auto" (got {source!r})')
    try:
        entry = await suppression.add(address, _text(reason, "reason"),
                                      _text(category, "category"),
                                      "auto" if source == "auto" else "operator")
    except SuppressionError as exc:
        raise OperationError(str(exc)) from None
    log.info("%s suppressed %s (%s)", by, entry.address, entry.reason)
    return entry.to_json()


async def remove(operations: Operations, address: object, by: str) -> dict[str, Any]:
    suppression = suppression_of(operations)
    try:
        removed = await suppression.remove(address)
    except SuppressionError as exc:
        raise OperationError(str(exc)) from None
    key = normalize(address)
    log.info("%s removed %s from the suppression list (%s)", by, key,
             "it was there" if removed else "it was not there")
    return {"address": key, "removed": removed}


def parse_limit(value: object) -> int:
    if value is None:
        return DEFAULT_LIMIT
    try:
        limit = int(value) if isinstance(value, str | int) and not isinstance(
            value, bool) else -1
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIMIT:
        raise OperationError(f'"limit" must be a number from 1 to {MAX_LIMIT}')
    return limit


def listing(operations: Operations, category: object = "", after: object = "",
            limit: object = None) -> dict[str, Any]:
    suppression = suppression_of(operations)
    try:
        wanted = check_category(_text(category, "category"))
    except SuppressionError as exc:
        raise OperationError(str(exc)) from None
    start = _text(after, "after").lower()
    most = parse_limit(limit)
    # Sorted per request: the list changes under the server; 100,000 keys sort in ~20 ms.
    keys = sorted(suppression.entries)
    out: list[dict[str, Any]] = []
    more = False
    for key in keys[bisect.bisect_right(keys, start) if start else 0:]:
        entry = suppression.entry(key)
        if entry is None or (wanted and entry.category != wanted):
            continue
        if len(out) == most:
            more = True
            break
        out.append(entry.to_json())
    return {"entries": out, "next": out[-1]["address"] if more else "",
            "total": len(keys)}

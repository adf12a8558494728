"""One control channel for a whole node: the supervisor's ``<spool>/control.sock``.

A node with N workers is N queue shards (``engine.cluster.shards``), each served by its
worker's own control socket (``worker_control_path(spool, i)``).  :class:`NodeControl`
serves the node's socket with the same line protocol as ``engine.ops.control`` (the same
requests, checked by the same :func:`~engine.ops.control.parse_request`), by forwarding
each request to every worker at once and merging their replies, so ``ferry queue`` and
every worker's admin API see and act on the node as one server:

- ``queues``: one row per destination, counts and rates summed, the worst state, the
  latest error, the earliest next retry (:func:`merge_rows`); ``stats``: figures summed
  (:func:`merge_stats`); ``suspended``: the union.
- ``hold`` / ``release`` / ``remove`` / ``retry`` by ids: every worker gets the ids; a
  message lives in one shard, so an id is ``changed`` or ``unchanged`` where it lives and
  ``missing`` only when every worker that answered misses it (:func:`merge_verbs`).
- ``suspend`` / ``resume`` / ``retry`` of a destination: to every worker (each holds its
  own shard's mail for it), recipients summed.
- ``suppress`` / ``unsuppress``: to every worker (each shard keeps its own suppression
  list); ``suppressions`` is worker 0's list.  ``reload`` is the supervisor's own when
  it gives one (a callable); else every worker reloads and the replies merge
  (:func:`merge_reloads`: refused if any worker refused).
- ``metrics``: every worker's text with a ``worker="<i>"`` label on each sample, each
  family's samples together (:func:`merge_metrics`): a worker's ``GET /metrics``.

A worker that does not answer (stopped, restarting, slower than ``timeout``) is named in
the reply, ``"not_answering": [1]`` and ``"warnings": ["worker 1 not answering (...)"]``,
and the others still act; a request no worker answers is an error reply naming them all.
A request that every answering worker refuses gets the first refusal.

The workers' events name the operator who asked the node (the node's socket's peer,
forwarded as ``"by"``, which a worker takes from its supervisor only: root or its own
user); the node's socket is as private as a server's (0600, owned by ``[server] user``).

Merging is sans-I/O (plain JSON values in and out); :class:`NodeControl` is the asyncio
glue.  It must never open a queue or decide anything itself: the workers do the work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from engine.cluster.shards import worker_control_path
from engine.ops import control
from engine.ops.control import (
    MAX_REQUEST,
    ControlError,
    LineServer,
    Reply,
    Request,
    error_reply,
    operator,
    parse_request,
)
from engine.queue.records import id_text

if TYPE_CHECKING:
    from engine.cluster.supervisor import Supervisor

log = logging.getLogger("ferry.control")

#: How long a worker may take to answer one request (a suspend of a large destination
#: parks every queued recipient of its shard before it answers).
DEFAULT_TIMEOUT: Final = 300.0

#: The states of a queue row, the worst first: the node's row has the worst of its
#: workers' rows.  ``held`` is an exception: the node's row is held only when every
#: worker's is (as one server's is when every message waiting there is held).
STATE_ORDER: Final = ("suspended", "unreachable", "down", "retry", "active", "ready")

#: How long a worker may take to render its metrics (milliseconds when well): a scrape
#: gets the others' when one is stuck, rather than waiting for :data:`DEFAULT_TIMEOUT`.
METRICS_TIMEOUT: Final = 5.0

#: The commands sent to worker 0 alone (the others answer the same, or their own part of
#: no interest: the suppression list is kept per shard, its listing is worker 0's; the
#: alert rules are evaluated by worker 0 alone).
_FIRST_ONLY: Final = frozenset({"suppressions", "alerts"})


# --- merging (sans-I/O) ------------------------------------------------------------------


def _timestamp(text: str | None) -> float:
    return datetime.fromisoformat(text).timestamp() if text else 0.0


def merge_rows(per_worker: Iterable[Iterable[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The node's queue rows (``QueueRow.to_json``'s) from each worker's: one per
    destination, in the order of the names (webhook rows last, as one server lists
    them)."""
    merged: dict[str, dict[str, Any]] = {}
    states: dict[str, list[str]] = {}
    for rows in per_worker:
        for row in rows:
            name = row["destination"]
            states.setdefault(name, []).append(row["state"])
            have = merged.get(name)
            if have is None:
                merged[name] = dict(row)
                continue
            have["messages"] += row["messages"]
            have["recipients"] += row["recipients"]
            sites = have["site"].split() + [s for s in row["site"].split()
                                            if s not in have["site"].split()]
            have["site"] = " ".join(sites)
            for rate in ("in_per_minute", "out_per_minute"):
                if row[rate] is not None:
                    have[rate] = (have[rate] or 0.0) + row[rate]
            if row["last_error"] and (not have["last_error"] or (
                    row.get("last_error_due") or 0) > (have.get("last_error_due") or 0)):
                have["last_error"] = row["last_error"]
                have["last_error_due"] = row.get("last_error_due")
            if row["next_retry"] and (not have["next_retry"] or _timestamp(
                    row["next_retry"]) < _timestamp(have["next_retry"])):
                have["next_retry"] = row["next_retry"]
    for name, seen in states.items():
        merged[name]["state"] = _worst(seen)
    hooks = sorted(n for n in merged if n.startswith("webhook:"))
    return [merged[n] for n in sorted(set(merged) - set(hooks))] + [merged[n] for n in hooks]


def _worst(states: Sequence[str]) -> str:
    if all(s == "held" for s in states):
        return "held"
    rank = {s: i for i, s in enumerate(STATE_ORDER)}
    return min((s for s in states if s != "held"), key=lambda s: rank.get(s, -1))


def merge_stats(replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The node's ``stats`` from each worker's (``stats_document``'s): counts summed,
    sites merged by name (workers and waiting summed), the latest down mark per site."""
    out: dict[str, Any] = {"messages": 0, "delivered": 0, "paused": False, "window": 0,
                           "sites": [], "down": {}, "down_until": {}, "suspended": [],
                           "commits": 0, "queue": {}}
    sites: dict[str, dict[str, Any]] = {}
    suspended: set[str] = set()
    for reply in replies:
        for key in ("messages", "delivered", "window", "commits"):
            out[key] += reply.get(key, 0)
        out["paused"] = out["paused"] or bool(reply.get("paused"))
        for site in reply.get("sites", ()):
            have = sites.get(site["site"])
            if have is None:
                sites[site["site"]] = dict(site)
            else:
                have["workers"] += site["workers"]
                have["waiting"] += site["waiting"]
        for key in ("down", "down_until"):
            for name, value in reply.get(key, {}).items():
                out[key][name] = max(value, out[key].get(name, value))
        suspended.update(reply.get("suspended", ()))
        out["queue"] = _merge_queue_figures(out["queue"], reply.get("queue", {}))
    out["sites"] = sorted(sites.values(), key=lambda s: (-s["workers"], s["site"]))
    out["suspended"] = sorted(suspended)
    return out


def _merge_queue_figures(have: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """The queue writers' figures (``QueueStats``) of two shards: counts summed, the
    slowest last commit, messages per state summed."""
    out = dict(have)
    for key, value in more.items():
        if key == "states":
            counts = dict(out.get("states", ()))
            for state, n in value:
                counts[state] = counts.get(state, 0) + n
            out["states"] = sorted(counts.items())
        elif key == "last_commit_seconds":
            out[key] = max(value, out.get(key, 0.0))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
        else:
            out.setdefault(key, value)
    return out


def merge_verbs(ids: Sequence[bytes], replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The node's answer to a verb on messages: ``changed`` where a worker changed it,
    ``unchanged`` where one has it and left it, ``missing`` only where none has it; in
    the order asked.  The non-delivery reports of every worker's ``remove``."""
    changed = {q for r in replies for q in r["changed"]}
    unchanged = {q for r in replies for q in r["unchanged"]} - changed
    wanted = [id_text(q) for q in ids]
    doc: dict[str, Any] = {
        "changed": [q for q in wanted if q in changed],
        "unchanged": [q for q in wanted if q in unchanged],
        "missing": [q for q in wanted if q not in changed and q not in unchanged]}
    reports = [q for r in replies for q in r.get("reports", ())]
    if reports:
        doc["reports"] = reports
    return doc


def merge_destination(replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """suspend / resume / retry of a destination: its name, the recipients of every
    shard, and (resume) whether any worker held it."""
    doc: dict[str, Any] = {"destination": replies[0]["destination"],
                           "recipients": sum(r["recipients"] for r in replies)}
    if "was_suspended" in replies[0]:
        doc["was_suspended"] = any(r["was_suspended"] for r in replies)
    return doc


def merge_reloads(replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The node's ``reload`` (``ReloadResult.to_json``'s) from each worker's: the first
    refusal if any worker refused (the others may have applied it: the warnings name
    who refused), else the keys applied and those waiting for a restart, each once."""
    for reply in replies:
        if not reply.get("ok"):
            return dict(reply)
    applied = list(dict.fromkeys(k for r in replies for k in r.get("applied", ())))
    restart = list({item["key"]: item for r in replies for item in r.get("restart", ())
                    }.values())
    return {"ok": True, "applied": applied, "restart": restart}


#: A sample line of the text format: its name, then its labels or its value.
_SAMPLE: Final = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{)?")


def merge_metrics(texts: Sequence[tuple[int, str]]) -> str:
    """The text exposition of every worker's metrics, each sample labelled
    ``worker="<i>"``.  The text format wants each family's lines together, after one
    ``# HELP`` and one ``# TYPE``: a family's samples follow the ``# HELP`` / ``# TYPE``
    that opened it (a histogram's ``_bucket``, ``_sum`` and ``_count`` too), so they are
    gathered by that family, in the order families first appear."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family = ""
        label = f'worker="{worker}"'
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = heads.setdefault(family, [])
                    samples.setdefault(family, [])
                    if not any(h.split(None, 2)[1] == parts[1] for h in head):
                        head.append(line)
                continue  # other comments are dropped
            match = _SAMPLE.match(line)
            if match is None:
                continue
            end = match.end(1)
            if match.group(2):
                closing = "" if line[end + 1:end + 2] == "}" else ","
                line = f"{line[:end + 1]}{label}{closing}{line[end + 1:]}"
            else:
                line = f"{line[:end]}{{{label}}}{line[end:]}"
            heads.setdefault(family, [])
            samples.setdefault(family, []).append(line)
    out: list[str] = []
    for family, head in heads.items():
        out.extend(head)
        out.extend(samples[family])
    return "\n".join(out) + "\n" if out else ""


# --- the asyncio server ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Answers:
    """Each answering worker's reply (``ok`` or not), and who did not answer, why."""

    replies: list[tuple[int, Reply]]
    silent: list[tuple[int, str]]

    @property
    def good(self) -> list[Reply]:
        return [r for _, r in self.replies if r.get("ok")]

    def notes(self) -> dict[str, Any]:
        """The reply's fields naming the workers that did not answer or refused."""
        warnings = [f"worker {i} not answering ({why})" for i, why in self.silent]
        warnings += [f"worker {i}: {r.get('error')}" for i, r in self.replies
                     if not r.get("ok")]
        if not warnings:
            return {}
        return {"not_answering": [i for i, _ in self.silent], "warnings": warnings}


class NodeControl(LineServer):
    """The node's control channel on ``path`` (``<spool>/control.sock``), answering for
    the workers ``workers()`` names (asked at each request: the supervisor's current
    set) by way of their sockets under ``spool``; ``reload`` is the supervisor's own
    reload, its reply ready (None: every worker reloads, :func:`merge_reloads`);
    ``timeout``: how long a worker may take to answer (seconds)."""

    def __init__(self, path: Path, spool: Path, workers: Callable[[], Iterable[int]],
                 reload: Callable[[], Awaitable[Reply]] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(path)
        self.spool = Path(spool)
        self.workers = workers
        self.reload = reload
        self.timeout = timeout

    async def start(self) -> None:
        """Listen; a spool path too long for a socket leaves the node without its
        channel, said once (as one server does), rather than stopping it."""
        try:
            await super().start()
        except control.ControlUnavailable as exc:
            log.warning("node control channel off (ferry queue will not see the node): %s",
                        exc)
        else:
            log.info("node control channel on %s", self.path)

    async def answer(self, line: bytes | None, by: str = "", trusted: bool = False) -> Reply:
        if line is None:
            return error_reply(f"request longer than {MAX_REQUEST} bytes")
        try:
            request = parse_request(line)
            return await self._answer(request, line, operator(request, by, trusted))
        except ControlError as exc:
            return error_reply(str(exc))
        except Exception as exc:
            log.exception("node control request %r failed", line[:200])
            return error_reply(f"internal error: {type(exc).__name__}: {exc}")

    async def ask(self, message: Mapping[str, Any], only: Iterable[int] | None = None,
                  seconds: float | None = None) -> _Answers:
        """``message`` to every worker (or those of ``only``) at once, each given
        ``seconds`` to answer (None: :attr:`timeout`)."""
        indexes = sorted(set(self.workers() if only is None else only))
        wait = self.timeout if seconds is None else seconds

        async def one(index: int) -> tuple[int, Reply | str]:
            path = worker_control_path(self.spool, index)
            try:
                return index, await control.ask(path, message, wait)
            except TimeoutError:
                return index, f"no answer in {wait:g} s"
            except (OSError, ValueError) as exc:  # ControlUnavailable, a bad reply
                return index, str(exc)

        answers = await asyncio.gather(*(one(i) for i in indexes))
        return _Answers([(i, r) for i, r in answers if isinstance(r, dict)],
                        [(i, r) for i, r in answers if isinstance(r, str)])

    async def _answer(self, request: Request, line: bytes, by: str) -> Reply:
        command = request.command
        if command == "reload" and self.reload is not None:
            return await self.reload()
        message = {**_message(line), "by": by}  # the workers' events name the operator
        answers = await self.ask(message, [0] if command in _FIRST_ONLY else None,
                                 min(self.timeout, METRICS_TIMEOUT)
                                 if command == "metrics" else None)
        good = answers.good
        if command == "reload" and answers.replies:
            return {**merge_reloads([r for _, r in answers.replies]), **answers.notes()}
        if not good:
            if answers.replies:  # every worker that answered refused: the first says why
                return {**answers.replies[0][1], **answers.notes()}
            raise ControlError("no worker answers: " + "; ".join(
                f"worker {i} ({why})" for i, why in answers.silent))
        return {"ok": True, **self._merge(request, answers, good), **answers.notes()}

    def _merge(self, request: Request, answers: _Answers,
               good: list[Reply]) -> dict[str, Any]:
        command = request.command
        if command == "queues":
            return {"taken": max(r["taken"] for r in good),
                    "queues": merge_rows(r["queues"] for r in good)}
        if command == "stats":
            return merge_stats(good)
        if command == "suspended":
            return {"destinations": sorted({d for r in good for d in r["destinations"]})}
        if request.ids:
            return merge_verbs(request.ids, good)
        if command in ("suspend", "resume", "retry"):
            return merge_destination(good)
        if command == "unsuppress":
            return {**_strip(good[0]), "removed": any(r.get("removed") for r in good)}
        if command == "metrics":
            return {"text": merge_metrics([(i, r["text"]) for i, r in answers.replies
                                           if r.get("ok")])}
        return _strip(good[0])  # suppress, suppressions, alerts: the first (worker 0's)


def _strip(reply: Reply) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "ok"}


def _message(line: bytes) -> Mapping[str, Any]:
    """The request as it came (it parsed already), to send on unchanged."""
    doc = orjson.loads(line)
    assert isinstance(doc, dict)
    return doc


def node_control(supervisor: Supervisor) -> NodeControl:
    """The supervisor's service (``Supervisor.make_services``): the node's control channel
    on ``<spool>/control.sock`` for every worker it runs (a stopped one is named), a
    reload forwarded to every worker."""
    node = NodeControl(control.socket_path(supervisor.spool), supervisor.spool,
                       lambda: [w.index for w in supervisor.workers if not w.done])
    account = supervisor.account
    if account is not None:  # the operator is [server] user, as with one process
        node.owner = (account.uid, account.gid)
    return node

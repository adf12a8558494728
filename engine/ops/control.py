"""The control channel of a running ``ferry serve``: how an operator suspends and resumes
a destination, lists the suspended ones, holds, releases, removes and retries messages,
and looks at the scheduler, while mail flows.

It is a Unix-domain socket in the spool, ``<spool>/control.sock`` (:func:`socket_path`),
mode 0600 (only the user Ferry runs as may use it; there is no other authentication).
Each request is one JSON object on one line, each reply one JSON object on one line, in
order, on a connection that stays open for more:

    {"command": "suspend", "destination": "example.com"}
        → {"ok": true, "destination": "example.com", "recipients": 3}
    {"command": "resume", "destination": "example.com"}
        → {"ok": true, "destination": "example.com", "recipients": 3, "was_suspended": true}
    {"command": "suspended"}  → {"ok": true, "destinations": ["example.com"]}
    {"command": "stats"}      → {"ok": true, "messages": 12, "delivered": 40, "sites": [...],
                                 "down": {...}, "suspended": [...], ...}  (stats_reply)
    {"command": "queues"}     → {"ok": true, "taken": 1796000000.0, "queues": [{"destination":
                                 "example.com", "state": "retry", "messages": 3, ...}]}
                                 (engine.ops.views.QueueRow.to_json, one per next hop,
                                 then one per webhook: "webhook:<name>")
    {"command": "hold", "ids": ["0190A1...", ...]}
        → {"ok": true, "changed": [...], "unchanged": [...], "missing": [...]}
    {"command": "release", "ids": [...]}                → the same (held or poisoned → due now)
    {"command": "remove", "ids": [...], "report": true} → the same, and "reports": [ids of
                                                          the non-delivery reports queued]
    {"command": "retry", "ids": [...]}                  → the same (deferred → due now)
    {"command": "retry", "destination": "example.com"}  → {"ok": true, "destination": ...,
                                                          "recipients": 3}
    {"command": "suppress", "address": "a@example.com", "reason": "...", "category": "...",
     "source": "operator"}  (the default; "auto": an entry another worker of the node
                             took from a bounce)
        → {"ok": true, "address": "a@example.com", "reason": ..., "category": ...,
           "added": 1796000000.0, "source": "operator"}   (engine.ops.suppressions)
    {"command": "unsuppress", "address": "a@example.com"}
        → {"ok": true, "address": "a@example.com", "removed": true}
    {"command": "suppressions", "category": "bad-mailbox", "after": "", "limit": 1000}
        → {"ok": true, "entries": [...], "next": "<address to go on after>", "total": 3}
    {"command": "reload"}     → {"ok": true, "applied": ["send[0].smarthosts", ...],
                                 "restart": [{"key": "receive[0].listen", "why": "..."}]}
                              or {"ok": false, "error": "configuration refused, ...",
                                  "errors": ["receive[0].key_file: ...", ...]}
                                 (engine.ops.reload.ReloadResult.to_json)
    {"command": "metrics"}    → {"ok": true, "text": "# HELP ferry_...\n..."}  (the server's
                                 GET /metrics text, engine.ops.metrics: what a node's
                                 worker gathers from every worker, engine.cluster.fanout)
    {"command": "alerts"}     → {"ok": true, "alerts": [{"rule": "backlog", ...}, ...]}
                                 (the [[alert]] rules firing now, engine.ops.alerts: what a
                                 node's other workers show of worker 0's in /readyz)
    anything wrong            → {"ok": false, "error": "unknown command \"x\"; one of ..."}

Ids are queue ids as ``ferry queue list`` prints them, at most :data:`MAX_IDS` per request
(a bulk tool sends several).  ``changed``: the verb acted; ``unchanged``: queued but
nothing to do (already held, no deferred recipient...); ``missing``: not in the queue.
Each change is reported as an event (HOLD, RELEASE, REMOVE, RETRY) naming the operator:
the user name of the peer's uid (SO_PEERCRED), the uid itself when it has no name.  A
request may carry ``"by": "<user>"`` only from root or the server's own user: a node's
supervisor forwards the operator it served (engine.cluster.fanout); from anyone else it
is refused.

A destination is named as the queue names it (``ferry queue list --destination``): a
domain, ``local:<domain>`` or an address literal; it is normalised the way recipients'
domains are (lower case, no trailing dot), and it need not have mail queued yet.

Layers: :class:`LineReader`, :func:`parse_request` and :func:`encode_reply` are sans-I/O
(bytes in, values out, testable without a socket); :class:`LineServer` is the socket
(shared with a node's channel, ``engine.cluster.fanout``) and :class:`ControlServer` the
asyncio glue, and the commands themselves are ``engine.ops.operations`` (shared with the
HTTP admin API, so both answer alike); :func:`request` is the blocking client ``ferry
queue`` uses, :func:`ask` the one for a caller on an event loop.

It must never decide anything about delivery itself (it hands the operator's decision to
the scheduler), never block the event loop, and never let a bad request hurt the server:
bad JSON, an unknown command or a missing argument gets an error reply and the connection
goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

from engine.ops import suppressions
from engine.ops.operations import (
    MAX_DESTINATION,
    MAX_IDS,
    OperationError,
    Operations,
    parse_destination,
    parse_ids,
    quote,
    stats_document,
    verb_document,
)
from engine.scheduler.scheduler import VerbResult
from engine.scheduler.snapshot import SchedulerSnapshot

log = logging.getLogger("ferry.control")

SOCKET_NAME: Final = "control.sock"
#: Longest request line; a longer one is read to its end and refused (room for MAX_IDS,
#: the most queue ids in one request: engine.ops.operations).
MAX_REQUEST: Final = 1 << 18
#: Operator connections open at once; more are refused (one reply, then closed).
MAX_CONNECTIONS: Final = 16
#: Longest reply :func:`ask` reads (a ``queues`` reply of a large queue, a ``metrics`` text).
MAX_REPLY: Final = 1 << 28
#: Longest operator name a request may carry (``by``: from a node's supervisor only).
MAX_BY: Final = 64
#: Longest socket path the kernel takes (sun_path is 108 bytes on Linux, with its NUL).
MAX_PATH: Final = 107

__all__ = ["MAX_DESTINATION", "MAX_IDS", "ControlError", "ControlServer", "parse_request"]

Reply = dict[str, Any]


def socket_path(spool: str | os.PathLike[str]) -> Path:
    return Path(spool) / SOCKET_NAME


#: A request that cannot be served; ``str()`` is the error reply's text.  The one error
#: of the operations (engine.ops.operations), whichever front door they came through.
ControlError = OperationError


class ControlUnavailable(OSError):
    """No control channel at this path: no server runs there, or the path is unusable."""


# --- sans-I/O ------------------------------------------------------------------------


class LineReader:
    """Splits a byte stream into request lines (LF or CRLF ends one; blank lines are
    skipped).  A line longer than ``limit`` is dropped as it streams in, never buffered
    whole, and reported once as None so the caller can answer it."""

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.limit:
                    if not self._skipping:
                        out.append(None)
                    self._skipping = True
                    self._buf.clear()
                return out
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[:end + 1]
            if self._skipping:
                self._skipping = False  # the end of the over-long line
            elif len(line) > self.limit:
                out.append(None)
            elif line.strip():
                out.append(line)


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    destination: str = ""
    #: queue ids (12 bytes each), for the verbs on messages
    ids: tuple[bytes, ...] = ()
    #: ``remove``: send a non-delivery report
    report: bool = False
    #: who asks (from the socket's peer credentials, never from the request)
    by: str = ""
    #: the suppression commands' fields (address, reason, category, after, limit), as sent
    entry: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Command:
    help: str
    takes_destination: bool = False
    takes_ids: bool = False
    takes_report: bool = False
    #: the fields of an entry of the suppression list it takes (all optional here; the
    #: operation says what is missing)
    entry_fields: tuple[str, ...] = ()


#: The command table (one place, visible to type checkers; no handler discovery).
COMMANDS: Final[Mapping[str, _Command]] = {
    "suspend": _Command("hold the mail for a destination (it stays queued)", True),
    "resume": _Command("deliver a suspended destination's mail again", True),
    "suspended": _Command("list the suspended destinations"),
    "stats": _Command("queue and scheduler figures"),
    "queues": _Command("the queues per next hop (Get-Queue)"),
    "hold": _Command("hold messages (never delivered or expired until released)",
                     takes_ids=True),
    "release": _Command("release held or poisoned messages (due now)", takes_ids=True),
    "remove": _Command("delete messages, with or without a non-delivery report",
                       takes_ids=True, takes_report=True),
    "retry": _Command("try a destination's deferred mail, or messages, now",
                      takes_destination=True, takes_ids=True),
    "reload": _Command("read the configuration file again and apply it (engine.ops.reload)"),
    "suppress": _Command("add an address to the suppression list",
                         entry_fields=("address", "reason", "category", "source")),
    "unsuppress": _Command("remove an address from the suppression list",
                           entry_fields=("address",)),
    "suppressions": _Command("list the suppression list",
                             entry_fields=("category", "after", "limit")),
    "metrics": _Command("the server's metrics in the Prometheus text format"),
    "alerts": _Command("the [[alert]] rules firing now"),
}


def parse_request(line: bytes) -> Request:
    """One request line → :class:`Request`; ControlError says what is wrong with it."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ControlError(f"request is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError('request must be a JSON object, e.g. {"command": "suspended"}')
    claim = doc.pop("by", "")
    if not isinstance(claim, str) or len(claim) > MAX_BY or not claim.isprintable():
        raise ControlError(f'"by" must be a name (at most {MAX_BY} printable characters)')
    request = _request(doc)
    return dataclasses.replace(request, by=claim) if claim else request


def _request(doc: dict[str, Any]) -> Request:
    command = doc.get("command")
    if not isinstance(command, str):
        raise ControlError(f'"command" (a string) is required; one of {_known()}')
    spec = COMMANDS.get(command)
    if spec is None:
        raise ControlError(f"unknown command {quote(command)}; one of {_known()}")
    allowed = {"command", *spec.entry_fields}
    for name, takes in (("destination", spec.takes_destination), ("ids", spec.takes_ids),
                        ("report", spec.takes_report)):
        if takes:
            allowed.add(name)
    extra = sorted(set(doc) - allowed)
    if extra:
        raise ControlError(f"{command}: unknown field {quote(extra[0])}")
    report = doc.get("report", False)
    if not isinstance(report, bool):
        raise ControlError(f'{command}: "report" must be true or false')
    if spec.takes_ids and "ids" in doc:
        if "destination" in doc:
            raise ControlError(f'{command}: "destination" or "ids", not both')
        return Request(command, ids=parse_ids(doc["ids"]), report=report)
    if spec.takes_destination and "destination" in doc:
        return Request(command, parse_destination(doc["destination"]))
    if spec.takes_ids or spec.takes_destination:
        wanted = " or ".join(f'"{name}"' for name, takes in (
            ("destination", spec.takes_destination), ("ids", spec.takes_ids)) if takes)
        raise ControlError(f"{command}: {wanted} is required")
    if spec.entry_fields:
        return Request(command, entry={k: doc[k] for k in spec.entry_fields if k in doc})
    return Request(command)


def encode_reply(reply: Reply) -> bytes:
    return orjson.dumps(reply) + b"\n"


def error_reply(message: str) -> Reply:
    return {"ok": False, "error": message}


def _known() -> str:
    return ", ".join(sorted(COMMANDS))


# --- the asyncio server --------------------------------------------------------------


class LineServer:
    """The socket of a control channel: listens on ``path`` (mode 0600), reads request
    lines and writes each :meth:`answer` back, in order.  :class:`ControlServer` answers
    for one server; ``engine.cluster.fanout.NodeControl`` for every worker of a node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: (uid, gid) the socket is given to: a node's supervisor runs as root and its
        #: operator as ``[server] user`` (None: whoever runs this process)
        self.owner: tuple[int, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._inode: int | None = None

    async def start(self) -> None:
        """Listen on ``path``.  ControlUnavailable when the path is too long for a
        socket; OSError when another server answers there (:func:`check_free`)."""
        path = self.path
        _check_length(temporary_name(path))
        check_free(path)
        self._server, self._inode = await listen_private(
            path, self.owner, lambda sock: asyncio.start_unix_server(self._accept, sock=sock))

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        remove_if_ours(self.path, self._inode)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                writer.write(encode_reply(error_reply(
                    f"too many control connections (at most {MAX_CONNECTIONS})")))
                await writer.drain()
                return
            lines = LineReader()
            sock = writer.get_extra_info("socket")
            by = peer_user(sock)
            # Root, this server's own user or its owner's (a node's supervisor, its
            # workers, the user Ferry runs as: each could change the queue anyway) may
            # name the operator.
            uid = peer_uid(sock)
            trusted = uid in (0, os.geteuid()) or (
                self.owner is not None and uid == self.owner[0])
            while data := await reader.read(65536):
                for line in lines.feed(data):
                    writer.write(encode_reply(await self.answer(line, by, trusted)))
                    await writer.drain()
        except ConnectionError:
            pass  # the operator's tool went away; nothing to tell it
        finally:
            writer.close()

    async def answer(self, line: bytes | None, by: str = "", trusted: bool = False) -> Reply:
        """The reply to one request line (None: a line over the limit) from the peer
        user ``by`` (``trusted``: :func:`operator`); never raises."""
        raise NotImplementedError


class ControlServer(LineServer):
    """Serves the control socket for the running server's ``operations`` (see the module
    docstring)."""

    def __init__(self, path: Path, operations: Operations,
                 reload: Callable[[], Awaitable[Reply]] | None = None) -> None:
        """``reload`` is the App's reload, its reply ready (None: not offered)."""
        super().__init__(path)
        self.operations = operations
        self.reload = reload
        #: The server's metrics in the text format (engine.ops.metrics), for the
        #: ``metrics`` command a node's /metrics gathers (None: not collected here).
        self.metrics: Callable[[], bytes] | None = None
        #: the alerts firing now, as /readyz shows them (None: no rule is evaluated here)
        self.alerts: Callable[[], list[dict[str, Any]]] | None = None
        self._handlers: Mapping[str, Callable[[Request], Awaitable[Reply]]] = {
            "suspend": self._suspend,
            "resume": self._resume,
            "suspended": self._suspended,
            "stats": self._stats,
            "queues": self._queues,
            "hold": self._hold,
            "release": self._release,
            "remove": self._remove,
            "retry": self._retry,
            "reload": self._reload,
            "suppress": self._suppress,
            "unsuppress": self._unsuppress,
            "suppressions": self._suppressions,
            "metrics": self._metrics,
            "alerts": self._alerts,
        }

    async def answer(self, line: bytes | None, by: str = "", trusted: bool = False) -> Reply:
        """The reply to one request line (None: a line over the limit) from the peer
        user ``by`` (``trusted``: :func:`operator`); never raises."""
        if line is None:
            return error_reply(f"request longer than {MAX_REQUEST} bytes")
        try:
            request = parse_request(line)
            request = dataclasses.replace(request, by=operator(request, by, trusted))
            return await self._handlers[request.command](request)
        except OperationError as exc:
            return error_reply(str(exc))
        except Exception as exc:
            log.exception("control request %r failed", line[:200])
            return error_reply(f"internal error: {type(exc).__name__}: {exc}")

    # --- the commands (engine.ops.operations) ----------------------------------------

    async def _suspend(self, request: Request) -> Reply:
        return _ok(await self.operations.suspend(request.destination, request.by))

    async def _resume(self, request: Request) -> Reply:
        return _ok(await self.operations.resume(request.destination, request.by))

    async def _suspended(self, request: Request) -> Reply:
        return {"ok": True, "destinations": self.operations.suspended()}

    async def _stats(self, request: Request) -> Reply:
        return _ok(self.operations.stats())

    async def _queues(self, request: Request) -> Reply:
        return _ok(await self.operations.queues())

    async def _hold(self, request: Request) -> Reply:
        return _ok(await self.operations.verb("hold", request.ids, request.by))

    async def _release(self, request: Request) -> Reply:
        return _ok(await self.operations.verb("release", request.ids, request.by))

    async def _remove(self, request: Request) -> Reply:
        return _ok(await self.operations.verb("remove", request.ids, request.by,
                                              request.report))

    async def _retry(self, request: Request) -> Reply:
        if request.ids:
            return _ok(await self.operations.verb("retry", request.ids, request.by))
        return _ok(await self.operations.retry_destination(request.destination, request.by))

    async def _reload(self, request: Request) -> Reply:
        if self.reload is None:
            raise ControlError("reload: not offered by this server")
        log.info("%s asked for a reload of the configuration", request.by)
        return await self.reload()


    async def _suppress(self, request: Request) -> Reply:
        e = request.entry
        return _ok(await suppressions.add(self.operations, e.get("address"), e.get("reason"),
                                          e.get("category"), request.by,
                                          e.get("source", "operator")))

    async def _unsuppress(self, request: Request) -> Reply:
        return _ok(await suppressions.remove(self.operations, request.entry.get("address"),
                                             request.by))

    async def _suppressions(self, request: Request) -> Reply:
        e = request.entry
        return _ok(suppressions.listing(self.operations, e.get("category", ""),
                                        e.get("after", ""), e.get("limit")))

    async def _metrics(self, request: Request) -> Reply:
        if self.metrics is None:
            raise ControlError("metrics: not collected by this server")
        return {"ok": True, "text": self.metrics().decode("utf-8")}


    async def _alerts(self, request: Request) -> Reply:
        return _ok({"alerts": self.alerts() if self.alerts is not None else []})


def _ok(doc: Mapping[str, Any]) -> Reply:
    return {"ok": True, **doc}


def verb_reply(done: VerbResult) -> Reply:
    """The reply of a verb on messages: the ids it changed, left alone, did not find."""
    return _ok(verb_document(done))


_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid (Linux)


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED); None
    when unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        _pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size))
    except OSError:
        return None
    return int(uid)


def operator(request: Request, peer: str, trusted: bool) -> str:
    """Who the events of ``request`` name: the peer's user; the request's own ``by``
    only from a ``trusted`` peer (a node's supervisor forwards the operator it served:
    engine.cluster.fanout), refused from any other."""
    if not request.by:
        return peer or "unknown"
    if not trusted:
        raise ControlError('"by": only a node\'s supervisor names the operator')
    return request.by


def peer_user(sock: socket.socket | None) -> str:
    """The user name of the process at the other end of a Unix socket (SO_PEERCRED): who
    the events name as having acted; its uid when it has no name, "" when unknown."""
    uid = peer_uid(sock)
    if uid is None:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def stats_reply(snap: SchedulerSnapshot) -> Reply:
    """The ``stats`` reply: the scheduler's snapshot as JSON
    (``engine.ops.operations.stats_document``)."""
    return _ok(stats_document(snap))


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_PATH:
        raise ControlUnavailable(
            f"control socket path {path} is longer than the {MAX_PATH} bytes a Unix "
            "socket path may have; use a shorter spool path")


def check_free(path: Path) -> None:
    """OSError when a server accepts connections on ``path``: another ``ferry serve`` uses
    this spool, and two would deliver the same mail twice.  A socket file left by a
    server that did not stop cleanly accepts nothing and is fine (it gets replaced)."""
    if len(os.fsencode(path)) > MAX_PATH:
        return  # no control channel can be there
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return
    raise OSError(f"another ferry serve answers on {path}: it is using this spool")


# --- the blocking client -------------------------------------------------------------


def request(path: Path, message: Mapping[str, Any], timeout: float = 600.0) -> Reply:
    """Send one request to the server on ``path`` and return its reply.

    ControlUnavailable when nothing serves there; TimeoutError when the reply takes longer
    than ``timeout`` seconds (a suspend of a very large destination parks every queued
    recipient before it answers)."""
    _check_length(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(
                f"no running ferry serve answers on {path} ({exc.strerror or exc})") from None
        sock.settimeout(timeout)
        sock.sendall(orjson.dumps(dict(message)) + b"\n")
        received = bytearray()
        while not received.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlUnavailable(f"the server on {path} closed the connection")
            received += chunk
    reply = orjson.loads(received)
    if not isinstance(reply, dict):
        raise ControlUnavailable(f"the server on {path} sent a reply that is not an object")
    return reply


_Server = TypeVar("_Server")


def temporary_name(path: Path) -> Path:
    """Where :func:`listen_private` binds before the socket is renamed to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}")


async def listen_private(path: Path, owner: tuple[int, int] | None,
                         serve: Callable[[socket.socket], Awaitable[_Server]],
                         ) -> tuple[_Server, int]:
    """Serve the Unix socket ``path`` (``serve`` makes the server on the bound socket),
    reachable by its owner alone: bound under :func:`temporary_name`, made 0600 and given
    to ``owner`` (uid, gid), then renamed into place, so it is never reachable with wider
    permissions whatever the umask, and a socket left by a server that did not stop
    cleanly is replaced.  Returns the server and the socket file's inode (to remove it at
    the stop only while it is still this server's)."""
    temporary = temporary_name(path)
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(temporary))
        temporary.chmod(0o600)
        if owner is not None:
            os.chown(temporary, *owner)
        server = await serve(sock)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    temporary.rename(path)
    return server, os.stat(path).st_ino


def remove_if_ours(path: Path, inode: int | None) -> None:
    """Remove the socket file :func:`listen_private` made (its ``inode``), unless a
    successor's replaced it meanwhile."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


async def ask(path: Path, message: Mapping[str, Any], seconds: float = 600.0) -> Reply:
    """:func:`request` for a caller on an event loop (a node's supervisor asking its
    workers, worker 0's admin API asking the supervisor): the whole exchange bounded by
    ``seconds`` (TimeoutError).  ControlUnavailable when nothing serves there."""
    _check_length(path)

    async def exchange() -> Reply:
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(path),
                                                                limit=MAX_REPLY)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(
                f"nothing answers on {path} ({exc.strerror or exc})") from None
        try:
            writer.write(orjson.dumps(dict(message)) + b"\n")
            line = await reader.readline()
        finally:
            writer.close()
        if not line.endswith(b"\n"):
            raise ControlUnavailable(f"the server on {path} closed the connection")
        reply = orjson.loads(line)
        if not isinstance(reply, dict):
            raise ControlUnavailable(f"the server on {path} sent a reply that is not an "
                                     "object")
        return reply

    return await asyncio.wait_for(exchange(), seconds)

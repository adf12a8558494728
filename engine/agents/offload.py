"""The agents' process: the built-in agents' CPU-heavy calls made in a child process, so
that they use another core and not the event loop's.

What goes there: the verify agent's end of data (DKIM's hashes and public-key checks, DMARC,
the Authentication-Results field: engine.agents.verify) and DKIM signing
(engine.agents.dkim).  On the loop those cost ~100-300 µs of CPU a message, and a loop
that spends them serves a third fewer messages (benchmarks/README.md, issue 15, "the
agents' process"); in the child, the loop pays for a frame each way.  What stays on the
loop: every other stage, SPF at MAIL (its DNS overlaps the transaction, and its result
goes along with the message), and the choice of the signing keys (mail that needs none
costs no trip).

The child (``python -m engine.agents.offload_process``, :func:`engine.agents.
offload_process.main`) is started by :meth:`AgentProcess.start` with the server's
configuration (pickled: the one the server runs, not the file as it may be now) and builds
its own agents from it, with its own DNS cache; the agents here hand it ``(kind, args)``
calls (:meth:`AgentProcess.call`) and get its answers as futures.  The calls of one turn
of the loop go as one frame (engine.frames), and the child answers what finished in one
turn of its own loop as one frame.

When the child dies, every waiting call fails (the chain then applies the agent's
``fail`` setting: accept without the agent's word, or 451) and a new child is started; the
calls made before it is ready fail the same way.  It must never hold a message longer
than its call (nothing is stored there) and never be fed frames from anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import pickle
import sys
import types
from typing import TYPE_CHECKING, Any, Final, cast

from engine.frames import frame_of, pack_frame, take_frames

if TYPE_CHECKING:
    from engine.config import Config

__all__ = ["AgentProcess", "AgentProcessGone"]

log = logging.getLogger("ferry.agents")

#: Seconds to wait before starting a child again after one died.
RESTART_DELAY: Final = 1.0
#: Seconds a child has to answer its first frame, and to end after its input is closed.
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 10.0


def _mapping(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


def _rebuilt(cls: type[Any], values: dict[str, Any]) -> Any:
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj


def _importable(cls: type[Any]) -> type[Any]:
    """The first class of ``cls``'s MRO that its module names (what the child can load)."""
    mro: tuple[type[Any], ...] = cls.__mro__
    for base in mro:
        named: object = getattr(sys.modules.get(base.__module__), base.__qualname__, None)
        if named is base:
            return base
    return cls


class _ConfigPickler(pickle.Pickler):
    """Pickles the configuration for the child.  Its read-only tables are mapping
    proxies, which pickle cannot take: they cross as dicts.  A table of a subclass made
    at run time (the configuration seam test's, which records reads) crosses as its
    declared class, its fields read without being recorded: handing the configuration
    over reads no key."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.MappingProxyType):
            return _mapping, (dict(obj),)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = _importable(type(obj))
            if cls is not type(obj):
                return _rebuilt, (cls, {f.name: object.__getattribute__(obj, f.name)
                                        for f in dataclasses.fields(obj)})
        return NotImplemented


def _config_frame(config: Config) -> tuple[bytes, bytes]:
    """The frame of ``config`` (engine.frames' layout)."""
    out = io.BytesIO()
    _ConfigPickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(config)
    return frame_of(out.getvalue())


class AgentProcessGone(RuntimeError):
    """The agents' process is not there (it died, or is starting again)."""


class _Pipes(asyncio.SubprocessProtocol):
    def __init__(self, owner: AgentProcess) -> None:
        self.owner = owner
        self.buffer = bytearray()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        self.buffer += data
        for frame in take_frames(self.buffer):
            self.owner._answered(frame)

    def process_exited(self) -> None:
        self.owner._exited()


class AgentProcess:
    """The server side of one agents' process (one per server process)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._ready: asyncio.Future[None] | None = None
        #: Set when the child has ended (stop waits on it).
        self._ended: asyncio.Future[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._outbox: list[tuple[int, str, tuple[Any, ...]]] = []
        self._next = 0
        self._stopping = False
        self._restart: asyncio.TimerHandle | None = None
        #: Children started, and calls that failed because none was there (for tests and
        #: the logs).
        self.starts = 0
        self.failed = 0

    @property
    def pid(self) -> int | None:
        return None if self._transport is None else self._transport.get_pid()

    @property
    def ready(self) -> bool:
        """A child is there and has built its agents: calls go to it."""
        ready = self._ready
        return (self._stdin is not None and ready is not None and ready.done()
                and not ready.cancelled() and ready.exception() is None)

    async def start(self) -> None:
        """Start the child and wait until it has built its agents; RuntimeError (with
        what it said) when it cannot."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._ended = loop.create_future()
        transport, _ = await loop.subprocess_exec(
            lambda: _Pipes(self), sys.executable, "-m", "engine.agents.offload_process",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None)
        self._transport = transport
        # (uvloop's pipe transports are not subclasses of asyncio's, whose methods they have)
        stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
        self._stdin = stdin
        self.starts += 1
        stdin.writelines(_config_frame(self._config))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._ready
        except BaseException:
            self._kill()
            raise

    def call(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        """The child's answer to ``kind`` with ``args`` (engine.agents.offload_process
        says what each kind does), as a future; it fails with AgentProcessGone when no
        child is there to make the call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.ready or self._stdin is None or self._stdin.is_closing():
            self.failed += 1
            future.set_exception(AgentProcessGone("the agents' process is starting again"))
            return future
        self._next += 1
        self._waiting[self._next] = future
        if not self._outbox:
            loop.call_soon(self._ship)
        self._outbox.append((self._next, kind, args))
        return future

    def _ship(self) -> None:
        """The turn's calls, as one frame."""
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        if self._stdin is None or self._stdin.is_closing():
            self._fail_waiting("the agents' process ended")
            return
        self._stdin.writelines(pack_frame(batch))

    def _answered(self, frame: Any) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            if frame == "ready":
                ready.set_result(None)
            else:
                ready.set_exception(RuntimeError(f"the agents' process did not start: {frame}"))
            return
        for ident, ok, value in frame:
            future = self._waiting.pop(ident, None)
            if future is None or future.done():
                continue  # (its caller gave up: the chain's time budget)
            if ok:
                future.set_result(value)
            else:
                future.set_exception(RuntimeError(f"in the agents' process: {value}"))

    def _exited(self) -> None:
        transport, self._transport, self._stdin = self._transport, None, None
        code = None if transport is None else transport.get_returncode()
        if transport is not None:
            transport.close()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(RuntimeError(
                f"the agents' process ended before it was ready (exit status {code})"))
        self._fail_waiting(f"the agents' process ended (exit status {code})")
        if self._stopping:
            return
        log.error("the agents' process ended (exit status %s): its calls fail by each "
                  "agent's fail setting until a new one is ready", code)
        loop = asyncio.get_running_loop()
        self._restart = loop.call_later(RESTART_DELAY, self._start_again)

    def _start_again(self) -> None:
        self._restart = None
        if self._stopping:
            return
        task = asyncio.ensure_future(self._restarted())
        task.add_done_callback(_retrieve)

    async def _restarted(self) -> None:
        try:
            await self.start()
        except Exception as exc:
            log.error("the agents' process could not start again: %s", exc)
            if not self._stopping and self._transport is None and self._restart is None:
                self._restart = asyncio.get_running_loop().call_later(
                    RESTART_DELAY, self._start_again)
        else:
            log.info("the agents' process runs again (pid %s)", self.pid)

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        self._outbox = []
        for future in waiting.values():
            if not future.done():
                self.failed += 1
                future.set_exception(AgentProcessGone(why))

    def _kill(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(ProcessLookupError):
                self._transport.kill()

    async def stop(self) -> None:
        """Close the child's input (it answers what it has and ends) and wait for it."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        transport, ended = self._transport, self._ended
        if transport is None or ended is None:
            return
        if self._stdin is not None:
            self._stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.shield(ended)
        except TimeoutError:
            self._kill()
            await ended


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


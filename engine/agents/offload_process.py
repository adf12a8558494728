"""The agents' process: the program ``python -m engine.agents.offload_process``.

It is the far end of ``engine.agents.offload.AgentProcess`` (see there for why it
exists).  Protocol, over its stdin and stdout, in frames (engine.frames): the server sends
its configuration first; the child builds its own agents from it (with its own DNS cache,
and never an agents' process of its own) and answers ``"ready"``, or the error's text and
ends.  Then the server sends batches ``[(ident, kind, args)]`` and the child answers
``[(ident, ok, value)]``: the call's result, or (``ok`` False) the text of its exception.

The kinds of call:

- ``"verify"``, args ``(methods, session, tx, data)``: the data stage of the verify agent
  of that ``verify`` list (engine.agents.verify) on ``Message(data)``; ``tx`` carries
  the SPF result in its notes (the server's agent checked SPF from MAIL on).  A Verdict.
- ``"sign"``, args ``(session, tx, data)``: the signing agent's sign stage
  (engine.agents.dkim).  A Verdict.

Calls run concurrently (one waiting for DNS holds up no other); the answers that are ready
in one turn of the loop go back as one frame.  The child ignores SIGINT and SIGTERM: the
server stops it by closing its input, after which it answers what it has and ends.  It
must never write anything but frames to stdout, and never store anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
import sys
import traceback
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import uvloop

from engine.frames import pack_frame, take_frames

if TYPE_CHECKING:
    from engine.agents import Agents
    from engine.agents.api import Agent
    from engine.config import Config

log = logging.getLogger("ferry.agents")


class _Child:
    """The child's agents and its two pipes."""

    def __init__(self, out: asyncio.WriteTransport) -> None:
        self.out = out
        self.agents: Agents | None = None
        self._started: dict[tuple[str, tuple[str, ...]], Agent] = {}
        self._answers: list[tuple[int, bool, Any]] = []
        self._running: set[asyncio.Future[Any]] = set()
        self.ended = asyncio.get_running_loop().create_future()

    async def build(self, config: Config) -> None:
        from engine.agents import Agents

        # Never an agents' process of its own.
        config = dataclasses.replace(
            config, agents=dataclasses.replace(config.agents, process=False))
        self.agents = Agents(config)

    async def agent(self, name: str, verify: tuple[str, ...] = ()) -> Agent:
        """The agent ``name`` (the verify agent of ``verify``), started on first use."""
        key = (name, verify)
        found = self._started.get(key)
        if found is not None:
            return found
        assert self.agents is not None
        if name == "dkim_sign":
            found = next(a for a in self.agents.signers() if a.name == name)
        else:
            got = self.agents.get(name, verify)
            assert got is not None
            found = got
        await found.start()
        self._started[key] = found
        return found

    def take(self, batch: list[tuple[int, str, tuple[Any, ...]]]) -> None:
        for ident, kind, args in batch:
            try:
                answer = self._call(kind, args)
            except Exception:
                self._answer(ident, False, traceback.format_exc(limit=8))
                continue
            task = asyncio.ensure_future(answer)
            self._running.add(task)
            task.add_done_callback(functools.partial(self._done, ident))

    def _call(self, kind: str, args: tuple[Any, ...]) -> Awaitable[Any]:
        from engine.agents.api import Message

        if kind == "verify":
            methods, session, tx, data = args
            return self._stage("verify", tuple(methods), "data", session, tx, Message(data))
        if kind == "sign":
            session, tx, data = args
            return self._stage("dkim_sign", (), "sign", session, tx, Message(data))
        raise ValueError(f"unknown call {kind!r}")

    async def _stage(self, name: str, verify: tuple[str, ...], stage: str,
                     *args: Any) -> Any:
        agent = await self.agent(name, verify)
        answer = getattr(agent, stage)(*args)
        return answer if not isinstance(answer, Awaitable) else await answer

    def _done(self, ident: int, task: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        if task.cancelled():
            self._answer(ident, False, "cancelled")
        elif (exc := task.exception()) is not None:
            self._answer(ident, False, "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8)))
        else:
            self._answer(ident, True, task.result())

    def _answer(self, ident: int, ok: bool, value: Any) -> None:
        if not self._answers:
            asyncio.get_running_loop().call_soon(self._flush)
        self._answers.append((ident, ok, value))

    def _flush(self) -> None:
        answers, self._answers = self._answers, []
        if answers and not self.out.is_closing():
            self.out.writelines(pack_frame(answers))

    async def drain(self) -> None:
        """Let the calls under way finish and answer them."""
        while self._running:
            await asyncio.wait(set(self._running))
        self._flush()


class _Input(asyncio.Protocol):
    def __init__(self, child: _Child) -> None:
        self.child = child
        self.buffer = bytearray()
        self.config: asyncio.Future[Config] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for frame in take_frames(self.buffer):
            if not self.config.done():
                self.config.set_result(frame)
            else:
                self.child.take(frame)

    def eof_received(self) -> bool:
        if not self.config.done():
            self.config.set_exception(EOFError("no configuration"))
        if not self.child.ended.done():
            self.child.ended.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()


async def _serve() -> int:
    loop = asyncio.get_running_loop()
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout.buffer)
    child = _Child(out)
    _, pipe = await loop.connect_read_pipe(lambda: _Input(child), sys.stdin.buffer)
    assert isinstance(pipe, _Input)
    try:
        await child.build(await pipe.config)
    except Exception as exc:
        out.writelines(pack_frame(f"{type(exc).__name__}: {exc}"))
        out.close()
        return 1
    out.writelines(pack_frame("ready"))
    await child.ended
    await child.drain()
    assert child.agents is not None
    await child.agents.stop()
    out.close()
    return 0


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="ferry agents process: %(levelname)s %(name)s: %(message)s")
    return uvloop.run(_serve())


if __name__ == "__main__":
    raise SystemExit(main())

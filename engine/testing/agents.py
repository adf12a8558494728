"""A policy agent whose answers a test writes in the configuration, for tests of the hook
API through a real server: ``[agents.custom."NAME"] factory =
"engine.testing.agents:Scripted"`` with ``options = { name = "NAME", data = "reject", ... }``.

Each stage named in the options is answered by its script; the other stages are not
defined, so the chain never calls them.  A script is one of:

- ``accept``; ``reject`` / ``reject:CODE:ENHANCED:TEXT``; ``tempfail`` (same form);
  ``discard``; ``hold``; ``header:NAME:VALUE`` (add a field);
- ``raise`` (a RuntimeError, as a bug would) and ``hang`` (never answers: the time budget
  ends it).

``wait = true`` makes every answer asynchronous (the chain's awaitable path).  Each call is
recorded in :attr:`Scripted.calls` as (stage, what it was given).  Used by tests only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from engine.agents.api import (
    ACCEPT,
    STAGES,
    Agent,
    Stage,
    Verdict,
    add_header,
    discard,
    hold,
    reject,
    tempfail,
)

__all__ = ["Scripted", "later"]

_T = TypeVar("_T")


def _verdict(script: str, stage: str) -> Verdict:
    kind, _, rest = script.partition(":")
    if kind == "accept":
        return ACCEPT
    if kind in ("reject", "tempfail"):
        make = reject if kind == "reject" else tempfail
        if not rest:
            return make(f"scripted {kind} at {stage}")
        code, enhanced, text = rest.split(":", 2)
        return make(text, int(code), enhanced)
    if kind == "discard":
        return discard(f"scripted discard at {stage}")
    if kind == "hold":
        return hold(f"scripted hold at {stage}")
    if kind == "header":
        name, _, value = rest.partition(":")
        return add_header(name, value)
    raise ValueError(f"unknown script {script!r}")


class Scripted(Agent):
    name = "scripted"

    def __init__(self, *, name: str = "scripted", wait: bool = False, timeout: float = 10.0,
                 fail_open: bool = True, **scripts: str) -> None:
        super().__init__(timeout=timeout, fail_open=fail_open)
        unknown = set(scripts) - {s.value for s in STAGES}
        if unknown:
            raise ValueError(f"no such stage: {sorted(unknown)}")
        self.name = name  # type: ignore[misc]  # one class, many configured names
        self.scripts = scripts
        self.wait = wait
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.disconnects = 0
        for stage in scripts:
            setattr(self, stage, self._answerer(stage))

    def stages(self) -> frozenset[Stage]:
        return frozenset(Stage(s) for s in self.scripts)

    def disconnect(self, session: object) -> None:
        self.disconnects += 1

    def _answerer(self, stage: str) -> Any:
        script = self.scripts[stage]

        def answer(*args: Any) -> Verdict | Awaitable[Verdict]:
            self.calls.append((stage, args))
            if script == "raise":
                raise RuntimeError(f"scripted failure at {stage}")
            if script == "hang":
                return asyncio.Event().wait()  # type: ignore[return-value]
            verdict = _verdict(script, stage)
            return self._later(verdict) if self.wait else verdict

        return answer

    async def _later(self, verdict: Verdict) -> Verdict:
        return await later(verdict)


async def later(value: _T) -> _T:
    """``value``, handed over on a later turn of the loop: an agent's answer that really
    goes through the chain's awaitable path."""
    future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.set_result, value)
    return await future

"""The chain: the agents of one receive connector called in order at each stage, their
verdicts combined into one, their time budgets and failures enforced.

:meth:`Chain.run` calls, for one stage, every agent that defines the stage's method, in the
configured order.  A method that returns a :class:`Verdict` is taken at once; the first one
that returns an awaitable turns the rest of the run into one coroutine (so relay control
and the other cheap agents cost a function call, not a task).  The verdicts combine:

- the first REJECT, TEMPFAIL or DISCARD ends the run and is the result (its header changes
  and those collected before it no longer matter);
- HOLD is remembered and the run goes on (a later agent may still reject);
- header changes of every accepting verdict are collected, in order;
- the result is HOLD (with every header change) when an agent held, else ACCEPT with the
  changes (the :data:`ACCEPT` singleton when there are none).

An agent whose method raises, or whose awaitable does not finish within its ``timeout``, is
logged with its traceback or its budget and counted in :attr:`Chain.failures`; its
``fail_open`` turns the failure into ACCEPT (with the agent's ``fail_headers``: a forged
copy of what it would have written goes) or into :data:`FAIL_CLOSED` (451 4.7.1).  The
reason of a refusing verdict is prefixed with the agent's name, for the logs.

It must never write to a socket or the queue, and never swallow a failure silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine.agents.api import (
    ACCEPT,
    Action,
    Agent,
    Effects,
    HeaderChange,
    Message,
    Session,
    Stage,
    StageCall,
    Transaction,
    Verdict,
    tempfail,
)
from engine.message.edit import apply_changes

__all__ = ["FAIL_CLOSED", "Chain", "Figures", "Screened"]

log = logging.getLogger("ferry.agents")

#: What a failed agent that fails closed answers (RFC 3463 §3.8: X.7.1 is the class of
#: policy refusals; the 4xx makes the client try again when the agent is back).
FAIL_CLOSED: Final = tempfail("Policy check temporarily unavailable, try again later",
                              451, "4.7.1")

_TERMINAL: Final = frozenset({Action.REJECT, Action.TEMPFAIL, Action.DISCARD})
_ACCEPT: Final = Action.ACCEPT
#: Each stage's name, for the figures (an Enum's ``value`` is a property: ~0.1 µs).
_STAGE_NAMES: Final = {stage: stage.value for stage in Stage}


def _skipped(change: HeaderChange, why: str) -> None:
    log.warning("a policy agent's header change was not applied: %s", why)


class Figures:
    """What the agents did, for metrics (engine.ops.metrics): shared by every chain of a
    server, counted off the common path (an accepting verdict counts nothing)."""

    __slots__ = ("failures", "verdicts")

    def __init__(self) -> None:
        #: Failed calls (an exception or a blown budget) by agent name.
        self.failures: Counter[str] = Counter()
        #: Verdicts other than a plain accept, by (agent, stage, action); header changes
        #: count as "header".
        self.verdicts: Counter[tuple[str, str, str]] = Counter()


class _Run:
    """The verdicts of one stage, combined so far."""

    __slots__ = ("changes", "figures", "held", "only", "stage")

    def __init__(self, stage: Stage, figures: Figures) -> None:
        self.changes: list[HeaderChange] = []
        self.held = ""
        self.stage = _STAGE_NAMES[stage]
        self.figures = figures
        #: The one verdict that brought header changes, when it is a plain accept (no
        #: reply, no reason): the result would be its equal (the verify agent's verdict
        #: at the data stage, the common case), so it is the result.
        self.only: Verdict | None = None

    def take(self, agent: Agent, verdict: Verdict) -> Verdict | None:
        """Add ``verdict``; the run's result when it ends the run, else None."""
        action = verdict.action
        counted = "header" if action is _ACCEPT else action.value
        self.figures.verdicts[agent.name, self.stage, counted] += 1
        if action in _TERMINAL:
            return Verdict(action, verdict.reply, (),
                           f"{agent.name}: {verdict.reason or action.value}")
        if action is Action.HOLD and not self.held:
            self.held = f"{agent.name}: {verdict.reason or 'held'}"
        headers = verdict.headers
        if headers:
            self.only = verdict if (not self.changes and action is _ACCEPT
                                    and verdict.reply is None and not verdict.reason) else None
            self.changes.extend(headers)
        return None

    def result(self) -> Verdict:
        if self.held:
            return Verdict(Action.HOLD, None, tuple(self.changes), self.held)
        if self.only is not None:
            return self.only
        if self.changes:
            return Verdict(Action.ACCEPT, None, tuple(self.changes))
        return ACCEPT


@dataclass(frozen=True, slots=True)
class Screened:
    """A message after the end-of-data and sign stages (:meth:`Chain.screen`)."""

    #: The bytes to store: header changes applied, signatures added.
    data: bytes
    #: The refusing verdict (REJECT or TEMPFAIL, its reason naming the agent), or None.
    refused: Verdict | None = None
    #: "agent: reason" of a hold or a discard, "" when none.
    held: str = ""
    discarded: str = ""


class Chain:
    """The agents of one receive connector, in order.  ``agents`` may be empty."""

    def __init__(self, agents: Sequence[Agent], figures: Figures | None = None) -> None:
        self.agents: tuple[Agent, ...] = tuple(agents)
        self.figures = figures if figures is not None else Figures()
        #: Failed calls by agent name (``figures.failures``).
        self.failures = self.figures.failures
        # Bound methods per stage, looked up once: a run costs a call per agent.
        self._calls: dict[Stage, tuple[tuple[Agent, StageCall], ...]] = {
            stage: tuple((a, getattr(a, stage.value)) for a in self.agents
                         if stage in a.stages())
            for stage in Stage}
        self._disconnect = tuple(a for a in self.agents
                                 if callable(getattr(a, "disconnect", None)))

    def wants(self, stage: Stage) -> bool:
        """Some agent defines ``stage``: the caller may skip building its arguments."""
        return bool(self._calls[stage])

    def run(self, stage: Stage, *args: Any) -> Verdict | Awaitable[Verdict]:
        """The combined verdict of every agent at ``stage`` (see the module docstring)."""
        calls = self._calls[stage]
        state: _Run | None = None
        for i, (agent, call) in enumerate(calls):
            try:
                answer = call(*args)
            except Exception:
                answer = self._failed(agent, stage, None)
            if answer is ACCEPT:
                continue  # the common case allocates nothing
            if state is None:
                state = _Run(stage, self.figures)
            if not isinstance(answer, Verdict):
                return self._finish(state, calls, i, answer, stage, args)
            done = state.take(agent, answer)
            if done is not None:
                return done
        return ACCEPT if state is None else state.result()

    async def _finish(self, state: _Run, calls: tuple[tuple[Agent, StageCall], ...], i: int,
                      pending: Awaitable[Verdict], stage: Stage,
                      args: tuple[Any, ...]) -> Verdict:
        while True:
            verdict = await self._bounded(calls[i][0], stage, pending)
            done = state.take(calls[i][0], verdict)
            if done is not None:
                return done
            i += 1
            while i < len(calls):
                agent, call = calls[i]
                try:
                    answer = call(*args)
                except Exception:
                    answer = self._failed(agent, stage, None)
                if not isinstance(answer, Verdict):
                    pending = answer
                    break
                done = state.take(agent, answer)
                if done is not None:
                    return done
                i += 1
            else:
                return state.result()

    async def _bounded(self, agent: Agent, stage: Stage, pending: Awaitable[Verdict]) -> Verdict:
        try:
            async with asyncio.timeout(agent.timeout):
                verdict = await pending
        except TimeoutError:
            return self._failed(agent, stage, f"no verdict within {agent.timeout:g} s")
        except Exception:
            return self._failed(agent, stage, None)
        if not isinstance(verdict, Verdict):
            return self._failed(agent, stage, f"returned {type(verdict).__name__}, not a Verdict")
        return verdict

    def _failed(self, agent: Agent, stage: Stage, why: str | None) -> Verdict:
        """Log a failed call (with the traceback of the exception being handled when
        ``why`` is None) and answer by the agent's ``fail_open``."""
        self.failures[agent.name] += 1
        outcome = "accepted (fail open)" if agent.fail_open else "answered 451 (fail closed)"
        if why is None:
            log.exception("agent %s failed at %s; %s", agent.name, stage.value, outcome)
        else:
            log.warning("agent %s failed at %s: %s; %s", agent.name, stage.value, why, outcome)
        if not agent.fail_open:
            return FAIL_CLOSED
        return Verdict(headers=agent.fail_headers) if agent.fail_headers else ACCEPT

    def screens(self, session: Session, tx: Effects) -> bool:
        """:meth:`screen` has something to do for this message."""
        return bool(self._calls[Stage.DATA] or tx.changes or tx.held or tx.discarded
                    or (session.may_relay and self._calls[Stage.SIGN]))

    async def screen(self, session: Session, tx: Transaction, data: bytes) -> Screened:
        """The end of data: the data stage's agents, the header changes of every stage
        so far, then, for mail the client may relay, the sign stage on the bytes as they
        will be stored (so a signature covers every change; RFC 6376 §5: signed once,
        before the message is stored, and a retry sends the stored bytes).  One path for
        the SMTP session and the injection API (:meth:`screen_now` is the same)."""
        screened = self.screen_now(session, tx, data)
        return screened if isinstance(screened, Screened) else await screened

    def screen_now(self, session: Session, tx: Transaction, data: bytes
                   ) -> Screened | Awaitable[Screened]:
        """:meth:`screen`, returned at once when no agent has to wait (a sender's mail
        with its DNS answers cached: no coroutine made), else an awaitable of it."""
        message = Message(data)
        answer = self.run(Stage.DATA, session, tx, message)
        if isinstance(answer, Verdict):
            return self._screened(session, tx, message, answer)
        return self._screened_later(session, tx, message, answer)

    async def _screened_later(self, session: Session, tx: Transaction, message: Message,
                              answer: Awaitable[Verdict]) -> Screened:
        screened = self._screened(session, tx, message, await answer)
        return screened if isinstance(screened, Screened) else await screened

    def _screened(self, session: Session, tx: Transaction, message: Message,
                  verdict: Verdict) -> Screened | Awaitable[Screened]:
        """The rest of :meth:`screen` after the data stage's ``verdict``."""
        data = message.data
        if verdict.action is Action.REJECT or verdict.action is Action.TEMPFAIL:
            return Screened(data, verdict)
        tx.note(verdict)
        if tx.discarded:
            return Screened(data, discarded=tx.discarded)
        if tx.changes:
            data = apply_changes(data, tx.changes, _skipped, message.header_end)
        if session.may_relay and self._calls[Stage.SIGN]:
            answer = self.run(Stage.SIGN, session, tx, Message(data))
            if isinstance(answer, Verdict):
                return self._signed(tx, data, answer)
            return self._signed_later(tx, data, answer)
        return Screened(data, held=tx.held)

    async def _signed_later(self, tx: Transaction, data: bytes,
                            answer: Awaitable[Verdict]) -> Screened:
        return self._signed(tx, data, await answer)

    @staticmethod
    def _signed(tx: Transaction, data: bytes, signed: Verdict) -> Screened:
        """The stored bytes after the sign stage's verdict."""
        if signed.action is Action.REJECT or signed.action is Action.TEMPFAIL:
            return Screened(data, signed)
        if signed.headers:
            data = apply_changes(data, signed.headers, _skipped)
        return Screened(data, held=tx.held)

    def disconnect(self, *args: Any) -> None:
        """Tell every agent that counts connections that one is gone (never raises)."""
        for agent in self._disconnect:
            try:
                agent.disconnect(*args)  # type: ignore[attr-defined]
            except Exception:
                self.failures[agent.name] += 1
                log.exception("agent %s failed at disconnect", agent.name)

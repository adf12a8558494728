"""The "verify" agent: SPF, DKIM and DMARC for mail arriving from outside, one
Authentication-Results field, and the action a DMARC failure becomes.

Which methods run comes from the receive connector's ``verify`` list (one agent per
distinct list); what the results turn into comes from ``[agents.verify]``.  The work is
split over two stages so that the DNS overlaps the rest of the transaction:

* ``mail``: the SPF check of the MAIL FROM identity (RFC 7208 §2.4: the reverse-path's
  domain, or the HELO name for the null sender) starts as a task kept in the transaction's
  notes, and the stage answers at once; the lookups run while the client sends its RCPTs
  and its message.  A result for the same client address, MAIL FROM and HELO that is still
  within the TTLs of the answers it came from is taken from the agent's
  :class:`~engine.agents.spf.SpfCache` instead (``[agents.verify] spf_cache``).
* ``data``: DKIM verification (engine.message.dkim) and DMARC policy discovery for the
  From domain run concurrently, the SPF task is awaited, DMARC is evaluated from both
  (engine.agents.dmarc), every Authentication-Results field that claims our authserv-id is
  removed (RFC 8601 §5: it can only be a forgery) and ours is added (engine.agents.authres).

Only mail from clients that may not relay (``session.may_relay`` False: mail from the
outside world) is verified; a client that may relay sends outbound mail, which is signed,
not verified against its own domain's policies.  The DNS work of a call is bounded below
the agent's time budget, so a slow zone gives temperror results and the forged fields are
still removed, rather than the whole call failing.

It must never write to the socket or the queue, and never decide SPF, DKIM or DMARC
results itself (their modules do); it only maps results to a verdict by configuration.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from engine.agents import authres, dmarc
from engine.agents.api import (
    ACCEPT,
    Action,
    Agent,
    HeaderChange,
    Message,
    MethodResult,
    Session,
    Transaction,
    Verdict,
)
from engine.agents.dns import Lookup
from engine.agents.spf import SpfCache, SpfResult
from engine.message import dkim

if TYPE_CHECKING:
    from engine.agents import AgentContext

__all__ = ["DMARC_POLICIES", "METHODS", "VerifyAgent", "build_verify"]

#: The methods in the order their results are written (DMARC last: it reads the others).
METHODS: Final = ("spf", "dkim", "dmarc")
DmarcPolicy = Literal["enforce", "quarantine", "tag"]
SpfFail = Literal["tag", "reject"]
DMARC_POLICIES: Final = ("enforce", "quarantine", "tag")
T = TypeVar("T")

#: The share of the agent's time budget the DNS work of one call may use: the rest is
#: left to build the verdict, so a slow zone yields temperror results, not a failed call
#: that would let a forged Authentication-Results field through.
DNS_SHARE: Final = 0.8
#: SPF results kept by default (engine.agents.spf.SpfCache; [agents.verify] spf_cache).
SPF_CACHE: Final = 10_000


class VerifyAgent(Agent):
    """SPF + DKIM + DMARC for the ``methods`` given (a subset of :data:`METHODS`)."""

    name = "verify"

    def __init__(
        self,
        lookup: Lookup,
        methods: Iterable[str],
        *,
        authserv_id: str,
        dmarc_policy: DmarcPolicy = "enforce",
        spf_fail: SpfFail = "tag",
        timeout: float = 10.0,
        fail_open: bool = True,
        sample: Callable[[], float] = random.random,
        spf_cache: int = SPF_CACHE,
    ) -> None:
        super().__init__(timeout=timeout, fail_open=fail_open)
        wanted = set(methods)
        unknown = wanted - set(METHODS)
        if unknown:
            raise ValueError(f"unknown verify methods: {sorted(unknown)}")
        self.methods = tuple(m for m in METHODS if m in wanted)
        self.lookup = lookup
        self.spf = SpfCache(lookup, spf_cache)
        self.authserv_id = authserv_id
        self.dmarc_policy: DmarcPolicy = dmarc_policy
        self.spf_fail: SpfFail = spf_fail
        self._sample = sample
        self._claims = functools.partial(authres.claims, authserv_id=authserv_id)
        #: A failed call (fail open) still removes fields that claim our authserv-id: a
        #: forgery must never pass for our verdict (RFC 8601 §5).
        self.fail_headers = (HeaderChange("remove", authres.FIELD, match=self._claims),)

    async def start(self) -> None:
        if "dmarc" in self.methods:
            # Loading the Public Suffix List takes tens of milliseconds: not on the loop.
            await asyncio.to_thread(dmarc.load_public_suffix_list)

    # --- stages ----------------------------------------------------------------------------

    def mail(self, session: Session, tx: Transaction) -> Verdict:
        if not session.may_relay and "spf" in self.methods:
            self._spf_task(session, tx)
        return ACCEPT

    def data(self, session: Session, tx: Transaction, message: Message) -> Awaitable[Verdict]:
        return self._data(session, tx, message)

    async def _data(self, session: Session, tx: Transaction, message: Message) -> Verdict:
        if session.may_relay:
            return ACCEPT
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout * DNS_SHARE
        spf_task = self._spf_task(session, tx) if "spf" in self.methods else None
        dkim_task = (asyncio.ensure_future(dkim.verify(message, self.lookup))
                     if {"dkim", "dmarc"} & set(self.methods) else None)
        authors: tuple[str, ...] = ()
        author_error = ""
        discoveries: list[asyncio.Task[dmarc.Policy]] = []
        if "dmarc" in self.methods:
            try:
                authors = dmarc.author_domains(message.get_all("From"))
            except dmarc.AuthorError as exc:
                author_error = str(exc)
            discoveries = [asyncio.ensure_future(dmarc.discover(self.lookup, d))
                           for d in authors]
        waiting: list[asyncio.Future[Any]] = [
            t for t in (spf_task, dkim_task, *discoveries) if t is not None]
        try:
            if waiting:
                await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()))
        finally:
            # Past the DNS share, or cancelled by the chain (the whole budget blown):
            # nothing of this message's work outlives the call.
            for task in waiting:
                task.cancel()

        results: list[MethodResult] = []
        spf = _outcome(spf_task)
        if spf_task is not None:
            results.append(_spf_method(spf, tx))
        signatures = _outcome(dkim_task)
        if "dkim" in self.methods:
            results.extend(_dkim_methods(signatures, dkim_task))
        verdict_dmarc: dmarc.DmarcResult | None = None
        if "dmarc" in self.methods:
            auth = _authenticated(spf_task, spf, tx, session, signatures, authors)
            verdict_dmarc = self._dmarc(authors, author_error, discoveries, auth)
            results.append(verdict_dmarc.method_result())

        headers = (HeaderChange("remove", authres.FIELD, match=self._claims),
                   HeaderChange("add", authres.FIELD,
                                authres.format_field(self.authserv_id, results)))
        return self._verdict(spf, verdict_dmarc, headers)

    # --- the parts -------------------------------------------------------------------------

    def _spf_task(self, session: Session, tx: Transaction) -> asyncio.Future[SpfResult]:
        """The transaction's SPF check, started at MAIL (or now, when the mail stage did
        not run for it)."""
        task: asyncio.Future[SpfResult] | None = tx.notes.get(self.name)
        if task is None:
            kept = self.spf.get(session.client_ip, tx.sender, session.helo, self.authserv_id)
            if kept is not None:
                # A finished future, not a task: nothing to schedule for a kept result.
                task = asyncio.get_running_loop().create_future()
                task.set_result(kept)
                tx.notes[self.name] = task
                return task
            task = asyncio.ensure_future(self.spf.check_mail_from(
                session.client_ip, tx.sender, session.helo, receiver=self.authserv_id))
            # A transaction given up before its data (RSET, QUIT) leaves the task to end
            # on its own (the DNS and RFC 7208's limits bound it); nobody reads it then.
            task.add_done_callback(_retrieve)
            tx.notes[self.name] = task
        return task

    def _dmarc(self, authors: tuple[str, ...], author_error: str,
               discoveries: list[asyncio.Task[dmarc.Policy]],
               auth: dmarc.Authenticated) -> dmarc.DmarcResult:
        if not authors:
            # RFC 7489 §6.6.1: no single usable From field; RFC 5322 forbids it.
            return dmarc.DmarcResult("permerror", reason=author_error)
        results = []
        for domain, task in zip(authors, discoveries, strict=True):
            policy = _outcome(task)
            if policy is None:
                policy = dmarc.Policy(domain, "temperror", reason=_failure(task, "policy"))
            results.append(dmarc.evaluate(policy, auth, self._sample))
        return dmarc.worst(results)

    def _verdict(self, spf: SpfResult | None, result: dmarc.DmarcResult | None,
                 headers: tuple[HeaderChange, ...]) -> Verdict:
        if result is not None and result.result == "fail":
            why = f"DMARC fail for {result.from_domain} (policy {result.disposition})"
            if result.disposition == "reject" and self.dmarc_policy == "enforce":
                # RFC 7489 §6.6.4 / §10.3: reject during the SMTP transaction, 5.7.1.
                return Verdict(Action.REJECT, (550, "5.7.1", f"Message rejected by the DMARC "
                                                             f"policy of {result.from_domain}"),
                               headers, why)
            if result.disposition != "none" and self.dmarc_policy != "tag":
                return Verdict(Action.HOLD, None, headers, why)
            return Verdict(headers=headers, reason=why)
        ruled = result is not None and result.result not in ("none", "permerror")
        if spf is not None and spf.result == "fail" and self.spf_fail == "reject" and not ruled:
            reply = spf.reply()
            assert reply is not None  # fail always has a reply (RFC 7372 §3.2)
            return Verdict(Action.REJECT, reply, headers, f"SPF fail for {spf.domain}")
        return Verdict(headers=headers)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _outcome(task: asyncio.Future[T] | None) -> T | None:
    """The task's result, or None when it failed or did not finish in time."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _failure(task: asyncio.Future[Any] | None, what: str) -> str:
    if task is None or not task.done() or task.cancelled():
        return f"{what}: no answer in time"
    return f"{what}: {task.exception()}"


def _authenticated(spf_task: asyncio.Future[SpfResult] | None, spf: SpfResult | None,
                   tx: Transaction, session: Session,
                   signatures: list[dkim.DkimResult] | None,
                   authors: tuple[str, ...]) -> dmarc.Authenticated:
    """What DMARC aligns.  A check that ran but gave no answer in time counts as a
    temperror for the identifier it was about: SPF's MAIL FROM (or HELO) domain, and for
    DKIM every author domain (the signatures' d= are unknown), so DMARC cannot fail the
    message on a DNS that was only slow."""
    if spf_task is None:
        spf_result, spf_domain = "none", ""
    elif spf is None:
        spf_result = "temperror"
        spf_domain = tx.sender.rpartition("@")[2] if tx.sender else session.helo
    else:
        spf_result, spf_domain = spf.result, spf.domain
    if signatures is None:
        dkim_results = tuple(("temperror", domain) for domain in authors)
    else:
        dkim_results = tuple((s.result, s.domain) for s in signatures)
    return dmarc.Authenticated(spf_result, spf_domain, dkim_results)


def _spf_method(spf: SpfResult | None, tx: Transaction) -> MethodResult:
    scope: Literal["mailfrom", "helo"] = "mailfrom" if tx.sender else "helo"
    if spf is None:
        return MethodResult("spf", "temperror", "no answer in time")
    return spf.method_result(scope)


def _dkim_methods(signatures: list[dkim.DkimResult] | None,
                  task: asyncio.Future[list[dkim.DkimResult]] | None) -> list[MethodResult]:
    if signatures is None:
        return [MethodResult("dkim", "temperror", _failure(task, "verification"))]
    if not signatures:
        return [MethodResult("dkim", "none", "no signature")]  # RFC 8601 §2.7.1
    return [s.method_result() for s in signatures]


def build_verify(ctx: AgentContext) -> VerifyAgent:
    """The verify agent for one receive connector's ``verify`` list (``ctx.verify``), with
    the settings of [agents.verify]."""
    settings = ctx.config.agents.verify
    return VerifyAgent(
        ctx.lookup, ctx.verify or METHODS,
        authserv_id=settings.authserv_id or ctx.hostname,
        dmarc_policy=settings.dmarc_policy, spf_fail=settings.spf_fail,
        timeout=settings.timeout, fail_open=settings.fail == "open",
        spf_cache=settings.spf_cache)

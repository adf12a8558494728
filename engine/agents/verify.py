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
  When the SPF result is known and every DNS answer the stage needs is cached (a sender's
  mail within its TTLs, the common case on a busy MX), the verdict is computed at once,
  with no task and no wait (``dkim.verify_now``, ``dmarc.discover_now``): the tasks and
  the ``asyncio.wait`` cost about a third of the stage (benchmarks/README.md, issue 15).
  Only DKIM's public-key operations may then be waited for, made in the agent's thread
  in batches (engine.agents.batch) when they release the GIL (on the loop each would cost
  a GIL round trip); with the compiled engine.message.pkey, which keeps the GIL, they are
  made at once on the loop and the verdict is returned without any wait.

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
    Reply,
    Session,
    Transaction,
    Verdict,
)
from engine.agents.batch import ThreadBatches
from engine.agents.dns import Lookup
from engine.agents.spf import SpfCache, SpfResult
from engine.message import dkim, pkey

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
        self._remove = self.fail_headers[0]
        self._spf = "spf" in self.methods
        self._dkim = bool({"dkim", "dmarc"} & wanted)  # DMARC aligns DKIM's d=
        self._dmarc = "dmarc" in self.methods
        #: DKIM's public-key operations, made in a thread in batches (engine.agents.batch)
        #: when they release the GIL (cryptography), on the loop when they keep it (the
        #: compiled engine.message.pkey: ~20-30 µs each and no hand-off).
        self._checks = None if pkey.HOLDS_GIL else ThreadBatches(dkim.signatures_valid)
        self._dkim_lines = "dkim" in self.methods
        #: The last conclusion's inputs and its SPF and DMARC parts (:meth:`_conclude`).
        self._last: _Conclusion | None = None

    async def start(self) -> None:
        if "dmarc" in self.methods:
            # Loading the Public Suffix List takes tens of milliseconds: not on the loop.
            await asyncio.to_thread(dmarc.load_public_suffix_list)

    # --- stages ----------------------------------------------------------------------------

    def mail(self, session: Session, tx: Transaction) -> Verdict:
        if self._spf and not session.may_relay:
            self._spf_note(session, tx)
        return ACCEPT

    def data(self, session: Session, tx: Transaction, message: Message
             ) -> Verdict | Awaitable[Verdict]:
        if session.may_relay:
            return ACCEPT
        # Each part at once when its answers are cached (a bulk sender's mail within its
        # TTLs: the verdict is returned without a task or a wait), else an awaitable.
        spf = self._spf_now(session, tx) if self._spf else None
        signatures: list[dkim.DkimResult] | Awaitable[list[dkim.DkimResult]] | None = None
        dkim_failure = ""
        if self._dkim:
            try:
                signatures = dkim.verify_now(message, self.lookup, checker=self._checks)
            except Exception as exc:  # a bug, as a failed task was: dkim=temperror
                dkim_failure = f"verification: {exc}"
        authors: tuple[str, ...] = ()
        author_error = ""
        policies: list[dmarc.Policy | Awaitable[dmarc.Policy]] = []
        waiting = isinstance(spf, asyncio.Future) or (
            signatures is not None and not isinstance(signatures, list))
        if self._dmarc:
            try:
                authors = dmarc.author_domains(message.get_all("From"))
            except dmarc.AuthorError as exc:
                author_error = str(exc)
            for domain in authors:
                policy = _discover_now(self.lookup, domain)
                policies.append(policy)
                waiting = waiting or not isinstance(policy, dmarc.Policy)
        if waiting:
            return self._waited(session, tx, spf, signatures, dkim_failure, authors,
                                author_error, policies)
        # Nothing to wait for: every part is settled (the types say "maybe awaitable").
        return self._conclude(session, tx, spf, signatures,  # type: ignore[arg-type]
                              dkim_failure, authors, author_error,
                              policies)  # type: ignore[arg-type]

    async def _waited(self, session: Session, tx: Transaction,
                      spf: SpfResult | asyncio.Future[SpfResult] | None,
                      signatures: list[dkim.DkimResult] | Awaitable[list[dkim.DkimResult]] | None,
                      dkim_failure: str, authors: tuple[str, ...], author_error: str,
                      policies: list[dmarc.Policy | Awaitable[dmarc.Policy]]) -> Verdict:
        """The parts that were not ready, awaited together within the DNS share of the
        budget; what did not finish in time counts as a temperror."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout * DNS_SHARE
        if (signatures is not None and not isinstance(signatures, list)
                and not isinstance(spf, asyncio.Future)
                and all(isinstance(p, dmarc.Policy) for p in policies)):
            # Only DKIM's public-key operations to wait for (a sender's mail with every
            # answer cached): awaited here, without a task.
            try:
                async with asyncio.timeout_at(deadline):
                    signatures = await signatures
            except TimeoutError:
                signatures, dkim_failure = None, "verification: no answer in time"
            except Exception as exc:
                signatures, dkim_failure = None, f"verification: {exc}"
            return self._conclude(session, tx, spf, signatures, dkim_failure, authors,
                                  author_error, policies)  # type: ignore[arg-type]
        spf_task = spf if isinstance(spf, asyncio.Future) else None
        dkim_task = (None if signatures is None or isinstance(signatures, list)
                     else asyncio.ensure_future(signatures))
        discoveries = [None if isinstance(p, dmarc.Policy) else asyncio.ensure_future(p)
                       for p in policies]
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
        if spf_task is not None:
            spf = _outcome(spf_task)
        if dkim_task is not None:
            signatures = _outcome(dkim_task)
            dkim_failure = _failure(dkim_task, "verification")
        settled: list[dmarc.Policy] = []
        for domain, given, discovery in zip(authors, policies, discoveries, strict=True):
            if discovery is None:
                assert isinstance(given, dmarc.Policy)
                settled.append(given)
            else:
                settled.append(_outcome(discovery) or dmarc.Policy(
                    domain, "temperror", reason=_failure(discovery, "policy")))
        assert signatures is None or isinstance(signatures, list)
        assert spf is None or isinstance(spf, SpfResult)
        return self._conclude(session, tx, spf, signatures, dkim_failure,
                              authors, author_error, settled)

    def _conclude(self, session: Session, tx: Transaction, spf: SpfResult | None,
                  signatures: list[dkim.DkimResult] | None, dkim_failure: str,
                  authors: tuple[str, ...], author_error: str,
                  policies: list[dmarc.Policy]) -> Verdict:
        """The verdict and the field from the parts' results (None: no answer in time)."""
        # A sender's mail within its TTLs gives the same SPF result, policies and DKIM
        # (result, d=) pairs message after message: the SPF and DMARC parts of the
        # previous conclusion (their results, their lines of the field as text, the
        # verdict's action) are taken again when all of those are equal; only DKIM's
        # lines, with their header.b, are made.  Not after a timeout (SPF's temperror
        # then names the transaction's identity) nor for a DMARC fail (its disposition
        # draws the pct sample, RFC 7489 §6.6.4).
        memo = signatures is not None and (spf is not None or not self._spf)
        last = self._last
        if not (memo and last is not None and signatures is not None
                and last.holds(spf, bool(tx.sender), authors, author_error, policies,
                               signatures)):
            last = self._parts(session, tx, spf, signatures, authors, author_error, policies)
            if memo and (last.dmarc is None or last.dmarc.result != "fail"):
                self._last = last
        value = last.before
        if self._dkim_lines:
            value += authres.lines(_dkim_methods(signatures, dkim_failure), not last.after)
        headers = (self._remove, HeaderChange("add", authres.FIELD, value + last.after))
        return Verdict(last.action, last.reply, headers, last.reason)

    def _parts(self, session: Session, tx: Transaction, spf: SpfResult | None,
               signatures: list[dkim.DkimResult] | None, authors: tuple[str, ...],
               author_error: str, policies: list[dmarc.Policy]) -> _Conclusion:
        """Everything of a conclusion but DKIM's lines of the field."""
        spf_method = _spf_method(spf, tx) if self._spf else None
        verdict_dmarc = dmarc_method = None
        if self._dmarc:
            auth = _authenticated(self._spf, spf, tx, session, signatures, authors)
            verdict_dmarc = self._dmarc_result(authors, author_error, policies, auth)
            dmarc_method = verdict_dmarc.method_result()
        before = [spf_method] if spf_method is not None else []
        after = [dmarc_method] if dmarc_method is not None else []
        if not (before or after or self._dkim_lines):
            text = authres.format_field(self.authserv_id, [])  # §2.2: "none"
        else:
            text = authres.head(self.authserv_id) + authres.lines(
                before, not (after or self._dkim_lines))
        return _Conclusion(
            (spf, bool(tx.sender), authors, author_error, policies,
             tuple((s.result, s.domain) for s in signatures) if signatures is not None
             else None),
            verdict_dmarc, text, authres.lines(after, True) if after else "",
            *self._verdict(spf, verdict_dmarc))

    # --- the parts -------------------------------------------------------------------------

    def _spf_now(self, session: Session, tx: Transaction
                 ) -> SpfResult | asyncio.Future[SpfResult]:
        """The transaction's SPF result when it is known, else the task computing it."""
        note = self._spf_note(session, tx)
        if isinstance(note, SpfResult):
            return note
        if note.done() and not note.cancelled() and note.exception() is None:
            return note.result()
        return note

    def _spf_note(self, session: Session, tx: Transaction
                  ) -> SpfResult | asyncio.Future[SpfResult]:
        """The transaction's SPF check, started at MAIL (or now, when the mail stage did
        not run for it): a result kept by the cache, or the task that computes it."""
        note: SpfResult | asyncio.Future[SpfResult] | None = tx.notes.get(self.name)
        if note is None:
            kept = self.spf.get(session.client_ip, tx.sender, session.helo, self.authserv_id)
            if kept is not None:
                tx.notes[self.name] = kept  # nothing to schedule for a kept result
                return kept
            note = asyncio.ensure_future(self.spf.check_mail_from(
                session.client_ip, tx.sender, session.helo, receiver=self.authserv_id))
            # A transaction given up before its data (RSET, QUIT) leaves the task to end
            # on its own (the DNS and RFC 7208's limits bound it); nobody reads it then.
            note.add_done_callback(_retrieve)
            tx.notes[self.name] = note
        return note

    def _dmarc_result(self, authors: tuple[str, ...], author_error: str,
                      policies: list[dmarc.Policy], auth: dmarc.Authenticated
                      ) -> dmarc.DmarcResult:
        if not authors:
            # RFC 7489 §6.6.1: no single usable From field; RFC 5322 forbids it.
            return dmarc.DmarcResult("permerror", reason=author_error)
        return dmarc.worst(dmarc.evaluate(p, auth, self._sample) for p in policies)

    def _verdict(self, spf: SpfResult | None, result: dmarc.DmarcResult | None
                 ) -> tuple[Action, Reply | None, str]:
        """The verdict's action, reply and reason (its headers are the field)."""
        if result is not None and result.result == "fail":
            why = f"DMARC fail for {result.from_domain} (policy {result.disposition})"
            if result.disposition == "reject" and self.dmarc_policy == "enforce":
                # RFC 7489 §6.6.4 / §10.3: reject during the SMTP transaction, 5.7.1.
                return Action.REJECT, (550, "5.7.1", f"Message rejected by the DMARC "
                                                     f"policy of {result.from_domain}"), why
            if result.disposition != "none" and self.dmarc_policy != "tag":
                return Action.HOLD, None, why
            return Action.ACCEPT, None, why
        ruled = result is not None and result.result not in ("none", "permerror")
        if spf is not None and spf.result == "fail" and self.spf_fail == "reject" and not ruled:
            reply = spf.reply()
            assert reply is not None  # fail always has a reply (RFC 7372 §3.2)
            return Action.REJECT, reply, f"SPF fail for {spf.domain}"
        return Action.ACCEPT, None, ""


class _Conclusion:
    """The parts of a conclusion that DKIM's header.b does not change, kept for the next
    message of the same sender (:meth:`VerifyAgent._conclude`)."""

    __slots__ = ("action", "after", "before", "dmarc", "inputs", "reason", "reply")

    def __init__(self, inputs: tuple[Any, ...], dmarc_result: dmarc.DmarcResult | None,
                 before: str, after: str, action: Action, reply: Reply | None,
                 reason: str) -> None:
        #: (SPF result, a sender or the null one, authors, their error, policies, DKIM's
        #: (result, d=) pairs): what the parts below were made from.
        self.inputs = inputs
        self.dmarc = dmarc_result
        #: The field's text before DKIM's lines (the authserv-id, SPF) and after (DMARC).
        self.before = before
        self.after = after
        self.action = action
        self.reply = reply
        self.reason = reason

    def holds(self, spf: SpfResult | None, sender: bool, authors: tuple[str, ...],
              author_error: str, policies: list[dmarc.Policy],
              signatures: list[dkim.DkimResult]) -> bool:
        """These inputs are the ones the parts were made from (compared one by one, the
        cheap ones first, without making the tuple)."""
        kept_spf, kept_sender, kept_authors, kept_error, kept_policies, pairs = self.inputs
        if not (sender is kept_sender and (spf is kept_spf or spf == kept_spf)
                and authors == kept_authors and author_error == kept_error
                and policies == kept_policies and len(signatures) == len(pairs)):
            return False
        for signature, (result, domain) in zip(signatures, pairs, strict=True):
            if signature.result != result or signature.domain != domain:
                return False
        return True


def _discover_now(lookup: Lookup, domain: str) -> dmarc.Policy | Awaitable[dmarc.Policy]:
    """dmarc.discover_now, a bug in it a temperror policy (as a failed task was)."""
    try:
        return dmarc.discover_now(lookup, domain)
    except Exception as exc:
        return dmarc.Policy(domain, "temperror", reason=f"policy: {exc}")


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


def _authenticated(spf_ran: bool, spf: SpfResult | None,
                   tx: Transaction, session: Session,
                   signatures: list[dkim.DkimResult] | None,
                   authors: tuple[str, ...]) -> dmarc.Authenticated:
    """What DMARC aligns.  A check that ran but gave no answer in time counts as a
    temperror for the identifier it was about: SPF's MAIL FROM (or HELO) domain, and for
    DKIM every author domain (the signatures' d= are unknown), so DMARC cannot fail the
    message on a DNS that was only slow."""
    if not spf_ran:
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


def _dkim_methods(signatures: list[dkim.DkimResult] | None, failure: str
                  ) -> list[MethodResult]:
    if signatures is None:
        return [MethodResult("dkim", "temperror", failure)]
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

"""The suppression agent: refuses at RCPT a recipient on the suppression list.

It is on whenever ``[suppression] enabled`` is (read at each RCPT, so a reload turns it
on and off), without being listed in ``[[receive]] agents``: :class:`engine.agents.Agents`
puts it right after relay control in every receive connector's chain.  It acts only for
clients that may relay (trusted injectors: a relay network, or authenticated): mail from
the world to our own domains is not the list's business.  The reply is permanent, with
the enhanced code of a bad mailbox (RFC 3463 §3.2, X.1.1), so the injecting application
drops the address as it would after a bounce.

Injection over HTTP has no RCPT stage: ``engine.http.inject`` fails suppressed recipients
at queue time with :func:`suppressed_text`.  This agent never writes the list; the check
is one dict lookup (``engine.queue.suppression``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from engine.agents.api import ACCEPT, Agent, Session, Transaction, Verdict, reject

if TYPE_CHECKING:
    from engine.protocol.command import Command
    from engine.queue.suppression import Entry, SuppressionList

#: The reply code and enhanced status code of a suppressed recipient.
CODE: Final = 550
ENHANCED: Final = "5.1.1"


def suppressed_text(entry: Entry) -> str:
    """The text of the refusal: ``<addr>: recipient is suppressed (reason)``."""
    reason = entry.category or entry.reason or entry.source
    if entry.reason and entry.category:
        reason = f"{entry.category}: {entry.reason}"
    return f"<{entry.address}>: recipient is suppressed ({reason[:200]})"


class SuppressAgent(Agent):
    name = "suppress"

    def __init__(self, suppression: SuppressionList) -> None:
        super().__init__(timeout=1.0, fail_open=True)
        self.suppression = suppression

    def rcpt(self, session: Session, tx: Transaction, rcpt: Command) -> Verdict:
        if not session.may_relay:
            return ACCEPT
        entry = self.suppression.check(rcpt.mailbox)
        if entry is None:
            return ACCEPT
        return reject(suppressed_text(entry), CODE, ENHANCED,
                      reason=f"suppressed recipient {entry.address}")

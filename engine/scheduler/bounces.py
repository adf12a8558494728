"""Bounce classes: which kind of failure a reply reports (bad mailbox, quota, spam block...).

Every DEFER, FAIL and EXPIRE of the tracking log carries a ``category``
(``engine.scheduler.facts``), the suppression list adds recipients whose failure is of a
hard category (``engine.queue`` suppressed table), and an operator filters by it.  The
categories are :data:`engine.config.BOUNCE_CATEGORIES`; docs/bounces.md explains each.

The table is data (:data:`ENHANCED`, :data:`TEXTS`, :data:`CODES`), tried in this order,
each step a dict lookup or one pass of one compiled expression:

1. the operator's rules (``[[bounce_rule]]``), in order: code, enhanced code prefix and a
   regular expression, every condition given must hold;
2. the enhanced status code (RFC 3463 §2) when the table marks it *decisive* (``5.1.1``
   means a bad mailbox whoever says it);
3. the texts of the large providers' replies (Gmail, Microsoft, Yahoo, Apple, GMX/web.de,
   Orange, Comcast, Postfix's and Exim's defaults, Ferry's own), all in one alternation
   compiled once: the leftmost match in the reply wins (at one place, the earlier rule);
4. the enhanced code as the table gives it otherwise (``5.7.1`` is policy unless the text
   said spam), then its class.subject (``x.7`` policy);
5. the reply code (RFC 5321 §4.2.3: ``552`` is "exceeded storage allocation");
6. ``other``.

Step 2 comes before the texts because providers reuse text ("mailbox unavailable") far
more loosely than codes; codes that providers are known to reuse for something else stay
out of it (Microsoft answers ``5.1.10`` and ``5.4.1`` for a recipient not found, Gmail
``5.7.5`` for DMARC).

The classifier is configured once per process (:func:`configure`, at start and reload) and
read by :func:`classify`.  This module is pure: no I/O, no state besides the compiled table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from engine.config import BOUNCE_CATEGORIES, BounceRuleConfig

# RFC 3463 §2: class.subject.detail after the reply code ("550 5.1.1 No such user"),
# after a continuation's hyphen too ("550-5.7.26 ...").
_REPLY = re.compile(r"\s*(\d{3})(?:[ -]+([245]\.\d{1,3}\.\d{1,3})\b)?")
# The reply inside Ferry's own expiry reason ("message expired in the queue; last reply:").
EXPIRED_PREFIX: Final = "message expired in the queue"

#: Enhanced status codes → (category, decisive).  The key is "subject.detail" (the class
#: only says temporary or permanent, not what failed), or the whole code where the class
#: changes the meaning.  Decisive entries are not second-guessed by the texts.  RFC 3463
#: §3, RFC 5248's registry, RFC 7504 and RFC 7505 (null MX), RFC 8461/7672 (TLS).
ENHANCED: Final[dict[str, tuple[str, bool]]] = {
    # x.1: addressing
    "1.0": ("bad-mailbox", False),
    "1.1": ("bad-mailbox", True),      # bad destination mailbox address
    "1.2": ("bad-domain", True),       # bad destination system address
    "1.3": ("bad-mailbox", True),      # bad destination mailbox address syntax
    "1.4": ("bad-mailbox", False),     # destination mailbox address ambiguous
    "1.6": ("inactive", True),         # destination mailbox has moved
    "1.7": ("policy", False),          # bad sender's mailbox address syntax
    "1.8": ("policy", False),          # bad sender's system address
    "1.10": ("bad-domain", False),     # null MX (RFC 7505); Microsoft: recipient not found
    # x.2: the mailbox
    "2.0": ("bad-mailbox", False),
    "2.1": ("inactive", False),        # mailbox disabled; Gmail 4.2.1: receiving too fast
    "2.2": ("quota", True),            # mailbox full
    "2.3": ("too-large", True),        # message length exceeds administrative limit
    "2.4": ("routing", False),         # mailing list expansion problem
    # x.3: the receiving system
    "3.0": ("other", False),
    "3.1": ("other", False),           # mail system full (the server's, not the mailbox)
    "3.2": ("routing", False),         # system not accepting network messages
    "3.4": ("too-large", True),        # message too big for system
    "3.5": ("routing", False),         # system incorrectly configured
    # x.4: network and routing
    "4.0": ("routing", False),
    "4.1": ("routing", False),         # no answer from host (Microsoft 5.4.1: see texts)
    "4.2": ("routing", False),         # bad connection
    "4.3": ("dns", True),              # directory server failure
    "4.4": ("routing", False),         # unable to route (5.4.4 below)
    "5.4.4": ("bad-domain", False),    # permanently unable to route: no usable MX
    "4.6": ("routing", True),          # routing loop detected
    "4.7": ("expired", True),          # delivery time expired
    "4.14": ("routing", True),         # Microsoft: hop count exceeded
    # x.5: protocol
    "5.0": ("protocol", False),        # Outlook 5.5.0 mailbox unavailable: see texts
    "5.3": ("protocol", False),        # too many recipients
    # x.6: message content or media
    "6.0": ("protocol", False),
    # x.7: security and policy
    "7.0": ("policy", False),
    "7.1": ("policy", False),          # delivery not authorized: spam blocks say so
    "7.4": ("tls", True),              # security features not supported
    "7.5": ("tls", False),             # cryptographic failure; Gmail 5.7.5: DMARC
    "7.8": ("policy", True),           # authentication credentials invalid
    "7.10": ("tls", True),             # encryption needed (RFC 5248)
    "7.11": ("tls", True),             # encryption required for the mechanism
    "7.23": ("policy", True),          # SPF validation failed (RFC 7372)
    "7.24": ("policy", True),          # SPF validation error
    "7.25": ("policy", True),          # reverse DNS validation failed
    "7.26": ("policy", True),          # multiple authentication checks failed (DMARC)
    "7.27": ("policy", True),          # sender address has null MX
    "7.28": ("policy", True),          # Gmail: unusual rate of unsolicited mail (a rate)
}

#: Category of each enhanced subject (the middle number) when the detail is not in
#: :data:`ENHANCED` (RFC 3463 §3.1-§3.8).
SUBJECTS: Final[dict[str, str]] = {"0": "other", "1": "bad-mailbox", "2": "bad-mailbox",
                                   "3": "other", "4": "routing", "5": "protocol",
                                   "6": "protocol", "7": "policy"}

#: Category of a reply code when neither its enhanced code nor its text said (RFC 5321
#: §4.2.3; RFC 7504 for 521 and 556).
CODES: Final[dict[str, str]] = {
    "421": "routing", "450": "other", "451": "other", "452": "other", "454": "tls",
    "500": "protocol", "501": "protocol", "502": "protocol", "503": "protocol",
    "504": "protocol", "521": "bad-domain", "530": "policy", "535": "policy",
    "550": "bad-mailbox", "551": "bad-mailbox", "552": "quota", "553": "bad-mailbox",
    "554": "other", "556": "bad-domain",
}

#: (category, regular expression) searched case-insensitively in the reply's text, the
#: providers' own words (their published error pages: see docs/bounces.md), leftmost match
#: first.  Kept specific: a pattern that matches a word used in every reply makes every
#: reply that category.
TEXTS: Final[tuple[tuple[str, str], ...]] = (
    # -- bad mailbox
    ("bad-mailbox", r"no such (?:user|recipient|mailbox|account)|user(?:name)? unknown"
                    r"|unknown (?:user|recipient|mailbox)|user (?:does not|doesn't) exist"
                    r"|(?:account|mailbox|recipient|address|user) (?:that you tried to reach )?"
                    r"(?:does not|doesn't) exist|mailbox (?:not found|unavailable)"
                    r"|invalid (?:recipient|mailbox)|recipient ?not ?found|RecipNotFound"
                    r"|recipient address rejected: access denied|unrouteable address"
                    r"|no mailbox here|not our customer|doesn't have an? \S+ account"
                    r"|destinataire invalide|bad destination mailbox"),
    # -- bad domain
    ("bad-domain", r"domain (?:not found|(?:does not|doesn't) exist|is not valid)"
                   r"|no such domain|host (?:or domain name )?not found|null MX"
                   r"|unrouteable mail domain|does not accept mail"),
    # -- inactive
    ("inactive", r"(?:mailbox|account) (?:is |has been )?(?:disabled|inactive|deactivated"
                 r"|suspended|locked|closed|expired)|(?:disabled|inactive|expired) "
                 r"(?:mailbox|account)|no longer (?:active|in use|available)"),
    # -- quota (Gmail 4.2.1 "receiving mail at a rate": the mailbox's own rate)
    ("quota", r"over ?quota|quota exceeded|exceeds? (?:the )?(?:storage|quota)"
              r"|mailbox (?:is )?full|boite pleine|insufficient (?:storage|space) (?:for|in) "
              r"(?:the )?(?:user|mailbox)|exceeded storage allocation|QuotaExceeded"
              r"|receiving mail at a rate"),
    # -- too large
    ("too-large", r"(?:message|mail) (?:size )?(?:exceeds|is too (?:big|large)|too (?:big|large))"
                  r"|size (?:exceeds|limit)|SizeLimit|exceeded .{0,20}message size"),
    # -- content: the message itself was judged (spam, virus, phishing)
    ("content", r"spam(?! ?haus|cop)|unsolicited|virus|malware|phish|infected|bulk mail"
                r"|content (?:rejected|restrictions|filter)|security issue"
                r"|message (?:was )?rejected due to content"),
    # -- policy: the sender was judged (reputation, lists, authentication, rates)
    ("policy", r"blocked (?:using|by|from|due)|black ?list|block ?list|spamhaus|spamcop|barracuda"
               r"|reputation|\brbl\b|dnsbl|listed (?:at|on|in)|DMARC|\bSPF\b|DKIM"
               r"|unauthenticated|authenticat|policy|complaints|rate limit|throttl"
               r"|too many (?:messages|connections)|temporarily (?:deferred|rate limited)"
               r"|\[TSS?\d\d\]|\bRP-\d{3}\b|\bOFR\d*_\d+|\b(?:BL|RL)\d{6}\b|\[CS\d\d\]"
               r"|relay (?:access )?denied|not permitted|banned|prohibit|access denied"
               r"|service refus|server busy|administrative prohibition"
               r"|sender address rejected|verification failed|reverse dns|PTR record"),
    # -- tls
    ("tls", r"starttls|\btls\b|\bssl\b|certificate|encryption (?:required|needed)"
            r"|handshake"),
    # -- routing: the road to the server, not the server's opinion
    ("routing", r"loop|hop count|too many hops|timed? ?out|connection (?:refused|reset"
                r"|failed|closed|lost)|no route to host|unreachable|no host to deliver"
                r"|is down, not tried|no (?:answer|greeting)"),
    # -- dns
    ("dns", r"\bdns\b|name server|nameserver|resolv(?:e|er|ing) |lookup failed|SERVFAIL"),
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One operator rule ([[bounce_rule]]), compiled."""

    category: str
    code: str
    enhanced: str
    text: re.Pattern[str] | None

    @classmethod
    def of(cls, config: BounceRuleConfig) -> Rule:
        return cls(config.category, str(config.code) if config.code else "",
                   config.enhanced,
                   re.compile(config.text, re.IGNORECASE) if config.text else None)

    def matches(self, reply: str, code: str, enhanced: str) -> bool:
        if self.code and code != self.code:
            return False
        if self.enhanced and not (enhanced == self.enhanced
                                  or enhanced.startswith(self.enhanced + ".")):
            return False
        return self.text is None or self.text.search(reply) is not None


def _combined(texts: Sequence[tuple[str, str]]) -> tuple[re.Pattern[str], dict[str, str]]:
    """One alternation of every text rule, a named group each: one pass per reply."""
    groups = {f"t{i}": category for i, (category, _) in enumerate(texts)}
    pattern = "|".join(f"(?P<t{i}>{expr})" for i, (_, expr) in enumerate(texts))
    return re.compile(pattern, re.IGNORECASE), groups


class Classifier:
    """The table (see the module docstring) with the operator's ``rules`` in front."""

    def __init__(self, rules: Sequence[BounceRuleConfig] = ()) -> None:
        for category in {r.category for r in rules} | {c for c, _ in TEXTS}:
            assert category in BOUNCE_CATEGORIES, category
        self.rules = tuple(Rule.of(r) for r in rules)
        self._texts, self._groups = _combined(TEXTS)

    def classify(self, reply: str) -> str:
        """The category of a reply as recorded ("550 5.1.1 <a@b>: no such user"), or of
        Ferry's own reason (expiry: "expired", whatever the last reply was)."""
        if reply.startswith(EXPIRED_PREFIX):
            return "expired"
        match = _REPLY.match(reply)
        code, enhanced = (match.group(1), match.group(2) or "") if match else ("", "")
        for rule in self.rules:
            if rule.matches(reply, code, enhanced):
                return rule.category
        entry = None
        if enhanced:
            _, _, detail = enhanced.partition(".")
            entry = ENHANCED.get(enhanced) or ENHANCED.get(detail)
            if entry is not None and entry[1]:
                return entry[0]
        found = self._texts.search(reply, match.end() if match else 0)
        if found is not None and found.lastgroup is not None:
            return self._groups[found.lastgroup]
        if entry is not None:
            return entry[0]
        if enhanced:
            return SUBJECTS.get(enhanced.split(".")[1], "other")
        return CODES.get(code, "other")


_active = Classifier()


def configure(rules: Sequence[BounceRuleConfig]) -> None:
    """Put the operator's rules in front of the table, for this process (at start and at
    each reload: ``[[bounce_rule]]`` needs no restart)."""
    global _active
    _active = Classifier(rules)


def classify(reply: str) -> str:
    """The category of ``reply`` by the table this process was configured with."""
    return _active.classify(reply)

"""SPF (RFC 7208): check_host() on the agents' shared, cached DNS.

The contract, used by the "verify" agent (engine.agents.verify) and kept stable::

    async def check_host(lookup: Lookup, ip: IPAddress | str, domain: str, sender: str,
                         helo: str = "", *, receiver: str = "",
                         limits: Limits = DEFAULT_LIMITS,
                         default_explanation: str = DEFAULT_EXPLANATION) -> SpfResult

``ip`` is the SMTP client's address (an IPv4-mapped IPv6 address counts as IPv4, RFC 7208
§5), ``domain`` the domain whose policy is checked, ``sender`` the MAIL FROM address (""
for the null reverse-path: then "postmaster@<helo>", §2.4; a sender without a local part
gets "postmaster", §4.3), ``helo`` the HELO/EHLO argument (the %{h} macro), ``receiver``
this host's name (the %{r} macro, "unknown" when empty).  :func:`check_mail_from` derives
``domain`` from the reverse-path (§2.4) and :func:`check_helo` checks the HELO identity
(§2.3).  The result is an :class:`SpfResult`: one of the seven results of §2.6, the domain
checked, the explanation (for "fail", §6.2), the directive that matched and, for the two
error results, what went wrong; ``.method_result(scope)`` gives the RFC 8601 resinfo and
``.reply()`` the SMTP reply a receiver that refuses on it sends (RFC 7372 §3.2).

What is evaluated: record selection (§4.4, §4.5: exactly one "v=spf1" TXT record), the
whole record parsed before any term is evaluated (§4.6: a syntax error anywhere is a
permerror), every mechanism of §5 with dual CIDR lengths, the modifiers redirect= and exp=
(§6), macros (§7) with transformers, delimiters and URL escaping, and the processing limits
of §4.6.4 (:class:`Limits`).  A DNS failure (engine.agents.dns.DnsTempError) is a
temperror; an elapsed time over ``Limits.timeout`` too.

Every lookup goes through ``Lookup.query`` (cached, shared with the other agents); the
module never blocks the loop, never decides what to do with a result (that is the verify
agent's configuration) and never writes a header.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final, Literal, TypeAlias, TypeVar

from engine.agents.api import MethodResult, Reply
from engine.agents.dns import Answer, DnsPermError, DnsTempError, Lookup, RecordType

__all__ = [
    "DEFAULT_EXPLANATION",
    "DEFAULT_LIMITS",
    "RESULTS",
    "Limits",
    "SpfCache",
    "SpfResult",
    "SpfTrace",
    "check_helo",
    "check_host",
    "check_mail_from",
    "smtp_reply",
]

_T = TypeVar("_T")
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Result: TypeAlias = Literal[
    "none", "neutral", "pass", "fail", "softfail", "temperror", "permerror"]

#: The results of RFC 7208 §2.6.
RESULTS: Final = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")

#: The explanation of a "fail" when the record has no usable exp= (§6.2 lets the receiver
#: choose it); a macro-string, expanded like an exp= text.
DEFAULT_EXPLANATION: Final = "%{i} is not allowed to send mail for %{d} (SPF)"


@dataclass(frozen=True, slots=True)
class Limits:
    """The processing limits of RFC 7208 §4.6.4 (the RFC's values by default)."""

    #: Terms that query the DNS (include, a, mx, ptr, exists, redirect) in one check.
    dns_terms: int = 10
    #: MX records one "mx" may look at; more is a permerror.
    mx_names: int = 10
    #: PTR names one "ptr" (or %{p}) may look at; the others are ignored.
    ptr_names: int = 10
    #: Terms whose lookup is void (NXDOMAIN or no records); more is a permerror.
    void_lookups: int = 2
    #: Seconds for a whole check (§4.6.4 asks for at least 20); over it, temperror.
    timeout: float = 20.0


DEFAULT_LIMITS: Final = Limits()


@dataclass(slots=True)
class SpfTrace:
    """What one check_host() evaluation depended on besides its inputs, for
    :class:`SpfCache`: the DNS lookups it made (name, type) and whether it read the
    clock (the %{t} macro, §7.3)."""

    queries: list[tuple[str, RecordType]] = field(default_factory=list)
    timed: bool = False


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one check_host()."""

    result: Result
    #: The domain whose policy was checked (the one asked for, not a redirect target).
    domain: str
    #: The <sender> as evaluated ("postmaster@…" filled in, §2.4, §4.3).
    sender: str = ""
    helo: str = ""
    #: The explanation (§6.2): only for "fail".
    explanation: str = ""
    #: The directive that decided ("-all", "ip4:192.0.2.0/24"), "default" when none
    #: matched (§4.7), "" for none/temperror/permerror.
    mechanism: str = ""
    #: What went wrong, for temperror and permerror (logs and the A-R reason).
    problem: str = ""

    def method_result(self, scope: Literal["mailfrom", "helo"] = "mailfrom") -> MethodResult:
        """The RFC 8601 resinfo: ``spf=<result> smtp.mailfrom=<domain>`` (or
        ``smtp.helo=<helo>`` for the HELO identity, RFC 8601 §2.7.2)."""
        if scope == "helo":
            props = (("smtp.helo", self.helo or self.domain),)
        else:
            props = (("smtp.mailfrom", self.domain or self.sender),)
        return MethodResult("spf", self.result, self.problem, props)

    def reply(self) -> Reply | None:
        """The SMTP reply for a receiver that refuses on this result; None when the
        result is not one to refuse on."""
        return smtp_reply(self)


# RFC 7372 §3.2: X.7.23 "SPF validation failed", X.7.24 "SPF validation error".
_REPLY_TEXT_MAX: Final = 400


def smtp_reply(result: SpfResult) -> Reply | None:
    """fail → 550 5.7.23 with the explanation (RFC 7208 §8.4); temperror → 451 4.7.24
    (§8.6); permerror → 550 5.7.24 (§8.7); anything else → None."""
    if result.result == "fail":
        text = result.explanation or f"SPF fail for {result.domain}"
        return (550, "5.7.23", _reply_text(text))
    if result.result == "temperror":
        return (451, "4.7.24", _reply_text(
            f"SPF temporary error checking {result.domain}, try again later"))
    if result.result == "permerror":
        problem = f": {result.problem}" if result.problem else ""
        return (550, "5.7.24", _reply_text(
            f"SPF permanent error in the policy of {result.domain}{problem}"))
    return None


def _reply_text(text: str) -> str:
    # Only printable ASCII reaches a reply (DESIGN.md wire rules; a TXT record is data
    # from the sender's side), and a reply line stays well under 512 octets (RFC 5321
    # §4.5.3.1.5).
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean[:_REPLY_TEXT_MAX]


# --- entry points --------------------------------------------------------------------------


async def check_host(
    lookup: Lookup,
    ip: IPAddress | str,
    domain: str,
    sender: str,
    helo: str = "",
    *,
    receiver: str = "",
    limits: Limits = DEFAULT_LIMITS,
    default_explanation: str = DEFAULT_EXPLANATION,
    trace: SpfTrace | None = None,
) -> SpfResult:
    """RFC 7208 §4: the SPF result of ``ip`` for ``domain`` (see the module docstring);
    ``trace``, when given, collects what the result depended on (:class:`SpfCache`)."""
    address = _client_address(ip)
    if not sender:
        sender = f"postmaster@{helo}"  # §2.4: the null reverse-path
    local, at, sender_domain = sender.rpartition("@")
    if not at:
        local, sender_domain = "", sender
    if not local:
        local = "postmaster"  # §4.3
    sender = f"{local}@{sender_domain}"
    if not domain:
        domain = sender_domain
    if domain.endswith("."):
        domain = domain[:-1]
    domain = _a_labels(domain)
    base = SpfResult("none", domain, sender, helo)
    # §4.3: a malformed or single-label domain gives "none" without a lookup.
    if not _domain_ok(domain, toplevel=True):
        return replace(base, problem="not a valid multi-label domain name")
    check = _Check(lookup, address, local, sender_domain, helo, receiver or "unknown", limits,
                   trace)
    try:
        async with asyncio.timeout(limits.timeout):
            outcome = await check.evaluate(domain)
            explanation = ""
            if outcome.result == "fail":
                explanation = await check.explain(outcome, default_explanation)
    except _PermError as exc:
        return replace(base, result="permerror", problem=str(exc))
    except _TempError as exc:
        return replace(base, result="temperror", problem=str(exc))
    except TimeoutError:
        return replace(base, result="temperror", problem=(
            f"no result within {limits.timeout:g} s (RFC 7208 section 4.6.4)"))
    return replace(base, result=outcome.result, explanation=explanation,
                   mechanism=outcome.mechanism, problem=outcome.problem)


async def check_mail_from(
    lookup: Lookup,
    ip: IPAddress | str,
    mail_from: str,
    helo: str = "",
    *,
    receiver: str = "",
    limits: Limits = DEFAULT_LIMITS,
    default_explanation: str = DEFAULT_EXPLANATION,
    trace: SpfTrace | None = None,
) -> SpfResult:
    """The "MAIL FROM" identity (§2.4): the domain of ``mail_from`` (with or without its
    angle brackets), or of the HELO name for the null reverse-path ("" or "<>")."""
    if mail_from.startswith("<") and mail_from.endswith(">"):
        mail_from = mail_from[1:-1]
    domain = mail_from.rpartition("@")[2] if mail_from else helo
    return await check_host(lookup, ip, domain, mail_from, helo, receiver=receiver,
                            limits=limits, default_explanation=default_explanation,
                            trace=trace)


async def check_helo(
    lookup: Lookup,
    ip: IPAddress | str,
    helo: str,
    *,
    receiver: str = "",
    limits: Limits = DEFAULT_LIMITS,
    default_explanation: str = DEFAULT_EXPLANATION,
) -> SpfResult:
    """The "HELO" identity (§2.3): the HELO name's own policy, sender postmaster@helo.
    An address literal or a name that is not a multi-label domain gives "none"."""
    return await check_host(lookup, ip, helo, "", helo, receiver=receiver, limits=limits,
                            default_explanation=default_explanation)


def _a_labels(domain: str) -> str:
    """§4.3: an internationalized domain is looked up in A-labels (RFC 5890); one that
    cannot be converted stays as it is (and then fails the syntax check: "none")."""
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _client_address(ip: IPAddress | str) -> IPAddress:
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    # §5: an IPv4-mapped IPv6 address is an IPv4 address (RFC 4291 §2.5.5.2).
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# --- domain names --------------------------------------------------------------------------

_LABEL_CHARS: Final = re.compile(r"[A-Za-z0-9_-]+")


def _domain_ok(name: str, *, toplevel: bool = False) -> bool:
    """Can ``name`` be looked up: labels of 1 to 63 octets, 253 in all (RFC 1035 §2.3.4).
    ``toplevel`` (§4.3) also wants two labels at least and host-name characters (no
    address literal, no spaces)."""
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if any(not label or len(label.encode("utf-8", "surrogateescape")) > 63
           for label in labels):
        return False
    if toplevel:
        return len(labels) >= 2 and all(_LABEL_CHARS.fullmatch(label) for label in labels)
    return True


def _truncate(name: str) -> str:
    """§7.3: an expanded domain over 253 characters loses labels on the left."""
    if name.endswith("."):
        name = name[:-1]
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


# --- macros (§7) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Macro:
    letter: str  # lower case
    digits: int  # 0: all parts
    reverse: bool
    delimiters: str
    escape: bool  # an upper-case letter: URL-escape the expansion (§7.3)


_Token: TypeAlias = "str | _Macro"

_MACRO_EXPAND: Final = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
#: Letters allowed in a domain-spec; c, r and t only in an explanation (§7.2).
_DOMAIN_LETTERS: Final = frozenset("slodiphv")
_EXP_LETTERS: Final = frozenset("slodiphvcrt")
#: What %% , %_ and %- stand for (§7.1).
_ESCAPES: Final = {"%": "%", "_": " ", "-": "%20"}


def _parse_macro_string(text: str, *, explanation: bool = False) -> list[_Token]:
    """The tokens of a macro-string (§7.1), or _PermError.  An explanation-string may also
    hold spaces and the letters c, r, t (§6.2, §7.2)."""
    return _scan_macro_string(text, explanation)[0]


def _scan_macro_string(text: str, explanation: bool) -> tuple[list[_Token], bool]:
    """The tokens, and whether the text ends in a macro-expand (escapes included)."""
    ends_in_expand = False
    letters = _EXP_LETTERS if explanation else _DOMAIN_LETTERS
    tokens: list[_Token] = []
    literal: list[str] = []
    i, end = 0, len(text)
    while i < end:
        char = text[i]
        if char == "%":
            following = text[i + 1: i + 2]
            if following in _ESCAPES:
                literal.append(_ESCAPES[following])
                i += 2
                ends_in_expand = True
                continue
            match = _MACRO_EXPAND.match(text, i)
            if match is None:
                raise _PermError(f"bad macro at {text[i:i + 8]!a} (RFC 7208 section 7.1)")
            letter, digits, reverse, delimiters = match.groups()
            if letter.lower() not in letters:
                raise _PermError(f"macro letter {letter!a} not allowed here (RFC 7208 section 7.2)")
            count = int(digits) if digits else 0
            if digits and count == 0:
                raise _PermError("a macro's digit transformer must be nonzero "
                                 "(RFC 7208 section 7.3)")
            if literal:
                tokens.append("".join(literal))
                literal = []
            tokens.append(_Macro(letter.lower(), count, bool(reverse), delimiters or ".",
                                 letter.isupper()))
            i = match.end()
            ends_in_expand = True
            continue
        # macro-literal: visible ASCII except "%"; an explanation also allows SP.
        if not ("!" <= char <= "~" or (explanation and char == " ")):
            raise _PermError(f"character {char!a} not allowed (RFC 7208 section 7.1)")
        literal.append(char)
        i += 1
        ends_in_expand = False
    if literal:
        tokens.append("".join(literal))
    return tokens, ends_in_expand


_TOPLABEL: Final = re.compile(
    r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")


def _parse_domain_spec(text: str) -> list[_Token]:
    """domain-spec = macro-string domain-end; domain-end = ("." toplabel ["."]) /
    macro-expand (§7.1).  The check is on the text before expansion."""
    if not text:
        raise _PermError("empty domain-spec (RFC 7208 section 7.1)")
    tokens, ends_in_expand = _scan_macro_string(text, False)
    if ends_in_expand:
        return tokens
    body = text[:-1] if text.endswith(".") else text
    _head, dot, top = body.rpartition(".")
    if not dot or not _TOPLABEL.fullmatch(top):
        raise _PermError(f"{text!a} does not end in a valid top label (RFC 7208 section 7.1)")
    return tokens


# --- records (§4.5, §4.6, §5, §6) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Directive:
    qualifier: str  # "+", "-", "?", "~"
    name: str  # lower-case mechanism name
    text: str  # as written, for SpfResult.mechanism
    domain: list[_Token] | None = None
    cidr4: int = 32
    cidr6: int = 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None


@dataclass(slots=True)
class _Record:
    directives: list[_Directive] = field(default_factory=list)
    redirect: list[_Token] | None = None
    exp: list[_Token] | None = None


_QUALIFIER_RESULT: Final[dict[str, Result]] = {
    "+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER: Final = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.DOTALL)
_MECHANISM: Final = re.compile(r"([+\-?~]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.DOTALL)
_DUAL_CIDR: Final = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?\Z")
_IP4_NETWORK: Final = re.compile(r"((?:[0-9]{1,3}\.){3}[0-9]{1,3})(?:/([0-9]+))?")
_IP6_NETWORK: Final = re.compile(r"([0-9A-Fa-f:.]+)(?:/([0-9]+))?")
_DEC_OCTET: Final = re.compile(r"0|[1-9][0-9]{0,2}")
_VERSION: Final = "v=spf1"


def _is_spf_record(text: str) -> bool:
    """§4.5: "v=spf1" (any case) alone or followed by a space."""
    return text[:6].lower() == _VERSION and (len(text) == 6 or text[6] == " ")


def _cidr(digits: str | None, maximum: int, default: int) -> int:
    if digits is None:
        return default
    # ip4-cidr-length / ip6-cidr-length: no leading zero, within range (§5.6).
    if (len(digits) > 1 and digits[0] == "0") or int(digits) > maximum:
        raise _PermError(f"invalid CIDR length /{digits} (RFC 7208 section 5.6)")
    return int(digits)


def _parsed(text: str) -> _Record:
    """The parsed record, from a cache: a busy receiver sees the same few thousand records
    over and over, and the parse is the only CPU work of a check whose DNS is cached."""
    record = _parse_cached(text)
    if isinstance(record, str):
        raise _PermError(record)
    return record


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> _Record | str:
    # Parsed records are shared between checks: nothing changes a _Record after its parse.
    try:
        return _parse_record(text)
    except _PermError as exc:
        return str(exc)


def _parse_record(text: str) -> _Record:
    """The whole record, or _PermError for the first syntax error anywhere (§4.6)."""
    if not text.isascii():
        raise _PermError("the record is not 7-bit ASCII (RFC 7208 section 3.1)")
    record = _Record()
    # §4.6.1 / §12: terms are separated by one or more SP, and only SP.
    for term in text[6:].split(" "):
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier is not None:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                if getattr(record, name) is not None:
                    raise _PermError(f"{name}= appears twice (RFC 7208 section 6)")
                setattr(record, name, _parse_domain_spec(value))
            else:
                _parse_macro_string(value)  # unknown-modifier: ignored, but well-formed
            continue
        record.directives.append(_parse_directive(term))
    return record


def _parse_directive(term: str) -> _Directive:
    match = _MECHANISM.fullmatch(term)
    if match is None:
        raise _PermError(f"unknown term {term!a} (RFC 7208 section 4.6.1)")
    qualifier, name, rest = match.group(1) or "+", match.group(2).lower(), match.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"{term!a}: all takes no argument (RFC 7208 section 5.1)")
        return _Directive(qualifier, name, term)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{term!a}: {name} needs ':domain' (RFC 7208 section 5.2, 5.7)")
        return _Directive(qualifier, name, term, _parse_domain_spec(rest[1:]))
    if name in ("a", "mx"):
        cidr = _DUAL_CIDR.search(rest)
        assert cidr is not None  # the pattern matches the empty string at the end
        spec = rest[: cidr.start()]
        cidr4 = _cidr(cidr.group(1), 32, 32)
        cidr6 = _cidr(cidr.group(2), 128, 128)
        domain = None
        if spec:
            if not spec.startswith(":"):
                raise _PermError(f"{term!a}: bad {name} argument (RFC 7208 section 5.3, 5.4)")
            domain = _parse_domain_spec(spec[1:])
        return _Directive(qualifier, name, term, domain, cidr4, cidr6)
    if name == "ptr":
        domain = None
        if rest:
            if not rest.startswith(":"):
                raise _PermError(f"{term!a}: bad ptr argument (RFC 7208 section 5.5)")
            domain = _parse_domain_spec(rest[1:])
        return _Directive(qualifier, name, term, domain)
    if name == "ip4":
        ip4 = _IP4_NETWORK.fullmatch(rest[1:]) if rest.startswith(":") else None
        if ip4 is None or not all(_DEC_OCTET.fullmatch(o) and int(o) < 256
                                  for o in ip4.group(1).split(".")):
            raise _PermError(f"{term!a}: bad ip4 network (RFC 7208 section 5.6)")
        length = _cidr(ip4.group(2), 32, 32)
        network = ipaddress.IPv4Network(f"{ip4.group(1)}/{length}", strict=False)
        return _Directive(qualifier, name, term, network=network)
    if name == "ip6":
        ip6 = _IP6_NETWORK.fullmatch(rest[1:]) if rest.startswith(":") else None
        try:
            if ip6 is None:
                raise ValueError(rest)
            length = _cidr(ip6.group(2), 128, 128)
            network6 = ipaddress.IPv6Network(f"{ip6.group(1)}/{length}", strict=False)
        except ValueError:
            raise _PermError(f"{term!a}: bad ip6 network (RFC 7208 section 5.6)") from None
        return _Directive(qualifier, name, term, network=network6)
    raise _PermError(f"unknown mechanism {term!a} (RFC 7208 section 4.6.1)")


# --- evaluation ----------------------------------------------------------------------------


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: Result
    mechanism: str = ""
    problem: str = ""
    #: The exp= of the record that decided, and that record's domain (§6.2: an include's
    #: exp= is never used; a redirect's replaces the first record's).
    exp: list[_Token] | None = None
    domain: str = ""


class _Check:
    """One check_host() evaluation: the inputs, and the counters that span includes and
    redirects (§4.6.4: the limits are per check)."""

    def __init__(self, lookup: Lookup, ip: IPAddress, local: str, sender_domain: str,
                 helo: str, receiver: str, limits: Limits, trace: SpfTrace | None = None
                 ) -> None:
        self.lookup = lookup
        self.trace = trace
        self.ip = ip
        self.local = local
        self.sender_domain = sender_domain
        self.helo = helo
        self.receiver = receiver
        self.limits = limits
        self.terms = 0
        self.voids = 0
        self._validated: dict[str, str] = {}  # %{p} per <domain>
        self.evaluating = True

    # -- counters --

    def count_term(self, what: str) -> None:
        self.terms += 1
        if self.terms > self.limits.dns_terms:
            raise _PermError(f"more than {self.limits.dns_terms} DNS-querying terms "
                             f"at {what} (RFC 7208 section 4.6.4)")

    def count_void(self, answer: Answer, what: str) -> None:
        if answer.void:
            self.voids += 1
            if self.voids > self.limits.void_lookups:
                raise _PermError(f"more than {self.limits.void_lookups} void lookups "
                                 f"at {what} (RFC 7208 section 4.6.4)")

    async def query(self, name: str, rdtype: Literal["TXT", "A", "AAAA", "MX", "PTR"]
                    ) -> Answer | None:
        """The answer, None for a name that cannot be looked up; _TempError."""
        if not _domain_ok(name):
            return None
        if self.trace is not None:
            self.trace.queries.append((name, rdtype))
        try:
            return await self.lookup.query(name, rdtype)
        except DnsPermError:
            return None
        except DnsTempError as exc:
            raise _TempError(f"DNS error: {exc}") from None

    # -- check_host() proper --

    async def evaluate(self, domain: str) -> _Outcome:
        """§4.4 to §4.8 for ``domain`` (called again for include and redirect)."""
        answer = await self.query(domain, "TXT")
        if answer is None or answer.status == "nxdomain":
            return _Outcome("none", problem=f"no SPF record at {domain}")
        records = [text for text in answer.records if _is_spf_record(text)]
        if not records:
            return _Outcome("none", problem=f"no SPF record at {domain}")
        if len(records) > 1:
            raise _PermError(f"{domain} has {len(records)} SPF records (RFC 7208 section 4.5)")
        record = _parsed(records[0])
        for directive in record.directives:
            if await self.matches(directive, domain):
                return _Outcome(_QUALIFIER_RESULT[directive.qualifier], directive.text,
                                exp=record.exp, domain=domain)
        if record.redirect is not None:
            # §6.1: only when no mechanism matched; the target's result is the result.
            self.count_term("redirect")
            target = await self.expand_domain(record.redirect, domain)
            outcome = await self.evaluate(target)
            if outcome.result == "none":
                raise _PermError(f"redirect={target}: no SPF record (RFC 7208 section 6.1)")
            return outcome
        return _Outcome("neutral", "default", exp=record.exp, domain=domain)  # §4.7

    async def matches(self, directive: _Directive, domain: str) -> bool:
        name = directive.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            assert directive.network is not None
            return self.ip.version == directive.network.version and (
                self.ip in directive.network)
        self.count_term(directive.text)
        target = domain if directive.domain is None else (
            await self.expand_domain(directive.domain, domain))
        if name == "include":
            outcome = await self.evaluate(target)
            # §5.2: the table of include results.
            if outcome.result == "none":
                raise _PermError(f"include:{target}: no SPF record (RFC 7208 section 5.2)")
            return outcome.result == "pass"
        if name == "a":
            answer = await self.query(target, self.address_type)
            if answer is None:
                return False
            self.count_void(answer, directive.text)
            return self.any_in(answer.records, directive)
        if name == "mx":
            return await self.match_mx(target, directive)
        if name == "ptr":
            return await self.match_ptr(target, directive)
        # exists (§5.7): an A lookup whatever the client's address family.
        answer = await self.query(target, "A")
        if answer is None:
            return False
        self.count_void(answer, directive.text)
        return bool(answer.records)

    @property
    def address_type(self) -> Literal["A", "AAAA"]:
        return "A" if self.ip.version == 4 else "AAAA"

    def any_in(self, addresses: tuple[str, ...], directive: _Directive) -> bool:
        # The first ``length`` bits equal (integers: no network object per address).
        length = directive.cidr4 if self.ip.version == 4 else directive.cidr6
        shift = self.ip.max_prefixlen - length
        mine = int(self.ip) >> shift
        for text in addresses:
            address = ipaddress.ip_address(text)
            if address.version == self.ip.version and int(address) >> shift == mine:
                return True
        return False

    async def match_mx(self, target: str, directive: _Directive) -> bool:
        answer = await self.query(target, "MX")
        if answer is None:
            return False
        self.count_void(answer, directive.text)
        hosts = [record.partition(" ")[2] for record in answer.records]
        if len(hosts) > self.limits.mx_names:
            raise _PermError(f"{target} has {len(hosts)} MX records, more than "
                             f"{self.limits.mx_names} (RFC 7208 section 4.6.4)")
        # A null MX (RFC 7505, target ".") has no address.  No implicit MX (§5.4).
        hosts = [host for host in hosts if host not in ("", ".")]
        family = self.address_type

        async def addresses(host: str) -> tuple[str, ...]:
            found = await self.query(host, family)
            return () if found is None else found.records

        found = await _gather(addresses(host) for host in hosts)
        if any(self.any_in(records, directive) for records in found
               if not isinstance(records, BaseException)):
            return True
        _raise_first(found)  # no match, and a lookup failed: temperror (§5)
        return False

    async def validated_names(self, what: str) -> list[str]:
        """§5.5: the client's PTR names (the first ``ptr_names``) whose forward lookup
        holds the client's address.  A DNS error on the PTR lookup gives none; on a
        forward lookup, that name is skipped."""
        try:
            answer = await self.query(_reverse_name(self.ip), "PTR")
        except _TempError:
            return []
        if answer is None:
            return []
        if self.evaluating:
            self.count_void(answer, what)
        names = list(answer.records[: self.limits.ptr_names])
        family = self.address_type

        async def validate(name: str) -> bool:
            try:
                forward = await self.query(name, family)
            except _TempError:
                return False
            return forward is not None and any(
                ipaddress.ip_address(text) == self.ip for text in forward.records)

        checked = await _gather(validate(name) for name in names)
        _raise_first(checked)
        return [name for name, ok in zip(names, checked, strict=True) if ok is True]

    async def match_ptr(self, target: str, directive: _Directive) -> bool:
        target = target.lower().rstrip(".")
        names = await self.validated_names(directive.text)
        return any(_is_within(name, target) for name in names)

    async def p_macro(self, domain: str) -> str:
        """%{p} (§7.3): a validated name of the client, preferring <domain> or one of its
        subdomains; "unknown" when none validates."""
        if domain in self._validated:
            return self._validated[domain]
        if self.evaluating:
            self.count_term("%{p}")
        names = await self.validated_names("%{p}")
        value = "unknown"
        if names:
            value = next((n for n in names if _is_within(n, domain.lower())), names[0])
        self._validated[domain] = value
        return value

    # -- macros --

    async def expand(self, tokens: Iterable[_Token], domain: str) -> str:
        out: list[str] = []
        for token in tokens:
            if isinstance(token, str):
                out.append(token)
                continue
            value = await self.macro_value(token.letter, domain)
            parts = re.split("[" + re.escape(token.delimiters) + "]", value)
            if token.reverse:
                parts.reverse()
            if token.digits:
                parts = parts[-token.digits:]
            value = ".".join(parts)
            if token.escape:
                value = urllib.parse.quote(value, safe="-._~")
            out.append(value)
        return "".join(out)

    async def expand_domain(self, tokens: list[_Token], domain: str) -> str:
        return _truncate(await self.expand(tokens, domain))

    async def macro_value(self, letter: str, domain: str) -> str:
        if letter == "s":
            return f"{self.local}@{self.sender_domain}"
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(self.ip.exploded.replace(":", ""))
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "p":
            return await self.p_macro(domain)
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.receiver
        assert letter == "t"
        if self.trace is not None:
            self.trace.timed = True
        return str(int(time.time()))

    # -- explanation (§6.2) --

    async def explain(self, outcome: _Outcome, default: str) -> str:
        """The explanation of a "fail": the exp= of the record that decided, else the
        receiver's default.  Any problem with exp= (DNS error, not exactly one TXT
        record, non-ASCII, bad macro) falls back to the default; the lookup counts
        against no limit (§4.6.4)."""
        self.evaluating = False
        domain = outcome.domain
        if outcome.exp is not None:
            try:
                name = await self.expand_domain(outcome.exp, domain)
                answer = await self.query(name, "TXT")
                if answer is not None and len(answer.records) == 1:
                    tokens = _explanation(answer.records[0])
                    if tokens is not None:
                        return await self.expand(tokens, domain)
            except (_PermError, _TempError):
                pass
        tokens = _explanation(default)
        if tokens is None:
            return default
        try:
            return await self.expand(tokens, domain)
        except (_PermError, _TempError):
            return default


@functools.lru_cache(maxsize=1024)
def _explanation(text: str) -> tuple[_Token, ...] | None:
    """An explanation-string's tokens (§6.2), None when it is not one (not ASCII, a bad
    macro): cached, as the same few texts explain every fail."""
    if not text.isascii():
        return None
    try:
        return tuple(_parse_macro_string(text, explanation=True))
    except _PermError:
        return None


def _reverse_name(ip: IPAddress) -> str:
    return ip.reverse_pointer


def _is_within(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


async def _gather(awaitables: Iterable[Awaitable[_T]]) -> list[_T | BaseException]:
    """Run lookups side by side (the MX hosts' addresses, the PTR names' validation):
    latency is the slowest lookup, not the sum.  Every one runs to its end and its
    exception is returned in its place: a match found among the others still counts."""
    return list(await asyncio.gather(*awaitables, return_exceptions=True))


def _raise_first(results: list[_T | BaseException]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


class _Shared:
    """An evaluation under way and how many checks wait for it."""

    __slots__ = ("task", "waiting")

    def __init__(self, task: asyncio.Future[SpfResult]) -> None:
        self.task = task
        self.waiting = 0


@functools.lru_cache(maxsize=4096)
def _text(ip: IPAddress | str) -> str:
    """``str(ip)``, kept: an address object's text costs ~2 µs to make, a lookup here a
    fraction of that, and a busy MX hears the same clients again and again."""
    return str(ip)


class SpfCache:
    """check_mail_from() results by (client address, MAIL FROM, HELO, receiver), each kept
    until the first of the DNS answers it was computed from expires, at most
    ``max_entries`` of them (least recently used forgotten first).

    Correct because the inputs are the whole key and the answers are the agents' shared
    :class:`~engine.agents.dns.Lookup` cache's, kept there for the same TTLs: until the
    first of them expires, evaluating again would read the same answers and give the same
    result.  Not kept: temperror (a failure is retried), a result of a lookup that has no
    live answer cached (a failure, TTL 0, an invalid name), and one that read the clock
    (%{t}).  A bulk sender's mail (one client, one bounce address) then costs one dict
    lookup instead of an evaluation of ~100 µs (benchmarks/README.md)."""

    def __init__(self, lookup: Lookup, max_entries: int) -> None:
        self.lookup = lookup
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str, str], tuple[float, SpfResult]] = (
            OrderedDict())
        #: Results answered from the cache, for tests and metrics.
        self.hits = 0
        #: The evaluations under way, shared by the checks of the same inputs.
        self._running: dict[tuple[str, str, str, str], _Shared] = {}
        #: The last address asked for and its text (:meth:`get`).
        self._ip: IPAddress | str | None = None
        self._ip_text = ""

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ip: IPAddress | str, mail_from: str, helo: str, receiver: str = ""
            ) -> SpfResult | None:
        """The kept result for these inputs, None when there is none (or it expired)."""
        if ip is not self._ip:
            # The messages of a connection come with the same address object: its text
            # without _text's hash of it (an address hashes in Python, ~0.3 µs).
            self._ip, self._ip_text = ip, _text(ip)
        key = (self._ip_text, mail_from, helo, receiver)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.lookup.now():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    async def check_mail_from(self, ip: IPAddress | str, mail_from: str, helo: str = "", *,
                              receiver: str = "") -> SpfResult:
        """:func:`check_mail_from`'s result, from the cache when it holds it.  Checks of
        the same inputs made while one runs share it (a bulk sender's first hundred
        sessions would otherwise each evaluate the record: the cache fills only when
        the first evaluation ends); a caller that gives up leaves it to the others, and
        the last one to give up stops it (nothing outlives its callers)."""
        found = self.get(ip, mail_from, helo, receiver)
        if found is not None:
            return found
        key = (_text(ip), mail_from, helo, receiver)
        shared = self._running.get(key)
        if shared is None:
            task = asyncio.ensure_future(self._evaluate(ip, mail_from, helo, receiver))
            shared = self._running[key] = _Shared(task)
            task.add_done_callback(functools.partial(self._ended, key))
        shared.waiting += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.waiting -= 1
            if not shared.waiting and not shared.task.done():
                # Forgotten at once: a check arriving now must not await a cancelled task.
                shared.task.cancel()
                if self._running.get(key) is shared:
                    del self._running[key]

    def _ended(self, key: tuple[str, str, str, str], task: asyncio.Future[SpfResult]) -> None:
        if self._running.get(key) is not None and self._running[key].task is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: its callers may all have given up

    async def _evaluate(self, ip: IPAddress | str, mail_from: str, helo: str,
                        receiver: str) -> SpfResult:
        trace = SpfTrace()
        result = await check_mail_from(self.lookup, ip, mail_from, helo, receiver=receiver,
                                       trace=trace)
        if self.max_entries > 0 and result.result != "temperror" and not trace.timed:
            until = self.lookup.valid_until(trace.queries)
            if until is not None:
                key = (_text(ip), mail_from, helo, receiver)
                self._entries[key] = (until, result)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return result

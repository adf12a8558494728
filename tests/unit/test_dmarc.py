"""DMARC (engine.agents.dmarc): record parsing, the organizational domain, alignment, the
author domain, and whole checks against policy records served by a DNS responder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.agents.api import MethodResult
from engine.agents.dmarc import (
    Authenticated,
    AuthorError,
    DmarcRecord,
    DmarcResult,
    RecordError,
    aligned,
    author_domains,
    check,
    organizational_domain,
    parse_record,
)
from engine.agents.dns import Lookup
from engine.testing.dns import DnsResponder

ZONE = """
_dmarc.reject.test.         300 IN TXT "v=DMARC1; p=reject; rua=mailto:d@reject.test"
_dmarc.quarantine.test.     300 IN TXT "v=DMARC1; p=quarantine"
_dmarc.none.test.           300 IN TXT "v=DMARC1; p=none"
_dmarc.parent.test.         300 IN TXT "v=DMARC1; p=none; sp=reject"
_dmarc.own.parent.test.     300 IN TXT "v=DMARC1; p=quarantine"
_dmarc.sampled.test.        300 IN TXT "v=DMARC1; p=reject; pct=0"
_dmarc.strict.test.         300 IN TXT "v=DMARC1; p=reject; adkim=s; aspf=s"
_dmarc.example.co.uk.       300 IN TXT "v=DMARC1; p=reject"
_dmarc.twice.test.          300 IN TXT "v=DMARC1; p=reject"
_dmarc.twice.test.          300 IN TXT "v=DMARC1; p=none"
_dmarc.invalid.test.        300 IN TXT "v=DMARC1; p=bogus"
_dmarc.invalid-rua.test.    300 IN TXT "v=DMARC1; p=bogus; rua=mailto:r@invalid-rua.test"
_dmarc.other-txt.test.      300 IN TXT "v=spf1 -all"
_dmarc.other-txt.test.      300 IN TXT "v=DMARC1; p=quarantine"
_dmarc.split.test.          300 IN TXT "v=DMARC1; " "p=reject"
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as responder:
        responder.servfail.add("_dmarc.broken.test")
        yield responder


def run(dns: DnsResponder, from_value: str | list[str], auth: Authenticated,
        draw: float = 0.5) -> DmarcResult:
    values = [from_value] if isinstance(from_value, str) else from_value

    async def go() -> DmarcResult:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)
        return await check(lookup, values, auth, sample=lambda: draw)

    return asyncio.run(go())


def spf(domain: str, result: str = "pass") -> Authenticated:
    return Authenticated(spf_result=result, spf_domain=domain)


def dkim(*signatures: tuple[str, str]) -> Authenticated:
    return Authenticated(dkim=signatures)


NOTHING = Authenticated()


# --- records --------------------------------------------------------------------------------

def test_record_with_every_tag() -> None:
    record = parse_record("v=DMARC1; p=Quarantine; sp=reject; pct=20; adkim=s; aspf=s; "
                          "rua=mailto:a@x.test, mailto:b@x.test!10m; ruf=mailto:f@x.test; "
                          "fo=1:d; rf=afrf; ri=3600; future=ignored")
    assert record == DmarcRecord(
        p="quarantine", sp="reject", pct=20, adkim="s", aspf="s",
        rua=("mailto:a@x.test", "mailto:b@x.test!10m"), ruf=("mailto:f@x.test",),
        fo="1:d", rf="afrf", ri=3600)


def test_record_defaults_and_bad_optional_values() -> None:
    # RFC 7489 §6.3: a bad optional value falls back to its default.
    assert parse_record("v=DMARC1;p=reject") == DmarcRecord(p="reject")
    assert parse_record("v=DMARC1; p=none; pct=101; adkim=x; fo=9; ri=soon") == DmarcRecord(
        p="none")


@pytest.mark.parametrize("text", ["v=DMARC1; p=bogus", "v=DMARC1", "v=DMARC1; sp=none",
                                  "v=DMARC1; p=none; sp=bogus", "p=reject; v=DMARC1",
                                  "v=dmarc1; p=reject"])
def test_unusable_records(text: str) -> None:
    with pytest.raises(RecordError):
        parse_record(text)


def test_bad_p_with_a_report_address_is_p_none() -> None:
    # RFC 7489 §6.6.3 step 6.
    record = parse_record("v=DMARC1; p=bogus; rua=mailto:r@x.test")
    assert (record.p, record.rua) == ("none", ("mailto:r@x.test",))


# --- organizational domain and alignment ------------------------------------------------------

@pytest.mark.parametrize(("domain", "org"), [
    ("example.test", "example.test"),
    ("mail.example.test", "example.test"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("Mail.Example.COM.", "example.com"),
    ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
])
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(("mode", "author", "identifier", "expected"), [
    ("r", "example.test", "example.test", True),
    ("s", "example.test", "EXAMPLE.test.", True),
    ("r", "example.test", "bounce.example.test", True),
    ("s", "example.test", "bounce.example.test", False),
    ("r", "news.example.co.uk", "mail.example.co.uk", True),
    ("r", "example.co.uk", "other.co.uk", False),
    ("r", "example.test", "example.org", False),
    ("r", "example.test", "", False),
])
def test_alignment(mode: str, author: str, identifier: str, expected: bool) -> None:
    assert aligned(mode, author, identifier) is expected  # type: ignore[arg-type]


# --- the author domain --------------------------------------------------------------------

@pytest.mark.parametrize(("values", "domains"), [
    (["a@Example.TEST"], ("example.test",)),
    (['"Doe, John (x@y.test)" <john@example.test> (comment)'], ("example.test",)),
    (["Ann <a@one.test>,\r\n b@two.test, c@one.test"], ("one.test", "two.test")),
    (["user@bücher.test"], ("xn--bcher-kva.test",)),
])
def test_author_domains(values: list[str], domains: tuple[str, ...]) -> None:
    assert author_domains(values) == domains


@pytest.mark.parametrize("values", [[], ["a@x.test", "b@x.test"], ["undisclosed"], [""],
                                    ["<>"], ["a@[192.0.2.1]"], ["a@"], ["a@b@c.test"]])
def test_no_single_author_domain(values: list[str]) -> None:
    with pytest.raises(AuthorError):
        author_domains(values)


# --- whole checks -------------------------------------------------------------------------

def test_pass_through_aligned_spf(dns: DnsResponder) -> None:
    result = run(dns, "a@reject.test", spf("bounces.reject.test"))
    assert (result.result, result.spf_aligned, result.dkim_aligned) == ("pass", True, False)
    assert result.disposition == "none"


def test_pass_through_aligned_dkim(dns: DnsResponder) -> None:
    result = run(dns, "a@reject.test",
                 Authenticated("pass", "esp.example", (("fail", "reject.test"),
                                                       ("pass", "mail.reject.test"))))
    assert (result.result, result.spf_aligned, result.dkim_aligned) == ("pass", False, True)


def test_unaligned_passes_fail(dns: DnsResponder) -> None:
    result = run(dns, "a@reject.test",
                 Authenticated("pass", "esp.example", (("pass", "esp.example"),)))
    assert (result.result, result.policy, result.disposition) == ("fail", "reject", "reject")


def test_spf_fail_does_not_align(dns: DnsResponder) -> None:
    assert run(dns, "a@reject.test", spf("reject.test", "softfail")).result == "fail"


@pytest.mark.parametrize(("domain", "disposition"), [
    ("reject.test", "reject"), ("quarantine.test", "quarantine"), ("none.test", "none")])
def test_fail_dispositions(dns: DnsResponder, domain: str, disposition: str) -> None:
    result = run(dns, f"a@{domain}", NOTHING)
    assert (result.result, result.policy, result.disposition) == ("fail", disposition,
                                                                   disposition)


def test_subdomain_policy_from_the_organizational_record(dns: DnsResponder) -> None:
    # No record at _dmarc.mail.parent.test: the org domain's sp=reject applies...
    result = run(dns, "a@mail.parent.test", NOTHING)
    assert (result.result, result.policy, result.from_domain) == ("fail", "reject",
                                                                   "mail.parent.test")
    # ...but not to the org domain itself (p=none),
    assert run(dns, "a@parent.test", NOTHING).policy == "none"
    # and a subdomain with a record of its own uses its own p.
    assert run(dns, "a@own.parent.test", NOTHING).policy == "quarantine"


def test_org_domain_fallback_under_a_multi_label_suffix(dns: DnsResponder) -> None:
    result = run(dns, "a@news.example.co.uk", spf("example.co.uk"))
    assert result.result == "pass"
    assert run(dns, "a@news.example.co.uk", NOTHING).disposition == "reject"


def test_pct_sampling(dns: DnsResponder) -> None:
    # pct=0: the policy is never enforced, reject becomes quarantine (RFC 7489 §6.6.4).
    for draw in (0.0, 0.99):
        result = run(dns, "a@sampled.test", NOTHING, draw)
        assert (result.result, result.policy, result.disposition) == (
            "fail", "reject", "quarantine")


def test_strict_alignment(dns: DnsResponder) -> None:
    assert run(dns, "a@strict.test", spf("mail.strict.test")).result == "fail"
    assert run(dns, "a@strict.test", dkim(("pass", "mail.strict.test"))).result == "fail"
    assert run(dns, "a@strict.test", spf("strict.test")).result == "pass"
    assert run(dns, "a@strict.test", dkim(("pass", "Strict.Test"))).result == "pass"
    # Relaxed (the default) takes the subdomain.
    assert run(dns, "a@reject.test", dkim(("pass", "mail.reject.test"))).result == "pass"


@pytest.mark.parametrize(("domain", "reason"), [
    ("norecord.test", "no DMARC record"),
    ("twice.test", "2 DMARC records"),
    ("invalid.test", "no valid p="),
])
def test_no_policy(dns: DnsResponder, domain: str, reason: str) -> None:
    result = run(dns, f"a@{domain}", NOTHING)
    assert result.result == "none"
    assert reason in result.reason
    assert result.method_result() == MethodResult("dmarc", "none", result.reason,
                                                  (("header.from", domain),))


def test_other_txt_records_are_ignored(dns: DnsResponder) -> None:
    assert run(dns, "a@other-txt.test", NOTHING).disposition == "quarantine"
    assert run(dns, "a@split.test", NOTHING).disposition == "reject"
    assert run(dns, "a@invalid-rua.test", NOTHING).policy == "none"


def test_dns_failure_is_temperror(dns: DnsResponder) -> None:
    result = run(dns, "a@broken.test", spf("broken.test"))
    assert result.result == "temperror"
    assert result.method_result().result == "temperror"


def test_no_single_from_is_permerror(dns: DnsResponder) -> None:
    result = run(dns, ["a@reject.test", "b@reject.test"], NOTHING)
    assert (result.result, result.reason) == ("permerror", "2 From fields")
    assert result.method_result() == MethodResult("dmarc", "permerror", "2 From fields")


def test_several_author_domains_take_the_strictest(dns: DnsResponder) -> None:
    # RFC 7489 §6.6.1: each domain is checked, the strictest failing policy applies.
    result = run(dns, "a@none.test, b@quarantine.test, c@reject.test", spf("reject.test"))
    assert (result.result, result.from_domain, result.disposition) == (
        "fail", "quarantine.test", "quarantine")


def test_method_result() -> None:
    record = DmarcRecord(p="reject", sp="none")
    failed = DmarcResult("fail", "example.test", record=record, policy="reject",
                         disposition="quarantine")
    assert failed.method_result() == MethodResult(
        "dmarc", "fail", "p=reject sp=none dis=quarantine",
        (("header.from", "example.test"), ("policy.dmarc", "quarantine")))
    passed = DmarcResult("pass", "example.test", record=DmarcRecord(p="none"), policy="none")
    assert passed.method_result() == MethodResult(
        "dmarc", "pass", "p=none dis=none", (("header.from", "example.test"),))


def test_an_aligned_identifier_that_could_not_be_checked_is_temperror(dns: DnsResponder) -> None:
    # RFC 7489 §11.2: a later attempt might pass, so no policy is enforced now.
    result = run(dns, "a@reject.test", spf("reject.test", "temperror"))
    assert (result.result, result.disposition) == ("temperror", "none")
    result = run(dns, "a@reject.test", dkim(("temperror", "mail.reject.test")))
    assert result.result == "temperror"
    # Not aligned: it could not have passed DMARC anyway.
    assert run(dns, "a@reject.test", spf("esp.test", "temperror")).result == "fail"
    # A pass elsewhere still passes.
    assert run(dns, "a@reject.test", Authenticated(
        "temperror", "reject.test", (("pass", "reject.test"),))).result == "pass"


@given(st.text(max_size=200))
def test_any_record_text_parses_or_is_refused(text: str) -> None:
    try:
        record = parse_record("v=DMARC1; " + text)
    except RecordError:
        return
    assert record.p in ("none", "quarantine", "reject") and 0 <= record.pct <= 100


@given(st.lists(st.text(max_size=80), max_size=2))
def test_any_from_gives_domains_or_author_error(values: list[str]) -> None:
    try:
        domains = author_domains(values)
    except AuthorError:
        return
    assert domains and all(d and d == d.lower() and d.isascii() for d in domains)

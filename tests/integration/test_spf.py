"""engine.agents.spf against a real DnsResponder through a real Lookup: each result, the
macros of RFC 7208 §7 (the examples of §7.4), the processing limits of §4.6.4 and their
configurable values, DNS failures and timeouts, the HELO and null-sender identities,
IPv4-mapped clients, the cache, and the result cache (SpfCache).  (The RFC 7208 test
suite runs in test_spf_suite.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from engine.agents.dns import Lookup
from engine.agents.spf import (
    Limits,
    SpfCache,
    SpfResult,
    check_helo,
    check_host,
    check_mail_from,
)
from engine.testing.dns import DnsResponder
from engine.testing.wait import until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsResponder]:
    with DnsResponder("") as responder:
        yield responder


def zone(dns: DnsResponder, text: str) -> None:
    dns.set_zone(text)
    dns.servfail.clear()
    dns.drop.clear()
    dns.queries.clear()


def check(dns: DnsResponder, ip: str, domain: str, sender: str = "", helo: str = "",
          *, lookup: Lookup | None = None, **options: Any) -> SpfResult:
    lookup = lookup or Lookup(dns.address, timeout=1.0, lifetime=2.0)
    return asyncio.run(check_host(lookup, ip, domain, sender or f"user@{domain}", helo,
                                  **options))


def txt(name: str, *texts: str) -> str:
    return "".join(f'{name}. 300 IN TXT "{t}"\n' for t in texts)


# --- the seven results -------------------------------------------------------------------

RESULTS_ZONE = (
    txt("example.test", "v=spf1 ip4:192.0.2.0/24 a:mail.example.test ~all")
    + "mail.example.test. 300 IN A 198.51.100.7\n"
    + txt("neutral.test", "v=spf1 ?all")
    + txt("hard.test", "v=spf1 ip4:192.0.2.1 -all exp=why.hard.test")
    + txt("why.hard.test", "%{i} may not send for %{d}, see https://hard.test/spf")
    + txt("broken.test", "v=spf1 ip4:192.0.2.300 -all")
    + txt("other.test", "google-site-verification=abc")
    + txt("down.test", "v=spf1 a:mx.down.test -all")
)


@pytest.mark.parametrize(("ip", "domain", "result", "mechanism"), [
    ("192.0.2.77", "example.test", "pass", "ip4:192.0.2.0/24"),
    ("198.51.100.7", "example.test", "pass", "a:mail.example.test"),
    ("203.0.113.5", "example.test", "softfail", "~all"),
    ("203.0.113.5", "neutral.test", "neutral", "?all"),
    ("203.0.113.5", "hard.test", "fail", "-all"),
    ("203.0.113.5", "broken.test", "permerror", ""),
    ("203.0.113.5", "other.test", "none", ""),
    ("203.0.113.5", "missing.test", "none", ""),
    ("203.0.113.5", "down.test", "temperror", ""),
])
def test_each_result(dns: DnsResponder, ip: str, domain: str, result: str,
                     mechanism: str) -> None:
    zone(dns, RESULTS_ZONE)
    dns.servfail.add("mx.down.test", "A")
    got = check(dns, ip, domain)
    assert (got.result, got.mechanism, got.domain) == (result, mechanism, domain)
    if result in ("permerror", "temperror"):
        assert got.problem
        assert got.reply() is not None


def test_fail_carries_the_exp_explanation_and_its_reply(dns: DnsResponder) -> None:
    zone(dns, RESULTS_ZONE)
    got = check(dns, "203.0.113.5", "hard.test")
    assert got.explanation == "203.0.113.5 may not send for hard.test, see https://hard.test/spf"
    assert got.reply() == (550, "5.7.23", got.explanation)


def test_default_explanation_is_expanded(dns: DnsResponder) -> None:
    zone(dns, txt("plain.test", "v=spf1 -all"))
    got = check(dns, "203.0.113.5", "plain.test")
    assert got.explanation == "203.0.113.5 is not allowed to send mail for plain.test (SPF)"
    custom = check(dns, "203.0.113.5", "plain.test", receiver="mx.ours.test",
                   default_explanation="see https://%{r}/spf?d=%{D}")
    assert custom.explanation == "see https://mx.ours.test/spf?d=plain.test"


# --- macros (RFC 7208 §7.4's examples) ---------------------------------------------------

MACRO_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%%-%_-%-", "%- -%20"),
    ("%{h} %{c} %{r}", "helo.example.org 192.0.2.3 unknown"),
    ("%{S}", "strong-bad%40email.example.com"),
]


@pytest.mark.parametrize(("macro", "expanded"), MACRO_EXAMPLES, ids=[m for m, _ in MACRO_EXAMPLES])
def test_macro_in_explanation(dns: DnsResponder, macro: str, expanded: str) -> None:
    zone(dns, txt("email.example.com", "v=spf1 -all exp=exp.example.com")
         + txt("exp.example.com", macro))
    got = check(dns, "192.0.2.3", "email.example.com", "strong-bad@email.example.com",
                "helo.example.org")
    assert (got.result, got.explanation) == ("fail", expanded)


def test_macro_ipv6_nibbles(dns: DnsResponder) -> None:
    zone(dns, txt("email.example.com", "v=spf1 -all exp=exp.example.com")
         + txt("exp.example.com", "%{ir}.%{v}._spf.%{d2} %{c}"))
    got = check(dns, "2001:db8::cb01", "email.example.com")
    assert got.explanation == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        " 2001:db8::cb01")


def test_macro_in_a_domain_spec_is_what_is_looked_up(dns: DnsResponder) -> None:
    # exists: with the §7.4 example name: the lookup goes to the expanded name.
    zone(dns, txt("email.example.com", "v=spf1 exists:%{ir}.%{v}.%{l1r-}.lp._spf.%{d2} -all")
         + "3.2.0.192.in-addr.strong.lp._spf.example.com. 300 IN A 127.0.0.2\n")
    got = check(dns, "192.0.2.3", "email.example.com", "strong-bad@email.example.com")
    assert (got.result, got.mechanism) == ("pass", "exists:%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}")
    assert dns.count("3.2.0.192.in-addr.strong.lp._spf.example.com", "A") == 1
    other = check(dns, "192.0.2.4", "email.example.com", "strong-bad@email.example.com")
    assert other.result == "fail"


def test_p_macro_prefers_a_validated_name_in_the_domain(dns: DnsResponder) -> None:
    zone(dns, txt("example.test", "v=spf1 -all exp=exp.example.test")
         + txt("exp.example.test", "from %{p}")
         + "9.2.0.192.in-addr.arpa. 300 IN PTR elsewhere.test.\n"
         + "9.2.0.192.in-addr.arpa. 300 IN PTR mx.example.test.\n"
         + "9.2.0.192.in-addr.arpa. 300 IN PTR forged.example.test.\n"
         + "elsewhere.test. 300 IN A 192.0.2.9\n"
         + "mx.example.test. 300 IN A 192.0.2.9\n"
         + "forged.example.test. 300 IN A 192.0.2.200\n")
    assert check(dns, "192.0.2.9", "example.test").explanation == "from mx.example.test"
    assert check(dns, "192.0.2.10", "example.test").explanation == "from unknown"


@pytest.mark.parametrize("record", [
    "v=spf1 a:%{x}.example.test",  # no such letter
    "v=spf1 a:%{c}.example.test",  # c, r, t only in explanations (§7.2)
    "v=spf1 a:%{d0}.example.test",  # the digit transformer must be nonzero
    "v=spf1 a:%{d",  # unterminated
    "v=spf1 a:50%.example.test",  # "%" alone
    "v=spf1 -all foo=%{q}",  # an unknown modifier's value must be a macro-string too
])
def test_macro_syntax_errors_are_permerror(dns: DnsResponder, record: str) -> None:
    zone(dns, txt("example.test", record))
    got = check(dns, "192.0.2.1", "example.test")
    assert got.result == "permerror"
    assert "RFC 7208 section 7" in got.problem


def test_long_expansion_is_truncated_on_the_left(dns: DnsResponder) -> None:
    # §7.3: labels leave from the left until the name fits 253 characters.
    local = ".".join(["x" * 60] * 5)  # 304 characters
    zone(dns, txt("example.test", "v=spf1 exists:%{l}.example.test -all")
         + f"{'.'.join(['x' * 60] * 3)}.example.test. 300 IN A 127.0.0.2\n")
    got = check(dns, "192.0.2.1", "example.test", f"{local}@example.test")
    assert got.result == "pass"


# --- processing limits (§4.6.4) -----------------------------------------------------------


def terms_zone(count: int) -> str:
    record = " ".join(f"a:h{i}.example.test" for i in range(count))
    hosts = "".join(f"h{i}.example.test. 300 IN A 198.51.100.{i + 1}\n" for i in range(count))
    return txt("example.test", f"v=spf1 {record} ip4:192.0.2.1 -all") + hosts


def test_ten_dns_terms_are_allowed_eleven_are_a_permerror(dns: DnsResponder) -> None:
    zone(dns, terms_zone(10))
    assert check(dns, "192.0.2.1", "example.test").result == "pass"
    zone(dns, terms_zone(11))
    got = check(dns, "192.0.2.1", "example.test")
    assert got.result == "permerror"
    assert "more than 10 DNS-querying terms" in got.problem
    assert got.reply() == (550, "5.7.24", f"SPF permanent error in the policy of "
                                          f"example.test: {got.problem}")


def test_dns_term_limit_counts_includes_and_redirects(dns: DnsResponder) -> None:
    # The count spans the whole check: 5 in the first record, the include, 5 more there.
    inner = " ".join(f"a:h{i}.example.test" for i in range(5))
    zone(dns, terms_zone(5).replace("ip4:192.0.2.1", "include:inner.example.test ip4:192.0.2.1")
         + txt("inner.example.test", f"v=spf1 {inner} ?all"))
    got = check(dns, "192.0.2.1", "example.test")
    assert got.result == "permerror"


def test_dns_term_limit_is_configurable(dns: DnsResponder) -> None:
    zone(dns, terms_zone(3))
    assert check(dns, "192.0.2.1", "example.test", limits=Limits(dns_terms=3)).result == "pass"
    got = check(dns, "192.0.2.1", "example.test", limits=Limits(dns_terms=2))
    assert (got.result, "more than 2 DNS-querying terms" in got.problem) == ("permerror", True)


def mx_zone(count: int) -> str:
    mx = "".join(f"example.test. 300 IN MX {i} mx{i}.example.test.\n" for i in range(count))
    hosts = "".join(f"mx{i}.example.test. 300 IN A 192.0.2.{i + 1}\n" for i in range(count))
    return txt("example.test", "v=spf1 mx -all") + mx + hosts


def test_ten_mx_names_are_allowed_eleven_are_a_permerror(dns: DnsResponder) -> None:
    zone(dns, mx_zone(10))
    assert check(dns, "192.0.2.10", "example.test").result == "pass"
    zone(dns, mx_zone(11))
    got = check(dns, "192.0.2.1", "example.test")
    assert (got.result, "11 MX records" in got.problem) == ("permerror", True)
    assert check(dns, "192.0.2.1", "example.test",
                 limits=Limits(mx_names=11)).result == "pass"


def test_only_ten_ptr_names_are_validated(dns: DnsResponder) -> None:
    # Twelve PTR names inside the target domain, none of which validates: exactly ten
    # forward lookups (which ten depends on the order the server sends them in).
    names = [f"p{i}.example.test" for i in range(12)]
    zone(dns, txt("example.test", "v=spf1 ptr -all")
         + "".join(f"1.2.0.192.in-addr.arpa. 300 IN PTR {n}.\n" for n in names)
         + "".join(f"{n}. 300 IN A 198.51.100.1\n" for n in names))
    assert check(dns, "192.0.2.1", "example.test").result == "fail"
    assert sum(dns.count(n, "A") for n in names) == 10
    zone(dns, txt("example.test", "v=spf1 ptr -all")
         + "".join(f"1.2.0.192.in-addr.arpa. 300 IN PTR {n}.\n" for n in names)
         + "".join(f"{n}. 300 IN A 198.51.100.1\n" for n in names))
    assert check(dns, "192.0.2.1", "example.test", limits=Limits(ptr_names=3)).result == "fail"
    assert sum(dns.count(n, "A") for n in names) == 3


def void_zone(count: int) -> str:
    record = " ".join(f"a:gone{i}.example.test" for i in range(count))
    return txt("example.test", f"v=spf1 {record} ?all")


def test_two_void_lookups_are_allowed_three_are_a_permerror(dns: DnsResponder) -> None:
    zone(dns, void_zone(2))
    assert check(dns, "192.0.2.1", "example.test").result == "neutral"
    zone(dns, void_zone(3))
    got = check(dns, "192.0.2.1", "example.test")
    assert (got.result, "more than 2 void lookups" in got.problem) == ("permerror", True)
    zone(dns, void_zone(1))
    assert check(dns, "192.0.2.1", "example.test",
                 limits=Limits(void_lookups=0)).result == "permerror"


def test_elapsed_time_limit_gives_temperror(dns: DnsResponder) -> None:
    zone(dns, txt("example.test", "v=spf1 a:slow.example.test -all"))
    dns.drop.add("slow.example.test")
    lookup = Lookup(dns.address, timeout=5.0, lifetime=10.0)
    got = check(dns, "192.0.2.1", "example.test", lookup=lookup, limits=Limits(timeout=0.3))
    assert got.result == "temperror"
    assert "no result within 0.3 s" in got.problem


# --- DNS failures ---------------------------------------------------------------------------


def test_a_dns_timeout_is_a_temperror(dns: DnsResponder) -> None:
    zone(dns, txt("example.test", "v=spf1 a:slow.example.test -all"))
    dns.drop.add("slow.example.test", "A")
    got = check(dns, "192.0.2.1", "example.test",
                lookup=Lookup(dns.address, timeout=0.2, lifetime=0.4))
    assert got.result == "temperror"
    assert got.reply() == (451, "4.7.24",
                           "SPF temporary error checking example.test, try again later")


def test_servfail_on_the_record_is_a_temperror(dns: DnsResponder) -> None:
    zone(dns, txt("example.test", "v=spf1 -all"))
    dns.servfail.add("example.test", "TXT")
    assert check(dns, "192.0.2.1", "example.test").result == "temperror"


def test_mx_match_wins_over_a_failing_mx_host(dns: DnsResponder) -> None:
    # The MX hosts are looked up side by side: one failing does not hide another's match.
    zone(dns, txt("example.test", "v=spf1 mx -all")
         + "example.test. 300 IN MX 10 bad.example.test.\n"
         + "example.test. 300 IN MX 20 good.example.test.\n"
         + "good.example.test. 300 IN A 192.0.2.1\n")
    dns.servfail.add("bad.example.test", "A")
    assert check(dns, "192.0.2.1", "example.test").result == "pass"
    assert check(dns, "192.0.2.2", "example.test").result == "temperror"


# --- identities and addresses ----------------------------------------------------------------


def test_null_sender_checks_postmaster_at_helo(dns: DnsResponder) -> None:
    zone(dns, txt("mta.example.test", "v=spf1 -all exp=e.example.test")
         + txt("e.example.test", "%{s} %{l} %{o}"))
    lookup = Lookup(dns.address, timeout=1.0, lifetime=2.0)
    got = asyncio.run(check_mail_from(lookup, "192.0.2.1", "", "mta.example.test"))
    assert (got.result, got.domain, got.sender) == (
        "fail", "mta.example.test", "postmaster@mta.example.test")
    assert got.explanation == "postmaster@mta.example.test postmaster mta.example.test"
    assert got.method_result("mailfrom").props == (("smtp.mailfrom", "mta.example.test"),)


def test_helo_identity(dns: DnsResponder) -> None:
    zone(dns, txt("mta.example.test", "v=spf1 a -all") + "mta.example.test. 300 IN A 192.0.2.1\n")
    lookup = Lookup(dns.address, timeout=1.0, lifetime=2.0)
    got = asyncio.run(check_helo(lookup, "192.0.2.1", "mta.example.test"))
    assert (got.result, got.mechanism) == ("pass", "a")
    result = got.method_result("helo")
    assert (result.method, result.result, result.props) == (
        "spf", "pass", (("smtp.helo", "mta.example.test"),))
    for helo in ("[192.0.2.1]", "localhost", ""):
        assert asyncio.run(check_helo(lookup, "192.0.2.1", helo)).result == "none"


def test_ipv4_mapped_client_is_ipv4(dns: DnsResponder) -> None:
    zone(dns, txt("example.test", "v=spf1 ip6:::ffff:0:0/96 ip4:192.0.2.0/24 -all"))
    got = check(dns, "::ffff:192.0.2.1", "example.test")
    assert (got.result, got.mechanism) == ("pass", "ip4:192.0.2.0/24")


def test_answers_come_from_the_shared_cache(dns: DnsResponder) -> None:
    zone(dns, terms_zone(3))
    lookup = Lookup(dns.address, timeout=1.0, lifetime=2.0)
    assert check(dns, "192.0.2.1", "example.test", lookup=lookup).result == "pass"
    sent = lookup.queries
    assert sent == 4  # the record and three A lookups
    assert check(dns, "192.0.2.1", "example.test", lookup=lookup).result == "pass"
    assert lookup.queries == sent


def test_internationalized_domain_is_checked_in_a_labels(dns: DnsResponder) -> None:
    zone(dns, txt("xn--bcher-kva.example", "v=spf1 ip4:192.0.2.1 -all"))
    lookup = Lookup(dns.address, timeout=1.0, lifetime=2.0)
    got = asyncio.run(check_mail_from(lookup, "192.0.2.1", "<info@bücher.example>", "mta"))
    assert (got.result, got.domain) == ("pass", "xn--bcher-kva.example")


# --- the result cache (SpfCache) ---------------------------------------------------------


class Clock:
    """The Lookup's clock, moved by hand: the cache expires on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cached_lookup(dns: DnsResponder, clock: Clock) -> Lookup:
    return Lookup(dns.address, timeout=1.0, lifetime=2.0, clock=clock)


CACHE_ZONE = ('example.test. 300 IN TXT "v=spf1 a:mail.example.test -all"\n'
              "mail.example.test. 60 IN A 192.0.2.1\n")


def test_result_cache_answers_the_same_inputs_without_evaluating(dns: DnsResponder) -> None:
    zone(dns, CACHE_ZONE)
    clock = Clock()
    cache = SpfCache(cached_lookup(dns, clock), 100)

    async def run() -> None:
        first = await cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")
        assert (first.result, cache.hits, len(cache)) == ("pass", 0, 1)
        queries = len(dns.queries)
        again = await cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")
        assert again == first
        assert cache.hits == 1
        assert len(dns.queries) == queries
        # Any other input is another key: evaluated, and kept beside the first.
        other = await cache.check_mail_from("192.0.2.2", "a@example.test", "mta.example.test")
        assert (other.result, cache.hits, len(cache)) == ("fail", 1, 2)
        await cache.check_mail_from("192.0.2.1", "b@example.test", "mta.example.test")
        await cache.check_mail_from("192.0.2.1", "a@example.test", "other.example.test")
        assert (cache.hits, len(cache)) == (1, 4)

    asyncio.run(run())


def test_result_cache_expires_with_the_first_answer_it_came_from(dns: DnsResponder) -> None:
    # The record lives 300 s, the A record it names 60 s: the result lives 60 s.
    zone(dns, CACHE_ZONE)
    clock = Clock()
    cache = SpfCache(cached_lookup(dns, clock), 100)

    async def result() -> str:
        got = await cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")
        return got.result

    async def run() -> None:
        assert await result() == "pass"
        # The host moves: the DNS changes, the TTL has not run out yet.
        dns.set_zone(CACHE_ZONE.replace("192.0.2.1", "192.0.2.99"))
        clock.now += 59
        assert await result() == "pass"
        assert cache.hits == 1
        clock.now += 2  # past the A record's 60 s: evaluated again, on the new answer
        assert await result() == "fail"
        assert cache.hits == 1

    asyncio.run(run())


def test_result_cache_is_bounded_least_recently_used_first(dns: DnsResponder) -> None:
    zone(dns, CACHE_ZONE)
    cache = SpfCache(cached_lookup(dns, Clock()), 2)

    async def run() -> None:
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            await cache.check_mail_from(ip, "a@example.test", "mta.example.test")
        assert len(cache) == 2
        assert cache.get("192.0.2.1", "a@example.test", "mta.example.test") is None
        assert cache.get("192.0.2.3", "a@example.test", "mta.example.test") is not None

    asyncio.run(run())


def test_result_cache_off_keeps_nothing(dns: DnsResponder) -> None:
    zone(dns, CACHE_ZONE)
    cache = SpfCache(cached_lookup(dns, Clock()), 0)

    async def run() -> None:
        for _ in range(2):
            got = await cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")
            assert got.result == "pass"
        assert (len(cache), cache.hits) == (0, 0)

    asyncio.run(run())


def test_concurrent_checks_of_the_same_inputs_share_one_evaluation(dns: DnsResponder) -> None:
    # A bulk sender's first sessions arrive together, before any result is kept: one
    # evaluation serves them all (the very same result), with the cache on or off.
    zone(dns, CACHE_ZONE)

    async def run(size: int) -> tuple[set[int], set[str]]:
        cache = SpfCache(cached_lookup(dns, Clock()), size)
        got = await asyncio.gather(*(
            cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")
            for _ in range(10)))
        other = await cache.check_mail_from("192.0.2.2", "a@example.test", "mta.example.test")
        return {id(r) for r in got}, {r.result for r in (*got, other)}

    for size in (100, 0):
        ids, results = asyncio.run(run(size))
        assert (len(ids), results) == (1, {"pass", "fail"})


def test_a_shared_evaluation_stops_when_its_last_caller_gives_up(dns: DnsResponder) -> None:
    zone(dns, CACHE_ZONE.replace("mail.example.test", "slow.example.test"))
    dns.drop.add("slow.example.test")  # never answered: the evaluation waits
    cache = SpfCache(Lookup(dns.address, timeout=5.0, lifetime=5.0), 100)

    async def check() -> SpfResult:
        return await cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")

    async def run() -> tuple[bool, bool, bool]:
        first, second = asyncio.ensure_future(check()), asyncio.ensure_future(check())
        await until(lambda: [s.waiting for s in cache._running.values()] == [2], 5,
                    "both checks waiting on the one evaluation")
        [shared] = [s.task for s in cache._running.values()]
        first.cancel()
        await asyncio.wait([first], timeout=1.0)
        kept = not shared.done()  # the other caller still waits for it
        second.cancel()
        await asyncio.wait([second, shared], timeout=1.0)
        # A check now starts afresh rather than await the cancelled evaluation.
        third = asyncio.ensure_future(check())
        fresh = await until(lambda: [s.task for s in cache._running.values()] not in ([], [shared]),
                            5, "a new evaluation for the third check")
        third.cancel()
        await asyncio.wait([third], timeout=1.0)
        return kept, shared.cancelled(), fresh

    assert asyncio.run(run()) == (True, True, True)


@pytest.mark.parametrize(("text", "result"), [
    # A DNS failure is retried for the next message, not remembered.
    ('example.test. 300 IN TXT "v=spf1 a:down.example.test -all"\n', "temperror"),
    # %{t} reads the clock: the explanation differs from second to second.
    ('example.test. 300 IN TXT "v=spf1 -all exp=why.example.test"\n'
     'why.example.test. 300 IN TXT "refused at %{t}"\n', "fail"),
])  # fmt: skip
def test_result_cache_keeps_no_temperror_and_no_clock_reading(dns: DnsResponder, text: str,
                                                              result: str) -> None:
    zone(dns, text)
    dns.servfail.add("down.example.test", "A")
    cache = SpfCache(cached_lookup(dns, Clock()), 100)

    async def run() -> None:
        got = await cache.check_mail_from("192.0.2.1", "a@example.test", "mta.example.test")
        assert got.result == result
        assert len(cache) == 0

    asyncio.run(run())

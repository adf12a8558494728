"""engine.agents.spf without the network: the result values, the SMTP replies (RFC 7372
§3.2), the RFC 8601 resinfo, the limits' defaults, and the domains that give "none" before
any lookup (RFC 7208 §4.3).  The evaluation itself runs against a DNS responder in
tests/integration/test_spf.py and test_spf_suite.py."""

from __future__ import annotations

import asyncio

import pytest

from engine.agents.dns import Lookup
from engine.agents.spf import (
    DEFAULT_LIMITS,
    RESULTS,
    SpfResult,
    check_host,
    check_mail_from,
    smtp_reply,
)


def test_limits_default_to_rfc_7208_values() -> None:
    assert (DEFAULT_LIMITS.dns_terms, DEFAULT_LIMITS.mx_names, DEFAULT_LIMITS.ptr_names,
            DEFAULT_LIMITS.void_lookups) == (10, 10, 10, 2)
    assert DEFAULT_LIMITS.timeout >= 20  # §4.6.4: "at least 20 seconds"


@pytest.mark.parametrize(("result", "reply"), [
    (SpfResult("fail", "example.test", explanation="not from here"),
     (550, "5.7.23", "not from here")),
    (SpfResult("fail", "example.test"), (550, "5.7.23", "SPF fail for example.test")),
    (SpfResult("temperror", "example.test", problem="DNS error"),
     (451, "4.7.24", "SPF temporary error checking example.test, try again later")),
    (SpfResult("permerror", "example.test", problem="bad record"),
     (550, "5.7.24", "SPF permanent error in the policy of example.test: bad record")),
])
def test_smtp_replies(result: SpfResult, reply: tuple[int, str, str]) -> None:
    assert smtp_reply(result) == reply == result.reply()


@pytest.mark.parametrize("name", ["pass", "none", "neutral", "softfail"])
def test_no_reply_for_results_that_are_not_refused(name: str) -> None:
    assert SpfResult(name, "example.test").reply() is None  # type: ignore[arg-type]


def test_reply_text_is_printable_ascii_and_bounded() -> None:
    nasty = SpfResult("fail", "example.test", explanation="a\r\nb\x00c\u00e9" + "x" * 1000)
    reply = nasty.reply()
    assert reply is not None
    text = reply[2]
    assert text.startswith("a??b?c?")
    assert all(" " <= c <= "~" for c in text) and len(text) <= 400


def test_method_result_scopes() -> None:
    result = SpfResult("softfail", "example.test", "user@example.test", "mta.example.org")
    mailfrom = result.method_result("mailfrom")
    assert (mailfrom.method, mailfrom.result, mailfrom.prop("smtp.mailfrom")) == (
        "spf", "softfail", "example.test")
    helo = result.method_result("helo")
    assert helo.props == (("smtp.helo", "mta.example.org"),)
    broken = SpfResult("permerror", "example.test", problem="two records")
    assert broken.method_result().reason == "two records"
    assert set(RESULTS) == {"none", "neutral", "pass", "fail", "softfail", "temperror",
                            "permerror"}


@pytest.mark.parametrize("domain", [
    "localhost", "[192.0.2.1]", "a..example.test", "x" * 64 + ".example.test",
    ".".join(["abcdefgh"] * 30), "bad domain.test", "", ".",
])
def test_malformed_domain_is_none_without_a_lookup(domain: str) -> None:
    # A Lookup at a port nobody answers: any query would be a temperror, not "none".
    lookup = Lookup(("127.0.0.1", 9), timeout=0.2, lifetime=0.2)
    result = asyncio.run(check_host(lookup, "192.0.2.1", domain, f"user@{domain}"))
    assert result.result == "none"
    assert lookup.queries == 0


def test_sender_forms() -> None:
    lookup = Lookup(("127.0.0.1", 9), timeout=0.2, lifetime=0.2)
    # §4.3: no local part → postmaster; §2.4: null reverse-path → postmaster@helo.
    assert asyncio.run(check_host(lookup, "192.0.2.1", "x", "@x")).sender == "postmaster@x"
    null = asyncio.run(check_mail_from(lookup, "192.0.2.1", "<>", "helo"))
    assert (null.sender, null.domain) == ("postmaster@helo", "helo")
    assert lookup.queries == 0

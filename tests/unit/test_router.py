"""engine.routing.router: address spaces, costs, ties, failover, local domains, literals.

Every route here is built without DNS: smarthosts and LMTP servers are IP addresses, and
the resolver points at a port nothing listens on.  MX routes are in
tests/integration/test_mx.py, against a real DNS responder.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from engine.config import Config, load_config
from engine.routing.api import Host, Route, RouteError
from engine.routing.mx import MxResolver
from engine.routing.router import (
    DESTINATIONS,
    LOCAL_PREFIX,
    ConfiguredRouter,
    accepted_domains,
    match_rank,
)

# Nothing listens on the discard port; a test that reached DNS would fail with a timeout.
NO_DNS = ("127.0.0.1", 9)


def config(tmp_path: Path, text: str, flags: dict[str, object] | None = None) -> Config:
    path = tmp_path / "ferry.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, flags)


def router(tmp_path: Path, text: str, flags: dict[str, object] | None = None) -> ConfiguredRouter:
    cfg = config(tmp_path, text, flags)
    return ConfiguredRouter(cfg, MxResolver(NO_DNS, timeout=0.2, lifetime=0.2))


def resolve(r: ConfiguredRouter, destination: str, exclude: frozenset[str] = frozenset()) -> Route:
    return asyncio.run(r.resolve(destination, exclude))


def send(name: str, spaces: str, cost: int = 1, smarthost: str = "") -> str:
    hosts = f'smarthosts = ["{smarthost}"]\n' if smarthost else ""
    return f'[[send]]\nname = "{name}"\naddress_spaces = {spaces}\ncost = {cost}\n{hosts}'


# --- address spaces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "domain", "rank"),
    [
        ("*", "example.com", (0, 0)),
        ("*", "[192.0.2.1]", (0, 0)),
        ("example.com", "example.com", (2, 0)),
        ("example.com", "a.example.com", None),
        ("example.com", "badexample.com", None),
        ("*.example.com", "example.com", (1, 11)),
        ("*.example.com", "a.b.example.com", (1, 11)),
        ("*.example.com", "badexample.com", None),
        ("*.example.com", "example.com.evil", None),
        ("*.b.example.com", "a.b.example.com", (1, 13)),
        ("*.example.com", "[192.0.2.1]", None),
    ],
)
def test_match_rank(space: str, domain: str, rank: tuple[int, int] | None) -> None:
    assert match_rank(space, domain) == rank


SPACES = (
    send("exact", '["a.example"]', cost=9)
    + send("deep", '["*.b.a.example"]', cost=5)
    + send("wide", '["*.a.example"]', cost=1)
    + send("any", '["*"]', cost=1)
)


@pytest.mark.parametrize(
    ("domain", "name"),
    [
        ("a.example", "exact"),  # exact beats a cheaper "*.a.example"
        ("x.a.example", "wide"),
        ("b.a.example", "deep"),  # the longer suffix wins though it costs more
        ("c.b.a.example", "deep"),
        ("other.example", "any"),
        ("[192.0.2.1]", "any"),
    ],
)
def test_most_specific_address_space_wins(tmp_path: Path, domain: str, name: str) -> None:
    r = router(tmp_path, SPACES)
    assert {r.choose(domain).name for _ in range(20)} == {name}


def test_lowest_cost_wins(tmp_path: Path) -> None:
    r = router(tmp_path, send("dear", '["*"]', cost=3) + send("cheap", '["*"]', cost=2))
    assert {r.choose("x.example").name for _ in range(50)} == {"cheap"}


def test_equal_costs_share_the_load(tmp_path: Path) -> None:
    text = send("one", '["*"]', 2) + send("two", '["*"]', 2) + send("three", '["*"]', 3)
    r = router(tmp_path, text)
    picks = Counter(r.choose("x.example").name for _ in range(400))
    assert set(picks) == {"one", "two"}
    assert min(picks.values()) > 100  # about half each


def test_exclude_fails_over_to_the_next_cheapest(tmp_path: Path) -> None:
    text = send("a", '["*"]', 1) + send("b", '["*"]', 2) + send("c", '["*"]', 3)
    r = router(tmp_path, text)
    assert r.choose("x.example", frozenset({"a"})).name == "b"
    assert r.choose("x.example", frozenset({"a", "b"})).name == "c"
    with pytest.raises(RouteError) as info:
        r.choose("x.example", frozenset({"a", "b", "c"}))
    assert (info.value.permanent, info.value.code, info.value.enhanced) == (False, 451, "4.4.4")
    assert "every send connector" in info.value.text


def test_a_failed_connector_is_skipped_until_its_mark_ends(tmp_path: Path) -> None:
    # Exchange's failover: the next-cheapest connector of the match takes the mail while
    # the cheaper one is marked, and the cheaper one is chosen again once the mark ends.
    clock = [1000.0]
    cfg = config(tmp_path, send("a", '["*"]', 1, "192.0.2.1:25")
                 + send("b", '["*"]', 2, "192.0.2.2:25")
                 + send("partner", '["partner.example"]', 1, "192.0.2.3:25"))
    r = ConfiguredRouter(cfg, MxResolver(NO_DNS, timeout=0.2, lifetime=0.2),
                         clock=lambda: clock[0])
    r.connector_failed("a", 1030.0)
    assert {r.choose("x.example").name for _ in range(20)} == {"b"}
    # A mark never leaves mail without a route: with every connector of its match
    # marked, the cheapest is chosen as usual (the site's down mark holds its mail).
    r.connector_failed("partner", 1030.0)
    assert r.choose("partner.example").name == "partner"
    r.connector_failed("b", 1030.0)
    assert r.choose("x.example").name == "a"
    clock[0] = 1030.0
    r.connector_failed("b", 1060.0)
    assert {r.choose("x.example").name for _ in range(20)} == {"a"}
    assert r.choose("x.example", frozenset({"a"})).name == "b"  # exclude still skips


def test_an_mx_connector_is_never_marked_failed(tmp_path: Path) -> None:
    # Its hosts are one destination's MX hosts: a dead domain says nothing about the
    # connector's other domains, so they keep the cheaper connector.
    r = router(tmp_path, send("mx", '["*"]', 1) + send("relay", '["*"]', 2, "192.0.2.1:25"))
    r.connector_failed("mx", 2e9)
    assert {r.choose("x.example").name for _ in range(20)} == {"mx"}


def test_failover_stays_with_the_most_specific_connectors(tmp_path: Path) -> None:
    # A partner's connector is down: its mail waits, it is not sent by the general route.
    r = router(tmp_path, send("partner", '["partner.example"]') + send("any", '["*"]'))
    with pytest.raises(RouteError) as info:
        r.choose("partner.example", frozenset({"partner"}))
    assert not info.value.permanent and "'partner'" in info.value.text
    assert r.choose("other.example", frozenset({"partner"})).name == "any"


def test_no_matching_connector_is_temporary(tmp_path: Path) -> None:
    r = router(tmp_path, send("partner", '["partner.example"]'))
    with pytest.raises(RouteError) as info:
        asyncio.run(r.resolve("other.example"))
    assert (info.value.permanent, info.value.code, info.value.enhanced) == (False, 451, "4.4.4")


# --- implicit connectors --------------------------------------------------------------------


def test_default_is_one_mx_connector(tmp_path: Path) -> None:
    r = router(tmp_path, "")
    (only,) = r.connectors
    assert (only.name, only.address_spaces, only.smarthosts) == ("", ("*",), ())
    assert r.choose("anything.example").name == ""


def test_smarthost_flag_is_the_cheapest_star_connector(tmp_path: Path) -> None:
    text = send("any", '["*"]', 1, "192.0.2.9:25") + send("p", '["partner.example"]', 5)
    r = router(tmp_path, text, {"--smarthost": "192.0.2.1:2525"})
    assert {r.choose("x.example").name for _ in range(20)} == {"delivery.smarthost"}
    assert r.choose("partner.example").name == "p"  # a more specific space still wins
    assert r.choose("x.example", frozenset({"delivery.smarthost"})).name == "any"
    route = resolve(r, "x.example")
    assert route.site == "smarthost:192.0.2.1:2525"
    assert route.hosts == (Host("192.0.2.1", "192.0.2.1", 2525, 0),)
    assert route.connector == "delivery.smarthost"


def test_smarthost_without_send_replaces_mx(tmp_path: Path) -> None:
    r = router(tmp_path, '[delivery]\nsmarthost = "[2001:db8::25]:587"\n')
    assert [c.name for c in r.connectors] == ["delivery.smarthost"]
    route = resolve(r, "x.example")
    assert route.site == "smarthost:[2001:db8::25]:587"
    assert route.hosts == (Host("2001:db8::25", "2001:db8::25", 587, 0),)


# --- smarthost routes -----------------------------------------------------------------------


def test_smarthost_route(tmp_path: Path) -> None:
    text = """
[[send]]
name = "relay"
address_spaces = ["*"]
smarthosts = ["192.0.2.1:587", "192.0.2.2"]
tls = "verify"
auth_user = "app"
auth_password = "s3cret"
protocol = "lmtp"
"""
    route = resolve(router(tmp_path, text), "Example.COM.")
    assert route == Route(
        destination="Example.COM.",
        site="smarthost:192.0.2.1:587,192.0.2.2:25",
        hosts=(Host("192.0.2.1", "192.0.2.1", 587, 0), Host("192.0.2.2", "192.0.2.2", 25, 1)),
        protocol="lmtp",
        tls="verify",
        auth=("app", "s3cret"),
        connector="relay",
    )


@pytest.mark.parametrize(
    ("tls", "plaintext", "expected"),
    [
        ("opportunistic", "false", "required"),  # AUTH only over TLS (RFC 4954 §4)
        ("opportunistic", "true", "opportunistic"),
        ("off", "true", "off"),
        ("required", "false", "required"),
        ("verify", "false", "verify"),
    ],
)
def test_auth_raises_tls(tmp_path: Path, tls: str, plaintext: str, expected: str) -> None:
    text = (send("r", '["*"]', 1, "192.0.2.1:25")
            + f'tls = "{tls}"\nauth_user = "u"\nauth_password = "p"\n'
            + f"allow_plaintext_auth = {plaintext}\n")  # fmt: skip
    assert resolve(router(tmp_path, text), "x.example").tls == expected


def test_no_auth_keeps_opportunistic(tmp_path: Path) -> None:
    route = resolve(router(tmp_path, send("r", '["*"]', 1, "192.0.2.1:25")), "x.example")
    assert (route.tls, route.auth) == ("opportunistic", None)


def test_unresolvable_smarthost_defers(tmp_path: Path) -> None:
    # Nothing answers DNS here: the smarthost's name cannot be resolved → 4xx, not 5xx.
    r = router(tmp_path, send("r", '["*"]', 1, "relay.invalid:25"))
    with pytest.raises(RouteError) as info:
        resolve(r, "x.example")
    assert (info.value.permanent, info.value.code) == (False, 451)
    assert "'r'" in info.value.text


# --- local domains --------------------------------------------------------------------------


LOCAL = """
[[local]]
domains = ["example.com", "*.corp.example"]
maildir = "/var/mail/{domain}/{local}"

[[local]]
domains = ["lists.example"]
lmtp = "127.0.0.1:24"
"""


@pytest.mark.parametrize(
    ("domain", "destination"),
    [
        ("Example.COM.", "local:example.com"),
        ("corp.example", "local:corp.example"),
        ("a.b.corp.example", "local:a.b.corp.example"),
        ("lists.example", "local:lists.example"),
        ("sub.example.com", "sub.example.com"),  # "example.com" does not cover subdomains
        ("notcorp.example", "notcorp.example"),
        ("Other.Example.", "other.example"),
    ],
)
def test_destination(tmp_path: Path, domain: str, destination: str) -> None:
    assert router(tmp_path, LOCAL).destination(domain) == destination


def test_destinations_are_kept_and_bounded(tmp_path: Path) -> None:
    # Kept: asked again, the same answer as worked out afresh; a flood of domains (more
    # than the router keeps) leaves the answers right and the memory bounded.
    r = router(tmp_path, LOCAL)
    domains = ["Example.COM.", "corp.example", "[192.0.2.1]", "[IPv6:2001:DB8::1]", "",
               "x.example", "X.Example"] + [f"d{i}.example" for i in range(DESTINATIONS + 50)]
    for _ in range(2):
        for domain in domains:
            assert r.destination(domain) == r._destination(domain)
        assert len(r._destinations) <= DESTINATIONS


def test_local_maildir_route(tmp_path: Path) -> None:
    r = router(tmp_path, LOCAL)
    route = resolve(r, "local:a.corp.example")
    assert route.protocol == "maildir" and route.maildir == "/var/mail/{domain}/{local}"
    assert route.hosts == () and route.destination == "local:a.corp.example"
    assert route.site == "maildir:/var/mail/{domain}/{local}"


def test_local_lmtp_route(tmp_path: Path) -> None:
    route = resolve(router(tmp_path, LOCAL), "local:lists.example")
    assert route.protocol == "lmtp"
    assert route.hosts == (Host("127.0.0.1", "127.0.0.1", 24, 0),)
    assert route.site == "lmtp:127.0.0.1:24"


def test_configuration_at_resolve_time_decides(tmp_path: Path) -> None:
    # Queued as local, the domain is no longer local: it goes out by the send connector.
    r = router(tmp_path, send("out", '["*"]', 1, "192.0.2.1:25"))
    assert resolve(r, LOCAL_PREFIX + "example.com").connector == "out"
    # Queued for the world, the domain has become local: it is delivered here.
    assert resolve(router(tmp_path, LOCAL), "example.com").protocol == "maildir"


def test_local_domains_are_accepted_from_anyone(tmp_path: Path) -> None:
    cfg = config(tmp_path, 'accepted_domains = ["relay.example", "example.com"]\n' + LOCAL)
    assert accepted_domains(cfg) == (
        "relay.example", "example.com", "*.corp.example", "lists.example",
    )  # fmt: skip


def test_empty_domain_is_our_hostname(tmp_path: Path) -> None:
    r = router(tmp_path, 'hostname = "MX.Example.COM"\n' + LOCAL)
    assert r.destination("") == "mx.example.com"
    r = router(tmp_path, 'hostname = "example.com"\n' + LOCAL)
    assert r.destination("") == "local:example.com"


# --- address literals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "destination"),
    [
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8:0::1]", "[IPv6:2001:db8::1]"),
        ("[ipv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("[not an address]", "[not an address]"),
    ],
)
def test_literal_destination(tmp_path: Path, domain: str, destination: str) -> None:
    assert router(tmp_path, LOCAL).destination(domain) == destination


def test_literal_goes_to_its_address(tmp_path: Path) -> None:
    r = router(tmp_path, "[delivery]\nmx_port = 2525\n")
    route = resolve(r, "[192.0.2.7]")
    assert route.hosts == (Host("192.0.2.7", "192.0.2.7", 2525, 0),)
    assert route.site == "literal:192.0.2.7:2525"
    route = resolve(r, "[IPv6:2001:db8::7]")
    assert route.hosts == (Host("2001:db8::7", "2001:db8::7", 2525, 0),)


def test_literal_through_a_smarthost(tmp_path: Path) -> None:
    route = resolve(router(tmp_path, send("r", '["*"]', 1, "192.0.2.1:25")), "[192.0.2.7]")
    assert route.hosts == (Host("192.0.2.1", "192.0.2.1", 25, 0),)


def test_literal_needs_a_star_connector(tmp_path: Path) -> None:
    r = router(tmp_path, send("p", '["*.example"]', 1, "192.0.2.1:25"))
    with pytest.raises(RouteError) as info:
        resolve(r, "[192.0.2.7]")
    assert info.value.enhanced == "4.4.4"


@pytest.mark.parametrize("destination", ["[300.1.1.1]", "[IPv6:nope]", "[192.0.2.1", ""])
def test_bad_literal_is_permanent(tmp_path: Path, destination: str) -> None:
    with pytest.raises(RouteError) as info:
        resolve(router(tmp_path, ""), destination)
    assert (info.value.permanent, info.value.code) == (True, 550)

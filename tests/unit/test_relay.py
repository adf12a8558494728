"""Relay control (engine.agents.relay): a table of clients and recipients, the accepted
domain matcher, the configuration errors, and recipients parsed from real RCPT lines."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network, IPv6Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.agents.relay import S554_RELAY_DENIED, RelayPolicy
from engine.protocol.command import parse_command

DENIED = (554, "5.7.1", "Relay access denied")

ACCEPTED = ["example.com", "Example.ORG.", "*.sub.example.net"]
NETWORKS: list[IPv4Network | IPv6Network] = [
    IPv4Network("10.0.0.0/8"),
    IPv6Network("2001:db8::/32"),
    # An IPv4 network written in its IPv4-mapped IPv6 form stands for 192.168.0.0/16.
    IPv6Network("::ffff:192.168.0.0/112"),
]
POLICY = RelayPolicy(ACCEPTED, NETWORKS)
NO_AUTH_RELAY = RelayPolicy(ACCEPTED, NETWORKS, relay_authenticated=False)

OUTSIDE = "198.51.100.7"

# (id, policy, local, domain, client ip, authenticated, accepted?)
CASES: list[tuple[str, RelayPolicy, str, str, str, bool, bool]] = [
    # Domains, for a client that may not relay.
    ("accepted", POLICY, "user", "example.com", OUTSIDE, False, True),
    ("accepted-case", POLICY, "user", "EXAMPLE.Com", OUTSIDE, False, True),
    ("accepted-trailing-dot", POLICY, "user", "example.com.", OUTSIDE, False, True),
    ("configured-with-dot-and-case", POLICY, "user", "example.org", OUTSIDE, False, True),
    ("other-domain", POLICY, "user", "other.example", OUTSIDE, False, False),
    ("lookalike-suffix", POLICY, "user", "badexample.com", OUTSIDE, False, False),
    ("exact-entry-no-subdomains", POLICY, "user", "mail.example.com", OUTSIDE, False, False),
    ("two-trailing-dots", POLICY, "user", "example.com..", OUTSIDE, False, False),
    ("wildcard-subdomain", POLICY, "user", "a.sub.example.net", OUTSIDE, False, True),
    ("wildcard-deep", POLICY, "user", "a.b.SUB.example.net.", OUTSIDE, False, True),
    ("wildcard-not-itself", POLICY, "user", "sub.example.net", OUTSIDE, False, False),
    ("wildcard-lookalike", POLICY, "user", "xsub.example.net", OUTSIDE, False, False),
    ("wildcard-parent", POLICY, "user", "example.net", OUTSIDE, False, False),
    ("wildcard-percent-label", POLICY, "user", "x%y.sub.example.net", OUTSIDE, False, False),
    ("wildcard-empty-label", POLICY, "user", ".sub.example.net", OUTSIDE, False, False),
    # Routing tricks in the local part, at an accepted domain.
    ("percent-hack", POLICY, "user%other.example", "example.com", OUTSIDE, False, False),
    ("percent-alone", POLICY, "a%b", "example.com", OUTSIDE, False, False),
    ("bang-path", POLICY, "other.example!user", "example.com", OUTSIDE, False, False),
    ("quoted-at", POLICY, '"user@other.example"', "example.com", OUTSIDE, False, False),
    ("quoted-escaped-at", POLICY, '"user\\@other.example"', "example.com", OUTSIDE, False, False),
    ("quoted-percent", POLICY, '"user%other"', "example.com", OUTSIDE, False, False),
    ("quoted-bang", POLICY, '"other!user"', "example.com", OUTSIDE, False, False),
    ("quoted-plain", POLICY, '"john doe"', "example.com", OUTSIDE, False, True),
    ("plus-tag", POLICY, "user+tag", "example.com", OUTSIDE, False, True),
    ("literal-v4", POLICY, "user", "[192.0.2.1]", OUTSIDE, False, False),
    ("literal-v6", POLICY, "user", "[IPv6:2001:db8::1]", OUTSIDE, False, False),
    # Postmaster (RFC 5321 §4.5.1).
    ("postmaster-bare", POLICY, "Postmaster", "", OUTSIDE, False, True),
    ("postmaster-bare-upper", POLICY, "POSTMASTER", "", OUTSIDE, False, True),
    ("postmaster-accepted", POLICY, "postmaster", "example.com", OUTSIDE, False, True),
    ("postmaster-other-domain", POLICY, "postmaster", "other.example", OUTSIDE, False, False),
    ("empty-domain-other-local", POLICY, "abuse", "", OUTSIDE, False, False),
    ("empty-everything", POLICY, "", "", OUTSIDE, False, False),
    # Relay networks: anything goes, tricks included (the client is trusted).
    ("network-v4", POLICY, "user", "other.example", "10.1.2.3", False, True),
    ("network-v4-trick", POLICY, "user%x", "other.example", "10.255.0.1", False, True),
    ("network-v4-literal", POLICY, "user", "[192.0.2.1]", "10.0.0.1", False, True),
    ("network-v4-edge-out", POLICY, "user", "other.example", "11.0.0.0", False, False),
    ("network-v6", POLICY, "user", "other.example", "2001:db8::5", False, True),
    ("network-v6-out", POLICY, "user", "other.example", "2001:db9::1", False, False),
    ("mapped-client", POLICY, "user", "other.example", "::ffff:10.1.2.3", False, True),
    ("mapped-client-out", POLICY, "user", "other.example", "::ffff:11.0.0.1", False, False),
    ("mapped-network-v4-client", POLICY, "user", "other.example", "192.168.4.5", False, True),
    ("mapped-net-mapped-client", POLICY, "u", "other.example", "::ffff:192.168.4.5", False, True),
    ("mapped-network-out", POLICY, "user", "other.example", "192.169.0.1", False, False),
    ("v4-not-in-v6-net", POLICY, "user", "other.example", "32.1.13.184", False, False),
    # Authentication.
    ("auth-relays", POLICY, "user", "other.example", OUTSIDE, True, True),
    ("auth-relays-v6", POLICY, "user", "other.example", "2001:db9::1", True, True),
    ("auth-not-allowed", NO_AUTH_RELAY, "user", "other.example", OUTSIDE, True, False),
    ("auth-not-allowed-local", NO_AUTH_RELAY, "user", "example.com", OUTSIDE, True, True),
    ("auth-not-allowed-network", NO_AUTH_RELAY, "user", "other.example", "10.0.0.1", True, True),
]


@pytest.mark.parametrize(
    ("policy", "local", "domain", "ip", "auth", "ok"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_check_rcpt_table(
    policy: RelayPolicy, local: str, domain: str, ip: str, auth: bool, ok: bool
) -> None:
    result = policy.check_rcpt(local, domain, ip_address(ip), auth)
    assert result == (None if ok else DENIED)


def test_denied_reply_constant() -> None:
    assert S554_RELAY_DENIED == DENIED


@pytest.mark.parametrize(
    ("ip", "auth", "expected"),
    [
        ("10.0.0.0", False, True),
        ("10.255.255.255", False, True),
        ("9.255.255.255", False, False),
        ("::ffff:10.0.0.1", False, True),
        ("2001:db8:ffff::1", False, True),
        ("::1", False, False),
        ("127.0.0.1", False, False),
        ("127.0.0.1", True, True),
    ],
)
def test_may_relay(ip: str, auth: bool, expected: bool) -> None:
    assert POLICY.may_relay(ip_address(ip), auth) is expected


def test_no_networks_and_no_auth_relay_is_closed() -> None:
    closed = RelayPolicy(["example.com"], [], relay_authenticated=False)
    assert not closed.may_relay(ip_address("127.0.0.1"), True)
    assert closed.check_rcpt("user", "other.example", ip_address("127.0.0.1"), True) == DENIED
    assert closed.check_rcpt("user", "example.com", ip_address("127.0.0.1"), True) is None


def test_wide_open_network_relays_everything() -> None:
    # What "relay_networks = 0.0.0.0/0" means: an open relay, but only for IPv4 clients.
    open_v4 = RelayPolicy([], [IPv4Network("0.0.0.0/0")], relay_authenticated=False)
    assert open_v4.may_relay(ip_address("203.0.113.1"), False)
    assert open_v4.may_relay(ip_address("::ffff:203.0.113.1"), False)
    assert not open_v4.may_relay(ip_address("2001:db8::1"), False)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", True),
        ("EXAMPLE.COM.", True),
        ("example.org", True),
        ("x.sub.example.net", True),
        ("sub.example.net", False),
        ("", False),
        (".", False),
        ("com", False),
        ("[127.0.0.1]", False),
        ("example.com:25", False),
        ("user@example.com", False),
    ],
)
def test_is_accepted_domain(domain: str, expected: bool) -> None:
    assert POLICY.is_accepted_domain(domain) is expected


def test_non_ascii_domain_exact_only() -> None:
    # U-labels match only as configured (no IDNA mapping that could widen the set).
    policy = RelayPolicy(["bücher.example", "*.exämple.net"], [])
    assert policy.is_accepted_domain("BÜCHER.example")
    assert policy.is_accepted_domain("a.exämple.net")
    assert not policy.is_accepted_domain("xn--bcher-kva.example")
    assert not policy.is_accepted_domain("bucher.example")


@pytest.mark.parametrize(
    "entry", ["", ".", "*", "*.", "*.*.example.com", "foo.*.com", "[192.0.2.1]", "a..b", "a b"]
)
def test_bad_accepted_domain(entry: str) -> None:
    with pytest.raises(ValueError, match="accepted domain"):
        RelayPolicy([entry], [])


def test_bad_network_type() -> None:
    with pytest.raises(TypeError, match="relay network"):
        RelayPolicy([], ["10.0.0.0/8"])  # type: ignore[list-item]


def test_mapped_network_keeps_prefix() -> None:
    policy = RelayPolicy([], [IPv6Network("::ffff:192.0.2.128/121")], relay_authenticated=False)
    assert policy.may_relay(ip_address("192.0.2.128"), False)
    assert policy.may_relay(ip_address("192.0.2.255"), False)
    assert not policy.may_relay(ip_address("192.0.2.127"), False)


# Recipients as the command parser hands them over: the local part as written.
@pytest.mark.parametrize(
    ("line", "ok"),
    [
        (b"RCPT TO:<user@example.com>", True),
        (b"RCPT TO:<Postmaster>", True),
        (b"RCPT TO:<postmaster@EXAMPLE.COM>", True),
        (b"RCPT TO:<user%other.example@example.com>", False),
        (b"RCPT TO:<other.example!user@example.com>", False),
        (b'RCPT TO:<"user@other.example"@example.com>', False),
        (b'RCPT TO:<"user\\@other.example"@example.com>', False),
        (b"RCPT TO:<user@[192.0.2.1]>", False),
        (b"RCPT TO:<@relay.example:user@other.example>", False),
        (b"RCPT TO:<@other.example:user@example.com>", True),
        (b"RCPT TO:<user@other.example>", False),
    ],
)
def test_parsed_recipients(line: bytes, ok: bool) -> None:
    cmd = parse_command(line)
    result = POLICY.check_rcpt(cmd.local, cmd.domain, ip_address(OUTSIDE), False)
    assert result == (None if ok else DENIED)


@given(local=st.text(max_size=40), domain=st.text(max_size=40))
def test_trick_characters_never_pass(local: str, domain: str) -> None:
    """Whatever else is in it, a local part with "%", "!" or "@" is refused, and so is any
    domain that is not accepted; a relay client is never refused."""
    outside = ip_address(OUTSIDE)
    for trick in "%!@":
        assert POLICY.check_rcpt(local + trick, "example.com", outside, False) == DENIED
    result = POLICY.check_rcpt(local, domain, outside, False)
    if result is None:
        assert POLICY.is_accepted_domain(domain) or (domain == "" and local.lower() == "postmaster")
    else:
        assert result == DENIED
    assert POLICY.check_rcpt(local, domain, ipaddress.IPv4Address("10.9.9.9"), False) is None

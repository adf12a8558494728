"""The "dnsbl" agent (engine.agents.dnsbl) against a real DNS server on loopback
(engine.testing.dns.DnsResponder) serving the lists' records: listed, not listed, answers
outside the zone's codes, the lists' error codes, allow lists and networks, IPv6 nibble
names, the TXT record in the reply, a SERVFAIL zone, weights and threshold."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.agents.api import Action, Session, Verdict
from engine.agents.dns import Lookup
from engine.agents.dnsbl import DnsblAgent, Zone, build_dnsbl, printable, query_name
from engine.agents.networks import Networks
from engine.config import Config, ConfigError, load_config
from engine.testing.dns import DnsResponder

# RFC 5782 §2.4's own example address and name.
RFC_V6 = "2001:db8:1:2:3:4:567:89ab"
RFC_V6_NAME = "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
V6_CLIENT = "2001:db8::99"
V6_NAME = "9.9.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2"

ZONE = f"""
$TTL 60
test.                  IN SOA ns.test. admin.test. 1 60 60 600 60
99.2.0.192.bl.test.    IN A   127.0.0.2
99.2.0.192.bl.test.    IN TXT "Listed; see https://bl.test/lookup?ip=192.0.2.99"
98.2.0.192.bl.test.    IN A   127.0.0.4
50.2.0.192.bl.test.    IN A   127.0.0.20
51.2.0.192.bl.test.    IN A   127.255.255.254
1.0.0.127.bl.test.     IN A   127.0.0.2
{V6_NAME}.bl.test.     IN A   127.0.0.3
{V6_NAME}.bl.test.     IN TXT "v6 listed"
98.2.0.192.wl.test.    IN A   127.0.10.3
99.2.0.192.two.test.   IN A   127.0.0.2
97.2.0.192.two.test.   IN A   127.0.0.2
"""

BL = Zone("bl.test", codes=((ipaddress.IPv4Address("127.0.0.2"),
                             ipaddress.IPv4Address("127.0.0.11")),))


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE, origin="test.") as responder:
        yield responder


def session(ip: str) -> Session:
    return Session(session_id="s1", connector="test", client_ip=ipaddress.ip_address(ip))


def check(dns: DnsResponder, zones: tuple[Zone, ...], ip: str, **options: object) -> Verdict:
    async def run() -> Verdict:
        agent = DnsblAgent(zones, Lookup(dns.address, timeout=2, lifetime=2),
                           **options)  # type: ignore[arg-type]
        verdict = agent.connect(session(ip))
        return verdict if isinstance(verdict, Verdict) else await verdict

    return asyncio.run(run())


def test_query_names_reverse_octets_and_nibbles() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.99"), "bl.test") == "99.2.0.192.bl.test"
    assert query_name(ipaddress.ip_address(RFC_V6), "ugly.example.com") == (
        RFC_V6_NAME + ".ugly.example.com")
    # A dual-stack socket's mapped address is looked up as the IPv4 address.
    assert query_name(ipaddress.ip_address("::ffff:192.0.2.99"), "bl.test") == (
        "99.2.0.192.bl.test")


def test_listed_client_gets_554_naming_the_list_with_its_txt(dns: DnsResponder) -> None:
    verdict = check(dns, (BL,), "192.0.2.99")
    assert verdict.action is Action.REJECT
    assert verdict.reply == (554, "5.7.1", "Service unavailable; client [192.0.2.99] blocked "
                             "using bl.test; Listed; see https://bl.test/lookup?ip=192.0.2.99")
    assert "bl.test (127.0.0.2)" in verdict.reason


def test_listing_without_txt_has_no_trailing_separator(dns: DnsResponder) -> None:
    verdict = check(dns, (BL,), "192.0.2.98")
    assert verdict.reply == (554, "5.7.1",
                             "Service unavailable; client [192.0.2.98] blocked using bl.test")


def test_not_listed_is_accepted(dns: DnsResponder) -> None:
    assert check(dns, (BL,), "192.0.2.1").action is Action.ACCEPT


def test_answer_outside_the_codes_does_not_count(dns: DnsResponder) -> None:
    assert check(dns, (BL,), "192.0.2.50").action is Action.ACCEPT
    # The default codes (all of 127/8 but the error range) take 127.0.0.20.
    assert check(dns, (Zone("bl.test"),), "192.0.2.50").action is Action.REJECT


def test_error_codes_never_count_and_are_logged(dns: DnsResponder,
                                                caplog: pytest.LogCaptureFixture) -> None:
    wide = Zone("bl.test", codes=((ipaddress.IPv4Address("127.0.0.0"),
                                   ipaddress.IPv4Address("127.255.255.255")),))
    with caplog.at_level(logging.WARNING, logger="ferry.agents"):
        assert check(dns, (wide,), "192.0.2.51").action is Action.ACCEPT
    assert "127.255.255.254" in caplog.text and "error code" in caplog.text


def test_allow_list_bypasses_the_block_lists(dns: DnsResponder) -> None:
    # 192.0.2.98 is listed by bl.test and by the allow list wl.test.
    allow = Zone("wl.test", allow=True)
    assert check(dns, (BL, allow), "192.0.2.98").action is Action.ACCEPT
    assert check(dns, (BL, allow), "192.0.2.99").action is Action.REJECT


def test_allow_networks_are_never_looked_up(dns: DnsResponder) -> None:
    before = dns.count("99.2.0.192.bl.test", "A")
    verdict = check(dns, (BL,), "192.0.2.99",
                    allow_networks=Networks([ipaddress.ip_network("192.0.2.0/25")]))
    assert verdict.action is Action.ACCEPT
    assert dns.count("99.2.0.192.bl.test", "A") == before


def test_ipv6_client_looked_up_by_nibbles(dns: DnsResponder) -> None:
    verdict = check(dns, (BL,), V6_CLIENT)
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert verdict.reply[2] == ("Service unavailable; client [2001:db8::99] blocked using "
                                "bl.test; v6 listed")


def test_servfail_zone_does_not_count(dns: DnsResponder,
                                      caplog: pytest.LogCaptureFixture) -> None:
    dns.servfail.add("99.2.0.192.broken.test")
    dns.servfail.add("97.2.0.192.broken.test")
    broken = Zone("broken.test")
    with caplog.at_level(logging.WARNING, logger="ferry.agents"):
        assert check(dns, (broken,), "192.0.2.99").action is Action.ACCEPT
    assert "broken.test not asked for [192.0.2.99]" in caplog.text
    # The other lists still count.
    assert check(dns, (broken, BL), "192.0.2.99").action is Action.REJECT


def test_zone_that_does_not_answer_in_time_does_not_count(
        dns: DnsResponder, caplog: pytest.LogCaptureFixture) -> None:
    # The lookup would wait 2 s for the silent zone; the agent's budget is 0.5 s, of which
    # the A queries get 60 %: bl.test still decides.
    dns.drop.add("99.2.0.192.silent.test")
    with caplog.at_level(logging.WARNING, logger="ferry.agents"):
        verdict = check(dns, (Zone("silent.test"), BL), "192.0.2.99", timeout=0.5)
    assert verdict.action is Action.REJECT
    assert "silent.test not asked for [192.0.2.99]" in caplog.text


def test_every_zone_is_asked(dns: DnsResponder) -> None:
    zones = (BL, Zone("two.test"), Zone("wl.test", allow=True))
    counts = [dns.count(f"96.2.0.192.{z.zone}", "A") for z in zones]
    assert check(dns, zones, "192.0.2.96").action is Action.ACCEPT
    assert [dns.count(f"96.2.0.192.{z.zone}", "A") for z in zones] == [c + 1 for c in counts]


def test_weights_add_up_to_the_threshold(dns: DnsResponder) -> None:
    zones = (BL, Zone("two.test"))
    # 192.0.2.97 is in two.test only; 192.0.2.99 in both.
    assert check(dns, zones, "192.0.2.97", threshold=2).action is Action.ACCEPT
    assert check(dns, zones, "192.0.2.99", threshold=2).action is Action.REJECT
    heavy = (BL, Zone("two.test", weight=2))
    verdict = check(dns, heavy, "192.0.2.97", threshold=2)
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and "using two.test" in verdict.reply[2]
    # The reply names the heaviest of the lists that list the client.
    verdict = check(dns, heavy, "192.0.2.99", threshold=2)
    assert verdict.reply is not None and "using two.test" in verdict.reply[2]


def test_reply_template(dns: DnsResponder) -> None:
    zone = dataclasses.replace(BL, reply="Go away [{client}] ({zone}): {txt}")
    verdict = check(dns, (zone,), "192.0.2.99")
    assert verdict.reply == (554, "5.7.1", "Go away [192.0.2.99] (bl.test): Listed; see "
                                           "https://bl.test/lookup?ip=192.0.2.99")


def test_loopback_client_is_looked_up_too(dns: DnsResponder) -> None:
    assert check(dns, (BL,), "127.0.0.1").action is Action.REJECT


def test_txt_is_made_printable_and_short() -> None:
    assert printable("a\r\nb\x00c\u00e9", 100) == "a??b?c?"
    assert printable("x" * 300, 200) == "x" * 197 + "..."


def test_no_zones_accepts_without_waiting() -> None:
    agent = DnsblAgent((), Lookup(("127.0.0.1", 9)))
    assert agent.connect(session("192.0.2.99")) is not None
    assert isinstance(agent.connect(session("192.0.2.99")), Verdict)


# --- from the configuration -----------------------------------------------------------------


@dataclasses.dataclass
class Context:
    config: Config
    lookup: Lookup


def test_built_from_the_configuration(dns: DnsResponder, tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text("""
[agents.dnsbl]
timeout = 3
fail = "closed"
threshold = 2
allow_networks = ["198.51.100.0/24"]

[[agents.dnsbl.zones]]
zone = "BL.test"
codes = ["127.0.0.2-127.0.0.11", "127.0.0.20"]
weight = 2
reply = "blocked [{client}] by {zone}"

[[agents.dnsbl.zones]]
zone = "wl.test"
kind = "allow"
""", encoding="utf-8")
    config = load_config(path)

    async def run(ip: str) -> Verdict:
        agent = build_dnsbl(Context(config, Lookup(dns.address, timeout=2, lifetime=2)))
        assert agent is not None
        assert (agent.timeout, agent.fail_open, agent.threshold) == (3, False, 2)
        verdict = agent.connect(session(ip))
        return verdict if isinstance(verdict, Verdict) else await verdict

    assert asyncio.run(run("192.0.2.50")).reply == (554, "5.7.1",
                                                    "blocked [192.0.2.50] by bl.test")
    assert asyncio.run(run("192.0.2.98")).action is Action.ACCEPT  # wl.test
    assert asyncio.run(run("198.51.100.9")).action is Action.ACCEPT


def test_not_built_without_zones(tmp_path: Path) -> None:
    config = load_config(None)
    assert build_dnsbl(Context(config, Lookup(("127.0.0.1", 9)))) is None


@pytest.mark.parametrize(("text", "problem"), [
    ('codes = ["127.0.0.11-127.0.0.2"]', "codes[0]: is a range whose end is before"),
    ('codes = []', "codes: must not be empty"),
    ('codes = ["127.0.0.1/8"]', "codes[0]: must be an IPv4 address"),
    ('reply = "{txt:>99999}"', "reply: may only use {client}, {zone} and {txt}, not {txt:>99999}"),
    ('reply = "{ip}"', "reply: may only use {client}, {zone} and {txt}, not {ip}"),
    ('kind = "deny"', 'kind: must be one of "block", "allow"'),
    ('weight = 0', "weight: must be a positive integer"),
])
def test_zone_problems_are_reported(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(f'[[agents.dnsbl.zones]]\nzone = "bl.test"\n{text}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"agents.dnsbl.zones[0].{problem}"), str(err.value)


def test_a_zone_twice_or_without_a_name_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text('[[agents.dnsbl.zones]]\nzone = "bl.test"\n'
                    '[[agents.dnsbl.zones]]\nzone = "BL.test"\n'
                    '[[agents.dnsbl.zones]]\nkind = "allow"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ('agents.dnsbl.zones[1].zone: lists "BL.test" twice',
                                  "agents.dnsbl.zones[2].zone: is required")

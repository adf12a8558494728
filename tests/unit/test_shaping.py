"""Shaping rules, pools, warm-up caps and automation matching (engine.scheduler.shaping):
values only, no sockets.  The replies are the providers' own wording."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import pytest

from engine.config import ConfigError, DeliveryConfig, DomainLimits, load_config
from engine.ops.preflight import advice
from engine.routing.api import Host, Route
from engine.scheduler.policy import SiteLimits
from engine.scheduler.shaping import Shaping, from_config, next_day, shipped, site_key, utc_day


def route(domain: str, *hosts: str, pool: str = "") -> Route:
    return Route(domain, "mx:" + ",".join(hosts), tuple(Host(h, "192.0.2.1", 25) for h in hosts),
                 pool=pool)


def shaping(tmp_path: Path, body: str) -> Shaping:
    path = tmp_path / "ferry.toml"
    path.write_text(body, encoding="utf-8")
    return from_config(load_config(path))


GMAIL = route("gmail.com", "gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com")
HOTMAIL = route("hotmail.com", "hotmail-com.olc.protection.outlook.com")
YAHOO = route("yahoo.com", "mta5.am0.yahoodns.net")
AOL = route("aol.com", "mx-aol.mail.gm0.yahoodns.net")
ICLOUD = route("icloud.com", "mx01.mail.icloud.com")
OTHER = route("example.com", "mx.example.com")


@pytest.mark.parametrize(("r", "rule", "connections"), [
    (GMAIL, "gmail", 10), (HOTMAIL, "microsoft", 8), (YAHOO, "yahoo", 5), (AOL, "yahoo", 5),
    (ICLOUD, "icloud", 5)])
def test_shipped_rules_match_the_providers_mx_hosts(r: Route, rule: str,
                                                    connections: int) -> None:
    shape = Shaping(DeliveryConfig()).shape(r)
    assert shape.rules == (rule,)
    assert shape.limits.max_connections == connections
    assert shape.limits.max_messages_per_connection > 0


def test_other_sites_keep_the_delivery_defaults_and_no_automation() -> None:
    shape = Shaping(DeliveryConfig(max_per_domain=7, max_rate=3.0)).shape(OTHER)
    assert shape.rules == ()
    assert shape.limits == SiteLimits(7, 3.0)
    assert not shape.by_code and shape.react("421 4.7.28 slow down") is None


def test_defaults_off_leaves_providers_alone(tmp_path: Path) -> None:
    s = shaping(tmp_path, "[shaping]\ndefaults = false\n")
    assert s.shape(GMAIL).rules == () and s.shape(GMAIL).react(
        "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate") is None


@pytest.mark.parametrize(("r", "reply", "rule", "action"), [
    (GMAIL, "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited "
            "mail originating from your IP address. To protect our users from spam, mail "
            "sent from your IP address has been temporarily rate limited.", "gmail-rate",
     "suspend"),
    (HOTMAIL, "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714) "
              "[Hostname=X]", "microsoft-busy", "throttle"),
    (HOTMAIL, "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited "
              "due to IP reputation. (S3114)", "microsoft-busy", "throttle"),
    (HOTMAIL, "421 RP-001 (COL004-MC1F32) Unfortunately, some messages from 192.0.2.1 "
              "weren't sent. Please try again. We have limits for how many messages can be "
              "sent per hour and per day from a single IP address.", "microsoft-rate",
     "suspend"),
    (YAHOO, "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to "
            "unexpected volume or user complaints - 4.16.55.1; see "
            "https://postmaster.yahooinc.com/error-codes", "yahoo-volume", "suspend"),
    (AOL, "421 4.7.0 [TS04] Messages from 192.0.2.1 temporarily deferred", "yahoo-volume",
     "suspend"),
])
def test_shipped_automation_knows_the_providers_deferrals(r: Route, reply: str, rule: str,
                                                          action: str) -> None:
    found = Shaping(DeliveryConfig()).shape(r).react(reply)
    assert found is not None and (found.name, found.action) == (rule, action)


def test_automation_needs_every_part_it_sets(tmp_path: Path) -> None:
    s = shaping(tmp_path, """
[shaping]
defaults = false
[[shaping.automation]]
name = "x"
code = 421
enhanced = "4.7.28"
text = "unusual rate"
""")
    shape = s.shape(OTHER)  # no mx_suffixes/domains: every site
    assert shape.react("421 4.7.28 an UNUSUAL RATE") is not None  # text: any case
    assert shape.react("421 4.7.28 busy") is None
    assert shape.react("451 4.7.28 unusual rate") is None
    assert shape.react("421 4.7.0 unusual rate") is None
    assert shape.react("not a reply") is None


def test_configured_rules_win_per_key_then_domain_tables_win(tmp_path: Path) -> None:
    s = shaping(tmp_path, """
[delivery]
max_per_domain = 30
[delivery.domains."gmail.com"]
max_rate = 2
[[shaping.rules]]
name = "mine"
mx_suffixes = [".google.com"]
max_per_minute = 60
daily_cap = 500
""")
    shape = s.shape(GMAIL)
    assert shape.rules == ("mine", "gmail")
    # connections and per-connection from the shipped rule, the cap from mine, the rate
    # from the domain table (over the rule's 60/min)
    assert shape.limits == SiteLimits(10, 2.0, 50, 500)
    assert s.shape(route("googlemail.com", "gmail-smtp-in.l.google.com")).limits.max_rate == 1.0


def test_the_strictest_rate_sets_the_spacing(tmp_path: Path) -> None:
    s = shaping(tmp_path, """
[[shaping.rules]]
name = "r"
domains = ["example.com"]
max_per_second = 10
max_per_minute = 120
max_per_hour = 36000
""")
    assert s.shape(OTHER).limits.max_rate == pytest.approx(2.0)  # 120/min is the strictest


def test_the_shape_is_resolved_once_per_site(tmp_path: Path) -> None:
    s = Shaping(DeliveryConfig())
    first = s.shape(GMAIL)
    assert s.shape(route("gmail.com", "gmail-smtp-in.l.google.com",
                         "alt1.gmail-smtp-in.l.google.com")) is first


def test_pools_draw_sources_by_weight(tmp_path: Path) -> None:
    s = shaping(tmp_path, """
[egress.sources.a]
address = "127.0.0.2"
ehlo = "a.example.net"
[egress.sources.b]
address = "127.0.0.3"
[egress.pools.p]
sources = { a = 1, b = 3 }
[egress]
pool = "p"
""")
    shape = s.shape(route("example.com", "mx.example.com", pool="p"))
    rnd = random.Random(7)
    counts = Counter(src.name for _ in range(4000) if (src := shape.pick(rnd)) is not None)
    assert 800 < counts["a"] < 1200 and 2800 < counts["b"] < 3200
    assert s.shape(OTHER).pick(rnd) is None  # no pool: no source (today's behaviour)
    a = next(x.source for x in shape.sources if x.source.name == "a")
    assert (a.name, a.address, a.ehlo) == ("a", "127.0.0.2", "a.example.net")
    assert site_key("mx:mx.example.com", a) == "a@mx:mx.example.com"
    assert site_key("mx:mx.example.com", None) == "mx:mx.example.com"


def test_warmup_caps_grow_per_day_and_end(tmp_path: Path) -> None:
    s = shaping(tmp_path, """
[egress.sources.new]
address = "127.0.0.2"
warmup_start = "2026-12-01"
warmup_caps = [10, 20, 40]
[egress.sources.old]
address = "127.0.0.3"
[egress.pools.p]
sources = { new = 1, old = 1 }
[[shaping.rules]]
name = "capped"
domains = ["example.com"]
daily_cap = 30
pool = "p"
""")
    shape = s.shape(OTHER)
    new, old = (x.source for x in shape.sources)
    day1 = utc_day(1796083200.0)  # 2026-12-01T00:00Z
    assert [shape.cap(new, day1 + n) for n in range(-1, 5)] == [10, 10, 20, 30, 30, 30]
    assert shape.cap(old, day1) == 30  # the rule's cap only
    assert next_day(1796083200.0 + 5) == 1796083200.0 + 86400


def test_throttle_lowers_and_never_raises(tmp_path: Path) -> None:
    s = shaping(tmp_path, """
[shaping]
defaults = false
[[shaping.automation]]
name = "t"
code = 421
action = "throttle"
max_connections = 1
rate_factor = 0.5
""")
    rule = s.shape(OTHER).react("421 slow down")
    assert rule is not None
    assert rule.lowered(SiteLimits(20, 10.0, 5, 100)) == SiteLimits(1, 5.0, 5, 100)
    assert rule.lowered(SiteLimits(20, 0.0)) == SiteLimits(1, 0.0)  # no rate stays none


def test_bad_shaping_configuration_is_reported_whole(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text("""
[egress.sources.a]
address = "not-an-ip"
warmup_caps = [10, 5]
[egress.pools.p]
sources = { b = 1 }
[[send]]
name = "x"
address_spaces = ["*"]
pool = "nope"
[[shaping.rules]]
name = "r"
max_connections = 0
[[shaping.automation]]
name = "a"
code = 250
enhanced = "4.7"
action = "throttle"
rate_factor = 2
""", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for key in ("egress.sources.a.address", "egress.sources.a.warmup_caps",
                "shaping.rules[0].max_connections", "shaping.automation[0].code",
                "shaping.automation[0].enhanced", "shaping.automation[0].rate_factor"):
        assert key in text, text


def test_pools_and_sources_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text("""
[egress]
pool = "q"
[egress.pools.p]
sources = { b = 1 }
[[send]]
name = "x"
address_spaces = ["*"]
pool = "nope"
""", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "egress.pools.p.sources.b: is not a source" in text
    assert "egress.pool: \"q\" is not a pool" in text


def test_the_shipped_file_loads() -> None:
    defaults = shipped()
    assert {r.name for r in defaults.rules} == {"gmail", "microsoft", "yahoo", "icloud"}
    assert all(a.mx_suffixes for a in defaults.automation)  # never a rule for every site


def test_domain_table_connections_win(tmp_path: Path) -> None:
    d = DeliveryConfig(domains={"gmail.com": DomainLimits(max_connections=2)})
    assert Shaping(d).shape(GMAIL).limits.max_connections == 2


def test_a_shaped_route_keeps_every_other_field() -> None:
    """``Route.shaped`` builds the route field by field (it is on the scheduler's path):
    a field added to Route must be copied there too, or it is lost for pooled sources."""
    names = [f.name for f in dataclasses.fields(Route)]
    marks = {name: object() for name in names}
    original = Route(**marks)  # type: ignore[arg-type]
    source = object()
    shaped = original.shaped(source, 7)  # type: ignore[arg-type]
    for name in names:
        expected = {"source": source, "max_messages": 7}.get(name, marks[name])
        assert getattr(shaped, name) is expected, name


def test_config_check_names_a_source_address_the_machine_lacks(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text("""
[egress.sources.here]
address = "127.0.0.2"
[egress.sources.away]
address = "192.0.2.1"
[egress.sources.spare]
address = "127.0.0.3"
[egress.pools.p]
sources = { here = 1, away = 1 }
""", encoding="utf-8")
    problems, warnings = advice(load_config(path))
    assert [p.split(":")[0] for p in problems] == ["egress.sources.away.address"]
    assert "192.0.2.1 is not an address of this machine" in problems[0]
    assert warnings == ["egress.sources.spare: in no [egress.pools] entry, so nothing is "
                        "sent from it"]

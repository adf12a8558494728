"""MX resolution against a real DNS responder on loopback, through real dnspython.

Preference order and shuffling, implicit and null MX, NXDOMAIN, SERVFAIL, timeouts, TTL
caching (positive and negative), IPv6, CNAMEs, truncation to TCP, many domains, and the
--dns / --mx-port flags through load_config and the router.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from engine.config import load_config
from engine.routing.api import Host, Route, RouteError
from engine.routing.mx import MxAnswer, MxResolver
from engine.routing.router import ConfiguredRouter
from engine.testing.clock import ManualClock
from engine.testing.dns import DnsResponder
from engine.testing.wait import until

ZONE = """
example.test.        300 IN MX 10 mx1.example.test.
example.test.        300 IN MX 10 mx2.example.test.
example.test.        300 IN MX 20 backup.example.test.
mx1.example.test.    300 IN A 127.0.0.11
mx2.example.test.    300 IN A 127.0.0.12
mx2.example.test.    300 IN AAAA 2001:db8::12
backup.example.test. 300 IN A 127.0.0.13
implicit.test.       300 IN A 127.0.0.20
implicit.test.       300 IN AAAA 2001:db8::20
null.test.           300 IN MX 0 .
nothing.test.        300 IN TXT "v=spf1 -all"
dangling.test.       300 IN MX 10 gone.dangling.test.
dangling.test.       300 IN MX 20 empty.dangling.test.
empty.dangling.test. 300 IN TXT "no address"
v6.test.             300 IN MX 5 mx.v6.test.
mx.v6.test.          300 IN AAAA 2001:db8::6
alias.test.          300 IN MX 10 mail.alias.test.
mail.alias.test.     300 IN CNAME real.alias.test.
real.alias.test.     300 IN A 127.0.0.30
half.test.           300 IN MX 10 broken.half.test.
half.test.           300 IN MX 20 fine.half.test.
fine.half.test.      300 IN A 127.0.0.40
"""


@pytest.fixture
def dns() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as responder:
        yield responder


def resolver(dns: DnsResponder, **options: Any) -> MxResolver:
    return MxResolver(dns.address, timeout=0.3, lifetime=0.6, **options)


def hostport(address: tuple[str, int]) -> str:
    """A (host, port) as the text of a HOST:PORT flag."""
    return f"{address[0]}:{address[1]}"


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def failure(coro: object) -> RouteError:
    with pytest.raises(RouteError) as info:
        run(coro)
    return info.value


# --- MX order ---------------------------------------------------------------------------


def test_preference_order_and_addresses(dns: DnsResponder) -> None:
    answer = asyncio.run(resolver(dns).mx("Example.TEST.", 25))
    assert answer.site == "mx:backup.example.test,mx1.example.test,mx2.example.test"
    assert not answer.implicit
    by_name = {h.name: h for h in answer.hosts if h.name != "mx2.example.test"}
    assert by_name["mx1.example.test"] == Host("mx1.example.test", "127.0.0.11", 25, 10)
    assert answer.hosts[-1] == Host("backup.example.test", "127.0.0.13", 25, 20)
    mx2 = [h.address for h in answer.hosts if h.name == "mx2.example.test"]
    assert mx2 == ["127.0.0.12", "2001:db8::12"]  # IPv4 first
    assert len(answer.hosts) == 4


def test_equal_preferences_are_shuffled(dns: DnsResponder) -> None:
    r = resolver(dns)

    async def firsts() -> Counter[str]:
        return Counter([(await r.mx_hosts("example.test", 25))[0].name for _ in range(200)])

    seen = asyncio.run(firsts())
    assert set(seen) == {"mx1.example.test", "mx2.example.test"}
    assert min(seen.values()) > 50
    # Shuffled from the cache: the MX set was asked for once.
    assert dns.count("example.test", "MX") == 1


def test_implicit_mx(dns: DnsResponder) -> None:
    answer = asyncio.run(resolver(dns).mx("implicit.test", 2525))
    assert answer.implicit and answer.site == "mx:implicit.test"
    assert answer.hosts == (
        Host("implicit.test", "127.0.0.20", 2525, 0),
        Host("implicit.test", "2001:db8::20", 2525, 0),
    )


def test_ipv6_only_mx_host(dns: DnsResponder) -> None:
    hosts = asyncio.run(resolver(dns).mx_hosts("v6.test", 25))
    assert hosts == (Host("mx.v6.test", "2001:db8::6", 25, 5),)


def test_mx_host_behind_a_cname(dns: DnsResponder) -> None:
    hosts = asyncio.run(resolver(dns).mx_hosts("alias.test", 25))
    assert hosts == (Host("mail.alias.test", "127.0.0.30", 25, 10),)


# --- failures -----------------------------------------------------------------------------


def test_null_mx(dns: DnsResponder) -> None:
    err = failure(resolver(dns).mx("null.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (True, 556, "5.1.10")
    assert "null MX (RFC 7505)" in err.text


def test_nxdomain(dns: DnsResponder) -> None:
    err = failure(resolver(dns).mx("no-such-domain.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.1.2")
    assert "NXDOMAIN" in err.text


def test_no_mx_and_no_address(dns: DnsResponder) -> None:
    err = failure(resolver(dns).mx("nothing.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.1.2")
    assert "no MX and no address" in err.text


def test_mx_hosts_without_addresses(dns: DnsResponder) -> None:
    err = failure(resolver(dns).mx("dangling.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.4.4")


def test_servfail_is_temporary_and_not_cached(dns: DnsResponder) -> None:
    dns.servfail.add("example.test")
    r = resolver(dns)
    err = failure(r.mx("example.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (False, 451, "4.4.3")
    assert "SERVFAIL" in err.text
    asked = dns.count("example.test", "MX")
    dns.servfail.discard("example.test")
    assert len(asyncio.run(r.mx_hosts("example.test", 25))) == 4
    assert dns.count("example.test", "MX") == asked + 1


def test_timeout_is_temporary(dns: DnsResponder) -> None:
    dns.drop.add("example.test.")
    err = failure(resolver(dns).mx("example.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (False, 451, "4.4.3")
    assert "timeout" in err.text


def test_one_mx_host_failing_leaves_the_others(dns: DnsResponder) -> None:
    dns.servfail.add("broken.half.test")
    hosts = asyncio.run(resolver(dns).mx_hosts("half.test", 25))
    assert hosts == (Host("fine.half.test", "127.0.0.40", 25, 20),)


def test_only_mx_host_failing_is_temporary(dns: DnsResponder) -> None:
    dns.servfail.add("mx.v6.test")
    err = failure(resolver(dns).mx("v6.test", 25))
    assert (err.permanent, err.code) == (False, 451)
    assert "mx.v6.test" in err.text


def test_invalid_domain_name(dns: DnsResponder) -> None:
    err = failure(resolver(dns).mx("a..b.test", 25))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.1.2")


# --- caching ------------------------------------------------------------------------------
# The resolver reads its clock for expiry; a ManualClock crosses a TTL exactly, no sleeping.


def test_ttl_caching() -> None:
    zone = "short.test. 1 IN MX 10 mx.short.test.\nmx.short.test. 1 IN A 127.0.0.1\n"
    clock = ManualClock()
    with DnsResponder(zone) as dns:
        r = resolver(dns, clock=clock)

        async def flow() -> None:
            assert (await r.mx_hosts("short.test", 25))[0].address == "127.0.0.1"
            dns.set_zone(zone.replace("127.0.0.1", "127.0.0.2"))
            # Within the TTL the change is not seen, and nothing is asked again.
            clock.advance(0.9)
            assert (await r.mx_hosts("short.test", 25))[0].address == "127.0.0.1"
            assert dns.count("mx.short.test", "A") == 1
            clock.advance(0.1)  # the 1 s TTL is up
            assert (await r.mx_hosts("short.test", 25))[0].address == "127.0.0.2"
            assert dns.count("mx.short.test", "A") == 2

        asyncio.run(flow())


def test_address_ttl_bounds_the_answer() -> None:
    # A long MX TTL does not keep a short-lived address: the address set expires alone.
    zone = "t.test. 3600 IN MX 10 mx.t.test.\nmx.t.test. 1 IN A 127.0.0.1\n"
    clock = ManualClock()
    with DnsResponder(zone) as dns:
        r = resolver(dns, clock=clock)

        async def flow() -> None:
            await r.mx_hosts("t.test", 25)
            dns.set_zone(zone.replace("127.0.0.1", "127.0.0.9"))
            clock.advance(1)
            assert (await r.mx_hosts("t.test", 25))[0].address == "127.0.0.9"
            assert dns.count("t.test", "MX") == 1

        asyncio.run(flow())


def test_negative_answer_cached_for_the_soa_minimum() -> None:
    zone = "@ 3600 IN SOA ns hostmaster 1 3600 600 86400 1\n"
    clock = ManualClock()
    with DnsResponder(zone, origin="neg.test.") as dns:
        r = resolver(dns, clock=clock)

        async def flow() -> None:
            for _ in range(3):
                with pytest.raises(RouteError, match="NXDOMAIN"):
                    await r.mx("new.neg.test", 25)
            assert dns.count("new.neg.test", "MX") == 1
            dns.set_zone(zone + "new 60 IN A 127.0.0.5\n")
            with pytest.raises(RouteError, match="NXDOMAIN"):
                await r.mx("new.neg.test", 25)  # still the cached NXDOMAIN
            clock.advance(1)  # the SOA minimum (1 s) is up
            assert (await r.mx_hosts("new.neg.test", 25))[0].address == "127.0.0.5"

        asyncio.run(flow())


def test_negative_ttl_is_capped() -> None:
    # The made-up SOA says one hour; the resolver keeps the NXDOMAIN for 0.5 s only.
    clock = ManualClock()
    with DnsResponder("", negative_ttl=3600) as dns:
        r = resolver(dns, max_negative_ttl=0.5, clock=clock)

        async def flow() -> None:
            with pytest.raises(RouteError, match="NXDOMAIN"):
                await r.mx("late.test", 25)
            dns.set_zone("late.test. 60 IN A 127.0.0.6\n")
            clock.advance(0.4)
            with pytest.raises(RouteError, match="NXDOMAIN"):
                await r.mx("late.test", 25)  # within the cap: still cached
            clock.advance(0.1)
            assert (await r.mx_hosts("late.test", 25))[0].address == "127.0.0.6"

        asyncio.run(flow())


def test_cache_is_bounded_lru(dns: DnsResponder) -> None:
    r = resolver(dns, max_entries=4)

    async def flow() -> None:
        await r.mx_hosts("implicit.test", 25)  # 2 entries: MX, ADDR
        await r.mx_hosts("v6.test", 25)  # 2 more
        await r.mx_hosts("implicit.test", 25)  # a hit: now the most recent
        await r.mx_hosts("alias.test", 25)  # 2 more: v6.test's entries go
        assert len(r) == 4
        await r.mx_hosts("implicit.test", 25)
        await r.mx_hosts("v6.test", 25)

    asyncio.run(flow())
    assert dns.count("implicit.test", "MX") == 1
    assert dns.count("v6.test", "MX") == 2


def test_concurrent_lookups_share_one_query(dns: DnsResponder) -> None:
    r = resolver(dns)

    async def flow() -> list[tuple[Host, ...]]:
        return list(await asyncio.gather(*(r.mx_hosts("implicit.test", 25) for _ in range(50))))

    results = asyncio.run(flow())
    assert all(len(hosts) == 2 for hosts in results)
    assert dns.count("implicit.test", "MX") == 1
    assert dns.count("implicit.test", "A") == 1


# --- the responder ------------------------------------------------------------------------


def test_large_answer_falls_back_to_tcp() -> None:
    # 120 A records do not fit 1232 octets of UDP: the responder sets TC and dnspython
    # asks again over TCP.
    zone = "".join(f"big.test. 60 IN A 127.0.1.{i}\n" for i in range(1, 121))
    with DnsResponder(zone) as dns:
        answer = asyncio.run(resolver(dns).mx("big.test", 25))
    assert answer.implicit and len(answer.hosts) == 120
    assert {h.address for h in answer.hosts} == {f"127.0.1.{i}" for i in range(1, 121)}


def test_responder_in_the_callers_loop() -> None:
    async def flow() -> tuple[Host, ...]:
        dns = DnsResponder("here.test. 60 IN A 127.0.0.7\n")
        address = await dns.start_async()
        try:
            return await MxResolver(address, timeout=0.5, lifetime=1).mx_hosts("here.test", 25)
        finally:
            await dns.stop_async()

    assert asyncio.run(flow()) == (Host("here.test", "127.0.0.7", 25, 0),)


def test_under_uvloop(dns: DnsResponder) -> None:
    hosts = uvloop.run(resolver(dns).mx_hosts("v6.test", 25))
    assert hosts == (Host("mx.v6.test", "2001:db8::6", 25, 5),)


def test_a_thousand_domains() -> None:
    zone = "".join(
        f"d{i}.test. 300 IN MX 10 mx{i % 100}.hosting.test.\n" for i in range(1000)
    ) + "".join(f"mx{j}.hosting.test. 300 IN A 127.0.2.{j}\n" for j in range(100))
    with DnsResponder(zone) as dns:
        r = MxResolver(dns.address, timeout=2, lifetime=5)
        limit = asyncio.Semaphore(100)

        async def one(i: int) -> tuple[Host, ...]:
            async with limit:
                return await r.mx_hosts(f"d{i}.test", 25)

        async def flow() -> list[tuple[Host, ...]]:
            return list(await asyncio.gather(*(one(i) for i in range(1000))))

        results = asyncio.run(flow())
        asked = sum(dns.queries.values())
    assert [hosts[0].address for hosts in results] == [f"127.0.2.{i % 100}" for i in range(1000)]
    # 1000 MX sets, and each provider host's addresses once (A and AAAA).
    assert asked == 1000 + 2 * 100


# --- through the configuration: --dns and --mx-port ---------------------------------------


def test_dns_and_mx_port_flags_through_the_router(dns: DnsResponder) -> None:
    config = load_config(None, {"--dns": hostport(dns.address), "--mx-port": "2525"})
    router = ConfiguredRouter(config, MxResolver.from_config(config, timeout=0.5, lifetime=1))
    assert router.destination("Implicit.Test.") == "implicit.test"
    route = asyncio.run(router.resolve("implicit.test"))
    assert route.connector == "" and route.site == "mx:implicit.test"
    assert [(h.address, h.port) for h in route.hosts] == [("127.0.0.20", 2525),
                                                          ("2001:db8::20", 2525)]  # fmt: skip
    err = failure(router.resolve("null.test"))
    assert err.code == 556


# --- answers from the cache alone (the scheduler's fast path) ----------------------------


def test_cache_only_answers_match_the_waiting_ones(dns: DnsResponder) -> None:
    r = resolver(dns)
    for domain in ("example.test", "implicit.test", "alias.test"):
        assert r.mx_cached(domain, 25) is None  # nothing cached: it would have to ask
    queries = sum(dns.queries.values())
    assert r.addresses_cached("192.0.2.7", 25) == (Host("192.0.2.7", "192.0.2.7", 25, 0),)
    assert r.addresses_cached("mx1.example.test", 25) is None
    assert sum(dns.queries.values()) == queries  # asking the cache sends no query

    async def both(domain: str) -> tuple[MxAnswer, MxAnswer | None]:
        waited = await r.mx(domain, 25)
        return waited, r.mx_cached(domain, 25)

    for domain in ("example.test", "implicit.test", "alias.test"):
        waited, cached = asyncio.run(both(domain))
        assert cached is not None
        assert (cached.site, cached.implicit) == (waited.site, waited.implicit)
        assert set(cached.hosts) == set(waited.hosts)
    assert r.addresses_cached("mx1.example.test", 25, 10) == (
        Host("mx1.example.test", "127.0.0.11", 25, 10),)
    assert sum(dns.queries.values()) > queries


def test_cache_only_answers_raise_cached_failures(dns: DnsResponder) -> None:
    r = resolver(dns)
    for domain, code in (("null.test", 556), ("no-such-domain.test", 550),
                         ("nothing.test", 550), ("dangling.test", 550)):
        assert failure(r.mx(domain, 25)).code == code
        with pytest.raises(RouteError) as info:
            r.mx_cached(domain, 25)
        assert (info.value.permanent, info.value.code) == (True, code)
    # A temporary failure is never cached: the cache has nothing to say.
    dns.servfail.add("mx.v6.test")
    assert not failure(r.mx("v6.test", 25)).permanent
    assert r.mx_cached("v6.test", 25) is None


def test_router_resolves_from_the_cache_alone(dns: DnsResponder, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "ferry.toml"
    path.write_text('[[send]]\nname = "relay"\naddress_spaces = ["*.smart.test"]\n'
                    'smarthosts = ["mx1.example.test:2526"]\n'
                    '[[send]]\nname = "mx"\naddress_spaces = ["*"]\n', encoding="utf-8")
    config = load_config(path, {"--dns": hostport(dns.address)})
    router = ConfiguredRouter(config, MxResolver.from_config(config, timeout=0.5, lifetime=1))
    assert router.resolve_cached("example.test") is None
    assert router.resolve_cached("a.smart.test") is None
    literal = router.resolve_cached("[192.0.2.1]")  # needs no DNS at all
    assert literal is not None and literal.hosts[0].address == "192.0.2.1"
    waited = run(router.resolve("example.test"))
    smart = run(router.resolve("a.smart.test"))
    cached = router.resolve_cached("example.test")
    assert isinstance(waited, Route) and cached is not None
    assert (cached.site, cached.connector) == (waited.site, "mx")
    cached_smart = router.resolve_cached("a.smart.test")
    assert cached_smart is not None and cached_smart == smart
    assert cached_smart.hosts == (Host("mx1.example.test", "127.0.0.11", 2526, 0),)
    assert router.resolve_cached("b.smart.test") is not None  # the smarthost's addresses
    err = failure(router.resolve("null.test"))
    with pytest.raises(RouteError) as info:
        router.resolve_cached("null.test")
    assert info.value.code == err.code == 556


def test_send_connector_port_beats_mx_port(dns: DnsResponder, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "ferry.toml"
    path.write_text(
        '[[send]]\nname = "lab"\naddress_spaces = ["*.test"]\nport = 2600\ntls = "required"\n'
        '[[send]]\nname = "rest"\naddress_spaces = ["*"]\n'
    )
    config = load_config(path, {"--dns": hostport(dns.address), "--mx-port": "2525"})
    router = ConfiguredRouter(config, MxResolver.from_config(config, timeout=0.5, lifetime=1))
    route = asyncio.run(router.resolve("v6.test"))
    assert (route.connector, route.tls) == ("lab", "required")
    assert route.hosts == (Host("mx.v6.test", "2001:db8::6", 2600, 5),)


# --- bounded queries in flight -----------------------------------------------------------


@pytest.mark.parametrize("max_queries", [2, 5])
def test_queries_in_flight_are_bounded(dns: DnsResponder, max_queries: int) -> None:
    names = [f"host{i}.example.test" for i in range(5)]
    for name in names:
        dns.drop.add(name)  # never answered: each query holds its slot until its timeout

    def asked() -> int:
        return sum(dns.count(name, "MX") for name in names)

    async def main() -> int:
        r = MxResolver(dns.address, timeout=5, lifetime=5,
                       max_queries=max_queries)
        tasks = [asyncio.ensure_future(r.mx_hosts(name, 25)) for name in names]
        try:
            await until(lambda: asked() >= max_queries, 5, "the queries within the bound")
            # Had the bound let more through, they went out with these, before the marker
            # query below; the responder reads its one socket in arrival order, so once the
            # marker is answered every earlier query has been counted.
            marker = MxResolver(dns.address, timeout=2, lifetime=2)
            assert await marker.mx_hosts("v6.test", 25)
            return asked()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    assert run(main()) == max_queries

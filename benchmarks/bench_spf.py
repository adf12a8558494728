"""SPF checks per second with the DNS answers cached, against the cached lookups alone.

A realistic record (two includes of a provider with ip4 ranges, an mx with two hosts, a
-all at the end) is served by a DnsResponder on loopback and looked up once; then
check_host() runs over and over for a client the record fails (every term is evaluated:
the worst case), and the baseline makes the same lookups straight from the Lookup's cache.
The ratio is what the evaluation adds to the lookups it cannot avoid; the figure per check
says whether the event loop is safe running it inline (well under a millisecond).

    .venv/bin/python benchmarks/bench_spf.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from engine.agents.dns import Lookup
from engine.agents.spf import check_host
from engine.testing.dns import DnsResponder

ZONE = """
example.org.          3600 IN TXT "v=spf1 include:_spf.provider.test include:_spf2.provider.test mx ip4:203.0.113.0/26 -all"
_spf.provider.test.   3600 IN TXT "v=spf1 ip4:198.51.100.0/25 ip4:198.51.100.128/26 ip6:2001:db8:1::/48 ~all"
_spf2.provider.test.  3600 IN TXT "v=spf1 ip4:192.0.2.0/27 ip4:192.0.2.64/27 ip4:192.0.2.128/27 ?all"
example.org.          3600 IN MX 10 mx1.example.org.
example.org.          3600 IN MX 20 mx2.example.org.
mx1.example.org.      3600 IN A 203.0.113.200
mx2.example.org.      3600 IN A 203.0.113.201
"""  # noqa: E501

CLIENT = "233.252.0.9"  # matches nothing: every term runs, the result is fail


async def rate(step: Callable[[], Awaitable[object]], seconds: float) -> float:
    """Best of five batches, in operations per second."""
    best = 0.0
    batch = 200
    for _ in range(5):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < seconds / 5:
            for _ in range(batch):
                await step()
            count += batch
        best = max(best, count / (time.perf_counter() - start))
    return best


async def main(seconds: float) -> None:
    with DnsResponder(ZONE) as dns:
        lookup = Lookup(dns.address)

        async def spf() -> object:
            return await check_host(lookup, CLIENT, "example.org", "user@example.org",
                                    "mta.example.net")

        async def lookups() -> object:
            for name in ("example.org", "_spf.provider.test", "_spf2.provider.test"):
                await lookup.query(name, "TXT")
            await lookup.query("example.org", "MX")
            for host in ("mx1.example.org", "mx2.example.org"):
                await lookup.query(host, "A")
            return None

        first = await spf()
        assert getattr(first, "result", "") == "fail", first
        sent = lookup.queries
        ferry = await rate(spf, seconds)
        base = await rate(lookups, seconds)
        assert lookup.queries == sent, "the benchmark must run from the cache"
    print(f"{'subject':34} {'ferry':>10} {'baseline':>10} {'ratio':>7}  unit")
    print(f"{'check_host, cached DNS (fail)':34} {ferry:10,.0f} {base:10,.0f} "
          f"{ferry / base:6.2f}x  checks/s (baseline: the 6 cached lookups alone)")
    print(f"{'time per check':34} {1e6 / ferry:10.1f} {1e6 / base:10.1f} {'':7}  µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per subject")
    asyncio.run(main(parser.parse_args().seconds))

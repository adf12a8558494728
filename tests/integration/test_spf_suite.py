"""The RFC 7208 test suite (openspf.org, release 2014.04, as pyspf's source distribution
ships it: test/rfc7208-tests.yml) against engine.agents.spf, every case on its own.

The YAML is not committed: tests/run.sh fetches pyspf's sdist into .cache/pyspf and
extracts the file.  Without it the test skips, except in CI (CI=true), where a missing
suite is a failure.

Each scenario's zonedata is served by a real DnsResponder on loopback and looked up through
a real engine.agents.dns.Lookup, the way pyspf's own driver (test/testspf.py) reads it:

* records of the obsolete SPF type (99) are served as type 99 and, when the name has no
  TXT entry, also as TXT ("auto-magic duplication", the suite's header); "TXT: NONE" means
  no TXT records;
* "TIMEOUT" in a name's list: the types listed before it are answered, every other type of
  that name fails.  It is served as SERVFAIL rather than silence: what a stub resolver gets
  from its recursive resolver when the authority times out, and as much a temporary DNS
  error (DnsTempError) as a client-side timeout, without a timeout's wait per case
  (tests/unit/test_spf.py checks that a real timeout is a temperror too);
* an MX target "" is the root (a null MX, RFC 7505);
* a TXT record of no character-strings ("null-text") is left out: dnspython can neither
  build nor parse one (RFC 1035 §3.3.14 wants one string at least); the case's other record
  still decides it.

A case passes when the result is one of its allowed results and, when the case names an
explanation, the explanation is that text ("DEFAULT" is the default explanation, which the
driver sets to "DEFAULT" as pyspf's does).  EXCEPTIONS lists the cases judged otherwise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import yaml  # type: ignore[import-untyped]  # (no stubs in the test extra)
from dns.rdtypes.ANY.SPF import SPF
from dns.rdtypes.ANY.TXT import TXT

from engine.agents.dns import Lookup
from engine.agents.spf import check_mail_from
from engine.testing.dns import DnsResponder

SUITE = Path(__file__).resolve().parents[2] / ".cache" / "pyspf" / "rfc7208-tests.yml"

#: Cases not judged by the plain rule, and why.  "casefold": the explanation is compared
#: without regard to case.
EXCEPTIONS: dict[str, tuple[str, str]] = {
    "v-macro-ip6": (
        "casefold",
        "the suite expects %{i}'s IPv6 nibbles in the case the host was written in "
        "(CAFE:BABE::1 → ...E.B.A.B.E.F.A.C), an artifact of pyspf; RFC 7208 §7.4's own "
        "example writes them in lower case, as we do, and DNS names are case-insensitive",
    ),
}

#: Every type a name can be asked for here; TIMEOUT fails those not listed before it.
_TYPES = ("A", "AAAA", "MX", "PTR", "TXT", "SPF", "CNAME")
_TTL = 300


@dataclass(frozen=True)
class Case:
    scenario: int
    name: str
    data: dict[str, Any]


@dataclass
class Zone:
    rrsets: list[dns.rrset.RRset]
    failing: list[tuple[str, str]]


def _load() -> tuple[list[dict[str, Any]], list[Case]]:
    if not SUITE.exists():
        return [], []
    with SUITE.open("rb") as f:
        scenarios = [s for s in yaml.safe_load_all(f) if s]
    cases = [
        Case(index, name, data)
        for index, scenario in enumerate(scenarios)
        for name, data in scenario["tests"].items()
    ]
    return scenarios, cases


SCENARIOS, CASES = _load()


def _owner(text: str) -> dns.name.Name:
    # From labels, not master-file text: the suite's names hold spaces, ":" and "/".
    labels = [label.encode("utf-8") for label in text.rstrip(".").split(".")]
    return dns.name.Name([*labels, b""])


def _rdata(rdtype: str, value: Any) -> dns.rdata.Rdata | None:
    rdclass = dns.rdataclass.IN
    kind = dns.rdatatype.from_text(rdtype)
    if rdtype in ("TXT", "SPF"):
        strings = [s.encode("utf-8") for s in value]
        if not strings:
            return None  # null text: see the module docstring
        text_class = TXT if rdtype == "TXT" else SPF
        return text_class(rdclass, kind, strings)
    # Host names as escaped master-file text of the exact labels.
    if rdtype == "MX":
        preference, host = value
        target = _owner(host) if host else dns.name.root
        return dns.rdata.from_text(rdclass, kind, f"{preference} {target.to_text()}")
    if rdtype in ("PTR", "CNAME"):
        return dns.rdata.from_text(rdclass, kind, _owner(value).to_text())
    return dns.rdata.from_text(rdclass, kind, value)


def build_zone(zonedata: dict[str, list[Any]]) -> Zone:
    """The records and failures of one scenario, read as testspf.py's getrdata() and
    DNSLookup() read them."""
    zone = Zone([], [])
    for name, entries in zonedata.items():
        owner = _owner(name)
        records: list[tuple[str, Any]] = []
        generated: list[tuple[str, Any]] = []
        has_txt = False
        timeout_after: int | None = None
        for entry in entries:
            if entry == "TIMEOUT":
                timeout_after = len(records)
                continue
            ((rdtype, value),) = entry.items()
            if rdtype in ("TXT", "SPF") and isinstance(value, str):
                value = (value,)
            if rdtype == "TXT":
                has_txt = True
            elif rdtype == "SPF":
                generated.append(("TXT", value))
            if value != ("NONE",):
                records.append((rdtype, value))
        answered = {rdtype for rdtype, _ in records[:timeout_after]}
        if not has_txt:
            records.extend(generated)
        for rdtype, value in records:
            rdata = _rdata(rdtype, value)
            if rdata is not None:
                zone.rrsets.append(dns.rrset.from_rdata(owner, _TTL, rdata))
        if timeout_after is not None:
            zone.failing.extend((name, t) for t in _TYPES if t not in answered)
    return zone


@pytest.fixture(scope="module")
def responder() -> Iterator[DnsResponder]:
    with DnsResponder("") as server:
        yield server


_zones: dict[int, Zone] = {}


def _serve(responder: DnsResponder, scenario: int) -> None:
    zone = _zones.get(scenario)
    if zone is None:
        zone = _zones[scenario] = build_zone(SCENARIOS[scenario]["zonedata"])
    responder.set_rrsets(zone.rrsets)
    responder.servfail.clear()
    for name, rdtype in zone.failing:
        responder.servfail.add(name, rdtype)


def _missing() -> None:
    message = (f"{SUITE} is missing: tests/run.sh fetches it (pip download pyspf==2.0.14, "
               "then extracts test/rfc7208-tests.yml)")
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES or [None], ids=[c.name for c in CASES] or ["missing"])
def test_rfc7208_case(case: Case | None, responder: DnsResponder) -> None:
    if case is None:
        _missing()
        return
    _serve(responder, case.scenario)
    data = case.data
    lookup = Lookup(responder.address, timeout=2.0, lifetime=4.0)

    result = asyncio.run(check_mail_from(
        lookup, data["host"], data["mailfrom"], data["helo"], default_explanation="DEFAULT"))

    allowed = data["result"] if isinstance(data["result"], list) else [data["result"]]
    assert result.result in allowed, (
        f"{case.name} ({data.get('spec')}): {result.result} not in {allowed}; "
        f"problem={result.problem!r} mechanism={result.mechanism!r}")
    expected = data.get("explanation")
    if expected is not None:
        kind = EXCEPTIONS.get(case.name, ("", ""))[0]
        if kind == "casefold":
            assert result.explanation.casefold() == expected.casefold()
        else:
            assert result.explanation == expected


def test_suite_is_complete() -> None:
    """The whole suite loaded, and every exception names one of its cases (a stale entry
    is an error)."""
    if not CASES:
        _missing()
        return
    names = {case.name for case in CASES}
    assert len(CASES) >= 200, "the 2014.04 release has 204 cases: a truncated file?"
    assert set(EXCEPTIONS) <= names
    assert len(names) == len(CASES), "case names must be unique to be parametrized"

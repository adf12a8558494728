"""Outbound TLS policy (engine.tlspolicy) over real sockets, real DNS and real TLS.

The next hops are aiosmtpd servers with STARTTLS (or implicit TLS) and certificates from
a trustme CA that match, mismatch or come from a CA nobody trusts; the MTA-STS policy
host is an aiohttp HTTPS server on 127.0.0.1 with a certificate from the same CA; the DNS
answers (MX, A, TXT, TLSA, with and without the AD bit, SERVFAIL) come from a
DnsResponder on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine.client.api import FollowOn, FollowOns, RcptResult
from engine.client.smtp import SmtpAgent
from engine.config import ConfigError, load_config
from engine.ops.events import Events
from engine.queue.records import Envelope, RcptState, Recipient
from engine.routing.api import Host, Route
from engine.routing.mx import MxResolver
from engine.scheduler.facts import outcomes
from engine.testing.dns import DnsResponder
from engine.testing.events import Recorder
from engine.testing.wait import until
from engine.tlspolicy.policy import TlsPolicy
from engine.tlspolicy.sts import StsCache, StsError, parse_policy, parse_txt
from engine.tlspolicy.tlsrpt import TlsReports, parse_rua

BODY = b"Subject: t\r\n\r\nhello\r\n"
DELIVERED, DEFERRED = RcptState.DELIVERED, RcptState.DEFERRED


def run(coro: Awaitable[Any], limit: float = 60) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await coro

    return uvloop.run(bounded())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Handler:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bool]] = []

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        responses.insert(1, "250-PIPELINING")  # so that follow-on messages may ride along
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), session.ssl is not None))
        return "250 2.0.0 Ok"


class Lab:
    """A CA, certificate files and SMTP servers that use them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.stranger = trustme.CA()  # a CA nobody trusts: "self-signed" for the client
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.servers: list[Controller] = []

    def context(self, name: str, *more: str, ca: trustme.CA | None = None,
                with_root: bool = False) -> tuple[ssl.SSLContext, bytes]:
        """A server context for ``name`` and the DER of its leaf certificate; ``with_root``
        sends the root CA in the chain (DANE-TA needs it, RFC 7672 §3.1.2)."""
        ca = ca or self.ca
        leaf = ca.issue_cert(name, *more)
        pem = leaf.private_key_and_cert_chain_pem.bytes()
        if with_root:
            pem += ca.cert_pem.bytes()
        path = self.tmp / f"{name}-{id(leaf)}.pem"
        path.write_bytes(pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(path))
        der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
            Encoding.DER)
        return context, der

    def smtp(self, context: ssl.SSLContext | None = None) -> tuple[int, Handler]:
        """An aiosmtpd server offering STARTTLS with ``context``, in its own thread."""
        handler = Handler()
        controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                                server_hostname="sink.test", tls_context=context)
        controller.start()
        self.servers.append(controller)
        return controller.port, handler

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.stop()


def envelope() -> Envelope:
    return Envelope("a@client.test", [Recipient("u@sts.test", "sts.test")])


def route(destination: str, *hosts: tuple[str, int], tls: str = "opportunistic",
          **kw: Any) -> Route:
    site = "mx:" + ",".join(sorted({name for name, _ in hosts}))
    return Route(destination, kw.pop("site", site),
                 tuple(Host(name, "127.0.0.1", port) for name, port in hosts),
                 tls=tls, **kw)  # type: ignore[arg-type]


async def deliver(agent: SmtpAgent, r: Route) -> RcptResult:
    (result,) = await agent.deliver(r, envelope(), [0], BODY)
    return result


# --- MTA-STS ------------------------------------------------------------------------------

POLICY = ("version: STSv1\r\nmode: {mode}\r\nmx: mx1.sts.test\r\nmx: *.good.sts.test\r\n"
          "max_age: 86400\r\n")


class PolicyHost:
    """The HTTPS server of mta-sts.sts.test, in the test's loop."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.text = POLICY.format(mode="enforce")
        self.content_type = "text/plain"
        self.fetched = 0
        #: TLS-RPT reports POSTed to /tlsrpt: (content type, body).
        self.posted: list[tuple[str, bytes]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _policy(self, request: web.Request) -> web.Response:
        self.fetched += 1
        assert request.host.startswith("mta-sts.sts.test")
        return web.Response(text=self.text, content_type=self.content_type)

    async def _report(self, request: web.Request) -> web.Response:
        self.posted.append((request.content_type, await request.read()))
        return web.Response(status=201)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        app.router.add_post("/tlsrpt", self._report)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


STS_ZONE = """
$TTL 60
_mta-sts.sts.test. 1 IN TXT "v=STSv1; id={id};"
mta-sts.sts.test. IN A 127.0.0.1
"""


class StsLab:
    def __init__(self, lab: Lab, dns: DnsResponder, host: PolicyHost, tmp: Path) -> None:
        self.lab, self.dns, self.host = lab, dns, host
        self.mx = MxResolver(dns.address)
        self.sts = StsCache(self.mx, ca_file=str(lab.ca_file),
                            timeout=5, max_size=65536, port=host.port,
                            path=tmp / "mta-sts.json")
        self.recorder = Recorder()
        self.policy = TlsPolicy(sts=self.sts, resolver=self.mx)
        self.agent = SmtpAgent("client.test", timeout_scale=0.01, connect_timeout=500,
                               ca_file=str(lab.ca_file), tls_policy=self.policy,
                               events=Events([self.recorder]))

    def reports(self) -> list[dict[str, Any]]:
        return [e for e in self.recorder.of("TLS_FAIL") if e["tls"] == "mta-sts-testing"]


@pytest.fixture
def sts_lab(lab: Lab, tmp_path: Path) -> Callable[[], Any]:
    """An async context: the DNS, the policy host and an agent with a TLS policy."""
    import contextlib

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[StsLab]:
        dns = DnsResponder(STS_ZONE.format(id="1"))
        await dns.start_async()
        context, _ = lab.context("mta-sts.sts.test", "127.0.0.1")
        host = PolicyHost(context)
        await host.start()
        sl = StsLab(lab, dns, host, tmp_path)
        try:
            yield sl
        finally:
            await sl.agent.close()
            await host.stop()
            await dns.stop_async()

    return start


def test_enforce_refuses_unlisted_and_bad_certificates_and_delivers_to_a_good_one(
        lab: Lab, sts_lab: Callable[[], Any]) -> None:
    good, good_handler = lab.smtp(lab.context("mx1.sts.test")[0])
    wrong_name, wrong_handler = lab.smtp(lab.context("other.test")[0])
    stranger, stranger_handler = lab.smtp(lab.context("mx2.good.sts.test", ca=lab.stranger)[0])

    async def go() -> tuple[RcptResult, ...]:
        async with sts_lab() as sl:
            unlisted = await deliver(sl.agent, route("sts.test", ("mx.evil.test", good)))
            mismatch = await deliver(sl.agent, route("sts.test", ("mx3.good.sts.test", wrong_name)))
            untrusted = await deliver(sl.agent, route("sts.test", ("mx2.good.sts.test", stranger)))
            delivered = await deliver(sl.agent, route("sts.test", ("mx1.sts.test", good)))
            assert sl.host.fetched == 1  # one fetch, cached for the others
            return unlisted, mismatch, untrusted, delivered

    unlisted, mismatch, untrusted, delivered = run(go())
    assert unlisted.state is DEFERRED
    assert unlisted.reply.startswith("451 4.7.5 mx.evil.test is not an MX host listed by the "
                                     "MTA-STS policy of sts.test")
    for refused in (mismatch, untrusted):
        assert refused.state is DEFERRED and refused.reply.startswith("451 4.7.5 TLS handshake")
        assert "required by the MTA-STS policy of sts.test" in refused.reply
    assert not wrong_handler.messages and not stranger_handler.messages
    assert delivered.state is DELIVERED and good_handler.messages == [(["u@sts.test"], True)]
    assert delivered.peer is not None and delivered.peer.tls_verified == "mta-sts"
    assert delivered.peer.tls.startswith("TLS")


def test_testing_mode_delivers_and_reports(lab: Lab, sts_lab: Callable[[], Any]) -> None:
    stranger, handler = lab.smtp(lab.context("mx1.sts.test", ca=lab.stranger)[0])

    async def go() -> tuple[RcptResult, list[dict[str, Any]]]:
        async with sts_lab() as sl:
            sl.host.text = POLICY.format(mode="testing")
            result = await deliver(sl.agent, route("sts.test", ("mx.evil.test", stranger)))
            assert sl.agent.events is not None
            sl.agent.events.flush()
            return result, sl.reports()

    result, reports = run(go())
    assert result.state is DELIVERED and handler.messages == [(["u@sts.test"], True)]
    assert result.peer is not None and result.peer.tls_verified == ""
    reasons = [r["reason"] for r in reports]
    assert any("not listed by the MTA-STS policy of sts.test" in r for r in reasons), reasons
    assert any("certificate not valid for mx.evil.test" in r for r in reasons), reasons
    assert all(r["destination"] == "sts.test" for r in reports)


def test_a_new_policy_id_is_picked_up(lab: Lab, sts_lab: Callable[[], Any],
                                      tmp_path: Path) -> None:
    _good, _handler = lab.smtp(lab.context("mx1.sts.test")[0])
    moved, moved_handler = lab.smtp(lab.context("mx9.sts.test")[0])

    async def go() -> tuple[RcptResult, RcptResult, int]:
        async with sts_lab() as sl:
            first = await deliver(sl.agent, route("sts.test", ("mx9.sts.test", moved)))
            sl.host.text = POLICY.replace("mx1.sts.test", "mx9.sts.test").format(mode="enforce")
            sl.dns.set_zone(STS_ZONE.format(id="2"))
            # The TXT record's TTL is 1 s: wait for the decision that has the new id.
            async with asyncio.timeout(15):
                while True:
                    decision = await sl.policy.decision(route("sts.test", ("mx9.sts.test", moved)))
                    if decision.sts is not None and decision.sts.id == "2":
                        break
                    await asyncio.sleep(0.2)
            second = await deliver(sl.agent, route("sts.test", ("mx9.sts.test", moved)))
            return first, second, sl.host.fetched

    first, second, fetched = run(go())
    assert first.state is DEFERRED and "not an MX host listed" in first.reply
    assert second.state is DELIVERED and moved_handler.messages
    assert fetched == 2
    kept = (tmp_path / "mta-sts.json").read_text()
    assert '"id": "2"' in kept and "mx9.sts.test" in kept  # kept in the spool for a restart


def test_domains_without_a_policy_share_the_site_pool(lab: Lab,
                                                     sts_lab: Callable[[], Any]) -> None:
    """Equal decisions are one pool: domains hosted at one site reuse its connections,
    and a domain with an MTA-STS policy gets connections of its own."""
    port, handler = lab.smtp(lab.context("mx1.sts.test")[0])

    async def go() -> tuple[list[RcptResult], int, int]:
        async with sts_lab() as sl:
            out = [await deliver(sl.agent, route(d, ("mx1.sts.test", port), site="mx:shared"))
                   for d in ("a.test", "b.test")]
            shared = sl.agent.connections_opened
            out.append(await deliver(sl.agent, route("sts.test", ("mx1.sts.test", port),
                                                     site="mx:shared")))
            return out, shared, sl.agent.connections_opened

    results, shared, total = run(go())
    assert [r.state for r in results] == [DELIVERED] * 3
    assert shared == 1 and total == 2 and len(handler.messages) == 3
    assert results[2].peer is not None and results[2].peer.tls_verified == "mta-sts"


def test_a_follow_on_for_a_domain_under_another_policy_is_not_taken(
        lab: Lab, sts_lab: Callable[[], Any]) -> None:
    """The scheduler offers the next messages for the same site and route TLS; one for a
    domain with an MTA-STS policy must not ride on a connection made without it."""
    port, handler = lab.smtp(lab.context("mx1.sts.test")[0])

    def job(domain: str) -> FollowOn:
        return FollowOn(Envelope("a@client.test", [Recipient(f"u@{domain}", domain)]), [0],
                        BODY)

    async def go() -> tuple[RcptResult, list[RcptResult], FollowOns]:
        async with sts_lab() as sl:
            # Decisions known for both (as after earlier deliveries).
            await sl.policy.decision(route("sts.test", ("mx1.sts.test", port), site="mx:s"))
            policied, plain = job("sts.test"), job("a.test")
            follow: FollowOns = deque([plain, policied])
            first = (await sl.agent.deliver(route("a.test", ("mx1.sts.test", port),
                                                  site="mx:s"),
                                            Envelope("a@client.test",
                                                     [Recipient("v@a.test", "a.test")]),
                                            [0], BODY, follow))[0]
            taken = await sl.agent.resume(plain) if plain.handle is not None else []
            return first, taken, follow

    first, taken, follow = run(go())
    assert first.state is DELIVERED
    assert [r.state for r in taken] == [DELIVERED]  # same decision: rode along
    assert [j.envelope.recipients[0].address for j in follow] == ["u@sts.test"]  # left
    assert follow[0].handle is None
    assert sorted(m[0][0] for m in handler.messages) == ["u@a.test", "v@a.test"]


def test_the_sts_record_is_looked_up_beside_the_mx_records(lab: Lab,
                                                           sts_lab: Callable[[], Any]) -> None:
    async def go() -> tuple[int, int, bool]:
        async with sts_lab() as sl:
            sl.dns.set_zone(STS_ZONE.format(id="1") + "sts.test. IN MX 10 mx1.sts.test.\n"
                            "mx1.sts.test. IN A 127.0.0.1\n")
            sl.mx.prefetch = sl.sts.prefetch
            await sl.mx.mx("sts.test", 25)
            # Started with the MX lookup, before any delivery asked for a decision.
            await until(lambda: sl.sts.cached("sts.test", 0.0), 10, "the prefetched look")
            found = sl.sts.cached("sts.test", 0.0)
            return (sl.dns.count("_mta-sts.sts.test", "TXT"), sl.host.fetched,
                    found is not None and found[0] is not None)

    txt, fetched, has_policy = run(go())
    assert (txt, fetched, has_policy) == (1, 1, True)


def test_tls_rpt_reports_the_sessions_under_a_policy(lab: Lab,
                                                     sts_lab: Callable[[], Any]) -> None:
    """RFC 8460: per policy, the successful and failed sessions with the failures'
    result types, gzip JSON POSTed to the domain's https rua."""
    import gzip
    import json

    good, _ = lab.smtp(lab.context("mx1.sts.test")[0])
    stranger, _ = lab.smtp(lab.context("mx2.good.sts.test", ca=lab.stranger)[0])

    async def go() -> tuple[int, list[tuple[str, bytes]]]:
        async with sts_lab() as sl:
            sl.dns.set_zone(STS_ZONE.format(id="1") + f"""
_smtp._tls.sts.test. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@sts.test,https://127.0.0.1:{sl.host.port}/tlsrpt"
""")
            reports = TlsReports(sl.mx, organization="ferry.test", contact="pm@ferry.test",
                                 interval=3600, ca_file=str(lab.ca_file))
            sl.policy.reports = reports
            await deliver(sl.agent, route("sts.test", ("mx1.sts.test", good)))
            await deliver(sl.agent, route("sts.test", ("mx2.good.sts.test", stranger)))
            await deliver(sl.agent, route("sts.test", ("mx.evil.test", good)))
            return await reports.send_now(), sl.host.posted

    sent, posted = run(go())
    assert sent == 1 and len(posted) == 1
    content_type, body = posted[0]
    assert content_type == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(body))
    assert report["organization-name"] == "ferry.test"
    assert report["contact-info"] == "pm@ferry.test"
    (entry,) = report["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["policy-domain"] == "sts.test"
    assert "mode: enforce" in entry["policy"]["policy-string"]
    assert entry["policy"]["mx-host"] == ["mx1.sts.test", "*.good.sts.test"]
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": 2}
    kinds = {(d["result-type"], d["receiving-mx-hostname"], d["failed-session-count"])
             for d in entry["failure-details"]}
    assert kinds == {("certificate-not-trusted", "mx2.good.sts.test", 1),
                     ("validation-failure", "mx.evil.test", 1)}


def test_tls_rpt_record_parsing() -> None:
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@b.test, https://r.test/x"]) == (
        "mailto:a@b.test", "https://r.test/x")
    assert parse_rua(["v=TLSRPTv1;rua=https://a", "v=TLSRPTv1;rua=https://b"]) == ()
    assert parse_rua(["v=spf1 -all"]) == ()


def test_kept_policy_survives_a_restart_and_txt_removal(lab: Lab, tmp_path: Path) -> None:
    """RFC 8461 §5.1: a policy within its max_age stays in force when the TXT record goes
    (an attacker may strip it); the spool file carries it across a restart."""
    import json
    import time

    (tmp_path / "mta-sts.json").write_text(json.dumps({"sts.test": {
        "id": "1", "text": POLICY.format(mode="enforce"), "expires": time.time() + 3600}}))
    good, _handler = lab.smtp(lab.context("mx1.sts.test")[0])

    async def go() -> RcptResult:
        dns = DnsResponder("$TTL 60\nother.test. IN A 127.0.0.1\n")
        await dns.start_async()
        mx = MxResolver(dns.address)
        sts = StsCache(mx, ca_file=str(lab.ca_file), timeout=5,
                       max_size=65536, port=9, path=tmp_path / "mta-sts.json")
        agent = SmtpAgent("client.test", timeout_scale=0.01, ca_file=str(lab.ca_file),
                          tls_policy=TlsPolicy(sts=sts, resolver=mx))
        try:
            return await deliver(agent, route("sts.test", ("mx.evil.test", good)))
        finally:
            await agent.close()
            await dns.stop_async()

    refused = run(go())
    assert refused.state is DEFERRED and "not an MX host listed" in refused.reply


def test_policy_fetch_limits_and_strict_parsing(lab: Lab, sts_lab: Callable[[], Any]) -> None:
    good, _handler = lab.smtp(lab.context("mx.evil.test")[0])

    async def go(text: str, content_type: str = "text/plain") -> RcptResult:
        async with sts_lab() as sl:
            sl.host.text, sl.host.content_type = text, content_type
            sl.sts.max_size = 200
            return await deliver(sl.agent, route("sts.test", ("mx.evil.test", good)))

    # No usable policy (too large, wrong type, broken): delivered as without MTA-STS.
    assert run(go(POLICY.format(mode="enforce") + "x: " + "y" * 300)).state is DELIVERED
    assert run(go(POLICY.format(mode="enforce"), "text/html")).state is DELIVERED
    assert run(go(POLICY.format(mode="enforce").replace("STSv1", "STSv2"))).state is DELIVERED
    assert run(go(POLICY.format(mode="enforce"))).state is DEFERRED


@pytest.mark.parametrize(("text", "why"), [
    ("version: STSv1\nmode: enforce\nmax_age: 10\n", "no mx"),
    ("version: STSv1\nmode: hard\nmx: a.test\nmax_age: 10\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 99999999999\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n", "mx pattern"),
    ("mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode enforce\n", "colon"),
])
def test_policy_parser_is_strict(text: str, why: str) -> None:
    with pytest.raises(StsError, match=why):
        parse_policy("a.test", text)


def test_policy_parser_and_txt() -> None:
    policy = parse_policy("a.test", "version: STSv1\r\nmode: enforce\r\nmx: *.a.test\r\n"
                                    "max_age: 60\r\nextension: ignored\r\n", "x")
    assert policy is not None and policy.allows("mx.a.test") and policy.allows("MX.A.TEST.")
    assert not policy.allows("a.b.a.test") and not policy.allows("a.test")
    assert parse_policy("a.test", "version: STSv1\nmode: none\nmax_age: 5\n") is None
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: none
    assert parse_txt(["v=STSv1; id=bad-id"]) is None
    assert parse_txt(["other", "v=STSv1;id=ok"]) == "ok"


# --- DANE ---------------------------------------------------------------------------------


def tlsa_zone(port: int, records: str) -> str:
    return f"""
$TTL 60
dane.test. IN MX 10 mx1.dane.test.
mx1.dane.test. IN A 127.0.0.1
_{port}._tcp.mx1.dane.test. IN TLSA {records}
"""


def spki_sha256(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def dane_deliver(port: int, records: str, *, authentic: bool = True,
                 servfail: bool = False, level: str = "dane") -> RcptResult:
    async def go() -> RcptResult:
        dns = DnsResponder(tlsa_zone(port, records))
        dns.authentic = authentic
        if servfail:
            dns.servfail.add(f"_{port}._tcp.mx1.dane.test", "TLSA")
        await dns.start_async()
        mx = MxResolver(dns.address, validating=True)
        agent = SmtpAgent("client.test", timeout_scale=0.01, connect_timeout=500,
                          tls_policy=TlsPolicy(resolver=mx))
        try:
            answer = await mx.mx("dane.test", port)
            return await deliver(agent, Route("dane.test", answer.site, answer.hosts,
                                              tls=level))  # type: ignore[arg-type]
        finally:
            await agent.close()
            await dns.stop_async()

    result: RcptResult = run(go())
    return result


def test_dane_ee_match_and_mismatch(lab: Lab) -> None:
    context, der = lab.context("mx1.dane.test", ca=lab.stranger)  # DANE-EE needs no CA
    port, handler = lab.smtp(context)
    matched = dane_deliver(port, f"3 1 1 {spki_sha256(der)}")
    assert matched.state is DELIVERED and matched.peer is not None
    assert matched.peer.tls_verified == "dane-ee"
    wrong = dane_deliver(port, f"3 1 1 {'00' * 32}")
    assert wrong.state is DEFERRED
    assert wrong.reply.startswith("451 4.7.5 DANE authentication of mx1.dane.test")
    assert "required by DANE TLSA records of mx1.dane.test" in wrong.reply
    assert len(handler.messages) == 1
    # Full certificate, SHA2-512, as well.
    full = dane_deliver(port, f"3 0 2 {hashlib.sha512(der).hexdigest()}", level="may")
    assert full.state is DELIVERED and full.peer is not None
    assert full.peer.tls_verified == "dane-ee"  # "may" is DANE with a validating resolver


def test_dane_ta_match_and_mismatch(lab: Lab) -> None:
    context, _ = lab.context("mx1.dane.test", with_root=True)
    port, handler = lab.smtp(context)
    root = x509.load_pem_x509_certificate(lab.ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    other = x509.load_pem_x509_certificate(lab.stranger.cert_pem.bytes()).public_bytes(
        Encoding.DER)
    matched = dane_deliver(port, f"2 0 1 {hashlib.sha256(root).hexdigest()}")
    assert matched.state is DELIVERED and matched.peer is not None
    assert matched.peer.tls_verified == "dane-ta"
    wrong = dane_deliver(port, f"2 0 1 {hashlib.sha256(other).hexdigest()}")
    assert wrong.state is DEFERRED and "DANE authentication" in wrong.reply
    # The anchor matches but the certificate is for another name: refused too.
    named, _ = lab.context("elsewhere.test", with_root=True)
    port2, handler2 = lab.smtp(named)
    misnamed = dane_deliver(port2, f"2 0 1 {hashlib.sha256(root).hexdigest()}")
    assert misnamed.state is DEFERRED and "DANE-TA" in misnamed.reply
    assert len(handler.messages) == 1 and not handler2.messages


def test_tlsa_servfail_defers_and_no_ad_bit_is_ignored(lab: Lab) -> None:
    context, _ = lab.context("mx1.dane.test")
    port, handler = lab.smtp(context)
    failed = dane_deliver(port, f"3 1 1 {'00' * 32}", servfail=True)
    assert failed.state is DEFERRED
    assert failed.reply.startswith("451 4.7.5 TLSA lookup for mx1.dane.test")
    assert not handler.messages
    # Without the AD bit the (mismatching) records are not trusted: plain "may" delivery.
    unsigned = dane_deliver(port, f"3 1 1 {'00' * 32}", authentic=False)
    assert unsigned.state is DELIVERED and unsigned.peer is not None
    assert unsigned.peer.tls_verified == "" and unsigned.peer.tls
    # dane-only without validated TLSA: deferred, never delivered in the clear.
    only = dane_deliver(port, f"3 1 1 {'00' * 32}", authentic=False, level="dane-only")
    assert only.state is DEFERRED and "dane-only" in only.reply
    assert len(handler.messages) == 1


# --- levels, failure memory, implicit TLS, the tracking field -------------------------------


def test_per_domain_levels_override_the_route(lab: Lab) -> None:
    port, handler = lab.smtp(lab.context("mx1.sts.test")[0])

    async def go(overrides: dict[str, str]) -> RcptResult:
        agent = SmtpAgent("client.test", timeout_scale=0.01, ca_file=str(lab.ca_file),
                          tls_policy=TlsPolicy(overrides=overrides))
        try:
            return await deliver(agent, route("sts.test", ("mx1.sts.test", port),
                                              site="smarthost:x"))
        finally:
            await agent.close()

    plain = run(go({"sts.test": "none"}))
    assert plain.state is DELIVERED and handler.messages[-1][1] is False
    verified = run(go({"sts.test": "verify"}))
    assert verified.state is DELIVERED and handler.messages[-1][1] is True
    assert verified.peer is not None and verified.peer.tls_verified == "ca"
    other = run(go({"other.test": "none"}))
    assert other.state is DELIVERED and handler.messages[-1][1] is True  # the route's "may"


def test_a_failed_handshake_is_remembered_at_level_may(lab: Lab) -> None:
    context, _ = lab.context("mx1.sts.test")
    # TLS 1.2 with a client certificate demanded: the handshake fails (we present none).
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=lab.ca.cert_pem.bytes().decode())
    port, handler = lab.smtp(context)

    async def go(memory: float) -> tuple[RcptResult, RcptResult]:
        policy = TlsPolicy(failure_memory=memory)
        agent = SmtpAgent("client.test", timeout_scale=0.01, tls_policy=policy)
        r = route("sts.test", ("mx1.sts.test", port))
        try:
            return await deliver(agent, r), await deliver(agent, r)
        finally:
            await agent.close()

    first, second = run(go(600))
    assert first.state is DEFERRED and "TLS handshake" in first.reply
    assert second.state is DELIVERED and handler.messages == [(["u@sts.test"], False)]
    first, second = run(go(0))  # memory off: every attempt tries TLS again
    assert first.state is DEFERRED and second.state is DEFERRED


def test_implicit_tls_to_a_smarthost(lab: Lab) -> None:
    """RFC 8314 §3.3: TLS from the first byte; the aiosmtpd server runs in the test's
    loop behind a TLS listening socket (its Controller cannot probe an implicit TLS port)."""
    context, _ = lab.context("relay.test")
    handler = Handler()

    async def go(tls: str) -> RcptResult:
        server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(handler, hostname="relay.test"), "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        agent = SmtpAgent("client.test", timeout_scale=0.01, ca_file=str(lab.ca_file),
                          tls_policy=TlsPolicy())
        try:
            return await deliver(agent, route("sts.test", ("relay.test", port), tls=tls,
                                              site="smarthost:relay.test:465",
                                              implicit_tls=True))
        finally:
            await agent.close()
            server.close()

    result = run(go("verify"))
    assert result.state is DELIVERED and [m[0] for m in handler.messages] == [["u@sts.test"]]
    assert result.peer is not None and result.peer.tls_verified == "ca"
    assert result.peer.tls.startswith("TLS")
    wrong = run(go_wrong_name(lab, handler))
    assert wrong.state is DEFERRED and wrong.reply.startswith("451 4.7.5 TLS handshake")


async def go_wrong_name(lab: Lab, handler: Handler) -> RcptResult:
    """The same server presenting a certificate for another name: refused at connect,
    and a TLS_FAIL record says so."""
    context, _ = lab.context("other.test")
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, hostname="relay.test"), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    recorder = Recorder()
    events = Events([recorder])
    agent = SmtpAgent("client.test", timeout_scale=0.01, ca_file=str(lab.ca_file),
                      tls_policy=TlsPolicy(), events=events)
    try:
        result = await deliver(agent, route("sts.test", ("relay.test", port), tls="verify",
                                            site="smarthost:relay.test:465",
                                            implicit_tls=True))
    finally:
        await agent.close()
        server.close()
    events.flush()
    (failed,) = recorder.of("TLS_FAIL")
    assert failed["level"] == "verify" and failed["reason"] == result.reply
    return result


def test_deliver_record_carries_tls_verified() -> None:
    from engine.client.api import Peer
    from engine.queue.api import Outcome

    env = envelope()
    peer = Peer("mx1.sts.test", "127.0.0.1:25", "TLSv1.3 TLS_AES_256_GCM_SHA384", "mta-sts")
    result = RcptResult(0, DELIVERED, "250 ok", peer=peer)
    recorded = [Outcome(b"q", 0, DELIVERED, "250 ok")]
    ((kind, _, _, fields),) = outcomes(env, [result], recorded,
                                       route("sts.test", ("mx1.sts.test", 25)), 0.0)
    assert kind == "DELIVER" and fields["tls_verified"] == "mta-sts"
    assert fields["tls"] == "TLSv1.3 TLS_AES_256_GCM_SHA384"


def test_config_levels_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text("""
[delivery]
dnssec_validating = true
tls_failure_memory = "5m"
[delivery.tls_policy]
"Bank.Test." = "dane-only"
"legacy.test" = "required"
[[send]]
name = "relay"
address_spaces = ["*"]
smarthosts = ["relay.test:465"]
implicit_tls = true
tls = "verify"
""")
    config = load_config(path)
    assert dict(config.delivery.tls_policy) == {"bank.test": "dane-only",
                                                "legacy.test": "required"}
    assert config.send[0].implicit_tls and config.delivery.tls_failure_memory == 300
    path.write_text("""
[delivery.tls_policy]
"a.test" = "strict"
[[send]]
name = "mx"
address_spaces = ["*"]
implicit_tls = true
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert 'delivery.tls_policy: "a.test": must be one of' in text and '"strict"' in text
    assert "send[0].implicit_tls: applies to smarthosts only" in text


# --- the whole server, from its configuration file ------------------------------------------


def test_a_running_ferry_honours_mta_sts_and_levels_from_its_file(lab: Lab,
                                                                  tmp_path: Path) -> None:
    """Keys from the file reach the delivery: MTA-STS (ca_file for the lab's CA, the
    policy port), a per-domain level; DELIVER records say how TLS was verified."""
    import smtplib
    import threading

    from engine.testing.server import RunningFerry
    from engine.testing.wait import wait_for

    port, handler = lab.smtp(lab.context("mx1.sts.test")[0])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    host = PolicyHost(lab.context("mta-sts.sts.test")[0])
    asyncio.run_coroutine_threadsafe(host.start(), loop).result(30)
    dns = DnsResponder(STS_ZONE.format(id="1") + """
sts.test. IN MX 10 mx1.sts.test.
plain.test. IN MX 10 mx1.sts.test.
mx1.sts.test. IN A 127.0.0.1
""")
    dns_host, dns_port = dns.start()
    recorder = Recorder()
    path = tmp_path / "ferry.toml"
    path.write_text(f"""
hostname = "ferry.test"
spool = "spool"
[queue]
min_free_disk = 0
[delivery]
dns = "{dns_host}:{dns_port}"
mx_port = {port}
ca_file = "{lab.ca_file}"
mta_sts_port = {host.port}
[delivery.tls_policy]
"plain.test" = "none"
[[receive]]
listen = ["127.0.0.1:0"]
relay_networks = ["127.0.0.0/8"]
""")
    try:
        with RunningFerry(load_config(path), [recorder]) as ferry:
            with smtplib.SMTP(ferry.host, ferry.port, timeout=30) as client:
                client.sendmail("a@client.test", ["u@sts.test"], BODY)
                client.sendmail("a@client.test", ["p@plain.test"], BODY)
            delivered = wait_for(lambda: (lambda d: d if len(d) == 2 else None)(
                {e["recipient"]: e for e in recorder.of("DELIVER")}), 30, "two DELIVERs")
    finally:
        dns.stop()
        asyncio.run_coroutine_threadsafe(host.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert delivered["u@sts.test"]["tls_verified"] == "mta-sts"
    assert delivered["u@sts.test"]["tls"].startswith("TLS")
    plain = delivered["p@plain.test"]
    assert plain["tls"] == "" and plain["tls_verified"] == ""
    assert sorted((m[0][0], m[1]) for m in handler.messages) == [("p@plain.test", False),
                                                                 ("u@sts.test", True)]
    assert host.fetched == 1

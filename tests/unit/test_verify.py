"""The verify agent (engine.agents.verify) called stage by stage, as the chain calls it,
with real sessions, transactions and messages and a real Lookup on a DNS responder:
SPF at MAIL, DKIM (messages signed by dkimpy) and DMARC at data, the actions, and the
Authentication-Results field that replaces forged ones."""

from __future__ import annotations

import asyncio
import base64
import gc
import importlib
import ipaddress
import textwrap
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.agents import AgentContext
from engine.agents.api import Action, HeaderChange, Message, Session, Transaction, Verdict
from engine.agents.dns import Lookup
from engine.agents.verify import VerifyAgent, build_verify
from engine.config import ConfigError, load_config
from engine.message import pkey
from engine.protocol.command import parse_command
from engine.testing.dns import DnsResponder

# dkimpy, a DKIM implementation we did not write, signs the test messages (imported by
# name: it ships no type information).
dkimpy = importlib.import_module("dkim")

CLIENT = "192.0.2.10"
OTHER = "198.51.100.99"
AUTHSERV = "mx.ferry.test"

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
PUBLIC = base64.b64encode(KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


def txt(text: str) -> str:
    """A TXT rdata of several character-strings (each at most 255 octets)."""
    return " ".join(f'"{part}"' for part in textwrap.wrap(text, 200))


ZONE = f"""
shop.test.                 300 IN TXT "v=spf1 ip4:{CLIENT} -all"
_dmarc.shop.test.          300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@shop.test"
s1._domainkey.shop.test.   300 IN TXT {txt("v=DKIM1; k=rsa; p=" + PUBLIC)}
esp.test.                  300 IN TXT "v=spf1 ip4:{CLIENT} -all"
s1._domainkey.esp.test.    300 IN TXT {txt("v=DKIM1; k=rsa; p=" + PUBLIC)}
news.test.                 300 IN TXT "v=spf1 ip4:{CLIENT} -all"
_dmarc.news.test.          300 IN TXT "v=DMARC1; p=quarantine"
relaxed.test.              300 IN TXT "v=spf1 -all"
_dmarc.relaxed.test.       300 IN TXT "v=DMARC1; p=none"
nodmarc.test.              300 IN TXT "v=spf1 ip4:{CLIENT} -all"
helo.shop.test.            300 IN TXT "v=spf1 ip4:{CLIENT} -all"
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsResponder]:
    with DnsResponder(ZONE) as responder:
        responder.servfail.add("_dmarc.broken.test")
        yield responder


def message(author: str, *, extra: str = "", sign: str = "") -> bytes:
    data = (f"{extra}From: Someone <someone@{author}>\r\nTo: you@ferry.test\r\n"
            "Subject: hello\r\nMessage-ID: <1@x>\r\n\r\nHello there.\r\n").encode()
    if sign:
        data = dkimpy.sign(data, b"s1", sign.encode(), KEY_PEM,
                           include_headers=[b"from", b"to", b"subject"]) + data
    return data


def run(dns: DnsResponder, data: bytes, sender: str, *, ip: str = CLIENT,
        may_relay: bool = False, helo: str = "mail.client.test",
        methods: tuple[str, ...] = ("spf", "dkim", "dmarc"), **settings: Any) -> Verdict:
    """MAIL, then data, as the chain calls them; the SPF task crosses in tx.notes."""

    async def go() -> Verdict:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)
        agent = VerifyAgent(lookup, methods, authserv_id=AUTHSERV, sample=lambda: 0.5,
                            **settings)
        await agent.start()
        session = Session("smtp-1", "default", ipaddress.ip_address(ip), helo=helo,
                          esmtp=True, may_relay=may_relay)
        tx = Transaction(parse_command(f"MAIL FROM:<{sender}>".encode()))
        assert agent.mail(session, tx).action is Action.ACCEPT
        return await settle(agent.data(session, tx, Message(data)))

    return asyncio.run(go())


async def settle(answer: Verdict | Awaitable[Verdict]) -> Verdict:
    """The verdict of a stage call, as the chain takes it: at once, or awaited."""
    return answer if isinstance(answer, Verdict) else await answer


def field(verdict: Verdict) -> str:
    """Our Authentication-Results field, unfolded."""
    (remove, add) = verdict.headers
    assert (remove.op, remove.name, add.op, add.name) == (
        "remove", "Authentication-Results", "add", "Authentication-Results")
    return " ".join(add.value.replace("\r\n", " ").split())


def test_pass_through_spf_alignment(dns: DnsResponder) -> None:
    verdict = run(dns, message("shop.test"), "bounce@shop.test")
    assert verdict.action is Action.ACCEPT
    assert field(verdict) == (
        "mx.ferry.test; spf=pass smtp.mailfrom=shop.test; dkim=none (no signature); "
        "dmarc=pass (p=reject dis=none) header.from=shop.test")


def test_pass_through_dkim_alignment(dns: DnsResponder) -> None:
    # Sent by an ESP: SPF passes for esp.test (not aligned), the shop's DKIM aligns.
    verdict = run(dns, message("shop.test", sign="shop.test"), "b@esp.test")
    assert verdict.action is Action.ACCEPT
    text = field(verdict)
    assert "spf=pass smtp.mailfrom=esp.test;" in text
    assert "dkim=pass header.d=shop.test" in text
    assert text.endswith("dmarc=pass (p=reject dis=none) header.from=shop.test")


def test_fail_with_p_reject_is_rejected(dns: DnsResponder) -> None:
    # Signed by the ESP only and sent from a foreign address: nothing aligns.
    verdict = run(dns, message("shop.test", sign="esp.test"), "b@esp.test", ip=OTHER)
    assert verdict.action is Action.REJECT
    assert verdict.reply == (550, "5.7.1", "Message rejected by the DMARC policy of shop.test")
    assert "dmarc=fail (p=reject dis=reject) header.from=shop.test policy.dmarc=reject" in (
        field(verdict))


@pytest.mark.parametrize(("setting", "action"), [
    ("enforce", Action.REJECT), ("quarantine", Action.HOLD), ("tag", Action.ACCEPT)])
def test_dmarc_policy_setting_for_reject(dns: DnsResponder, setting: str,
                                         action: Action) -> None:
    verdict = run(dns, message("shop.test"), "b@esp.test", ip=OTHER, dmarc_policy=setting)
    assert verdict.action is action
    assert "dmarc=fail" in field(verdict)


@pytest.mark.parametrize(("setting", "action"), [
    ("enforce", Action.HOLD), ("quarantine", Action.HOLD), ("tag", Action.ACCEPT)])
def test_fail_with_p_quarantine(dns: DnsResponder, setting: str, action: Action) -> None:
    verdict = run(dns, message("news.test"), "b@esp.test", dmarc_policy=setting)
    assert verdict.action is action
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=news.test" in field(verdict)


def test_fail_with_p_none_is_only_tagged(dns: DnsResponder) -> None:
    verdict = run(dns, message("relaxed.test"), "b@relaxed.test")
    assert verdict.action is Action.ACCEPT
    assert "spf=fail smtp.mailfrom=relaxed.test;" in field(verdict)
    assert "dmarc=fail (p=none dis=none)" in field(verdict)


def test_spf_fail_without_dmarc(dns: DnsResponder) -> None:
    tagged = run(dns, message("nodmarc.test"), "b@nodmarc.test", ip=OTHER)
    assert tagged.action is Action.ACCEPT
    assert "spf=fail" in field(tagged)
    assert "dmarc=none (no DMARC record) header.from=nodmarc.test" in field(tagged)
    refused = run(dns, message("nodmarc.test"), "b@nodmarc.test", ip=OTHER, spf_fail="reject")
    assert refused.action is Action.REJECT
    assert refused.reply is not None and refused.reply[:2] == (550, "5.7.23")
    # With a DMARC policy, DMARC decides (RFC 7489 §10.1): p=none, so accepted.
    ruled = run(dns, message("relaxed.test"), "b@relaxed.test", spf_fail="reject")
    assert ruled.action is Action.ACCEPT


def test_null_sender_checks_the_helo_identity(dns: DnsResponder) -> None:
    verdict = run(dns, message("shop.test"), "", helo="helo.shop.test")
    assert verdict.action is Action.ACCEPT
    assert field(verdict).startswith(
        "mx.ferry.test; spf=pass smtp.helo=helo.shop.test; dkim=none")
    assert field(verdict).endswith("dmarc=pass (p=reject dis=none) header.from=shop.test")


def test_dns_failure_gives_temperror_and_accepts(dns: DnsResponder) -> None:
    verdict = run(dns, message("broken.test"), "b@shop.test")
    assert verdict.action is Action.ACCEPT
    assert "dmarc=temperror" in field(verdict)


def test_no_from_is_a_permerror(dns: DnsResponder) -> None:
    data = b"To: you@ferry.test\r\nSubject: x\r\n\r\nbody\r\n"
    verdict = run(dns, data, "b@shop.test")
    assert verdict.action is Action.ACCEPT
    assert field(verdict).endswith("dmarc=permerror (no From field)")


def test_only_the_methods_asked_for(dns: DnsResponder) -> None:
    verdict = run(dns, message("shop.test"), "bounce@shop.test", methods=("spf",))
    assert field(verdict) == "mx.ferry.test; spf=pass smtp.mailfrom=shop.test"
    verdict = run(dns, message("shop.test", sign="shop.test"), "b@esp.test",
                  methods=("dmarc",))
    # DKIM still runs for DMARC's alignment, but only DMARC is reported.
    assert field(verdict) == "mx.ferry.test; dmarc=pass (p=reject dis=none) header.from=shop.test"


def apply(changes: tuple[HeaderChange, ...], data: bytes) -> list[tuple[str, str]]:
    """The header after the changes, applied as the session does (removals of the fields
    that arrived, then additions at the top)."""
    fields = Message(data).fields()
    for change in changes:
        if change.op == "remove":
            fields = [(n, v) for n, v in fields if n.lower() != change.name.lower()
                      or (change.match is not None and not change.match(v))]
    for change in changes:
        if change.op == "add":
            fields.insert(0, (change.name, " " + change.value))
    return fields


def test_forged_authentication_results_are_removed(dns: DnsResponder) -> None:
    forged = ("Authentication-Results: (forged)\r\n MX.Ferry.Test; dmarc=pass "
              "header.from=shop.test\r\n"
              "Authentication-Results: mx.elsewhere.test; spf=pass smtp.mailfrom=x.test\r\n")
    data = message("shop.test", extra=forged)
    verdict = run(dns, data, "b@esp.test", ip=OTHER, dmarc_policy="tag")
    results = [v for n, v in apply(verdict.headers, data) if n == "Authentication-Results"]
    assert len(results) == 2
    assert results[0].startswith(" mx.ferry.test;") and "dmarc=fail" in results[0]
    assert results[1] == " mx.elsewhere.test; spf=pass smtp.mailfrom=x.test"


def test_mail_from_a_client_that_may_relay_is_not_verified(dns: DnsResponder) -> None:
    verdict = run(dns, message("shop.test"), "b@esp.test", ip=OTHER, may_relay=True)
    assert verdict == Verdict()


def test_spf_runs_at_mail_and_is_awaited_at_data(dns: DnsResponder) -> None:
    async def go() -> tuple[bool, Verdict]:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)
        agent = VerifyAgent(lookup, ("spf",), authserv_id=AUTHSERV)
        session = Session("smtp-2", "default", ipaddress.ip_address(CLIENT), helo="c.test")
        tx = Transaction(parse_command(b"MAIL FROM:<a@shop.test>"))
        agent.mail(session, tx)
        task = tx.notes["verify"]
        await task  # the lookups finish while the client would be sending RCPTs
        before = lookup.queries
        verdict = await settle(agent.data(session, tx, Message(message("shop.test"))))
        return lookup.queries == before, verdict

    no_new_query, verdict = asyncio.run(go())
    assert no_new_query
    assert field(verdict) == "mx.ferry.test; spf=pass smtp.mailfrom=shop.test"


def test_spf_results_are_kept_per_client_sender_and_helo(dns: DnsResponder) -> None:
    # A bulk sender's second message: the SPF result comes from the agent's cache, the
    # same as evaluating again (engine.agents.spf.SpfCache; its expiry and bound are
    # tested in tests/integration/test_spf.py).
    async def go(spf_cache: int) -> tuple[list[str], int]:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)
        agent = VerifyAgent(lookup, ("spf",), authserv_id=AUTHSERV, spf_cache=spf_cache)
        session = Session("smtp-3", "default", ipaddress.ip_address(CLIENT), helo="c.test")
        fields = []
        for _ in range(3):
            tx = Transaction(parse_command(b"MAIL FROM:<a@shop.test>"))
            agent.mail(session, tx)
            answer = agent.data(session, tx, Message(message("shop.test")))
            fields.append(field(await settle(answer)))
        return fields, agent.spf.hits

    fields, hits = asyncio.run(go(100))
    assert fields == ["mx.ferry.test; spf=pass smtp.mailfrom=shop.test"] * 3
    assert hits == 2
    assert asyncio.run(go(0)) == (fields, 0)


def test_a_silent_zone_gives_temperror_within_the_budget(dns: DnsResponder) -> None:
    # The policy query is never answered: the agent gives up on it before its budget
    # ends, so the forged fields are still removed and the message still tagged.
    dns.drop.add("_dmarc.silent.test")
    try:
        verdict = run(dns, message("silent.test"), "b@shop.test", timeout=0.5)
    finally:
        dns.drop.discard("_dmarc.silent.test")
    assert verdict.action is Action.ACCEPT
    assert "dmarc=temperror (policy: no answer in time) header.from=silent.test" in (
        field(verdict))
    assert verdict.headers[0].op == "remove"


def test_settings_come_from_agents_verify(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text('hostname = "mx.example.test"\n[agents.verify]\ndmarc_policy = "tag"\n'
                    'spf_fail = "reject"\ntimeout = 3\nfail = "closed"\nspf_cache = 7\n')
    config = load_config(path)
    context = AgentContext(config, Lookup(("127.0.0.1", 9)), config.hostname,
                           verify=("dmarc", "spf"))
    agent = build_verify(context)
    assert (agent.methods, agent.authserv_id, agent.dmarc_policy, agent.spf_fail,
            agent.timeout, agent.fail_open) == (("spf", "dmarc"), "mx.example.test", "tag",
                                                "reject", 3.0, False)
    assert agent.spf.max_entries == 7
    path.write_text('[agents.verify]\nauthserv_id = "Auth.Example.Test."\n')
    assert build_verify(AgentContext(load_config(path), context.lookup, "x.test", ("spf",))
                        ).authserv_id == "Auth.Example.Test"


@pytest.mark.parametrize(("text", "words"), [
    ('dmarc_policy = "reject"', 'agents.verify.dmarc_policy: must be one of "enforce", '),
    ('spf_fail = "hold"', "agents.verify.spf_fail: "),
    ('authserv_id = "not a host"', "agents.verify.authserv_id: "),
    ("spf_cache = -1", "agents.verify.spf_cache: must be an integer >= 0"),
])
def test_bad_settings_are_named(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(f"[agents.verify]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(words), info.value.problems


def test_a_call_the_chain_gives_up_on_leaves_no_task(dns: DnsResponder) -> None:
    dns.drop.add("hung.test")

    async def go() -> asyncio.Task[Any]:
        lookup = Lookup((dns.host, dns.port), timeout=2.0, lifetime=2.0)
        agent = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id=AUTHSERV)
        session = Session("smtp-3", "default", ipaddress.ip_address(CLIENT), helo="c.test")
        tx = Transaction(parse_command(b"MAIL FROM:<a@hung.test>"))
        agent.mail(session, tx)
        with pytest.raises(TimeoutError):  # the chain's budget, shorter than the agent's
            await asyncio.wait_for(settle(agent.data(session, tx, Message(message("shop.test")))),
                                   0.05)
        task: asyncio.Task[Any] = tx.notes["verify"]
        await asyncio.wait([task], timeout=1.0)  # the cancellation delivered
        return task

    try:
        assert asyncio.run(go()).cancelled()
    finally:
        dns.drop.discard("hung.test")


def test_spf_dns_failure_is_no_dmarc_reject(dns: DnsResponder) -> None:
    # The sender domain's SPF record cannot be fetched: SPF temperror for an aligned
    # domain, so DMARC is a temperror and p=reject is not enforced.
    dns.servfail.add("shop.test")
    try:
        verdict = run(dns, message("shop.test"), "b@shop.test", ip=OTHER)
    finally:
        dns.servfail.discard("shop.test")
    assert verdict.action is Action.ACCEPT
    text = field(verdict)
    assert "spf=temperror" in text
    assert "dmarc=temperror (p=reject dis=none) header.from=shop.test" in text


def tampered(author: str) -> bytes:
    """Signed by the author's key, then its body changed: DKIM fails, DMARC by SPF."""
    return message(author, sign=author).replace(b"Hello there.", b"Hello there!")


@pytest.mark.parametrize(("data", "sender", "ip", "helo", "signature"), [
    (message("shop.test"), "bounce@shop.test", CLIENT, "mail.client.test", False),
    (message("shop.test", sign="shop.test"), "b@esp.test", CLIENT, "mail.client.test", True),
    (message("shop.test", sign="esp.test"), "b@esp.test", OTHER, "mail.client.test", True),
    (message("news.test"), "b@esp.test", CLIENT, "mail.client.test", False),
    (message("relaxed.test"), "b@relaxed.test", CLIENT, "mail.client.test", False),
    (message("nodmarc.test"), "b@nodmarc.test", OTHER, "mail.client.test", False),
    (message("shop.test"), "", CLIENT, "helo.shop.test", False),
    (message("broken.test"), "b@shop.test", CLIENT, "mail.client.test", False),
    (tampered("shop.test"), "b@shop.test", CLIENT, "mail.client.test", False),
    (b"To: you@ferry.test\r\nSubject: x\r\n\r\nbody\r\n", "b@shop.test", CLIENT,
     "mail.client.test", False),
], ids=["spf-aligned", "dkim-aligned", "reject", "quarantine", "p-none", "no-dmarc", "helo",
        "dns-failure", "bad-body-hash", "no-from"])
def test_a_message_whose_answers_are_cached_is_verified_at_once(
        dns: DnsResponder, data: bytes, sender: str, ip: str, helo: str,
        signature: bool) -> None:
    # A sender's second message within the TTLs: every answer is in the Lookup's cache
    # and the SPF result in the agent's, so the data stage returns its verdict without a
    # task or a wait, the very verdict the first message got after its lookups; only a
    # signature to check is waited for when its public-key operation is made in the
    # agent's thread (the pure-Python engine.message.pkey: the compiled one keeps the GIL
    # and checks on the loop, at once).
    async def go() -> tuple[list[bool], Verdict, Verdict, Verdict, int]:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)
        agent = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id=AUTHSERV,
                            sample=lambda: 0.5)
        await agent.start()
        session = Session("smtp-4", "default", ipaddress.ip_address(ip), helo=helo)
        verdicts: list[Verdict] = []
        at_once: list[bool] = []
        for _ in range(2):
            tx = Transaction(parse_command(f"MAIL FROM:<{sender}>".encode()))
            agent.mail(session, tx)
            queries = lookup.queries
            answer = agent.data(session, tx, Message(data))
            at_once.append(isinstance(answer, Verdict))
            verdicts.append(await settle(answer))
        answer = agent.data(session, tx, Message(data))  # the same transaction again
        at_once.append(isinstance(answer, Verdict))
        return at_once, verdicts[0], verdicts[1], await settle(answer), lookup.queries - queries

    at_once, first, second, third, queries = asyncio.run(go())
    assert at_once[1:] == [not signature or pkey.HOLDS_GIL] * 2
    assert second == first == third
    assert queries == 0


MIXED = [
    (message("shop.test", sign="shop.test"), "b@esp.test", CLIENT, "mail.client.test"),
    (tampered("shop.test"), "b@shop.test", CLIENT, "mail.client.test"),
    (message("shop.test", sign="esp.test"), "b@esp.test", OTHER, "mail.client.test"),
    (message("shop.test"), "b@shop.test", CLIENT, "mail.client.test"),
    (message("shop.test"), "", CLIENT, "helo.shop.test"),
    (message("news.test", sign="shop.test"), "b@esp.test", CLIENT, "mail.client.test"),
    (message("broken.test"), "b@shop.test", CLIENT, "mail.client.test"),
    (b"To: you@ferry.test\r\nSubject: x\r\n\r\nbody\r\n", "b@shop.test", CLIENT,
     "mail.client.test"),
]


def test_one_agent_concludes_a_mix_of_mail_as_fresh_agents_do(dns: DnsResponder) -> None:
    # The agent takes the SPF and DMARC parts of its previous conclusion again when the
    # inputs are the same (a sender's mail): in any order of different senders, results
    # and signatures, each message gets the field and action a fresh agent gives it.
    async def go() -> None:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)

        async def agent() -> VerifyAgent:
            made = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id=AUTHSERV,
                               sample=lambda: 0.5)
            await made.start()
            return made

        async def verdict(agent: VerifyAgent, case: int) -> tuple[Action, str, Any]:
            data, sender, ip, helo = MIXED[case]
            session = Session("smtp-5", "default", ipaddress.ip_address(ip), helo=helo)
            tx = Transaction(parse_command(f"MAIL FROM:<{sender}>".encode()))
            agent.mail(session, tx)
            got = await settle(agent.data(session, tx, Message(data)))
            return got.action, field(got), got.reply

        expected = []
        for case in range(len(MIXED)):
            await verdict(await agent(), case)  # the answers cached, as for the mix
            expected.append(await verdict(await agent(), case))
        shared = await agent()
        order = [0, 0, 1, 0, 2, 2, 3, 4, 3, 5, 0, 6, 6, 7, 0, 1, 1, 5, 4, 4, 0]
        assert [await verdict(shared, case) for case in order] == [
            expected[case] for case in order]

    asyncio.run(go())


@pytest.mark.parametrize("data", [message("shop.test", sign="shop.test"), tampered("shop.test"),
                                  message("broken.test", sign="missing.test")],
                         ids=["pass", "bad-body-hash", "no-key"])
def test_the_stage_at_once_leaves_no_garbage_cycles(dns: DnsResponder, data: bytes) -> None:
    # `ferry serve` runs the cyclic collector rarely (engine.app.tune_gc): a message's
    # verification must free everything it made when it returns, not leave a cycle
    # through an exception's traceback that holds the message until a collection.
    async def go() -> int:
        lookup = Lookup((dns.host, dns.port), timeout=0.5, lifetime=1.0)
        agent = VerifyAgent(lookup, ("spf", "dkim", "dmarc"), authserv_id=AUTHSERV)
        await agent.start()
        session = Session("smtp-5", "default", ipaddress.ip_address(CLIENT), helo="c.test")

        def one() -> Verdict | Awaitable[Verdict]:
            tx = Transaction(parse_command(b"MAIL FROM:<b@shop.test>"))
            agent.mail(session, tx)
            return agent.data(session, tx, Message(data))

        await settle(one())  # the answers cached
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                await settle(one())
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(go()) == 0

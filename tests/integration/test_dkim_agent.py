"""The DKIM signing agent: [[dkim_sign]] from a real configuration file, the sign stage
called with real Session / Transaction / Message values, the signatures checked by our
verifier and by dkimpy against keys served by a loopback DNS responder."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from engine.agents import AgentContext
from engine.agents.api import HeaderChange, Message, Session, Transaction, Verdict
from engine.agents.dkim import DkimSigner, _sign_batch, build_signer, from_domain
from engine.agents.dns import Lookup
from engine.config import Config, ConfigError, load_config
from engine.message.dkim import VERIFY_INLINE_BYTES, DkimError, fold_txt, key_record, verify
from engine.ops.preflight import file_problems
from engine.protocol.command import parse_command
from engine.testing.dns import DnsResponder

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
SUB_KEY = ed25519.Ed25519PrivateKey.generate()

ZONE = "".join(
    f"{sel}._domainkey.{domain}. 300 IN TXT {fold_txt(key_record(key))}\n"
    for sel, domain, key in (("r1", "example.com", RSA_KEY), ("e1", "example.com", ED_KEY),
                             ("s1", "news.example.com", SUB_KEY))
)

RELAY = Session("smtp-1", "default", ipaddress.ip_address("127.0.0.1"), helo="app.test",
                may_relay=True)
STRANGER = Session("smtp-2", "default", ipaddress.ip_address("192.0.2.9"), helo="x.test")


def write_key(path: Path, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path.name


def config(tmp_path: Path, text: str) -> Config:
    write_key(tmp_path / "rsa.pem", RSA_KEY)
    write_key(tmp_path / "ed.pem", ED_KEY)
    write_key(tmp_path / "sub.pem", SUB_KEY)
    (tmp_path / "ferry.toml").write_text(f'spool = "spool"\n{text}')
    return load_config(tmp_path / "ferry.toml")


DUAL = """
[[dkim_sign]]
domain = "example.com"
selector = "r1"
key_file = "rsa.pem"
subdomains = true

[[dkim_sign]]
domain = "Example.COM."
selector = "e1"
key_file = "ed.pem"
oversign = ["From", "Subject"]
headers = ["From", "To", "Subject"]
subdomains = true

[[dkim_sign]]
domain = "news.example.com"
selector = "s1"
key_file = "sub.pem"
"""


def context(config: Config) -> AgentContext:
    return AgentContext(config, Lookup(("127.0.0.1", 9)), "ferry.test")


def message(sender: str, body: bytes = b"Hello.\r\n") -> Message:
    return Message(f"From: Sender <{sender}>\r\nTo: you@example.net\r\nSubject: hi\r\n"
                   f"Date: Mon, 7 Dec 2026 00:00:00 +0000\r\n\r\n".encode() + body)


def run_sign(agent: DkimSigner, session: Session, msg: Message) -> Verdict:
    tx = Transaction(parse_command(b"MAIL FROM:<app@example.com>"))

    async def go() -> Verdict:
        verdict = agent.sign(session, tx, msg)
        return verdict if isinstance(verdict, Verdict) else await verdict

    return asyncio.run(go())


def applied(verdict: Verdict, msg: Message) -> bytes:
    """The message with the verdict's fields added at the top, as "Name: value"."""
    data = msg.data
    for change in verdict.headers:
        assert change.op == "add" and change.name == "DKIM-Signature"
        data = f"{change.name}:{change.value}\r\n".encode() + data
    return data


@pytest.fixture(scope="module")
def responder():
    with DnsResponder(ZONE) as server:
        yield server


def results(responder: DnsResponder, data: bytes) -> list[tuple[str, str, str]]:
    async def go() -> list[tuple[str, str, str]]:
        found = await verify(Message(data), Lookup(responder.address))
        return [(r.result, r.domain, r.selector) for r in found]

    return asyncio.run(go())


def test_dual_signing_rsa_and_ed25519(tmp_path: Path, responder: DnsResponder) -> None:
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    msg = message("app@example.com")
    verdict = run_sign(agent, RELAY, msg)
    assert len(verdict.headers) == 2
    signed = applied(verdict, msg)
    assert sorted(results(responder, signed)) == [
        ("pass", "example.com", "e1"), ("pass", "example.com", "r1")]
    # The top field is the last added; dkimpy (no Ed25519 without PyNaCl) checks the RSA one.
    rsa_first = applied(Verdict(headers=tuple(sorted(
        verdict.headers, key=lambda c: "a=rsa" in c.value))), msg)
    assert dkim.verify(rsa_first, dnsfunc=lambda name, timeout=5: _txt(responder, name))


def _txt(responder: DnsResponder, name: bytes) -> bytes | None:
    async def go() -> bytes | None:
        answer = await Lookup(responder.address).query(name.decode(), "TXT")
        return answer.records[0].encode() if answer.records else None

    return asyncio.run(go())


def test_an_entry_settings_reach_the_signature(tmp_path: Path) -> None:
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    verdict = run_sign(agent, RELAY, message("app@example.com"))
    ed = next(c.value for c in verdict.headers if "ed25519" in c.value)
    h = "".join(ed.split("h=")[1].split(";")[0].split())
    # headers = From, To, Subject; oversign = From, Subject.
    assert h == "from:from:to:subject:subject"


@pytest.mark.parametrize(("sender", "selectors"), [
    ("a@example.com", {"r1", "e1"}),
    ("a@mail.example.com", {"r1", "e1"}),       # subdomains = true
    ("a@news.example.com", {"s1"}),             # the most specific entry wins
    # s1 (subdomains = false) does not cover it; example.com's entries do.
    ("a@deep.news.example.com", {"r1", "e1"}),
    ("a@example.org", set()),
    ("a@notexample.com", set()),
])  # fmt: skip
def test_matching_on_the_from_domain(tmp_path: Path, sender: str, selectors: set[str]) -> None:
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    verdict = run_sign(agent, RELAY, message(sender))
    assert {c.value.split(" s=")[1].split(";")[0] for c in verdict.headers} == selectors


def test_only_mail_the_client_may_relay_is_signed(tmp_path: Path) -> None:
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    assert run_sign(agent, STRANGER, message("a@example.com")).headers == ()


# 50,000 lines: a body over VERIFY_INLINE_BYTES, hashed in the thread, not on the loop.
@pytest.mark.parametrize("size", [10, 20_000, 50_000])
def test_signatures_are_made_off_the_loop(tmp_path: Path, responder: DnsResponder,
                                          size: int) -> None:
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    msg = message("a@example.com", b"line\r\n" * size)
    pending = agent.sign(RELAY, Transaction(parse_command(b"MAIL FROM:<>")), msg)
    assert inspect.iscoroutine(pending)  # an awaitable: the work is not on the loop
    pending.close()
    signed = applied(run_sign(agent, RELAY, msg), msg)
    assert [r[0] for r in results(responder, signed)] == ["pass", "pass"]


@pytest.mark.parametrize(("value", "domain"), [
    ("Joe <Joe@Example.COM>", "example.com"),
    ('"a, b" <x@one.test>, y@two.test', "one.test"),     # the first mailbox
    ("group: a@g.test, b@h.test;", "g.test"),
    ("undisclosed-recipients:;", ""),
    ("x@y.test (a comment)", "y.test"),
    ("Joe <a@b.test>, c@d.test", "b.test"),
    (" App <app@Example.com.> ", "example.com"),
])  # fmt: skip
def test_from_domain(value: str, domain: str) -> None:
    assert from_domain(Message(f"From: {value}\r\n\r\n".encode())) == domain
    assert from_domain(Message(b"To: x@y.test\r\n\r\n")) == ""


def test_no_entries_no_agent(tmp_path: Path) -> None:
    assert build_signer(context(config(tmp_path, ""))) is None


def test_bad_keys_are_named(tmp_path: Path) -> None:
    write_key(tmp_path / "small.pem", rsa.generate_private_key(public_exponent=65537,
                                                               key_size=1024))
    cfg = config(tmp_path, DUAL + """
[[dkim_sign]]
domain = "example.org"
selector = "old"
key_file = "small.pem"

[[dkim_sign]]
domain = "example.com"
selector = "r2"
key_file = "rsa.pem"
""")
    problems = file_problems(cfg)
    assert [p.split(":")[0] for p in problems] == ["dkim_sign[3].key_file",
                                                   "dkim_sign[4].key_file"]
    assert "1024 bits" in problems[0] and "a second rsa-sha256 key for example.com" \
        in problems[1]
    with pytest.raises(ConfigError) as info:
        build_signer(context(cfg))
    assert info.value.problems == tuple(problems)


def test_header_change_shape(tmp_path: Path) -> None:
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    [change] = run_sign(agent, RELAY, message("a@news.example.com")).headers
    assert isinstance(change, HeaderChange)
    # Folded with CRLF + WSP only (the hook API's rule), each line under 78 characters.
    lines = f"DKIM-Signature:{change.value}".split("\r\n")
    assert all(len(line) < 78 for line in lines)
    assert all(line[0] in " \t" for line in lines[1:])


def test_messages_signed_together_each_get_their_own_signatures(
        tmp_path: Path, responder: DnsResponder) -> None:
    # Sessions finishing in the same loop turns share executor jobs (the signing agent's
    # ThreadBatches, engine.agents.batch); each message's fields must still be its own,
    # a session that gives up must not stall the others, and the next message after a
    # batch is signed too.
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    tx = Transaction(parse_command(b"MAIL FROM:<app@example.com>"))
    msgs = [message("a@example.com", f"message {i}\r\n".encode() * (i + 1)) for i in range(12)]

    handed: list[Message] = []
    all_handed = asyncio.Event()

    async def sign(msg: Message) -> Verdict:
        verdict = agent.sign(RELAY, tx, msg)
        handed.append(msg)
        if len(handed) == len(msgs):
            all_handed.set()
        return verdict if isinstance(verdict, Verdict) else await verdict

    async def go() -> tuple[list[Verdict | BaseException], Verdict]:
        tasks = [asyncio.ensure_future(sign(m)) for m in msgs]
        await asyncio.wait_for(all_handed.wait(), 10)  # every message is in a batch
        tasks[3].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done, await sign(msgs[3])

    done, later = asyncio.run(go())
    assert isinstance(done[3], asyncio.CancelledError)
    for i, verdict in enumerate(done):
        if i == 3:
            continue
        assert isinstance(verdict, Verdict)
        signed = applied(verdict, msgs[i])
        assert [r[0] for r in results(responder, signed)] == ["pass", "pass"]
    assert [r[0] for r in results(responder, applied(later, msgs[3]))] == ["pass", "pass"]


def test_signing_after_the_executor_shut_down_raises_for_the_message(tmp_path: Path) -> None:
    # At shutdown: the message's stage fails (the chain logs it and answers by `fail`),
    # and the next message does not wait on a batch that never ran.
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    tx = Transaction(parse_command(b"MAIL FROM:<app@example.com>"))
    msg = message("a@example.com")

    async def go() -> list[BaseException]:
        await asyncio.get_running_loop().shutdown_default_executor()
        errors: list[BaseException] = []
        for _ in range(2):
            pending = agent.sign(RELAY, tx, msg)
            assert not isinstance(pending, Verdict)
            with pytest.raises(RuntimeError) as info:
                await asyncio.wait_for(pending, 10)  # bounded: never hangs on a lost batch
            errors.append(info.value)
        return errors

    assert len(asyncio.run(go())) == 2


def test_in_a_batch_a_message_that_cannot_be_signed_fails_alone(tmp_path: Path) -> None:
    # The signing thread signs a whole batch's digests in one call (one release of the
    # GIL); a digest that cannot be signed, or a large message that cannot be prepared
    # there, fails its own message only.
    agent = build_signer(context(config(tmp_path, DUAL)))
    assert agent is not None
    signers = agent.signers_for("example.com")
    good = [(s, s.prepare(message("a@example.com"))) for s in signers]
    broken = [(s, p._replace(digest=p.digest[:31])) for s, p in good]
    large = message("b@example.com", b"x" * VERIFY_INLINE_BYTES + b"\r\n")
    out = _sign_batch([good, broken, [(s, large.data) for s in signers],
                       [(signers[0], b"To: x@example.net\r\n\r\n")], good[1:]])
    assert isinstance(out[1], ValueError)
    assert isinstance(out[3], DkimError)  # no From field to sign
    for i, items in ((0, good), (4, good[1:])):
        signed = out[i]
        assert not isinstance(signed, Exception)
        assert signed == [(p, s.signature(p)) for s, p in items]  # deterministic here
    signed_large = out[2]
    assert not isinstance(signed_large, Exception) and len(signed_large) == 2

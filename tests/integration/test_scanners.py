"""The content scanners against the real daemons: the rspamd agent (engine.agents.rspamd)
against a private rspamd, the ClamAV agent (engine.agents.clamav) against a private clamd
with the test's own signature database.  The agents' ``data`` stage is called with real
Session / Transaction / Message values, on uvloop as in the server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.header
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import uvloop

from engine.agents.api import Action, Agent, HeaderChange, Message, Session, Transaction, Verdict
from engine.agents.clamav import ClamavAgent, ClamavError
from engine.agents.dns import Lookup
from engine.agents.rspamd import RspamdAgent, RspamdError
from engine.config import ClamavAgentConfig, RspamdAgentConfig, load_config
from engine.protocol.command import parse_command
from engine.testing.clamav import TEST_STRING, TEST_VIRUS, ClamdInstance
from engine.testing.dns import DnsResponder
from engine.testing.mta import free_port
from engine.testing.rspamd import GTUBE, GTUBE_ADD_HEADER, GTUBE_REWRITE_SUBJECT, RspamdInstance
from engine.testing.wait import until

T = TypeVar("T")

SESSION = Session(session_id="smtp-test", connector="default",
                  client_ip=ipaddress.ip_address("192.0.2.10"), helo="client.example.com",
                  esmtp=True)
# Dated now: rspamd scores a Date far in the past (its DATE_IN_PAST), so a fixed date
# made the clean message's score depend on the day the suite ran.
HEADER = (b"From: Alice <alice@example.com>\r\n"
          b"To: Bob <bob@example.org>\r\n"
          b"Subject: hello\r\n"
          b"Message-ID: <1@example.com>\r\n"
          b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
          b"\r\n")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


def transaction(*rcpts: str, sender: str = "alice@example.com") -> Transaction:
    return Transaction(mail=parse_command(f"MAIL FROM:<{sender}>".encode()),
                       recipients=tuple(parse_command(f"RCPT TO:<{r}>".encode())
                                        for r in rcpts or ("bob@example.org",)))


def message(body: bytes, header: bytes = HEADER) -> Message:
    return Message(header + body + b"\r\n")


def big_body(size: int, tail: bytes = b"") -> bytes:
    """``size`` bytes of plain text lines, ``tail`` at the very end."""
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return line * (size // len(line)) + tail


def scan(agent: Agent, msg: Message, tx: Transaction | None = None,
         session: Session = SESSION) -> Verdict:
    """Start the agent, call its data stage once, stop it."""

    async def go() -> Verdict:
        await agent.start()
        try:
            data: Callable[..., Verdict | Awaitable[Verdict]] = agent.data  # type: ignore[attr-defined]
            result = data(session, tx or transaction(), msg)
            return result if isinstance(result, Verdict) else await result
        finally:
            await agent.stop()

    return run(go())


def change(verdict: Verdict, name: str) -> HeaderChange:
    [found] = [c for c in verdict.headers if c.name == name]
    return found


# --- rspamd ------------------------------------------------------------------------------

def rspamd_agent(instance: RspamdInstance | str, lookup: Lookup | None = None,
                 **keys: Any) -> RspamdAgent:
    url = instance if isinstance(instance, str) else instance.url
    return RspamdAgent(RspamdAgentConfig(url=url, **keys), "ferry.test", lookup)


#: The clients' reverse DNS: 192.0.2.10 is client.example.com both ways; 192.0.2.11's PTR
#: name points elsewhere (not confirmed).
ZONE = """
$TTL 60
10.2.0.192.in-addr.arpa. IN PTR client.example.com.
client.example.com. IN A 192.0.2.10
11.2.0.192.in-addr.arpa. IN PTR forged.example.com.
forged.example.com. IN A 192.0.2.99
"""


def test_rspamd_is_told_the_confirmed_client_name(rspamd: RspamdInstance,
                                                  dns_server: DnsResponder) -> None:
    lookup = Lookup(dns_server.address)
    agent = rspamd_agent(rspamd, lookup)
    assert run(agent.client_name(ipaddress.ip_address("192.0.2.10"))) == "client.example.com"
    assert run(agent.client_name(ipaddress.ip_address("192.0.2.11"))) is None
    assert run(agent.client_name(ipaddress.ip_address("192.0.2.12"))) is None  # no PTR

    def symbols(session: Session, lookup: Lookup | None) -> str:
        verdict = scan(rspamd_agent(rspamd, lookup), message(b"Hello Bob"), session=session)
        return change(verdict, "X-Spamd-Result").value

    # rspamd's hfilter: HFILTER_HOSTNAME_UNKNOWN when it was given no Hostname.
    assert "HFILTER_HOSTNAME_UNKNOWN" not in symbols(SESSION, lookup)
    forged = dataclasses.replace(SESSION, client_ip=ipaddress.ip_address("192.0.2.11"))
    assert "HFILTER_HOSTNAME_UNKNOWN(" in symbols(forged, lookup)
    assert "HFILTER_HOSTNAME_UNKNOWN(" in symbols(SESSION, None)


def test_rspamd_rejects_gtube_with_its_message(rspamd: RspamdInstance) -> None:
    verdict = scan(rspamd_agent(rspamd), message(GTUBE))
    assert verdict.action is Action.REJECT
    assert verdict.reply == (550, "5.7.1", "Gtube pattern")
    assert verdict.reason == "reject (score 15.00 / 15.00)"


def test_rspamd_result_header_on_clean_mail(rspamd: RspamdInstance) -> None:
    header = HEADER.replace(b"To: Bob <bob@example.org>",
                            b"To: Bob <bob@example.org>, Carol <carol@example.org>")
    both = transaction("bob@example.org", "carol@example.org", sender="zed@other.example")
    verdict = scan(rspamd_agent(rspamd), message(b"Hello Bob, lunch at noon?", header), both)
    assert verdict.action is Action.ACCEPT
    result = change(verdict, "X-Spamd-Result")
    assert result.op == "replace"
    lines = result.value.split("\r\n\t")
    assert lines[0].startswith("default: False [") and lines[0].endswith(" / 15.00];")
    assert all("\r" not in line and "\n" not in line for line in lines)
    # rspamd saw the envelope: the From request header (it names the envelope sender)...
    assert "FROM_NEQ_ENVFROM(0.00)[alice@example.com,zed@other.example];" in lines
    # ... and one Rcpt header per recipient: both To addresses are envelope recipients.
    assert "TO_MATCH_ENVRCPT_ALL(0.00)[]" in {line.rstrip(";") for line in lines}
    one = transaction("bob@example.org", sender="zed@other.example")
    partly = scan(rspamd_agent(rspamd), message(b"Hello Bob, lunch at noon?", header), one)
    assert "TO_MATCH_ENVRCPT_SOME" in change(partly, "X-Spamd-Result").value
    # Not spam: a forged X-Spam of the sender's is removed.
    assert change(verdict, "X-Spam").op == "remove"


def test_rspamd_add_header_tags_as_spam(rspamd: RspamdInstance) -> None:
    verdict = scan(rspamd_agent(rspamd), message(GTUBE_ADD_HEADER))
    assert verdict.action is Action.ACCEPT
    assert change(verdict, "X-Spam") == HeaderChange("replace", "X-Spam", "Yes")
    assert change(verdict, "X-Spamd-Result").value.startswith("default: True [6.00 / 15.00]")


def test_rspamd_rewrite_subject(rspamd: RspamdInstance) -> None:
    verdict = scan(rspamd_agent(rspamd, header="X-Rspamd-Result", spam_header=""),
                   message(GTUBE_REWRITE_SUBJECT))
    assert verdict.action is Action.ACCEPT
    assert change(verdict, "Subject") == HeaderChange("replace", "Subject",
                                                      "***SPAM*** hello")
    assert [c.name for c in verdict.headers] == ["X-Rspamd-Result", "Subject"]


def test_rspamd_rewrites_a_non_ascii_subject_encoded_and_folded(rspamd: RspamdInstance) -> None:
    subject = "Привет, " + "очень длинная тема " * 4
    encoded = email.header.Header(subject, "utf-8").encode(linesep="\r\n").encode()
    header = HEADER.replace(b"Subject: hello", b"Subject: " + encoded)
    verdict = scan(rspamd_agent(rspamd), message(GTUBE_REWRITE_SUBJECT, header))
    value = change(verdict, "Subject").value
    lines = value.split("\r\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:]) and value.isascii()
    decoded = str(email.header.make_header(email.header.decode_header(value)))
    assert decoded.rstrip() == "***SPAM*** " + subject.strip()


@pytest.mark.parametrize("mapping", ["hold", "tag"])
def test_rspamd_reject_mapped_to_hold_or_tag(rspamd: RspamdInstance, mapping: str) -> None:
    verdict = scan(rspamd_agent(rspamd, reject_action=mapping), message(GTUBE))
    assert verdict.action is (Action.HOLD if mapping == "hold" else Action.ACCEPT)
    assert change(verdict, "X-Spam").value == "Yes"
    assert change(verdict, "X-Spamd-Result").value.startswith("default: True [15.00 / 15.00]")


def test_rspamd_soft_reject_and_greylist_tempfail(rspamd: RspamdInstance) -> None:
    soft = scan(rspamd_agent(rspamd), message(b"FERRY-RSPAMD-TEST-SOFT-REJECT"))
    assert soft.action is Action.TEMPFAIL
    assert soft.reply == (451, "4.7.1", "Try again later (ferry test)")
    grey = scan(rspamd_agent(rspamd), message(b"FERRY-RSPAMD-TEST-GREYLIST"))
    assert grey.action is Action.TEMPFAIL
    assert grey.reply == (451, "4.7.1", "Greylisted (ferry test)")


def test_rspamd_greylist_mapped_to_accept(rspamd: RspamdInstance) -> None:
    verdict = scan(rspamd_agent(rspamd, greylist_action="accept"),
                   message(b"FERRY-RSPAMD-TEST-GREYLIST"))
    assert verdict.action is Action.ACCEPT
    assert change(verdict, "X-Spam").op == "remove"


def test_rspamd_over_max_size_is_not_scanned(rspamd: RspamdInstance,
                                             caplog: pytest.LogCaptureFixture) -> None:
    msg = message(GTUBE + b"\r\n" + big_body(2048))
    with caplog.at_level(logging.INFO, logger="ferry.agents.rspamd"):
        verdict = scan(rspamd_agent(rspamd, max_size=1024), msg)
    # Accepted unscanned: a sender's own result fields are removed, none is added.
    assert verdict == Verdict(headers=(HeaderChange("remove", "X-Spamd-Result"),
                                       HeaderChange("remove", "X-Spam")))
    assert any("not scanned by rspamd" in r.getMessage() and str(msg.size) in r.getMessage()
               for r in caplog.records)
    # Under the limit the same message is scanned (and rejected).
    assert scan(rspamd_agent(rspamd, max_size=msg.size), msg).action is Action.REJECT


def test_rspamd_large_message_streams(rspamd: RspamdInstance) -> None:
    # rspamd looks for GTUBE in small text parts only: a short part with it, then a 5 MiB
    # part.  rspamd parses the MIME structure only once the whole body (its Content-Length)
    # has arrived, so the verdict says it all streamed.
    header = HEADER.replace(b"\r\n\r\n", b"\r\nMIME-Version: 1.0\r\nContent-Type: "
                            b'multipart/mixed; boundary="b1"\r\n\r\n')
    body = (b"--b1\r\nContent-Type: text/plain\r\n\r\n" + GTUBE + b"\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\n" + big_body(5 << 20) +
            b"--b1--")
    msg = message(body, header)
    assert msg.size > 5 << 20
    assert scan(rspamd_agent(rspamd, timeout=60), msg).action is Action.REJECT


def test_rspamd_asks_no_dns_and_reads_the_whole_message(rspamd: RspamdInstance) -> None:
    # URLs and a sender domain: what DNS list and SPF modules would look up, were any on.
    header = HEADER.replace(b"<1@example.com>", b"<dns-check@example.com>")
    msg = message(b"See http://spam.example.net/offer and https://198.51.100.7/x", header)
    scan(rspamd_agent(rspamd), msg)
    line = rspamd.wait_log(r"task_write_log: id: <dns-check@example\.com>.*").group(0)
    assert "dns req: 0," in line
    assert f"len: {msg.size}," in line


def test_rspamd_down_raises_for_the_chain() -> None:
    # A closed port: the chain's fail setting turns the error into accept or 451.
    with pytest.raises(aiohttp.ClientConnectionError):
        scan(rspamd_agent(f"http://127.0.0.1:{free_port()}"), message(b"hello"))


def test_rspamd_error_answer_raises(rspamd: RspamdInstance) -> None:
    agent = rspamd_agent(rspamd)
    agent.url = rspamd.url + "/no-such-endpoint"
    with pytest.raises(RspamdError, match="answered HTTP"):
        scan(agent, message(b"hello"))


# --- ClamAV ------------------------------------------------------------------------------

def clamav_agent(address: str, **keys: Any) -> ClamavAgent:
    return ClamavAgent(ClamavAgentConfig(address=address, **keys), "ferry.test")


@pytest.fixture(params=["unix", "tcp"])
def clamd_address(request: pytest.FixtureRequest, clamd: ClamdInstance) -> str:
    return clamd.unix_address if request.param == "unix" else clamd.tcp_address


def test_clamav_rejects_the_test_signature(clamd_address: str) -> None:
    verdict = scan(clamav_agent(clamd_address),
                   message(b"see attachment: " + TEST_STRING + b" bye"))
    assert verdict.action is Action.REJECT
    assert verdict.reply == (554, "5.7.1", f"Message rejected: virus found: {TEST_VIRUS}")


def test_clamav_passes_clean_mail(clamd_address: str) -> None:
    assert scan(clamav_agent(clamd_address), message(b"Hello Bob")) == Verdict()
    tagged = scan(clamav_agent(clamd_address, scanned_header="X-Virus-Scanned"),
                  message(b"Hello Bob"))
    assert tagged.headers == (HeaderChange("add", "X-Virus-Scanned", "clamav at ferry.test"),)


def test_clamd_loads_only_the_test_database(clamd: ClamdInstance) -> None:
    assert "Loaded 1 signatures." in clamd.log_text()
    assert f"Reading databases from {clamd.db_dir}" in clamd.log_text()


def test_clamav_hold(clamd: ClamdInstance) -> None:
    verdict = scan(clamav_agent(clamd.unix_address, action="hold"), message(TEST_STRING))
    assert verdict.action is Action.HOLD
    assert verdict.reason == f"virus found: {TEST_VIRUS}"


def test_clamav_large_message_streams(clamd_address: str) -> None:
    # The signature at the very end: found only if every chunk arrived.
    infected = message(big_body(5 << 20, tail=TEST_STRING))
    assert infected.size > 5 << 20
    assert scan(clamav_agent(clamd_address, timeout=60), infected).action is Action.REJECT
    assert scan(clamav_agent(clamd_address, timeout=60),
                message(big_body(5 << 20))) == Verdict()


def test_clamav_down_raises_and_fails_closed(tmp_path: Path) -> None:
    # Fail closed is the default: the chain answers 451 when the agent raises.
    assert load_config(None).agents.clamav.fail == "closed"
    for address in (f"unix:{tmp_path}/none.sock", f"127.0.0.1:{free_port()}"):
        agent = clamav_agent(address)
        assert agent.fail_open is False
        with pytest.raises(ClamavError, match="cannot connect to clamd"):
            scan(agent, message(b"hello"))


@pytest.mark.parametrize("on_oversize", ["accept", "tempfail"])
def test_clamav_over_max_size(clamd: ClamdInstance, on_oversize: str,
                              caplog: pytest.LogCaptureFixture) -> None:
    msg = message(TEST_STRING + b"\r\n" + big_body(4096))
    with caplog.at_level(logging.WARNING, logger="ferry.agents.clamav"):
        verdict = scan(clamav_agent(clamd.unix_address, max_size=1024,
                                    on_oversize=on_oversize), msg)
    if on_oversize == "accept":
        assert verdict == Verdict()
    else:
        assert verdict.action is Action.TEMPFAIL
        assert verdict.reply == (451, "4.7.1", "Message too large to scan for viruses")
    assert any("not scanned by clamav" in r.getMessage() for r in caplog.records)


def test_clamav_stream_limit_of_clamd_raises(tmp_path: Path) -> None:
    # max_size above clamd's StreamMaxLength: clamd refuses with an ERROR, which is a
    # failure for the chain, never a pass.
    with ClamdInstance(tmp_path, stream_max_length=100_000) as small:
        agent = clamav_agent(small.unix_address, max_size=10 << 20)
        with pytest.raises(ClamavError, match=r"size limit exceeded|closed the connection"):
            scan(agent, message(big_body(1 << 20)))


def test_clamav_concurrent_scans_are_bounded(clamd: ClamdInstance) -> None:
    """Scans wait for a slot: with max_concurrent connections open (held by a forwarder
    between the agent and clamd until released), every other scan waits for the agent's
    slot, not at clamd."""

    async def go(limit: int, scans: int) -> list[Verdict]:
        gate = asyncio.Event()
        accepted = 0

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await gate.wait()
                up_r, up_w = await asyncio.open_unix_connection(str(clamd.socket_path))
                try:
                    await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
                finally:
                    up_w.close()
                    await up_w.wait_closed()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()

        handlers: list[asyncio.Task[None]] = []
        server = await asyncio.start_server(forward, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = clamav_agent(f"127.0.0.1:{port}", max_concurrent=limit)
        msg = message(big_body(256 << 10))
        tasks = [asyncio.ensure_future(agent.data(SESSION, transaction(), msg))  # type: ignore[arg-type]
                 for _ in range(scans)]
        # Once the others queue at the agent's semaphore, no further connection can come.
        await until(lambda: accepted >= min(limit, scans)
                    and len(agent._slots._waiters or ()) == max(0, scans - limit),
                    30, "the scans connected or queued")
        assert accepted == min(limit, scans)
        gate.set()
        async with asyncio.timeout(30):
            verdicts = await asyncio.gather(*tasks)
            await asyncio.gather(*handlers)
        server.close()
        await server.wait_closed()
        return list(verdicts)

    assert run(go(2, 6)) == [Verdict()] * 6
    assert run(go(6, 6)) == [Verdict()] * 6

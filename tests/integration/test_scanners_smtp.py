"""The content scanners through a real server: ``[[receive]] agents = ["rspamd", "clamav"]``
from the configuration file, real SMTP sessions, a private rspamd and clamd behind them;
the reply the client gets and the message as stored."""

from __future__ import annotations

import logging
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

import pytest

from engine.protocol.reply import Reply
from engine.queue.records import RcptState, id_bytes
from engine.testing.clamav import TEST_STRING, TEST_VIRUS, ClamdInstance
from engine.testing.dns import DnsResponder
from engine.testing.mta import free_port
from engine.testing.rawsmtp import one_message
from engine.testing.rspamd import GTUBE, GTUBE_REWRITE_SUBJECT, RspamdInstance
from engine.testing.server import RunningFerry
from tests.integration.conftest import FerryToml

Start = Callable[..., RunningFerry]

# Dated now: rspamd scores a Date far in the past (its DATE_IN_PAST), so a fixed date
# made the clean message's score depend on the day the suite ran.
HEADER = (b"From: Alice <alice@client.test>\r\n"
          b"To: Bob <bob@example.org>\r\n"
          b"Subject: hello\r\n"
          b"Message-ID: <1@client.test>\r\n"
          b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
          b"\r\n")


#: The test client (127.0.0.1) is client.test both ways: rspamd is told its name.
ZONE = """
$TTL 60
1.0.0.127.in-addr.arpa. IN PTR client.test.
client.test. IN A 127.0.0.1
"""


@pytest.fixture
def start(ferry_toml: FerryToml, rspamd: RspamdInstance, clamd: ClamdInstance,
          dns_server: DnsResponder) -> Start:
    """``start(rspamd_keys, clamav_keys, agents, rspamd_url, clamav_address)``: a server
    whose connector runs the scanners ``agents``, pointed at the session's daemons unless
    told otherwise; the ``*_keys`` strings are extra keys of each table."""

    def run(rspamd_keys: str = "", clamav_keys: str = "",
            agents: tuple[str, ...] = ("rspamd", "clamav"), rspamd_url: str = rspamd.url,
            clamav_address: str = clamd.unix_address) -> RunningFerry:
        names = ", ".join(f'"{a}"' for a in agents)
        return ferry_toml(f"""agents = [{names}]
[agents.rspamd]
url = "{rspamd_url}"
timeout = 60
{rspamd_keys}
[agents.clamav]
address = "{clamav_address}"
timeout = 60
{clamav_keys}""", relay=False, dns=f"{dns_server.address[0]}:{dns_server.address[1]}")

    return run


def send(ferry: RunningFerry, body: bytes, header: bytes = HEADER) -> Reply:
    """One message to bob@example.org on a new session: the reply to its end of data."""
    return one_message(ferry.host, ferry.port, header + body + b"\r\n",
                       mail=b"alice@client.test", rcpt=b"bob@example.org", timeout=60)


def stored(ferry: RunningFerry, reply: Reply) -> bytes:
    assert reply.code == 250, reply
    return ferry.store.body(id_bytes(reply.lines[-1].rsplit(" ", 1)[1]))


def big_body(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return line * (size // len(line))


def test_gtube_is_rejected(start: Start) -> None:
    ferry = start()
    reply = send(ferry, GTUBE)
    assert (reply.code, reply.enhanced, reply.lines) == (550, "5.7.1", ["Gtube pattern"])
    assert ferry.store.count() == 0


def test_clean_mail_gets_the_result_header_and_forged_ones_go(start: Start) -> None:
    ferry = start(clamav_keys='scanned_header = "X-Virus-Scanned"')
    # A sender's own verdict ("X-Spam: Yes" would score in rspamd: SPAM_FLAG).
    forged = b"X-Spam: No\r\nX-Spamd-Result: default: False [-100.00 / 15.00]\r\n" + HEADER
    data = stored(ferry, send(ferry, b"Hello Bob, lunch at noon?", forged))
    header = data.split(b"\r\n\r\n", 1)[0]
    assert header.count(b"X-Spamd-Result: ") == 1
    assert b"X-Spamd-Result: default: False [0.00 / 15.00];\r\n\t" in header
    # Told the client's confirmed name (through the server's DNS): no unknown host name.
    assert b"HFILTER_HOSTNAME_UNKNOWN" not in header
    assert b"-100.00" not in header and b"X-Spam:" not in header
    assert b"X-Virus-Scanned: clamav at ferry.test\r\n" in header


def test_rewrite_subject(start: Start) -> None:
    ferry = start()
    data = stored(ferry, send(ferry, GTUBE_REWRITE_SUBJECT))
    assert b"\r\nSubject: ***SPAM*** hello\r\n" in data
    assert b"\r\nSubject: hello\r\n" not in data
    assert b"X-Spam: Yes\r\n" in data


def test_reject_mapped_to_hold_stores_the_message_held(start: Start) -> None:
    ferry = start(rspamd_keys='reject_action = "hold"')
    reply = send(ferry, GTUBE)
    data = stored(ferry, reply)
    assert b"X-Spam: Yes\r\n" in data
    env = ferry.store.get(id_bytes(reply.lines[-1].rsplit(" ", 1)[1]))
    assert [r.state for r in env.recipients] == [RcptState.HELD]


def test_virus_is_rejected_naming_it(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    ferry = start()
    with caplog.at_level(logging.INFO, "ferry.mail"):
        reply = send(ferry, b"see the attachment: " + TEST_STRING)
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert reply.lines == [f"Message rejected: virus found: {TEST_VIRUS}"]
    assert ferry.store.count() == 0
    # The mail log names the agent and the virus.
    assert f"by=<clamav: virus found: {TEST_VIRUS}>" in caplog.text


def test_virus_held(start: Start) -> None:
    ferry = start(clamav_keys='action = "hold"')
    reply = send(ferry, TEST_STRING)
    env = ferry.store.get(id_bytes(reply.lines[-1].rsplit(" ", 1)[1]))
    assert [r.state for r in env.recipients] == [RcptState.HELD]


def test_large_message_streams_through_both(start: Start) -> None:
    ferry = start()
    body = big_body(5 << 20)
    data = stored(ferry, send(ferry, body))
    assert data.endswith(body + b"\r\n") and b"X-Spamd-Result: " in data
    # The signature at the very end of 5 MiB: clamd saw every chunk.
    reply = send(ferry, body + TEST_STRING)
    assert (reply.code, reply.enhanced) == (554, "5.7.1")


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_rspamd_down(start: Start, fail: str, caplog: pytest.LogCaptureFixture) -> None:
    down = start(agents=("rspamd",), rspamd_url=f"http://127.0.0.1:{free_port()}",
                 rspamd_keys=f'fail = "{fail}"')
    forged = b"X-Spamd-Result: default: False [-5.00 / 15.00]\r\nX-Spam: No\r\n" + HEADER
    with caplog.at_level(logging.WARNING, "ferry.agents"):
        reply = send(down, b"Hello Bob", forged)
    assert "agent rspamd failed at data" in caplog.text
    if fail == "open":
        # Unscanned, and the sender's copies of rspamd's fields do not pass for its word.
        data = stored(down, reply)
        assert b"X-Spamd-Result" not in data and b"X-Spam:" not in data
    else:
        assert (reply.code, reply.enhanced) == (451, "4.7.1")
        assert down.store.count() == 0


def test_clamd_down_fails_closed_by_default(start: Start, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    down = start(agents=("clamav",), clamav_address=f"unix:{tmp_path}/gone.sock")
    with caplog.at_level(logging.WARNING, "ferry.agents"):
        reply = send(down, b"Hello Bob")
    assert (reply.code, reply.enhanced) == (451, "4.7.1")
    assert "agent clamav failed at data" in caplog.text
    assert "cannot connect to clamd" in caplog.text
    assert down.store.count() == 0


@pytest.mark.parametrize("on_oversize", ["accept", "tempfail"])
def test_clamav_oversize(start: Start, on_oversize: str) -> None:
    ferry = start(agents=("clamav",),
                  clamav_keys=f'max_size = 2048\non_oversize = "{on_oversize}"')
    reply = send(ferry, TEST_STRING + b"\r\n" + big_body(4096))
    if on_oversize == "accept":
        assert reply.code == 250  # not scanned: the signature went through unseen
    else:
        assert (reply.code, reply.enhanced, reply.lines) == (
            451, "4.7.1", ["Message too large to scan for viruses"])
    # Under the limit, the same server scans.
    assert send(ferry, TEST_STRING).code == 554

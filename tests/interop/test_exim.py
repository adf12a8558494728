"""Interop with a real Exim 4.96 as the destination MTA (engine.testing.exim).

One private Exim on 127.0.30.1 accepts mail for two domains and delivers into Maildirs
under the temporary directory, with CRLF line ends and a ``Return-path:`` field.  One
Ferry, delivery on, has two [[send]] connectors that route those domains to Exim's port:
``plain.dest.test`` with TLS off, ``tls.dest.test`` with TLS required (Exim offers
STARTTLS with a trustme certificate; Ferry's "required" does not check it).

Each message is submitted to Ferry over SMTP and must arrive in the Maildir file byte for
byte, behind exactly three trace fields: Exim's Return-path and Received, then Ferry's
Received.  The messages: a plain one, an 8-bit one sent as BODY=8BITMIME (Exim's log says
whether Ferry passed the parameter on), and one whose lines start with dots, the last line
of the message among them (dot-stuffing, RFC 5321 §4.5.2).

Only 127.0.0.0/8 is used; no resolver is asked (Ferry's next hop is a literal address,
its DNS a responder on loopback; Exim has no DNS-using router).  Needs root and the Exim
binary that tests/run.sh unpacks into .cache/exim.
"""

from __future__ import annotations

import os
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from engine.config import SendConfig
from engine.testing.exim import EXIM_PACKAGE, EximInstance, find_exim
from engine.testing.server import RunningFerry
from engine.testing.wait import wait_for
from tests.interop.conftest import (
    SENDER,
    deliver_queued,
    headers,
    message,
    message_id,
    sending_ferry,
    submit,
    trace_prefix,
    with_keyword,
    write_cert,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Exim instance needs root"),
    pytest.mark.skipif(
        find_exim() is None,
        reason=f"no Exim binary: tests/run.sh unpacks the Debian package {EXIM_PACKAGE} "
        "into .cache/exim (or set FERRY_EXIM)",
    ),
]

EXIM_ADDRESS = "127.0.30.1"
USER = "bob"
#: Route name → the domain Ferry sends to Exim that way.
DOMAINS = {"plain": "plain.dest.test", "starttls": "tls.dest.test"}

EIGHT_BIT_BODY = "8-bit: Grüße, ÀÉÎÕÜ, 日本語\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"


def plain_message(tag: str) -> bytes:
    return message(tag, b"Plain text, nothing special.\r\n", dots=False)


def eightbit_message(tag: str) -> bytes:
    return message(tag, EIGHT_BIT_BODY, dots=False)


def dots_message(tag: str) -> bytes:
    """Every kind of line that needs (or looks as if it needs) dot-stuffing, and a lone "."
    as the message's last line, right before the end-of-data "."."""
    return headers(tag) + (
        b".\r\n..\r\n...\r\n.leading dot\r\n. space after dot\r\n"
        b"\r\n.\r\n\r\n"
        b"text.\r\nnot.a.dot.line\r\n"
        b".\r\n"
    )


MESSAGES = {"plain": plain_message, "eightbit": eightbit_message, "dots": dots_message}


@pytest.fixture(scope="module")
def exim(base: Path, ca: trustme.CA) -> Iterator[EximInstance]:
    cert, key = write_cert(ca, base / "exim-cert", "exim.test", EXIM_ADDRESS)
    instance = EximInstance(
        base / "exim",
        domains=tuple(DOMAINS.values()),
        local_parts=(USER,),
        address=EXIM_ADDRESS,
        tls_cert=cert,
        tls_key=key,
    )
    with instance:
        yield instance


@pytest.fixture(scope="module")
def ferry(base: Path, exim: EximInstance) -> Iterator[RunningFerry]:
    """A Ferry with delivery on: one send connector per route, both to Exim's port."""
    hop = ((exim.address, exim.port),)
    connectors = (
        SendConfig(name="exim-plain", address_spaces=(DOMAINS["plain"],), smarthosts=hop,
                   tls="off"),
        SendConfig(name="exim-tls", address_spaces=(DOMAINS["starttls"],), smarthosts=hop,
                   tls="required"),
    )
    with sending_ferry(base / "spool", connectors) as f:
        yield f


def delivered(exim: EximInstance, domain: str, msgid: bytes, timeout: float = 20.0) -> bytes:
    def find() -> bytes | None:
        return next((m for m in exim.messages(domain, USER) if msgid in m), None)

    data: bytes = wait_for(find, timeout, f"{msgid!r} in {exim.maildir(domain, USER)}")
    return data


@pytest.mark.parametrize("kind", list(MESSAGES))
@pytest.mark.parametrize("route", list(DOMAINS))
def test_ferry_delivers_to_exim_byte_exact(
    exim: EximInstance, ferry: RunningFerry, route: str, kind: str
) -> None:
    domain = DOMAINS[route]
    rcpt = f"{USER}@{domain}"
    msg = MESSAGES[kind](f"{kind}-{route}")
    eightbit = kind == "eightbit"
    start = exim.log_size()
    submit(ferry.host, ferry.port, rcpt, msg, ("BODY=8BITMIME",) if eightbit else ())
    data = delivered(exim, domain, message_id(msg))

    # The file is the message as submitted, CRLF and all, behind three trace fields.
    fields = trace_prefix(data, msg, b"\r\n")
    assert len(fields) == 3, fields
    return_path, exim_received, ferry_received = fields
    assert return_path == f"Return-path: <{SENDER}>".encode()
    # no reverse lookup (host_lookup is empty): the address, then the EHLO name
    assert exim_received.startswith(b"Received: from [127.0.0.1] (helo=ferry.test)\r\n")
    assert f"for {rcpt};".encode() in exim_received
    assert ferry_received.startswith(b"Received: from client.test (")
    assert b"by ferry.test (Ferry)" in ferry_received

    # TLS on the starttls route only; Exim's log confirms the cipher.
    keyword = with_keyword(exim_received)
    assert keyword == ("esmtps" if route == "starttls" else "esmtp"), exim_received
    m = re.search(rb"\sid (\S+)", exim_received)
    assert m is not None, exim_received
    exim_id = m.group(1).decode()
    arrival = exim.wait_log(rf"^.* {re.escape(exim_id)} <= {re.escape(SENDER)} .*$", after=start)
    assert (" X=TLS" in arrival.group(0)) == (route == "starttls"), arrival.group(0)
    exim.wait_log(
        rf"^.* {re.escape(exim_id)} => {USER} <{re.escape(rcpt)}> R=maildir T=maildir",
        after=start,
    )
    # Ferry passed BODY=8BITMIME on for the 8-bit message only.
    mail = exim.mail_command(exim_id, after=start)
    assert mail.upper().startswith(f"MAIL FROM:<{SENDER.upper()}>"), mail
    assert ("BODY=8BITMIME" in mail.upper().split()) == eightbit, mail

    wait_for(lambda: ferry.store.count() == 0, 10, "Ferry's queue empty after delivery")
    assert exim.queue_files() == 0


def test_exim_refuses_other_domains(exim: EximInstance) -> None:
    """The private Exim accepts its own domains only: nothing it accepts leaves it."""
    with smtplib.SMTP(exim.address, exim.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        code, _ = client.rcpt("someone@example.com")
    assert code >= 500


def test_queued_messages_follow_each_other_into_exim(base: Path, exim: EximInstance) -> None:
    """With mail waiting for it, Ferry sends each next MAIL, RCPT and DATA in the write that
    ends the previous body (RFC 2920 §3.1); Exim takes them (no synchronization error) and
    delivers all."""
    domain = DOMAINS["plain"]
    hop = ((exim.address, exim.port),)
    connector = SendConfig(name="exim-one", address_spaces=(domain,), smarthosts=hop,
                           tls="off")
    with sending_ferry(base / "spool-follow", (connector,), max_per_domain=1) as f:
        start = exim.log_size()
        msgs = [plain_message(f"follow{n}") for n in range(4)]
        agent = deliver_queued(f, domain, f"{USER}@{domain}", msgs,
                               lambda msgid: delivered(exim, domain, msgid))
        assert agent.follow_ons > 0 and agent.connections_opened == 1
    log = exim.log_text()[start:]
    assert "synchronization error" not in log

"""The verify agent in a running server: real SMTP sessions from 127.0.0.1 to a connector
with ``verify = [...]``, the DNS answers from the module's responder, and the stored
message's Authentication-Results field, the SMTP replies and the hold state checked."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import ipaddress
import smtplib
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.agents.api import Message
from engine.queue.records import RcptState, id_bytes
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config

dkimpy = importlib.import_module("dkim")  # a DKIM implementation we did not write

NO_RELAY = (ipaddress.ip_network("192.0.2.0/24"),)  # loopback clients may not relay
AUTHSERV = "mx.ferry.test"

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_PEM = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
_DKIM = "v=DKIM1; k=rsa; p=" + base64.b64encode(KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
_DKIM_TXT = " ".join(f'"{part}"' for part in textwrap.wrap(_DKIM, 200))

ZONE = f"""
shop.test.                300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc.shop.test.         300 IN TXT "v=DMARC1; p=reject"
s1._domainkey.shop.test.  300 IN TXT {_DKIM_TXT}
esp.test.                 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"
news.test.                300 IN TXT "v=spf1 -all"
_dmarc.news.test.         300 IN TXT "v=DMARC1; p=quarantine"
nodmarc.test.             300 IN TXT "v=spf1 -all"
"""

Start = Callable[..., RunningFerry]


@pytest.fixture
def start(tmp_path: Path, dns_server: DnsResponder) -> Iterator[Start]:
    """``start(verify=[...], relay=False, **agents_verify)``: a server whose first
    connector verifies, its agents' DNS pointed at the responder."""
    running: list[RunningFerry] = []

    def go(verify: tuple[str, ...] = ("spf", "dkim", "dmarc"), relay: bool = False,
           **settings: Any) -> RunningFerry:
        receive: dict[str, Any] = {"verify": verify}
        if not relay:
            receive["relay_networks"] = NO_RELAY
        config = ferry_config(tmp_path / f"spool{len(running)}", **receive)
        agents = dataclasses.replace(config.agents, verify=dataclasses.replace(
            config.agents.verify, authserv_id=AUTHSERV, **settings))
        delivery = dataclasses.replace(config.delivery, dns=(dns_server.host, dns_server.port))
        config = dataclasses.replace(config, agents=agents, delivery=delivery,
                                     accepted_domains=("ferry.test",))
        ferry = RunningFerry(config)
        running.append(ferry)
        return ferry

    yield go
    for ferry in running:
        ferry.stop()


def message(author: str, *, extra: str = "", sign: bool = False) -> bytes:
    data = (f"{extra}From: <news@{author}>\r\nTo: <you@ferry.test>\r\nSubject: hi\r\n"
            "Message-ID: <1@x.test>\r\n\r\nHello.\r\n").encode()
    if sign:
        data = dkimpy.sign(data, b"s1", author.encode(), KEY_PEM,
                           include_headers=[b"from", b"to", b"subject"]) + data
    return data


def send(ferry: RunningFerry, sender: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(ferry.host, ferry.port, local_hostname="out.client.test") as client:
        client.ehlo()
        client.mail(sender)
        assert client.rcpt("you@ferry.test")[0] == 250
        try:
            return client.data(data)
        except smtplib.SMTPDataError as exc:
            error = exc.smtp_error
            return exc.smtp_code, error if isinstance(error, bytes) else error.encode()


def stored(ferry: RunningFerry, reply: bytes) -> Message:
    return Message(ferry.store.body(id_bytes(reply.decode().rsplit(" ", 1)[1])))


def unfold(value: str) -> str:
    return " ".join(value.replace("\r\n", " ").split())


def test_dkim_aligned_mail_passes_and_forged_fields_go(start: Start) -> None:
    ferry = start()
    forged = ("Authentication-Results: MX.FERRY.TEST; dmarc=pass header.from=bank.test\r\n"
              "Authentication-Results: other.test; spf=pass smtp.mailfrom=shop.test\r\n")
    code, reply = send(ferry, "bounce@esp.test", message("shop.test", extra=forged, sign=True))
    assert code == 250, reply
    fields = [unfold(v) for v in stored(ferry, reply).get_all("Authentication-Results")]
    assert len(fields) == 2
    ours = fields[0]
    assert ours.startswith("mx.ferry.test; spf=pass smtp.mailfrom=esp.test; dkim=pass "
                           "header.d=shop.test")
    assert ours.endswith("; dmarc=pass (p=reject dis=none) header.from=shop.test")
    assert fields[1] == "other.test; spf=pass smtp.mailfrom=shop.test"


def test_the_field_text(start: Start) -> None:
    ferry = start()
    code, reply = send(ferry, "bounce@shop.test", message("shop.test"))
    assert code == 250, reply
    header = stored(ferry, reply).header.decode()
    assert ("Authentication-Results: mx.ferry.test;\r\n"
            "\tspf=pass smtp.mailfrom=shop.test;\r\n"
            "\tdkim=none (no signature);\r\n"
            "\tdmarc=pass (p=reject dis=none) header.from=shop.test\r\n") in header


def test_dmarc_reject(start: Start) -> None:
    ferry = start()
    code, reply = send(ferry, "bounce@esp.test", message("shop.test"))
    assert (code, reply) == (550, b"5.7.1 Message rejected by the DMARC policy of shop.test")
    assert ferry.store.count() == 0


def test_dmarc_quarantine_holds(start: Start) -> None:
    ferry = start()
    code, reply = send(ferry, "bounce@news.test", message("news.test"))
    assert code == 250, reply
    qid = id_bytes(reply.decode().rsplit(" ", 1)[1])
    assert [r.state for r in ferry.store.get(qid).recipients] == [RcptState.HELD]
    field = unfold(stored(ferry, reply).get_all("Authentication-Results")[0])
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=news.test" in field


def test_tag_only(start: Start) -> None:
    ferry = start(dmarc_policy="tag")
    code, reply = send(ferry, "bounce@esp.test", message("shop.test"))
    assert code == 250, reply
    assert "dmarc=fail" in stored(ferry, reply).get_all("Authentication-Results")[0]


def test_spf_fail_reject_without_dmarc(start: Start) -> None:
    ferry = start(spf_fail="reject")
    code, reply = send(ferry, "bounce@nodmarc.test", message("nodmarc.test"))
    assert code == 550 and reply.startswith(b"5.7.23 "), reply


def test_only_spf(start: Start) -> None:
    ferry = start(verify=("spf",))
    code, reply = send(ferry, "bounce@esp.test", message("shop.test"))
    assert code == 250, reply
    assert [unfold(v) for v in stored(ferry, reply).get_all("Authentication-Results")] == [
        "mx.ferry.test; spf=pass smtp.mailfrom=esp.test"]


def test_clients_that_may_relay_are_not_verified(start: Start) -> None:
    ferry = start(relay=True)
    code, reply = send(ferry, "bounce@esp.test", message("shop.test"))
    assert code == 250, reply
    assert stored(ferry, reply).get_all("Authentication-Results") == []


def test_a_body_changed_after_signing_fails_dkim_and_dmarc(start: Start) -> None:
    ferry = start(dmarc_policy="tag")
    data = message("shop.test", sign=True).replace(b"Hello.", b"Hello!")
    code, reply = send(ferry, "bounce@esp.test", data)
    assert code == 250, reply
    field = unfold(stored(ferry, reply).get_all("Authentication-Results")[0])
    assert "dkim=fail" in field and "header.d=shop.test" in field
    assert "dmarc=fail (p=reject dis=reject) header.from=shop.test" in field


def test_a_senders_next_messages_get_the_same_verdict(start: Start) -> None:
    # The first message waits for its lookups; the next ones find every answer cached
    # and are verified without waiting (engine.agents.verify): the same field each time.
    ferry = start()
    fields = []
    # One message sent three times: a message signed anew in another second would carry
    # another signature (its t= and Date:), so another header.b in the field.
    data = message("shop.test", sign=True)
    for _ in range(3):
        code, reply = send(ferry, "news@shop.test", data)
        assert code == 250, reply
        fields.append(unfold(stored(ferry, reply).get_all("Authentication-Results")[0]))
    assert fields == [fields[0]] * 3
    assert "dkim=pass" in fields[0] and "dmarc=pass" in fields[0]
    assert ferry.app.policy is not None and not ferry.app.policy.figures.failures

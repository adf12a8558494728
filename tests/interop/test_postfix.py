"""Interop with a real Postfix 3.7 (a private instance, engine.testing.postfix), both ways.

1. Postfix relays through Ferry: ``relayhost = [127.0.0.1]:<ferry>`` (plain), and through
   transport-map services to two more Ferry receivers, one needing STARTTLS
   (``smtp_tls_security_level = encrypt``) and one needing STARTTLS then AUTH (Postfix's
   Cyrus SASL client with a static password map; the receiver relays for authenticated
   clients only).  Ferry's delivery is paused; the test reads the stored envelope and
   body from its queue.
2. Ferry delivers to Postfix: a [[send]] connector routes dest.test to Postfix's smtpd on
   127.0.20.1 with TLS required; Postfix's virtual(8) agent writes a Maildir file under
   the temporary directory, which the test reads.

Every message must arrive byte-exact after the trace fields the hops prepend (Received,
and for the final delivery Return-Path, Delivered-To, X-Original-To).  Postfix stores a
Maildir file with LF line ends (its queue file holds records, not CRLF lines), so that
comparison is made against the original with CRLF turned into LF.

One Postfix instance and three Ferry receivers serve the whole module (Postfix takes a
couple of seconds to start).  Only 127.0.0.0/8 is used; no resolver is asked (Postfix's
next hops are literals, Ferry's DNS is a responder on loopback).  Needs root and the
Debian packages postfix and libsasl2-modules (for the AUTH test).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from engine.config import SendConfig
from engine.queue.records import Envelope
from engine.server.auth import hash_password
from engine.testing.postfix import PostfixInstance
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.wait import wait_for
from tests.interop.conftest import (
    SENDER,
    deliver_queued,
    message,
    message_id,
    sending_ferry,
    submit,
    trace_prefix,
    with_keyword,
    write_cert,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
    pytest.mark.skipif(
        not os.path.exists("/usr/sbin/postfix"),
        reason="Postfix is not installed (Debian package: postfix)",
    ),
]

POSTFIX_ADDRESS = "127.0.20.1"
NOBODY = 65534  # the owner of the virtual mailboxes (virtual_minimum_uid is 100)
SASL_PACKAGE = "libsasl2-modules"


# --- module fixtures: certificates, Ferry receivers, one Postfix -------------------------


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, base: Path) -> Path:
    path = base / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def receivers(ca: trustme.CA, base: Path) -> Iterator[dict[str, RunningFerry]]:
    """Three Ferry receivers, delivery paused: plain, STARTTLS, STARTTLS + AUTH only."""
    cert, key = write_cert(ca, base / "ferry-cert", "ferry.test", "127.0.0.1")
    tls = {"tls": "starttls", "cert_file": cert, "key_file": key}
    configs = {
        "plain": ferry_config(base / "spool-plain"),
        "tls": ferry_config(base / "spool-tls", **tls),
        # no relay by network: only an authenticated client may relay
        "auth": dataclasses.replace(
            ferry_config(base / "spool-auth", relay_networks=(), **tls),
            users={"user": hash_password("pass")},
        ),
    }
    running: dict[str, RunningFerry] = {}
    try:
        for name, config in configs.items():
            running[name] = RunningFerry(config)
        yield running
    finally:
        for f in running.values():
            f.stop()


@pytest.fixture(scope="module")
def postfix(
    base: Path, ca: trustme.CA, ca_file: Path, receivers: dict[str, RunningFerry]
) -> Iterator[PostfixInstance]:
    cert, key = write_cert(ca, base / "postfix-cert", "postfix.test", POSTFIX_ADDRESS)
    vmail = base / "vmail"
    vmail.mkdir(mode=0o755)
    os.chown(vmail, NOBODY, NOBODY)
    plain, tls, auth = (receivers[k] for k in ("plain", "tls", "auth"))
    encrypt = f"-o smtp_tls_security_level=encrypt -o smtp_tls_CAfile={ca_file}"
    instance = PostfixInstance(
        base / "postfix",
        {
            # 1. everything not routed otherwise goes to the plain receiver ...
            "relayhost": f"[{plain.host}]:{plain.port}",
            # ... and two domains to the TLS and the AUTH receivers
            "transport_maps": (
                f"inline:{{ tls.example=ferrytls:[{tls.host}]:{tls.port}, "
                f"auth.example=ferryauth:[{auth.host}]:{auth.port} }}"
            ),
            # 2. the final destination for dest.test: Maildirs under vmail/
            "virtual_mailbox_domains": "dest.test",
            "virtual_mailbox_base": str(vmail),
            "virtual_mailbox_maps": "inline:{ bob@dest.test=dest.test/bob/, "
            "carol@dest.test=dest.test/carol/, dave@dest.test=dest.test/dave/ }",
            "virtual_uid_maps": f"static:{NOBODY}",
            "virtual_gid_maps": f"static:{NOBODY}",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
        },
        smtpd_address=POSTFIX_ADDRESS,
        # smtpd logs the commands it receives ("< unknown[127.0.0.1]: MAIL FROM:..."), so a
        # test can see the parameters Ferry's client sends
        smtpd_options={"debug_peer_list": "127.0.0.0/8", "debug_peer_level": "1"},
        services=[
            f"ferrytls unix - - n - - smtp {encrypt}",
            f"ferryauth unix - - n - - smtp {encrypt} -o smtp_sasl_auth_enable=yes "
            "-o smtp_sasl_password_maps=static:user:pass "
            "-o smtp_sasl_security_options=noanonymous "
            "-o smtp_sasl_tls_security_options=noanonymous",
        ],
    )
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def stored(f: RunningFerry, message_id: bytes, timeout: float = 20.0) -> tuple[Envelope, bytes]:
    """The envelope and body of the message Ferry holds with this Message-ID."""

    def find() -> tuple[Envelope, bytes] | None:
        for entry in f.store.due(time.time() + 10 * 86400, 1000):
            body = f.store.body(entry.queue_id)
            if message_id in body:
                return f.store.get(entry.queue_id), body
        return None

    found: tuple[Envelope, bytes] = wait_for(find, timeout, f"{message_id!r} in Ferry's queue")
    return found


def check_relayed(
    postfix: PostfixInstance, f: RunningFerry, rcpt: str, msg: bytes, log_from: int
) -> tuple[Envelope, list[bytes]]:
    """Postfix said sent, Ferry holds the message byte-exact behind two Received fields
    (Ferry's, then Postfix's); returns the envelope and those fields."""
    postfix.wait_log(
        rf"to=<{re.escape(rcpt)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{f.port}"
        r".*status=sent",
        after=log_from,
    )
    postfix.wait_queue_empty()  # nothing deferred or held back on Postfix's side
    env, body = stored(f, message_id(msg))
    assert env.sender == SENDER
    assert [r.address for r in env.recipients] == [rcpt]
    fields = trace_prefix(body, msg, b"\r\n")
    assert len(fields) == 2, fields
    assert fields[0].startswith(b"Received: from postfix.test (")
    assert b"by ferry.test (Ferry)" in fields[0]
    assert fields[1].startswith(b"Received: ") and b"postfix.test (Postfix" in fields[1]
    return env, fields


# --- 1. Postfix relays through Ferry -----------------------------------------------------


def test_postfix_relays_through_ferry_as_relayhost(
    postfix: PostfixInstance, receivers: dict[str, RunningFerry]
) -> None:
    """Submitted with Postfix's sendmail (LF lines in, CRLF on the wire to Ferry)."""
    msg = message("plain")
    start = postfix.log_size()
    postfix.sendmail(msg.replace(b"\r\n", b"\n"), SENDER, ["rcpt@plain.example"])
    _env, fields = check_relayed(postfix, receivers["plain"], "rcpt@plain.example", msg, start)
    assert with_keyword(fields[0]) == "ESMTP"  # no TLS was offered, none used
    assert fields[1].startswith(b"Received: by postfix.test (Postfix, from userid 0)")


def test_postfix_relays_through_ferry_with_starttls_required(
    postfix: PostfixInstance, receivers: dict[str, RunningFerry]
) -> None:
    """Submitted to Postfix's smtpd as 8BITMIME: Ferry advertises 8BITMIME, so Postfix
    passes the 8-bit body on unchanged (no conversion to quoted-printable)."""
    f = receivers["tls"]
    msg = message("tls", "Grüße, 8-bit: ÀÉÎÕÜ\r\n".encode())
    start = postfix.log_size()
    submit(POSTFIX_ADDRESS, postfix.port, "rcpt@tls.example", msg, ("BODY=8BITMIME",))
    env, fields = check_relayed(postfix, f, "rcpt@tls.example", msg, start)
    assert with_keyword(fields[0]) == "ESMTPS"
    assert env.body_type.upper() == "8BITMIME"
    # Postfix verified Ferry's chain against the test CA (smtp_tls_CAfile)
    postfix.wait_log(
        rf"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:"
        rf"{f.port}",
        after=start,
    )


def _sasl_mechanisms() -> list[str]:
    """Cyrus SASL client plugins for PLAIN / LOGIN (Debian: libsasl2-modules)."""
    found: list[str] = []
    for directory in [*glob.glob("/usr/lib/*/sasl2"), "/usr/lib/sasl2"]:
        for name, mech in (("libplain.so", "PLAIN"), ("liblogin.so", "LOGIN")):
            if glob.glob(os.path.join(directory, name + "*")):
                found.append(mech)
    return found


def test_postfix_relays_through_ferry_with_starttls_and_auth(
    postfix: PostfixInstance, receivers: dict[str, RunningFerry]
) -> None:
    if not _sasl_mechanisms():
        pytest.fail(
            f"Postfix's SASL client has no PLAIN or LOGIN mechanism (nothing in "
            f"/usr/lib/<arch>/sasl2/): install the Debian package {SASL_PACKAGE}"
        )
    f = receivers["auth"]
    msg = message("auth")
    start = postfix.log_size()
    submit(POSTFIX_ADDRESS, postfix.port, "rcpt@auth.example", msg)
    env, fields = check_relayed(postfix, f, "rcpt@auth.example", msg, start)
    assert with_keyword(fields[0]) == "ESMTPSA"
    assert env.auth_user == "user"
    assert b"(authenticated user user)" in fields[0]


def test_relay_without_auth_is_refused_by_the_auth_receiver(
    postfix: PostfixInstance, receivers: dict[str, RunningFerry]
) -> None:
    """The AUTH receiver relays for authenticated clients only: the previous test's
    success is AUTH's doing, not the network's."""
    f = receivers["auth"]
    with smtplib.SMTP(f.host, f.port, timeout=30) as client:
        client.ehlo("client.test")
        client.starttls()
        client.ehlo("client.test")
        client.mail(SENDER)
        code, _ = client.rcpt("rcpt@auth.example")
    assert code >= 500


# --- 2. Ferry delivers to Postfix --------------------------------------------------------


@pytest.fixture(scope="module")
def sender_ferry(base: Path, postfix: PostfixInstance) -> Iterator[RunningFerry]:
    """A Ferry with delivery on: dest.test to Postfix's smtpd, STARTTLS required."""
    connector = SendConfig(
        name="postfix",
        address_spaces=("dest.test",),
        smarthosts=((POSTFIX_ADDRESS, postfix.port),),
        tls="required",
    )
    with sending_ferry(base / "spool-send", (connector,)) as f:
        yield f


def delivered(base: Path, user: str, msgid: bytes, timeout: float = 20.0) -> bytes:
    new = base / "vmail" / "dest.test" / user / "new"

    def find() -> bytes | None:
        if new.is_dir():
            for path in new.iterdir():
                data = path.read_bytes()
                if msgid in data:
                    return data
        return None

    data: bytes = wait_for(find, timeout, f"{msgid!r} in {new}")
    return data


def check_delivered(
    base: Path,
    postfix: PostfixInstance,
    f: RunningFerry,
    user: str,
    msg: bytes,
    log_from: int,
    eightbit: bool = False,
) -> list[bytes]:
    rcpt = f"{user}@dest.test"
    postfix.wait_log(rf"to=<{re.escape(rcpt)}>, relay=virtual.*status=sent", after=log_from)
    # the MAIL command Ferry's client sent (logged by smtpd's debug_peer_list)
    mail = postfix.wait_log(rf"< \S+: MAIL FROM:<{re.escape(SENDER)}>(.*)$", after=log_from)
    params = mail.group(1).upper().split()
    assert ("BODY=8BITMIME" in params) == eightbit, mail.group(0)
    data = delivered(base, user, message_id(msg))
    fields = trace_prefix(data, msg.replace(b"\r\n", b"\n"), b"\n")
    names = [fl.split(b":", 1)[0].lower() for fl in fields]
    # virtual(8) prepends Return-Path, X-Original-To and Delivered-To
    assert names == [b"return-path", b"x-original-to", b"delivered-to", b"received", b"received"], (
        fields
    )
    assert fields[:3] == [
        f"Return-Path: <{SENDER}>".encode(),
        f"X-Original-To: {rcpt}".encode(),
        f"Delivered-To: {rcpt}".encode(),
    ]
    postfix_received, ferry_received = fields[-2:]
    assert postfix_received.startswith(b"Received: from ferry.test (")
    assert b"by postfix.test (Postfix) with ESMTPS" in postfix_received  # tls = "required"
    assert ferry_received.startswith(b"Received: from client.test (")
    assert b"by ferry.test (Ferry)" in ferry_received
    m = re.search(rf"from=<{re.escape(SENDER)}>, size=\d+, nrcpt=1", postfix.log_text())
    assert m is not None
    wait_for(lambda: f.store.count() == 0, 10, "Ferry's queue empty after delivery")
    return fields


def test_ferry_delivers_to_postfix_byte_exact(
    base: Path, postfix: PostfixInstance, sender_ferry: RunningFerry
) -> None:
    msg = message("dest")
    start = postfix.log_size()
    submit(sender_ferry.host, sender_ferry.port, "bob@dest.test", msg)
    check_delivered(base, postfix, sender_ferry, "bob", msg, start)


def test_ferry_delivers_8bitmime_and_dot_lines_to_postfix(
    base: Path, postfix: PostfixInstance, sender_ferry: RunningFerry
) -> None:
    body = (
        ("8-bit: Grüße, ÀÉÎÕÜ, 日本語\r\n.\r\n...three dots\r\n.Grüße after a dot\r\n").encode()
        + bytes(range(0x80, 0x100))
        + b"\r\n"
    )
    msg = message("eightbit", body)
    start = postfix.log_size()
    submit(sender_ferry.host, sender_ferry.port, "carol@dest.test", msg, ("BODY=8BITMIME",))
    check_delivered(base, postfix, sender_ferry, "carol", msg, start, eightbit=True)


def test_queued_messages_follow_each_other_into_postfix(
    base: Path, postfix: PostfixInstance
) -> None:
    """With mail waiting for it, Ferry sends each next MAIL, RCPT and DATA in the write that
    ends the previous body (RFC 2920 §3.1); Postfix's smtpd takes them and delivers all."""
    connector = SendConfig(
        name="postfix-one",
        address_spaces=("dest.test",),
        smarthosts=((POSTFIX_ADDRESS, postfix.port),),
        tls="required",
    )
    with sending_ferry(base / "spool-follow", (connector,), max_per_domain=1) as f:
        start = postfix.log_size()
        msgs = [message(f"follow{n}") for n in range(4)]
        agent = deliver_queued(f, "dest.test", "dave@dest.test", msgs,
                               lambda msgid: delivered(base, "dave", msgid))
        assert agent.follow_ons > 0 and agent.connections_opened == 1
    log = postfix.log_text()[start:]
    assert "improper command pipelining" not in log
    assert len(re.findall(r"to=<dave@dest\.test>, relay=virtual.*status=sent", log)) == 4

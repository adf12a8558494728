"""Delivery status notifications (engine.message.dsn): NOTIFY decisions (RFC 3461 §4.1),
failure / delay / success reports read back with Python's email package, RET handling,
ENVID / ORCPT, non-ASCII addresses (RFC 6533), hostile wire values that must never split a
field, and a Hypothesis property: any reply text and address give a parseable report with
exactly one per-recipient group per wanted item."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage, Message, MIMEPart
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.message.dsn import (
    Failure,
    build_dsn,
    dsn_envelope_sender,
    reply_status,
    wants_notice,
)
from engine.queue.records import Envelope, Recipient

MTA = "mx.ferry.example"
ARRIVAL = datetime(2026, 11, 26, 20, 0, 0, tzinfo=UTC).timestamp()
NOW = ARRIVAL + 3600
ARRIVAL_DATE = "Thu, 26 Nov 2026 20:00:00 +0000"
NOW_DATE = "Thu, 26 Nov 2026 21:00:00 +0000"
ORIGINAL = (
    b"Received: from client.example by mx.ferry.example; " + ARRIVAL_DATE.encode() + b"\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"The body line that only RET=FULL returns.\r\n"
)


def envelope(*recipients: Recipient, **overrides: Any) -> Envelope:
    args: dict[str, Any] = {
        "sender": "alice@example.org",
        "recipients": list(recipients) or [Recipient("bob@example.com", "example.com")],
        "arrival": ARRIVAL,
        "message_id": "<m1@example.org>",
    }
    args.update(overrides)
    return Envelope(**args)


def dsn(env: Envelope, *items: Failure, **overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "reporting_mta": MTA,
        "envelope": env,
        "items": list(items),
        "original": ORIGINAL,
        "now": NOW,
    }
    args.update(overrides)
    out = build_dsn(**args)
    assert out is not None
    check_wire(out)
    return out


def check_wire(data: bytes) -> None:
    """Canonical CRLF, no NUL, no line over 998 octets (RFC 5322 §2.1.1, §2.3)."""
    assert data.endswith(b"\r\n")
    assert b"\x00" not in data
    lines = data[:-2].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line
        assert b"\n" not in line
        assert len(line) <= 998


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.is_multipart()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    return msg


def parts(msg: EmailMessage) -> list[MIMEPart]:
    out = list(msg.iter_parts())
    assert len(out) == 3
    assert out[0].get_content_type() == "text/plain"
    assert out[1].get_content_type() == "message/delivery-status"
    return out


def status_groups(msg: EmailMessage) -> tuple[Message, list[Message]]:
    """The per-message group and the per-recipient groups of the delivery-status part."""
    payload = parts(msg)[1].get_payload()
    assert isinstance(payload, list)
    groups = [group for group in payload if isinstance(group, Message)]
    assert len(groups) == len(payload)
    return groups[0], groups[1:]


def status_part_bytes(data: bytes) -> bytes:
    start = data.index(b"Content-Type: message/delivery-status\r\n")
    return data[start : data.index(b"\r\n--", start)]


# --- wants_notice -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "failure", "delay", "success"),
    [
        ((), True, True, False),  # RFC 3461 §4.1 default, DELAY by our choice
        (("NEVER",), False, False, False),
        (("SUCCESS",), False, False, True),
        (("FAILURE",), True, False, False),
        (("DELAY",), False, True, False),
        (("FAILURE", "DELAY"), True, True, False),
        (("SUCCESS", "FAILURE"), True, False, True),
        (("SUCCESS", "FAILURE", "DELAY"), True, True, True),
        (("failure", "delay"), True, True, False),  # stored upper-case, but be lenient
    ],
)
def test_wants_notice(notify: tuple[str, ...], failure: bool, delay: bool, success: bool) -> None:
    rcpt = Recipient("bob@example.com", "example.com", notify=notify)
    assert wants_notice(rcpt, "failure") is failure
    assert wants_notice(rcpt, "delay") is delay
    assert wants_notice(rcpt, "success") is success


def test_dsn_envelope_sender_is_null() -> None:
    assert dsn_envelope_sender() == ""


# --- a failure report, field by field ------------------------------------------------------


def test_failure_report() -> None:
    env = envelope(Recipient("bob@example.com", "example.com"))
    out = dsn(
        env,
        Failure(0, "failed", "5.1.1", "550 5.1.1 No such user", "mx1.example.com"),
        boundary="BOUNDARY",
    )
    msg = parse(out)
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert b"\r\nTo: <alice@example.org>\r\n" in out
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"] == NOW_DATE
    assert re.fullmatch(rf"<[^<>@\s]+@{re.escape(MTA)}>", msg["Message-ID"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg.get_boundary() == "BOUNDARY"

    text, _, returned = parts(msg)
    body = text.get_content()
    assert f"mail delivery system at {MTA}" in body
    assert "<bob@example.com>: delivery failed permanently (5.1.1)" in body
    assert "mx1.example.com said: 550 5.1.1 No such user" in body

    per_message, groups = status_groups(msg)
    assert dict(per_message.items()) == {
        "Reporting-MTA": f"dns; {MTA}",
        "Arrival-Date": ARRIVAL_DATE,
    }
    assert len(groups) == 1
    assert dict(groups[0].items()) == {
        "Final-Recipient": "rfc822;bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 No such user",
        "Last-Attempt-Date": NOW_DATE,
    }
    # RET absent: headers only (our default).
    assert returned.get_content_type() == "text/rfc822-headers"
    assert out.isascii()


def test_two_message_ids_differ() -> None:
    env = envelope()
    one = parse(dsn(env, Failure(0, "failed", "5.1.1")))["Message-ID"]
    two = parse(dsn(env, Failure(0, "failed", "5.1.1")))["Message-ID"]
    assert one != two


def test_generated_boundaries_differ_and_are_used() -> None:
    env = envelope()
    a = parse(dsn(env, Failure(0, "failed", "5.1.1"))).get_boundary()
    b = parse(dsn(env, Failure(0, "failed", "5.1.1"))).get_boundary()
    assert a and b and a != b


def test_delay_report() -> None:
    until = NOW + 4 * 86400
    out = dsn(
        envelope(),
        Failure(0, "delayed", "4.4.1", "421 4.4.1 try later", "mx1.example.com", until),
    )
    msg = parse(out)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, groups = status_groups(msg)
    assert groups[0]["Action"] == "delayed"
    assert groups[0]["Status"] == "4.4.1"
    assert groups[0]["Will-Retry-Until"] == "Mon, 30 Nov 2026 21:00:00 +0000"
    assert groups[0]["Diagnostic-Code"] == "smtp; 421 4.4.1 try later"
    body = parts(msg)[0].get_content()
    assert "still being retried" in body
    assert "Will retry until Mon, 30 Nov 2026 21:00:00 +0000" in body


def test_will_retry_until_only_for_delayed() -> None:
    msg = parse(dsn(envelope(), Failure(0, "failed", "5.4.7", "", "", NOW + 10)))
    _, groups = status_groups(msg)
    assert groups[0]["Will-Retry-Until"] is None
    assert groups[0]["Diagnostic-Code"] is None
    assert groups[0]["Remote-MTA"] is None


def test_success_report_when_asked() -> None:
    rcpt = Recipient("bob@example.com", "example.com", notify=("SUCCESS",))
    msg = parse(dsn(envelope(rcpt), Failure(0, "delivered", "2.0.0", "250 2.0.0 Ok")))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, groups = status_groups(msg)
    assert groups[0]["Action"] == "delivered"


def test_relayed_report_names_the_next_hop_with_orcpt_and_envid() -> None:
    # RFC 3461 §5.2.2: relayed to a next hop that does not offer DSN.
    rcpts = [Recipient("bob@example.com", "example.com", notify=("SUCCESS",),
                       orcpt="rfc822;robert@example.com"),
             Recipient("carol@example.com", "example.com", notify=("SUCCESS", "FAILURE"))]
    out = dsn(envelope(*rcpts, envid="env-42"),
              Failure(0, "relayed", "2.0.0", "250 2.0.0 Ok: queued as 1A", "mx.example.com"),
              Failure(1, "relayed", "2.0.0", "250 2.0.0 Ok: queued as 1A", "mx.example.com"))
    msg = parse(out)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    per_message, groups = status_groups(msg)
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert [g["Action"] for g in groups] == ["relayed", "relayed"]
    assert [g["Status"] for g in groups] == ["2.0.0", "2.0.0"]
    assert groups[0]["Original-Recipient"] == "rfc822;robert@example.com"
    assert groups[1]["Original-Recipient"] is None
    assert groups[0]["Remote-MTA"] == "dns; mx.example.com"
    assert groups[0]["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 1A"
    assert "relayed to a system that sends no further notices" in parts(msg)[0].get_content()


@pytest.mark.parametrize("action", ["delivered", "relayed"])
def test_a_report_of_successes_returns_headers_only_even_for_ret_full(action: Any) -> None:
    # RFC 3461 §4.3: RET applies to reports of a failure; without one, headers only.
    rcpt = Recipient("bob@example.com", "example.com", notify=("SUCCESS",))
    out = dsn(envelope(rcpt, ret="FULL"), Failure(0, action, "2.0.0", "250 2.0.0 Ok"))
    returned = parts(parse(out))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Description"] == "Message Headers"
    assert b"Subject: quarterly numbers\r\n" in out
    assert b"only RET=FULL returns" not in out


def test_a_report_with_a_failure_and_a_success_returns_the_whole_message() -> None:
    rcpts = [Recipient("bob@example.com", "example.com", notify=("SUCCESS", "FAILURE")),
             Recipient("carol@example.com", "example.com", notify=("SUCCESS", "FAILURE"))]
    out = dsn(envelope(*rcpts, ret="FULL"), Failure(0, "delivered", "2.0.0"),
              Failure(1, "failed", "5.1.1", "550 5.1.1 No such user"))
    msg = parse(out)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert [g["Action"] for g in status_groups(msg)[1]] == ["delivered", "failed"]
    assert parts(msg)[2].get_content_type() == "message/rfc822"
    assert ORIGINAL in out


def test_our_own_diagnostic_is_not_typed_smtp() -> None:
    msg = parse(dsn(envelope(), Failure(0, "failed", "4.4.7", "message expired")))
    _, groups = status_groups(msg)
    assert groups[0]["Diagnostic-Code"] == "X-Ferry; message expired"


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [
        ("failed", "550", "5.0.0"),
        ("failed", "5.1.1 extra", "5.0.0"),
        ("delayed", "", "4.0.0"),
        ("delivered", "9.9.9", "2.0.0"),
        ("failed", "4.4.7", "4.4.7"),  # expiry after temporary errors keeps its code
        ("failed", "5.123.456", "5.123.456"),
    ],
)
def test_status_must_be_an_rfc3463_code(action: Any, status: str, expected: str) -> None:
    rcpt = Recipient("bob@example.com", "example.com", notify=("SUCCESS", "FAILURE", "DELAY"))
    msg = parse(dsn(envelope(rcpt), Failure(0, action, status)))
    _, groups = status_groups(msg)
    assert groups[0]["Status"] == expected


def test_index_outside_the_envelope_raises() -> None:
    with pytest.raises(ValueError, match="index"):
        build_dsn(
            reporting_mta=MTA,
            envelope=envelope(),
            items=[Failure(1, "failed", "5.1.1")],
            original=ORIGINAL,
            now=NOW,
        )
    with pytest.raises(ValueError, match="index"):
        build_dsn(
            reporting_mta=MTA,
            envelope=envelope(),
            items=[Failure(-1, "failed", "5.1.1")],
            original=ORIGINAL,
            now=NOW,
        )


def test_given_boundary_that_occurs_in_the_content_raises() -> None:
    with pytest.raises(ValueError, match="boundary"):
        build_dsn(
            reporting_mta=MTA,
            envelope=envelope(ret="FULL"),
            items=[Failure(0, "failed", "5.1.1")],
            original=ORIGINAL + b"--BOUNDARY\r\n",
            now=NOW,
            boundary="BOUNDARY",
        )


# --- who gets a report ---------------------------------------------------------------------


def test_null_sender_gets_nothing() -> None:
    for sender in ("", "<>"):
        out = build_dsn(
            reporting_mta=MTA,
            envelope=envelope(sender=sender),
            items=[Failure(0, "failed", "5.1.1", "550 5.1.1 No such user")],
            original=ORIGINAL,
            now=NOW,
        )
        assert out is None


def test_auto_submitted_original_still_bounces() -> None:
    original = b"Auto-Submitted: auto-generated\r\n" + ORIGINAL
    out = build_dsn(
        reporting_mta=MTA,
        envelope=envelope(),
        items=[Failure(0, "failed", "5.1.1")],
        original=original,
        now=NOW,
    )
    assert out is not None


@pytest.mark.parametrize(
    ("notify", "action", "sent"),
    [
        (("NEVER",), "failed", False),
        (("NEVER",), "delayed", False),
        (("SUCCESS",), "failed", False),
        (("SUCCESS",), "delayed", False),
        (("SUCCESS",), "relayed", True),
        (("FAILURE",), "delayed", False),
        (("FAILURE",), "failed", True),
        (("DELAY",), "delayed", True),
        (("FAILURE", "DELAY"), "delayed", True),
        (("FAILURE", "DELAY"), "delivered", False),
        ((), "delivered", False),
        ((), "expanded", False),
        ((), "delayed", True),
    ],
)
def test_notify_decides_whether_a_report_is_built(
    notify: tuple[str, ...], action: Any, sent: bool
) -> None:
    env = envelope(Recipient("bob@example.com", "example.com", notify=notify))
    out = build_dsn(
        reporting_mta=MTA,
        envelope=env,
        items=[Failure(0, action, "5.0.0")],
        original=ORIGINAL,
        now=NOW,
    )
    assert (out is not None) is sent


def test_only_wanted_recipients_are_listed() -> None:
    env = envelope(
        Recipient("a@example.com", "example.com"),
        Recipient("b@example.com", "example.com", notify=("NEVER",)),
        Recipient("c@example.com", "example.com", notify=("SUCCESS",)),
        Recipient("d@example.com", "example.com", notify=("FAILURE", "DELAY")),
    )
    out = dsn(env, *(Failure(i, "failed", "5.1.1") for i in range(4)))
    msg = parse(out)
    _, groups = status_groups(msg)
    assert [g["Final-Recipient"] for g in groups] == [
        "rfc822;a@example.com",
        "rfc822;d@example.com",
    ]
    body = parts(msg)[0].get_content()
    assert "b@example.com" not in body
    assert "c@example.com" not in body


def test_no_items_gives_nothing() -> None:
    out = build_dsn(reporting_mta=MTA, envelope=envelope(), items=[], original=ORIGINAL, now=NOW)
    assert out is None


# --- the returned original (RFC 3461 §4.3) -------------------------------------------------


def test_ret_hdrs_returns_the_header_block_only() -> None:
    out = dsn(envelope(ret="HDRS"), Failure(0, "failed", "5.1.1"))
    returned = parts(parse(out))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: quarterly numbers\r\n" in out
    assert b"only RET=FULL returns" not in out


def test_ret_absent_returns_headers_only() -> None:
    out = dsn(envelope(ret=""), Failure(0, "failed", "5.1.1"))
    assert parts(parse(out))[2].get_content_type() == "text/rfc822-headers"
    assert b"only RET=FULL returns" not in out
    assert b"Message-ID: <m1@example.org>\r\n" in out


def test_ret_full_returns_the_whole_message() -> None:
    out = dsn(envelope(ret="FULL"), Failure(0, "failed", "5.1.1"))
    returned = parts(parse(out))[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_content()
    assert isinstance(inner, EmailMessage)
    assert inner["Subject"] == "quarterly numbers"
    assert "only RET=FULL returns" in inner.get_content()
    assert ORIGINAL in out


def test_ret_full_over_the_cap_returns_headers_only() -> None:
    out = dsn(envelope(ret="FULL"), Failure(0, "failed", "5.1.1"), max_return=len(ORIGINAL) - 1)
    msg = parse(out)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert b"only RET=FULL returns" not in out
    assert "too large to return in full" in parts(msg)[0].get_content()
    at_cap = dsn(envelope(ret="FULL"), Failure(0, "failed", "5.1.1"), max_return=len(ORIGINAL))
    assert parts(parse(at_cap))[2].get_content_type() == "message/rfc822"


def test_ret_full_with_8bit_body_is_marked_8bit() -> None:
    original = ORIGINAL.replace(b"The body", "Der Körper".encode())
    out = dsn(envelope(ret="FULL"), Failure(0, "failed", "5.1.1"), original=original)
    returned = parts(parse(out))[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert original in out


def test_headers_of_a_message_without_body_separator_end_with_crlf() -> None:
    original = b"Subject: no body\r\nX-Last: field"
    out = dsn(envelope(), Failure(0, "failed", "5.1.1"), original=original)
    # The part's own CRLF, then the CRLF that belongs to the delimiter (RFC 2046 §5.1.1).
    assert b"X-Last: field\r\n\r\n--" in out
    assert parts(parse(out))[2].get_content_type() == "text/rfc822-headers"


# --- ENVID, ORCPT, non-ASCII ---------------------------------------------------------------


def test_envid_and_orcpt_are_carried() -> None:
    rcpt = Recipient("bob@example.com", "example.com", orcpt="rfc822;Bob.Original@Example.COM")
    msg = parse(dsn(envelope(rcpt, envid="QQ314159"), Failure(0, "failed", "5.1.1")))
    per_message, groups = status_groups(msg)
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert groups[0]["Original-Recipient"] == "rfc822;Bob.Original@Example.COM"
    assert groups[0]["Final-Recipient"] == "rfc822;bob@example.com"
    # Original-Recipient comes before Final-Recipient (RFC 3464 §2.3).
    assert list(groups[0].keys())[:2] == ["Original-Recipient", "Final-Recipient"]


def test_orcpt_without_usable_type_is_left_out() -> None:
    for orcpt in ("no-semicolon", ";bob@example.com", "bad type;bob@example.com", "rfc822;"):
        rcpt = Recipient("bob@example.com", "example.com", orcpt=orcpt)
        _, groups = status_groups(parse(dsn(envelope(rcpt), Failure(0, "failed", "5.1.1"))))
        assert groups[0]["Original-Recipient"] is None, orcpt


def test_non_ascii_recipient_uses_the_utf8_address_type() -> None:
    rcpt = Recipient("jürgen+x=y@bücher.example", "bücher.example", orcpt="rfc822;JÜRGEN@b.example")
    out = dsn(envelope(rcpt, smtputf8=True), Failure(0, "failed", "5.1.1", "550 5.1.1 unknown"))
    msg = parse(out)
    _, groups = status_groups(msg)
    # RFC 6533 §3: QCHARs as they are, "+", "=" and non-ASCII as \x{HEX}.
    assert groups[0]["Final-Recipient"] == r"utf-8;j\x{FC}rgen\x{2B}x\x{3D}y@b\x{FC}cher.example"
    assert groups[0]["Original-Recipient"] == r"utf-8;J\x{DC}RGEN@b.example"
    assert status_part_bytes(out).isascii()
    text = parts(msg)[0]
    assert text.get_content_charset() == "utf-8"
    assert "<jürgen+x=y@bücher.example>: delivery failed" in text.get_content()


def test_utf8_orcpt_keeps_its_escapes() -> None:
    rcpt = Recipient("x@example.com", "example.com", orcpt=r"utf-8;j\x{FC}rgen@b.example")
    _, groups = status_groups(parse(dsn(envelope(rcpt), Failure(0, "failed", "5.1.1"))))
    assert groups[0]["Original-Recipient"] == r"utf-8;j\x{FC}rgen@b.example"


def test_overlong_utf8_address_is_cut_between_escapes() -> None:
    # ASCII characters, then escapes of 6 characters each ("\x{FC}"): the cap (900) falls
    # inside the first escape, or just after it.
    for cut in range(1, 7):
        rcpt = Recipient("a" * (900 - cut) + "ü" * 10 + "@example.com", "example.com")
        _, groups = status_groups(parse(dsn(envelope(rcpt), Failure(0, "failed", "5.1.1"))))
        expected = "a" * (900 - cut) + ("\\x{FC}" if cut == 6 else "")
        assert groups[0]["Final-Recipient"] == "utf-8;" + expected, cut


def test_non_ascii_sender_in_to() -> None:
    out = dsn(
        envelope(sender="jürgen@bücher.example", smtputf8=True), Failure(0, "failed", "5.1.1")
    )
    assert "To: <jürgen@bücher.example>\r\n".encode() in out
    parse(out)


def test_in_reply_to_only_for_a_clean_message_id() -> None:
    msg = parse(dsn(envelope(message_id="<m1@example.org> junk"), Failure(0, "failed", "5.1.1")))
    assert msg["In-Reply-To"] is None
    assert msg["References"] is None


# --- hostile values ------------------------------------------------------------------------

INJECTIONS = [
    "550 no\r\nBcc: victim@example.net",
    "550 no\r\n\r\nX-Injected: 1",
    "550 no\nX-Injected: 1",
    "550 no\rX-Injected: 1",
    "550 no\x00X-Injected: 1",
    "550 no\r\n.\r\nMAIL FROM:<x@y>",
    "550 \u2028X-Injected: 1\u0085X-Injected: 2",
]


@pytest.mark.parametrize("hostile", INJECTIONS)
def test_hostile_values_never_split_a_field(hostile: str) -> None:
    rcpt = Recipient("bob" + hostile + "@example.com", "example.com", orcpt="rfc822;" + hostile)
    env = envelope(rcpt, envid="E" + hostile, sender="alice" + hostile + "@example.org")
    out = dsn(env, Failure(0, "failed", "5.1.1", hostile, "mx" + hostile))
    msg = parse(out)
    assert msg["Bcc"] is None
    assert msg["X-Injected"] is None
    per_message, groups = status_groups(msg)
    assert len(groups) == 1
    assert per_message["X-Injected"] is None
    assert groups[0]["X-Injected"] is None
    assert groups[0]["Bcc"] is None
    assert set(groups[0].keys()) == {
        "Original-Recipient",
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }
    assert groups[0]["Diagnostic-Code"].startswith("smtp; 550")
    for line in out.split(b"\r\n"):
        assert not line.startswith((b"X-Injected", b"Bcc", b"MAIL FROM"))
    assert status_part_bytes(out).isascii()


def test_multiline_reply_becomes_one_line() -> None:
    reply = "550-5.1.1 The mailbox\r\n550-5.1.1  does not\r\n550 5.1.1\texist\r\n"
    _, groups = status_groups(parse(dsn(envelope(), Failure(0, "failed", "5.1.1", reply))))
    assert groups[0]["Diagnostic-Code"] == (
        "smtp; 550-5.1.1 The mailbox 550-5.1.1 does not 550 5.1.1 exist"
    )


def test_sender_that_is_not_a_mailbox_cannot_add_recipients() -> None:
    env = envelope(sender="x@example.org>, victim@example.net")
    out = dsn(env, Failure(0, "failed", "5.1.1"))
    to = parse(out)["To"]
    assert len(to.addresses) == 1
    # ">", "," and the space become "?": one address, still recognisable.
    assert b"\r\nTo: <x@example.org???victim@example.net>\r\n" in out


def test_long_diagnostic_is_folded_and_unfolds_to_the_reply() -> None:
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(200))
    out = dsn(envelope(), Failure(0, "failed", "5.7.1", reply))
    part = status_part_bytes(out)
    assert all(len(line) <= 78 for line in part.split(b"\r\n"))
    _, groups = status_groups(parse(out))
    assert groups[0]["Diagnostic-Code"] == "smtp; " + reply


def test_one_huge_word_still_keeps_lines_under_998() -> None:
    reply = "550 " + "x" * 5000
    out = dsn(envelope(), Failure(0, "failed", "5.0.0", reply, "h" * 3000))
    _, groups = status_groups(parse(out))
    assert groups[0]["Diagnostic-Code"].startswith("smtp; 550 xxx")
    assert len(groups[0]["Remote-MTA"]) <= len("dns; ") + 255


# --- property ------------------------------------------------------------------------------

_any_text = st.text(max_size=300)


@given(
    rows=st.lists(
        st.tuples(
            _any_text,  # address
            _any_text,  # reply
            st.sampled_from(["failed", "delayed"]),
            _any_text,  # remote MTA
            _any_text,  # ORCPT address
        ),
        min_size=1,
        max_size=5,
    ),
    sender=st.text(min_size=1, max_size=100),
    envid=st.text(max_size=120),
    ret=st.sampled_from(["", "HDRS", "FULL"]),
)
def test_any_reply_and_address_give_a_parseable_report(
    rows: list[tuple[str, str, Any, str, str]], sender: str, envid: str, ret: str
) -> None:
    if sender == "<>":
        sender = "x"
    recipients = [
        Recipient(address, "example.com", orcpt="rfc822;" + orcpt if orcpt else "")
        for address, _, _, _, orcpt in rows
    ]
    items = [
        Failure(i, action, "5.1.1" if action == "failed" else "4.4.1", reply, remote, NOW + 60)
        for i, (_, reply, action, remote, _) in enumerate(rows)
    ]
    env = envelope(*recipients, sender=sender, envid=envid, ret=ret)
    out = dsn(env, *items)
    msg = parse(out)
    per_message, groups = status_groups(msg)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert len(groups) == len(rows)
    assert [g["Action"] for g in groups] == [action for _, _, action, _, _ in rows]
    for group in groups:
        assert group["Final-Recipient"].startswith(("rfc822;", "utf-8;"))
    assert status_part_bytes(out).isascii()


@pytest.mark.parametrize(
    ("reply", "action", "expected"),
    [
        ("550 5.1.1 No such user", "failed", "5.1.1"),
        ("550 No such user", "failed", "5.0.0"),
        ("451 4.3.0 try later", "failed", "4.3.0"),  # an expiry keeps the last code
        ("connection refused", "failed", "5.0.0"),
        ("451 4.2.1 Mailbox busy", "delayed", "4.2.1"),
        ("451 try later", "delayed", "4.0.0"),
        ("550 5.1.1 odd: a 5xx reply on a deferral", "delayed", "4.0.0"),
        ("", "delayed", "4.0.0"),
        ("421 4.4.2 x.y.z", "delayed", "4.4.2"),
        ("451 4.x.1 not a code", "delayed", "4.0.0"),
        ("250 2.1.5 Recipient ok", "relayed", "2.1.5"),
        ("250 2.0.0 Delivered to maildir", "delivered", "2.0.0"),
        ("250 Ok", "relayed", "2.0.0"),
        ("250 4.0.0 odd: a class 4 code on a success", "delivered", "2.0.0"),
        ("250 5.1.1 odd", "relayed", "2.0.0"),
    ],
)
def test_reply_status(reply: str, action: Any, expected: str) -> None:
    assert reply_status(reply, action) == expected

"""Received trace field (engine.message.trace): exact output for a few sessions, the WITH
protocol names, folding, and sanitising of wire values (Hypothesis: any text in any wire
field still gives one well-formed Received field that the header scanner reads as one)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.message import trace
from engine.message.fields import fold, rfc5322_date
from engine.message.headers import scan_headers
from engine.message.trace import received_field, with_protocol

WHEN = datetime(2026, 11, 26, 20, 0, 0, tzinfo=UTC).timestamp()
DATE = "Thu, 26 Nov 2026 20:00:00 +0000"


def field(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "helo": "client.example",
        "client_ip": "192.0.2.1",
        "client_name": "host.example",
        "hostname": "mx.example",
        "protocol": "ESMTP",
        "queue_id": "0190ABCD",
        "tls": None,
        "auth_user": None,
        "recipient": None,
        "when": WHEN,
    }
    args.update(overrides)
    return received_field(**args)


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


# --- exact output -------------------------------------------------------------------------


def test_full_example() -> None:
    assert field(
        protocol=with_protocol(esmtp=True, tls=True, auth=True, utf8=False),
        tls="version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384",
        auth_user="app",
        recipient="user@example.com",
    ) == (
        b"Received: from client.example (host.example [192.0.2.1])\r\n"
        b"\tby mx.example (Ferry) with ESMTPSA id 0190ABCD\r\n"
        b"\t(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)\r\n"
        b"\t(authenticated user app)\r\n"
        b"\tfor <user@example.com>; Thu, 26 Nov 2026 20:00:00 +0000\r\n"
    )


def test_minimal_helo_session_no_name() -> None:
    assert field(client_name=None, protocol="SMTP", queue_id="Q1") == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.example (Ferry) with SMTP id Q1; Thu, 26 Nov 2026 20:00:00 +0000\r\n"
    )


def test_date_folds_onto_its_own_line_when_needed() -> None:
    # "\tby mx.example (Ferry) with ESMTPSA id 0190ABCD;" is 49 columns, the date 31 more.
    out = field(protocol="ESMTPSA")
    assert lines(out)[1:] == [
        b"\tby mx.example (Ferry) with ESMTPSA id 0190ABCD;",
        b"\t" + DATE.encode(),
    ]


@pytest.mark.parametrize(
    ("ip", "literal"),
    [
        ("192.0.2.1", b"[192.0.2.1]"),
        ("2001:db8:0:0::1", b"[IPv6:2001:db8::1]"),
        ("::ffff:192.0.2.9", b"[192.0.2.9]"),
        ("fe80::1%eth0", b"[IPv6:fe80::1]"),
    ],
)
def test_address_literals(ip: str, literal: bytes) -> None:
    out = field(client_ip=ip, client_name=None)
    assert lines(out)[0] == b"Received: from client.example (" + literal + b")"
    out = field(client_ip=ip)
    assert lines(out)[0] == b"Received: from client.example (host.example " + literal + b")"


def test_client_ip_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="client_ip"):
        field(client_ip="unknown")


def test_date_is_utc() -> None:
    assert field(when=0.0).endswith(b"; Thu, 01 Jan 1970 00:00:00 +0000\r\n")


# --- WITH protocol names (RFC 3848, RFC 6531 §3.7.3) ----------------------------------------

PROTOCOLS = {
    # (tls, auth, utf8) for an EHLO session
    (False, False, False): "ESMTP",
    (False, True, False): "ESMTPA",
    (True, False, False): "ESMTPS",
    (True, True, False): "ESMTPSA",
    (False, False, True): "UTF8SMTP",
    (False, True, True): "UTF8SMTPA",
    (True, False, True): "UTF8SMTPS",
    (True, True, True): "UTF8SMTPSA",
}


@pytest.mark.parametrize(("flags", "name"), sorted(PROTOCOLS.items()))
def test_with_protocol_esmtp(flags: tuple[bool, bool, bool], name: str) -> None:
    tls, auth, utf8 = flags
    assert with_protocol(esmtp=True, tls=tls, auth=auth, utf8=utf8) == name


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)))
def test_with_protocol_helo_is_smtp(flags: tuple[bool, bool, bool]) -> None:
    assert with_protocol(False, *flags) == "SMTP"


# --- sanitising ----------------------------------------------------------------------------


def test_header_injection_in_helo() -> None:
    out = field(helo="evil\r\nX-Injected: yes\x00", client_name=None)
    assert lines(out)[0] == b"Received: from evil??X-Injected:?yes? ([192.0.2.1])"
    assert scan_headers(out + b"\r\n").received == 1
    assert len(scan_headers(out + b"\r\n").fields) == 1


def test_helo_cannot_open_a_comment_or_end_the_stamp() -> None:
    out = field(helo='a(b)c\\d"e;f g\th', client_name=None)
    assert lines(out)[0] == b"Received: from a?b?c?d?e?f?g?h ([192.0.2.1])"


def test_comment_values_are_escaped() -> None:
    out = field(auth_user="a) (b\\", tls="x(y)")
    assert b"\t(x\\(y\\))\r\n" in out
    assert lines(out)[-1] == b"\t(authenticated user a\\) \\(b\\\\); " + DATE.encode()


def test_client_name_cannot_pose_as_the_literal() -> None:
    out = field(client_name="x [203.0.113.9] (y)")
    assert lines(out)[0] == b"Received: from client.example (x??203.0.113.9???y? [192.0.2.1])"


def test_helo_truncated_at_255() -> None:
    out = field(helo="h" * 300, client_name=None)
    assert b"h" * 255 in out
    assert b"h" * 256 not in out


def test_non_ascii_only_with_utf8() -> None:
    kwargs: dict[str, Any] = {
        "helo": "bücher.example",
        "auth_user": "jörg",
        "recipient": "jörg@bücher.example",
        "client_name": None,
    }
    ascii_out = field(protocol="ESMTPA", **kwargs)
    assert ascii_out.isascii()
    assert b"from b?cher.example ([192.0.2.1])" in ascii_out
    assert b"(authenticated user j?rg)" in ascii_out
    assert b"for <j?rg@b?cher.example>;" in ascii_out
    utf8_out = field(protocol="UTF8SMTPA", **kwargs).decode("utf-8")
    assert "from bücher.example ([192.0.2.1])" in utf8_out
    assert "(authenticated user jörg)" in utf8_out
    assert "for <jörg@bücher.example>;" in utf8_out


@pytest.mark.parametrize(
    "char", ["\u0085", "\u2028", "\u2029", "\u200b", "\u00a0", "\ud800", "\x9b"]
)
def test_unicode_controls_and_separators_replaced_even_with_utf8(char: str) -> None:
    out = field(protocol="UTF8SMTPA", auth_user=f"a{char}b", client_name=None)
    assert b"(authenticated user a?b)" in out


@pytest.mark.parametrize(
    ("recipient", "shown"),
    [
        ("user@example.com", b"<user@example.com>"),
        ("Postmaster", b"<Postmaster>"),
        ('"john doe"@example.com', b'<"john doe"@example.com>'),
        ('"a\\"b"@example.com', b'<"a\\"b"@example.com>'),
        ("user@[192.0.2.1]", b"<user@[192.0.2.1]>"),
        # Not a mailbox: everything that could end the path, quote or stamp becomes "?".
        ('"open@example.com', b"<?open@example.com>"),
        ("a>; Mon, 1 Jan 2001 <b@example.com", b"<a???Mon??1?Jan?2001??b@example.com>"),
        ("x(y)@example.com", b"<x?y?@example.com>"),
        ("user@exa mple.com", b"<user@exa?mple.com>"),
    ],
)
def test_recipient(recipient: str, shown: bytes) -> None:
    out = field(recipient=recipient)
    assert lines(out)[-1] == b"\tfor " + shown + b"; " + DATE.encode()


# --- folding -------------------------------------------------------------------------------


def test_long_comment_folds_within_78() -> None:
    user = " ".join(f"word{i:02d}" for i in range(30))
    out = field(auth_user=user, tls="version=TLSv1.3 " + "cipher=X " * 12 + "bits=256")
    got = lines(out)
    assert len(got) > 6
    assert all(len(line) <= 78 for line in got)
    # Unfolding gives back the words with single spaces (a fold replaced one space).
    unfolded = out.replace(b"\r\n\t", b" ")
    assert b"(authenticated user " + user.encode() + b")" in unfolded


def test_long_token_makes_the_only_long_line() -> None:
    helo = "h" * 200
    got = lines(field(helo=helo, client_name="n" * 90))
    assert got[0] == b"Received: from"
    assert got[1] == b"\t" + helo.encode()
    assert got[2] == b"\t(" + b"n" * 90
    assert got[3] == b"\t[192.0.2.1])"
    assert all(len(line) <= 78 for line in got[4:])


def test_space_runs_never_leave_a_blank_line() -> None:
    user = "a" * 70 + "      " + "b"
    got = lines(field(auth_user=user))
    assert all(line.strip(b" \t") for line in got)


# --- Hypothesis: any wire text ---------------------------------------------------------------

wire_text = st.text(max_size=300) | st.text(
    st.sampled_from('\r\n\x00\t ()\\";<>@%[]:é\u2028\x85\ud800a.'), max_size=80
)


def top_level(value: str) -> tuple[str, int, bool]:
    """``value`` with comments and quoted strings removed (RFC 5322 §3.2.2, §3.2.4), the
    comment depth at the end, and whether it ends inside a quoted string."""
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    while i < len(value):
        c = value[i]
        if (depth or quoted) and c == "\\":
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif c == "(":
            depth += 1
        elif depth:
            if c == ")":
                depth -= 1
        elif c == '"':
            quoted = True
            out.append("Q")
        else:
            out.append(c)
        i += 1
    return "".join(out), depth, quoted


@given(
    helo=wire_text,
    client_name=st.none() | wire_text,
    tls=st.none() | wire_text,
    auth_user=st.none() | wire_text,
    recipient=st.none() | wire_text,
    protocol=st.sampled_from(["SMTP", "ESMTP", "ESMTPSA", "UTF8SMTP", "UTF8SMTPSA"]),
    when=st.floats(min_value=0, max_value=4e9),
)
def test_any_wire_text_gives_one_clean_field(
    helo: str,
    client_name: str | None,
    tls: str | None,
    auth_user: str | None,
    recipient: str | None,
    protocol: str,
    when: float,
) -> None:
    out = field(
        helo=helo,
        client_name=client_name,
        tls=tls,
        auth_user=auth_user,
        recipient=recipient,
        protocol=protocol,
        when=when,
    )
    assert out.startswith(b"Received: from")
    # CR and LF appear only as the folds (CRLF TAB) and the final CRLF; never NUL.
    body = out[:-2]
    assert b"\x00" not in out
    assert b"\r" not in body.replace(b"\r\n\t", b"")
    assert b"\n" not in body.replace(b"\r\n\t", b"")
    if not protocol.startswith("UTF8"):
        assert out.isascii()
    # No other control character anywhere (TAB only right after a fold).
    unfolded = body.decode("utf-8").replace("\r\n\t", " ")
    assert all(c >= " " and c != "\x7f" and not "\x80" <= c <= "\x9f" for c in unfolded)
    assert all(len(line) <= 998 for line in lines(out))
    # The header scanner sees exactly one field, named Received, ending where it should.
    scan = scan_headers(out + b"\r\nbody\r\n")
    assert not scan.malformed
    assert scan.received == 1
    assert len(scan.fields) == 1
    name_start, name_end, _, value_end = scan.fields[0]
    assert out[name_start:name_end] == b"Received"
    assert value_end == len(out) - 2
    assert scan.end == len(out) + 2
    # Its structure survives: comments and quotes close, helo is one word, and the only
    # top-level ";" is followed by the date we gave.
    rest, depth, quoted = top_level(unfolded[len("Received:") :])
    assert depth == 0
    assert not quoted
    words = rest.split()
    assert words[0] == "from"
    assert words[2] == "by"
    _stamp, _, date = rest.partition(";")
    assert ";" not in date
    assert date == " " + format_datetime(datetime.fromtimestamp(when, UTC))
    assert unfolded.endswith(";" + date)


def _laid_out_whole(helo: str, client_name: str | None, hostname: str, protocol: str,
                    queue_id: str, tls: str | None, auth_user: str | None,
                    recipient: str | None, when: float) -> bytes:
    """The field laid out in one pass, every clause from its words (the layout before the
    per-session stamp): the reference the stamp's cached lines are held to."""
    utf8 = protocol.upper().startswith("UTF8")
    helo_token = trace._clean(helo[:255], utf8, trace._TOKEN_SPECIALS) or "?"
    literal = trace._address_literal("192.0.2.1")
    if client_name:
        name = trace._clean(client_name[:255], utf8, trace._NAME_SPECIALS)
        clauses = [["from", helo_token, f"({name}", f"{literal})"]]
    else:
        clauses = [["from", helo_token, f"({literal})"]]
    by = ["by", trace._clean(hostname, utf8, trace._TOKEN_SPECIALS) or "?", "(Ferry)",
          "with", trace._clean(protocol, False, trace._TOKEN_SPECIALS)]
    if queue_id:
        by += ["id", trace._clean(queue_id, False, trace._TOKEN_SPECIALS)]
    clauses.append(by)
    if tls:
        clauses.append(trace._comment("", tls, utf8))
    if auth_user:
        clauses.append(trace._comment("authenticated user ", auth_user, utf8))
    if recipient:
        clauses.append(["for", f"<{trace._recipient(recipient, utf8)}>"])
    clauses[-1][-1] += ";"
    clauses[-1].append(rfc5322_date(when))
    return fold("Received: ", clauses, indent="\t").encode("utf-8")


@given(
    helo=wire_text,
    client_name=st.none() | wire_text,
    hostname=st.sampled_from(["mx.example", "x" * 80]) | st.integers(20, 40).map(
        lambda n: "m" * n + ".example"),  # the by clause around a fold
    queue_id=st.sampled_from(["", "0190ABCD", "01A251D6C773EE50F4D716F9", "A" * 70, "a b"]),
    tls=st.none() | wire_text,
    auth_user=st.none() | wire_text,
    recipient=st.none() | wire_text | st.integers(30, 45).map(
        lambda n: "u" * n + "@e.example"),  # the for clause around a fold
    protocol=st.sampled_from(["SMTP", "ESMTP", "ESMTPSA", "UTF8SMTPSA", "HTTP"]),
    when=st.floats(min_value=0, max_value=4e9),
)
def test_the_stamp_lays_out_the_field_as_a_whole(
    helo: str, client_name: str | None, hostname: str, queue_id: str, tls: str | None,
    auth_user: str | None, recipient: str | None, protocol: str, when: float,
) -> None:
    """A session's (or request's) stamp, its lines cached, gives every message the bytes
    the field's clauses give laid out together."""
    args: dict[str, Any] = dict(
        helo=helo, client_name=client_name, hostname=hostname, protocol=protocol,
        queue_id=queue_id, tls=tls, auth_user=auth_user, recipient=recipient, when=when)
    assert received_field(client_ip="192.0.2.1", **args) == _laid_out_whole(**args)


def test_the_recipient_shortcut_names_what_safe_address_replaces() -> None:
    from engine.message.fields import _ADDRESS_OTHER
    printable = map(chr, range(0x20, 0x7F))
    assert {c for c in printable if _ADDRESS_OTHER.match(c)} == trace._ADDRESS_UNSAFE


@given(st.text(st.characters(min_codepoint=0, max_codepoint=0x7F)
               | st.sampled_from(["@", ".", "é", "\u2028", "<", ">", '"', "\\"]),
               max_size=300),
       st.booleans())
def test_the_recipient_shortcut_is_the_whole_check(recipient: str, utf8: bool) -> None:
    # The shortcut (printable ASCII without a replaced character) against the path it skips.
    from engine.message.fields import safe_address
    whole = safe_address(trace._clean(recipient[:trace.MAX_RECIPIENT], utf8), postmaster=True)
    assert trace._recipient(recipient, utf8) == whole
    for address in (recipient + "@example.com", "a.b@" + recipient):
        whole = safe_address(trace._clean(address[:trace.MAX_RECIPIENT], utf8),
                             postmaster=True)
        assert trace._recipient(address, utf8) == whole

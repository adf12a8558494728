"""engine.message.compose: MIME built by the ``email`` package, the per-recipient renderer
held to it, CRLF canonicalisation and the fields a submission server adds.  No sockets."""

from __future__ import annotations

import email
import email.contentmanager
import email.policy
import html
from email.message import EmailMessage, MIMEPart

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.message.compose import (
    POLICY,
    Attachment,
    ComposeError,
    Composer,
    Structured,
    _Body,
    _encoded_body,
    _escaped,
    _Template,
    base64_content,
    canonical,
    complete,
    compose,
)


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _text(part: MIMEPart | None) -> str:
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def _lines_ok(raw: bytes) -> None:
    """CRLF only, 7bit, no line over 998 octets (RFC 5322 §2.1.1, §2.3)."""
    assert raw.isascii()
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


SPEC = Structured(
    sender="Shop <shop@example.com>", subject="Hello {{name}}",
    text="Dear {{name}},\nyour order {{order}} shipped.\n",
    html="<p>Dear {{name}}, order {{order}}</p>",
    headers=(("Reply-To", "help@example.com"),),
    attachments=(Attachment("invoice.pdf", "application/pdf", b"%PDF-1.4 \x00\xff" * 50),))

VALUES = [
    {"name": "Ann", "order": "42"},
    {"name": "Zoë Ünïcödé", "order": "7"},
    {"name": "<b>&amp;</b>", "order": "1"},
    {"name": "x" * 300, "order": "long line " * 30},
    {"name": "日本語の名前", "order": "=?utf-8?q?not-a-word?="},
]


@pytest.mark.parametrize("values", VALUES, ids=range(len(VALUES)))
def test_render_matches_the_email_package(values: dict[str, str]) -> None:
    """The fast renderer and a whole EmailMessage decode to the same message."""
    rendered = Composer(SPEC, "ferry.test").render(values, "ann@example.net")
    reference = compose(SPEC, to="ann@example.net", values=values, hostname="ferry.test")
    _lines_ok(rendered)
    got, want = _parse(rendered), _parse(reference)
    for name in ("From", "To", "Subject", "Reply-To", "MIME-Version"):
        assert got[name] == want[name], name
    assert got["Subject"] == f"Hello {values['name']}"
    assert _text(got.get_body(("plain",))) == _text(want.get_body(("plain",)))
    assert _text(got.get_body(("html",))) == _text(want.get_body(("html",)))
    plain = got.get_body(("plain",))
    assert plain is not None and plain["Content-Transfer-Encoding"] == \
        want.get_body(("plain",))["Content-Transfer-Encoding"]  # type: ignore[index]
    (a,) = got.iter_attachments()
    (b,) = want.iter_attachments()
    assert a.get_content() == b.get_content() == SPEC.attachments[0].content
    assert a.get_filename() == "invoice.pdf"
    assert got.get_content_type() == "multipart/mixed"


#: Each body with one placeholder (the renderer's fill without a loop), the bulk
#: benchmark's shape: a short text, one long html line.
ONE = Structured(sender="shop@example.com", subject="Your order, {{name}}",
                 text="Dear {{name}},\n\n" + "Your order has shipped.\n" * 3,
                 html="<p>Dear {{name}},</p>" + "<p>Your order has shipped.</p>" * 8)


@pytest.mark.parametrize("values", VALUES, ids=range(len(VALUES)))
def test_render_one_placeholder_matches_the_email_package(values: dict[str, str]) -> None:
    rendered = Composer(ONE, "ferry.test").render(values, "ann@example.net")
    reference = compose(ONE, to="ann@example.net", values=values, hostname="ferry.test")
    _lines_ok(rendered)
    got, want = _parse(rendered), _parse(reference)
    assert got["Subject"] == want["Subject"] == f"Your order, {values['name']}"
    for kind in ("plain", "html"):
        part, expected = got.get_body((kind,)), want.get_body((kind,))
        assert _text(part) == _text(expected), kind
        assert part is not None and expected is not None
        assert part["Content-Transfer-Encoding"] == expected["Content-Transfer-Encoding"]
    assert got["Message-ID"].endswith("@ferry.test>") and got["Message-ID"] != want["Message-ID"]


def test_html_values_are_escaped_text_values_are_not() -> None:
    msg = _parse(Composer(SPEC, "h.test").render({"name": "<b>", "order": "1"}, "a@b.test"))
    assert "Dear <b>," in _text(msg.get_body(("plain",)))
    assert "Dear &lt;b&gt;," in _text(msg.get_body(("html",)))


def test_every_rendered_message_has_its_own_message_id_and_its_to() -> None:
    composer = Composer(SPEC, "h.test")
    a = _parse(composer.render(VALUES[0], "a@b.test"))
    b = _parse(composer.render(VALUES[0], "undisclosed-recipients:;"))
    assert a["Message-ID"] != b["Message-ID"] and a["Message-ID"].endswith("@h.test>")
    assert (a["To"], b["To"]) == ("a@b.test", "undisclosed-recipients:;")
    assert a["Date"] == b["Date"]


def test_a_value_holding_a_boundary_falls_back_to_the_package() -> None:
    composer = Composer(Structured("s@x.test", text="{{v}}", html="<p>x</p>"), "h.test")
    boundary = composer.boundaries[0].decode()
    raw = composer.render({"v": f"--{boundary}\nfake part\n"}, "a@b.test")
    msg = _parse(raw)
    assert _text(msg.get_body(("plain",))) == f"--{boundary}\nfake part\n"
    assert len(list(msg.iter_parts())) == 2


def test_text_only_html_only_and_no_placeholders() -> None:
    for spec, kind in ((Structured("s@x.test", subject="s", text="t\n"), "text/plain"),
                       (Structured("s@x.test", subject="s", html="<i>h</i>"), "text/html")):
        raw = Composer(spec, "h.test").render({}, "a@b.test")
        _lines_ok(raw)
        assert _parse(raw).get_content_type() == kind


def test_headers_given_replace_the_composers() -> None:
    spec = Structured("s@x.test", text="t", headers=(
        ("To", "Team <team@x.test>"), ("Message-ID", "<fixed@x.test>"), ("From", "o@x.test")))
    msg = _parse(Composer(spec, "h.test").render({}, "a@b.test"))
    assert (msg["To"], msg["Message-ID"], msg["From"]) == (
        "Team <team@x.test>", "<fixed@x.test>", "o@x.test")
    assert len(msg.get_all("To") or []) == 1


@pytest.mark.parametrize(("spec", "where"), [
    (Structured("s@x.test", text="t", headers=(("Content-Type", "text/html"),)),
     "headers.Content-Type"),
    (Structured("s@x.test", text="t", headers=(("Bad Name", "v"),)), "headers[0]"),
    (Structured("s@x.test", text="t", headers=(("X-A", "a\r\nBcc: x@y"),)), "headers.X-A"),
    (Structured("s@x.test", text="t", subject="a\nb"), "subject"),
    (Structured("s@x.test", text="t", attachments=(Attachment("a", "pdf", b""),)),
     "attachments[0].content_type"),
    (Structured("s@x.test", text="t", attachments=(Attachment("a/b", "text/plain", b""),)),
     "attachments[0].filename"),
    (Structured("s@x.test", text="t",
                attachments=(Attachment("a", "multipart/mixed", b""),)),
     "attachments[0].content_type"),
])
def test_bad_parts_name_their_field(spec: Structured, where: str) -> None:
    with pytest.raises(ComposeError) as caught:
        Composer(spec, "h.test")
    assert caught.value.field == where


def test_size_bound_holds() -> None:
    composer = Composer(SPEC, "h.test")
    for values in VALUES:
        longest = max(len(v) for v in values.values())
        assert len(composer.render(values, "a@b.test")) <= composer.size_bound(longest)


@pytest.mark.parametrize(("given", "policy", "want"), [
    (b"A: b\n\nbody\n", "reject", b"A: b\r\n\r\nbody\r\n"),
    (b"A: b\r\n\r\nbody\r\n", "reject", b"A: b\r\n\r\nbody\r\n"),
    (b"A: b\r\n\r\nno end", "reject", b"A: b\r\n\r\nno end\r\n"),
    (b"A: b\r\n\r\nmixed\nends\r\n", "normalize", b"A: b\r\n\r\nmixed\r\nends\r\n"),
    (b"A: b\r\n\r\nbare\rcr\r\n", "normalize", b"A: b\r\n\r\nbare\r\ncr\r\n"),
])
def test_canonical_line_ends(given: bytes, policy: str, want: bytes) -> None:
    assert canonical(given, policy) == want


@pytest.mark.parametrize("given", [b"A: b\r\n\r\nmixed\nends\r\n", b"A: b\n\nbare\rcr\n",
                                   b"A: b\r\n\r\n.\r.\r\n"])
def test_canonical_rejects_a_bare_cr_or_mixed_ends(given: bytes) -> None:
    with pytest.raises(ComposeError) as caught:
        canonical(given, "reject")
    assert caught.value.field == "content"


def test_complete_adds_date_and_message_id_only_when_missing() -> None:
    bare = complete(b"Subject: x\r\n\r\nDate: not a header\r\n", "h.test")
    msg = _parse(bare)
    assert msg["Date"] and msg["Message-ID"].endswith("@h.test>")
    assert bare.endswith(b"Subject: x\r\n\r\nDate: not a header\r\n")
    full = b"DATE: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-Id: <a@b>\r\n\r\nx\r\n"
    assert complete(full, "h.test") == full
    no_head = complete(b"\r\nDate: in the body\r\n", "h.test")
    assert no_head.startswith(b"Date: ") and b"Message-ID: <" in no_head
    # Only a field's own name at a line's start counts: not X-Date:, not a folded line.
    others = b"X-Date: 1\r\nSubject: a\r\n Message-ID: <folded@b>\r\n\r\nx\r\n"
    added = complete(others, "h.test")
    assert added.startswith(b"Date: ") and added.count(b"Message-ID:") == 2
    spaced = b"Subject: a\r\nmessage-id\t: <a@b>\r\ndate : x\r\n\r\nx\r\n"
    assert complete(spaced, "h.test") == spaced


def test_base64_content() -> None:
    assert base64_content("aGVs\nbG8=", "x") == b"hello"
    with pytest.raises(ComposeError) as caught:
        base64_content("not base64!", "attachments[0].content")
    assert caught.value.field == "attachments[0].content"


def test_a_non_ascii_sender_makes_a_utf8_header_section() -> None:
    """RFC 6532 §3.2: an address is never an encoded word; SMTPUTF8 carries it as UTF-8."""
    spec = Structured("jösé@exämple.com", subject="Grüße {{n}}", text="hi\n")
    raw = Composer(spec, "h.test").render({"n": "Zoë"}, "ünï@exämple.net")
    head = raw.split(b"\r\n\r\n")[0].decode()
    assert "From: jösé@exämple.com\r\n" in head and "To: ünï@exämple.net\r\n" in head
    assert _parse(raw)["Subject"] == "Grüße Zoë"
    assert b"=?utf-8?" not in compose(spec, values={"n": "x"}).split(b"\r\n")[0]


# Long ASCII lines with and without what quoted-printable must quote ("=", controls,
# white space at a line's end), around the soft-break lengths (77, 78, 79, 155, ...).
_LINE = st.text(st.sampled_from("ab =\t.\x01"), max_size=8).flatmap(
    lambda tail: st.sampled_from([0, 1, 76, 77, 78, 79, 80, 154, 155, 156, 157, 400]).map(
        lambda n: "x" * n + tail))


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINE, min_size=1, max_size=14), st.booleans())
def test_encoded_body_is_the_packages(lines: list[str], ended: bool) -> None:
    """The renderer's own encoding of a text part is byte for byte the package's."""
    text = "\n".join(lines) + ("\n" if ended else "")
    cte, data = email.contentmanager._encode_text(  # type: ignore[attr-defined]
        text, "utf-8", None, POLICY)
    assert _encoded_body(text) == (cte.encode(), data.replace("\n", "\r\n").encode())


@given(st.text())
@example("<&>\"'")
def test_escaped_is_html_escape(value: str) -> None:
    assert _escaped(value) == html.escape(value)


# Templates: runs of letters around the soft-break lengths, placeholders (one split by a
# line end), what quoted-printable must quote, line ends; values: plain ones and each kind
# the shortcut must hand to the whole-text encoder (empty, "=", a trailing space, LF, CR,
# TAB, non-ASCII, markup that the html part escapes).
_PIECE = st.one_of(
    st.sampled_from(["{{a}}", "{{ b }}", "{{\na}}", "\n", "\n\n", " ", "=", "\t", "é", "<p>",
                     "\r"]),
    st.sampled_from([1, 20, 60, 76, 77, 78, 79, 150, 160]).map(lambda n: "x" * n))
_VALUE = st.one_of(
    st.sampled_from(["", " ", "User 7", "a=b", "end ", "li\nne", "c\rr", "t\tb", "Zoë", "<&>\"'",
                     "x" * 77]),
    st.text(st.sampled_from("ab =<&\n"), max_size=6))


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECE, max_size=12), _VALUE, _VALUE, st.booleans())
@example(["x" * 80, "\n", "{{a}}"], "", "", False)  # an empty last line is no line
@example(["x" * 80, " ", "{{a}}", "\n"], "", "", False)  # nor white space before a line end
# The literal text after a line's last placeholder starting at columns 76-79 (its soft
# breaks kept per column only while it starts within the first 77 characters).
@example(["x" * 70, "{{a}}", "x" * 160], "User 7", "", False)
@example(["x" * 70, "{{a}}", "x" * 160], "User 77", "", False)
@example(["x" * 70, "{{a}}", "x" * 160], "User 777", "", True)
@example(["x" * 70, "{{a}}", "x" * 160], "User 7777", "", True)
@example(["x" * 1, "{{a}}", "x" * 76, "{{ b }}", "x" * 150, "\n", "x" * 79], "a", "b", True)
def test_a_body_template_encodes_as_the_filled_text(pieces: list[str], a: str, b: str,
                                                      escape: bool) -> None:
    """_Body's shortcut (lines measured once, values checked) gives the bytes that
    _encoded_body gives for the whole filled text, for any template and values."""
    template = "".join(pieces)
    values = {"a": a, "b": b}
    expected = _encoded_body(_Template(template).fill(values, escape))
    assert _Body(template, escape).encode(values) == expected

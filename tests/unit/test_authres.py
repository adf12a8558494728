"""Authentication-Results (engine.agents.authres): our field's exact text, folding, and
recognising the authserv-id of received fields, with RFC 8601 Appendix B's examples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.agents.api import MethodResult
from engine.agents.authres import (
    FIELD,
    _fold,
    _resinfo,
    authserv_id_of,
    claims,
    format_field,
    head,
    lines,
)


def unfold(value: str) -> str:
    return " ".join(value.replace("\r\n", " ").split())


def test_nothing_checked_is_none() -> None:
    # RFC 8601 §2.2 no-result (Appendix B.2 without the version).
    assert format_field("example.org", []) == "example.org; none"


def test_rfc8601_b3() -> None:
    value = format_field("example.com", [MethodResult("spf", "pass", "",
                                                      (("smtp.mailfrom", "example.net"),))])
    assert value == "example.com;\r\n\tspf=pass smtp.mailfrom=example.net"


def test_rfc8601_b4_b5_shapes() -> None:
    value = format_field("example.com", [
        MethodResult("auth", "pass", "cram-md5", (("smtp.auth", "sender@example.net"),)),
        MethodResult("spf", "pass", "", (("smtp.mailfrom", "example.net"),)),
    ])
    assert value == ("example.com;\r\n"
                     "\tauth=pass (cram-md5) smtp.auth=sender@example.net;\r\n"
                     "\tspf=pass smtp.mailfrom=example.net")
    value = format_field("example.com", [
        MethodResult("sender-id", "fail", "", (("header.from", "example.com"),)),
        MethodResult("dkim", "pass", "good signature", (("header.d", "example.com"),)),
    ])
    assert unfold(value) == ("example.com; sender-id=fail header.from=example.com; "
                             "dkim=pass (good signature) header.d=example.com")


def test_a_known_verify_field() -> None:
    value = format_field("mx.ferry.test", [
        MethodResult("spf", "pass", "", (("smtp.mailfrom", "bounces.shop.example"),)),
        MethodResult("dkim", "pass", "", (("header.d", "shop.example"),
                                          ("header.s", "s2024"), ("header.b", "AbC+/12="))),
        MethodResult("dmarc", "fail", "p=reject sp=none dis=quarantine",
                     (("header.from", "a-rather-long-subdomain.of-the-author.shop.example"),
                      ("policy.dmarc", "quarantine"))),
    ])
    assert f"{FIELD}: {value}" == (
        "Authentication-Results: mx.ferry.test;\r\n"
        "\tspf=pass smtp.mailfrom=bounces.shop.example;\r\n"
        '\tdkim=pass header.d=shop.example header.s=s2024 header.b="AbC+/12=";\r\n'
        "\tdmarc=fail (p=reject sp=none dis=quarantine)\r\n"
        "\theader.from=a-rather-long-subdomain.of-the-author.shop.example\r\n"
        "\tpolicy.dmarc=quarantine")


def test_comments_and_values_are_escaped() -> None:
    value = format_field("mx.test", [MethodResult(
        "spf", "fail", "bad (very) \\ bad\r\nreally ünd", (("smtp.mailfrom", 'a"b c@x.test'),))])
    assert value == ('mx.test;\r\n\tspf=fail (bad \\(very\\) \\\\ bad really ?nd) '
                     'smtp.mailfrom="a\\"b c@x.test"')
    assert format_field("two words", []) == '"two words"; none'


def test_bad_method_or_property_is_a_bug() -> None:
    with pytest.raises(ValueError):
        format_field("mx.test", [MethodResult("spf", "pass;x")])
    with pytest.raises(ValueError):
        format_field("mx.test", [MethodResult("spf", "pass", "", (("mailfrom", "x"),))])


words = st.text(st.sampled_from("abcdefghijklmnop.-"), min_size=1, max_size=20)


@given(st.lists(st.tuples(st.sampled_from(["spf", "dkim", "dmarc", "iprev"]),
                          st.sampled_from(["pass", "fail", "none", "temperror"]),
                          st.text(st.characters(codec="ascii"), max_size=30),
                          st.lists(words, max_size=6)), max_size=5))
def test_lines_stay_short_and_the_id_reads_back(
        infos: list[tuple[str, str, str, list[str]]]) -> None:
    results = [MethodResult(m, r, why, tuple((f"header.p{i}", w) for i, w in enumerate(ws)))
               for m, r, why, ws in infos]
    value = format_field("mx.ferry.test", results)
    lines = f"{FIELD}: {value}".split("\r\n")
    assert all(len(line) < 78 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])
    assert claims(value, "MX.Ferry.Test")
    assert unfold(value).count(";") >= len(results) - (0 if results else -1)


@pytest.mark.parametrize(("value", "authserv_id"), [
    # RFC 8601 Appendix B.2 .. B.7 (the field bodies after "Authentication-Results:").
    (" example.org 1; none", "example.org"),
    (" example.com;\r\n          spf=pass smtp.mailfrom=example.net", "example.com"),
    (" example.com;\r\n          dkim=pass reason=\"good signature\"\r\n"
     "            header.i=@mail-router.example.net;", "example.com"),
    (" foo.example.net (foobar) 1 (baz);\r\n    dkim (Because I like it) / 1 (One yay) = "
     "(wait for it) fail", "foo.example.net"),
    # CFWS before the id, nested comments with quoted pairs, a quoted-string id.
    (" (forged \\) (nested (deeper)))\r\n\t MX.Ferry.Test; spf=pass", "MX.Ferry.Test"),
    (' "mx.ferry.test" ; none', "mx.ferry.test"),
    ("mx.ferry.test;spf=pass", "mx.ferry.test"),
])
def test_authserv_id_of_received_fields(value: str, authserv_id: str) -> None:
    assert authserv_id_of(value) == authserv_id


@pytest.mark.parametrize(("value", "ours"), [
    (" MX.FERRY.TEST; spf=pass smtp.mailfrom=x.test", True),
    (" (comment) mx.ferry.test; none", True),
    (" mx.ferry.test.evil; none", False),
    (" evil.test (mx.ferry.test); none", False),
    (" mx.ferry; none", False),
    ("", False),
    (" (unterminated mx.ferry.test; none", False),
    (' "mx.ferry.test', False),
])
def test_claims(value: str, ours: bool) -> None:
    assert claims(value, "mx.ferry.test") is ours


@given(st.text(max_size=120))
def test_any_received_value_is_judged(value: str) -> None:
    assert isinstance(claims(value, "mx.ferry.test"), bool)


@given(st.lists(st.tuples(st.sampled_from(["spf", "dkim", "dmarc"]),
                          st.sampled_from(["pass", "fail", "none"]),
                          st.text(st.characters(codec="ascii"), max_size=20),
                          st.lists(words, max_size=4)), min_size=1, max_size=6),
       st.data())
def test_a_field_made_in_parts_is_the_field(
        infos: list[tuple[str, str, str, list[str]]], data: st.DataObject) -> None:
    # The verify agent keeps a sender's SPF and DMARC lines as text and joins DKIM's
    # between them: head + lines(before) + lines(middle) + lines(after) is the field.
    results = [MethodResult(m, r, why, tuple((f"header.p{i}", w) for i, w in enumerate(ws)))
               for m, r, why, ws in infos]
    cut = sorted(data.draw(st.lists(st.integers(0, len(results) - 1), min_size=2,
                                    max_size=2)))
    parts = [results[:cut[0]], results[cut[0]:cut[1]], results[cut[1]:]]
    assert parts[2]
    made = head("mx.ferry.test") + "".join(
        lines(part, i == 2) for i, part in enumerate(parts))
    assert made == format_field("mx.ferry.test", results)
    # Each line is the general fold of its words, starting after a fold.
    for i, result in enumerate(results):
        words = _resinfo(result)
        if i != len(results) - 1:
            words[-1] += ";"
        assert lines([result], i == len(results) - 1) == _fold([[], words])

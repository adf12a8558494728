"""DKIM's relaxed canonicalisation in one call (engine.message.canon) on both
implementations: the compiled one-pass module and its twin give the same bytes for every
input, and the same bytes as the streaming canonicaliser and ``relaxed_header`` that
engine.message.dkim keeps for large bodies and single fields."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import _speedups
from engine.message.dkim import RelaxedBody, Signer, _Field, generate_key, relaxed_header
from engine.message.headers import scan_headers
from engine.testing.chunkings import fed, split_at

IMPLS = _speedups.implementations("canon")
IDS = [name for name, _ in IMPLS]
MODULES = [module for _, module in IMPLS]

#: Text made of what canonicalisation acts on: blanks, line ends (bare ones too), colons.
PIECES = st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"Bc", b":", b"\x00",
                          b"\xff", b"X" * 9])
TEXT = st.lists(PIECES, max_size=40).map(b"".join)


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
@pytest.mark.parametrize(("body", "canonical"), [
    (b"", b""),
    (b"\r\n", b""),
    (b"\r\n\r\n", b""),
    (b" C \r\nD \t E\r\n\r\n\r\n", b" C\r\nD E\r\n"),  # RFC 6376 §3.4.5
    (b"abc  ", b"abc\r\n"),  # the last line without CRLF loses its trailing blanks
    (b"a \r", b"a \r\r\n"),  # a bare CR is not a line end
    (b"x \n", b"x \n\r\n"),  # nor a bare LF
    (b"\r\n\r\nx", b"\r\n\r\nx\r\n"),
    (b"  \r\n \t\r\n", b""),
    (b"XXXXXXXXXXXXXXXX  XXXXXXX\t\r\n", b"XXXXXXXXXXXXXXXX XXXXXXX\r\n"),
])  # fmt: skip
def test_relaxed_body_cases(impl: ModuleType, body: bytes, canonical: bytes) -> None:
    assert impl.relaxed_body(body) == canonical
    assert impl.relaxed_body(memoryview(body)) == canonical


@settings(max_examples=400, deadline=None)
@given(body=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=3))
def test_relaxed_body_agrees_everywhere(body: bytes, cuts: list[int]) -> None:
    points = tuple(sorted({c for c in cuts if 0 < c < len(body)}))
    expected = fed(RelaxedBody, split_at(body, points))
    assert [impl.relaxed_body(body) for impl in MODULES] == [expected] * len(MODULES)


def field(raw: bytes) -> tuple[bytes, bytes, int]:
    """A (name, raw, colon) item as engine.message.dkim makes them."""
    colon = raw.index(b":") + 1
    return raw[: colon - 1].lower(), raw, colon


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_relaxed_fields_rfc6376_example(impl: ModuleType) -> None:
    # §3.4.5: "A: X" and "B : Y\t\r\n\tZ  " give "a:X" and "b:Y Z".
    items = [field(b"A: X"), None, field(b"B : Y\t\r\n\tZ  ")]
    assert impl.relaxed_fields(items) == b"a:X\r\nb:Y Z\r\n"
    assert impl.relaxed_fields([]) == b""


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_relaxed_fields_refuses_a_colon_outside_the_field(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.relaxed_fields([(b"a", b"a", 2)])
    with pytest.raises(ValueError):
        impl.relaxed_fields([(b"a", b"a:", 0)])


@settings(max_examples=400, deadline=None)
@given(fields=st.lists(st.tuples(TEXT, TEXT), max_size=4))
def test_relaxed_fields_agrees_everywhere(fields: list[tuple[bytes, bytes]]) -> None:
    items = [(name.lower(), name + b":" + value, len(name) + 1) for name, value in fields]
    expected = b"".join(relaxed_header(name, value) for name, value in fields)
    assert [impl.relaxed_fields(items) for impl in MODULES] == [expected] * len(MODULES)


def test_a_body_larger_than_the_stream_chunks_agrees() -> None:
    # Lines longer than engine.message.dkim.CHUNK take RelaxedBody's long-line path.
    body = b"X" * 70_000 + b" \t \r\n" + (b"a  b\t" * 20_000) + b"\r\n\r\n" + b"t" * 66_000 + b"  "
    chunk = 64 * 1024
    expected = fed(RelaxedBody, [body[i : i + chunk] for i in range(0, len(body), chunk)])
    assert [impl.relaxed_body(body) for impl in MODULES] == [expected] * len(MODULES)


#: Names a header and an h= list draw from (some fields repeated, some h= names absent).
NAMES = st.sampled_from([b"from", b"to", b"subject", b"x", b"dkim-signature"])
#: A signature field's value: tags, blanks, folding, b and bh and a case-sensitive B.
TAGS = st.lists(st.sampled_from([b"b", b"bh", b"B", b"=", b";", b" ", b"\t", b"\r\n", b"x",
                                 b"Zm9v", b"\xff"]), max_size=16).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(header=st.lists(st.tuples(NAMES, TEXT), max_size=6), h=st.lists(NAMES, max_size=8),
       value=TAGS, relaxed=st.booleans())
def test_header_data_agrees_everywhere(header: list[tuple[bytes, bytes]], h: list[bytes],
                                       value: bytes, relaxed: bool) -> None:
    # §3.7 / §5.4.2: the same selection, b= removal and canonical bytes from both, and
    # the same bytes as the fields canonicalised one by one (relaxed_header for relaxed).
    fields = [(name, name.title() + b":" + text, len(name) + 1) for name, text in header]
    signature = (b"dkim-signature", b"DKIM-Signature:" + value, 15)
    got = [impl.header_data(fields, tuple(h), signature, relaxed) for impl in MODULES]
    assert got == [got[0]] * len(MODULES)
    pure = MODULES[0]  # the twin ("py" comes first)
    chosen = [f for f in pure.select(fields, h) if f is not None]
    chosen.append(pure.without_b(signature))
    if relaxed:
        whole = b"".join(relaxed_header(f[1][: f[2] - 1], f[1][f[2]:]) for f in chosen)
    else:
        whole = b"".join(f[1] + b"\r\n" for f in chosen)
    assert got[0] == whole[:-2]


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_header_data_selects_from_the_bottom_and_empties_b(impl: ModuleType) -> None:
    # §5.4.2: two From fields, h= names From three times: the lower one first, then the
    # upper, then the null string; To is absent (nothing).  §3.7: b= emptied, bh= kept.
    # The items as engine.message.dkim makes them (a tuple subclass).
    fields = [_Field(*field(raw)) for raw in (b"From: a", b"Subject:  s  ", b"From: b")]
    signature = _Field(*field(b"DKIM-Signature: v=1; bh=AA=; b=Zm9v\r\n YmFy; d=x"))
    names = (b"from", b"from", b"to", b"from", b"subject")
    assert impl.header_data(fields, names, signature, True) == (
        b"from:b\r\nfrom:a\r\nsubject:s\r\ndkim-signature:v=1; bh=AA=; b=; d=x")
    assert impl.header_data(fields, names, signature, False) == (
        b"From: b\r\nFrom: a\r\nSubject:  s  \r\nDKIM-Signature: v=1; bh=AA=; b=; d=x")
    with pytest.raises(ValueError):
        impl.header_data([(b"a", b"a", 2)], (b"a",), signature, True)


@settings(max_examples=400, deadline=None)
@given(data=st.lists(st.sampled_from([b"From", b"tO", b" ", b"\t", b":", b"\r\n", b"x",
                                      b"\xc4", b"\r\n\r\n"]), max_size=20).map(b"".join))
def test_field_items_agree_everywhere(data: bytes) -> None:
    # The items of every field a header scan finds, in any bytes: the lower-cased name, the
    # field as it is, the value's offset; the same from both implementations.
    spans = scan_headers(data).fields
    expected = [(data[ns:ne].lower(), data[ns:ve], vs - ns) for ns, ne, vs, ve in spans]
    assert [impl.field_items(data, spans) for impl in MODULES] == [expected] * len(MODULES)


@pytest.mark.parametrize("impl", MODULES, ids=IDS)
def test_field_items_refuse_a_span_outside_the_data(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.field_items(b"a: b", [(0, 1, 2, 5)])
    with pytest.raises(ValueError):
        impl.field_items(b"a: b", [(1, 0, 2, 4)])


def test_header_data_of_a_large_header_agrees() -> None:
    # Over 64 fields or h= names, the compiled selection goes through a dict (its cost the
    # sum, not the product, of the two): the same bytes as the small path's and the twin's.
    names = [b"received", b"from", b"to", b"x"]
    fields = [field(b"%s: %d" % (names[i % 4].title(), i)) for i in range(90)]
    signature = field(b"DKIM-Signature: v=1; b=Zm9v")
    for h in ((b"from", b"received", b"x") * 30, (b"to", b"from", b"received") * 3):
        got = [impl.header_data(fields, h, signature, True) for impl in MODULES]
        assert got == [got[0]] * len(MODULES)
        received = sum(1 for f in fields if f[0] == b"received")
        assert (b"\r\n" + got[0]).count(b"\r\nreceived:") == min(received, h.count(b"received"))


# --- a DKIM-Signature field's tags (signature_tags) ----------------------------------------

NOW = 1_796_681_103.0
#: A signature as dkimpy makes it (bench_verify.py's, RSA-2048): folded, spaces around the
#: colons of h=, i=, q= and t=.
DKIMPY = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=shop.test;\r\n"
          b" i=@shop.test; q=dns/txt; s=s1; t=1796681103; h=from : to : subject :\r\n"
          b" date : message-id : from;\r\n bh=s+IOpUT5oRnnERiys5u0m6eWIViuniCJMhsTVjXDk48=;\r\n"
          b" b=QOHejWi9WWcRakg80fLKUuxsKZAVS2e/2t5fk5kGusakrppC+5Z8EcErNAFO9HqBRe03V\r\n"
          b" gcJ3r3Nmyj4Ct0cV3oP9IA40hX3/XWJHMdVICoO/hajeeyK05yqQmDwqjfEiS38GuNPrBZX\r\n"
          b" khqk07f+wpNcZ1REePVumAFUh3YQtf42zBdJ1B1u16wWTL/7w9T9ZJCDtO+w8KrQynT8Lm7\r\n"
          b" Fs47TFGkqSkxvcRYFYfalKuoo0tGLxEAHacOxKGKwWYgxe5bWwCbXfjPiepXf9Quc7BCFx+\r\n"
          b" yviPwk+DpAc1o/bUjBtluEpn6/UOzy8yQrk0Us6cBQnhKrZF/R8bcMqQm8IQ==")


def same(raw: bytes, colon: int = 15, now: object = NOW) -> tuple[object, ...]:
    """signature_tags of every implementation, held equal (values and their types)."""
    got = [impl.signature_tags(raw, colon, now) for impl in MODULES]
    assert got == [got[0]] * len(MODULES), raw
    assert [[type(v) for v in g] for g in got] == [[type(v) for v in got[0]]] * len(MODULES)
    return tuple(got[0])


def test_signature_tags_of_dkimpys_signature() -> None:
    tags = same(DKIMPY)
    assert tags[:5] == ("rsa-sha256", "relaxed", "relaxed",
                        (b"from", b"to", b"subject", b"date", b"message-id", b"from"), None)
    assert [len(v) for v in tags[5:7] if isinstance(v, bytes)] == [32, 256]
    assert tags[7:] == ("shop.test", "s1", "@shop.test", "QOHejWi9", "s1._domainkey.shop.test",
                        False)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=to; bh=AA==; b=AA==",
     ("permerror", "From is not signed (RFC 6376 §5.4)")),
    (b"DKIM-Signature: v=1; a=rsa-sha1; d=x.test; s=s; h=from; bh=AA==; b=AA==",
     ("policy", "rsa-sha1 is not accepted (RFC 8301 §3.1)")),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=AA==; x=5",
     ("policy", "signature expired")),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=A; x=5",
     ("policy", "signature expired")),  # checked before b='s base64
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=A==",
     ("permerror", "b= is not base64")),
    (b"DKIM-Signature: v=1; v=1; a=rsa-sha256",
     ("permerror", "bad signature syntax: tag 'v' appears twice")),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=AA==; i=@y.test",
     ("permerror", "i= is not in the d= domain")),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=AA==; l=\xd9\xa1",
     ("permerror", "bad l= value")),  # an Arabic-Indic digit: isdigit, not ASCII
    (b"DKIM-Signature: \xff=1", ("permerror", "bad signature syntax: bad tag name '\\udcff'")),
    (b"DKIM-Signature:", ("permerror", "signature missing required tag v=")),
])  # fmt: skip
def test_signature_tags_problems(raw: bytes, expected: tuple[str, str]) -> None:
    assert same(raw) == expected


def test_signature_tags_edges() -> None:
    base = b"DKIM-Signature: v=1; a=RSA-SHA256; d=Sub.X.Test..; s=S1; h=From; bh=QR==; b=QUI="
    tags = same(base + b"; c=RELAXED; i=u@Sub.x.test.; l=007; q=x : DNS/TXT;")
    assert tags[1:3] == ("relaxed", "simple") and tags[4] == 7
    assert tags[5:8] == (b"A", b"AB", "sub.x.test")
    assert tags[9:] == ("u@Sub.x.test.", "QUI=", "s1._domainkey.sub.x.test", True)  # d= ends ".."
    assert same(base + b"; l=" + b"9" * 76)[4] == 10**76 - 1  # beyond 64 bits: the twin's
    assert same(base + b"; l=" + b"9" * 77) == ("permerror", "bad l= value")
    assert same(base + b"; x=9999999999; t=10", now=10**20)[0] == "policy"  # an int now
    assert same(base + b"; z=\xc3\xa9\xff\x00")[0] == "rsa-sha256"  # a value never read
    # h= with an octet that is not UTF-8: the names as they were (it raised
    # UnicodeEncodeError, and the message's whole DKIM check was a temperror).
    assert same(base.replace(b"h=From", b"h=From:X\xff"))[3] == (b"from", b"x\xff")
    assert same(b"x" + base[14:], colon=2)[0] == "rsa-sha256"
    assert same(base, colon=len(base) + 1) == ("permerror", "signature missing required tag v=")


#: The pieces arbitrary signatures are made of: good and bad values for every tag.
_VALUES = {
    b"v": [b"1", b"2", b"", b" 1 "],
    b"a": [b"rsa-sha256", b"ED25519-SHA256", b"rsa-sha1", b"rsa", b"rsa-sha256\xc4\xb0"],
    b"c": [b"relaxed/relaxed", b"Simple", b"relaxed/", b"/relaxed", b"relaxed/simple/x",
           b"relaxed / simple"],
    b"d": [b"example.com", b"Example.COM.", b"", b"...", b"ex ample.com", b"b\xc3\xa9.test",
           b"\xe2\x84\xaa.test"],
    b"s": [b"s1", b"S 1", b"sel\x0b", b"\xc3\x89", b""],
    b"h": [b"from:to", b"From : To\r\n :Subject", b"to", b"from::", b"FROM", b"", b"fr\x0bom"],
    b"i": [b"@example.com", b"u@sub.example.com", b"@other.com", b"x@EXAMPLE.COM.", b"",
           b"@", b"a@b@example.com", b"example.com"],
    b"q": [b"dns/txt", b"DNS/TXT : x", b"x", b"dns/txt\x0b", b""],
    b"l": [b"0", b"12", b"1" * 19, b"1" * 77, b"x", b"", b"-1", b"\xd9\xa1"],
    b"t": [b"1796681103", b"1", b"1" * 13, b"+1", b"9" * 12],
    b"x": [b"9999999999", b"1796681104", b"9" * 12, b"0", b"1"],
    b"bh": [b"QUJD", b"QU JD\r\n\t", b"QQ==", b"QR==", b"Q===", b"", b"QUJD=", b"QQ==QUJD",
            b"QQ", b"QU\x0bJD", b"QUJD\xff", b"====", b"QUJ="],
    b"b": [b"QUJD" * 90, b"QUJD\r\n QUJD", b"QQ==", b"QUI=", b"", b"Q", b"QUJD" * 400,
           b"\r\n Q U J D Q Q = =", b"QUJDQQ=="],
    b"z": [b"\xc3\xa9", b"From:To", b"\xff\x00"],
    b"B": [b"x"],
    b"foo": [b"1"],
    b"9": [b"1"],
    b"": [b"1"],
}
#: Mostly FWS, sometimes a blank that is not (a vertical tab, a no-break space).
_FWS = st.sampled_from([b"", b" ", b"\t", b"\r\n ", b"\r\n\t  "] * 100 + [b"\x0b", b"\xc2\xa0"])


@st.composite
def signatures(draw: st.DrawFn) -> bytes:
    """A DKIM-Signature field: mostly usable tags (so the compiled path parses them) with
    some values bad, tags missing, repeated or unknown, FWS (and blanks that are not FWS)
    around names, "=" and ";", a final ";" or not, and stray octets."""
    names = [n for n in (b"v", b"a", b"c", b"d", b"s", b"h", b"i", b"q", b"l", b"t", b"x",
                         b"bh", b"b") if draw(st.integers(0, 29))]
    if draw(st.integers(0, 2)) == 0:  # tags given twice, unknown, or of invalid names
        names += draw(st.lists(st.sampled_from(list(_VALUES)), max_size=2))
    names = draw(st.permutations(names))
    parts = []
    for name in names:
        values = _VALUES[name]
        # The first value is the usable one: most tags get it.
        value = values[0] if draw(st.integers(0, 19)) else draw(st.sampled_from(values))
        parts.append(draw(_FWS) + name + draw(_FWS) + b"=" + draw(_FWS) + value + draw(_FWS))
    text = b";".join(parts) + draw(st.sampled_from([b"", b";", b"; ", b";\r\n", b""] * 4
                                                   + [b";;", b"=;"]))
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([b";", b"=", b"\xff", b" ", b"\r\n"])) + text[at:]
    return b"DKIM-Signature:" + text


@settings(max_examples=3000, deadline=None)
@given(raw=signatures(), now=st.sampled_from([NOW, 0.0, 1796681104.5, 10**13, float("nan"),
                                               float("inf"), 2]))
def test_signature_tags_agree_everywhere(raw: bytes, now: float) -> None:
    # Equal values (and types) or the same (result, reason), on both implementations.
    same(raw, now=now)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=80), colon=st.integers(-2, 90))
def test_signature_tags_of_any_bytes_agree(raw: bytes, colon: int) -> None:
    same(raw, colon=colon)


def test_usual_signatures_take_the_compiled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # dkimpy's and Ferry's own signatures never reach the twin (which gives the reasons
    # and the values of everything unusual): the compiled module parses them itself.
    if len(MODULES) < 2:
        pytest.skip("the compiled module is not in use")
    compiled = MODULES[1]

    def twin(*args: object) -> None:
        raise AssertionError(f"the twin parsed {args[0]!r}")

    monkeypatch.setattr(compiled, "_signature_tags_py", twin)
    signer = Signer("Example.com", "s1", generate_key(ed25519_key=True), lifetime=3600,
                    clock=lambda: NOW)
    ours = signer.sign(b"From: a@example.com\r\nTo: b@example.net\r\n\r\nHi\r\n")[:-2]
    for raw in (DKIMPY, ours):
        assert len(compiled.signature_tags(raw, 15, NOW)) == 13

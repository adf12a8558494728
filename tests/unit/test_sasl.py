"""Server-side SASL PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login) exchanges."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.protocol.sasl import (
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
    MECHANISMS,
    Challenge,
    Credentials,
    SaslFailure,
    mechanism,
)


def b64(raw: bytes | str) -> str:
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    return base64.b64encode(data).decode("ascii")


def plain(authzid: bytes | str, user: bytes | str, password: bytes | str) -> str:
    def enc(x: bytes | str) -> bytes:
        return x.encode("utf-8") if isinstance(x, str) else x

    return b64(enc(authzid) + b"\0" + enc(user) + b"\0" + enc(password))


def failed(result: object, code: int, enhanced: str) -> bool:
    return isinstance(result, SaslFailure) and result.code == code and result.enhanced == enhanced


# --- the prompts are what the draft says -------------------------------------------------


def test_login_prompts_decode_to_the_draft_texts() -> None:
    assert base64.b64decode(LOGIN_USERNAME_PROMPT) == b"Username:"
    assert base64.b64decode(LOGIN_PASSWORD_PROMPT) == b"Password:"


def test_mechanisms_listed_are_the_ones_made() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")
    for name in MECHANISMS:
        assert isinstance(mechanism(name).start(None), Challenge)


def test_mechanism_name_is_case_insensitive_and_unknown_is_refused() -> None:
    assert mechanism("plain").start(plain("", "u", "p")) == Credentials("", "u", "p")
    with pytest.raises(ValueError, match="CRAM-MD5"):
        mechanism("CRAM-MD5")
    with pytest.raises(ValueError):
        mechanism("PLAIN", max_octets=0)


# --- PLAIN -------------------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    m = mechanism("PLAIN")
    assert m.start(plain("", "alice", "s3cret")) == Credentials("", "alice", "s3cret")


def test_plain_without_initial_response_asks_with_empty_challenge() -> None:
    m = mechanism("PLAIN")
    assert m.start(None) == Challenge("")
    assert m.step(plain("", "alice", "s3cret")) == Credentials("", "alice", "s3cret")


def test_plain_equals_sign_is_an_empty_initial_response() -> None:
    # RFC 4954 §4: "=" stands for a zero-length initial response: it is processed as the
    # (malformed) message, not taken as a request for a challenge.
    m = mechanism("PLAIN")
    assert failed(m.start("="), 535, "5.7.8")
    with pytest.raises(RuntimeError):
        m.step(plain("", "bob", "pw"))  # the exchange is over


def test_plain_empty_response_after_challenge_fails_instead_of_looping() -> None:
    m = mechanism("PLAIN")
    assert m.start(None) == Challenge("")
    assert failed(m.step(""), 535, "5.7.8")


def test_plain_authzid_is_kept() -> None:
    result = mechanism("PLAIN").start(plain("boss@example.org", "alice", "pw"))
    assert result == Credentials("boss@example.org", "alice", "pw")


def test_plain_utf8_names_and_password() -> None:
    result = mechanism("PLAIN").start(plain("Zoë", "jürgen@exämple.de", "пароль🔑"))
    assert result == Credentials("Zoë", "jürgen@exämple.de", "пароль🔑")


def test_plain_password_may_contain_spaces_and_punctuation() -> None:
    result = mechanism("PLAIN").start(plain("", "u", " a:b$c=d "))
    assert isinstance(result, Credentials) and result.password == " a:b$c=d "


@pytest.mark.parametrize(
    "text",
    [
        "not base64!",
        "AHUAcA",  # missing padding
        "AHUAcA==AHUAcA==",  # data after padding
        " AHUAcA==",  # leading whitespace
        "AHUA\ncA==",  # embedded newline
        "=AHUAcA==",  # leading padding
        "AHUAcA=",  # short padding
        "AHUAcA==é",  # non-ASCII
        "*AHUAcA==",
    ],
)
def test_plain_bad_base64_is_501(text: str) -> None:
    assert mechanism("PLAIN").start(text) == SaslFailure(501, "5.5.2", "Cannot decode response")
    m = mechanism("PLAIN")
    m.start(None)
    assert failed(m.step(text), 501, "5.5.2")


@pytest.mark.parametrize(
    "raw",
    [
        b"alice",  # no NUL at all
        b"alice\0secret",  # one NUL
        b"\0",
        b"",  # (only after a challenge: an empty initial response asks again)
    ],
)
def test_plain_missing_nuls_is_535(raw: bytes) -> None:
    m = mechanism("PLAIN")
    m.start(None)
    assert failed(m.step(b64(raw)), 535, "5.7.8")
    if raw:
        assert failed(mechanism("PLAIN").start(b64(raw)), 535, "5.7.8")


def test_plain_nul_in_password_is_refused() -> None:
    result = mechanism("PLAIN").start(b64(b"\0alice\0pass\0word"))
    assert failed(result, 535, "5.7.8")
    assert isinstance(result, SaslFailure) and "NUL" in result.text


@pytest.mark.parametrize(
    "raw", [b"\0\0pw", b"\0alice\0", b"zid\0\0pw", b"\0\0"], ids=["no-user", "no-pw", "z", "none"]
)
def test_plain_empty_username_or_password_is_refused(raw: bytes) -> None:
    assert failed(mechanism("PLAIN").start(b64(raw)), 535, "5.7.8")


@pytest.mark.parametrize(
    "raw",
    [b"\0al\xffice\0pw", b"\xc3\0alice\0pw", b"\0alice\0p\xe9w", b"\0\xed\xa0\x80\0pw"],
    ids=["user", "authzid", "password", "surrogate"],
)
def test_plain_invalid_utf8_is_refused(raw: bytes) -> None:
    result = mechanism("PLAIN").start(b64(raw))
    assert failed(result, 535, "5.7.8")
    assert isinstance(result, SaslFailure) and "UTF-8" in result.text


@pytest.mark.parametrize(
    "raw",
    [b"\0ali\r\nce\0pw", b"\0alice\n\0pw", b"ad\rmin\0alice\0pw", b"\0a\x7f\0pw", b"\0a\tb\0pw"],
)
def test_plain_control_characters_in_names_are_refused(raw: bytes) -> None:
    result = mechanism("PLAIN").start(b64(raw))
    assert failed(result, 535, "5.7.8")
    assert isinstance(result, SaslFailure) and "Control" in result.text


def test_plain_control_characters_in_password_are_kept() -> None:
    # Only names reach logs and headers; a password is any UTF-8 without NUL.
    assert mechanism("PLAIN").start(b64(b"\0alice\0p\tw\r\n")) == Credentials(
        "", "alice", "p\tw\r\n"
    )


@pytest.mark.parametrize("field", [0, 1, 2], ids=["authzid", "username", "password"])
def test_plain_each_field_limited_to_1024_octets(field: int) -> None:
    parts = ["z", "u", "p"]
    parts[field] = "é" * 512  # 1024 octets: the limit, accepted
    ok = mechanism("PLAIN").start(plain(*parts))
    assert isinstance(ok, Credentials)
    parts[field] = "é" * 512 + "x"  # 1025 octets
    assert failed(mechanism("PLAIN").start(plain(*parts)), 535, "5.7.8")


def test_plain_all_fields_at_the_limit_together() -> None:
    big = "a" * 1024
    assert mechanism("PLAIN").start(plain(big, big, big)) == Credentials(big, big, big)


def test_plain_huge_response_is_refused_without_decoding() -> None:
    # Far over any possible message: refused on its encoded length alone (valid base64
    # would otherwise decode to 3 MB).
    result = mechanism("PLAIN").start("QUFB" * 1_000_000)
    assert result == SaslFailure(535, "5.7.8", "Credentials too long")


def test_max_octets_is_a_parameter() -> None:
    m = mechanism("PLAIN", max_octets=4)
    assert m.start(plain("", "abcd", "wxyz")) == Credentials("", "abcd", "wxyz")
    assert failed(mechanism("PLAIN", max_octets=4).start(plain("", "abcde", "w")), 535, "5.7.8")
    assert failed(mechanism("LOGIN", max_octets=4).start(b64("abcde")), 535, "5.7.8")


def test_plain_cancel_after_challenge() -> None:
    m = mechanism("PLAIN")
    m.start(None)
    assert m.step("*") == SaslFailure(501, "5.0.0", "Authentication cancelled")


# --- LOGIN -------------------------------------------------------------------------------


def test_login_happy_path() -> None:
    m = mechanism("LOGIN")
    assert m.start(None) == Challenge(LOGIN_USERNAME_PROMPT)
    assert m.step(b64("alice")) == Challenge(LOGIN_PASSWORD_PROMPT)
    assert m.step(b64("s3cret")) == Credentials("", "alice", "s3cret")


def test_login_username_as_initial_response() -> None:
    m = mechanism("LOGIN")
    assert m.start(b64("alice")) == Challenge(LOGIN_PASSWORD_PROMPT)
    assert m.step(b64("s3cret")) == Credentials("", "alice", "s3cret")


def test_login_equals_sign_initial_response_is_an_empty_username() -> None:
    # RFC 4954 §4: "=" is a zero-length initial response, here an empty username.
    m = mechanism("LOGIN")
    assert failed(m.start("="), 535, "5.7.8")


def test_login_utf8() -> None:
    m = mechanism("LOGIN")
    m.start(None)
    m.step(b64("jürgen"))
    assert m.step(b64("пароль 🔑")) == Credentials("", "jürgen", "пароль 🔑")


@pytest.mark.parametrize("stage", ["initial", "username", "password"])
def test_login_bad_base64_is_501(stage: str) -> None:
    m = mechanism("LOGIN")
    if stage == "initial":
        assert failed(m.start("YWxpY2U"), 501, "5.5.2")
        return
    m.start(None)
    if stage == "password":
        m.step(b64("alice"))
    assert failed(m.step("YWxp Y2U="), 501, "5.5.2")


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"al\0ice", b"pw"),
        (b"alice", b"p\0w"),
        (b"al\xffice", b"pw"),
        (b"alice", b"p\xffw"),
        (b"", b"pw"),
        (b"alice", b""),
        (b"a" * 1025, b"pw"),
        (b"alice", b"p" * 1025),
        (b"ali\r\nce", b"pw"),
    ],
    ids=["nul-user", "nul-pw", "utf8-user", "utf8-pw", "empty-user", "empty-pw", "long-user",
         "long-pw", "crlf-user"],
)  # fmt: skip
def test_login_refusals_are_535(username: bytes, password: bytes) -> None:
    m = mechanism("LOGIN")
    m.start(None)
    first = m.step(b64(username))
    if isinstance(first, SaslFailure):
        assert failed(first, 535, "5.7.8")
        assert password == b"pw"  # only the username cases stop here
        return
    assert first == Challenge(LOGIN_PASSWORD_PROMPT)
    assert failed(m.step(b64(password)), 535, "5.7.8")


def test_login_limit_is_inclusive() -> None:
    m = mechanism("LOGIN")
    m.start(None)
    assert m.step(b64("u" * 1024)) == Challenge(LOGIN_PASSWORD_PROMPT)
    assert m.step(b64("é" * 512)) == Credentials("", "u" * 1024, "é" * 512)


def test_login_cancel() -> None:
    m = mechanism("LOGIN")
    m.start(None)
    m.step(b64("alice"))
    assert failed(m.step("*"), 501, "5.0.0")


# --- exchange discipline and safety ------------------------------------------------------


@pytest.mark.parametrize("name", MECHANISMS)
def test_an_exchange_cannot_be_stepped_after_it_ended_or_before_it_started(name: str) -> None:
    with pytest.raises(RuntimeError):
        mechanism(name).step(b64("x"))
    m = mechanism(name)
    m.start(None)
    with pytest.raises(RuntimeError):
        m.start(None)
    assert failed(m.step("!!"), 501, "5.5.2")
    with pytest.raises(RuntimeError):
        m.step(b64("anything"))


def test_credentials_repr_hides_the_password() -> None:
    creds = Credentials("", "alice", "hunter2-secret")
    assert "alice" in repr(creds)
    assert "hunter2-secret" not in repr(creds)


@given(st.text(max_size=64), st.text(max_size=64), st.text(max_size=64))
def test_plain_round_trips_any_valid_fields(authzid: str, user: str, password: str) -> None:
    fields = [s.encode("utf-8", "surrogatepass") for s in (authzid, user, password)]
    result = mechanism("PLAIN").start(plain(*fields))
    # What RFC 4616 plus our rules allow: UTF-8 (no lone surrogates), no NUL anywhere,
    # no controls in names, non-empty username and password.
    names_ok = all(_utf8(s) and not any(c < " " or c == "\x7f" for c in s) for s in (authzid, user))
    password_ok = _utf8(password) and "\0" not in password and password != ""
    if names_ok and password_ok and user != "":
        assert result == Credentials(authzid, user, password)
    else:
        assert isinstance(result, SaslFailure) and result.code == 535


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@given(st.one_of(st.none(), st.text(max_size=200)), st.lists(st.text(max_size=200), max_size=4))
@pytest.mark.parametrize("name", MECHANISMS)
def test_any_input_gives_an_outcome_never_an_exception(
    name: str, initial: str | None, steps: list[str]
) -> None:
    m = mechanism(name)
    result = m.start(initial)
    for line in steps:
        if not isinstance(result, Challenge):
            break
        result = m.step(line)
        assert isinstance(result, Challenge | Credentials | SaslFailure)
    if isinstance(result, SaslFailure):
        assert result.code in (501, 535)
        assert result.enhanced in ("5.5.2", "5.7.8", "5.0.0")

"""Password hashes, the non-blocking Authenticator and the ``ferry passwd`` helper."""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import io
import os
import re
import select
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from engine.server import auth as auth_module
from engine.server.auth import (
    KEY_BYTES,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    Authenticator,
    hash_password,
    passwd_main,
    verify_password,
)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
FORMAT = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")

# One hash shared by the tests that only need "some valid hash" (each costs ~50 ms).
ALICE_PW = "correct horse battery staple"
ALICE = hash_password(ALICE_PW)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- hash_password / verify_password ------------------------------------------------------


def test_hash_format_and_parameters() -> None:
    m = FORMAT.fullmatch(ALICE)
    assert m is not None, ALICE
    assert (int(m[1]), int(m[2]), int(m[3])) == (2**14, 8, 1)
    salt, key = base64.b64decode(m[4]), base64.b64decode(m[5])
    assert len(salt) == 16 and len(key) == 32
    # The key is scrypt itself, not something merely shaped like it.
    expected = hashlib.scrypt(ALICE_PW.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    assert key == expected


def test_every_hash_has_a_fresh_salt() -> None:
    again = hash_password(ALICE_PW)
    assert again != ALICE
    assert again.split("$")[4] != ALICE.split("$")[4]
    assert verify_password(ALICE_PW, again)


def test_round_trip_and_wrong_passwords() -> None:
    assert verify_password(ALICE_PW, ALICE) is True
    for wrong in ["", "correct horse battery stapl", ALICE_PW + " ", ALICE_PW.upper()]:
        assert verify_password(wrong, ALICE) is False


def test_every_octet_of_the_key_counts() -> None:
    head, key = ALICE.rsplit("$", 1)
    raw = base64.b64decode(key)
    for i in (0, len(raw) // 2, len(raw) - 1):
        flipped = raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :]
        assert verify_password(ALICE_PW, f"{head}${b64(flipped)}") is False


def test_utf8_password_round_trip() -> None:
    hashed = hash_password("пароль🔑 Zoë", n=2**10)
    assert verify_password("пароль🔑 Zoë", hashed)
    # NFC vs NFD: no normalisation, the octets are what count.
    assert not verify_password("пароль🔑 Zoe\u0308", hashed)


def test_rfc7914_known_answer() -> None:
    # RFC 7914 §12, third vector: P="pleaseletmein", S="SodiumChloride", N=16384, r=8,
    # p=1, dkLen=64.
    key = bytes.fromhex(
        "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
        "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887"
    )
    stored = f"scrypt$16384$8$1${b64(b'SodiumChloride')}${b64(key)}"
    assert verify_password("pleaseletmein", stored)
    assert not verify_password("pleaseletmeout", stored)


def test_other_parameters_are_read_from_the_hash() -> None:
    small = hash_password("pw", n=2**10, r=4, p=2)
    assert small.startswith("scrypt$1024$4$2$")
    assert verify_password("pw", small) and not verify_password("pW", small)


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [(1000, 8, 1), (1, 8, 1), (2**14, 0, 1), (2**14, 8, 0), (2**14, 8, 17), (2**20, 8, 1)],
)
def test_hash_password_refuses_parameters_verify_would_refuse(n: int, r: int, p: int) -> None:
    with pytest.raises(ValueError):
        hash_password("pw", n=n, r=r, p=p)


def test_unencodable_password() -> None:
    with pytest.raises(UnicodeEncodeError):
        hash_password("a\udc80b")
    assert verify_password("a\udc80b", ALICE) is False


def _malformed() -> list[str]:
    _, n, r, p, salt, key = ALICE.split("$")
    big_key = b64(bytes(65))
    return [
        "",
        "scrypt",
        "$".join(["bcrypt", n, r, p, salt, key]),
        "$".join(["SCRYPT", n, r, p, salt, key]),
        "$".join(["scrypt", n, r, p, salt]),  # a field short
        "$".join(["scrypt", n, r, p, salt, key, ""]),  # a field long
        ALICE + "\n",
        "$".join(["scrypt", "16383", r, p, salt, key]),  # N not a power of two
        "$".join(["scrypt", "016384", r, p, salt, key]),  # not canonical
        "$".join(["scrypt", "-16384", r, p, salt, key]),
        "$".join(["scrypt", "\uff11\uff16\uff13\uff18\uff14", r, p, salt, key]),  # fullwidth digits
        "$".join(["scrypt", "0x4000", r, p, salt, key]),
        "$".join(["scrypt", n, "0", p, salt, key]),
        "$".join(["scrypt", n, r, "0", salt, key]),
        "$".join(["scrypt", n, r, "99999999999", salt, key]),
        "$".join(["scrypt", str(2**30), r, p, salt, key]),  # would need 128 GiB
        "$".join(["scrypt", n, "1000000", p, salt, key]),
        "$".join(["scrypt", n, r, p, salt[:-2], key]),  # bad padding
        "$".join(["scrypt", n, r, p, salt, key + "A"]),
        "$".join(["scrypt", n, r, p, salt, " " + key]),
        "$".join(["scrypt", n, r, p, salt, "é" + key]),
        "$".join(["scrypt", n, r, p, "", key]),  # empty salt
        "$".join(["scrypt", n, r, p, b64(b"1234567"), key]),  # salt too short
        "$".join(["scrypt", n, r, p, salt, ""]),  # empty key
        "$".join(["scrypt", n, r, p, salt, b64(bytes(15))]),  # key too short
        "$".join(["scrypt", n, r, p, salt, big_key]),  # key too long
    ]


Cost = tuple[int, int, int, int]


class Derivations(list[Cost]):
    """The scrypt runs made during a test, as (n, r, p, dklen) — what each run costs,
    without timing it — and the thread each ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []


@pytest.fixture
def derivations(monkeypatch: pytest.MonkeyPatch) -> Derivations:
    """Records every scrypt run; the real derivation still runs."""
    runs = Derivations()
    real = auth_module._derive

    def recording(password: str, n: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
        runs.append((n, r, p, dklen))
        runs.threads.append(threading.get_ident())
        return real(password, n, r, p, salt, dklen)

    monkeypatch.setattr(auth_module, "_derive", recording)
    return runs


@pytest.mark.parametrize("hashed", _malformed())
def test_malformed_hashes_are_false_not_errors(hashed: str, derivations: Derivations) -> None:
    assert verify_password(ALICE_PW, hashed) is False
    assert derivations == []  # refused by parsing, before any expensive derivation


@pytest.mark.parametrize("hashed", _malformed())
def test_authenticator_refuses_malformed_hashes_at_load(hashed: str) -> None:
    with pytest.raises(ValueError, match="'mallory'"):
        Authenticator({"alice": ALICE, "mallory": hashed})


# --- Authenticator ------------------------------------------------------------------------


def test_authenticator_checks_known_and_unknown_users() -> None:
    bob = hash_password("bobs pw", n=2**10)
    auth = Authenticator({"alice": ALICE, "bob": bob})
    assert len(auth) == 2 and "alice" in auth and "carol" not in auth

    async def run() -> list[bool]:
        return [
            await auth.check("alice", ALICE_PW),
            await auth.check("alice", "bobs pw"),
            await auth.check("bob", "bobs pw"),
            await auth.check("bob", ALICE_PW),
            await auth.check("carol", ALICE_PW),
            await auth.check("Alice", ALICE_PW),  # names are exact
            await auth.check("", ""),
        ]

    assert asyncio.run(run()) == [True, False, True, False, False, False, False]


def test_authenticator_with_no_users_refuses_everyone() -> None:
    assert asyncio.run(Authenticator({}).check("alice", ALICE_PW)) is False


def test_authenticator_bad_limit() -> None:
    with pytest.raises(ValueError):
        Authenticator({}, max_concurrent=0)


def test_check_does_not_block_the_loop(derivations: Derivations) -> None:
    # scrypt runs in a worker thread, never on the loop's: the loop goes on serving.
    auth = Authenticator({"alice": ALICE})

    async def run() -> int:
        assert await auth.check("alice", ALICE_PW)
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert len(derivations.threads) == 1 and derivations.threads[0] != loop_thread


def test_unknown_user_costs_a_scrypt_run(derivations: Derivations) -> None:
    # No user enumeration by timing: an unknown name is not answered early, it costs one
    # scrypt run with a real user's parameters (benchmarks/bench_auth.py times the two).
    auth = Authenticator({"alice": ALICE})
    assert asyncio.run(auth.check("alice", "wrong")) is False
    assert asyncio.run(auth.check("nobody", "wrong")) is False
    assert len(derivations) == 2
    assert derivations[1] == derivations[0] == (SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)


def test_dummy_hash_follows_the_users_parameters(derivations: Derivations) -> None:
    # With cheap user hashes the dummy is cheap too (same cost as a real user), and with
    # the default ones it costs a default scrypt run.
    cheap = Authenticator({"a": hash_password("x", n=2**4), "b": hash_password("y", n=2**4)})
    dear = Authenticator({"a": ALICE})
    derivations.clear()  # hash_password's own runs
    asyncio.run(cheap.check("nobody", "x"))
    asyncio.run(dear.check("nobody", "x"))
    assert derivations == [(2**4, SCRYPT_R, SCRYPT_P, KEY_BYTES),
                           (SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)]


class _CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that records how many calls ran at once at most."""

    def __init__(self) -> None:
        super().__init__(max_workers=8)
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def counted() -> T:
            with self._lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        return super().submit(counted)


def _peak_concurrency(max_concurrent: int, checks: int) -> int:
    auth = Authenticator({"alice": hash_password("pw", n=2**12)}, max_concurrent=max_concurrent)
    executor = _CountingExecutor()

    async def run() -> None:
        # asyncio.to_thread runs in the loop's default executor.
        asyncio.get_running_loop().set_default_executor(executor)
        results = await asyncio.gather(*(auth.check("alice", "pw") for _ in range(checks)))
        assert all(results)

    asyncio.run(run())
    return executor.peak


def test_concurrent_checks_are_bounded() -> None:
    assert _peak_concurrency(1, 4) == 1
    assert _peak_concurrency(2, 6) == 2


# --- ferry passwd -------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def test_passwd_stdin_prints_a_hash_that_verifies(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(" s3cret pass \r\nignored\n"))
    assert passwd_main(["--stdin"]) == 0
    out, err = capsys.readouterr()
    hashed = out.strip()
    assert FORMAT.fullmatch(hashed) and err == ""
    # Only the line ending is removed; inner and edge spaces are part of the password.
    assert verify_password(" s3cret pass ", hashed)
    assert not verify_password("s3cret pass", hashed)


@pytest.mark.parametrize("data", ["", "\n", "\r\n"])
def test_passwd_stdin_refuses_no_or_empty_password(
    data: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(data))
    assert passwd_main(["--stdin"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("ferry passwd: ")


def test_passwd_as_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.server.auth", "--stdin"],
        input="pässword\n".encode(),
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_password("pässword", proc.stdout.decode().strip())


def _on_a_terminal(answers: list[bytes]) -> tuple[int, str, str]:
    """Run ``passwd`` with a pseudo-terminal as its controlling tty; answer each prompt."""
    master, slave = os.openpty()

    def take_tty() -> None:  # runs in the child, after setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.server.auth"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=take_tty,
    )
    os.close(slave)
    seen = b""
    try:
        for answer in answers:
            prompts = seen.count(b":")
            deadline = time.monotonic() + 30
            # getpass flushes pending input when it turns echo off: wait for each prompt.
            while seen.count(b":") == prompts:
                assert time.monotonic() < deadline, seen
                ready, _, _ = select.select([master], [], [], 0.1)
                if ready:
                    seen += os.read(master, 1024)
            os.write(master, answer + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen.count(b":") == 2 and answers[0] not in seen  # prompted twice, no echo
    return proc.returncode, out.decode(), err.decode()


def test_passwd_on_a_terminal_asks_twice() -> None:
    code, out, _ = _on_a_terminal([b"tty secret", b"tty secret"])
    assert code == 0
    assert verify_password("tty secret", _last_line(out))


def test_passwd_on_a_terminal_refuses_a_mismatch() -> None:
    code, out, err = _on_a_terminal([b"tty secret", b"tty secreT"])
    assert code == 1 and out == ""
    assert "differ" in err

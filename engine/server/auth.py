"""Password hashes and the credential check behind SMTP AUTH; the ``ferry passwd`` helper.

Owns the stored form of a password, ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``
(scrypt, RFC 7914, through ``hashlib.scrypt``), and :class:`Authenticator`, which answers
"is this the password of this user?" for credentials decoded by ``engine.protocol.sasl``.

Must never block the event loop: scrypt costs tens of milliseconds on purpose, so
:meth:`Authenticator.check` runs it in a worker thread, a bounded number at a time.
Must never reveal which users exist: an unknown user costs the same scrypt run as a
known one (against a dummy hash), and every comparison is constant-time.  Must never
keep or print a password; only its hash leaves this module.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import getpass
import hashlib
import hmac
import re
import secrets
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: RFC 7914 §2 parameters for new hashes: N (CPU/memory cost), r (block size), p.
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
KEY_BYTES: Final = 32

# Bounds on the parameters a stored hash may ask for, so a bad line in the user table
# cannot make one check take gigabytes or minutes (128 * r * N octets of memory).
_MAX_MEMORY: Final = 128 * 2**20
_MAX_P: Final = 16
_KEY_RANGE: Final = range(16, 65)
_SALT_RANGE: Final = range(8, 65)
_INT: Final = re.compile(r"[1-9][0-9]{0,9}")


@dataclass(frozen=True, slots=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _derive(password: str, n: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
    # OpenSSL counts 128*r*(N+p+2) octets; give it that plus slack, never its 32 MiB default.
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_params(n: int, r: int, p: int) -> bool:
    """N is a power of two above 1 (RFC 7914 §2); cost stays under the bounds above."""
    return n > 1 and n & (n - 1) == 0 and r >= 1 and 1 <= p <= _MAX_P and 128 * r * n <= _MAX_MEMORY


def _parse(hashed: str) -> _Hash | None:
    """The stored form taken apart, or None if it is not one this module would accept."""
    parts = hashed.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    if not all(_INT.fullmatch(part) for part in parts[1:4]):
        return None
    n, r, p = (int(part) for part in parts[1:4])
    if not _check_params(n, r, p):
        return None
    try:
        salt = binascii.a2b_base64(parts[4], strict_mode=True)
        key = binascii.a2b_base64(parts[5], strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    if len(salt) not in _SALT_RANGE or len(key) not in _KEY_RANGE:
        return None
    return _Hash(n, r, p, salt, key)


def _format(h: _Hash) -> str:
    return f"scrypt${h.n}${h.r}${h.p}${_b64(h.salt)}${_b64(h.key)}"


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Salted scrypt of ``password`` (UTF-8) in the stored form; a fresh salt every call.

    ValueError for parameters :func:`verify_password` would refuse, UnicodeEncodeError
    for a str that is not encodable (lone surrogates).
    """
    if not _check_params(n, r, p):
        raise ValueError(f"scrypt parameters out of range: n={n} r={r} p={p}")
    salt = secrets.token_bytes(SALT_BYTES)
    return _format(_Hash(n, r, p, salt, _derive(password, n, r, p, salt, KEY_BYTES)))


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``; False, never an exception, for bad input.

    Blocking (one scrypt run): call it from a thread, as :class:`Authenticator` does.
    """
    h = _parse(hashed)
    if h is None:
        return False
    try:
        derived = _derive(password, h.n, h.r, h.p, h.salt, len(h.key))
    except (ValueError, MemoryError):  # unencodable password, or OpenSSL refused the cost
        return False
    return hmac.compare_digest(derived, h.key)


class Authenticator:
    """The user table and the non-blocking check SMTP AUTH asks of it.

    ``users`` maps a username (compared exactly as decoded from SASL) to its stored hash;
    a malformed hash is a configuration error, raised here as ValueError naming the user.
    ``max_concurrent`` bounds the scrypt runs in flight (each holds ``128 * r * N``
    octets, 16 MiB by default), so an AUTH flood queues instead of exhausting memory or
    the loop's default executor.  Use one instance from one event loop.
    """

    def __init__(self, users: Mapping[str, str], *, max_concurrent: int = 4) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be positive")
        parsed: dict[str, _Hash] = {}
        for user, hashed in users.items():
            h = _parse(hashed)
            if h is None:
                raise ValueError(f"malformed password hash for user {user!r}")
            parsed[user] = h
        self._users = dict(users)
        # The dummy costs what most real users cost: their commonest parameters.  Its key
        # is random, so no password matches it (2**-256); building it runs no scrypt.
        common = Counter((h.n, h.r, h.p, len(h.key)) for h in parsed.values()).most_common(1)
        n, r, p, dklen = common[0][0] if common else (SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
        salt, key = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(dklen)
        self._dummy = _format(_Hash(n, r, p, salt, key))
        self._slots = asyncio.Semaphore(max_concurrent)

    def __contains__(self, username: object) -> bool:
        return username in self._users

    def __len__(self) -> int:
        return len(self._users)

    async def check(self, username: str, password: str) -> bool:
        """True if ``password`` is ``username``'s; runs scrypt off the loop either way."""
        hashed = self._users.get(username)
        async with self._slots:
            ok = await asyncio.to_thread(verify_password, password, hashed or self._dummy)
        return ok and hashed is not None


# --- ferry passwd -------------------------------------------------------------------------


def _read_stdin() -> str | None:
    """One line from stdin without its line ending; None at end of input."""
    line = sys.stdin.readline()
    if not line:
        return None
    return line.removesuffix("\n").removesuffix("\r")


def _read_tty() -> str | None:
    """The password typed twice without echo; None if the two differ."""
    first = getpass.getpass("Password: ")
    again = getpass.getpass("Again: ")
    return first if first == again else None


PASSWD_DESCRIPTION: Final = "Print the scrypt hash of a password, for the AUTH user table."


def add_passwd_arguments(parser: argparse.ArgumentParser) -> None:
    """``ferry passwd``'s arguments (engine.cli.main's parser shows them in help, man page
    and completion; :func:`passwd_main` parses with them)."""
    parser.add_argument(
        "--stdin",
        action="store_true",
        help="read the password from the first line of standard input (no prompt, no "
        "confirmation) instead of asking twice on the terminal",
    )


def passwd_main(argv: list[str] | None = None) -> int:
    """``ferry passwd``: read a password, print its stored form; 0 on success, 1 if not."""
    parser = argparse.ArgumentParser(prog="ferry passwd", description=PASSWD_DESCRIPTION)
    add_passwd_arguments(parser)
    args = parser.parse_args(argv)
    try:
        password = _read_stdin() if args.stdin else _read_tty()
    except (EOFError, KeyboardInterrupt):
        print("ferry passwd: cancelled", file=sys.stderr)
        return 1
    except UnicodeDecodeError:
        print("ferry passwd: the password is not valid UTF-8", file=sys.stderr)
        return 1
    if password is None:
        what = "no password on standard input" if args.stdin else "the passwords differ"
        print(f"ferry passwd: {what}", file=sys.stderr)
        return 1
    if not password:
        # RFC 4616 §2: PLAIN cannot carry an empty password, so it could never be used.
        print("ferry passwd: empty password refused", file=sys.stderr)
        return 1
    try:
        hashed = hash_password(password)
    except UnicodeEncodeError:
        print("ferry passwd: the password is not valid UTF-8", file=sys.stderr)
        return 1
    print(hashed)
    return 0


if __name__ == "__main__":
    sys.exit(passwd_main())

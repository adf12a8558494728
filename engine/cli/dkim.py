"""``ferry dkim keygen``: make a DKIM signing key and print the DNS record to publish.

Writes the private key (PEM, PKCS#8, unencrypted, mode 0600, never over an existing file)
as ``DIR/DOMAIN.SELECTOR.pem`` and prints the TXT record for
``SELECTOR._domainkey.DOMAIN`` as a zone-file line on standard output (what was written
goes to standard error, so the output can be appended to a zone file as it is).  The key
and the record come from engine.message.dkim; this module holds no logic of its own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

__all__ = ["add_parser", "dkim_main"]

# Letters, digits and hyphens in dot-separated labels (RFC 1035 §2.3.1); a selector may
# have several labels (RFC 6376 §3.1).
_NAME = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                   r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dkim = commands.add_parser(
        "dkim", help="DKIM signing keys: make one and print its DNS record",
        description="DKIM (RFC 6376) signing keys for the [[dkim_sign]] entries.")
    sub = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    keygen = sub.add_parser(
        "keygen", help="write a new private key and print the TXT record to publish",
        description="Write a new DKIM private key to DIR/DOMAIN.SELECTOR.pem (mode 0600; "
        "an existing file is never replaced) and print the TXT record to publish at "
        "SELECTOR._domainkey.DOMAIN as a zone-file line, in strings of at most 255 octets.")
    keygen.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
    keygen.add_argument("selector", metavar="SELECTOR", help="the selector (s=)")
    keygen.add_argument("--ed25519", action="store_true",
                        help="an Ed25519 key (RFC 8463) instead of RSA")
    keygen.add_argument("--bits", type=int, default=2048, metavar="N",
                        help="RSA key size, 2048 or more (default 2048)")
    keygen.add_argument("--out", metavar="DIR", default=".",
                        help="the directory to write the key into (default: the current one)")


def dkim_main(args: argparse.Namespace) -> int:
    from engine.message.dkim import (
        DkimKeyError,
        fold_txt,
        generate_key,
        key_record,
        private_pem,
    )

    domain, selector = args.domain.lower().rstrip("."), args.selector.lower()
    for what, value in (("DOMAIN", domain), ("SELECTOR", selector)):
        if not _NAME.fullmatch(value) or len(value) > 253:
            print(f"ferry dkim keygen: {what} {value!r} is not a DNS name (letters, digits, "
                  "hyphens, dots)", file=sys.stderr)
            return 2
    try:
        key = generate_key(args.ed25519, args.bits)
    except DkimKeyError as exc:
        print(f"ferry dkim keygen: {exc}", file=sys.stderr)
        return 2
    path = Path(args.out) / f"{domain}.{selector}.pem"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"ferry dkim keygen: cannot create {path}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    kind = "Ed25519" if args.ed25519 else f"RSA {args.bits} bits"
    print(f"wrote {path} ({kind}, mode 0600)", file=sys.stderr)
    print(f"{selector}._domainkey.{domain}. IN TXT {fold_txt(key_record(key))}")
    return 0

"""DANE for SMTP (RFC 7672): does a server's certificate chain match its TLSA records?

Only DANE-TA(2) and DANE-EE(3) are usable for SMTP (RFC 7672 §3.1.3: PKIX-TA and PKIX-EE
are not); selectors Cert(0) and SPKI(1); matching types Full(0), SHA2-256(1) and
SHA2-512(2) (RFC 6698 §2.1).  DANE-EE matches the end entity certificate alone: no name
check, no expiry check (RFC 7672 §3.1.1).  DANE-TA matches a certificate of the chain the
server presented (RFC 7672 §3.1.2: the server must include its trust anchor), from which
the end entity certificate must then verify, with the MX host name as the reference
identifier (the path and names checked by ``cryptography``'s verifier).

It does no I/O; the records come from engine.routing.mx, the chain from the handshake.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    ServerVerifier,
    Store,
    VerificationError,
)

from engine.routing.mx import Tlsa

DANE_TA: Final = 2
DANE_EE: Final = 3


def _verifier(anchors: Sequence[x509.Certificate], name: str) -> ServerVerifier:
    """A path and name verifier for host ``name`` from ``anchors``: the Web PKI rules for
    CA certificates, but an end entity's extensions as OpenSSL accepts them (a subject
    with a critical subjectAltName is common on mail servers, and OpenSSL's verification
    at level "verify" takes it); the subjectAltName must be there and name the host."""
    ee = ExtensionPolicy.permit_all().require_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    return (PolicyBuilder().store(Store(list(anchors)))
            .time(datetime.datetime.now(datetime.UTC))
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
            .build_server_verifier(x509.DNSName(name.rstrip("."))))


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records a client may use (RFC 7672 §3.1.3, RFC 6698 §2.1)."""
    return tuple(r for r in records
                 if r[0] in (DANE_TA, DANE_EE) and r[1] in (0, 1) and r[2] in (0, 1, 2))


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def _matches(cert: x509.Certificate, der: bytes, record: Tlsa) -> bool:
    _, selector, mtype, data = record
    return _digest(_selected(cert, der, selector), mtype) == data


def match(records: Sequence[Tlsa], chain: Sequence[bytes], name: str) -> tuple[str, str]:
    """("dane-ee" or "dane-ta", "") when the presented ``chain`` (DER, end entity first)
    matches one of ``records`` for host ``name``; ("", why) when none does."""
    if not chain:
        return "", "the server presented no certificate"
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    for record in records:
        if record[0] == DANE_EE and _matches(certs[0], chain[0], record):
            return "dane-ee", ""
    why = "no TLSA record matches the certificate chain"
    for record in records:
        if record[0] != DANE_TA:
            continue
        for cert, der in zip(certs[1:], chain[1:], strict=True):
            if not _matches(cert, der, record):
                continue
            try:
                _verifier([cert], name).verify(certs[0], [c for c in certs[1:] if c is not cert])
            except (VerificationError, ValueError) as exc:
                why = f"the chain does not verify from the DANE-TA trust anchor: {exc}"
                continue
            return "dane-ta", ""
    return "", why


def verify_chain(chain: Sequence[bytes], name: str,
                 anchors: Sequence[x509.Certificate]) -> str:
    """Why the presented ``chain`` does not verify to ``anchors`` for host ``name`` ("" when
    it does): the check an MTA-STS testing policy reports on (RFC 8461 §4.2)."""
    if not chain:
        return "the server presented no certificate"
    if not anchors:
        return "no trusted CA certificates"
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    try:
        _verifier(anchors, name).verify(certs[0], certs[1:])
    except (VerificationError, ValueError) as exc:
        return f"certificate not valid for {name}: {exc}"
    return ""


def load_anchors(ca_file: str | None) -> list[x509.Certificate]:
    """The CA certificates of ``ca_file``, or the system's (blocking: run in a thread)."""
    import ssl

    if ca_file is not None:
        with open(ca_file, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    ders = ssl.create_default_context().get_ca_certs(binary_form=True)
    return [x509.load_der_x509_certificate(d) for d in ders]

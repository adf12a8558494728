"""What the interop tests against real MTAs share: messages, the trace-field comparison,
SMTP submission to Ferry, test certificates and a temporary directory other users reach.

Imported by the test modules (``from tests.interop.conftest import ...``); its fixtures
(``base``, ``ca``) are found by pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import smtplib
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from engine.client.smtp import SmtpAgent
from engine.config import SendConfig
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.wait import wait_for

SENDER = "a@client.test"
#: The fields a hop may put in front of a message: RFC 5321 §4.4 trace fields, and the
#: delivery fields of Postfix's virtual(8) (Delivered-To, X-Original-To).
TRACE_FIELDS = {b"received", b"return-path", b"delivered-to", b"x-original-to"}


def headers(tag: str) -> bytes:
    """A complete header section (CRLF lines, blank line included) with every field an MTA
    would otherwise add (Date, Message-ID), and a folded field."""
    return (
        f"From: Alice <{SENDER}>\r\n"
        f"To: Rcpt <rcpt@{tag}.example>\r\n"
        f"Subject: interop {tag}\r\n"
        "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{tag}.{uuid.uuid4().hex}@client.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "X-Folded: first part\r\n"
        "\tsecond part\r\n"
        "\r\n"
    ).encode()


def message(tag: str, body: bytes = b"", *, dots: bool = True) -> bytes:
    """A complete message (CRLF lines) from :func:`headers`, then unless ``dots`` is false
    lines that SMTP transparency must carry: a lone ".", "..", ".x" (RFC 5321 §4.5.2)."""
    text = b"Hello.\r\n"
    if dots:
        text += b".\r\n..\r\n.leading dot\r\n"
    return headers(tag) + text + b"  indented line \r\n\r\n" + body + b"last line\r\n"


def trace_prefix(data: bytes, original: bytes, eol: bytes) -> list[bytes]:
    """The fields in front of ``original`` in ``data``; each must be a trace field."""
    assert data.endswith(original), f"body changed in transit:\n{data!r}\n---\n{original!r}"
    prefix = data[: len(data) - len(original)]
    assert prefix == b"" or prefix.endswith(eol), prefix
    fields: list[bytes] = []
    for line in prefix.split(eol)[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += eol + line
        else:
            fields.append(line)
    names = [f.split(b":", 1)[0].lower() for f in fields]
    assert set(names) <= TRACE_FIELDS, f"not only trace fields in front: {fields}"
    return fields


def with_keyword(received: bytes) -> str:
    m = re.search(rb"\swith\s+(\S+)", received)
    assert m is not None, received
    return m.group(1).decode()


def message_id(msg: bytes) -> bytes:
    m = re.search(rb"^Message-ID: (<[^>]+>)\r\n", msg, re.MULTILINE)
    assert m is not None
    return m.group(1)


def submit(host: str, port: int, rcpt: str, msg: bytes, options: tuple[str, ...] = ()) -> None:
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(SENDER, list(options))
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
        code, reply = client.data(msg)
        assert code == 250, reply


def write_cert(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    directory.mkdir(mode=0o755)
    cert = ca.issue_cert(*names)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def base(request: pytest.FixtureRequest) -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is mode 0700, and the MTA's own users (postfix,
    # Debian-exim, the mailbox owner) must reach files here by absolute path.
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    d = Path(tempfile.mkdtemp(prefix=f"ferry-interop-{name}."))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.contextmanager
def sending_ferry(
    spool: Path, connectors: tuple[SendConfig, ...], **delivery: Any
) -> Iterator[RunningFerry]:
    """A Ferry with delivery on through ``connectors`` (smarthost next hops, so no DNS:
    an empty responder stands in for the resolver), retrying within seconds; ``delivery``
    overrides further ``[delivery]`` settings."""
    with DnsResponder("") as dns:
        config = ferry_config(spool)
        config = dataclasses.replace(
            config,
            send=connectors,
            delivery=dataclasses.replace(
                config.delivery,
                paused=False,
                dns=dns.address,
                retry_interval=1.0,
                max_retry_interval=2.0,
                **delivery,
            ),
        )
        with RunningFerry(config) as f:
            yield f


def deliver_queued(f: RunningFerry, destination: str, rcpt: str, msgs: list[bytes],
                   arrived: Callable[[bytes], object]) -> SmtpAgent:
    """Hold ``destination`` while ``msgs`` arrive for ``rcpt``, then release them at once
    (so one connection has a queue to pipeline); wait until ``arrived(message_id)`` finds
    each and Ferry's queue is empty.  Returns Ferry's SMTP agent, for its counters."""
    assert f.app.scheduler is not None
    f.call(f.app.scheduler.suspend(destination))
    for msg in msgs:
        submit(f.host, f.port, rcpt, msg)
    f.call(f.app.scheduler.resume(destination))
    for msg in msgs:
        arrived(message_id(msg))
    wait_for(lambda: f.store.count() == 0, 10, "Ferry's queue empty after delivery")
    agent = f.app.agents["smtp"]
    assert isinstance(agent, SmtpAgent)
    return agent

"""What ingest changes on the way in, seen at the next hop: a bare <Postmaster> becomes the
configured postmaster address (RFC 5321 §4.5.1), and a line over 1,000 octets is broken
(RFC 5321 §4.5.3.1.6).  Real sockets on 127.0.0.1, a real queue, an aiosmtpd sink as the
smarthost."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import ConfigError, load_config
from engine.message.lines import MAX_LINE
from engine.testing.rawsmtp import RawClient
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink, Received
from engine.testing.wait import wait_for

NO_RELAY = (ipaddress.ip_network("192.0.2.0/24"),)  # loopback clients may not relay

Start = Callable[..., RunningFerry]


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    s = CountingSink(["127.0.10.1"])
    yield s
    s.stop()


@pytest.fixture
def ferry(tmp_path: Path, sink: CountingSink) -> Iterator[Start]:
    """``ferry(postmaster=..., **receive)``: everything goes to the sink as smarthost."""
    running: list[RunningFerry] = []

    def start(postmaster: str = "", **receive: Any) -> RunningFerry:
        config = ferry_config(tmp_path / f"spool{len(running)}", **receive)
        delivery = dataclasses.replace(config.delivery, paused=False,
                                       smarthost=("127.0.10.1", sink.port))
        f = RunningFerry(dataclasses.replace(config, delivery=delivery, postmaster=postmaster))
        running.append(f)
        return f

    yield start
    for f in running:
        f.stop()


def transaction(f: RunningFerry, rcpt: bytes, body: bytes) -> None:
    with RawClient(f.host, f.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RCPT TO:" + rcpt).code == 250
        assert c.command(b"DATA").code == 354
        c.send(body + b".\r\n")
        assert c.reply().code == 250


def delivered(sink: CountingSink) -> Received:
    wait_for(lambda: sink.state.messages, what="a message at the sink")
    (msg,) = sink.state.messages
    return msg


def test_bare_postmaster_goes_to_the_configured_postmaster(ferry: Start,
                                                           sink: CountingSink) -> None:
    # From a client that may not relay: <Postmaster> is accepted from anyone (§4.5.1).
    f = ferry(postmaster="hostmaster@example.org", relay_networks=NO_RELAY)
    transaction(f, b"<Postmaster>", b"Subject: hi\r\n\r\nhello\r\n")
    msg = delivered(sink)
    assert msg.recipients == ["hostmaster@example.org"]  # never an unqualified address
    assert msg.body.endswith(b"Subject: hi\r\n\r\nhello\r\n")


def test_postmaster_defaults_to_postmaster_at_the_hostname(ferry: Start,
                                                          sink: CountingSink) -> None:
    f = ferry(relay_networks=NO_RELAY)
    transaction(f, b"<pOSTMASTER>", b"Subject: hi\r\n\r\nhello\r\n")  # case-insensitive
    assert delivered(sink).recipients == [f"postmaster@{f.config.hostname}"]
    assert f.config.hostname == "ferry.test"


def test_a_long_line_reaches_the_next_hop_wrapped(ferry: Start, sink: CountingSink) -> None:
    f = ferry()
    header = b"X-Long: " + b"h" * 2492  # a 2,500-octet header line
    text = b"".join(b"%05d " % i for i in range(700))  # a 4,200-octet body line
    body = header + b"\r\nSubject: wrap\r\n\r\n" + text + b"\r\n.leading dot\r\nend\r\n"
    transaction(f, b"<b@example.net>", body.replace(b"\r\n.", b"\r\n.."))
    msg = delivered(sink)
    lines = msg.body.split(b"\r\n")
    assert max(len(line) + 2 for line in lines) <= MAX_LINE
    # Broken with CRLF SPACE only: remove the inserted breaks and the message is as sent.
    assert msg.body.replace(b"\r\n ", b"").endswith(body)
    assert b"\r\nSubject: wrap\r\n" in msg.body and msg.body.endswith(b".leading dot\r\nend\r\n")


def test_the_receive_keys_load_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text('postmaster = "abuse@example.com"\n[[receive]]\nrequire_auth = true\n'
                    'long_lines = "reject"\n')
    config = load_config(path)
    assert config.postmaster == "abuse@example.com"
    assert (config.receive[0].require_auth, config.receive[0].long_lines) == (True, "reject")
    default = load_config(None)
    assert (default.postmaster, default.receive[0].require_auth,
            default.receive[0].long_lines) == ("", False, "wrap")
    path.write_text('postmaster = "postmaster"\n[[receive]]\nlong_lines = "warp"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(":")[0] for p in info.value.problems] == ["postmaster",
                                                             "receive[0].long_lines"]
    assert 'did you mean "wrap"' in str(info.value)

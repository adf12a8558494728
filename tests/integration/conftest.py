"""Fixtures for tests over real sockets on 127.0.0.1: a running Ferry, test certificates, a
DNS responder and a counting sink for the module's ``ZONE`` and ``SINK_ADDRESSES``, and the
scanner daemons (rspamd, clamd), started once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from engine.config import load_config
from engine.ops.events import Sink
from engine.testing.clamav import ClamdInstance
from engine.testing.dns import DnsResponder
from engine.testing.rspamd import RspamdInstance
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink

StartFerry = Callable[..., RunningFerry]

#: rspamd's compiled Hyperscan databases, kept between test sessions (not committed).
HS_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "rspamd-hs"


@pytest.fixture
def start_ferry(tmp_path: Path) -> Iterator[StartFerry]:
    """``start_ferry(**receive_settings, users=..., accepted_domains=...)`` → RunningFerry."""
    running: list[RunningFerry] = []

    def start(users: dict[str, str] | None = None, accepted_domains: tuple[str, ...] = (),
              **receive: Any) -> RunningFerry:
        import dataclasses

        config = ferry_config(tmp_path / f"spool{len(running)}", **receive)
        config = dataclasses.replace(config, users=users or {},
                                     accepted_domains=accepted_domains)
        ferry = RunningFerry(config)
        running.append(ferry)
        return ferry

    yield start
    for ferry in running:
        ferry.stop()


#: ``ferry_toml(body, relay=True, dns="127.0.0.1:9", sinks=())`` → RunningFerry.
FerryToml = Callable[..., RunningFerry]


@pytest.fixture
def ferry_toml(tmp_path: Path) -> Iterator[FerryToml]:
    """A server from a configuration file: hostname ferry.test, example.org accepted,
    delivery paused, one connector on an ephemeral loopback port on which loopback may relay
    (``relay``) or not; ``body`` goes on inside that [[receive]] table (its keys first,
    then any tables), with its paths relative to ``tmp_path``.  Stopped at the end."""
    running: list[RunningFerry] = []

    def start(body: str, *, relay: bool = True, dns: str = "127.0.0.1:9",
              sinks: Sequence[Sink] = ()) -> RunningFerry:
        n = len(running)
        path = tmp_path / f"ferry{n}.toml"
        networks = '["127.0.0.0/8"]' if relay else '["192.0.2.0/24"]'
        path.write_text(f"""
hostname = "ferry.test"
spool = "spool{n}"
accepted_domains = ["example.org"]
[queue]
min_free_disk = 0
[delivery]
paused = true
dns = "{dns}"
[[receive]]
listen = ["127.0.0.1:0"]
relay_networks = {networks}
{body}
""", encoding="utf-8")
        ferry = RunningFerry(load_config(path), sinks)
        running.append(ferry)
        return ferry

    yield start
    for ferry in running:
        ferry.stop()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A server certificate for ferry.test / 127.0.0.1 signed by the test CA."""
    d = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("ferry.test", "127.0.0.1")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.fixture
def dns_server(request: pytest.FixtureRequest) -> Iterator[DnsResponder]:
    """A DNS responder on loopback serving the test module's ``ZONE``."""
    with DnsResponder(request.module.ZONE) as responder:
        yield responder


@pytest.fixture
def sink(request: pytest.FixtureRequest) -> Iterator[CountingSink]:
    """A counting SMTP sink on the test module's ``SINK_ADDRESSES``."""
    s = CountingSink(list(request.module.SINK_ADDRESSES))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdInstance]:
    """A private rspamd (engine.testing.rspamd) for the whole session: it takes seconds to
    start, tens of seconds without the Hyperscan databases it compiled at an earlier start
    (kept in the checkout's .cache, so the second suite of tests/run.sh finds them)."""
    with RspamdInstance(tmp_path_factory.mktemp("rspamd"), hs_cache=HS_CACHE) as instance:
        yield instance


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdInstance]:
    """A private clamd with the test signature database (engine.testing.clamav)."""
    with ClamdInstance(tmp_path_factory.mktemp("clamd")) as instance:
        yield instance

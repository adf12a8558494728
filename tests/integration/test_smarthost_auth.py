"""``[[send]] allow_plaintext_auth`` from the file to the wire: a whole Ferry, configured by
TOML, relays to an aiosmtpd smarthost on loopback that offers AUTH without TLS."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from engine.config import load_config
from engine.testing.server import RunningFerry
from engine.testing.wait import wait_for

BODY = b"Subject: plaintext auth\r\n\r\nHello\r\n"


class _Smarthost:
    """Records each AUTH login and each message as (login, TLS, recipients)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bool, list[str]]] = []
        self.logins: list[bytes] = []

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     data: Any) -> AuthResult:
        self.logins.append(data.login)
        ok = (data.login, data.password) == (b"relayuser", b"relaypass")
        return AuthResult(success=ok, handled=False, auth_data=data)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        login = session.auth_data.login.decode() if session.authenticated else ""
        self.messages.append((login, session.ssl is not None, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK"


@pytest.fixture
def smarthost() -> Iterator[tuple[_Smarthost, int]]:
    with socket.socket() as probe:  # aiosmtpd's Controller needs a known port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = _Smarthost()
    # No TLS context: no STARTTLS; AUTH offered in plaintext.
    controller = Controller(handler, hostname="127.0.0.1", port=port,
                            authenticator=handler.authenticate, auth_require_tls=False)
    controller.start()
    yield handler, port
    controller.stop()


def _ferry(tmp_path: Path, port: int, tls: str, allowed: bool) -> RunningFerry:
    path = tmp_path / "ferry.toml"
    path.write_text(
        f"""
[queue]
min_free_disk = 0
[delivery]
retry_interval = 60
[[send]]
name = "relay"
address_spaces = ["*"]
smarthosts = ["127.0.0.1:{port}"]
tls = "{tls}"
auth_user = "relayuser"
auth_password = "relaypass"
allow_plaintext_auth = {"true" if allowed else "false"}
""",
        encoding="utf-8",
    )
    config = load_config(path, {"--listen": ["127.0.0.1:0"], "--spool": str(tmp_path / "spool"),
                                "--hostname": "ferry.test", "--dns": "127.0.0.1:9"})
    return RunningFerry(config)


def _send(f: RunningFerry) -> None:
    with smtplib.SMTP(f.host, f.port) as client:
        client.sendmail("a@client.test", ["x@partner.test"], BODY)


@pytest.mark.parametrize("tls", ["off", "opportunistic"])
def test_allowed_plaintext_auth_reaches_the_smarthost(
    tmp_path: Path, smarthost: tuple[_Smarthost, int], tls: str
) -> None:
    handler, port = smarthost
    with _ferry(tmp_path, port, tls, allowed=True) as f:
        _send(f)
        wait_for(lambda: handler.messages, what="the smarthost got the message")
        wait_for(lambda: f.store.count() == 0, what="the queue is empty")
    assert handler.messages == [("relayuser", False, ["x@partner.test"])]


def test_plaintext_auth_not_allowed_defers(
    tmp_path: Path, smarthost: tuple[_Smarthost, int]
) -> None:
    handler, port = smarthost
    with _ferry(tmp_path, port, "opportunistic", allowed=False) as f:
        _send(f)
        qid = wait_for(lambda: f.store.ids_in_state("deferred", 1), what="deferred")[0]
        reply = f.store.get(qid).recipients[0].last_reply
    # The route asks for TLS (the password never goes in clear); the smarthost has none.
    assert reply.startswith("451 4.7.10"), reply
    assert handler.messages == [] and handler.logins == []

"""The "dnsbl" and "ratelimit" agents through a real server over real SMTP: a listed client
refused in place of the greeting, each client rate limit tripping with its reply, the
AUTH lockout across connections and its end, the delay after a failed AUTH.

Clients connect from several loopback addresses (127.0.0.2, .3, ...) so one server sees
several clients; the DNS lists are served by the DNS responder of the integration conftest.
"""

from __future__ import annotations

import base64
import select
from collections.abc import Callable

import pytest

from engine.server.auth import hash_password
from engine.testing.dns import DnsResponder
from engine.testing.rawsmtp import RawClient
from engine.testing.server import RunningFerry
from engine.testing.wait import poll, wait_for
from tests.integration.conftest import FerryToml

ZONE = """
$TTL 60
2.0.0.127.bl.test.   IN A   127.0.0.2
2.0.0.127.bl.test.   IN TXT "see https://bl.test/127.0.0.2"
4.0.0.127.bl.test.   IN A   127.0.0.3
4.0.0.127.wl.test.   IN A   127.0.10.1
5.0.0.127.bl.test.   IN A   127.0.0.99
"""

Start = Callable[[str], RunningFerry]
PASSWORD = "s3cret"


@pytest.fixture
def start(ferry_toml: FerryToml, dns_server: DnsResponder) -> Start:
    """``start(agents_toml)``: a server with one connector running "ratelimit" and
    "dnsbl", the agents set up by ``agents_toml``; user "app" with PASSWORD."""

    def run(agents: str) -> RunningFerry:
        return ferry_toml(f"""allow_plaintext_auth = true
max_auth_failures = 10
agents = ["ratelimit", "dnsbl"]
[users]
app = "{hash_password(PASSWORD)}"
{agents}""", dns=f"{dns_server.host}:{dns_server.port}")

    return run


def client(ferry: RunningFerry, source: str) -> RawClient:
    return RawClient(ferry.host, ferry.port, source=source)


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


def auth_once(ferry: RunningFerry, source: str, password: str) -> tuple[int, str, str]:
    """A new connection from ``source`` that tries one AUTH; the AUTH's reply."""
    with client(ferry, source) as c:
        assert c.reply().code == 220
        c.command(b"EHLO client.test")
        r = c.command(plain("app", password))
        return r.code, r.enhanced, r.text


# --- dnsbl ------------------------------------------------------------------------------------

DNSBL = """
[[agents.dnsbl.zones]]
zone = "bl.test"
codes = ["127.0.0.2-127.0.0.11"]
[[agents.dnsbl.zones]]
zone = "wl.test"
kind = "allow"
"""


def test_listed_client_gets_554_in_place_of_the_greeting(start: Start) -> None:
    ferry = start(DNSBL)
    with client(ferry, "127.0.0.2") as c:
        r = c.reply()
        assert (r.code, r.enhanced) == (554, "5.7.1")
        assert r.text == ("Service unavailable; client [127.0.0.2] blocked using bl.test; "
                          "see https://bl.test/127.0.0.2")
        assert c.closed_by_server()
    # Not listed; listed but allowed by wl.test; listed with a code outside the range.
    for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
        with client(ferry, source) as c:
            assert c.reply().code == 220, source
            assert c.command(b"QUIT").code == 221


# --- ratelimit: connections -------------------------------------------------------------------


def test_fourth_connection_within_the_minute_gets_421(start: Start) -> None:
    ferry = start("[agents.ratelimit]\nconnections_per_minute = 3\n")
    for _ in range(3):
        with client(ferry, "127.0.0.6") as c:
            assert c.reply().code == 220
    with client(ferry, "127.0.0.6") as c:
        r = c.reply()
        assert (r.code, r.enhanced) == (421, "4.7.0")
        assert r.text == ("Too many connections from [127.0.0.6]: at most 3 a minute; "
                          "try again later")
        assert c.closed_by_server()
    # Another address has its own allowance.
    with client(ferry, "127.0.0.7") as c:
        assert c.reply().code == 220


def test_concurrent_connections_and_their_release(start: Start) -> None:
    ferry = start("[agents.ratelimit]\nconcurrent_connections = 2\n")
    first, second = client(ferry, "127.0.0.8"), client(ferry, "127.0.0.8")
    try:
        assert first.reply().code == 220 and second.reply().code == 220
        with client(ferry, "127.0.0.8") as third:
            r = third.reply()
            assert (r.code, r.enhanced) == (421, "4.7.0")
            assert "at most 2 at once" in r.text
        assert first.command(b"QUIT").code == 221
        first.close()

        def greeted() -> bool:
            with client(ferry, "127.0.0.8") as c:
                return c.reply().code == 220

        # The server counts the closed connection down when it sees it gone.
        wait_for(greeted, timeout=10, what="a connection once one of two closed")
    finally:
        first.close()
        second.close()


# --- ratelimit: messages and recipients ---------------------------------------------------------


def test_message_and_recipient_rates_trip_with_450_and_452(start: Start) -> None:
    ferry = start("[agents.ratelimit]\nmessages_per_minute = 2\nrecipients_per_minute = 3\n")
    with client(ferry, "127.0.0.9") as c:
        assert c.reply().code == 220
        assert c.command(b"EHLO client.test").code == 250
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        for i in range(3):
            assert c.command(b"RCPT TO:<r%d@example.org>" % i).code == 250
        r = c.command(b"RCPT TO:<r9@example.org>")
        assert (r.code, r.enhanced) == (452, "4.7.1")
        assert r.text == ("Too many recipients from [127.0.0.9]: at most 3 a minute; "
                          "try again later")
        assert c.command(b"RSET").code == 250
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RSET").code == 250
        r = c.command(b"MAIL FROM:<a@client.test>")
        assert (r.code, r.enhanced) == (450, "4.7.1")
        assert r.text == ("Too many messages from [127.0.0.9]: at most 2 a minute; "
                          "try again later")
        # The session goes on: the client may try again later (or QUIT).
        assert c.command(b"QUIT").code == 221


# --- ratelimit: AUTH failures -----------------------------------------------------------------


def test_auth_failures_lock_out_across_connections_then_recover(start: Start) -> None:
    ferry = start("[agents.ratelimit]\nauth_failures_per_hour = 2\nauth_lockout = 3\n"
                  "auth_failure_delay = 0\n")
    assert auth_once(ferry, "127.0.0.10", "wrong")[0] == 535
    assert auth_once(ferry, "127.0.0.10", "wrong")[0] == 535
    with client(ferry, "127.0.0.10") as c:
        assert c.reply().code == 220
        c.command(b"EHLO client.test")
        r = c.command(plain("app", "wrong"))
        assert (r.code, r.enhanced) == (421, "4.7.0")
        assert r.text.startswith("Too many AUTH failures from [127.0.0.10] after 2 failures "
                                 "an hour; locked out")
        assert c.closed_by_server()
    # Locked out (for 3 s): the right password too.  Another address is not.
    code, enhanced, text = auth_once(ferry, "127.0.0.10", PASSWORD)
    assert (code, enhanced) == (421, "4.7.0") and "locked out" in text
    assert auth_once(ferry, "127.0.0.11", PASSWORD)[0] == 235
    # The lockout ends.
    assert poll(lambda: auth_once(ferry, "127.0.0.10", PASSWORD)[0] == 235, timeout=10)


def test_failed_auth_answered_after_the_delay_while_others_are_served(start: Start) -> None:
    ferry = start("[agents.ratelimit]\nauth_failure_delay = 3\n")
    with client(ferry, "127.0.0.12") as slow:
        assert slow.reply().code == 220
        slow.command(b"EHLO client.test")
        slow.send(plain("app", "wrong") + b"\r\n")
        # Meanwhile another client is served from greeting to AUTH...
        assert auth_once(ferry, "127.0.0.13", PASSWORD)[0] == 235
        # ...before the failed AUTH has its answer.
        readable, _, _ = select.select([slow.sock], [], [], 0)
        assert not readable
        assert slow.reply().code == 535


def test_authenticated_messages_count_per_user_across_addresses(start: Start) -> None:
    ferry = start("[agents.ratelimit]\nmessages_per_minute = 5\nuser_messages_per_minute = 2\n")
    for source in ("127.0.0.14", "127.0.0.15"):
        with client(ferry, source) as c:
            assert c.reply().code == 220
            c.command(b"EHLO client.test")
            assert c.command(plain("app", PASSWORD)).code == 235
            assert c.command(b"MAIL FROM:<a@client.test>").code == 250
            assert c.command(b"RSET").code == 250
    with client(ferry, "127.0.0.16") as c:
        assert c.reply().code == 220
        c.command(b"EHLO client.test")
        # Unauthenticated, the address's own allowance applies...
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RSET").code == 250
        # ...and once authenticated, the user's, spent from the two other addresses.
        assert c.command(plain("app", PASSWORD)).code == 235
        r = c.command(b"MAIL FROM:<a@client.test>")
        assert (r.code, r.enhanced) == (450, "4.7.1")
        assert r.text == "Too many messages from user app: at most 2 a minute; try again later"

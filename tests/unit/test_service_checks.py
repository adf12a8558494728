"""The decisions of ``ferry serve`` as a service, without a process: start-up warnings,
the refusal to run as root on a public address, the watchdog interval, the default
hostname."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket

import pytest

from engine.config import Config, ReceiveConfig, default_hostname, load_config
from engine.ops.daemon import Account, StartError, check_root, is_loopback
from engine.ops.sdnotify import watchdog_interval
from engine.ops.startup import startup_warnings

USER = Account("ferry", 999, 999, "ferry")


def config(hostname: str = "mx.example.com", users: dict[str, str] | None = None,
           **receive: object) -> Config:
    base = load_config(None, {"--hostname": hostname})
    rc = dataclasses.replace(base.receive[0], **receive)  # type: ignore[arg-type]
    return dataclasses.replace(base, receive=(rc,), users=users or {})


def nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:25", True), ("127.3.4.5:2525", True), ("[::1]:25", True),
    ("0.0.0.0:25", False), ("[::]:25", False), ("192.0.2.1:25", False),
    ("[fe80::1%eth0]:25", False),
])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_a_sane_public_configuration_gives_no_warning() -> None:
    assert startup_warnings(config(), {"default": ["192.0.2.1:25"]}) == []


@pytest.mark.parametrize("hostname", ["localhost", "mx"])
def test_a_hostname_without_a_dot_is_warned_about(hostname: str) -> None:
    (warning,) = startup_warnings(config(hostname), {"default": ["127.0.0.1:2525"]})
    assert f"HOSTNAME {hostname!r} IS NOT A FULLY QUALIFIED DOMAIN NAME" in warning
    assert "greeting and the EHLO name" in warning


def test_relay_networks_wider_than_loopback_on_a_public_listener() -> None:
    wide = config(relay_networks=nets("127.0.0.0/8", "10.0.0.0/8"))
    (warning,) = startup_warnings(wide, {"default": ["0.0.0.0:25"]})
    assert "listens on 0.0.0.0:25 and lets 10.0.0.0/8 relay without AUTH" in warning
    # On the loopback only, or with loopback networks only: nothing to say.
    assert startup_warnings(wide, {"default": ["127.0.0.1:25"]}) == []
    narrow = config(relay_networks=nets("127.0.0.1/32", "::1/128"))
    assert startup_warnings(narrow, {"default": ["[::]:25"]}) == []


def test_auth_offered_without_tls() -> None:
    users = {"app": "scrypt$x"}
    clear = config(users=users, allow_plaintext_auth=True)
    (warning,) = startup_warnings(clear, {"default": ["127.0.0.1:2525"]})
    assert "receive connector default offers AUTH without TLS" in warning
    # Not offered at all (no plaintext AUTH, no users, no mechanisms): no warning.
    assert startup_warnings(config(users=users), {}) == []
    assert startup_warnings(config(allow_plaintext_auth=True), {}) == []
    assert startup_warnings(config(users=users, allow_plaintext_auth=True,
                                   auth_mechanisms=()), {}) == []


def test_tls_on_means_no_clear_auth_warning(tmp_path: object) -> None:
    rc = ReceiveConfig(tls="starttls", allow_plaintext_auth=True)
    cfg = dataclasses.replace(config(users={"app": "scrypt$x"}), receive=(rc,))
    assert startup_warnings(cfg, {}) == []


def test_root_on_a_public_address_needs_user_or_allow_root() -> None:
    with pytest.raises(StartError, match=r"refusing to run as root on 0\.0\.0\.0:25: set "
                                         r"\[server\] user"):
        check_root(0, None, False, ["127.0.0.1:2525", "0.0.0.0:25"])
    check_root(0, None, False, ["127.0.0.1:25", "[::1]:25"])  # loopback only
    check_root(0, USER, False, ["0.0.0.0:25"])  # switches to a user
    check_root(0, None, True, ["0.0.0.0:25"])  # told so
    check_root(1000, None, False, ["0.0.0.0:25"])  # not root


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": pid}) == 0.5
    # Meant for another process (a parent that forked us).
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None


@pytest.mark.parametrize(("fqdn", "expected"), [
    ("mail.example.com", "mail.example.com"), ("mail.example.com.", "mail.example.com"),
    ("vm", "localhost"), ("localhost", "localhost"),
])
def test_default_hostname_is_the_fqdn_or_localhost(monkeypatch: pytest.MonkeyPatch,
                                                   fqdn: str, expected: str) -> None:
    # What the machine answers is not ours to choose: socket.getfqdn stands in for it.
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    assert default_hostname() == expected

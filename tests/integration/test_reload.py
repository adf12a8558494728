"""A reload of the configuration in a running Ferry (``App.reload``, the control channel's
``reload``), over real sockets: under load a route and a limit change with no message
lost and no session dropped; a bad configuration is refused whole; accepted domains,
users and TLS certificates are taken by new sessions; keys that need a restart are named
and keep their running value."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from engine.config import load_config
from engine.ops.control import request, socket_path
from engine.server.auth import hash_password
from engine.testing.rawsmtp import RawClient
from engine.testing.server import RunningFerry
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

A, B = "127.0.31.1", "127.0.31.2"


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    s = CountingSink([A, B], reply_delay=0.02)
    yield s
    s.stop()


def write(path: Path, spool: Path, *, smarthost: str, port: int, max_connections: int,
          extra: str = "", receive: str = "") -> Path:
    """A configuration that sends route.test's mail to ``smarthost`` (a sink address)."""
    path.write_text(f"""\
hostname = "ferry.test"
spool = "{spool}"
{extra}
[queue]
min_free_disk = 0

[[receive]]
name = "default"
listen = ["127.0.0.1:0"]
{receive}

[delivery]
dns = "127.0.0.1:9"

[delivery.domains."route.test"]
max_connections = {max_connections}

[[send]]
name = "out"
address_spaces = ["route.test"]
smarthosts = ["{smarthost}:{port}"]
tls = "off"
""")
    return path


@pytest.fixture
def conf(tmp_path: Path, sink: CountingSink) -> Any:
    path = tmp_path / "ferry.toml"

    def make(smarthost: str = A, max_connections: int = 5, **kw: Any) -> Path:
        return write(path, tmp_path / "spool", smarthost=smarthost, port=sink.port,
                     max_connections=max_connections, **kw)

    return make


@pytest.fixture
def ferry(conf: Any) -> Iterator[RunningFerry]:
    path = conf()
    running = RunningFerry(load_config(path), path=path)
    yield running
    running.stop()


def seq_of(body: bytes) -> int:
    for line in body.split(b"\r\n"):
        if line.startswith(b"X-Seq: "):
            return int(line[7:])
    raise AssertionError(f"no X-Seq in {body[:200]!r}")


def site(ferry: RunningFerry, name: str) -> Any:
    assert ferry.app.scheduler is not None
    return next((s for s in ferry.app.scheduler.snapshot().sites if s.name == name), None)


# --- under load --------------------------------------------------------------------------


class Clients:
    """``count`` client threads, each one SMTP session sending ``per_client`` messages to
    route.test; every 250 is recorded with whether it came after ``reloaded`` was set.
    Each session waits after its first ``before`` messages until ``go`` is set (just
    before the reload is asked for), sends ``during`` more while the reload runs, and
    waits again until ``reloaded`` is set to send the rest: every session stays open
    across the reload and sends both before and after it."""

    def __init__(self, port: int, count: int = 3, per_client: int = 40,
                 before: int = 10, during: int = 5) -> None:
        self.port = port
        self.before = before
        self.during = during
        self.go = threading.Event()
        self.reloaded = threading.Event()
        self.accepted: dict[int, bool] = {}  # seq → sent after the reload
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i, per_client), daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, index: int, count: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                client.ehlo("load.test")
                for n in range(count):
                    if n == self.before:
                        assert self.go.wait(60)
                    elif n == self.before + self.during:
                        assert self.reloaded.wait(60)
                    seq = index * 1000 + n
                    after = self.reloaded.is_set()
                    body = f"Subject: load {seq}\r\nX-Seq: {seq}\r\n\r\nmessage {seq}\r\n"
                    # One session for all its messages: a reload must not end it (421)
                    # or reset it; smtplib raises on either.
                    refused = client.sendmail("load@client.test", [f"u{seq}@route.test"],
                                              body.encode())
                    assert refused == {}
                    with self._lock:
                        self.accepted[seq] = after
                code, _ = client.noop()
                assert code == 250
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads)
        assert self.errors == []


def test_a_reload_under_load_changes_a_route_and_a_limit_and_loses_nothing(
        ferry: RunningFerry, conf: Any, sink: CountingSink) -> None:
    clients = Clients(ferry.port)
    wait_for(lambda: len(clients.accepted) >= 30, 60, "mail flowing before the reload")
    # Held at the sink after the reload, so the new site is busy while it is looked at.
    release = threading.Event()

    async def hold(envelope: Any) -> None:
        while not release.is_set():  # noqa: ASYNC110 - another thread sets it
            await asyncio.sleep(0.01)

    sink.hold = hold
    conf(smarthost=B, max_connections=2)
    clients.go.set()
    reply = request(socket_path(ferry.app.config.spool), {"command": "reload"})
    clients.reloaded.set()
    assert reply["ok"], reply
    assert sorted(reply["applied"]) == ['delivery.domains."route.test".max_connections',
                                        "send[0].smarthosts"]
    assert reply["restart"] == []
    new_site = f"smarthost:{B}:{sink.port}"
    wait_for(lambda: (s := site(ferry, new_site)) is not None and s.workers == 2, 60,
             "the new route's site busy at its new limit")
    assert site(ferry, new_site).max_connections == 2
    release.set()
    clients.join()
    total = len(clients.accepted)
    assert total == 120
    # Each delivery is recorded (and leaves the queue) after the sink's 250.
    wait_for(lambda: ferry.store.count() == 0, 120, "every message delivered")
    delivered = Counter(seq_of(m.body) for m in sink.state.messages)
    assert delivered == Counter(set(clients.accepted)), "each message exactly once"
    where = {seq_of(m.body): m.address for m in sink.state.messages}
    assert any(clients.accepted.values()), "sessions open across the reload sent more"
    assert all(where[seq] == B for seq, after in clients.accepted.items() if after)
    assert any(where[seq] == A for seq, after in clients.accepted.items() if not after)
    # Never more connections to the new route than its new limit.
    assert sink.state.peak[B] <= 2


# --- refused whole ---------------------------------------------------------------------------


def test_a_bad_configuration_is_refused_whole_and_the_old_one_stays(
        ferry: RunningFerry, conf: Any, sink: CountingSink, tmp_path: Path) -> None:
    path = ferry.app.path
    assert path is not None
    before = ferry.app.config
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    cert = trustme.CA().issue_cert("ferry.test")
    cert_path = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cases = {
        "syntax": ("[[send]\nname = 1\n", "invalid TOML"),
        "unknown key": (conf(smarthost=B, extra="relay_netwrks = []").read_text(),
                        "unknown key 'relay_netwrks'"),
        "password hash": (conf(smarthost=B, extra='[users]\napp = "scrypt$not-a-hash"')
                          .read_text(), "users: malformed password hash for user 'app'"),
        "key file": (conf(smarthost=B, receive=f'tls = "starttls"\ncert_file = "{cert_path}"'
                                              f'\nkey_file = "{bad_key}"').read_text(),
                     "receive[0].key_file"),
    }
    for name, (text, expected) in cases.items():
        path.write_text(text)
        result = ferry.call(ferry.app.reload())
        assert not result.ok, name
        assert any(expected in line for line in result.errors), (name, result.errors)
        assert ferry.app.config is before, name
    # The old route still runs.
    with smtplib.SMTP("127.0.0.1", ferry.port) as client:
        client.sendmail("a@client.test", ["x@route.test"], b"Subject: old\r\n\r\nold\r\n")
    wait_for(lambda: sink.state.messages, 30, "the message delivered")
    assert sink.state.messages[0].address == A


# --- what new sessions take -------------------------------------------------------------------


def test_accepted_domains_and_users_apply_to_new_sessions_and_open_ones_stay(
        ferry: RunningFerry, conf: Any) -> None:
    relay_off = 'relay_networks = ["10.0.0.0/8"]\nallow_plaintext_auth = true'
    conf(receive=relay_off, extra='accepted_domains = ["a.test"]')
    assert ferry.call(ferry.app.reload()).ok
    with RawClient("127.0.0.1", ferry.port) as open_before:
        assert open_before.reply().code == 220
        assert open_before.command(b"EHLO before.test").code == 250
        assert open_before.command(b"MAIL FROM:<a@client.test>").code == 250
        assert open_before.command(b"RCPT TO:<x@b.test>").code == 554
        hashed = hash_password("s3cret", n=2**4)
        conf(receive=relay_off, extra=f'accepted_domains = ["a.test", "b.test"]\n'
                                      f'[users]\napp = "{hashed}"')
        result = ferry.call(ferry.app.reload())
        assert result.ok
        assert set(result.applied) == {"accepted_domains", "users.app (added)"}
        # The session open across the reload goes on, under the new accepted domains.
        assert open_before.command(b"RCPT TO:<x@b.test>").code == 250
    with smtplib.SMTP("127.0.0.1", ferry.port) as client:
        client.ehlo("after.test")
        assert client.has_extn("auth")
        assert client.login("app", "s3cret")[0] == 235


def _issue(ca: trustme.CA, name: str, cert_path: Path, key_path: Path) -> None:
    cert = ca.issue_cert(name, "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))


def _served_name(port: int, ca: trustme.CA, implicit: bool) -> str:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.starttls(context=context)
    with client:
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        peer = sock.getpeercert()
        assert peer is not None
        names = [entry[1] for entry in peer.get("subjectAltName", ()) if entry[0] == "DNS"]
        return str(names[0])


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_a_renewed_certificate_at_the_same_path_serves_new_sessions(
        conf: Any, tmp_path: Path, mode: str) -> None:
    ca = trustme.CA()
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    _issue(ca, "one.ferry.test", cert_path, key_path)
    tls = f'tls = "{mode}"\ncert_file = "{cert_path}"\nkey_file = "{key_path}"'
    path = conf(receive=tls)
    ferry = RunningFerry(load_config(path), path=path)
    try:
        assert _served_name(ferry.port, ca, mode == "implicit") == "one.ferry.test"
        _issue(ca, "two.ferry.test", cert_path, key_path)  # renewed: same files
        result = ferry.call(ferry.app.reload())
        assert result.ok and result.applied == ()
        assert _served_name(ferry.port, ca, mode == "implicit") == "two.ferry.test"
        # A key that does not load refuses the reload; the certificate served stays.
        key_path.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        result = ferry.call(ferry.app.reload())
        assert not result.ok
        assert any("receive[0].key_file" in line for line in result.errors), result.errors
        assert _served_name(ferry.port, ca, mode == "implicit") == "two.ferry.test"
    finally:
        ferry.stop()


def test_keys_that_need_a_restart_are_named_and_keep_their_running_value(
        ferry: RunningFerry, conf: Any, tmp_path: Path) -> None:
    text = conf(smarthost=B).read_text().replace('listen = ["127.0.0.1:0"]',
                                                   'listen = ["127.0.0.1:1"]')
    text = text.replace("min_free_disk = 0", "min_free_disk = 1")
    text += '\n[[receive]]\nname = "second"\nlisten = ["127.0.0.1:0"]\n'
    assert ferry.app.path is not None
    ferry.app.path.write_text(text)
    result = ferry.call(ferry.app.reload())
    assert result.ok
    assert result.applied == ("send[0].smarthosts",)
    assert set(result.restart) == {"queue.min_free_disk", "receive[0].listen",
                                   "receive[1] (added: 'second')"}
    assert ferry.app.config.receive[0].listen == (("127.0.0.1", 0),)
    assert ferry.app.config.queue.min_free_disk == 0
    assert len(ferry.app.connectors) == 1
    with smtplib.SMTP("127.0.0.1", ferry.port) as client:  # still where it was
        assert client.noop()[0] == 250
    reply = request(socket_path(ferry.app.config.spool), {"command": "reload"})
    assert reply["ok"] and reply["applied"] == []  # nothing new, the same keys wait
    assert {item["key"] for item in reply["restart"]} == set(result.restart)
    assert all(item["why"] for item in reply["restart"])


def test_a_lowered_limit_lets_running_deliveries_finish_and_then_holds(
        conf: Any, sink: CountingSink) -> None:
    # No follow-on messages: each worker's delivery is one message, held at the sink.
    path = conf(max_connections=5)
    text = path.read_text().replace('dns = "127.0.0.1:9"',
                                    'dns = "127.0.0.1:9"\npipeline_messages = false')
    path.write_text(text)
    passes = [0]  # messages the sink may answer; -1: all of them
    release_all = threading.Event()

    async def gate(envelope: Any) -> None:
        # On the sink's one loop: the test and the decrement never interleave.
        while not release_all.is_set() and passes[0] <= 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if not release_all.is_set():
            passes[0] -= 1

    sink.hold = gate
    ferry = RunningFerry(load_config(path), path=path)
    try:
        with smtplib.SMTP("127.0.0.1", ferry.port) as client:
            for n in range(12):
                client.sendmail("a@client.test", [f"u{n}@route.test"],
                                f"X-Seq: {n}\r\n\r\n{n}\r\n".encode())
        name = f"smarthost:{A}:{sink.port}"
        wait_for(lambda: (s := site(ferry, name)) is not None and s.workers == 5, 60,
                 "five deliveries held at the sink")
        path.write_text(text.replace("max_connections = 5", "max_connections = 2"))
        result = ferry.call(ferry.app.reload())
        assert result.applied == ('delivery.domains."route.test".max_connections',)
        now = site(ferry, name)
        assert (now.max_connections, now.workers) == (2, 5)  # running ones go on
        passes[0] = 3  # three deliveries finish: their workers end, none takes more
        wait_for(lambda: site(ferry, name).workers == 2 and site(ferry, name).waiting > 0,
                 60, "the site down to its new limit with mail waiting")
        assert sink.state.open[A] <= 5
        release_all.set()
        wait_for(lambda: ferry.store.count() == 0, 60, "everything delivered")
        assert Counter(seq_of(m.body) for m in sink.state.messages) == Counter(range(12))
    finally:
        release_all.set()
        ferry.stop()


def test_log_level_and_http_tokens_apply_at_once(
        conf: Any, caplog: pytest.LogCaptureFixture) -> None:
    token = "a" * 32
    quiet = ('[log]\nlevel = "warning"\n[http]\nlisten = ["127.0.0.1:0"]\n'
             'trust_loopback = false\n')
    path = conf(extra=quiet.replace("\n[http]", f'\n[http.tokens.old]\ntoken = "{token}"\n'
                                                "[http]"))
    ferry = RunningFerry(load_config(path), path=path)
    try:
        def mail_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "ferry.mail"]

        with smtplib.SMTP("127.0.0.1", ferry.port) as client:
            client.sendmail("quiet@client.test", ["x@route.test"], b"Subject: q\r\n\r\nq\r\n")
        assert mail_lines() == []  # [log] level = "warning": no mail log lines
        loud = quiet.replace('"warning"', '"info"') + (
            f'[http.tokens.ops]\ntoken = "{"b" * 32}"\nscopes = ["admin"]\n')
        assert ferry.app.http is not None
        reload_url = f"http://{ferry.app.http.addresses[0]}/api/v1/reload"
        assert _post(reload_url, "b" * 32)[0] == 401  # not a token yet
        status, answer = _post(reload_url, token)
        assert (status, answer["status"]) == (403, 403)  # "old" may only read
        conf(extra=loud.replace("\n[http]", f'\n[http.tokens.old]\ntoken = "{token}"\n'
                                            "[http]"))
        result = ferry.call(ferry.app.reload())
        assert set(result.applied) == {"log.level", "http.tokens.ops (added)"}
        assert set(ferry.app.http.config.tokens) == {"old", "ops"}
        # The new admin token reloads over HTTP (nothing left to apply); a refused
        # configuration is a 422 that lists the problems.
        assert _post(reload_url, "b" * 32) == (200, {"ok": True, "applied": [],
                                                     "restart": []})
        conf(extra=loud + "[http.tokens.ops]\n")  # a table twice: not TOML
        status, answer = _post(reload_url, "b" * 32)
        assert (status, answer["title"]) == (422, "Configuration refused")
        assert answer["errors"] and set(ferry.app.http.config.tokens) == {"old", "ops"}
        with smtplib.SMTP("127.0.0.1", ferry.port) as client:
            client.sendmail("loud@client.test", ["x@route.test"], b"Subject: l\r\n\r\nl\r\n")
        wait_for(lambda: any("from=<loud@client.test>" in line for line in mail_lines()), 30,
                 "the mail log line of a message received after the reload")
    finally:
        ferry.stop()


def _post(url: str, token: str) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(
                url, headers={"Authorization": f"Bearer {token}"}) as answer:
            return answer.status, await answer.json(content_type=None)

    return asyncio.run(go())


def test_receive_limits_apply_to_new_sessions_and_open_ones_keep_theirs(
        ferry: RunningFerry, conf: Any) -> None:
    with RawClient("127.0.0.1", ferry.port) as open_before:
        assert open_before.reply().code == 220
        assert open_before.command(b"EHLO before.test").code == 250
        conf(receive="max_recipients = 1")
        result = ferry.call(ferry.app.reload())
        assert result.applied == ("receive[0].max_recipients",)
        with RawClient("127.0.0.1", ferry.port) as new:
            assert new.reply().code == 220
            assert new.command(b"EHLO after.test").code == 250
            assert new.command(b"MAIL FROM:<a@client.test>").code == 250
            assert new.command(b"RCPT TO:<x@route.test>").code == 250
            assert new.command(b"RCPT TO:<y@route.test>").code == 452  # the new limit
        # The session open across the reload keeps the limit it started with.
        assert open_before.command(b"MAIL FROM:<a@client.test>").code == 250
        assert open_before.command(b"RCPT TO:<x@route.test>").code == 250
        assert open_before.command(b"RCPT TO:<y@route.test>").code == 250


def test_queued_mail_takes_the_new_route_and_paused_delivery_resumes(
        conf: Any, sink: CountingSink) -> None:
    path = conf(extra="")
    paused = path.read_text().replace('dns = "127.0.0.1:9"', 'dns = "127.0.0.1:9"\npaused = true')
    path.write_text(paused)
    ferry = RunningFerry(load_config(path), path=path)
    try:
        with smtplib.SMTP("127.0.0.1", ferry.port) as client:
            for n in range(3):
                client.sendmail("a@client.test", [f"q{n}@route.test"],
                                f"X-Seq: {n}\r\n\r\n{n}\r\n".encode())
        assert ferry.store.count() == 3
        path.write_text(paused.replace("paused = true", "paused = false")
                        .replace(f"{A}:{sink.port}", f"{B}:{sink.port}"))
        result = ferry.call(ferry.app.reload())
        assert set(result.applied) == {"delivery.paused", "send[0].smarthosts"}
        wait_for(lambda: ferry.store.count() == 0, 60, "the queued mail delivered")
        assert sorted((seq_of(m.body), m.address) for m in sink.state.messages) == [
            (0, B), (1, B), (2, B)]
    finally:
        ferry.stop()


def test_alert_rules_are_taken_at_a_reload(ferry: RunningFerry, conf: Any) -> None:
    rule = ('[[alert]]\nname = "backlog"\nmetric = "queue_depth"\n'
            'destination = "route.test"\nabove = {}\n')
    alerts = ferry.app.alerts
    assert alerts is not None and not alerts.rules
    path = conf()
    path.write_text(path.read_text() + rule.format(100))
    result = ferry.call(ferry.app.reload())
    assert result.applied == ("alert[0] (added)",)
    assert [(r.name, r.above) for r in alerts.rules] == [("backlog", 100)]
    path.write_text(conf().read_text() + rule.format(5))
    result = ferry.call(ferry.app.reload())
    assert result.applied == ("alert[0].above",)
    assert [(r.name, r.above) for r in alerts.rules] == [("backlog", 5)]


def test_hooks_of_other_parts_get_the_new_configuration(
        ferry: RunningFerry, conf: Any, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, ...]] = []

    async def later(config: Any) -> None:  # e.g. senders to restart
        await asyncio.sleep(0)
        seen.append(config.accepted_domains)

    def broken(config: Any) -> None:
        raise RuntimeError("this part is broken")

    ferry.app.reconfigure += [broken, later]
    conf(extra='accepted_domains = ["hook.test"]')
    result = ferry.call(ferry.app.reload())
    assert result.ok and result.applied == ("accepted_domains",)
    assert seen == [("hook.test",)]  # awaited before the answer, after a broken one
    assert any("failed to take the new configuration" in r.getMessage()
               for r in caplog.records)

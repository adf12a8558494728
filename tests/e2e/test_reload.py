"""``ferry reload`` and SIGHUP against a real ``ferry serve`` process: a route changes
while a session stays open, a bad configuration is refused (exit 2, its problems printed)
and the old one keeps delivering, no server is exit 1, and systemd hears RELOADING=1 then
READY=1."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.e2e.test_cli import FERRY, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
A, B = "127.0.32.1", "127.0.32.2"


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    s = CountingSink([A, B])
    yield s
    s.stop()


class Server:
    """``ferry serve --config FILE`` with its log in a file (a pipe nobody reads would
    fill and stop the server)."""

    def __init__(self, tmp_path: Path, sink: CountingSink, env: dict[str, str] | None = None):
        self.tmp_path = tmp_path
        self.sink = sink
        self.port = free_port()
        self.spool = tmp_path / "spool"
        self.config = tmp_path / "ferry.toml"
        self.write(A)
        self.log = tmp_path / "serve.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [*FERRY, "serve", "--config", str(self.config)], cwd=tmp_path,
                env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
                stdout=subprocess.DEVNULL, stderr=err)
        wait_for_port(self.port, self.proc)

    def write(self, smarthost: str, extra: str = "") -> None:
        self.config.write_text(f"""\
hostname = "ferry.test"
spool = "{self.spool}"
{extra}
[queue]
min_free_disk = 0

[[receive]]
listen = ["127.0.0.1:{self.port}"]

[delivery]
dns = "127.0.0.1:9"

[[send]]
name = "out"
address_spaces = ["route.test"]
smarthosts = ["{smarthost}:{self.sink.port}"]
tls = "off"
""")

    def reload(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FERRY, "reload", *(args or ("--config", str(self.config)))],
                              capture_output=True, text=True, timeout=60, cwd=self.tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def send(self, tag: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.sendmail("a@client.test", [f"{tag}@route.test"],
                            f"Subject: {tag}\r\n\r\n{tag}\r\n".encode())

    def delivered_to(self, tag: str) -> str:
        """The sink address ``tag``'s message reached (waits for it)."""
        def find() -> str | None:
            return next((m.address for m in self.sink.state.messages
                         if m.recipients == [f"{tag}@route.test"]), None)

        return wait_for(find, 30, f"{tag} delivered")

    def logged(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture
def server(tmp_path: Path, sink: CountingSink) -> Iterator[Server]:
    s = Server(tmp_path, sink)
    yield s
    assert s.stop() == 0, s.logged()


class Session:
    """One SMTP session kept open across a reload, sending a message now and then."""

    def __init__(self, port: int) -> None:
        self.client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        self.client.ehlo("open.test")

    def send(self, tag: str) -> None:
        # smtplib raises on a 421 or a closed connection: the session must survive.
        assert self.client.sendmail("a@client.test", [f"{tag}@route.test"],
                                    f"Subject: {tag}\r\n\r\n{tag}\r\n".encode()) == {}

    def close(self) -> None:
        assert self.client.quit()[0] == 221


def test_ferry_reload_changes_a_route_with_a_session_open(server: Server) -> None:
    session = Session(server.port)
    session.send("before")
    assert server.delivered_to("before") == A
    server.write(B)
    out = server.reload()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "reloaded: 1 change applied\n  applied: send[0].smarthosts\n"
    session.send("after")  # the same session, open across the reload
    assert server.delivered_to("after") == B
    session.close()
    assert "configuration reloaded: send[0].smarthosts" in server.logged()


@pytest.mark.parametrize(("text", "expected"), [
    ("[[send]\nname = 1\n", "invalid TOML"),
    (None, "unknown key 'relay_netwrks'"),
    ("key", "receive[0].key_file"),
])
def test_a_bad_configuration_is_refused_with_exit_2_and_the_old_one_delivers(
        server: Server, tmp_path: Path, text: str | None, expected: str) -> None:
    if text is None:
        server.write(B, extra="relay_netwrks = []")
    elif text == "key":
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        trustme = pytest.importorskip("trustme")
        trustme.CA().issue_cert("ferry.test").cert_chain_pems[0].write_to_path(str(cert))
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        server.write(B)
        server.config.write_text(server.config.read_text().replace(
            "[delivery]", f'tls = "starttls"\ncert_file = "{cert}"\nkey_file = "{key}"\n\n'
                          "[delivery]"))
    else:
        server.config.write_text(text)
    # --spool: the server is asked (the file would not even name the spool).
    out = server.reload("--spool", str(server.spool))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "configuration refused; the server runs on with the one it had" in out.stderr
    assert expected in out.stderr
    assert "reload refused" in server.logged() and expected in server.logged()
    server.send("old")
    assert server.delivered_to("old") == A


def test_a_file_that_does_not_load_is_exit_2_without_asking(server: Server) -> None:
    server.config.write_text("[[send]\n")
    out = server.reload()  # --config names the spool through the broken file
    assert out.returncode == 2
    assert "the server was not asked" in out.stderr and "invalid TOML" in out.stderr


def test_without_a_server_ferry_reload_is_exit_1(tmp_path: Path) -> None:
    out = subprocess.run([*FERRY, "reload", "--spool", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1 and out.stdout == ""
    assert "no running ferry serve answers on" in out.stderr


def _next(sock: socket.socket, field: str) -> dict[str, str]:
    """The next notification that carries ``field`` (those before it are dropped)."""
    while True:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if line)
        if field in fields:
            return fields


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@ferry-reload-{uuid.uuid4().hex}"
    sock.bind("\0" + name[1:])
    sock.settimeout(30)
    yield sock, name
    sock.close()


def test_sighup_reloads_like_ferry_reload_and_tells_systemd(
        tmp_path: Path, sink: CountingSink, notify: tuple[socket.socket, str]) -> None:
    sock, name = notify
    server = Server(tmp_path, sink, env={"NOTIFY_SOCKET": name})
    try:
        assert _next(sock, "READY")["READY"] == "1"
        session = Session(server.port)
        # One open session sends before the signal and goes on after the reload.
        errors: list[BaseException] = []
        sent: list[str] = []
        reloaded = threading.Event()

        def stream() -> None:
            try:
                for n in range(30):
                    if n == 5:
                        assert reloaded.wait(60)
                    session.send(f"s{n}")
                    sent.append(f"s{n}")
            except BaseException as exc:
                errors.append(exc)

        writer = threading.Thread(target=stream)
        writer.start()
        wait_for(lambda: len(sent) >= 5, 30, "mail flowing")
        server.write(B)
        server.proc.send_signal(signal.SIGHUP)
        reloading = _next(sock, "RELOADING")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        ready = _next(sock, "READY")
        assert ready["STATUS"].startswith("accepting mail on")
        reloaded.set()
        writer.join(60)
        assert not writer.is_alive() and errors == []
        session.close()
        for tag in sent:
            server.delivered_to(tag)
        assert len(sink.state.messages) == 30  # each once
        server.send("after")
        assert server.delivered_to("after") == B
        # A refused configuration: the old one stays, and systemd hears of it.
        server.write(A, extra="relay_netwrks = []")
        server.proc.send_signal(signal.SIGHUP)
        _next(sock, "RELOADING")
        refused = _next(sock, "READY")
        assert refused["STATUS"].startswith("reload refused")
        wait_for(lambda: "unknown key 'relay_netwrks'" in server.logged(), 30, "the error")
        server.send("still")
        assert server.delivered_to("still") == B
    finally:
        code = server.stop()
    logged: Any = server.logged()
    assert code == 0, logged
    assert "SIGHUP: reloading the configuration" in logged

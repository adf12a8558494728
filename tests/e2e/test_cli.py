"""``ferry serve`` as a real process: embedded default, flags, configuration errors, SIGTERM."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.server.auth import verify_password
from engine.testing.rawsmtp import RawClient
from engine.testing.wait import wait_for

FERRY = [sys.executable, "-m", "engine"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until ``ferry serve`` greets on ``port``.  Not just a connect: the listening
    sockets are bound (and take connections into their backlog) early in the start, the
    control channel after them, and serving last (engine.app's start order), so only the
    220 says that ``ferry queue`` finds the control socket."""
    def serving() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ferry exited: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as client:
                return client.recv(512).startswith(b"220")
        except OSError:
            return False

    wait_for(serving, timeout, f"ferry serving on port {port}")


def start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    return subprocess.Popen([*FERRY, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err.decode()


@contextlib.contextmanager
def port_2525() -> Iterator[None]:
    """The embedded default's port is fixed, and tests/run.sh runs the compiled and the
    pure-Python suites side by side: each holds this lock while its server listens."""
    with open(Path(tempfile.gettempdir()) / "ferry-tests-port-2525.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def test_embedded_default_serves_on_2525_and_stops_cleanly(tmp_path: Path) -> None:
    with port_2525():
        serve_on_the_embedded_default(tmp_path)


def serve_on_the_embedded_default(tmp_path: Path) -> None:
    proc = start(["serve"], tmp_path)
    try:
        wait_for_port(2525, proc)
        with smtplib.SMTP("127.0.0.1", 2525) as client:
            assert client.ehlo()[0] == 250
            # An address literal on loopback: delivery stays on 127/8 and needs no DNS.
            client.sendmail("a@[127.0.0.1]", ["b@[127.0.0.1]"], b"Subject: x\r\n\r\nx\r\n")
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert (tmp_path / "ferry-spool" / "queue" / "data.mdb").exists()
    assert "durability=fsync" in err and "listening on 127.0.0.1:2525" in err


def test_sigterm_sends_421_to_open_sessions_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    proc = start(["serve", "--listen", f"127.0.0.1:{port}", "--spool", str(tmp_path / "s"),
                  "--hostname", "mx.test"], tmp_path)
    try:
        wait_for_port(port, proc)
        with RawClient("127.0.0.1", port) as c:
            assert c.reply().text == "mx.test ESMTP Ferry"
            c.command(b"EHLO client.test")
            proc.send_signal(signal.SIGTERM)
            reply = c.reply()
            assert (reply.code, reply.enhanced) == (421, "4.3.2")
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_flags_override_the_file(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "ferry.toml"
    config.write_text('hostname = "from-file.test"\n[[receive]]\nname = "main"\n'
                      'listen = ["127.0.0.1:1"]\n')
    proc = start(["serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                  "--hostname", "from-flag.test", "--relay-from", "192.0.2.0/24",
                  "--accept-domain", "example.com", "--spool", str(tmp_path / "s")], tmp_path)
    try:
        wait_for_port(port, proc)
        with RawClient("127.0.0.1", port) as c:
            assert c.reply().text.startswith("from-flag.test ")
            c.command(b"EHLO client.test")
            c.command(b"MAIL FROM:<a@client.test>")
            assert c.command(b"RCPT TO:<b@example.net>").code == 554  # loopback may not relay
            assert c.command(b"RCPT TO:<b@example.com>").code == 250
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.parametrize(("content", "key"), [
    ("[[receive]]\nmax_message_size = -5\n", "receive[0].max_message_size"),
    ("recieve = 1\n", "recieve"),
    ("[queue]\ndurability = 'sometimes'\n", "queue.durability"),
    ("[[receive]]\ntls = 'starttls'\n", "receive[0].cert_file"),
])
def test_bad_configuration_exits_non_zero_naming_the_key(tmp_path: Path, content: str,
                                                         key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    proc = subprocess.run([*FERRY, "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and key in proc.stderr


def test_bad_flag_exits_2_naming_the_flag_and_its_key(tmp_path: Path) -> None:
    # A flag's value meets the key's own checker, with the file's problems in one report.
    config = tmp_path / "bad.toml"
    config.write_text("[delivery]\nmax_per_domain = 0\n")
    proc = subprocess.run([*FERRY, "serve", "--config", str(config), "--mx-port", "0",
                           "--log-level", "loud"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "delivery.mx_port (--mx-port): must be a port number" in proc.stderr
    assert "log.level (--log-level): must be one of" in proc.stderr
    assert "delivery.max_per_domain: must be a positive integer (got 0)" in proc.stderr


@pytest.mark.parametrize(("level", "flags", "info"), [
    ("warning", [], False),
    ("info", [], True),
    ("warning", ["--log-level", "info"], True),  # the flag wins over the file
    ("info", ["--log-level", "error"], False),
])
def test_log_level_from_the_file_and_the_flag(tmp_path: Path, level: str, flags: list[str],
                                              info: bool) -> None:
    port = free_port()
    config = tmp_path / "ferry.toml"
    config.write_text(f'[log]\nlevel = "{level}"\n[[receive]]\nlisten = ["127.0.0.1:{port}"]\n')
    proc = start(["serve", "--config", str(config), "--spool", str(tmp_path / "s"), *flags],
                 tmp_path)
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port) as client:
            assert client.noop()[0] == 250
    finally:
        code, err = stop(proc)
    assert code == 0, err
    # "ferry <version> starting" and "listening on" are INFO lines.
    assert ("INFO ferry: receive connector default listening on" in err) is info, err


def test_listen_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*FERRY, "serve", "--listen", f"127.0.0.1:{port}", "--spool",
                               str(tmp_path / "s")], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and "cannot start" in proc.stderr


def test_passwd_prints_a_hash_that_verifies(tmp_path: Path) -> None:
    proc = subprocess.run([*FERRY, "passwd", "--stdin"], input="s3cret\n", capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0
    assert verify_password("s3cret", proc.stdout.strip())


def test_protocol_log_records_commands_and_hides_auth(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "ferry.toml"
    hashed = subprocess.run([*FERRY, "passwd", "--stdin"], input="pw\n", capture_output=True,
                            text=True, timeout=60).stdout.strip()
    config.write_text(f'[users]\napp = "{hashed}"\n[[receive]]\nlisten = ["127.0.0.1:{port}"]\n'
                      "protocol_log = true\nallow_plaintext_auth = true\n")
    proc = start(["serve", "--config", str(config), "--spool", str(tmp_path / "s")], tmp_path)
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo("client.test")
            client.login("app", "pw")
            # An address literal on loopback: delivery stays on 127/8 and needs no DNS.
            client.sendmail("a@[127.0.0.1]", ["b@[127.0.0.1]"], b"Subject: x\r\n\r\nx\r\n")
    finally:
        code, err = stop(proc)
    assert code == 0, err
    text = (tmp_path / "s" / "log" / "protocol-default.log").read_text()
    assert "\t<\tehlo client.test" in text.lower() and "\t>\t250 2.0.0 Ok: queued as " in text
    assert "AUTH PLAIN ****" in text or "AUTH LOGIN" in text
    import base64

    secret = base64.b64encode(b"\0app\0pw").decode()
    assert secret not in text and "pw" not in text.replace("pwd", "")


def test_delivery_flags_dns_mx_port_retry_interval(tmp_path: Path) -> None:
    """The public delivery flags: --dns, --mx-port, --max-per-domain, --retry-interval."""
    from engine.testing.dns import DnsResponder
    from engine.testing.sink import CountingSink

    sink = CountingSink(["127.0.20.1"])
    zone = "$TTL 60\nflags.test. IN MX 10 mx.flags.test.\nmx.flags.test. IN A 127.0.20.1\n"
    sink.state.data_replies["127.0.20.1"] = "451 4.3.0 first try fails"
    port = free_port()
    try:
        with DnsResponder(zone) as responder:
            host, dns_port = responder.address
            proc = start(["serve", "--listen", f"127.0.0.1:{port}", "--spool",
                          str(tmp_path / "s"), "--dns", f"{host}:{dns_port}", "--mx-port",
                          str(sink.port), "--max-per-domain", "1", "--retry-interval", "1"],
                         tmp_path)
            try:
                wait_for_port(port, proc)
                with smtplib.SMTP("127.0.0.1", port) as client:
                    client.sendmail("a@[127.0.0.1]", ["x@flags.test", "y@flags.test"],
                                    b"Subject: x\r\n\r\nx\r\n")
                wait_for(lambda: sink.state.connections["127.0.20.1"], 20, "the first try")
                sink.state.data_replies["127.0.20.1"] = ""  # the retry succeeds
                wait_for(lambda: sink.state.messages, 20, "the retry delivered")
            finally:
                code, err = stop(proc)
        assert code == 0, err
        (msg,) = sink.state.messages
        assert sorted(msg.recipients) == ["x@flags.test", "y@flags.test"]
        assert sink.state.peak["127.0.20.1"] == 1
    finally:
        sink.stop()

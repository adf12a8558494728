"""``ferry serve`` as a system service, as a real process: the spool lock, the switch to
``[server] user`` (as root, with a user the test creates), sd_notify to a datagram socket
the test binds as ``$NOTIFY_SOCKET``, early errors for the spool and the certificates,
and the systemd unit in ``contrib/``."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.ops.control import MAX_PATH, socket_path
from engine.testing.rawsmtp import RawClient
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.e2e.test_cli import FERRY, free_port, start, stop, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


# --- the spool lock ------------------------------------------------------------------------


def test_a_second_server_on_a_spool_too_long_for_a_socket_is_refused(tmp_path: Path) -> None:
    spool = tmp_path / ("s" * 60) / ("p" * 60)
    assert len(os.fsencode(socket_path(spool))) > MAX_PATH  # no control channel there
    port, other = free_port(), free_port()
    first = start(["serve", "--listen", f"127.0.0.1:{port}", "--spool", str(spool)], tmp_path)
    try:
        wait_for_port(port, first)
        assert (spool / "ferry.lock").read_text().strip() == str(first.pid)
        second = subprocess.run([*FERRY, "serve", "--listen", f"127.0.0.1:{other}", "--spool",
                                 str(spool)], capture_output=True, text=True, timeout=60,
                                cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert second.returncode == 1, second.stderr
        assert f"spool {spool} is in use by another ferry serve (pid {first.pid}" \
            in second.stderr
        with smtplib.SMTP("127.0.0.1", port) as client:  # the first one is untouched
            assert client.noop()[0] == 250
    finally:
        code, err = stop(first)
    assert code == 0, err
    # The lock died with its holder: the spool is free again.
    again = start(["serve", "--listen", f"127.0.0.1:{other}", "--spool", str(spool)], tmp_path)
    try:
        wait_for_port(other, again)
    finally:
        assert stop(again)[0] == 0


# --- early errors, before the queue opens ------------------------------------------------


def test_a_spool_that_is_a_file_is_named_in_the_error(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.write_text("not a directory")
    proc = subprocess.run([*FERRY, "serve", "--listen", f"127.0.0.1:{free_port()}",
                           "--spool", str(spool)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    # (``ferry config``'s file checks may find it first, as a configuration error: 2.)
    assert proc.returncode in (1, 2)
    assert f"{spool} exists and is not a directory" in proc.stderr


def test_swapped_certificate_and_key_are_named_before_the_queue_opens(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("ferry.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    config = tmp_path / "ferry.toml"
    config.write_text(f'[[receive]]\nlisten = ["127.0.0.1:{free_port()}"]\ntls = "starttls"\n'
                      f'cert_file = "{key_path}"\nkey_file = "{cert_path}"\n')  # swapped
    spool = tmp_path / "spool"
    proc = subprocess.run([*FERRY, "serve", "--config", str(config), "--spool", str(spool)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode in (1, 2)
    assert "cert_file" in proc.stderr and str(key_path) in proc.stderr
    assert not (spool / "queue").exists()


# --- privileges ----------------------------------------------------------------------------


def _runs_as(user: str, python: str, env: dict[str, str]) -> bool:
    probe = subprocess.run(["runuser", "-u", user, "--", python, "-c", "import engine.app"],
                           env=env, capture_output=True, timeout=60, cwd="/")
    return probe.returncode == 0


@pytest.fixture
def account() -> Iterator[pwd.struct_passwd]:
    """A system user made for the test (and removed after it)."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("useradd and runuser are needed to make a user")
    name = f"ferry{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", name], check=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, timeout=60)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="ferry-service-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _python_for(user: str) -> tuple[str, dict[str, str]]:
    """An interpreter the user may run with this checkout and its packages: the test's own,
    or the system's with the test's site-packages (the test's may live under /root)."""
    import site

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if _runs_as(user, sys.executable, env):
        return sys.executable, env
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system:
        env = dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), *site.getsitepackages()]))
        if _runs_as(user, system, env):
            return system, env
    pytest.skip(f"no Python interpreter that user {user} may run with {ROOT}")


def _uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert line
    return [int(v) for v in line.group(1).split()]


def _children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def test_user_drops_root_before_the_queue_opens_and_mail_flows(
        account: pwd.struct_passwd, world_dir: Path) -> None:
    python, env = _python_for(account.pw_name)
    sink = CountingSink(["127.0.23.1"])
    port = free_port()
    spool = world_dir / "spool"  # made by Ferry, given to the user
    config = world_dir / "ferry.toml"
    config.write_text(f'hostname = "mx.ferry.test"\nspool = "{spool}"\n'
                      f'[queue]\nmin_free_disk = 0\n[server]\nuser = "{account.pw_name}"\n'
                      f'[[receive]]\nlisten = ["127.0.0.1:{port}"]\nprotocol_log = true\n'
                      f'[delivery]\nmx_port = {sink.port}\n')
    proc = subprocess.Popen([python, "-m", "engine", "serve", "--config", str(config)],
                            cwd=world_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("a@[127.0.0.1]", ["b@[127.0.23.1]"], b"Subject: x\r\n\r\nx\r\n")
        wait_for(lambda: sink.state.messages, 30, "the message delivered")
        uid = account.pw_uid
        assert _uids(proc.pid) == [uid] * 4  # real, effective, saved, file system
        writers = _children(proc.pid)
        assert writers and all(_uids(pid) == [uid] * 4 for pid in writers)
    finally:
        code, err = stop(proc)
        sink.stop()
    assert code == 0, err
    assert f"running as user {account.pw_name}" in err
    made = [spool, *spool.rglob("*")]
    assert {p.relative_to(spool).as_posix() for p in made} >= {
        ".", "ferry.lock", "queue", "queue/data.mdb", "log", "log/protocol-default.log"}
    assert {p.as_posix(): p.lstat().st_uid for p in made if p.lstat().st_uid != uid} == {}


def test_a_spool_owned_by_someone_else_is_refused(account: pwd.struct_passwd,
                                                  world_dir: Path) -> None:
    spool = world_dir / "spool"
    (spool / "queue").mkdir(parents=True)  # root's, and in use
    config = world_dir / "ferry.toml"
    config.write_text(f'spool = "{spool}"\n[server]\nuser = "{account.pw_name}"\n'
                      f'[[receive]]\nlisten = ["127.0.0.1:{free_port()}"]\n')
    proc = subprocess.run([*FERRY, "serve", "--config", str(config)], capture_output=True,
                          text=True, timeout=60, cwd=world_dir,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 1
    assert (f"spool {spool} is owned by root, not by server.user {account.pw_name!r}: "
            f"chown -R {account.pw_name}:{account.pw_name} {spool}") in proc.stderr


# --- sd_notify ------------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
        tuple[socket.socket, str]]:
    """A datagram socket bound where systemd's would be, and its $NOTIFY_SOCKET value."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(tmp_path / "notify.sock")
        sock.bind(name)
    else:
        name = f"@ferry-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name[1:])
    sock.settimeout(30)
    yield sock, name
    sock.close()


def _next(sock: socket.socket, field: str) -> dict[str, str]:
    """The next notification that carries ``field`` (those before it are dropped)."""
    while True:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines() if line)
        if field in fields:
            return fields


def test_ready_watchdog_and_stopping_reach_the_notify_socket(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=name, WATCHDOG_USEC="200000")
    proc = subprocess.Popen([*FERRY, "serve", "--listen", f"127.0.0.1:{port}", "--spool",
                             str(tmp_path / "s"), "--hostname", "mx.ferry.test"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready = _next(sock, "READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == f"accepting mail on 127.0.0.1:{port}"
        # Ready means serving: the greeting comes at once.
        with RawClient("127.0.0.1", port) as client:
            assert client.reply().code == 220
        for _ in range(3):  # every 0.1 s, from a task on the loop
            assert _next(sock, "WATCHDOG")["WATCHDOG"] == "1"
        proc.send_signal(signal.SIGTERM)
        stopping = _next(sock, "STOPPING")
        assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("stopping")
    finally:
        code, err = stop(proc)
    assert code == 0, err


# --- the systemd unit --------------------------------------------------------------------


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (tests/run.sh installs systemd)")
    unit = (ROOT / "contrib" / "ferry.service").read_text()
    assert "\nType=notify\n" in unit and "\nExecStart=/opt/ferry/bin/ferry serve " in unit
    # verify checks that the command exists: point it at the Ferry this test runs.
    assert "\nExecReload=/opt/ferry/bin/ferry reload " in unit
    here = unit.replace("ExecStart=/opt/ferry/bin/ferry serve",
                        f"ExecStart={sys.executable} -m engine serve").replace(
        "ExecReload=/opt/ferry/bin/ferry reload", f"ExecReload={sys.executable} -m engine reload")
    path = tmp_path / "ferry.service"
    path.write_text(here)
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings: there must be none about the unit.
    assert str(path) not in proc.stderr and "ferry.service" not in proc.stderr, proc.stderr

"""Interop with independent SMTP clients: swaks and Postfix's smtp-source.

Both are installed by tests/run.sh (Debian packages swaks and postfix); they speak to a
Ferry on 127.0.0.1 and the queue database is checked afterwards.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from engine.server.auth import hash_password
from engine.testing.wait import wait_for
from tests.integration.conftest import StartFerry

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(autouse=True)
def _need_tools() -> None:
    # tests/run.sh installs both; a missing tool is a broken set-up, not a reason to skip
    assert shutil.which("swaks"), "swaks is not installed (tests/run.sh installs it)"
    assert shutil.which(SMTP_SOURCE), "smtp-source is not installed (tests/run.sh installs it)"


def test_swaks_starttls_auth(start_ferry: StartFerry, cert_files: tuple[object, object]) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="starttls", cert_file=cert, key_file=key,
                        users={"app": hash_password("s3cret")})
    proc = run(["swaks", "--server", f"{ferry.host}:{ferry.port}", "--helo", "client.test",
                "--from", "a@client.test", "--to", "b@example.net", "--tls",
                "--auth", "PLAIN", "--auth-user", "app", "--auth-password", "s3cret"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "250 2.0.0 Ok: queued as" in proc.stdout
    assert "235 2.7.0" in proc.stdout
    assert ferry.store.count() == 1


def test_swaks_bad_password_is_refused(start_ferry: StartFerry,
                                       cert_files: tuple[object, object]) -> None:
    cert, key = cert_files
    ferry = start_ferry(tls="starttls", cert_file=cert, key_file=key,
                        users={"app": hash_password("s3cret")})
    proc = run(["swaks", "--server", f"{ferry.host}:{ferry.port}", "--from", "a@client.test",
                "--to", "b@example.net", "--tls", "--auth", "LOGIN", "--auth-user", "app",
                "--auth-password", "wrong"])
    assert proc.returncode != 0 and "535 5.7.8" in proc.stdout
    assert ferry.store.count() == 0


@pytest.mark.parametrize("per_connection", [False, True], ids=["1-per-conn", "many-per-conn"])
def test_smtp_source_load(start_ferry: StartFerry, per_connection: bool) -> None:
    ferry = start_ferry()
    cmd = [SMTP_SOURCE, "-s", "10", "-m", "200", "-l", "2048", "-f", "a@client.test",
           "-t", "b@example.net", "-M", "client.test"]
    if per_connection:
        cmd.append("-d")
    proc = run([*cmd, f"{ferry.host}:{ferry.port}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: ferry.store.count() >= 200, 10, "200 messages queued")
    assert ferry.store.count() == 200

"""``ferry config check|show``, the start-up file checks of ``ferry serve``, ``--config`` for
``ferry queue``, durations with units in a running server, and output to a closed pipe:
all as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trustme

from engine.config import load_config
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, Recipient
from engine.server.auth import hash_password
from engine.testing.rawsmtp import RawClient
from tests.e2e.test_cli import free_port, start, stop, wait_for_port

FERRY = [sys.executable, "-m", "engine"]
ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))


def ferry(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.crt/a.key, a pair, and b.key, the key of another certificate."""
    where = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    a, b = ca.issue_cert("a.test"), ca.issue_cert("b.test")
    a.cert_chain_pems[0].write_to_path(str(where / "a.crt"))
    a.private_key_pem.write_to_path(str(where / "a.key"))
    b.private_key_pem.write_to_path(str(where / "b.key"))
    ca.cert_pem.write_to_path(str(where / "ca.crt"))
    return where


def config_file(tmp_path: Path, pems: Path, cert: str = "a.crt", key: str = "a.key",
                extra: str = "", spool: str = "spool") -> Path:
    path = tmp_path / "ferry.toml"
    path.write_text(f"""\
hostname = "mx.example.org"
spool = "{spool}"
{extra}
[[receive]]
listen = ["127.0.0.1:0"]
tls = "starttls"
cert_file = "{pems / cert}"
key_file = "{pems / key}"
""")
    return path


def test_check_good_file(tmp_path: Path, pems: Path) -> None:
    out = ferry("config", "check", "--config", str(config_file(tmp_path, pems)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "" and "is good" in out.stderr


def test_check_lists_every_load_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('recieve = 1\n[queue]\nmap_size = "1GiB"\nmax_map_size = "1MiB"\n'
                    '[[receive]]\nmax_errors = 0\n'
                    '[delivery]\nretry_interval = "5 minutes"\n')
    out = ferry("config", "check", "--config", str(path), "--mx-port", "0")
    assert out.returncode == 2
    lines = out.stdout.splitlines()
    for start_ in ("queue.map_size: ", "receive[0].max_errors: ", "delivery.retry_interval: ",
                   "delivery.mx_port (--mx-port): ",
                   "unknown key 'recieve' (did you mean 'receive'?)"):
        assert any(line.startswith(start_) for line in lines), (start_, lines)
    assert len(lines) == 5 and "5 problems" in out.stderr


def test_check_across_connectors(tmp_path: Path) -> None:
    # Checks across tables run once every table is valid (engine.config._check_config).
    path = tmp_path / "bad.toml"
    path.write_text('[[receive]]\nname = "a"\nlisten = ["127.0.0.1:25"]\n'
                    '[[receive]]\nname = "a"\nlisten = ["0.0.0.0:25"]\n')
    out = ferry("config", "check", "--config", str(path))
    assert out.returncode == 2
    assert out.stdout.splitlines() == [
        'receive[1].name: "a" is already the name of receive[0] (names must be unique)',
        "receive[1].listen[0]: 0.0.0.0:25 collides with receive[0].listen[0]",
    ]


def test_check_mismatched_key_names_both_files(tmp_path: Path, pems: Path) -> None:
    out = ferry("config", "check", "--config", str(config_file(tmp_path, pems, key="b.key")))
    assert out.returncode == 2
    assert out.stdout == (f"receive[0].key_file: the private key in {pems / 'b.key'} does not "
                          f"belong to the certificate in {pems / 'a.crt'}\n")


def test_check_swapped_pair_says_so(tmp_path: Path, pems: Path) -> None:
    out = ferry("config", "check", "--config",
                str(config_file(tmp_path, pems, cert="a.key", key="a.crt")))
    assert out.returncode == 2
    assert out.stdout == (f"receive[0].cert_file: {pems / 'a.key'} holds no PEM certificate "
                          "(are cert_file and key_file swapped?)\n")
    assert "PEM lib" not in out.stdout + out.stderr


def test_check_spool_that_is_a_file(tmp_path: Path, pems: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = ferry("config", "check", "--config", str(config_file(tmp_path, pems, spool="afile")))
    assert out.returncode == 2
    assert out.stdout == f"spool: {tmp_path / 'afile'} exists and is not a directory\n"


def test_spool_flag_is_named(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for command in ("serve", "config check"):
        out = ferry(*command.split(), "--spool", str(tmp_path / "afile"), cwd=tmp_path)
        assert out.returncode == 2
        assert f"spool (--spool): {tmp_path / 'afile'} exists and is not a directory" in (
            out.stdout + out.stderr), command


def test_check_cross_field_advice(tmp_path: Path, pems: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(f'users = {{ alice = "{hash_password("pw")}" }}\n'
                    f'[[receive]]\nrequire_auth = true\ncert_file = "{pems / "a.crt"}"\n'
                    f'[delivery]\nca_file = "{pems / "a.key"}"\n')
    out = ferry("config", "check", "--config", str(path), "--retry-interval", "5h")
    assert out.returncode == 2
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"delivery.ca_file: {pems / 'a.key'} holds no PEM CA")
    assert lines[1].startswith("receive[0].require_auth: AUTH is never offered")
    assert lines[2:] == [
        'warning: receive[0].cert_file: not used while tls = "off"',
        "warning: users: no receive connector offers AUTH, so these accounts cannot log in "
        "(AUTH needs tls on the connector, or allow_plaintext_auth = true, and "
        "auth_mechanisms)",
        "warning: delivery.retry_interval (--retry-interval): larger than "
        "delivery.max_retry_interval (18000 > "
        "14400 seconds): every retry waits max_retry_interval",
    ]


def test_serve_stops_before_the_queue_opens(tmp_path: Path, pems: Path) -> None:
    # Swapped files used to fail with "[SSL] PEM lib" after the queue was open.
    path = config_file(tmp_path, pems, cert="a.key", key="a.crt")
    out = ferry("serve", "--config", str(path))
    assert out.returncode == 2
    assert "are cert_file and key_file swapped?" in out.stderr and "PEM lib" not in out.stderr
    assert not (tmp_path / "spool").exists()
    (tmp_path / "afile").write_text("x")
    out = ferry("serve", "--config", str(config_file(tmp_path, pems, spool="afile")))
    assert out.returncode == 2
    assert f"spool: {tmp_path / 'afile'} exists and is not a directory" in out.stderr


def test_show_masks_secrets_and_loads_again(tmp_path: Path, pems: Path) -> None:
    hashed = hash_password("hunter2-secret")
    path = config_file(tmp_path, pems, extra=f'[users]\nalice = "{hashed}"\n'
                       '[[send]]\nname = "out"\naddress_spaces = ["*"]\n'
                       'smarthosts = ["[::1]:587"]\nauth_user = "u"\n'
                       'auth_password = "pa55-secret"\n'
                       '[delivery.domains."gmail.com"]\nmax_connections = 3\n')
    out = ferry("config", "show", "--config", str(path), "--hostname", "flag.example",
                "--retry-interval", "2m")
    assert out.returncode == 0, out.stderr
    assert hashed not in out.stdout and "pa55-secret" not in out.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(out.stdout)
    again = load_config(shown)
    first = load_config(path, {"--hostname": "flag.example", "--retry-interval": "2m"})
    assert again.hostname == "flag.example" and again.delivery.retry_interval == 120.0
    assert again.users.keys() == first.users.keys() and again.users["alice"] != hashed
    assert again.send[0].auth_password != "pa55-secret"
    masked = {"users": again.users, "send": again.send}
    assert again == type(first)(**{**first.__dict__, **masked})

    as_json = ferry("config", "show", "--config", str(path), "--json")
    data = json.loads(as_json.stdout)
    assert data == tomllib.loads(out.stdout.replace("flag.example", "mx.example.org")
                                 .replace("retry_interval = 120.0", "retry_interval = 300.0"))
    assert data["receive"][0]["listen"] == ["127.0.0.1:0"]


def test_show_bad_file_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[queue]\nmax_pending = 0\n")
    out = ferry("config", "show", "--config", str(path))
    assert out.returncode == 2 and "queue.max_pending: must be a positive integer" in out.stderr


def test_queue_reads_the_spool_from_config(tmp_path: Path) -> None:
    spool = tmp_path / "elsewhere"
    store = LmdbQueue(spool / "queue", min_free_disk=0)
    try:
        store.enqueue_sync(Envelope("a@client.test", [Recipient("x@one.test", "one.test")]),
                           b"Subject: x\r\n\r\nx\r\n")
    finally:
        store.close_sync()
    path = tmp_path / "ferry.toml"
    path.write_text('spool = "elsewhere"\n')
    out = ferry("queue", "--config", str(path), "stats")
    assert out.returncode == 0, out.stderr
    assert "messages: 1" in out.stdout
    # --spool still wins over the file's.
    out = ferry("queue", "--config", str(path), "--spool", str(tmp_path / "none"), "stats")
    assert out.returncode == 1 and str(tmp_path / "none") in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("spool = 5\n")
    out = ferry("queue", "--config", str(bad), "stats")
    assert out.returncode == 2 and "spool: must be a non-empty path" in out.stderr


def test_server_runs_with_durations_in_units(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "ferry.toml"
    path.write_text(f'spool = "s"\n[[receive]]\nlisten = ["127.0.0.1:{port}"]\n'
                    'idle_timeout = "1s"\ndata_timeout = "10m"\n'
                    '[delivery]\nretry_interval = "30s"\nmax_queue_lifetime = "5d"\n'
                    'delay_notice_after = "4h"\n')
    proc = start(["serve", "--config", str(path)], tmp_path)
    try:
        wait_for_port(port, proc)
        with RawClient("127.0.0.1", port, timeout=30) as client:
            assert client.reply().code == 220
            # idle_timeout = "1s": the server gives up on a silent client (RFC 5321 §4.5.3.2.7
            # is what the default honours; a unit is what this checks).
            assert client.reply().code == 421
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.mark.parametrize("args", [["--version"], ["config", "show"], ["config", "show", "--json"],
                                  ["queue", "stats"], ["queue", "list"]])
def test_closed_pipe_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    store = LmdbQueue(tmp_path / "ferry-spool" / "queue", min_free_disk=0)
    store.close_sync()
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: every write fails (EPIPE)
    try:
        proc = subprocess.run([*FERRY, *args], stdout=write, stderr=subprocess.PIPE,
                              timeout=60, cwd=tmp_path, env=ENV)
    finally:
        os.close(write)
    assert proc.stderr == b""
    assert proc.returncode == 141


def test_shell_pipe_to_head(tmp_path: Path) -> None:
    out = subprocess.run(["bash", "-c", f"{' '.join(FERRY)} config show --json | head -1"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=ENV)
    assert out.returncode == 0 and out.stdout == "{\n" and out.stderr == ""


def test_check_encrypted_key(tmp_path: Path, pems: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((pems / "a.key").read_bytes(), password=None)
    (tmp_path / "enc.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    path = config_file(tmp_path, pems, key=str(tmp_path / "enc.key"))
    out = ferry("config", "check", "--config", str(path))
    assert out.returncode == 2
    assert out.stdout == (f"receive[0].key_file: {tmp_path / 'enc.key'} is encrypted with a "
                          "passphrase; Ferry needs it unencrypted\n")

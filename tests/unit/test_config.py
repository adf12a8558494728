"""engine.config: defaults, a full file, command-line flags, and an error message for every
mistake."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from pathlib import Path

import pytest

from engine.config import (
    DEFAULT_TOML,
    FLAGS,
    TABLES,
    Config,
    ConfigError,
    DeliveryConfig,
    LocalConfig,
    LogConfig,
    QueueConfig,
    ReceiveConfig,
    SendConfig,
    load_config,
    parse_hostport,
    parse_size,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
HASH = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def write(tmp_path: Path, text: str, name: str = "ferry.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str, flags: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), flags)
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def certs(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "certs").mkdir(exist_ok=True)
    cert, key = tmp_path / "certs" / "mx.pem", tmp_path / "certs" / "mx.key"
    cert.write_text("cert")
    key.write_text("key")
    (tmp_path / "certs" / "ca.pem").write_text("ca")
    # [[dkim_sign]] key files (loading checks that they exist; preflight loads them).
    (tmp_path / "certs" / "dkim-rsa.pem").write_text("key")
    (tmp_path / "certs" / "dkim-ed25519.pem").write_text("key")
    return cert, key


# --- the default --------------------------------------------------------------------------


def test_embedded_default() -> None:
    config = load_config(None)
    assert config.hostname == socket.getfqdn()
    assert config.spool == Path("ferry-spool")
    assert config.accepted_domains == ()
    assert dict(config.users) == {}
    assert config.queue == QueueConfig()
    assert config.queue.durability == "fsync"
    assert config.queue.map_size == 256 << 20
    assert config.queue.max_map_size == 64 << 30
    assert config.queue.min_free_disk == 512 << 20
    assert (config.queue.max_pending, config.queue.batch_limit) == (10_000, 2_000)
    (rc,) = config.receive
    assert rc.name == "default"
    assert rc.listen == (("127.0.0.1", 2525),)
    assert rc.relay_networks == (net("127.0.0.0/8"), net("::1/128"))
    assert rc.remote_ranges == (net("0.0.0.0/0"), net("::/0"))
    assert rc.tls == "off" and rc.cert_file is None and rc.key_file is None
    assert rc.auth_mechanisms == ("PLAIN", "LOGIN")
    assert rc.allow_plaintext_auth is False and rc.relay_authenticated is True
    assert rc.max_message_size == 35 << 20
    assert (rc.max_recipients, rc.max_messages_per_connection) == (1000, 1000)
    assert (rc.max_connections, rc.max_connections_per_ip, rc.max_errors) == (2000, 100, 20)
    assert (rc.idle_timeout, rc.data_timeout, rc.min_data_rate) == (300.0, 600.0, 1024)
    assert (rc.max_auth_failures, rc.max_received_headers) == (3, 100)
    assert rc.bare_eol == "reject" and rc.protocol_log is False and rc.greeting == ""
    assert (rc.max_command_line, rc.max_text_line, rc.strict_pipelining) == (512, 1000, True)
    assert config.delivery == DeliveryConfig()
    assert config.delivery.smarthost is None and config.delivery.dns is None
    assert (config.delivery.mx_port, config.delivery.max_per_domain) == (25, 20)
    assert config.delivery.retry_interval == 300.0 and config.delivery.paused is False
    assert config.log == LogConfig(level="info", protocol_log_dir=Path("ferry-spool/log"))


def test_default_equals_dataclass_defaults() -> None:
    # The embedded TOML and the dataclass defaults describe the same configuration.
    expected = Config(hostname=socket.getfqdn())
    loaded = load_config(None)
    assert dataclasses.replace(loaded, log=LogConfig()) == expected


def test_the_queue_writers_own_defaults_are_the_queue_sections() -> None:
    """engine.queue keeps its defaults as literals (its writer process must not import the
    configuration's validation, ~0.13 s a start): they are [queue]'s, key for key."""
    from engine.config import QueueConfig
    from engine.queue.lmdb_txn import WriterParams

    queue, writer = QueueConfig(), WriterParams("unused")
    shared = {f.name for f in dataclasses.fields(WriterParams)} & {
        f.name for f in dataclasses.fields(QueueConfig)}
    assert shared >= {"durability", "map_size", "min_free_disk", "commit_linger"}
    assert {k: getattr(writer, k) for k in shared} == {k: getattr(queue, k) for k in shared}


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.receive == (ReceiveConfig(),)
    # The default spool is not from the file, so it stays relative to the cwd.
    assert config.spool == Path("ferry-spool")
    assert config.log.protocol_log_dir == Path("ferry-spool/log")


def test_banner() -> None:
    assert ReceiveConfig().banner("mx.example") == "mx.example ESMTP Ferry"
    assert ReceiveConfig(greeting="mx.example ready").banner("x") == "mx.example ready"


def test_dataclasses_are_frozen_and_plain() -> None:
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.users["eve"] = HASH  # type: ignore[index]
    for part in (config, config.queue, config.receive[0], config.delivery, config.log):
        assert dataclasses.is_dataclass(part)
        assert "pydantic" not in type(part).__module__


# --- a full file ----------------------------------------------------------------------------


FULL = f"""
hostname = "MX1.Example.COM."
spool = "spool"
accepted_domains = ["Example.COM.", "*.example.org", "example.com"]

[users]
app = "{HASH}"
"bob@example.com" = "{HASH}"

[queue]
durability = "os"
map_size = "1GiB"
max_map_size = "8GiB"
min_free_disk = 0
max_pending = 500
batch_limit = 100

[[receive]]
name = "submission"
listen = ["0.0.0.0:587", "[::]:587"]
remote_ranges = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
tls = "required"
cert_file = "certs/mx.pem"
key_file = "certs/mx.key"
auth_mechanisms = ["plain"]
allow_plaintext_auth = true
relay_networks = []
relay_authenticated = false
max_message_size = "50MB"
max_recipients = 50
max_messages_per_connection = 10
max_connections = 100
max_connections_per_ip = 5
max_errors = 3
idle_timeout = 60
data_timeout = 120.5
min_data_rate = 0
max_auth_failures = 1
max_received_headers = 30
bare_eol = "normalize"
protocol_log = true
greeting = "mx1.example.com Submission"
max_command_line = 2048
max_text_line = 1000
strict_pipelining = false

[[receive]]
name = "mx"
listen = ["127.0.0.1:25"]

[delivery]
smarthost = "relay.example.net:587"
dns = "[::1]:5353"
mx_port = 2525
max_per_domain = 4
retry_interval = 30
paused = true
pipeline_messages = false

[log]
level = "debug"
protocol_log_dir = "/var/log/ferry"
"""


def test_full_file(tmp_path: Path) -> None:
    cert, key = certs(tmp_path)
    config = load_config(write(tmp_path, FULL))
    assert config.hostname == "MX1.Example.COM"
    assert config.spool == tmp_path / "spool"
    assert config.accepted_domains == ("example.com", "*.example.org")
    assert dict(config.users) == {"app": HASH, "bob@example.com": HASH}
    assert config.queue == QueueConfig("os", 1 << 30, 8 << 30, 0, 500, 100)
    sub, mx = config.receive
    assert sub.name == "submission"
    assert sub.listen == (("0.0.0.0", 587), ("::", 587))
    assert sub.remote_ranges == (net("10.0.0.0/8"), net("2001:db8::/32"), net("192.0.2.7/32"))
    assert (sub.tls, sub.cert_file, sub.key_file) == ("required", cert, key)
    assert sub.auth_mechanisms == ("PLAIN",)
    assert sub.allow_plaintext_auth is True
    assert sub.relay_networks == () and sub.relay_authenticated is False
    assert sub.max_message_size == 50_000_000
    assert (sub.max_recipients, sub.max_messages_per_connection) == (50, 10)
    assert (sub.max_connections, sub.max_connections_per_ip, sub.max_errors) == (100, 5, 3)
    assert (sub.idle_timeout, sub.data_timeout, sub.min_data_rate) == (60.0, 120.5, 0)
    assert isinstance(sub.idle_timeout, float)
    assert (sub.max_auth_failures, sub.max_received_headers) == (1, 30)
    assert (sub.bare_eol, sub.protocol_log) == ("normalize", True)
    assert sub.greeting == "mx1.example.com Submission"
    assert sub.banner("ignored") == "mx1.example.com Submission"
    assert (sub.max_command_line, sub.max_text_line, sub.strict_pipelining) == (2048, 1000, False)
    assert mx == ReceiveConfig(name="mx", listen=(("127.0.0.1", 25),))
    assert config.delivery == DeliveryConfig(
        smarthost=("relay.example.net", 587), dns=("::1", 5353), mx_port=2525,
        max_per_domain=4, retry_interval=30.0, paused=True, pipeline_messages=False,
    )  # fmt: skip
    assert config.log == LogConfig("debug", Path("/var/log/ferry"))


def test_relative_paths_follow_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    certs(tmp_path / "etc")
    text = """spool = "q"
[[receive]]
tls = "starttls"
cert_file = "certs/mx.pem"
key_file = "certs/mx.key"
"""
    path = write(tmp_path / "etc", text)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/ferry.toml"))
    assert config.spool == tmp_path / "etc" / "q"
    assert config.log.protocol_log_dir == tmp_path / "etc" / "q" / "log"
    assert config.receive[0].cert_file == tmp_path / "etc" / "certs" / "mx.pem"
    assert load_config(str(path)) == config


def test_docs_example_loads(tmp_path: Path) -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks, "docs/configuration.md has no ```toml block"
    example = max(blocks, key=len)
    certs(tmp_path)
    config = load_config(write(tmp_path, example))
    assert len(config.receive) >= 2
    assert config.users
    assert [sc.name for sc in config.send] == ["partner", "internet"]
    assert len(config.local) == 2
    # "This file sets every key" (that the reference documents every key, and only the
    # declared ones, is tests/integration/test_config_seam.py's check).
    for table, cls in TABLES.items():
        for f in dataclasses.fields(cls):
            pattern = rf"^{f.name} =|^\[+(?:[a-z.]+\.)?{f.name}[\].]"
            assert re.search(pattern, example, re.M), f"the example does not set {table} {f.name}"


def test_every_dataclass_key_is_accepted_in_the_file(tmp_path: Path) -> None:
    # The private models and the public dataclasses must name the same keys.
    for f in dataclasses.fields(ReceiveConfig):
        found = problems(tmp_path, f"[[receive]]\n{f.name} = {{ x = 1 }}\n")
        assert found and all(p.startswith(f"receive[0].{f.name}: ") for p in found), found
    for table, cls in (("queue", QueueConfig), ("delivery", DeliveryConfig),
                       ("log", LogConfig)):  # fmt: skip
        for f in dataclasses.fields(cls):
            found = problems(tmp_path, f"[{table}]\n{f.name} = {{ x = 1 }}\n")
            # a table of tables (delivery.domains) reports the bad entry inside it
            prefixes = (f"{table}.{f.name}: ", f"{table}.{f.name}.x: ")
            assert found and all(p.startswith(prefixes) for p in found), found


# --- overrides ------------------------------------------------------------------------------


TWO = """
accepted_domains = ["example.com"]
[[receive]]
name = "one"
listen = ["127.0.0.1:2525"]
[[receive]]
name = "two"
listen = ["127.0.0.1:2526"]
relay_networks = ["10.0.0.0/8"]
"""


def test_every_flag(tmp_path: Path) -> None:
    flags: dict[str, object] = {
        "--listen": ["[::1]:2600", "127.0.0.2:0"],
        "--spool": "other-spool",
        "--relay-from": ["192.0.2.0/24"],
        "--accept-domain": ["Example.NET", "example.com"],
        "--smarthost": "relay.example:587",
        "--hostname": "mx.example",
        "--dns": "127.0.0.1:5353",
        "--mx-port": "2525",
        "--max-per-domain": "3",
        "--retry-interval": "1.5",
        "--log-level": "debug",
        "--http": ["127.0.0.1:8025"],
        "--workers": "3",
    }
    assert set(flags) == set(FLAGS)
    config = load_config(write(tmp_path, TWO), flags)
    one, two = config.receive
    assert one.listen == (("::1", 2600), ("127.0.0.2", 0))
    assert one.relay_networks == (net("192.0.2.0/24"),)
    # Only the FIRST connector changes.
    assert two.listen == (("127.0.0.1", 2526),)
    assert two.relay_networks == (net("10.0.0.0/8"),)
    assert config.spool == Path.cwd() / "other-spool"  # relative to the cwd, not the file
    assert config.log == LogConfig(level="debug", protocol_log_dir=Path.cwd() / "other-spool/log")
    assert config.accepted_domains == ("example.com", "example.net")
    assert config.hostname == "mx.example"
    assert config.http.listen == (("127.0.0.1", 8025),)
    assert config.server.workers == 3
    assert load_config(None, {"--workers": "auto"}).server.workers == len(os.sched_getaffinity(0))
    for bad in ("0", "many", "257"):
        with pytest.raises(ConfigError, match=r"server\.workers \(--workers\): must be "):
            load_config(None, {"--workers": bad})
    assert config.delivery == DeliveryConfig(
        smarthost=("relay.example", 587), dns=("127.0.0.1", 5353), mx_port=2525,
        max_per_domain=3, retry_interval=1.5,
    )  # fmt: skip


def test_no_flags_change_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, TWO)
    assert load_config(path, {}) == load_config(path)


def test_flags_on_default() -> None:
    config = load_config(None, {"--listen": ["127.0.0.1:0"], "--relay-from": ["::/0"],
                                "--spool": "s"})
    assert config.receive[0].listen == (("127.0.0.1", 0),)
    assert config.receive[0].relay_networks == (net("::/0"),)
    assert config.spool == Path("s")  # no file: stays relative to the cwd


def test_flag_makes_the_first_connector(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[delivery]\nmx_port = 26\n"),
                         {"--listen": ["127.0.0.1:0"], "--mx-port": "2525"})
    assert config.receive == (ReceiveConfig(listen=(("127.0.0.1", 0),)),)
    assert config.delivery.mx_port == 2525


def test_bad_flags_are_named(tmp_path: Path) -> None:
    flags: dict[str, object] = {
        "--listen": ["bad host:25", "127.0.0.1:70000"],
        "--spool": "",
        "--relay-from": ["10.0.0.1/8"],
        "--accept-domain": ["-bad.example"],
        "--smarthost": "relay.example:0",
        "--hostname": "under_score",
        "--dns": "ns.example",
        "--mx-port": "0",
        "--max-per-domain": "-1",
        "--retry-interval": "soon",
        "--log-level": "verbose",
    }
    found = problems(tmp_path, TWO, flags)
    for key, flag in (("receive[0].listen[0]", "--listen"), ("receive[0].listen[1]", "--listen"),
                      ("spool", "--spool"), ("receive[0].relay_networks[0]", "--relay-from"),
                      ("accepted_domains[1]", "--accept-domain"),
                      ("delivery.smarthost", "--smarthost"), ("hostname", "--hostname"),
                      ("delivery.dns", "--dns"), ("delivery.mx_port", "--mx-port"),
                      ("delivery.max_per_domain", "--max-per-domain"),
                      ("delivery.retry_interval", "--retry-interval"),
                      ("log.level", "--log-level")):  # fmt: skip
        assert any(p.startswith(f"{key} ({flag}): ") for p in found), (key, found)
    assert len(found) == 12
    text = "\n".join(found)
    # The same checkers and messages as in the file.
    assert 'did you mean "10.0.0.0/8"?' in text
    assert "delivery.max_per_domain (--max-per-domain): must be a positive integer (got -1)" in text
    assert 'delivery.retry_interval (--retry-interval): must be a positive number of seconds ' \
           'or a duration such as "30s", "5m", "4h", "5d" (got "soon")' in text
    assert 'log.level (--log-level): must be one of "debug", "info", "warning", "error" ' \
           '(got "verbose")' in text


def test_flag_listen_collides_with_second_connector(tmp_path: Path) -> None:
    found = problems(tmp_path, TWO, {"--listen": ["127.0.0.1:2526"]})
    assert found == ["receive[1].listen[0]: 127.0.0.1:2526 collides with receive[0].listen[0]"]


def test_flag_and_file_problems_together(tmp_path: Path) -> None:
    found = problems(tmp_path, "[delivery]\nmax_per_domain = 0\n", {"--mx-port": "x"})
    assert found == [
        "delivery.mx_port (--mx-port): must be a port number from 1 to 65535 (got \"x\")",
        "delivery.max_per_domain: must be a positive integer (got 0)",
    ]


# --- error messages -------------------------------------------------------------------------


def test_positive_integer_message(tmp_path: Path) -> None:
    assert one_problem(tmp_path, "[[receive]]\nmax_message_size = -5\n") == (
        "receive[0].max_message_size: must be a positive integer (got -5)"
    )


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[[receive]]\nmax_recipients = 0", "receive[0].max_recipients", "positive integer"),
        ('[[receive]]\nmax_errors = "5"', "receive[0].max_errors", 'positive integer (got "5")'),
        ("[[receive]]\nmax_connections = 1.5", "receive[0].max_connections", "(got 1.5)"),
        ("[[receive]]\nmax_auth_failures = true", "receive[0].max_auth_failures", "(got true)"),
        ("[[receive]]\nmin_data_rate = -1", "receive[0].min_data_rate", "0 means off"),
        ("[[receive]]\nidle_timeout = 0", "receive[0].idle_timeout", "positive number"),
        ("[[receive]]\ndata_timeout = inf", "receive[0].data_timeout", "(got inf)"),
        ("[[receive]]\ndata_timeout = nan", "receive[0].data_timeout", "(got nan)"),
        ("[[receive]]\nmax_command_line = 100", "receive[0].max_command_line", "at least 512"),
        ("[[receive]]\nmax_text_line = 999", "receive[0].max_text_line", "at least 1000"),
        ("[[receive]]\nprotocol_log = 1", "receive[0].protocol_log", "true or false (got 1)"),
        ('[[receive]]\ntls = "TLS"', "receive[0].tls", '"off", "starttls", "required"'),
        ('[[receive]]\nbare_eol = "normalise"', "receive[0].bare_eol", 'mean "normalize"'),
        ('[[receive]]\nname = "a b"', "receive[0].name", 'letter or digit (got "a b")'),
        (
            '[[receive]]\nauth_mechanisms = ["CRAM-MD5"]',
            "receive[0].auth_mechanisms[0]",
            '"PLAIN" or "LOGIN"',
        ),
        ('[[receive]]\ngreeting = "a\\r\\n250 b"', "receive[0].greeting", "one line"),
        ('[[receive]]\nlisten = "127.0.0.1:25"', "receive[0].listen", "must be an array"),
        ("[[receive]]\nlisten = []", "receive[0].listen", "at least one"),
        ("[[receive]]\nremote_ranges = []", "receive[0].remote_ranges", "must not be empty"),
        ('[[receive]]\ncert_file = ""', "receive[0].cert_file", "non-empty path"),
        ('[queue]\ndurability = "sync"', "queue.durability", '"fsync", "os"'),
        ("[queue]\nmax_pending = 0", "queue.max_pending", "positive integer"),
        ("[queue]\nbatch_limit = -3", "queue.batch_limit", "(got -3)"),
        ('[queue]\nmap_size = "lots"', "queue.map_size", '(got "lots")'),
        ('[queue]\nmap_size = "0MiB"', "queue.map_size", "positive size"),
        ("[queue]\nmin_free_disk = -1", "queue.min_free_disk", ">= 0 (got -1)"),
        ("[queue]\ncommit_linger = -0.001", "queue.commit_linger", "0 or more"),
        ("[queue]\ncommit_linger = 2", "queue.commit_linger", "at most 1 second (got 2.0)"),
        (
            '[queue]\nmap_size = "1GiB"\nmax_map_size = "512MiB"',
            "queue.map_size",
            "must not be larger than queue.max_map_size",
        ),
        ('[delivery]\nsmarthost = "relay.example:0"', "delivery.smarthost", "1 to 65535"),
        ("[delivery]\nsmarthost = 25", "delivery.smarthost", "HOST:PORT"),
        ('[delivery]\ndns = "ns.example"', "delivery.dns", "IP address of a nameserver"),
        ("[delivery]\nmx_port = 65536", "delivery.mx_port", "(got 65536)"),
        ("[delivery]\nmax_per_domain = 0", "delivery.max_per_domain", "positive integer"),
        ("[delivery]\ndns_max_queries = 0", "delivery.dns_max_queries", "positive integer"),
        ("[delivery]\nretry_interval = -1.0", "delivery.retry_interval", "(got -1.0)"),
        ('[delivery]\npaused = "yes"', "delivery.paused", 'true or false (got "yes")'),
        ("[delivery]\npipeline_messages = 1", "delivery.pipeline_messages", "true or false"),
        ("[delivery]\ndelay_notice_after = -60", "delivery.delay_notice_after", "0 or more"),
        (
            "[delivery]\nmax_queue_lifetime = 3600\ndelay_notice_after = 3600",
            "delivery.delay_notice_after",
            "must be shorter than delivery.max_queue_lifetime (3600 >= 3600)",
        ),
        ('[log]\nlevel = "INFO"', "log.level", 'did you mean "info"?'),
        ("[log]\nprotocol_log_dir = 5", "log.protocol_log_dir", "path"),
        ('hostname = "bad_host"', "hostname", 'label "bad_host"'),
        ('hostname = "999.1.1.1"', "hostname", "IPv4"),
        ("spool = 1", "spool", "(got 1)"),
        ('accepted_domains = ["ok.example", "b\u00fccher.example"]', "accepted_domains[1]", "xn--"),
        ('accepted_domains = ["*"]', "accepted_domains[0]", "label"),
        ('accepted_domains = "example.com"', "accepted_domains", "must be an array"),
        ("users = 5", "users", "table"),
        ("queue = 5", "queue", "must be a table (got 5)"),
        ("receive = [1]", "receive[0]", "must be a table"),
        ("receive = []", "receive", "at least one [[receive]]"),
        ('[receive]\nname = "x"', "receive", "write [[receive]], not [receive]"),
    ],
)
def test_each_error_names_its_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = one_problem(tmp_path, text + "\n")
    assert found.startswith(f"{key}: "), found
    assert words in found, found


def test_password_is_never_echoed(tmp_path: Path) -> None:
    found = one_problem(tmp_path, '[users]\n"bob@example.com" = "hunter2"\n')
    assert found.startswith('users."bob@example.com": must be a password hash')
    assert "hunter2" not in found
    found = one_problem(tmp_path, '[users]\n"bad user" = "hunter2"\n')
    assert found.startswith('users."bad user": ') and "hunter2" not in found


def test_all_problems_are_listed(tmp_path: Path) -> None:
    text = """
recieve = 1
[queue]
max_pending = 0
[[receive]]
max_recipients = -1
listen = ["x:1", "::1:25", "[::1]:25", "nope"]
[[receive]]
name = "two"
tls = "implicit"
[delivery]
mx_port = 0
"""
    found = problems(tmp_path, text)
    assert found == [
        "queue.max_pending: must be a positive integer (got 0)",
        'receive[0].listen[1]: an IPv6 address needs brackets, as in "[::1]:25" (got "::1:25")',
        'receive[0].listen[3]: needs a port: HOST:PORT, such as "127.0.0.1:2525", '
        '"[::1]:2525" or "mx.example:25" (got "nope")',
        "receive[0].max_recipients: must be a positive integer (got -1)",
        'receive[1].cert_file: is required when tls = "implicit"',
        'receive[1].key_file: is required when tls = "implicit"',
        "delivery.mx_port: must be a port number from 1 to 65535 (got 0)",
        "unknown key 'recieve' (did you mean 'receive'?)",
    ]


# --- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("recieve = 1", "unknown key 'recieve' (did you mean 'receive'?)"),
        (
            "[[receive]]\nmax_mesage_size = 1",
            "unknown key 'receive[0].max_mesage_size' "
            "(did you mean 'receive[0].max_message_size'?)",
        ),
        ("[queue]\nmapsize = 1", "unknown key 'queue.mapsize' (did you mean 'queue.map_size'?)"),
        (
            "[delivery]\nsmart_host = 'x:25'",
            "unknown key 'delivery.smart_host' (did you mean 'delivery.smarthost'?)",
        ),
        ("[log]\nlevl = 'info'", "unknown key 'log.levl' (did you mean 'log.level'?)"),
        ("flavour = 'blue'", "unknown key 'flavour'"),
        ("[[receive]]\n[receive.tls_options]\nx = 1", "unknown key 'receive[0].tls_options'"),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, message: str) -> None:
    assert one_problem(tmp_path, text + "\n") == message


# --- TLS ------------------------------------------------------------------------------------


def test_tls_without_cert_names_cert_file(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[receive]]\ntls = "starttls"\n')
    assert found[0] == 'receive[0].cert_file: is required when tls = "starttls"'
    assert found[1] == 'receive[0].key_file: is required when tls = "starttls"'


def test_tls_key_alone_missing(tmp_path: Path) -> None:
    certs(tmp_path)
    text = '[[receive]]\ntls = "required"\ncert_file = "certs/mx.pem"\n'
    assert one_problem(tmp_path, text) == 'receive[0].key_file: is required when tls = "required"'


def test_cert_file_must_exist(tmp_path: Path) -> None:
    certs(tmp_path)
    text = '[[receive]]\ntls = "starttls"\ncert_file = "nope.pem"\nkey_file = "certs/mx.key"\n'
    assert one_problem(tmp_path, text) == (
        f"receive[0].cert_file: file not found: {tmp_path / 'nope.pem'}"
    )
    text = '[[receive]]\ntls = "starttls"\ncert_file = "certs"\nkey_file = "certs/mx.key"\n'
    assert one_problem(tmp_path, text).startswith("receive[0].cert_file: is not a regular file")


def test_delivery_ca_file(tmp_path: Path) -> None:
    assert load_config(None).delivery.ca_file is None  # the system's store
    assert one_problem(tmp_path, '[delivery]\nca_file = "ca.pem"\n') == (
        f"delivery.ca_file: file not found: {tmp_path / 'ca.pem'}"
    )
    (tmp_path / "ca.pem").write_text("ca")
    assert load_config(write(tmp_path, '[delivery]\nca_file = "ca.pem"\n')).delivery.ca_file \
        == tmp_path / "ca.pem"  # relative to the configuration file


def test_tls_with_cert_loads(tmp_path: Path) -> None:
    cert, key = certs(tmp_path)
    text = f'[[receive]]\ntls = "implicit"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
    rc = load_config(write(tmp_path, text)).receive[0]
    assert (rc.tls, rc.cert_file, rc.key_file) == ("implicit", cert, key)


# --- connectors -----------------------------------------------------------------------------


def test_connector_names_are_unique(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[receive]]\nlisten = ["127.0.0.1:1"]\n'
                               '[[receive]]\nlisten = ["127.0.0.1:2"]\n')  # fmt: skip
    assert found == [
        'receive[1].name: "default" is already the name of receive[0] (names must be unique)'
    ]


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [
        ("127.0.0.1:25", "127.0.0.1:25", True),
        ("0.0.0.0:25", "127.0.0.1:25", True),
        ("127.0.0.1:25", "0.0.0.0:25", True),
        ("[::]:25", "[::1]:25", True),
        ("[::]:25", "0.0.0.0:25", False),
        ("127.0.0.1:25", "127.0.0.1:26", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),
    ],
)
def test_listen_collisions(tmp_path: Path, first: str, second: str, clash: bool) -> None:
    text = (f'[[receive]]\nname = "a"\nlisten = ["{first}"]\n'
            f'[[receive]]\nname = "b"\nlisten = ["{second}"]\n')  # fmt: skip
    if clash:
        found = one_problem(tmp_path, text)
        assert found.startswith("receive[1].listen[0]: ")
        assert found.endswith("collides with receive[0].listen[0]")
    else:
        assert len(load_config(write(tmp_path, text)).receive) == 2


# --- the file itself ------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configuration file not found: .*nope\.toml"):
        load_config(tmp_path / "nope.toml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_bad_toml_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'hostname = "mx.example"\n\n[queue\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3, column" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)


def test_default_toml_is_valid_toml() -> None:
    assert "receive" in __import__("tomllib").loads(DEFAULT_TOML)


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0), (1234, 1234), ("1234", 1234), ("10k", 10_000), ("10kB", 10_000),
        ("10KiB", 10_240), ("35MB", 35_000_000), ("35mb", 35_000_000),
        ("256MiB", 256 << 20), ("256 MiB", 256 << 20), ("1GiB", 1 << 30), ("1Gi", 1 << 30),
        ("2G", 2 * 10**9), ("1TiB", 1 << 40), ("1.5k", 1500), ("0.5MiB", 512 << 10),
        ("7B", 7),
    ],
)  # fmt: skip
def test_sizes(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "MiB", "-1", "1.5B", "1 Mebibyte", "1e6", "1,000", -1])
def test_bad_sizes(value: int | str) -> None:
    with pytest.raises(ConfigError):
        parse_size(value)


def test_size_in_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[receive]]\nmax_message_size = "10MiB"\n'))
    assert config.receive[0].max_message_size == 10 << 20
    found = one_problem(tmp_path, '[[receive]]\nmax_message_size = "1.5B"\n')
    assert found.startswith("receive[0].max_message_size: is not a whole number of bytes")


# --- CIDRs ----------------------------------------------------------------------------------


def test_cidrs(tmp_path: Path) -> None:
    text = ('[[receive]]\nrelay_networks = ["10.0.0.0/8", "2001:DB8::/32", "192.0.2.1", '
            '"::1", "10.0.0.0/8"]\n')  # fmt: skip
    rc = load_config(write(tmp_path, text)).receive[0]
    assert rc.relay_networks == (
        net("10.0.0.0/8"), net("2001:db8::/32"), net("192.0.2.1/32"), net("::1/128"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("cidr", "words"),
    [
        ("10.0.0.1/8", 'did you mean "10.0.0.0/8"?'),
        ("2001:db8::1/32", 'did you mean "2001:db8::/32"?'),
        ("10.0.0.0/33", "CIDR"),
        ("10.0.0", "CIDR"),
        ("localhost", "CIDR"),
    ],
)
def test_bad_cidrs(tmp_path: Path, cidr: str, words: str) -> None:
    found = one_problem(tmp_path, f'[[receive]]\nremote_ranges = ["::/0", "{cidr}"]\n')
    assert found.startswith("receive[0].remote_ranges[1]: ")
    assert words in found


# --- host:port ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("[::1]:2525", ("::1", 2525)),
        ("[2001:db8::25]:25", ("2001:db8::25", 25)),
        ("[fe80::1%eth0]:25", ("fe80::1%eth0", 25)),
        ("mx.example:25", ("mx.example", 25)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_hostport_default_port() -> None:
    assert parse_hostport("mx.example", 25) == ("mx.example", 25)
    assert parse_hostport("[::1]", 53) == ("::1", 53)
    assert parse_hostport("mx.example:587", 25) == ("mx.example", 587)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("mx.example", "needs a port"),
        ("::1:25", "needs brackets"),
        ("::1", "needs brackets"),
        ("[::1", "HOST:PORT"),
        ("[::1]25", "HOST:PORT"),
        ("[mx.example]:25", "not an IPv6 address"),
        ("mx.example:", "port must be"),
        ("mx.example:65536", "port must be"),
        ("mx.example:-1", "port must be"),
        ("mx.example:\uff12\uff15", "port must be"),  # fullwidth digits
        (":25", "is empty"),
        ("mx_1.example:25", "label"),
        ("300.1.1.1:25", "IPv4"),
        (" mx.example:25", "label"),
        ("", "is empty"),
    ],
)
def test_bad_hostport(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hostport(text)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_listen_forms_in_file(tmp_path: Path) -> None:
    text = '[[receive]]\nlisten = ["127.0.0.1:25", "[::1]:2525", "localhost:587"]\n'
    rc = load_config(write(tmp_path, text)).receive[0]
    assert rc.listen == (("127.0.0.1", 25), ("::1", 2525), ("localhost", 587))


def test_destinations_take_default_ports(tmp_path: Path) -> None:
    text = '[delivery]\nsmarthost = "relay.example"\ndns = "127.0.0.53"\n'
    delivery = load_config(write(tmp_path, text)).delivery
    assert delivery.smarthost == ("relay.example", 25)
    assert delivery.dns == ("127.0.0.53", 53)


# --- send connectors and local domains ----------------------------------------------------


def test_no_send_or_local_by_default() -> None:
    config = load_config(None)
    assert config.send == () and config.local == ()


ROUTING = """
[[send]]
name = "partner"
address_spaces = ["Partner.Example.", "*.partner.example", "partner.example"]
cost = 5
smarthosts = ["relay.partner.example", "[2001:db8::25]:587"]
tls = "verify"
auth_user = "ferry"
auth_password = "pa ss"
protocol = "lmtp"

[[send]]
name = "mx"
address_spaces = ["*"]
port = 2525
tls = "off"

[[local]]
domains = ["Example.COM", "*.corp.example"]
maildir = "mail/{domain}/{local}"

[[local]]
domains = ["lists.example"]
lmtp = "[::1]:24"
"""


def test_send_and_local(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ROUTING))
    partner, mx = config.send
    assert partner == SendConfig(
        name="partner", address_spaces=("partner.example", "*.partner.example"), cost=5,
        smarthosts=(("relay.partner.example", 25), ("2001:db8::25", 587)), tls="verify",
        auth_user="ferry", auth_password="pa ss", protocol="lmtp",
    )  # fmt: skip
    assert partner.allow_plaintext_auth is False and partner.port is None
    assert mx == SendConfig("mx", ("*",), port=2525, tls="off")
    assert (mx.cost, mx.smarthosts, mx.protocol) == (1, (), "smtp")
    assert "pa ss" not in repr(partner)
    maildir, lmtp = config.local
    assert maildir == LocalConfig(
        ("example.com", "*.corp.example"), maildir=str(tmp_path / "mail/{domain}/{local}")
    )
    assert lmtp == LocalConfig(("lists.example",), lmtp=("::1", 24))


def test_every_routing_key_is_accepted_in_the_file(tmp_path: Path) -> None:
    required = {
        "send": 'name = "n"\naddress_spaces = ["*"]\n',
        "local": 'domains = ["a.example"]\n',
    }
    for table, cls in (("send", SendConfig), ("local", LocalConfig)):
        for f in dataclasses.fields(cls):
            base = "".join(
                line + "\n"
                for line in required[table].splitlines()
                if not line.startswith(f"{f.name} ")
            )
            found = problems(tmp_path, f"[[{table}]]\n{base}{f.name} = {{ x = 1 }}\n")
            assert found and all(p.startswith(f"{table}[0].{f.name}: ") for p in found), found


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[[send]]\naddress_spaces = ["*"]', "send[0].name", "is required"),
        ('[[send]]\nname = "x"', "send[0].address_spaces", "is required"),
        ('[[send]]\nname = "x"\naddress_spaces = []', "send[0].address_spaces", "at least one"),
        ('[[send]]\nname = "x"\naddress_spaces = ["**"]', "send[0].address_spaces[0]", "label"),
        ('[[send]]\nname = "x"\naddress_spaces = ["a.*"]', "send[0].address_spaces[0]", "label"),
        ('[[send]]\nname = "x"\naddress_spaces = "*"', "send[0].address_spaces", "an array"),
        ('[[send]]\nname = "a b"\naddress_spaces = ["*"]', "send[0].name", "letter or digit"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\ncost = 0', "send[0].cost",
         "positive integer"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\ncost = 1.5', "send[0].cost", "(got 1.5)"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = ["r.example:0"]',
         "send[0].smarthosts[0]", "1 to 65535"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = "r.example"',
         "send[0].smarthosts", "an array"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\ntls = "on"', "send[0].tls",
         '"opportunistic"'),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\ntls = "Verify"', "send[0].tls",
         'did you mean "verify"?'),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nprotocol = "smtps"', "send[0].protocol",
         '"smtp", "lmtp"'),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nport = 0', "send[0].port", "1 to 65535"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nallow_plaintext_auth = 1',
         "send[0].allow_plaintext_auth", "true or false"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = ["r.example"]\n'
         'auth_user = "u"', "send[0].auth_password", "is required when auth_user is set"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = ["r.example"]\n'
         'auth_password = "p"', "send[0].auth_user", "is required when auth_password is set"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nauth_user = "u"\nauth_password = "p"',
         "send[0].auth_user", "only sent to smarthosts"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = ["r.example"]\n'
         'auth_user = "u"\nauth_password = "p"\ntls = "off"', "send[0].tls",
         "allow_plaintext_auth"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = ["r.example"]\nport = 25',
         "send[0].port", "MX hosts only"),
        ('[[send]]\nname = "x"\naddress_spaces = ["*"]\nauth_user = "a\\nb"',
         "send[0].auth_user", "control characters"),
        ('[send]\nname = "x"', "send", "write [[send]], not [send]"),
        ('[[local]]\nmaildir = "/m/{local}"', "local[0].domains", "at least one domain"),
        ('[[local]]\ndomains = []\nmaildir = "/m/{local}"', "local[0].domains",
         "at least one domain"),
        ('[[local]]\ndomains = ["a.example"]', "local[0].maildir", "exactly one of"),
        ('[[local]]\ndomains = ["a.example"]\nmaildir = "/m/{local}"\nlmtp = "127.0.0.1:24"',
         "local[0].maildir", "exactly one of"),
        ('[[local]]\ndomains = ["a.example"]\nmaildir = "/m/{user}"', "local[0].maildir",
         "not {user}"),
        ('[[local]]\ndomains = ["a.example"]\nmaildir = "/m/{local"', "local[0].maildir",
         "not a valid template"),
        ('[[local]]\ndomains = ["a.example"]\nlmtp = "127.0.0.1"', "local[0].lmtp", "needs a port"),
        ('[[local]]\ndomains = ["a_b.example"]\nlmtp = "127.0.0.1:24"', "local[0].domains[0]",
         "label"),
        ('[local]\ndomains = ["a.example"]', "local", "write [[local]], not [local]"),
    ],
)  # fmt: skip
def test_routing_errors_name_their_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = one_problem(tmp_path, text + "\n")
    assert found.startswith(f"{key}: "), found
    assert words in found, found


def test_auth_password_is_never_echoed(tmp_path: Path) -> None:
    text = '[[send]]\nname = "x"\naddress_spaces = ["*"]\nauth_password = ["hunter2"]\n'
    found = one_problem(tmp_path, text)
    assert found.startswith("send[0].auth_password: ") and "hunter2" not in found


def test_plaintext_auth_when_allowed(tmp_path: Path) -> None:
    text = (
        '[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthosts = ["r.example"]\n'
        'auth_user = "u"\nauth_password = "p"\ntls = "off"\nallow_plaintext_auth = true\n'
    )
    (sc,) = load_config(write(tmp_path, text)).send
    assert (sc.tls, sc.allow_plaintext_auth, sc.auth_user) == ("off", True, "u")


def test_send_names_unique_and_not_reserved(tmp_path: Path) -> None:
    text = (
        '[[send]]\nname = "a"\naddress_spaces = ["*"]\n'
        '[[send]]\nname = "a"\naddress_spaces = ["x.example"]\n'
        '[[send]]\nname = "delivery.smarthost"\naddress_spaces = ["*"]\n'
    )
    assert problems(tmp_path, text) == [
        'send[1].name: "a" is already the name of send[0] (names must be unique)',
        'send[2].name: "delivery.smarthost" is reserved for the connector that '
        "delivery.smarthost makes",
    ]


def test_local_domain_listed_once(tmp_path: Path) -> None:
    text = ('[[local]]\ndomains = ["a.example", "b.example"]\nmaildir = "/m/{local}"\n'
            '[[local]]\ndomains = ["B.example."]\nlmtp = "127.0.0.1:24"\n')  # fmt: skip
    assert one_problem(tmp_path, text) == (
        'local[1].domains[0]: "b.example" is already listed at local[0].domains[1]'
    )


def test_unknown_routing_keys(tmp_path: Path) -> None:
    text = '[[send]]\nname = "x"\naddress_spaces = ["*"]\nsmarthost = ["r.example"]\n'
    assert one_problem(tmp_path, text) == (
        "unknown key 'send[0].smarthost' (did you mean 'send[0].smarthosts'?)"
    )
    text = '[[local]]\ndomain = ["a.example"]\nmaildir = "/m"\n'
    assert one_problem(tmp_path, text) == (
        "unknown key 'local[0].domain' (did you mean 'local[0].domains'?)"
    )


def test_per_domain_delivery_limits(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[delivery.domains."Gmail.COM."]\nmax_connections = 5\nmax_rate = 2.5\n'
                    '[delivery.domains."yahoo.com"]\nmax_rate = 0\n')
    domains = load_config(path).delivery.domains
    assert domains["gmail.com"].max_connections == 5 and domains["gmail.com"].max_rate == 2.5
    assert domains["yahoo.com"].max_connections is None and domains["yahoo.com"].max_rate == 0
    assert problems(tmp_path, '[delivery.domains."a.test"]\nmax_connections = 0\n') == [
        'delivery.domains."a.test".max_connections: must be a positive integer (got 0)']
    assert problems(tmp_path, '[delivery.domains."a.test"]\nmax_conections = 1\n') == [
        "unknown key 'delivery.domains.\"a.test\".max_conections' "
        "(did you mean 'delivery.domains.\"a.test\".max_connections'?)"]


def test_accept_domain_flag_keeps_the_files_bad_value_reported(tmp_path: Path) -> None:
    # --accept-domain adds to the file's list: a file value that is not a list is the
    # file's problem, reported as such, never silently replaced by the flag's domains.
    found = problems(tmp_path, 'accepted_domains = "example.com"\n',
                     {"--accept-domain": ["x.example"]})
    assert found == ['accepted_domains: must be an array of domain names (got "example.com")']


def test_the_injection_connector_name_is_not_a_receive_connectors(tmp_path: Path) -> None:
    found = problems(tmp_path, '[[receive]]\nname = "api"\n\n[http]\nconnector = "api"\n')
    assert found == [
        'http.connector: "api" is already the name of receive[0] (names must be unique)']
    config = load_config(write(tmp_path, '[http]\nmax_recipients = 20000\n'
                                         'idempotency_window = "2h"\n'))
    assert (config.http.connector, config.http.max_recipients,
            config.http.idempotency_window) == ("http", 20000, 7200.0)
    assert problems(tmp_path, '[http]\nbare_eol = "strip"\n')[0].startswith("http.bare_eol:")

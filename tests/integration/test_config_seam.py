"""The seam between the configuration and the code: every documented key is declared, every
declared key is documented, and every key is read by the running server.

Two checks, so that a key added in one place only fails here with a message that says what
is missing:

1. The keys in docs/configuration.md (the first column of each section's table) are
   exactly the fields of the dataclasses of ``engine.config.TABLES``.
2. A whole Ferry is built from a file that sets every table, and started on a temporary
   spool and loopback ports; a client sends mail through it to every kind of route (a
   Maildir, an LMTP server, a smarthost with AUTH, DNS MX), while every attribute read of
   the configuration objects is recorded.  A declared key that nothing read is dead: it is
   validated and documented but changes nothing.

A key read only on a path this run does not take (an error branch) still counts as read
when any code outside ``engine.config`` reads it here; make the run take that path rather
than exempting the key.
"""

from __future__ import annotations

import dataclasses
import re
import smtplib
import socket
import ssl
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme

from engine.cluster.supervisor import node_size
from engine.config import TABLES, Config, load_config
from engine.message.dkim import generate_key, private_pem
from engine.server.auth import hash_password
from engine.testing.dns import DnsResponder
from engine.testing.rawsmtp import RawClient
from engine.testing.server import RunningFerry
from engine.testing.sink import CountingSink
from engine.testing.wait import poll, wait_for

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# --- 1. the documentation names exactly the declared keys ----------------------------------

_SECTION = re.compile(r"^#{2,3} (?:Top level|`\[\[?([a-z_.]+?)(?:\.\"[^\"]*\")?\]\]?`)", re.M)
_ROW = re.compile(r"^\| `([a-z0-9_]+)` \|", re.M)


def documented_keys() -> set[tuple[str, str]]:
    """(table, key) for each row of each key table in docs/configuration.md ("" = top)."""
    text = DOCS.read_text(encoding="utf-8").split("## A complete example")[0]
    sections = list(_SECTION.finditer(text))
    keys: set[tuple[str, str]] = set()
    for here, after in zip(sections, [*sections[1:], None], strict=True):
        body = text[here.end(): after.start() if after else len(text)]
        keys |= {(here.group(1) or "", key) for key in _ROW.findall(body)}
    return keys


def declared_keys() -> set[tuple[str, str]]:
    return {(table, f.name) for table, cls in TABLES.items() for f in dataclasses.fields(cls)}


def test_docs_and_declarations_name_the_same_keys() -> None:
    documented, declared = documented_keys(), declared_keys()
    undocumented = sorted(declared - documented)
    assert not undocumented, (
        f"declared in engine/config.py but not documented (add a row to its section's table "
        f"in docs/configuration.md): {undocumented}")
    dead = sorted(documented - declared)
    assert not dead, f"documented in docs/configuration.md but not declared: {dead}"


# --- 2. every declared key is read -----------------------------------------------------------

#: (table, key) read so far; filled by the recording copies of the configuration.
READS: set[tuple[str, str]] = set()
#: Reads by the dataclasses' own methods prove nothing (equality, repr, hash, replace).
_OWN = frozenset({"__eq__", "__repr__", "__hash__", "replace", "_replace", "asdict",
                  "_asdict_inner", "fields"})


def _recording_class(cls: type, table: str) -> type:
    names = frozenset(f.name for f in dataclasses.fields(cls))

    def __getattribute__(self: Any, name: str) -> Any:
        if name in names and sys._getframe(1).f_code.co_name not in _OWN:
            READS.add((table, name))
        return object.__getattribute__(self, name)

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})


_CLASSES = {cls: _recording_class(cls, table) for table, cls in TABLES.items()}


def recording(value: Any) -> Any:
    """A copy of ``value`` in which every configuration object records its reads."""
    if isinstance(value, tuple):
        return tuple(recording(v) for v in value)
    if isinstance(value, dict):
        return {k: recording(v) for k, v in value.items()}
    cls = type(value)
    if cls not in _CLASSES:
        return value
    copy: Any = object.__new__(_CLASSES[cls])
    for f in dataclasses.fields(value):
        object.__setattr__(copy, f.name, recording(object.__getattribute__(value, f.name)))
    return copy


#: Keys the session's clock reads (engine.server.session ``_tick``).
_CLOCK = ("idle_timeout", "data_timeout", "min_data_rate", "data_rate_grace")

ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
mx.test.    IN MX 10 mx1.mx.test.
mx1.mx.test. IN A 127.0.31.1
"""


#: Where the counting sink of tests/integration/conftest.py listens.
SINK_ADDRESSES = ["127.0.31.1", "127.0.31.2"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def every_table(tmp_path: Path, cert_files: tuple[Path, Path], dns: tuple[str, int],
                sink_port: int) -> Config:
    """A configuration that sets every table, on loopback, in ``tmp_path``."""
    cert, key = cert_files
    (tmp_path / "dkim.pem").write_bytes(private_pem(generate_key(ed25519_key=True)))
    path = tmp_path / "ferry.toml"
    path.write_text(f"""
hostname = "seam.test"
spool = "spool"
accepted_domains = ["accepted.test"]

[users]
app = "{hash_password("s3cret")}"

[queue]
min_free_disk = 0

[[receive]]
name = "plain"
listen = ["127.0.0.1:0"]
allow_plaintext_auth = true
protocol_log = true
agents = ["ratelimit", "dnsbl", "seam-agent", "rspamd", "clamav"]
verify = []

[agents.custom."seam-agent"]
factory = "engine.testing.agents:Scripted"
options = {{ name = "seam-agent", data = "header:X-Seam:1" }}
timeout = 5
fail = "open"

[agents.ratelimit]
timeout = 5
fail = "open"
connections_per_minute = 100
concurrent_connections = 10
messages_per_minute = 100
recipients_per_minute = 100
user_connections_per_minute = 100
user_concurrent_connections = 10
user_messages_per_minute = 100
user_recipients_per_minute = 100
auth_failures_per_hour = 10
auth_lockout = "1m"
auth_failure_delay = 0.05
exempt = ["192.0.2.0/24"]
ipv6_prefix = 56
max_keys = 1000

[agents.dnsbl]
timeout = 5
fail = "open"
threshold = 1
allow_networks = ["192.0.2.0/24"]

[[agents.dnsbl.zones]]
zone = "bl.seam.test"
kind = "block"
codes = ["127.0.0.2-127.0.0.11"]
weight = 1
reply = "blocked by {{zone}}"
[agents.verify]
timeout = 5
fail = "open"
authserv_id = "auth.seam.test"
dmarc_policy = "quarantine"
spf_fail = "reject"
spf_cache = 500

# The scanners' daemons are down here (closed ports): open, so the mail flows.
[agents.rspamd]
url = "http://127.0.0.1:{closed_port()}"
password = "seam-rspamd"
reject_action = "hold"
soft_reject_action = "tag"
greylist_action = "accept"
header = "X-Seam-Spamd"
spam_header = "X-Seam-Spam"
max_size = "1MiB"
timeout = 5
fail = "open"

[agents.clamav]
address = "127.0.0.1:{closed_port()}"
action = "hold"
max_size = "1MiB"
on_oversize = "tempfail"
max_concurrent = 2
scanned_header = "X-Seam-Scanned"
timeout = 5
fail = "open"

[[receive]]
name = "tls"
listen = ["127.0.0.1:0"]
tls = "starttls"
cert_file = "{cert}"
key_file = "{key}"
verify = ["spf", "dkim", "dmarc"]

[delivery]
dns = "{dns[0]}:{dns[1]}"
retry_interval = 60
ca_file = "{cert}"
mta_sts = true
mta_sts_fetch_timeout = 5
mta_sts_max_policy_size = "16KiB"
mta_sts_port = 8443
dnssec_validating = false
tls_failure_memory = 60
tls_rpt = true
tls_rpt_interval = 3600
tls_rpt_contact = "tlsrpt@seam.test"

[delivery.tls_policy]
"mx.test" = "may"

[delivery.domains."mx.test"]
max_connections = 2
max_rate = 100

[[send]]
name = "partner"
address_spaces = ["partner.test"]
smarthosts = ["127.0.31.2:{sink_port}"]
auth_user = "relayuser"
auth_password = "relaypass"
tls = "off"
allow_plaintext_auth = true
implicit_tls = false

[[send]]
name = "internet"
address_spaces = ["*"]
port = {sink_port}
tls = "off"
pool = "seam"

[egress]
pool = "seam"

[egress.sources.s1]
address = "127.0.0.1"
ehlo = "out.seam.test"
warmup_start = "2026-01-01"
warmup_caps = [1000000]

[egress.pools.seam]
sources = {{ s1 = 1 }}

[shaping]
defaults = true

[[shaping.rules]]
name = "seam"
mx_suffixes = [".mx.test"]
domains = ["mx.test"]
max_connections = 2
max_messages_per_connection = 10
max_per_second = 1000
max_per_minute = 60000
max_per_hour = 3600000
daily_cap = 1000000
pool = "seam"

[[shaping.automation]]
name = "seam"
mx_suffixes = [".mx.test"]
domains = ["mx.test"]
code = 421
enhanced = "4.7.0"
text = "slow down"
action = "throttle"
duration = 60
max_connections = 1
rate_factor = 0.5
max_rate = 10

[[local]]
domains = ["maildir.test"]
maildir = "mail/{{domain}}/{{local}}"

[[local]]
domains = ["lmtp.test"]
lmtp = "127.0.0.1:{closed_port()}"

[log]
level = "info"
protocol_log_dir = "protolog"

[tracking]
dir = "tracking"
max_file_size = "10MiB"
subject = true

[server]
allow_root = true
workers = 1

[http]
listen = ["127.0.0.1:0"]
trust_loopback = false
cert_file = "{cert}"
key_file = "{key}"
max_body_size = "1MiB"
request_timeout = 30
idle_timeout = 30
connector = "api"
max_message_size = "1MiB"
max_recipients = 500
max_request_queued_size = "2MiB"
bare_eol = "normalize"
long_lines = "reject"
max_received_headers = 50
idempotency_window = "1h"
metrics_destinations = 10

[http.tokens.seam]
token = "seam-token-0123456789"
scopes = ["read", "inject", "admin"]
trusted = true

[[alert]]
name = "backlog"
metric = "queue_depth"
destination = "*"
above = 0
lasting = "0s"
severity = "error"

[[alert]]
name = "disk"
metric = "free_disk"
below = "1000TiB"

[[alert]]
name = "deferrals"
metric = "deferral_ratio"
above = "50%"
window = "1m"

[alerts]
interval = 0.2

[[webhook]]
name = "seam"
url = "https://127.0.0.1:{closed_port()}/hook"
secret = "seam-secret"
events = ["RECEIVE", "DELIVER"]
batch_size = 10
timeout = 5
retry_interval = 0.1
max_retry_interval = 0.2
max_backlog = 1000
ca_file = "{cert}"

[[dkim_sign]]
domain = "seam.test"
selector = "seam"
key_file = "dkim.pem"
headers = ["From", "To", "Subject"]
oversign = ["From"]
subdomains = true

[[bounce_rule]]
category = "inactive"
code = 550
enhanced = "5.1"
text = "account closed"

[suppression]
enabled = true
auto_categories = ["bad-mailbox", "inactive"]
max_age = "30d"

# No Redis answers there: the node runs on its share of each limit (every key is read).
[cluster]
redis = "redis://127.0.0.1:{closed_port()}/0"
node = "seam-node.test"
prefix = "seam:"
lease_ttl = 30
timeout = 0.5
share = 1.0
probe_interval = 60
lease_wait = 0.25
sync_interval = 60
""", encoding="utf-8")
    return load_config(path)


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_every_declared_key_is_read(tmp_path: Path, ca: trustme.CA,
                                    cert_files: tuple[Path, Path],
                                    dns_server: DnsResponder, sink: CountingSink) -> None:
    config = every_table(tmp_path, cert_files, dns_server.address, sink.port)
    READS.clear()
    # A hard bounce: the bounce rules classify it, the suppression list takes it in.
    sink.state.rcpt_replies["gone@mx.test"] = "550 5.1.1 account closed"
    # What `ferry serve` asks first: one process, or a node of workers (engine.cluster;
    # tests/e2e/test_workers.py runs a node).
    assert node_size(recording(config)) == 1
    with RunningFerry(recording(config)) as f:
        with smtplib.SMTP(f.host, f.port) as client:
            client.ehlo("client.test")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("app", "wrong")
            client.login("app", "s3cret")
            for rcpt in ("a@maildir.test", "b@lmtp.test", "c@partner.test", "d@mx.test"):
                client.sendmail("s@client.test", [rcpt], b"Subject: seam\r\n\r\nseam\r\n")
        with RawClient(f.host, f.port) as raw:
            # A body in progress until the session's clock (once a second) has checked it:
            # the idle, whole-message and data-rate limits are read there.
            raw.reply()
            for line in (b"EHLO client.test", b"MAIL FROM:<s@client.test>",
                         b"RCPT TO:<e@maildir.test>", b"DATA"):
                raw.command(line)
            raw.send(b"Subject: slow\r\n\r\n")
            poll(lambda: {("receive", k) for k in _CLOCK} <= READS, timeout=10)
            # A line over 1,000 octets: the connector's long-line policy is read.
            assert raw.command(b"x" * 1200 + b"\r\n.").code == 250
        # The hard bounce suppressed its recipient: the next RCPT for it is refused.
        with smtplib.SMTP(f.host, f.port) as client:
            client.login("app", "s3cret")
            client.sendmail("s@client.test", ["gone@mx.test"], b"Subject: seam\r\n\r\nx\r\n")
            suppression = f.app.suppression
            assert suppression is not None
            wait_for(lambda: "gone@mx.test" in suppression.entries, what="the auto entry")
            client.mail("s@client.test")
            assert client.rcpt("gone@mx.test")[0] == 550
            entry = suppression.entry("gone@mx.test")
            assert entry is not None and entry.category == "inactive"  # the rule's
        # The Maildir and MX deliveries are done; the LMTP server is not there (deferred);
        # the smarthost sink offers no AUTH (deferred).
        wait_for(lambda: len(sink.state.messages) == 1, what="the MX delivery")
        wait_for(lambda: list((tmp_path / "mail" / "maildir.test").glob("a/new/*")),
                 what="the Maildir delivery")
        wait_for(lambda: len(f.store.ids_in_state("deferred", 10)) == 2, what="two deferred")
        # The alert rules fire (the queue holds deferred mail; no disk is that large).
        alerts = f.app.alerts
        assert alerts is not None
        wait_for(lambda: {a.rule for a in alerts.active()} >= {"backlog", "disk"},
                 what="the alert rules firing")
        # The webhook's receiver is not there: its POST failed, and the backoff is read.
        poll(lambda: ("webhook", "max_retry_interval") in READS, timeout=10)
        # One HTTPS request with the token: the [http] keys read per request.
        assert f.app.http is not None
        request = urllib.request.Request(f"https://{f.app.http.addresses[0]}/metrics",
                                         headers={"Authorization": "Bearer seam-token-0123456789"})
        with urllib.request.urlopen(request, context=_client_context(ca), timeout=10) as answer:
            assert answer.status == 200
        # One injection (engine.http.inject): the injection API's keys, the token's trust.
        request = urllib.request.Request(
            f"https://{f.app.http.addresses[0]}/api/v1/messages", method="POST",
            data=b'{"from": "s@client.test", "recipients": ["f@mx.test"], '
                 b'"content": "Subject: seam\\n\\nseam\\n"}',
            headers={"Authorization": "Bearer seam-token-0123456789",
                     "Content-Type": "application/json", "Idempotency-Key": "seam"})
        with urllib.request.urlopen(request, context=_client_context(ca), timeout=10) as answer:
            assert answer.status == 200
    unread = sorted(declared_keys() - READS)
    assert not unread, (
        "declared and documented, but nothing read them while Ferry was built, started and "
        f"delivered mail (a dead key: make the component it configures read it): {unread}")

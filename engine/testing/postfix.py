"""A private Postfix instance on loopback, for interop tests and benchmarks.

``PostfixInstance(tmpdir, main_cf_extra, ...)`` writes its own ``main.cf`` and
``master.cf`` under ``tmpdir`` (config directory, queue directory, data directory and log
file all there), starts it with ``postfix -c DIR start`` and stops it with ``postfix -c DIR
stop``.  It needs root (Postfix's master runs as root and drops to the ``postfix`` user)
and the Debian ``postfix`` package; the system's own Postfix configuration, queue and
port 25 are never touched.

Safety rules it enforces, because a test must never leave the machine:

- every listener (``inet_interfaces``, the smtpd service, any extra ``inet`` service) and
  the client bind address are in 127.0.0.0/8, and the default master.cf has no port 25;
- no resolver is ever asked: DNS is off for the SMTP and LMTP clients
  (``smtp_dns_support_level = disabled``), host lookup is ``native`` and every relayhost or
  transport next hop set through the main.cf settings must be a bracketed loopback literal
  (``[127.0.0.1]:2525``), so not even ``getaddrinfo()`` resolves a name; smtpd does no
  reverse lookup of its clients (``smtpd_peername_lookup = no``);
- with no relayhost, mail that is neither for a local domain nor routed by a transport
  goes to the ``error`` transport (bounced), never to the world;
- every instance started is stopped at interpreter exit if the test did not stop it.

Queue timers are short (``queue_run_delay`` 1 s, backoff 1-5 s) so a deferred message is
retried within a test's time budget.  The MTA-independent parts (greeting, log, stop by
PID, the stop-at-exit registry) are in ``engine.testing.mta``.  Used by tests and
benchmarks only; never imported by the running server.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from engine.testing.mta import (
    LOOPBACK,
    LoopbackMta,
    MtaError,
    check_loopback,
    check_searchable,
    free_port,
    kill_pid,
    wait_pid_gone,
)
from engine.testing.wait import poll

__all__ = ["LOOPBACK", "QUEUES", "PostfixError", "PostfixInstance", "free_port"]

#: The queues that hold messages not yet delivered (``hold`` included).
QUEUES: Final = ("maildrop", "incoming", "active", "deferred", "hold")
POSTFIX: Final = "/usr/sbin/postfix"
SENDMAIL: Final = "/usr/sbin/sendmail"
POSTQUEUE: Final = "/usr/sbin/postqueue"

#: The services a delivering instance needs, none chrooted (the queue directory is a
#: temporary directory without the chroot's copies of /etc files).  No inet service here:
#: the smtpd listener is added with the instance's loopback address and port.
_MASTER_CF: Final = """\
pickup    unix  n       -       n       1       1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

#: main.cf settings whose value names a next hop ("transport:nexthop" or a bare nexthop).
_NEXTHOP_KEYS: Final = (
    "relayhost",
    "default_transport",
    "relay_transport",
    "fallback_relay",
    "smtp_fallback_relay",
    "local_transport",
    "virtual_transport",
)
#: Tables whose values name next hops; only inline: and static: ones can be checked here.
_NEXTHOP_MAPS: Final = (
    "transport_maps",
    "sender_dependent_relayhost_maps",
    "sender_dependent_default_transport_maps",
)
_LITERAL: Final = re.compile(r"\[([^\]]+)\](?::(\d+))?")


class PostfixError(MtaError):
    """Postfix could not be configured, started or asked; the message holds its log tail."""


def _loopback(address: str, what: str) -> None:
    check_loopback(address, what, PostfixError)


def _check_nexthop(key: str, value: str) -> None:
    """A next hop must be empty, a transport name only, or a bracketed loopback literal."""
    nexthop = value.strip()
    if key not in ("relayhost", "fallback_relay", "smtp_fallback_relay"):
        transport, _, nexthop = nexthop.partition(":")
        if transport.strip() == "error" or not nexthop:
            return  # "error:text" holds a reply text, not a host
    for hop in filter(None, re.split(r"[\s,]+", nexthop)):
        m = _LITERAL.fullmatch(hop)
        if m is None:
            raise PostfixError(
                f"{key} = {value}: a next hop must be a bracketed loopback "
                "literal like [127.0.0.1]:2525 (no name lookups)"
            )
        _loopback(m.group(1), key)


def _check_map(key: str, value: str) -> None:
    """Each value of an inline:{...} or static: table must pass :func:`_check_nexthop`;
    a table of another type is refused, since its values cannot be checked."""
    value = value.strip()
    if value.startswith("static:"):
        values = [value.removeprefix("static:")]
    elif value.startswith("inline:{") and value.endswith("}"):
        entries = filter(None, (e.strip() for e in value[len("inline:{") : -1].split(",")))
        values = [e.partition("=")[2].strip() for e in entries]
    else:
        raise PostfixError(
            f"{key} = {value}: only inline:{{...}} and static: tables are "
            "checked for loopback next hops"
        )
    for v in values:
        _check_nexthop("relayhost" if key == "sender_dependent_relayhost_maps" else key, v)


def _check_master_line(line: str) -> None:
    fields = line.split()
    if len(fields) >= 2 and fields[1] == "inet":
        host, sep, _port = fields[0].rpartition(":")
        if not sep:
            raise PostfixError(f"master.cf: inet service {fields[0]!r} needs an address:port")
        _loopback(host.strip("[]"), "master.cf inet service")


class PostfixInstance(LoopbackMta):
    """One private Postfix: its own configuration, queue, log and smtpd on loopback.

    ``main_cf_extra`` overrides or adds main.cf settings (values as Postfix writes them);
    ``services`` adds master.cf lines (e.g. an smtp client service with ``-o`` overrides
    that a transport map names); ``smtpd_options`` adds ``-o name=value`` to the smtpd
    listener.  ``smtpd_port`` None picks a free port.
    """

    error = PostfixError
    listener_name = "smtpd"

    def __init__(
        self,
        tmpdir: Path,
        main_cf_extra: Mapping[str, str] | None = None,
        *,
        smtpd_address: str = "127.0.0.1",
        smtpd_port: int | None = None,
        hostname: str = "postfix.test",
        services: Sequence[str] = (),
        smtpd_options: Mapping[str, str] | None = None,
    ) -> None:
        _loopback(smtpd_address, "smtpd_address")
        self.dir = Path(tmpdir).resolve()
        self.address = smtpd_address
        self.port = smtpd_port or free_port(smtpd_address)
        self.hostname = hostname
        self.conf = self.dir / "conf"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "maillog"
        self.pid = 0
        self.main_cf = self._main_cf(dict(main_cf_extra or {}))
        self.services = [*_MASTER_CF.splitlines(), *services]
        for line in services:
            _check_master_line(line)
        options = "".join(f" -o {k}={v}" for k, v in (smtpd_options or {}).items())
        self.services.append(f"{smtpd_address}:{self.port} inet n - n - - smtpd{options}")

    def _main_cf(self, extra: dict[str, str]) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            # Postfix insists that inet_interfaces are configured on an interface, which
            # only 127.0.0.1 is; the smtpd listener itself may use any 127/8 address.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtp_bind_address": "127.0.0.1",
            "lmtp_bind_address": "127.0.0.1",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
            "reject_unauth_destination",
            # No resolver, ever: DNS off for the clients, literal next hops only (checked
            # below), no reverse lookup of smtpd's clients.
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "relayhost": "",
            "default_transport": "error:5.7.1 this test instance delivers to loopback only",
            "relay_transport": "error:5.7.1 this test instance delivers to loopback only",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "delay_warning_time": "0",
        }
        settings.update(extra)
        # A relayhost replaces the error transports' purpose: mail for other domains goes
        # there (it is a loopback literal, checked below) unless the caller chose otherwise.
        if settings["relayhost"] and "default_transport" not in extra:
            settings["default_transport"] = "smtp"
            if "relay_transport" not in extra:
                settings["relay_transport"] = "relay"
        for key in ("inet_interfaces", "smtp_bind_address", "lmtp_bind_address"):
            if settings[key]:
                _loopback(settings[key], key)
        for key in _NEXTHOP_KEYS:
            if settings.get(key):
                _check_nexthop(key, settings[key])
        for key in _NEXTHOP_MAPS:
            if settings.get(key):
                _check_map(key, settings[key])
        return settings

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start the master and wait for smtpd's 220."""
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root")
        if not os.path.exists(POSTFIX):
            raise PostfixError("Postfix is not installed (Debian package: postfix)")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        check_searchable(self.dir, "postfix", PostfixError)
        for d in (self.conf, self.queue_dir, self.data_dir):
            d.mkdir(exist_ok=True)
        os.chown(self.data_dir, pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main_cf.items()))
        (self.conf / "master.cf").write_text("\n".join(self.services) + "\n")
        self._register()
        try:
            self._postfix("start", timeout=timeout)
            self.pid = self._master_pid(timeout)
            self._wait_greeting(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the master (and so every Postfix process of this instance); idempotent."""
        if not self._unregister():
            return
        pid = self.pid or self._read_pid()
        with contextlib.suppress(PostfixError, subprocess.TimeoutExpired):
            self._postfix("stop", check=False, timeout=timeout)
        if not pid:
            return
        if not wait_pid_gone(pid, timeout):
            kill_pid(pid)  # our own master, by its pid
        self.pid = 0

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_pid(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        return 0

    def _master_pid(self, timeout: float) -> int:
        def running() -> int:
            pid = self._read_pid()
            return pid if pid and Path(f"/proc/{pid}").exists() else 0

        pid = poll(running, timeout)
        if pid is None:
            raise PostfixError(f"no master.pid after {timeout:.0f} s\n{self.log_tail()}")
        return pid

    def _postfix(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        done = subprocess.run(
            [POSTFIX, "-c", str(self.conf), *args], capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise PostfixError(
                f"postfix {' '.join(args)} failed: {done.stderr.strip()}\n{self.log_tail()}"
            )
        return done.stdout

    # --- mail in, queue, log --------------------------------------------------------------

    def sendmail(
        self, message: bytes, sender: str, recipients: Iterable[str], timeout: float = 30.0
    ) -> None:
        """Submit ``message`` with Postfix's sendmail (-i: a lone "." does not end it)."""
        done = subprocess.run(
            [SENDMAIL, "-C", str(self.conf), "-i", "-f", sender, "--", *recipients],
            input=message,
            capture_output=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise PostfixError(
                f"sendmail exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}"
            )

    def flush(self) -> None:
        """Ask the queue manager to try every deferred message now (postqueue -f)."""
        subprocess.run(
            [POSTQUEUE, "-c", str(self.conf), "-f"], check=True, capture_output=True, timeout=30
        )

    def queue(self) -> list[dict[str, Any]]:
        """The messages queued, one dict each from ``postqueue -j`` (queue_name,
        queue_id, sender, recipients with delay_reason, ...)."""
        done = subprocess.run(
            [POSTQUEUE, "-c", str(self.conf), "-j"], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise PostfixError(f"postqueue -j failed: {done.stderr.strip()}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def queue_files(self) -> int:
        """Queue files in the undelivered queues, counted on disk (no daemon needed)."""
        return sum(len(files) for q in QUEUES for _, _, files in os.walk(self.queue_dir / q))

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        if poll(lambda: not self.queue_files(), timeout, 0.1):
            return
        raise PostfixError(
            f"queue not empty after {timeout:.0f} s: {self.queue()}\n{self.log_tail()}"
        )

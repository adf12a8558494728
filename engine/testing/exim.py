"""A private Exim 4 instance on loopback, the final destination in interop tests.

``EximInstance(tmpdir, domains, local_parts, ...)`` copies the Exim binary, writes its own
configuration (``-C``), spool, log directory and Maildirs under ``tmpdir``, runs the daemon
in the foreground (``-bdf``) as a child of the test and stops it by that child's PID.
It accepts mail for ``domains`` (the listed local parts only) and delivers each message
into ``maildir/<domain>/<local part>/new/`` with the appendfile transport in Maildir
format, CRLF line ends (``use_crlf``) so a file can be compared byte for byte with the
message as it was submitted, and a ``Return-path:`` field naming the envelope sender.

Where the binary comes from: Debian's exim4 packages conflict with postfix (both provide
mail-transport-agent), so ``tests/run.sh`` does not install one: it unpacks the
``exim4-daemon-light`` package into ``.cache/exim/`` of the repository (``dpkg -x``, no
maintainer scripts), installs the libraries it links with, and creates the system user
``Debian-exim``, which Debian's build looks up by name before it reads any configuration.
:func:`find_exim` looks at ``$FERRY_EXIM``, then there, then at ``/usr/sbin/exim4``.

How it runs as root: Exim gives up root when given ``-C`` (the file is not in its
compiled-in TRUSTED_CONFIG_LIST), so the daemon and every delivery run as ``Debian-exim``.
That user therefore owns the spool, log and Maildir directories, the transport delivers as
that user, and the binary and configuration are copied under ``tmpdir`` (mode 0755 up to
/) because the daemon re-executes itself from ``exim_path`` after dropping root.

Safety rules it enforces, because a test must never leave the machine:

- the listener (``local_interfaces``) is a 127.0.0.0/8 literal; IPv6 is off;
- no resolver is asked and nothing is sent anywhere: there is no smtp transport and no
  dnslookup router, the only router accepts the configured local domains into Maildirs,
  the RCPT ACL refuses every other domain, reverse lookups, ident callbacks and DKIM
  verification are off, and a bounce (to a sender Exim cannot route) is frozen in the
  private spool;
- only the process it started (and that daemon's children, in the process group it
  leads) is ever signalled, and every instance is stopped at interpreter exit if the test
  did not stop it (``engine.testing.mta``).

Used by tests only; never imported by the running server.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from engine.testing.daemon import LoopbackDaemon
from engine.testing.mta import (
    MtaError,
    check_loopback,
    check_searchable,
    free_port,
)

__all__ = ["EXIM_PACKAGE", "EXIM_USER", "EximError", "EximInstance", "find_exim"]

#: The Debian package whose binary ``tests/run.sh`` unpacks into ``.cache/exim``.
EXIM_PACKAGE: Final = "exim4-daemon-light"
#: The user compiled into Debian's binary (EXIM_USER), looked up by name at start-up.
EXIM_USER: Final = "Debian-exim"
#: Where ``tests/run.sh`` unpacks the package, relative to the repository root.
CACHED_BINARY: Final = Path(".cache/exim/usr/sbin/exim4")
SYSTEM_BINARY: Final = Path("/usr/sbin/exim4")

_REPO: Final = Path(__file__).resolve().parents[2]
_HOSTNAME_OK: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")
#: Logged (to the panic log too) by every Exim process given -C; expected here.
_DROPPED_ROOT: Final = "exim user lost privilege for using -C option"


class EximError(MtaError):
    """Exim could not be configured, started or asked; the message holds its log tail."""


def find_exim() -> Path | None:
    """The Exim binary to run: ``$FERRY_EXIM``, the repository's ``.cache/exim`` (what
    ``tests/run.sh`` unpacks), or a system-wide ``/usr/sbin/exim4``; None if none is
    there."""
    candidates = [_REPO / CACHED_BINARY, SYSTEM_BINARY]
    if os.environ.get("FERRY_EXIM"):
        candidates.insert(0, Path(os.environ["FERRY_EXIM"]))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _list_item(value: str, what: str) -> str:
    """A domain or local part goes into an Exim list and a directory name: keep it to
    the characters that need no quoting in either."""
    if not value or not set(value.lower()) <= _HOSTNAME_OK or value.startswith("."):
        raise EximError(f"{what}: {value!r} must be letters, digits, '.' and '-' only")
    return value


class EximInstance(LoopbackDaemon):
    """One private Exim: its own configuration, spool, log, Maildirs and daemon on loopback.

    ``domains`` and ``local_parts`` are the mailboxes it accepts (every local part in every
    domain); ``tls_cert`` and ``tls_key`` (PEM files, the certificate file may hold the
    chain) make it advertise STARTTLS, which it does not otherwise.  ``port`` None picks a
    free port.
    """

    error = EximError
    listener_name = "exim"

    def __init__(
        self,
        tmpdir: Path,
        domains: Sequence[str] = ("dest.test",),
        local_parts: Sequence[str] = ("bob",),
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        hostname: str = "exim.test",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        binary: Path | None = None,
    ) -> None:
        check_loopback(address, "address", EximError)
        if (tls_cert is None) != (tls_key is None):
            raise EximError("tls_cert and tls_key: both or neither")
        self.dir = Path(tmpdir).resolve()
        self.address = address
        self.port = port or free_port(address)
        self.hostname = _list_item(hostname, "hostname")
        self.domains = [_list_item(d, "domain") for d in domains]
        self.local_parts = [_list_item(lp, "local part") for lp in local_parts]
        self.source_binary = binary or find_exim()
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self.binary = self.dir / "bin" / "exim4"
        self.conf_path = self.dir / "exim.conf"
        self.spool_dir = self.dir / "spool"
        self.log_dir = self.dir / "log"
        self.log_path = self.log_dir / "mainlog"
        self.maildir_root = self.dir / "maildir"
        self.tls_dir = self.dir / "tls"
        self.output_path = self.dir / "exim.out"
        super().__init__()

    def maildir(self, domain: str, local_part: str) -> Path:
        """The Maildir of one mailbox (its ``new/`` holds what was delivered)."""
        return self.maildir_root / domain / local_part

    def config(self) -> str:
        """The configuration file's text (written by :meth:`start`)."""
        if self.tls is not None:
            tls = (
                "tls_advertise_hosts = *\n"
                f"tls_certificate = {self.tls_dir / 'cert.pem'}\n"
                f"tls_privatekey = {self.tls_dir / 'key.pem'}\n"
            )
        else:
            tls = "tls_advertise_hosts =\n"
        return f"""\
# Written by engine.testing.exim for one test instance; see that module.
exim_path = {self.binary}
primary_hostname = {self.hostname}
qualify_domain = {self.hostname}
keep_environment =
spool_directory = {self.spool_dir}
log_file_path = {self.log_dir}/%slog
pid_file_path = {self.dir}/exim.pid
# +8bitmime logs M8S=2 for BODY=8BITMIME; +received_recipients names them on "<=" lines
log_selector = +8bitmime +received_recipients +smtp_connection +tls_cipher +tls_peerdn

# Loopback only, IPv4 only, and nothing that would ask a resolver or call back.
local_interfaces = <; {self.address}.{self.port}
daemon_smtp_ports = {self.port}
disable_ipv6 = true
host_lookup =
rfc1413_hosts =
dkim_verify_signers =
{tls}
domainlist local_domains = {" : ".join(self.domains)}
acl_smtp_mail = acl_check_mail
acl_smtp_rcpt = acl_check_rcpt
acl_smtp_data = acl_check_data

begin acl

# The MAIL command of each message, logged under its id once it has one (see
# mail_command()); Exim's own M8S= field is not reset between the transactions of one
# session, so it cannot tell what a client sent for each message.
acl_check_mail:
  accept set acl_m_mail = $smtp_command

acl_check_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted here

acl_check_data:
  accept logwrite = $message_exim_id command: $acl_m_mail

begin routers

# The only router: every other address is unroutable (a bounce is frozen, never sent).
maildir:
  driver = accept
  domains = +local_domains
  local_parts = {" : ".join(self.local_parts)}
  transport = maildir

begin transports

maildir:
  driver = appendfile
  # $domain_data and $local_part_data come from the lists above, so they are untainted.
  directory = {self.maildir_root}/${{domain_data}}/${{local_part_data}}
  maildir_format
  create_directory
  directory_mode = 0755
  mode = 0644
  # Exim drops root for -C, so it can only deliver as itself.
  user = {EXIM_USER}
  group = {EXIM_USER}
  use_crlf
  return_path_add

begin retry

*  *  F,2m,1s
"""

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Lay out the instance, start the daemon and wait for its 220."""
        if os.geteuid() != 0:
            raise EximError("a private Exim instance needs root (it chowns to Debian-exim)")
        if self.source_binary is None:
            raise EximError(
                f"no Exim binary: run tests/run.sh (it unpacks the Debian package "
                f"{EXIM_PACKAGE} into .cache/exim) or set FERRY_EXIM"
            )
        try:
            user = pwd.getpwnam(EXIM_USER)
        except KeyError:
            raise EximError(
                f"no user {EXIM_USER!r}: Debian's Exim binary looks it up before reading "
                "its configuration; create it as the package would (tests/run.sh does): "
                f"useradd --system --user-group --no-create-home {EXIM_USER}"
            ) from None
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        check_searchable(self.dir, EXIM_USER, EximError)
        self.binary.parent.mkdir(exist_ok=True)
        shutil.copyfile(self.source_binary, self.binary)
        os.chmod(self.binary, 0o755)  # no set-uid bit: this copy never needs root
        for d in (self.spool_dir, self.log_dir, self.maildir_root):
            d.mkdir(exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
        if self.tls is not None:
            self.tls_dir.mkdir(mode=0o755, exist_ok=True)
            for source, name, mode in (
                (self.tls[0], "cert.pem", 0o644),
                (self.tls[1], "key.pem", 0o600),
            ):
                target = self.tls_dir / name
                shutil.copyfile(source, target)
                os.chown(target, user.pw_uid, user.pw_gid)
                os.chmod(target, mode)
        # Exim refuses a configuration file that others may write.
        self.conf_path.write_text(self.config())
        os.chmod(self.conf_path, 0o644)
        self._register()
        try:
            with self.output_path.open("wb") as out:
                # Its own session: the daemon leads a process group, which the delivery
                # and queue-runner processes it forks inherit, and stop() signals that
                # group.  -q2s: a deferred delivery is retried within a test's time.
                self.process = subprocess.Popen(
                    [str(self.binary), "-C", str(self.conf_path), "-bdf", "-q2s"],
                    cwd=self.dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_greeting(timeout)
            # The 220 could come from another listener on that port (Exim keeps retrying
            # a busy port); this line is logged once this daemon's own sockets are bound.
            self.wait_log(rf"daemon started: pid={self.pid},", timeout)
        except BaseException:
            self.stop()
            raise

    def _check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise EximError(
                f"exim exited with status {self.process.returncode} before its 220\n"
                f"{self.log_tail()}"
            )

    # --- mail out, queue, log ------------------------------------------------------------

    def messages(self, domain: str, local_part: str) -> list[bytes]:
        """The files delivered to one mailbox so far, oldest name first."""
        new = self.maildir(domain, local_part) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def mail_command(self, exim_id: str, timeout: float = 30.0, after: int = 0) -> str:
        """The MAIL command (with its ESMTP parameters) of the message Exim received
        as ``exim_id`` (the ``id`` of its Received field)."""
        m = self.wait_log(rf"\s{re.escape(exim_id)} command: (MAIL .*)$", timeout, after)
        return m.group(1)

    def queue_files(self) -> int:
        """Messages in Exim's spool not yet delivered (frozen bounces included)."""
        return sum(1 for p in (self.spool_dir / "input").glob("**/*-H"))

    def log_tail(self, lines: int = 30) -> str:
        """The main log's tail, then the panic log and the daemon's own output, since a
        start-up failure is reported in those two only."""
        parts = [super().log_tail(lines)]
        for path in (self.log_dir / "paniclog", self.output_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                # every process of an instance started with -C says so: not news
                text = [line for line in text if _DROPPED_ROOT not in line]
                if text:
                    parts.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

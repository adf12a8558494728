"""Checks of a loaded configuration against the machine, before anything is opened.

``engine.config`` checks what a file says; this module checks what it names: that each
certificate loads with its private key the way the receive connectors load them, that
``delivery.ca_file`` holds certificates, that each ``[[dkim_sign]]`` key loads as a DKIM
signing key (engine.agents.dkim), that the spool (and the protocol log directory)
is a directory this user can write or create, and (in :func:`advice`) that each egress
source's address is one of this machine's.  :func:`file_problems` is what ``ferry
serve`` runs before it opens the queue, so a swapped certificate and key stop the start
with both file names instead of ``[SSL] PEM lib`` once the queue is open;
:func:`advice` adds the cross-field problems that are not load errors (a server starts
with them, and they surprise the operator later), for ``ferry config check``.

Every problem is one line that starts with the dotted key, as ``ConfigError``'s lines do.
It must never create, change or lock anything, and never echo a key's or a password's
content.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path

from engine.config import Config, ConfigError, ReceiveConfig, name_flags

__all__ = ["advice", "check_files", "file_problems"]


def _read(path: Path) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal; a server cannot answer.
    raise ValueError("encrypted")


def pair_problem(cert: Path, key: Path) -> tuple[str, str] | None:
    """(key name, why) when ``cert`` and ``key`` do not load together, else None."""
    cert_pem, why = _read(cert)
    if cert_pem is None:
        return "cert_file", str(why)
    key_pem, why = _read(key)
    if key_pem is None:
        return "key_file", str(why)
    swapped = " (are cert_file and key_file swapped?)"
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        hint = swapped if b"PRIVATE KEY-----" in cert_pem else ""
        return "cert_file", f"{cert} holds no PEM certificate{hint}"
    if b"PRIVATE KEY-----" not in key_pem:
        hint = swapped if b"-----BEGIN CERTIFICATE-----" in key_pem else ""
        return "key_file", f"{key} holds no PEM private key{hint}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ValueError:
        return "key_file", f"{key} is encrypted with a passphrase; Ferry needs it unencrypted"
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "key_file", f"the private key in {key} does not belong to the certificate " \
                               f"in {cert}"
        if b"ENCRYPTED" in key_pem:
            return "key_file", f"{key} is encrypted with a passphrase; Ferry needs it unencrypted"
        return "key_file", f"the certificate {cert} and the key {key} do not load together: " \
                           f"{exc.reason or exc}"
    return None


def _directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory this process writes, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable by this user (uid {os.geteuid()})"
        return None
    # It is created at start: the nearest existing parent must let us.
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable by this user " \
               f"(uid {os.geteuid()})"
    return None


def file_problems(config: Config) -> list[str]:
    """Every problem with the files and directories ``config`` names, one line each."""
    bad: list[str] = []
    for i, rc in enumerate(config.receive):
        # engine.server.service loads the pair only when TLS is on (config requires both).
        if rc.tls != "off" and rc.cert_file is not None and rc.key_file is not None:
            problem = pair_problem(rc.cert_file, rc.key_file)
            if problem is not None:
                bad.append(f"receive[{i}].{problem[0]}: {problem[1]}")
    ca_file = config.delivery.ca_file
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            bad.append(f"delivery.ca_file: {ca_file} holds no PEM CA certificate that "
                       f"loads ({getattr(exc, 'reason', None) or exc})")
    spool = _directory_problem(config.spool)
    if spool is not None:
        bad.append(f"spool: {spool}")
    else:
        queue = config.spool / "queue"
        if queue.exists() and not queue.is_dir():
            bad.append(f"spool: {queue} (the queue database's directory) is not a directory")
    log_dir = config.log.protocol_log_dir
    if log_dir is not None and any(rc.protocol_log for rc in config.receive):
        log_problem = _directory_problem(log_dir)
        if log_problem is not None:
            bad.append(f"log.protocol_log_dir: {log_problem}")
    if config.dkim_sign:
        from engine.agents.dkim import key_problems  # loads cryptography: only when needed

        bad += key_problems(config)
    return bad


def check_files(config: Config, flags: Iterable[str] = ()) -> None:
    """ConfigError listing :func:`file_problems`, if any (``ferry serve`` before it starts);
    ``flags``: the key flags given, named in the lines of the keys they set."""
    bad = file_problems(config)
    if bad:
        raise ConfigError(name_flags(bad, flags))


def _auth_offered(config: Config, rc: ReceiveConfig) -> bool:
    """Whether this connector ever offers AUTH, as engine.server.service decides it."""
    from engine.server.service import server_settings

    s = server_settings(rc, config.hostname, rc.tls != "off", bool(config.users))
    return bool(s.auth_mechanisms) and (not s.auth_requires_tls or s.starttls or s.implicit_tls)


def advice(config: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings) across keys that loading accepts: a server starts with them.

    A problem makes a part useless (a connector that refuses every MAIL); a warning is a
    setting that has no effect.
    """
    problems: list[str] = []
    warnings: list[str] = []
    for i, rc in enumerate(config.receive):
        if rc.require_auth and not _auth_offered(config, rc):
            problems.append(
                f"receive[{i}].require_auth: AUTH is never offered on this connector (no "
                "[users], auth_mechanisms = [], or tls = \"off\" without "
                "allow_plaintext_auth), so every MAIL would get 530")
        if rc.tls == "off":
            for key in ("cert_file", "key_file"):
                if getattr(rc, key) is not None:
                    warnings.append(f"receive[{i}].{key}: not used while tls = \"off\"")
    if config.users and not any(_auth_offered(config, rc) for rc in config.receive):
        warnings.append("users: no receive connector offers AUTH, so these accounts cannot "
                        "log in (AUTH needs tls on the connector, or allow_plaintext_auth = "
                        "true, and auth_mechanisms)")
    d = config.delivery
    if d.retry_interval > d.max_retry_interval:
        warnings.append(
            f"delivery.retry_interval: larger than delivery.max_retry_interval "
            f"({d.retry_interval:g} > {d.max_retry_interval:g} seconds): every retry waits "
            "max_retry_interval")
    problems += _source_problems(config)
    pooled = {name for pool in config.egress.pools.values() for name in pool.sources}
    warnings += [f"egress.sources.{name}: in no [egress.pools] entry, so nothing is sent "
                 "from it" for name in config.egress.sources if name not in pooled]
    return problems, warnings


def _source_problems(config: Config) -> list[str]:
    """Egress source addresses this machine does not have: every connection from one
    fails at its bind (451 4.4.1), so its mail waits.  A bind to port 0, closed at once,
    is the same test the client's connections make."""
    bad: list[str] = []
    for name, source in config.egress.sources.items():
        if not source.address:
            continue
        family = socket.AF_INET6 if ":" in source.address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((source.address, 0))
        except OSError as exc:
            bad.append(f"egress.sources.{name}.address: {source.address} is not an address "
                       f"of this machine ({exc.strerror or exc}): every connection from it "
                       "would fail and its mail wait")
    return bad

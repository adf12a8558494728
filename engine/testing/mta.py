"""What the private real-MTA instances have in common (``postfix.py``, ``exim.py``).

Owns the parts that do not depend on which MTA runs: the loopback and directory checks,
a free port, the wait for the 220 greeting, reading and waiting on the instance's log,
stopping a process by the PID the instance recorded, and the registry that stops every
instance a test left running when the interpreter exits.

Must never start, signal or wait for a process other than the one an instance started
(it is given a PID, never a name), never connect outside 127.0.0.0/8, and never touch the
system's own MTA configuration.  Used by tests and benchmarks only.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar, Final

from engine.testing.wait import poll

__all__ = [
    "LOOPBACK",
    "LoopbackMta",
    "MtaError",
    "check_loopback",
    "check_searchable",
    "free_port",
    "kill_pid",
    "wait_pid_gone",
]

LOOPBACK: Final = ipaddress.ip_network("127.0.0.0/8")


class MtaError(RuntimeError):
    """The MTA could not be configured, started or asked; the message holds its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, then close)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def check_loopback(address: str, what: str, error: type[MtaError] = MtaError) -> None:
    """``address`` must be an IP address literal in 127.0.0.0/8 (a name would need DNS)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise error(f"{what}: {address!r} is not an IP address") from None
    if ip not in LOOPBACK:
        raise error(f"{what}: {address} is outside 127.0.0.0/8")


def check_searchable(path: Path, who: str, error: type[MtaError] = MtaError) -> None:
    """The MTA's unprivileged user (``who``) reaches files below ``path`` by absolute
    name, so every directory above it must be searchable by others."""
    for parent in [path, *path.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise error(
                f"{parent} is not searchable by others (mode "
                f"{stat.S_IMODE(parent.stat().st_mode):o}); the {who} user "
                "cannot reach the instance below it: use a directory under "
                "/tmp made with tempfile.mkdtemp() and chmod 0755"
            )


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to the process group of a daemon started in a session of its own
    (``start_new_session``), SIGKILL if it is not gone within ``timeout``, then reap it."""
    # The group id is the daemon's PID, ours for as long as the daemon is not reaped
    # (poll() and wait() reap it), so the group is signalled only before that.
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        if not wait_pid_gone(process.pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (or is a zombie of ours); True if it did."""
    return poll(lambda: not _alive(pid) or _zombie(pid), timeout) is not None


def _zombie(pid: int) -> bool:
    try:
        # "pid (comm) S ...": the state follows the last ")" (comm may hold one)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def kill_pid(pid: int) -> None:
    """SIGKILL ``pid``, a process this instance started, if it still runs."""
    if pid and _alive(pid) and not _zombie(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_live: set[LoopbackMta] = set()
_live_lock = threading.Lock()


def _stop_all() -> None:
    with _live_lock:
        instances = list(_live)
    for instance in instances:
        with contextlib.suppress(Exception):
            instance.stop()


atexit.register(_stop_all)


class LoopbackMta:
    """The MTA-independent half of a private instance: its SMTP address, its log, and
    its place in the stop-at-exit registry.  A subclass sets ``address``, ``port`` and
    ``log_path`` in its constructor and implements ``stop()``."""

    #: The exception this MTA's helpers raise (a subclass of MtaError).
    error: ClassVar[type[MtaError]] = MtaError
    #: Shown in errors: "smtpd", "exim".
    listener_name: ClassVar[str] = "smtp"

    address: str
    port: int
    log_path: Path

    def stop(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    # --- the stop-at-exit registry ------------------------------------------------------

    def _register(self) -> None:
        with _live_lock:
            _live.add(self)

    def _unregister(self) -> bool:
        """Leave the registry; False if this instance was not (or no longer) running,
        so ``stop()`` is idempotent."""
        with _live_lock:
            if self not in _live:
                return False
            _live.discard(self)
            return True

    # --- greeting ------------------------------------------------------------------------

    def _check_running(self) -> None:
        """Raise ``error`` if the MTA's process has already exited, so a failed start is
        reported at once instead of after the greeting timeout (no check by default)."""

    def _wait_greeting(self, timeout: float) -> None:
        """Wait for the listener's 220 on ``address:port``, then say QUIT."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_running()
            try:
                with socket.create_connection((self.address, self.port), 2) as s:
                    s.settimeout(5)
                    greeting = s.recv(512)
                    s.sendall(b"QUIT\r\n")
                    if greeting.startswith(b"220"):
                        return
                    last = greeting.decode(errors="replace")
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise self.error(
            f"{self.listener_name} on {self.address}:{self.port} gave no 220 in "
            f"{timeout:.0f} s ({last})\n{self.log_tail()}"
        )

    # --- the log -------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """The log's length now, to pass as ``after`` so a wait sees only newer lines."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the log (from byte
        ``after``), waiting for it up to ``timeout`` seconds."""
        regex = re.compile(pattern, re.MULTILINE)

        def search() -> re.Match[str] | None:
            try:
                with self.log_path.open("rb") as f:
                    f.seek(after)
                    return regex.search(f.read().decode(errors="replace"))
            except FileNotFoundError:
                return None

        m = poll(search, timeout)
        if m is None:
            raise self.error(
                f"no log line matching {pattern!r} after {timeout:.0f} s\n{self.log_tail()}"
            )
        return m

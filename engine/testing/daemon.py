"""A scanner daemon (rspamd, clamd) run as a child of the test: what the two have in common.

Owns starting the daemon in the foreground in a session of its own (so the workers it forks
share its process group), waiting until one probe of it answers, and stopping it by that
PID's group: SIGTERM, then SIGKILL after a bounded wait.  The stop-at-exit registry and the
log helpers are those of the private MTAs (``engine.testing.mta``).

Must never signal a process it did not start (it is handed a PID, never a name), never
listen or connect outside 127.0.0.0/8, and never read or change the system's own
configuration of the daemon: every file the daemon reads or writes is in the instance's
directory.  The packages' system services are never needed (their postinst may start them
under systemd on a real machine; nothing here talks to them).  Used by tests only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import ClassVar, Self

from engine.testing.mta import LoopbackMta, MtaError, stop_group
from engine.testing.wait import poll

__all__ = ["DaemonError", "LoopbackDaemon"]


class DaemonError(MtaError):
    """The daemon could not be configured or started; the message holds its log tail."""


class LoopbackDaemon(LoopbackMta):
    """A daemon child process on 127.0.0.1.  A subclass sets ``address``, ``port``,
    ``log_path`` and ``output_path``, writes its configuration in ``_prepare()``, and
    defines ``_command()`` and ``_probe()`` (one attempt at the daemon's own "are you
    there": True when it answered)."""

    error: ClassVar[type[MtaError]] = DaemonError
    listener_name: ClassVar[str] = "daemon"

    output_path: Path

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def _prepare(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, start the daemon, wait until it answers its probe."""
        self._prepare()
        self._register()
        try:
            with self.output_path.open("wb") as out:
                self.process = subprocess.Popen(
                    self._command(), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
            if not poll(self._answered, timeout, 0.1):
                raise self.error(f"{self.listener_name} on {self.address}:{self.port} "
                                 f"did not answer in {timeout:.0f} s\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _answered(self) -> bool:
        """The probe answered; a daemon that exited fails at once, not at the deadline."""
        self._check_running()
        return self._probe()

    def _check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            output = self.output_path.read_text(errors="replace")[-2000:]
            raise self.error(f"{self.listener_name} exited with status "
                             f"{self.process.returncode} before it answered\n{output}\n"
                             f"{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the daemon and the workers it forked; idempotent."""
        if not self._unregister():
            return
        process, self.process = self.process, None
        if process is None:
            return
        stop_group(process, timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

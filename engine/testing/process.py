"""A real ``ferry serve`` child process for tests and torture runs: start it (timed to its
SMTP greeting), kill -9 it, stop it with SIGTERM.

Test-side only (never imported by the running server); every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: The checkout: the child imports the same engine as the test.
ROOT = Path(__file__).resolve().parents[2]


class FerryProcess:
    """``ferry serve`` with ``args`` (after ``serve``), run in ``workdir`` and logged to
    ``workdir/ferry.log``, greeting on 127.0.0.1:``port``."""

    def __init__(self, workdir: Path, port: int, args: Sequence[str]) -> None:
        self.workdir = workdir
        self.port = port
        self.args = [sys.executable, "-m", "engine", "serve", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.greeted = 0.0
        self.starts = 0

    def start(self, timeout: float = 30) -> float:
        """Start and wait for a 220 greeting; the seconds it took.  RuntimeError when the
        process exits or does not greet in time (its log says why)."""
        self.starts += 1
        # The FERRY_* switches (extensions or not) come from our own environment.
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.workdir / "ferry.log", "ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            started = time.monotonic()
            self.proc = subprocess.Popen(self.args, cwd=self.workdir, env=env, stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry exited with {self.proc.returncode}: "
                                   + (self.workdir / "ferry.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    if s.recv(512).startswith(b"220"):
                        self.greeted = time.monotonic()
                        return self.greeted - started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"no greeting within {timeout} s; see {self.workdir / 'ferry.log'}")

    def workers(self) -> list[int]:
        """The pids of the node's worker processes (``--workers``), in start order."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return []
        out = []
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"engine.cluster.worker" in cmdline:
                out.append(int(child))
        return out

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def abandon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

"""Capturing Ferry's log lines in a test: a real handler on the real logger.

``with CapturedLog() as log: ...; log.wait("back pressure cleared")`` collects every line
the ``ferry`` loggers write (from any thread: the application's loop runs in its own) as
the text format writes it, and waits, bounded, for a line to appear.  Test-side only,
never used by the running server.
"""

from __future__ import annotations

import logging
import threading

from engine.ops import logfmt
from engine.testing.wait import wait_for


class CapturedLog(logging.Handler):
    def __init__(self, logger: str = "ferry", fmt: logging.Formatter | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(fmt or logging.Formatter(logfmt.TEXT))
        self.logger = logging.getLogger(logger)
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with self._lock:
            self.records.append(record)
            self._lines.append(text)

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    def wait(self, text: str, timeout: float = 20.0) -> str:
        """The first line that contains ``text``, once there is one."""
        return wait_for(lambda: next(iter(self.matching(text)), None), timeout,
                        f"a log line with {text!r}; lines: {self.lines}")

    def __enter__(self) -> CapturedLog:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)

"""The process log's line formats: ``text`` (one human line) and ``json`` (one object a line).

``ferry serve`` (``engine.cli.main``) decides where the log goes (standard error) with
:func:`install`; the application (``engine.app``) applies ``[log] format`` with
:func:`use` when it starts, next to ``[log] level``.  A test that runs the application
in its own process installs nothing, so its log stays the test runner's.

A JSON line has ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger`` and
``message``, then the record's structured fields: a mail log line
(``engine.ops.maillog``) and a refusal line carry their fields as the ``fields``
attribute of the log record (``extra={"fields": {...}}``), and each becomes a key, so a
log shipper needs no pattern.  A traceback goes in ``exception``.

This module must never decide what is logged, only how a line looks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import IO, Any

import orjson

from engine.ops.events import iso_time

#: The text format: what ``ferry serve`` has always written.
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

#: Keys of every JSON line; a record's field of the same name does not replace them (the
#: event's own ``time`` is within one turn of the event loop of the line's).
_BASE = ("time", "level", "logger", "message")


class TextFormatter(logging.Formatter):
    """:data:`TEXT`, with the time of day worked out once a second, not once a line (the
    mail log writes a line per event)."""

    def __init__(self) -> None:
        super().__init__(TEXT)
        self._cache = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached, stamp = self._cache
        if second != cached:
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._cache = (second, stamp)
        return f"{stamp},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, UTF-8, no newline inside (JSON escapes them)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname,
                                "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


def formatter(name: str) -> logging.Formatter:
    """The formatter of ``[log] format``."""
    if name == "json":
        return JsonFormatter()
    if name == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {FORMATS} (got {name!r})")


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, inside :func:`batched`, gathers the lines and writes them
    with one write and one flush at the end: the mail log hands over a batch of events
    per turn of the event loop, and a write and a flush per line cost it a system call
    each (most of a line's cost)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._lines: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        lines = self._lines
        if lines is None:
            super().emit(record)
            return
        try:
            lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def start(self) -> None:
        self._lines = []

    def finish(self) -> None:
        lines, self._lines = self._lines, None
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "%d log lines lost",
                                                    "args": (len(lines),)}))


    def write_texts(self, record: logging.LogRecord, texts: list[str]) -> None:
        """Write one line per text, each as ``record`` with that text as its message
        would be formatted, in one write (or into the open batch).  Only for the text
        format (:func:`text_handlers`): its message is the end of the line, so the rest
        of the line is formatted once for all of them."""
        try:
            prefix = self.format(record)
            lines = [prefix + text for text in texts]
        except Exception:
            self.handleError(record)
            return
        if self._lines is not None:
            self._lines += lines
            return
        with self.lock:  # type: ignore[union-attr]  # Handler.createLock() made it
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.flush()
            except Exception:
                self.handleError(record)


#: The handlers :func:`install` made: the ones :func:`use` sets the format of.
_installed: list[BatchingHandler] = []


def text_handlers(logger: logging.Logger) -> list[BatchingHandler] | None:
    """The handlers an INFO record of ``logger`` reaches, when every one of them is an
    installed handler writing the text format and nothing on the way filters records:
    a caller may then format a burst of lines once (:meth:`BatchingHandler.write_texts`)
    instead of making and handling a record per line.  ``None`` otherwise (another
    handler, as in tests, a filter, or the JSON format, which carries each record's
    fields): log records as usual."""
    found: list[BatchingHandler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        for handler in current.handlers:
            if (not isinstance(handler, BatchingHandler) or handler not in _installed
                    or handler.filters or handler.level > logging.INFO
                    or type(handler.formatter) is not TextFormatter):
                return None
            found.append(handler)
        if not current.propagate:
            break
        current = current.parent
    return found or None


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Lines logged inside go out together at the end (one write per handler); only
    for a burst logged in one go on the event loop, never across an ``await``."""
    for handler in _installed:
        handler.start()
    try:
        yield
    finally:
        for handler in _installed:
            handler.finish()


def install(stream: IO[str]) -> BatchingHandler:
    """Write the process log (every logger, through the root) to ``stream`` as text until
    :func:`use` says otherwise."""
    # No format here names a thread or a process: LogRecord need not look them up for
    # every line (the server's own process only; tests keep the defaults).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BatchingHandler(stream)
    handler.setFormatter(formatter("text"))
    logging.getLogger().addHandler(handler)
    _installed.append(handler)
    return handler


def use(name: str) -> None:
    """Write the installed handlers' lines in format ``name`` (``[log] format``)."""
    chosen = formatter(name)
    for handler in _installed:
        handler.setFormatter(chosen)

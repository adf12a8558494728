"""Anti-malware with ClamAV: the "clamav" agent, at the end of data.

Owns one clamd INSTREAM exchange per message (clamd(8), "zINSTREAM"): on a new connection to
clamd's socket (``address``: "unix:/path" or "HOST:PORT"), the command, then the message in
chunks, each preceded by its length as a 4-byte unsigned integer in network byte order, then
a zero length; clamd answers one NUL-terminated line and closes:

- ``stream: OK``: accepted (with ``scanned_header`` when set);
- ``stream: <name> FOUND``: ``action`` "reject" answers ``554 5.7.1 Message rejected: virus
  found: <name>`` (the name cleaned of anything but printable ASCII), "hold" quarantines;
- ``... ERROR`` (e.g. "INSTREAM size limit exceeded"), another answer, or none: raises
  :class:`ClamavError`, and the chain's ``fail`` decides (closed by default: 451).

The chunks are slices of a memoryview of the session's buffer: the message is never copied
here, and each chunk is drained before the next is written, so a large message never waits
whole in a socket buffer.  A message larger than ``max_size`` (which must not exceed clamd's
StreamMaxLength) is not sent: ``on_oversize`` accepts it unscanned, with a log line, or
answers 451.  At most ``max_concurrent`` scans run at once; the others wait their turn
within the chain's time budget.

Must never write to the SMTP socket or the queue, and never block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Final

from engine.agents.api import (
    ACCEPT,
    Agent,
    Message,
    Session,
    Transaction,
    Verdict,
    add_header,
    hold,
    reject,
    tempfail,
)
from engine.agents.scan import ScannerContext, chunks, printable
from engine.config import ClamavAgentConfig, parse_hostport

__all__ = ["ClamavAgent", "ClamavError", "build_clamav"]

log = logging.getLogger("ferry.agents.clamav")

#: clamd's answer is one short line; a longer one is not clamd.
MAX_ANSWER: Final = 4096
_FOUND: Final = " FOUND"
_PREFIX: Final = "stream: "


class ClamavError(Exception):
    """clamd did not scan the message (its ERROR, no answer, or a broken connection)."""


class ClamavAgent(Agent):
    """The ClamAV agent; ``config`` is its [agents.clamav] table, ``hostname`` this server's
    name (for ``scanned_header``)."""

    name = "clamav"

    def __init__(self, config: ClamavAgentConfig, hostname: str) -> None:
        super().__init__(timeout=config.timeout, fail_open=config.fail == "open")
        self.config = config
        self.hostname = hostname
        self._unix_path = config.address[5:] if config.address.startswith("unix:") else ""
        self._hostport = None if self._unix_path else parse_hostport(config.address)
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._action, self._on_oversize = config.action, config.on_oversize
        self._scanned_header = config.scanned_header

    def data(self, session: Session, tx: Transaction,
             message: Message) -> Verdict | Awaitable[Verdict]:
        if message.size > self.config.max_size:
            log.warning("%s: not scanned by clamav: %d bytes, over max_size %d (%s)",
                        session.session_id, message.size, self.config.max_size,
                        self._on_oversize)
            if self._on_oversize == "tempfail":
                return tempfail("Message too large to scan for viruses", 451, "4.7.1")
            return ACCEPT
        return self._scan(session, message)

    async def _scan(self, session: Session, message: Message) -> Verdict:
        async with self._slots:
            answer = await self.instream(message.data)
        verdict = self.verdict(answer)
        log.debug("%s: clamav: %s", session.session_id, answer)
        return verdict

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix_path:
            return await asyncio.open_unix_connection(self._unix_path, limit=MAX_ANSWER)
        assert self._hostport is not None
        return await asyncio.open_connection(*self._hostport, limit=MAX_ANSWER)

    async def instream(self, data: bytes) -> str:
        """clamd's answer for ``data``, without its NUL."""
        try:
            reader, writer = await self._connect()
        except OSError as err:
            raise ClamavError(f"cannot connect to clamd at {self.config.address}: {err}") \
                from None
        try:
            broken: OSError | None = None
            try:
                writer.write(b"zINSTREAM\0")
                for chunk in chunks(data):
                    writer.write(len(chunk).to_bytes(4, "big"))
                    writer.write(chunk)
                    await writer.drain()
                writer.write(b"\0\0\0\0")
                await writer.drain()
            except ConnectionError as err:
                # clamd answers and closes as soon as the stream passes its
                # StreamMaxLength: its answer may still be there to read.
                broken = err
            try:
                line = await reader.readuntil(b"\0")
            except (asyncio.IncompleteReadError, ConnectionError) as err:
                how = (f" while the message was sent ({broken}; is max_size above its "
                       "StreamMaxLength?)") if broken else ""
                raise ClamavError(f"clamd at {self.config.address} closed the connection "
                                  f"without an answer{how}") from err
            except asyncio.LimitOverrunError as err:
                raise ClamavError(f"clamd at {self.config.address} answered more than "
                                  f"{MAX_ANSWER} bytes") from err
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return line[:-1].decode("latin-1")

    def verdict(self, answer: str) -> Verdict:
        """The verdict for clamd's answer (one line, without its NUL)."""
        if answer == _PREFIX + "OK":
            if self._scanned_header:
                return add_header(self._scanned_header, f"clamav at {self.hostname}")
            return ACCEPT
        if answer.startswith(_PREFIX) and answer.endswith(_FOUND):
            # Virus names are ASCII words with dots; anything else is not repeated.
            virus = printable(answer[len(_PREFIX):-len(_FOUND)].strip(), 100) or "unknown"
            if self._action == "hold":
                return hold(f"virus found: {virus}")
            return reject(f"Message rejected: virus found: {virus}", 554, "5.7.1",
                          reason=f"virus found: {virus}")
        raise ClamavError(f"clamd at {self.config.address} did not scan the message: "
                          f"{printable(answer, 200)}")


def build_clamav(ctx: ScannerContext) -> ClamavAgent:
    """The "clamav" agent from [agents.clamav]."""
    return ClamavAgent(ctx.config.agents.clamav, ctx.hostname)

"""A counting SMTP sink for delivery tests: aiosmtpd servers on many loopback addresses.

Each listening address stands for one destination's MX host.  The sink records every
message it is given (envelope and body, per address) and measures, per address, the
number of connections open at once and its peak, so a test can assert that Ferry never
opened more connections to a destination than its limit.  Optional ``reply_delay`` holds
the reply to the final dot, so connections overlap.  It offers PIPELINING (unless
``pipelining=False``), so Ferry pipelines envelopes and sends follow-on messages behind
bodies, as it does with real MTAs.  Runs on its own event loop in a background thread.
Never used by the running server.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    sender: str
    recipients: list[str]
    body: bytes
    address: str
    #: the client's address (an egress source's) and the name it gave in EHLO
    peer: str = ""
    helo: str = ""


@dataclass
class SinkState:
    messages: list[Received] = field(default_factory=list)
    open: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    connections: Counter[str] = field(default_factory=Counter)
    peak_total: int = 0
    #: recipient address → the reply to give its RCPT (e.g. "550 5.1.1 No such user")
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    #: reply to the final dot ("250 OK" by default), per listening address
    data_replies: dict[str, str] = field(default_factory=lambda: defaultdict(lambda: ""))
    #: the same figures per client address (the egress source Ferry bound), and the EHLO
    #: names each client address gave
    peer_open: Counter[str] = field(default_factory=Counter)
    peer_peak: Counter[str] = field(default_factory=Counter)
    peer_connections: Counter[str] = field(default_factory=Counter)
    peer_helo: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


class _Handler:
    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if session.peer:
            self.sink.state.peer_helo[session.peer[0]].add(hostname)
        if self.sink.pipelining:
            # aiosmtpd reads commands one at a time from its stream, so pipelined input
            # (RFC 2920) works; it just does not say so.
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.sink.state.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        local = server.transport.get_extra_info("sockname")[0] if server.transport else "?"
        if self.sink.reply_delay:
            await asyncio.sleep(self.sink.reply_delay)
        if self.sink.hold is not None:
            await self.sink.hold(envelope)
        reply = self.sink.state.data_replies[local]
        peer = session.peer[0] if session.peer else ""
        if self.sink.answer is not None:
            reply = self.sink.answer(envelope, peer) or reply
        if reply and not reply.startswith("2"):
            return reply
        content = envelope.original_content or b""
        self.sink.state.messages.append(Received(envelope.mail_from or "",
                                                 list(envelope.rcpt_tos), content, local,
                                                 peer, session.host_name or ""))
        return reply or "250 2.0.0 OK"


class _CountingSMTP(SMTP):
    def __init__(self, sink: CountingSink, **kw: Any) -> None:
        super().__init__(_Handler(sink), **kw)
        self._sink = sink
        self._local = "?"
        self._peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._local = transport.get_extra_info("sockname")[0]
        self._peer = peer = transport.get_extra_info("peername")[0]
        self._sink.transports.add(transport)
        state = self._sink.state
        state.open[self._local] += 1
        state.connections[self._local] += 1
        state.peak[self._local] = max(state.peak[self._local], state.open[self._local])
        state.peak_total = max(state.peak_total, sum(state.open.values()))
        state.peer_open[peer] += 1
        state.peer_connections[peer] += 1
        state.peer_peak[peer] = max(state.peer_peak[peer], state.peer_open[peer])
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink.state.open[self._local] -= 1
        self._sink.state.peer_open[self._peer] -= 1
        if self.transport is not None:
            self._sink.transports.discard(self.transport)
        super().connection_lost(exc)


class CountingSink:
    """``CountingSink(["127.0.1.1", ...], port)``: one listener per address, same port."""

    def __init__(self, addresses: list[str], port: int = 0, reply_delay: float = 0.0,
                 smtputf8: bool = True, pipelining: bool = True) -> None:
        self.addresses = addresses
        self.reply_delay = reply_delay
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        #: Awaited (on the sink's loop) before the reply to a message's final dot: a test
        #: holds one transaction open with it.
        self.hold: Callable[[Envelope], Awaitable[None]] | None = None
        #: Called (on the sink's loop) with each message and the client's address before
        #: the reply to its final dot: a reply to give instead ("421 4.7.28 ..."), or None
        #: for the usual one.
        self.answer: Callable[[Envelope, str], str | None] | None = None
        self.state = SinkState()
        self.transports: set[asyncio.BaseTransport] = set()
        self.loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="counting-sink")
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(60)

    async def _start(self, port: int) -> int:
        for address in self.addresses:
            server = await self.loop.create_server(
                lambda: _CountingSMTP(self, enable_SMTPUTF8=self.smtputf8, decode_data=False,
                                      hostname="sink.test", timeout=30),
                address, port, reuse_address=True, backlog=4096)
            if not port:
                port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        return port

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for transport in list(self.transports):
                transport.close()
            await asyncio.sleep(0.05)
            for server in self._servers:
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

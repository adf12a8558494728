"""A webhook receiver for tests and benchmarks: an aiohttp server on 127.0.0.1, on its own
event loop in a thread, that answers each POST with a scripted status and keeps what came.

``Receiver(secret, fail=2)`` answers the first two POSTs 500 and the others 200 (``stall``:
the first ones get no answer at all; ``tls``: it speaks https); every
request is kept (:attr:`Receiver.requests`: body, signature header, whether the signature
verified, the status answered), and the events of the accepted ones are
:meth:`Receiver.events`.  Never used by the running server.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from engine.ops.webhooks import SIGNATURE_HEADER, verify


@dataclass(frozen=True, slots=True)
class Request:
    body: bytes
    content_type: str
    signature: str
    verified: bool
    status: int

    @property
    def events(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = orjson.loads(self.body)
        return records


class Receiver:
    """See the module docstring.  ``port`` 0 picks a free one; ``status`` is answered once
    the ``fail`` first requests got ``fail_status``; :meth:`answer` changes it."""

    def __init__(self, secret: str, *, fail: int = 0, fail_status: int = 500,
                 status: int = 200, port: int = 0, keep: bool = True, stall: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.secret = secret
        #: the first ``stall`` requests get no answer until the client gives up
        self.stall = stall
        self.tls = tls
        self.fail = fail
        self.fail_status = fail_status
        self.status = status
        self.keep = keep
        self.requests: list[Request] = []
        #: events accepted (counted even when ``keep`` is off: a benchmark's receiver)
        self.accepted = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="webhook-receiver",
                                        daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(10)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook"

    async def _start(self, port: int) -> int:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        app.router.add_get("/count", self._count)
        self._runner = runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=self.tls)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            stalled = self.stall > 0
            self.stall -= stalled
        if stalled:
            # Until the receiver stops (aiohttp does not cancel a handler whose client
            # went away, and its cleanup waits for handlers).
            await self._closing.wait()
        signature = request.headers.get(SIGNATURE_HEADER, "")
        with self.lock:
            if self.fail > 0:
                self.fail -= 1
                status = self.fail_status
            else:
                status = self.status
            ok = 200 <= status < 300
            if ok and not self.keep:
                self.accepted += body.count(b'{"event_id":')
            if self.keep:
                record = Request(body, request.content_type, signature,
                                 verify(self.secret, body, signature), status)
                self.requests.append(record)
                if ok:
                    self.accepted += len(record.events)
        return web.Response(status=status, text="" if ok else "receiver says no")

    async def _count(self, request: web.Request) -> web.Response:
        """How many events were accepted (for a receiver in another process)."""
        return web.json_response({"accepted": self.accepted})

    def answer(self, status: int) -> None:
        with self.lock:
            self.status = status

    def events(self) -> list[dict[str, Any]]:
        """The events of the accepted requests, in the order they came."""
        with self.lock:
            return [e for r in self.requests if 200 <= r.status < 300 for e in r.events]

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self._closing.set)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.testing.webhooks PORT SECRET``: a receiver that keeps nothing
    but its count (``GET /count``), until SIGTERM (benchmarks run it apart from Ferry, so
    that it does not share Ferry's CPU and GIL)."""
    import signal
    import sys

    port, secret = (argv or sys.argv[1:])[:2]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Receiver(secret, port=int(port), keep=False):
        print("ready", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

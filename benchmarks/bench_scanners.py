"""The content scanners' agents against the bare protocol, on the same daemons in one run.

Run: ``.venv/bin/python benchmarks/bench_scanners.py [--quick]`` (about a minute; rspamd
takes seconds to start).

Set-up: a private rspamd and clamd (engine.testing.rspamd / clamav: their own
configuration on 127.0.0.1, the test signature database), started here and stopped by PID.
For each scanner and message size (1 KiB, 100 KiB, 1 MiB of plain text), a fixed number of
scans with 20 at once on one uvloop loop, measured two ways in alternation:

- ``agent``: ``RspamdAgent.data`` / ``ClamavAgent.data`` with real Session, Transaction and
  Message values (the request headers, the chunked body from a view of the buffer, the
  verdict and its header changes);
- ``bare``: the same exchange written the shortest way: one aiohttp POST of the bytes
  with the same envelope headers and ``json.loads`` of the answer; one clamd connection,
  ``zINSTREAM`` with the message as one chunk (concatenated: a copy) and the answer read.

Printed: scans per second for each and agent / bare.  The daemons do the work, so the
ratio says what the agent adds around them; the machine may be shared, so absolute figures
vary from run to run, the ratio less.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from engine.agents.api import Message, Session, Transaction, Verdict
from engine.agents.clamav import ClamavAgent
from engine.agents.rspamd import RspamdAgent
from engine.config import ClamavAgentConfig, RspamdAgentConfig
from engine.protocol.command import parse_command
from engine.testing.clamav import ClamdInstance
from engine.testing.rspamd import RspamdInstance

SESSION = Session("smtp-bench", "default", ipaddress.ip_address("192.0.2.10"),
                  helo="client.example.com", esmtp=True)
TX = Transaction(mail=parse_command(b"MAIL FROM:<alice@example.com>"),
                 recipients=(parse_command(b"RCPT TO:<bob@example.org>"),))
CONCURRENCY = 20
#: The envelope the agent sends, written out, so rspamd does the same work for both.
BARE_HEADERS = {"IP": "192.0.2.10", "Helo": "client.example.com",
                "From": "alice@example.com", "Rcpt": "bob@example.org", "MTA-Name": "bench"}


def make_message(size: int) -> bytes:
    header = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
              b"Subject: benchmark\r\nMessage-ID: <b@example.com>\r\n"
              b"Date: Mon, 07 Dec 2026 00:00:00 +0000\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


async def rate(scan: Callable[[], Awaitable[object]], count: int) -> float:
    """Scans per second: ``count`` calls of ``scan``, CONCURRENCY at once."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await scan()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


Scan = Callable[[], Awaitable[object]]


async def verdict(answer: Verdict | Awaitable[Verdict]) -> Verdict:
    return answer if isinstance(answer, Verdict) else await answer


def scans(rspamd: RspamdInstance, clamd: ClamdInstance, r_agent: RspamdAgent,
          c_agent: ClamavAgent, http: aiohttp.ClientSession,
          data: bytes) -> list[tuple[str, Scan, Scan]]:
    """(scanner, the agent's scan, the bare protocol's scan) of message ``data``."""
    msg = Message(data)

    async def agent_rspamd() -> object:
        return await verdict(r_agent.data(SESSION, TX, msg))

    async def bare_rspamd() -> object:
        async with http.post(f"{rspamd.url}/checkv2", data=data,
                             headers=BARE_HEADERS) as answer:
            return json.loads(await answer.read())

    async def agent_clamav() -> object:
        return await verdict(c_agent.data(SESSION, TX, msg))

    async def bare_clamav() -> object:
        reader, writer = await asyncio.open_unix_connection(str(clamd.socket_path))
        writer.write(b"zINSTREAM\0" + len(data).to_bytes(4, "big") + data + b"\0\0\0\0")
        answer = await reader.readuntil(b"\0")
        writer.close()
        await writer.wait_closed()
        return answer

    return [("rspamd", agent_rspamd, bare_rspamd), ("clamav", agent_clamav, bare_clamav)]


async def bench(rspamd: RspamdInstance, clamd: ClamdInstance, quick: bool) -> None:
    r_agent = RspamdAgent(RspamdAgentConfig(url=rspamd.url, max_size=1 << 30), "bench")
    c_agent = ClamavAgent(ClamavAgentConfig(address=clamd.unix_address,
                                            max_concurrent=CONCURRENCY), "bench")
    await r_agent.start()
    http = aiohttp.ClientSession()
    print(f"{'scanner':8} {'size':>8} {'agent/s':>9} {'bare/s':>9} {'agent/bare':>10}")
    try:
        for size, count in ((1 << 10, 600), (100 << 10, 300), (1 << 20, 60)):
            count //= 3 if quick else 1
            for name, agent, bare in scans(rspamd, clamd, r_agent, c_agent, http,
                                           make_message(size)):
                await rate(agent, CONCURRENCY)  # warm up (connections, caches)
                a = b = 0.0
                for _ in range(2):  # alternate, to share the machine's noise
                    a += await rate(agent, count // 2)
                    b += await rate(bare, count // 2)
                print(f"{name:8} {size:>8} {a / 2:>9.0f} {b / 2:>9.0f} {a / b:>10.2f}")
    finally:
        await http.close()
        await r_agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a third of the scans")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-scanners-"))
    try:
        for d in ("rspamd", "clamd"):
            (base / d).mkdir()
        with RspamdInstance(base / "rspamd") as rspamd, \
                ClamdInstance(base / "clamd", max_threads=CONCURRENCY) as clamd:
            uvloop.run(bench(rspamd, clamd, args.quick))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

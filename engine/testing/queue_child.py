"""A producer for crash tests: enqueues as fast as it can and reports each acknowledgement.

``python -m engine.testing.queue_child SPOOL [PRODUCERS]`` writes one line per message to
stdout, ``<queue id hex> <sha256 of the body>``, only after ``enqueue`` returned, so every
line names a message the queue has promised to keep.  The parent kills it with SIGKILL at
random moments and checks the promise on the spool.  Never used by the running server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys

import uvloop

from engine.queue.api import BackPressure
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, Recipient


async def produce(store: LmdbQueue, out: list[str]) -> None:
    rnd = random.Random()
    while True:
        body = os.urandom(rnd.randint(100, 30_000))
        env = Envelope("a@b.test", [Recipient("c@d.test", "d.test")])
        try:
            qid = await store.enqueue(env, body)
        except BackPressure:
            await asyncio.sleep(0.01)
            continue
        out.append(f"{qid.hex()} {hashlib.sha256(body).hexdigest()}\n")


async def main(spool: str, producers: int) -> None:
    store = LmdbQueue(spool, min_free_disk=0)
    out: list[str] = []
    tasks = [asyncio.create_task(produce(store, out)) for _ in range(producers)]
    while True:
        await asyncio.sleep(0.002)
        if out:
            sys.stdout.write("".join(out))
            sys.stdout.flush()
            out.clear()
        for task in tasks:
            if task.done():
                task.result()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20))

"""The HTTP listener of ``ferry serve --workers 2``: every worker accepts on it (SO_REUSEPORT
copies, as the receive connectors'), and a keyed injection is handled by the worker that
owns its Idempotency-Key wherever it arrives (engine.http.forward).

Real processes on 127.0.0.1: the supervisor and its two workers, requests over urllib on
a new connection each (so the kernel picks a worker for each), a sink that defers every
message so the mail stays queued where it was stored.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from engine.cluster.shards import shard_spool
from engine.http.forward import owner
from engine.testing.dns import DnsResponder
from engine.testing.torture import DOMAIN, SINK_ADDRESS, TortureFerry, TortureSink, free_port
from engine.testing.wait import wait_for
from tests.e2e.test_workers import _pair, _received

CLIENT = "127.0.0.5"
MESSAGE = f"From: a@client.test\r\nTo: b@{DOMAIN}\r\nSubject: keyed\r\n\r\nhello\r\n"


def _post(port: int, key: str | None = None) -> tuple[int, dict[str, object], str]:
    status, doc, headers = _exchange(port, key)
    return status, doc, headers.get("Idempotent-Replayed", "")


def _exchange(port: int, key: str | None) -> tuple[int, dict[str, object],
                                                  http.client.HTTPMessage]:
    """One request on a connection of its own, from 127.0.0.5 (the address the stored
    message must name, whichever worker served it)."""
    body = orjson.dumps({"from": "a@client.test", "recipients": [f"b@{DOMAIN}"],
                         "content": MESSAGE})
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                            source_address=(CLIENT, 0))
    try:
        connection.request("POST", "/api/v1/messages", body, headers)
        answer = connection.getresponse()
        return answer.status, orjson.loads(answer.read()), answer.headers
    finally:
        connection.close()


def _received_all(spool: Path) -> list[str]:
    return [qid for i in (0, 1) for qid in _received(shard_spool(spool, i))]


def test_every_worker_serves_http_and_a_key_is_kept_by_one(tmp_path: Path) -> None:
    sink = TortureSink([SINK_ADDRESS], reply_delay=0.0)
    sink.state.data_replies[SINK_ADDRESS] = "451 4.3.0 not now"  # the mail stays queued
    responder = DnsResponder(f"$TTL 300\n{DOMAIN}. IN MX 10 mx.{DOMAIN}.\n"
                             f"mx.{DOMAIN}. IN A {SINK_ADDRESS}\n")
    port, http = free_port(), free_port()
    node = TortureFerry(tmp_path, port, responder.start(), sink.port, 4,
                        extra=("--workers", "2", "--http", f"127.0.0.1:{http}"))
    spool = tmp_path / "spool"
    try:
        node.start()
        wait_for(lambda: _pair(node.workers()), what="two workers")
        # Without a key: served where it arrives, so both shards take some (20 new
        # connections all hashed to one worker: one chance in half a million).
        for _ in range(20):
            status, answer, _ = _post(http)
            assert (status, answer["recipients"]) == (200, 1)
        wait_for(lambda: len(_received_all(spool)) == 20, 30, "20 RECEIVE records")
        assert all(_received(shard_spool(spool, i)) for i in (0, 1))

        # With a key: the same request four times, each on a new connection (so through
        # either worker): one message, stored once, in the shard of the worker that owns
        # the key (where a retry's check finds it), every answer its id.
        ids = []
        for key in ("order-7", "order-8", "order-9"):
            answers = [_post(http, key) for _ in range(4)]
            assert {status for status, _, _ in answers} == {200}
            assert [replayed for _, _, replayed in answers] == ["", "true", "true", "true"]
            (qid,) = {str(answer["id"]) for _, answer, _ in answers}
            ids.append(qid)
        wait_for(lambda: len(_received_all(spool)) == 23, 30, "the keyed RECEIVE records")
        for key, qid in zip(("order-7", "order-8", "order-9"), ids, strict=True):
            assert _received_all(spool).count(qid) == 1
            assert qid in _received(shard_spool(spool, owner("loopback", key, 2)))
            # Stored as the client sent it, from the client's address, whichever worker
            # it reached first (a forwarded request carries it).
            exported = subprocess.run([sys.executable, "-m", "engine", "queue", "--spool",
                                       str(spool), "export", qid], capture_output=True,
                                      timeout=60)
            assert exported.returncode == 0, exported.stderr
            received = exported.stdout.split(b"\r\n\r\n", 1)[0]
            assert received.startswith(b"Received: from unknown ([127.0.0.5])"), received
            assert exported.stdout.endswith(b"\r\n\r\nhello\r\n")
        # Its owner gone (kill -9, until the supervisor starts it again): a keyed request
        # that reaches the other worker gets a 503 with Retry-After, never a second copy;
        # one that waits for the owner in its listener's backlog gets the first answer.
        os.kill(node.workers()[1], signal.SIGKILL)
        assert owner("loopback", "order-8", 2) == 1
        with ThreadPoolExecutor(20) as pool:
            tries = list(pool.map(lambda _: _exchange(http, "order-8"), range(20)))
        refused = [(doc, headers) for status, doc, headers in tries if status == 503]
        assert refused, [status for status, _, _ in tries]
        for doc, headers in refused:
            assert headers["Retry-After"] == "1" and "does not answer" in str(doc["detail"])
        assert {str(doc["id"]) for status, doc, _ in tries if status != 503} <= {ids[1]}
        assert {status for status, _, _ in tries} <= {200, 503}
        wait_for(lambda: _pair(node.workers()), 30, "worker 1 started again")
        assert _post(http, "order-8")[1]["id"] == ids[1]
        assert node.stop() == 0
    finally:
        node.abandon()
        responder.stop()
        sink.stop()

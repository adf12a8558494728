"""Webhook events in the queue database (real LMDB, the writer thread): stored, read in
order per webhook, deleted once sent, the oldest dropped past the backlog; and the sink's
counts (``engine.ops.webhooks.Webhooks``) kept exact by what each commit reports."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from engine.config import WebhookConfig
from engine.ops.events import Kind
from engine.ops.webhooks import Webhooks
from engine.queue.lmdb_store import LmdbQueue, hook_prefix
from engine.testing.wait import until


def test_events_per_webhook_in_order_deleted_and_trimmed(tmp_path: Path) -> None:
    store = LmdbQueue(tmp_path / "queue", min_free_disk=0)

    async def run() -> None:
        a, b = hook_prefix("a"), hook_prefix("b")
        # Interleaved names: the keys of "a" are not at the end of the table.
        await store.hooks_soon([(b + bytes([0] * 11 + [1]), b"b1")])
        await store.hooks_soon([(a + bytes([0] * 11 + [n]), f"a{n}".encode())
                                for n in range(1, 6)])
        assert store.hook_counts() == {"a": 5, "b": 1}
        assert store.hook_events("a", 2) == [(a + bytes([0] * 11 + [1]), b"a1"),
                                             (a + bytes([0] * 11 + [2]), b"a2")]
        deleted, trimmed = await store.hooks_soon(
            (), [a + bytes([0] * 11 + [1]), a + bytes([0] * 11 + [9])], [(a, 2)])
        assert (deleted, trimmed) == (1, (2,))  # one of them was there; two oldest dropped
        assert [v for _, v in store.hook_events("a", 10)] == [b"a4", b"a5"]
        # a trim never reaches another webhook's events
        assert await store.hooks_soon((), (), [(a, 10)]) == (0, (2,))
        assert store.hook_counts() == {"b": 1}

    try:
        asyncio.run(run())
    finally:
        store.close_sync()


def test_the_sink_keeps_the_configured_kinds_and_its_backlog(tmp_path: Path) -> None:
    store = LmdbQueue(tmp_path / "queue", min_free_disk=0)
    config = WebhookConfig(name="h", url="http://127.0.0.1:9/", secret="s",
                           events=("DELIVER", "FAIL"), max_backlog=4)

    async def run() -> None:
        hooks = Webhooks([config], store)  # not started: no sender, the sink alone
        batch = [{"time": "t", "event": kind, "id": f"{n:02d}", "message_id": ""}
                 for n, kind in enumerate([Kind.DELIVER, Kind.RECEIVE, Kind.FAIL,
                                           Kind.DELIVER])]
        hooks.write(batch)
        await until(lambda: hooks.backlog() == {"h": 3}, within=10)
        hooks.write([{"time": "t", "event": "FAIL", "id": f"{n}", "message_id": ""}
                     for n in range(10, 13)])
        await until(lambda: hooks.hooks["h"].dropped == 2, within=10)
        assert hooks.backlog() == {"h": 4} == store.hook_counts()
        kept = [orjson.loads(v) for _, v in store.hook_events("h", 10)]
        assert [e["id"] for e in kept] == ["03", "10", "11", "12"]
        assert all(len(e["event_id"]) == 24 for e in kept)

    try:
        asyncio.run(run())
    finally:
        store.close_sync()

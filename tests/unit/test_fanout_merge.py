"""How a node's control channel merges its workers' replies (engine.cluster.fanout): the
sans-I/O functions, on replies shaped as the workers send them."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine.cluster.fanout import (
    merge_metrics,
    merge_reloads,
    merge_rows,
    merge_stats,
    merge_verbs,
)
from engine.ops.views import QueueRow, webhook_row
from engine.queue.records import id_bytes


def row(name: str, state: str, messages: int, *, error: str = "", error_due: float = 0.0,
        next_retry: float = 0.0, rate: float | None = None, site: str = "") -> dict[str, Any]:
    return QueueRow(name, state, messages, messages, site, rate, rate, error, next_retry,
                    error_due).to_json()


def test_rows_sum_counts_and_keep_the_worst_state_latest_error_earliest_retry() -> None:
    merged = merge_rows([
        [row("a.test", "ready", 2, error="451 old", error_due=100.0, next_retry=2e9,
             rate=1.0, site="mx:a"),
         row("b.test", "held", 1), row("c.test", "held", 1),
         webhook_row("hook", 3).to_json()],
        [row("a.test", "down", 3, error="451 new", error_due=200.0, next_retry=1.9e9,
             rate=None, site="mx:a mx:b"),
         row("b.test", "retry", 1), row("c.test", "held", 2),
         row("0.test", "ready", 1), webhook_row("hook", 1).to_json()],
    ])
    assert [r["destination"] for r in merged] == ["0.test", "a.test", "b.test", "c.test",
                                                  "webhook:hook"]
    a = merged[1]
    assert (a["state"], a["messages"], a["recipients"]) == ("down", 5, 5)
    assert (a["last_error"], a["site"], a["in_per_minute"]) == ("451 new", "mx:a mx:b", 1.0)
    assert a["next_retry"] == row("x", "ready", 0, next_retry=1.9e9)["next_retry"]
    assert merged[2]["state"] == "retry"  # held in one worker, waiting in the other
    assert merged[3]["state"] == "held"  # held everywhere
    assert merged[4]["messages"] == 4


def test_a_verb_misses_only_what_every_worker_misses() -> None:
    ids = [id_bytes(f"{i:024X}") for i in (1, 2, 3)]
    one, two, three = (f"{i:024X}" for i in (1, 2, 3))
    merged = merge_verbs(ids, [
        {"changed": [two], "unchanged": [], "missing": [one, three], "reports": ["R1"]},
        {"changed": [], "unchanged": [one], "missing": [two, three]},
    ])
    assert merged == {"changed": [two], "unchanged": [one], "missing": [three],
                      "reports": ["R1"]}


def test_stats_are_summed_and_sites_merged() -> None:
    def stats(messages: int, workers: int, down: float) -> dict[str, Any]:
        return {"messages": messages, "delivered": 1, "paused": False, "window": 2,
                "sites": [{"site": "mx:a", "workers": workers, "max_connections": 3,
                           "max_rate": 0.0, "waiting": 1}],
                "down": {"mx:b": down}, "down_until": {"mx:b": 1e9 + down},
                "suspended": ["s.test"], "commits": 5,
                "queue": {"commits": 5, "enqueued": 7, "last_commit_seconds": down / 100,
                          "states": [["pending", messages]]}}

    merged = merge_stats([stats(2, 1, 10.0), stats(3, 2, 20.0)])
    assert (merged["messages"], merged["delivered"], merged["window"]) == (5, 2, 4)
    assert merged["sites"] == [{"site": "mx:a", "workers": 3, "max_connections": 3,
                                "max_rate": 0.0, "waiting": 2}]
    assert merged["down"] == {"mx:b": 20.0} and merged["suspended"] == ["s.test"]
    assert merged["queue"] == {"commits": 10, "enqueued": 14, "last_commit_seconds": 0.2,
                               "states": [("pending", 5)]}


WORKER_TEXT = """# HELP ferry_build_info Ferry's version
# TYPE ferry_build_info gauge
ferry_build_info{extensions="none",version="1"} 1.0
# HELP ferry_commit_seconds Commit time
# TYPE ferry_commit_seconds histogram
ferry_commit_seconds_bucket{le="0.01"} 2.0
ferry_commit_seconds_bucket{le="+Inf"} 3.0
ferry_commit_seconds_count 3.0
ferry_commit_seconds_sum 0.5
# HELP ferry_window Groups in the window
# TYPE ferry_window gauge
ferry_window{} 4.0
"""


def test_metrics_get_a_worker_label_and_families_stay_together() -> None:
    merged = merge_metrics([(0, WORKER_TEXT), (1, WORKER_TEXT)])
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert set(families) == {"ferry_build_info", "ferry_commit_seconds", "ferry_window"}
    histogram = families["ferry_commit_seconds"]
    assert [(s.name, s.labels.get("worker")) for s in histogram.samples][::3] == [
        ("ferry_commit_seconds_bucket", "0"), ("ferry_commit_seconds_sum", "0"),
        ("ferry_commit_seconds_count", "1")]
    assert [s.labels for s in families["ferry_window"].samples] == [
        {"worker": "0"}, {"worker": "1"}]
    assert merged.count("# TYPE ferry_commit_seconds histogram") == 1
    assert families["ferry_build_info"].samples[1].labels == {
        "worker": "1", "extensions": "none", "version": "1"}


def test_a_reload_is_refused_if_any_worker_refused_it() -> None:
    applied = {"ok": True, "applied": ["send[0].smarthosts", "delivery.max_rate"],
               "restart": [{"key": "receive[0].listen", "why": "sockets"}]}
    other = {"ok": True, "applied": ["delivery.max_rate"],
             "restart": [{"key": "receive[0].listen", "why": "sockets"}]}
    assert merge_reloads([applied, other]) == {
        "ok": True, "applied": ["send[0].smarthosts", "delivery.max_rate"],
        "restart": [{"key": "receive[0].listen", "why": "sockets"}]}
    refused = {"ok": False, "error": "configuration refused, the running one stays",
               "errors": ["receive[0].key_file: no such file"]}
    assert merge_reloads([applied, refused]) == refused

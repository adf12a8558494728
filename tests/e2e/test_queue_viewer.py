"""The read side of ``ferry queue`` (list with filters, --json, show, stats, queues,
export) as real processes: against a running ``ferry serve`` delivering to a real sink on
127.0.0.1, and on the same spool once the server has stopped."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.queue.api import Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient, id_text
from engine.testing.dns import DnsResponder
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.e2e.test_cli import free_port, start, stop, wait_for_port
from tests.e2e.test_queue_cli import ferry_queue

ZONE = (
    "$TTL 60\n"
    "ok.test. IN MX 10 mx.ok.test.\nmx.ok.test. IN A 127.0.22.1\n"
    "slow.test. IN MX 10 mx.slow.test.\nmx.slow.test. IN A 127.0.22.2\n"
    "hold.test. IN MX 10 mx.hold.test.\nmx.hold.test. IN A 127.0.22.3\n"
)
SLOW = "127.0.22.2"  # mx.slow.test: greylists every message until the test lets it through
GREYLISTED = "451 4.7.1 greylisted, try again later"
#: Lines a receiver must unstuff (RFC 5321 §4.5.2), and a Message-ID to find it by.
BODY = (b"Message-ID: <late@app.test>\r\nSubject: where is it\r\n\r\n.leading dot\r\n"
        b"..two dots\r\n.\r\nlast line\r\n")


def send(port: int, rcpt: str, body: bytes = BODY) -> str:
    """Send one message; its queue id (from the 250 reply)."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("app.test")
        client.mail("app@[127.0.0.1]")
        client.rcpt(rcpt)
        code, text = client.data(body)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def queues(spool: Path) -> tuple[dict[str, dict[str, Any]], str]:
    out = ferry_queue(spool, "queues", "--json")
    assert out.returncode == 0, out.stderr
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    return {row["destination"]: row for row in rows}, out.stderr


def listed(spool: Path, *args: str) -> list[dict[str, Any]]:
    out = ferry_queue(spool, "list", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [orjson.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    s = CountingSink(["127.0.22.1", SLOW, "127.0.22.3"])
    s.state.data_replies[SLOW] = GREYLISTED
    yield s
    s.stop()


def test_viewer_against_a_running_server_then_on_the_stopped_spool(
        tmp_path: Path, sink: CountingSink) -> None:
    spool = tmp_path / "s"
    with DnsResponder(ZONE) as responder:
        responder.servfail.add("broken.test")  # its MX lookup fails: unroutable for now
        host, dns_port = responder.address
        port = free_port()
        proc = start(["serve", "--listen", f"127.0.0.1:{port}", "--spool", str(spool),
                      "--dns", f"{host}:{dns_port}", "--mx-port", str(sink.port),
                      "--retry-interval", "600"], tmp_path)
        try:
            wait_for_port(port, proc)
            assert ferry_queue(spool, "suspend", "hold.test").returncode == 0
            late = send(port, "bob@slow.test")
            send(port, "carol@broken.test")
            send(port, "dave@hold.test")
            send(port, "erin@ok.test")
            wait_for(lambda: len(sink.state.messages) == 1, what="erin's delivery")

            def settled() -> dict[str, dict[str, Any]] | None:
                rows, err = queues(spool)
                assert err == ""  # the server answered: no note about the spool alone
                want = {"slow.test": "retry", "broken.test": "unreachable",
                        "hold.test": "suspended"}
                ok = all(rows.get(d, {}).get("state") == s for d, s in want.items())
                # erin's delivery committed: gone from the queue, seen by the server
                gone = rows.get("ok.test", {}).get("messages") == 0
                return rows if ok and gone else None

            rows = wait_for(settled, what="the queues to settle")
            slow = rows["slow.test"]
            assert (slow["messages"], slow["recipients"]) == (1, 1)
            assert slow["last_error"] == GREYLISTED
            retry = datetime.fromisoformat(slow["next_retry"]).timestamp()
            assert time.time() < retry < time.time() + 2 * 600
            assert slow["site"] == "mx:mx.slow.test"
            assert slow["in_per_minute"] is not None and slow["out_per_minute"] is not None
            assert "4.4.3" in rows["broken.test"]["last_error"]
            assert "broken.test" in rows["broken.test"]["last_error"]
            assert rows["hold.test"]["messages"] == 1
            # Delivered and gone from the queue, but the server saw it go.
            assert rows["ok.test"]["messages"] == 0
            assert rows["ok.test"]["out_per_minute"] is not None

            table = ferry_queue(spool, "queues")
            assert table.returncode == 0
            line = next(ln for ln in table.stdout.splitlines() if ln.startswith("slow.test"))
            assert " retry " in line and GREYLISTED in line and "(in " in line

            # stats, list, show and export read the spool while the server runs.
            live = orjson.loads(ferry_queue(spool, "stats", "--json").stdout)
            assert live["messages"] == 3 and live["states"]["suspended"] == 1
            (found,) = listed(spool, "--recipient", "bob@slow.test")
            assert found["id"] == late and found["state"] == "deferred"
            shown = ferry_queue(spool, "show", late)
            assert shown.returncode == 0, shown.stderr
            assert "<bob@slow.test> → slow.test: deferred, 1 attempts, next try in" in (
                shown.stdout)
            assert f"last reply: {GREYLISTED}" in shown.stdout
            exported = ferry_queue_bytes(spool, "export", late)
            assert exported.startswith(b"Received: from app.test")
            out_file = tmp_path / "late.eml"
            assert ferry_queue(spool, "export", late, "--out", str(out_file)).returncode == 0
            assert out_file.read_bytes() == exported

            # Let it through: what the sink receives is what export gave.
            sink.state.data_replies[SLOW] = ""
            assert ferry_queue(spool, "resume", "slow.test").returncode == 0
            wait_for(lambda: len(sink.state.messages) == 2, what="bob's delivery")
            received = next(m for m in sink.state.messages if m.recipients == ["bob@slow.test"])
            assert received.body == exported
            assert listed(spool, "--recipient", "bob@slow.test") == []
        finally:
            code, err = stop(proc)
        assert code == 0, err

        # The server is gone: the read-only verbs read the spool alone.
        assert not (spool / "control.sock").exists()
        rows, note = queues(spool)
        assert "no server runs on this spool" in note
        assert rows["hold.test"]["state"] == "suspended"  # from the set saved with the queue
        assert rows["broken.test"]["state"] == "unreachable"  # from its last reply
        assert rows["broken.test"]["in_per_minute"] is None
        assert "slow.test" not in rows and "ok.test" not in rows
        (carol,) = listed(spool, "--destination", "broken.test")
        assert carol["recipients"][0]["address"] == "carol@broken.test"
        assert ferry_queue(spool, "show", carol["id"]).returncode == 0
        assert ferry_queue_bytes(spool, "export", carol["id"]).endswith(b"\r\nlast line\r\n")
        stats = ferry_queue(spool, "stats", "--json")
        assert orjson.loads(stats.stdout)["states"]["suspended"] == 1


def ferry_queue_bytes(spool: Path, *args: str) -> bytes:
    out = subprocess.run([sys.executable, "-m", "engine", "queue", "--spool", str(spool),
                          *args], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


# --- filters, --json, N of M: a spool written directly, read by the CLI -----------------


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A stopped spool with two messages per filter: one that matches, one that does not."""
    spool = tmp_path_factory.mktemp("filters")
    store = LmdbQueue(spool / "queue", min_free_disk=0)
    ids: dict[str, str] = {}
    now = time.time()

    def put(name: str, env: Envelope, body: bytes = b"Subject: x\r\n\r\nx\r\n") -> bytes:
        qid = store.enqueue_sync(env, body)
        ids[name] = id_text(qid)
        return qid

    try:
        put("old", Envelope("a@one.test", [Recipient("x@dest.test", "dest.test")],
                            arrival=now - 7200, message_id="<old@one.test>"))
        big = put("big", Envelope("b@two.test", [Recipient("y@other.test", "other.test")]),
                  b"Subject: big\r\n\r\n" + b"y" * 5000 + b"\r\n")
        greylisted = put("greylisted", Envelope("c@two.test", [
            Recipient("z@dest.test", "dest.test"), Recipient("w@else.test", "else.test")]))
        store.record_sync([
            Outcome(greylisted, 0, RcptState.DEFERRED, "451 4.7.1 Greylisted", due=now + 900),
            Outcome(big, 0, RcptState.DEFERRED, "421 4.4.2 connection dropped",
                    due=now + 60)])
    finally:
        store.close_sync()
    return spool, ids


@pytest.mark.parametrize(("args", "want"), [
    (("--sender", "A@One.Test"), ["old"]),
    (("--sender", "two.test"), ["big", "greylisted"]),
    (("--recipient", "z@dest.test"), ["greylisted"]),
    (("--recipient", "@other.test"), ["big"]),
    (("--destination", "DEST.test."), ["old", "greylisted"]),
    (("--state", "deferred"), ["big", "greylisted"]),
    (("--older-than", "3600"), ["old"]),
    (("--larger-than", "1000"), ["big"]),
    (("--error", "greylisted"), ["greylisted"]),
    # One recipient must match every recipient filter: w@else.test is not deferred.
    (("--recipient", "w@else.test", "--state", "deferred"), []),
    (("--destination", "dest.test", "--state", "deferred"), ["greylisted"]),
    (("--sender", "two.test", "--larger-than", "1000"), ["big"]),
])
def test_each_filter(filled: tuple[Path, dict[str, str]], args: tuple[str, ...],
                     want: list[str]) -> None:
    spool, ids = filled
    names = {v: k for k, v in ids.items()}
    assert [names[m["id"]] for m in listed(spool, *args)] == want


def test_list_json_fields_and_n_of_m(filled: tuple[Path, dict[str, str]]) -> None:
    spool, ids = filled
    by_id = {m["id"]: m for m in listed(spool)}
    assert list(by_id) == [ids["old"], ids["big"], ids["greylisted"]]  # oldest first
    g = by_id[ids["greylisted"]]
    assert g["sender"] == "c@two.test" and g["state"] == "deferred"
    assert g["last_error"] == "451 4.7.1 Greylisted"
    assert g["size"] == len(b"Subject: x\r\n\r\nx\r\n")
    assert datetime.fromisoformat(g["arrived"]).timestamp() == pytest.approx(
        time.time(), abs=600)
    z, w = g["recipients"]
    assert (z["address"], z["state"], z["attempts"], z["destination"]) == (
        "z@dest.test", "deferred", 1, "dest.test")
    assert z["last_reply"] == "451 4.7.1 Greylisted" and z["next_retry"]
    assert (w["state"], w["attempts"], w["last_reply"]) == ("pending", 0, "")
    assert by_id[ids["old"]]["message_id"] == "<old@one.test>"

    table = ferry_queue(spool, "list", "--limit", "2")
    lines = table.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[1:3]] == [ids["old"], ids["big"]]
    assert lines[3] == "2 of 3 shown (--limit 2)"
    limited = ferry_queue(spool, "list", "--json", "--limit", "1", "--state", "deferred")
    assert len(limited.stdout.splitlines()) == 1
    assert "1 of 2 shown" in limited.stderr
    everything = ferry_queue(spool, "list")
    assert "shown" not in everything.stdout


def test_show_json_stats_json_and_a_missing_message(
        filled: tuple[Path, dict[str, str]]) -> None:
    spool, ids = filled
    shown = ferry_queue(spool, "show", "--json", ids["greylisted"])
    doc = orjson.loads(shown.stdout)
    assert doc["id"] == ids["greylisted"] and doc["headers"] == "Subject: x"
    assert [r["state"] for r in doc["recipients"]] == ["deferred", "pending"]
    stats = orjson.loads(ferry_queue(spool, "stats", "--json").stdout)
    assert stats["messages"] == 3 and stats["states"]["deferred"] == 2
    for verb in ("show", "export"):
        missing = ferry_queue(spool, verb, "00" * 12)
        assert missing.returncode == 1 and "no message" in missing.stderr


def test_a_damaged_queue_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "queue").mkdir()
    (tmp_path / "queue" / "data.mdb").write_bytes(b"not an LMDB file\n" * 100)
    out = ferry_queue(tmp_path, "list")
    assert out.returncode == 1 and out.stdout == ""
    assert "cannot open the queue database" in out.stderr and "Traceback" not in out.stderr

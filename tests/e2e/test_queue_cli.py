"""``ferry queue``: the queue viewer as a real process over a real spool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine.queue.api import Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient, id_text


def ferry_queue(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "queue", "--spool", str(spool),
                           *args], capture_output=True, text=True, timeout=60)


def test_list_show_stats(tmp_path: Path) -> None:
    store = LmdbQueue(tmp_path / "queue", min_free_disk=0)
    try:
        first = store.enqueue_sync(Envelope("a@client.test", [
            Recipient("x@one.test", "one.test"), Recipient("y@two.test", "two.test")],
            message_id="<m1@client.test>"), b"Subject: hello\r\n\r\nbody\r\n")
        second = store.enqueue_sync(Envelope("b@client.test", [
            Recipient("z@two.test", "two.test")]), b"Subject: two\r\n\r\nbody\r\n")
        store.record_sync([Outcome(first, 1, RcptState.DEFERRED, "451 4.3.0 later", due=1e12)])
    finally:
        store.close_sync()

    out = ferry_queue(tmp_path, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [id_text(first), id_text(second)]
    assert "<a@client.test> → 2 (1 deferred 1 pending)" in lines[0]

    only_one = ferry_queue(tmp_path, "list", "--destination", "one.test")
    assert [ln.split()[0] for ln in only_one.stdout.splitlines()[1:]] == [id_text(first)]
    deferred = ferry_queue(tmp_path, "list", "--state", "deferred")
    assert [ln.split()[0] for ln in deferred.stdout.splitlines()[1:]] == [id_text(first)]

    shown = ferry_queue(tmp_path, "show", id_text(first))
    assert shown.returncode == 0
    assert "<y@two.test> → two.test: deferred, 1 attempts, next try in" in shown.stdout
    assert "last reply: 451 4.3.0 later" in shown.stdout and "Subject: hello" in shown.stdout

    stats = ferry_queue(tmp_path, "stats")
    assert "messages: 2" in stats.stdout and "with deferred recipients: 1" in stats.stdout

    missing = ferry_queue(tmp_path, "show", "00" * 12)
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_no_spool_is_a_clear_error(tmp_path: Path) -> None:
    out = ferry_queue(tmp_path / "nothing", "stats")
    assert out.returncode == 1 and "no queue database" in out.stderr

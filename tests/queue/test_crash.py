"""Crash safety: SIGKILL a producer at random moments; every acknowledged message survives.

The child (``engine.testing.queue_child``) prints a message's id and body hash only after
its ``enqueue`` returned.  After each kill the spool is reopened (no repair step) and every
id printed so far must be there with the same body, and the indexes must agree with the
records.  The number of kills is bounded (FERRY_CRASH_KILLS, default 12: each kill is the
same check at another random moment).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.queue.lmdb_store import LmdbQueue

KILLS = int(os.environ.get("FERRY_CRASH_KILLS", "12"))


def run_and_kill(spool: Path, rnd: random.Random) -> list[tuple[bytes, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.testing.queue_child", str(spool)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # Wait for the first acknowledgement, then kill at a random moment after it.
    first = proc.stdout.readline()
    assert first, proc.stderr.read().decode() if proc.stderr else "child died"
    time.sleep(rnd.uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    acked = []
    for line in (first + rest).split(b"\n"):
        parts = line.split()
        if len(parts) == 2 and len(parts[1]) == 64:  # a line cut by the kill is not counted
            acked.append((bytes.fromhex(parts[0].decode()), parts[1].decode()))
    return acked


def test_every_acknowledged_message_survives_sigkill(tmp_path: Path) -> None:
    rnd = random.Random(int.from_bytes(os.urandom(4), "big"))
    spool = tmp_path / "spool"
    acked: dict[bytes, str] = {}
    for _ in range(KILLS):
        acked.update(run_and_kill(spool, rnd))
        store = LmdbQueue(spool, min_free_disk=0)
        try:
            for qid, digest in acked.items():
                assert hashlib.sha256(store.body(qid)).hexdigest() == digest
                assert store.get(qid).recipients[0].address == "c@d.test"
            # indexes agree with the records: one due entry per message, nothing extra
            count = store.count()
            assert count >= len(acked)
            assert len(store.due(time.time() + 10, count + 10)) == count
            assert len(store.ids_for_hop("d.test", count + 10)) == count
            assert store.scan_corrupt() == [] and store.corrupt() == []
        finally:
            store.close_sync()
    assert len(acked) > KILLS  # the child really produced under the kills

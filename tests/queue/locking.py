"""Holding up the queue's writer from outside: another process holds the database's write
lock (as a slow disk would hold up commits), without reaching into the store."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLDER = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=16)
txn = env.begin(write=True)
print("held", flush=True)
sys.stdin.readline()
txn.abort()
env.close()
"""


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold the LMDB write lock of the database at ``path`` from another process for the
    block: the store's writer (thread or process) waits at its next commit until the
    block ends.  LMDB's writer lock is shared between processes (a mutex in lock.mdb)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"held\n", "the lock holder did not start"
        yield
    finally:
        holder.stdin.close()  # its readline ends: it lets go
        holder.wait(30)
        holder.stdout.close()

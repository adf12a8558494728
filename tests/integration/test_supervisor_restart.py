"""The node's supervisor starting a worker again when the start itself fails: no process
at all (fork or exec failed), as opposed to a worker that starts and ends."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path

import pytest

from engine.cluster.supervisor import Supervisor, _Worker
from engine.testing.server import ferry_config


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_restart_that_cannot_start_a_process_is_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that served ends; starting it again fails before any process exists (here
    exec of an interpreter that is gone, as after an upgrade that replaced it).  The
    supervisor logs it and tries again after a longer pause, for as long as it fails,
    leaking no descriptor; the watch ends only when the node stops."""
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=2))
    supervisor = Supervisor(config)
    supervisor._listeners = [[], []]

    failures: list[tuple[str, float]] = []  # (the message, the pause it came after)

    async def run() -> None:
        ended = await asyncio.create_subprocess_exec("true")
        await ended.wait()
        worker = _Worker(0, process=ended, started=0.0, served=True)
        monkeypatch.setattr(sys, "executable", str(tmp_path / "gone" / "python3"))
        twice = asyncio.Event()

        class Failures(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                text = record.getMessage()
                if "could not be started again" in text:
                    failures.append((text, worker.pause))
                    if len(failures) == 2:
                        twice.set()

        handler = Failures()
        logging.getLogger("ferry.node").addHandler(handler)
        before = _fds()
        watch = asyncio.get_running_loop().create_task(supervisor._watch(worker))
        try:
            waiting = asyncio.get_running_loop().create_task(twice.wait())
            await asyncio.wait({watch, waiting}, timeout=20,
                               return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            assert not watch.done(), "the watch ended on the failed start"
            assert twice.is_set()
            assert _fds() == before  # each failed start closed its ready pipe
            supervisor._stopping.set()
            await asyncio.wait_for(watch, 10)
        finally:
            logging.getLogger("ferry.node").removeHandler(handler)

    asyncio.run(run())
    # At once (it had served long), then after a pause of 1 s (the pause then doubles).
    assert [pause for _, pause in failures] == [0.0, 1.0]
    assert all("worker 0 could not be started again" in text
               and "No such file or directory" in text for text, _ in failures)

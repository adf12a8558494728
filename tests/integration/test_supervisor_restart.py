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
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker that served ends; starting it again fails before any process exists (here
    exec of an interpreter that is gone, as after an upgrade that replaced it).  The
    supervisor logs it and tries again after a longer pause, for as long as it fails,
    leaking no descriptor; the watch ends only when the node stops."""
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=2))
    supervisor = Supervisor(config)
    supervisor._listeners = [[], []]

    async def run() -> None:
        ended = await asyncio.create_subprocess_exec("true")
        await ended.wait()
        worker = _Worker(0, process=ended, started=0.0, served=True)
        monkeypatch.setattr(sys, "executable", str(tmp_path / "gone" / "python3"))
        before = _fds()
        watch = asyncio.get_running_loop().create_task(supervisor._watch(worker))

        async def two_failures() -> None:
            # (the pause before the third try: 1 s after the first failure, 2 s after the
            # second)
            while (caplog.text.count("worker 0 could not be started again") < 2
                   or worker.pause < 2.0):
                assert not watch.done(), "the watch ended on the failed start"
                await asyncio.sleep(0.05)

        await asyncio.wait_for(two_failures(), 20)
        assert _fds() == before  # each failed start closed its ready pipe
        supervisor._stopping.set()
        await asyncio.wait_for(watch, 10)

    with caplog.at_level(logging.ERROR, logger="ferry"):
        asyncio.run(run())
    assert "No such file or directory" in caplog.text

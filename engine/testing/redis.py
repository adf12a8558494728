"""A ``redis-server`` run as a child of the test, on 127.0.0.1, with nothing persisted.

Owns writing the server's configuration into the instance's directory (no RDB snapshot, no
append-only file: a stopped server forgets everything, which is what "Redis restarted"
means to a cluster of Ferry nodes), starting it in the foreground, waiting until it
answers PING, and stopping it by PID (``engine.testing.daemon``).  ``start()`` again after
``stop()`` brings it back on the same port, for tests of a Redis outage.

Must never signal a process it did not start, never listen outside 127.0.0.0/8, and never
read or change the system's own Redis configuration or service.  Used by tests and
benchmarks only.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import ClassVar, Final

from engine.testing.daemon import DaemonError, LoopbackDaemon
from engine.testing.mta import check_loopback, free_port

__all__ = ["RedisInstance", "find_redis_server"]

#: Debian's redis-server package (tests/run.sh installs it when missing).
REDIS_SERVER: Final = "redis-server"


def find_redis_server() -> str | None:
    return shutil.which(REDIS_SERVER)


class RedisInstance(LoopbackDaemon):
    """One redis-server on ``address``:``port`` (ephemeral by default), its files in
    ``directory``; ``url`` is what ``[cluster] redis`` takes."""

    listener_name: ClassVar[str] = "redis-server"

    def __init__(self, directory: Path, address: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        check_loopback(address, "redis-server", DaemonError)
        self.dir = directory
        self.address = address
        self.port = port or free_port(address)
        self.conf_path = directory / "redis.conf"
        self.log_path = directory / "redis.log"
        self.output_path = directory / "redis.out"

    @property
    def url(self) -> str:
        return f"redis://{self.address}:{self.port}/0"

    def config(self) -> str:
        return (f"bind {self.address}\nport {self.port}\nprotected-mode yes\n"
                f'dir {self.dir}\nlogfile {self.log_path}\nsave ""\nappendonly no\n'
                "daemonize no\n")

    def _prepare(self) -> None:
        if find_redis_server() is None:
            raise DaemonError("no redis-server on PATH: install the Debian package "
                              "redis-server (tests/run.sh does)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config())

    def _command(self) -> list[str]:
        binary = find_redis_server()
        assert binary is not None
        return [binary, str(self.conf_path)]

    def _probe(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

"""The systemd notification protocol (sd_notify(3)), in our own few lines: state changes of
``ferry serve`` sent as one datagram to the socket in ``$NOTIFY_SOCKET``.

With ``Type=notify`` (contrib/ferry.service) systemd waits for ``READY=1`` before it
counts the service as started, so units ordered after Ferry start when it accepts mail;
``STOPPING=1`` tells it the stop is Ferry's own; ``WATCHDOG=1`` every half of
``$WATCHDOG_USEC`` proves the event loop still runs (a loop stuck for longer gets the
service killed and restarted, ``WatchdogSec=``); ``STATUS=`` is the line ``systemctl
status`` shows.  ``RELOADING=1`` (:meth:`Notifier.reloading`) is for the configuration
reload (issue #14), which sends ``READY=1`` again when done.

Without ``$NOTIFY_SOCKET`` (not run by systemd) every call does nothing.  A name starting
with "@" is in the abstract namespace (sd_notify(3)).  Sending never blocks and never
fails the server: a lost notification is logged at debug level and forgotten.
It must never decide anything about the server's life: engine.app calls it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("ferry.notify")


def _address(name: str) -> str | None:
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # vsock and other forms: not supported here


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when no
    watchdog is asked for this process (``$WATCHDOG_PID``, when set, names another)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.interval = watchdog_interval(env)
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """One datagram of ``KEY=value`` lines."""
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode() + b"\n", self.address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def reloading(self, status: str = "reloading the configuration") -> None:
        """Before a reload; ``ready()`` again after it.  MONOTONIC_USEC lets systemd 253+
        (Type=notify-reload) match the two."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def start_watchdog(self) -> None:
        """Ping every half of ``$WATCHDOG_USEC`` from a task on the running loop: a loop
        that stops turning stops the pings."""
        if self.enabled and self.interval is not None and self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._ping(self.interval))

    async def _ping(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

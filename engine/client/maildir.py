"""Local delivery into Maildir folders (the Maildir convention of qmail's maildir(5)).

Owns turning a recipient into a Maildir path through the route's template
("/var/mail/{domain}/{local}"), creating the folder (cur, new, tmp) when missing, and the
safe write: a uniquely named file in tmp/, fsync, rename into new/, fsync of new/, so a
crash leaves either a whole message in new/ or nothing there.  Each file starts with
"Return-Path:" and "Delivered-To:" fields (RFC 5321 §4.4 asks the final delivery to add
Return-Path) followed by the stored body, which is canonical CRLF.

It must never block the event loop (all file I/O runs in a thread), never write outside
the folder the template names (a local part with "/", a leading "." or ".." is refused),
and never write the queue: the results go back to the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Final

from engine.client.api import LOCAL, FollowOn, FollowOns, RcptResult
from engine.queue.records import Envelope, RcptState
from engine.routing.api import Route, Source

S250_DELIVERED: Final = "250 2.0.0 Delivered to maildir"
S550_BAD_MAILBOX: Final = "550 5.1.1 Mailbox name not allowed"
S451_NO_TEMPLATE: Final = "451 4.3.5 No maildir configured for this route"
S451_LOCAL_ERROR: Final = "451 4.3.0 Local error in maildir delivery"

_counter = itertools.count()


def _unsafe(part: str) -> bool:
    """A path component that could leave (or hide inside) the folder the template names."""
    return (
        not part
        or part.startswith(".")
        or "/" in part
        or "\\" in part
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part)
    )


def _header_value(address: str) -> bytes:
    # Addresses come from the parsed envelope; CR/LF/NUL are removed all the same, so a
    # field can never be split (DESIGN.md, wire rules).
    clean = "".join(c for c in address if c not in "\r\n\0")
    return clean.encode("utf-8", "replace")


class MaildirAgent:
    """Delivers to Maildir folders named by ``route.maildir``; implements DeliveryAgent.

    ``hostname`` goes into the unique file names (default: this machine's name);
    ``fsync`` can be switched off for tests and benchmarks on throwaway disks only.
    """

    def __init__(self, *, hostname: str | None = None, fsync: bool = True) -> None:
        name = hostname or socket.gethostname() or "localhost"
        # maildir(5): "/" and ":" in the host part are written as octal escapes.
        self._hostname = name.replace("/", "\\057").replace(":", "\\072")
        self._fsync = fsync

    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[int], body: bytes,
        follow_ons: FollowOns | None = None,
    ) -> list[RcptResult]:
        # ``follow_ons`` are never taken: a file write has no connection to pipeline on.
        indexes = list(recipients)
        if not indexes:
            return []
        return await asyncio.to_thread(self._deliver_all, route, envelope, indexes, body)

    def takes_follow_ons(self, route: Route) -> bool:
        return False

    async def resume(self, job: FollowOn) -> list[RcptResult]:
        raise RuntimeError("the Maildir agent never takes a follow-on message")

    async def close(self) -> None:
        """Nothing is held open between deliveries."""

    async def retire_idle(self, site: str, source: Source | None) -> None:
        """Nothing is held open between deliveries."""

    # --- in the worker thread --------------------------------------------------------

    def _deliver_all(
        self, route: Route, envelope: Envelope, indexes: list[int], body: bytes
    ) -> list[RcptResult]:
        return [self._deliver_one(route, envelope, i, body) for i in indexes]

    def _deliver_one(self, route: Route, envelope: Envelope, index: int, body: bytes) -> RcptResult:
        address = envelope.recipients[index].address
        if not route.maildir:
            # A configuration problem: keep the mail so an operator can fix the route.
            return RcptResult(index, RcptState.DEFERRED, S451_NO_TEMPLATE)
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        local = local.lower()
        domain = domain.lower()
        if _unsafe(local) or (domain and _unsafe(domain)) or ".." in domain:
            return RcptResult(index, RcptState.FAILED, S550_BAD_MAILBOX)
        try:
            folder = route.maildir.format(domain=domain, local=local)
        except (KeyError, IndexError, ValueError):
            return RcptResult(index, RcptState.DEFERRED, S451_NO_TEMPLATE)
        head = (
            b"Return-Path: <" + _header_value(envelope.sender) + b">\r\n"
            b"Delivered-To: <" + _header_value(address) + b">\r\n"
        )
        try:
            self._write(folder, head, body)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                reason = "no space left for the mailbox"
            return RcptResult(index, RcptState.DEFERRED, f"{S451_LOCAL_ERROR}: {reason}")
        return RcptResult(index, RcptState.DELIVERED, S250_DELIVERED, peer=LOCAL)

    def _write(self, folder: str, head: bytes, body: bytes) -> None:
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(folder, sub), mode=0o700, exist_ok=True)
        now = time.time()
        seconds = int(now)
        size = len(head) + len(body)
        # maildir(5): time, a part unique on this host (microseconds, pid, a counter and
        # random bits), then the host name; ",S=" is the size, as Dovecot writes it.
        name = (
            f"{seconds}.M{int((now - seconds) * 1_000_000)}P{os.getpid()}"
            f"Q{next(_counter)}R{secrets.token_hex(8)}.{self._hostname},S={size}"
        )
        tmp_path = os.path.join(folder, "tmp", name)
        new_dir = os.path.join(folder, "new")
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(head + body)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp_path, os.path.join(new_dir, name))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        if self._fsync:
            # The rename is durable only once the directory itself is on disk.
            dir_fd = os.open(new_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

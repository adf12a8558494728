"""What ``ferry serve`` does as a process before it serves mail: make sure it is the only
server on its spool, and give up root.

- :class:`SpoolLock`: an exclusive lock (``fcntl.flock``) on ``<spool>/ferry.lock``, which
  holds the server's PID.  It is taken before the queue opens and held for the process's
  life; the kernel releases it when the process ends, however it ends, so a crashed
  server never leaves a stale lock.  A second server on the same spool stops with a
  message that names the spool and the holder's PID.  (The control socket was the only
  guard before, and there is none when the spool path is too long for a socket path.)
- :func:`prepare_spool`: the spool exists, is a directory, and belongs to the user Ferry
  will run as (a spool Ferry creates is given to that user).
- :func:`check_root` and :func:`drop_privileges`: refuse root on a public address unless
  told so, and switch to ``[server] user`` once the listeners are bound, before a byte
  from a client is read and before the queue database (and its writer process) opens.

It must never open the queue, bind or serve sockets, or read the configuration file: the
composition root (engine.app) calls it in that order.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import ipaddress
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

LOCK_NAME: Final = "ferry.lock"


class StartError(OSError):
    """Ferry cannot start as configured; ``str()`` says why and what to do."""


# --- who to run as -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    """The user (and group) ``[server] user`` names, looked up once at start."""

    name: str
    uid: int
    gid: int
    group: str


def lookup(user: str, group: str = "") -> Account | None:
    """The account for ``user``/``group`` (None when ``user`` is ""); StartError when the
    system has no such user or group."""
    if not user:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise StartError(f"server.user: no user {user!r} on this system (create it, e.g. "
                         f"useradd --system --user-group {user})") from None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartError(f"server.group: no group {group!r} on this system") from None
    else:
        gid = pw.pw_gid
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    return Account(user, pw.pw_uid, gid, group_name)


def is_loopback(address: str) -> bool:
    """True for "127.0.0.1:25" or "[::1]:25" (a bound address); a wildcard is not."""
    host = address.rpartition(":")[0].strip("[]").split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_root(euid: int, account: Account | None, allow_root: bool,
               addresses: Iterable[str]) -> None:
    """StartError when running as root without ``user`` on an address other than the
    loopback and ``allow_root`` is off: a flaw in a root process that reads the world's
    bytes is a flaw with every right on the machine."""
    if euid != 0 or account is not None or allow_root:
        return
    public = [a for a in addresses if not is_loopback(a)]
    if public:
        raise StartError(
            f"refusing to run as root on {', '.join(public)}: set [server] user = \"ferry\" "
            "(Ferry binds as root, then runs as that user) or allow_root = true")


def drop_privileges(account: Account) -> None:
    """Become ``account`` for good: supplementary groups, group, then user (in that order:
    once the user is not root, the groups cannot be changed any more), and check that
    root cannot be regained.  Already that user (started by systemd with ``User=``): no
    change.  Another user than root cannot switch: StartError."""
    if os.getuid() == account.uid and os.geteuid() == account.uid:
        return
    if os.geteuid() != 0:
        raise StartError(f"server.user = {account.name!r}: switching user needs root, and "
                         f"Ferry runs as uid {os.geteuid()}")
    os.initgroups(account.name, account.gid)
    os.setgid(account.gid)
    os.setuid(account.uid)  # sets the real, effective and saved uid when root
    regained = False
    with contextlib.suppress(PermissionError):
        os.setuid(0)
        regained = True
    if regained or os.getuid() != account.uid or os.geteuid() != account.uid \
            or os.getegid() != account.gid:
        raise StartError(f"could not drop root for user {account.name!r}: still uid "
                         f"{os.geteuid()}, gid {os.getegid()}")


# --- the spool ---------------------------------------------------------------------------


def prepare_spool(spool: Path, account: Account | None) -> None:
    """Create the spool when missing (given to ``account``); StartError, naming the path,
    when it is not a directory, or when ``account`` is set and does not own it."""
    try:
        spool.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartError(f"spool {spool} exists and is not a directory") from None
    except NotADirectoryError:
        raise StartError(f"spool {spool}: a parent of it is not a directory") from None
    except PermissionError:
        raise StartError(f"spool {spool} cannot be created: permission denied") from None
    st = spool.stat()
    if account is None or st.st_uid == account.uid:
        return
    if not any(spool.iterdir()) and os.geteuid() == 0:
        # Empty, so made just now (or never used): give it to the user.
        os.chown(spool, account.uid, account.gid)
        return
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    raise StartError(f"spool {spool} is owned by {owner}, not by server.user "
                     f"{account.name!r}: chown -R {account.name}:{account.group} {spool}")


class SpoolBusy(StartError):
    """Another ``ferry serve`` holds the spool's lock."""


class SpoolLock:
    """The exclusive lock on ``<spool>/ferry.lock``, held from :meth:`acquire` until
    :meth:`release` or the end of the process.

    ``flock`` rather than a POSIX record lock (``lockf``): it belongs to the open file,
    not to the process, so a second server in the same process (tests run the server in
    a thread) is refused too, and a reader opening and closing the file (to show the PID)
    does not release it as it would a POSIX lock.  The descriptor is close-on-exec and
    the queue's writer is started with ``close_fds``, so no child keeps the lock.
    """

    def __init__(self, spool: Path) -> None:
        self.path = spool / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, account: Account | None = None) -> None:
        """Take the lock and write our PID in the file; SpoolBusy when another process
        holds it.  The file is given to ``account`` when root creates it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartError(f"cannot open the spool lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolBusy(f"spool {self.path.parent} is in use by another ferry serve "
                            f"(pid {holder}, lock {self.path}); two servers on one spool "
                            "would deliver the same mail twice") from None
        if account is not None and os.geteuid() == 0:
            os.fchown(fd, account.uid, account.gid)  # every file in the spool is the user's
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

"""Frames over a pipe between two processes of this program: an 8-byte big-endian length
and a pickle.  The queue's writer process and the agents' process speak it with the
server that started them.

Both ends are this program, started by the same interpreter: a frame is never read from
anywhere else (a pickle runs code when it is loaded).  This module must never do more
than frame: what the objects mean is each protocol's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import struct
from typing import Any, Final

_HEADER: Final = struct.Struct("!Q")
#: The pipes' capacity asked for (Linux's default is 64 KiB; an unprivileged process may
#: ask up to /proc/sys/fs/pipe-max-size, 1 MiB by default): a frame of a few hundred
#: messages then goes in one write.  In 64 KiB pieces, each piece is an os.write that
#: releases the GIL and must take it back from the loop or a thread building messages,
#: up to a switch interval (5 ms) each time, while the writer process waits for the rest.
PIPE_SIZE: Final = 1 << 20


def widen(fd: int) -> None:
    """Ask for a :data:`PIPE_SIZE` buffer on the pipe ``fd`` (Linux); a smaller one (the
    system's limit, another platform) only means more writes per frame."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def pack_frame(obj: object) -> tuple[bytes, bytes]:
    """The frame of ``obj``: its length header and its pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)), data


def write_parts(fd: int, frame: tuple[bytes, bytes]) -> None:
    """Write a :func:`pack_frame` frame whole (blocking until the pipe takes it all)."""
    head, data = frame
    # One system call and no copy of the frame while the pipe has room for it.
    sent = os.writev(fd, frame)
    if sent < len(head) + len(data):
        view = memoryview(head + data)[sent:]
        while view:
            view = view[os.write(fd, view):]


def write_frame(fd: int, obj: object) -> None:
    write_parts(fd, pack_frame(obj))


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """The next frame's object; None at the end of the input."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    data = _read_exact(fd, _HEADER.unpack(head)[0])
    return None if data is None else pickle.loads(data)


def take_frames(buffer: bytearray) -> list[Any]:
    """The objects of the whole frames at the start of ``buffer`` (what non-blocking
    reads gathered), taken out of it; a partial frame stays for the next read."""
    objects = []
    start, end = 0, len(buffer)
    while end - start >= _HEADER.size:
        stop = start + _HEADER.size + _HEADER.unpack_from(buffer, start)[0]
        if stop > end:
            break
        objects.append(pickle.loads(buffer[start + _HEADER.size:stop]))
        start = stop
    if start:
        del buffer[:start]
    return objects

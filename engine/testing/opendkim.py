"""OpenDKIM's ``opendkim-testmsg`` as a DKIM verifier for tests, with the keys served by a
:class:`~engine.testing.dns.DnsResponder`.

``opendkim-testmsg`` has no option for a name server: libopendkim asks the C library's
resolver, which reads /etc/resolv.conf and only talks to port 53.  So :func:`verify` runs
it in private namespaces made by unshare(1): a user namespace (we are root inside it), a
network namespace that has nothing but its own loopback, and a mount namespace in which a
temporary resolv.conf naming 127.0.0.1 is bind-mounted over /etc/resolv.conf.  Inside, a
DnsResponder answers the test's zone on 127.0.0.1:53.  Nothing outside the namespaces
sees the port, the mount or the queries; the namespaces end with the process.

``opendkim-testmsg`` verifies silently: exit status 0 when every signature verified, 70
(EX_SOFTWARE) with the library's reason on standard error when one did not.  Used by
tests only; it must never be imported by the running server.
"""

from __future__ import annotations

import fcntl
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

__all__ = ["TESTMSG", "unavailable", "verify"]

TESTMSG: Final = "/usr/sbin/opendkim-testmsg"

# linux/sockios.h and linux/if.h: read and set an interface's flags; IFF_UP.
_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_IFF_UP: Final = 0x1


def _unshare() -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--net", "--mount"]


def unavailable() -> str | None:
    """Why :func:`verify` cannot run here, or None."""
    if not Path(TESTMSG).exists():
        return f"{TESTMSG} is not installed (Debian package opendkim-tools)"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare(1) or mount(8) is missing (util-linux)"
    probe = subprocess.run([*_unshare(), "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot make namespaces: {probe.stderr.decode(errors='replace').strip()}"
    return None


def verify(message: bytes, zone: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``opendkim-testmsg`` on ``message`` with ``zone`` (master-file text) as the DNS."""
    with tempfile.TemporaryDirectory() as tmp:
        zone_file = Path(tmp) / "zone"
        zone_file.write_text(zone, encoding="utf-8")
        process = subprocess.run(
            [*_unshare(), sys.executable, "-m", "engine.testing.opendkim", str(zone_file)],
            input=message, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode,
                                       process.stdout.decode(errors="replace"),
                                       process.stderr.decode(errors="replace"))


def _loopback_up() -> None:
    """A new network namespace's loopback is down: bring it up (ip link set lo up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))


def main(argv: list[str]) -> int:
    """Inside the namespaces: serve the zone on 127.0.0.1:53, point the resolver at it,
    run opendkim-testmsg on standard input; its exit status and output are ours."""
    from engine.testing.dns import DnsResponder

    zone = Path(argv[0]).read_text(encoding="utf-8")
    _loopback_up()
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    subprocess.run(["mount", "--bind", conf.name, "/etc/resolv.conf"], check=True)
    responder = DnsResponder(zone)
    responder.start("127.0.0.1", 53)
    try:
        result = subprocess.run([TESTMSG], stdin=sys.stdin.buffer, timeout=30)
    finally:
        responder.stop()
        Path(conf.name).unlink()
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""A private clamd on 127.0.0.1 with a signature database the test writes, for the ClamAV
agent's tests.

``ClamdInstance(directory)`` writes ``clamd.conf`` and a database directory under
``directory`` and runs Debian's ``/usr/sbin/clamd --config-file=...`` in the foreground:
TCPSocket on 127.0.0.1:``port`` (ephemeral by default), LocalSocket ``clamd.sock`` in the
directory.  The database is one ``test.ndb`` holding :data:`SIGNATURES` (body-based
signatures: a name and the bytes that trigger it), so clamd loads nothing else and nothing
is ever downloaded (no freshclam).  ClamAV appends ``.UNOFFICIAL`` to the name of a
signature that is not from its own databases: :data:`TEST_VIRUS` is the name clamd reports
for :data:`TEST_STRING`.  ``start()`` returns once ``zPING`` gets ``PONG`` on both
sockets; ``stop()`` stops it by PID.

Used by tests only; never imported by the running server.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Final

from engine.testing.daemon import DaemonError, LoopbackDaemon
from engine.testing.mta import check_loopback, free_port

__all__ = ["CLAMD", "SIGNATURES", "TEST_STRING", "TEST_VIRUS", "ClamdInstance",
           "find_clamd"]

CLAMD: Final = "/usr/sbin/clamd"

#: A string that only the test database knows as malware.
TEST_STRING: Final = b"FERRY-CLAMAV-TEST-SIGNATURE-7d1f0c3a"
#: The signatures of the test database: name → the bytes that trigger it.
SIGNATURES: Final[Mapping[str, bytes]] = {"Ferry.Test.Signature": TEST_STRING}
#: What clamd names TEST_STRING in "stream: <name> FOUND".
TEST_VIRUS: Final = "Ferry.Test.Signature.UNOFFICIAL"


def find_clamd() -> Path | None:
    """clamd's binary ($FERRY_CLAMD, else Debian's), or None when it is not installed."""
    path = Path(os.environ.get("FERRY_CLAMD", CLAMD))
    return path if path.is_file() else None


class ClamdInstance(LoopbackDaemon):
    """clamd with its configuration, database, sockets and log under ``directory``.
    ``stream_max_length`` is clamd's StreamMaxLength in bytes (a larger INSTREAM is
    refused with an error)."""

    listener_name: ClassVar[str] = "clamd"

    def __init__(self, directory: Path, address: str = "127.0.0.1", port: int = 0, *,
                 signatures: Mapping[str, bytes] = SIGNATURES,
                 stream_max_length: int = 25 << 20, max_threads: int = 4) -> None:
        super().__init__()
        check_loopback(address, "clamd's TCPSocket", DaemonError)
        self.dir = directory
        self.address = address
        self.port = port or free_port(address)
        self.signatures = dict(signatures)
        self.stream_max_length = stream_max_length
        self.max_threads = max_threads
        self.conf_path = directory / "clamd.conf"
        self.db_dir = directory / "db"
        self.socket_path = directory / "clamd.sock"
        self.log_path = directory / "clamd.log"
        self.output_path = directory / "clamd.out"
        if len(bytes(self.socket_path)) >= 108:  # sun_path, unix(7)
            raise DaemonError(f"{self.socket_path} is too long for a Unix socket")

    @property
    def unix_address(self) -> str:
        """The LocalSocket as the agent's ``address`` writes it."""
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str:
        return f"{self.address}:{self.port}"

    def database(self) -> str:
        """test.ndb: ``Name:TargetType:Offset:HexSignature``, target 0 (any file), any
        offset."""
        return "".join(f"{name}:0:*:{pattern.hex()}\n"
                       for name, pattern in self.signatures.items())

    def config(self) -> str:
        # SelfCheck 0: the database never changes under a test, no reload thread.
        return f"""\
# clamd for Ferry's tests (engine.testing.clamav): the test's own signatures only.
Foreground yes
LocalSocket {self.socket_path}
TCPSocket {self.port}
TCPAddr {self.address}
DatabaseDirectory {self.db_dir}
LogFile {self.log_path}
LogTime yes
TemporaryDirectory {self.dir}
StreamMaxLength {self.stream_max_length}
MaxThreads {self.max_threads}
SelfCheck 0
Bytecode no
ScanMail yes
"""

    def _prepare(self) -> None:
        if find_clamd() is None:
            raise DaemonError(f"no clamd binary at {CLAMD}: install the Debian package "
                              "clamav-daemon (tests/run.sh does)")
        shutil.rmtree(self.db_dir, ignore_errors=True)
        self.db_dir.mkdir(parents=True)
        (self.db_dir / "test.ndb").write_text(self.database())
        self.conf_path.write_text(self.config())

    def _command(self) -> list[str]:
        binary = find_clamd()
        assert binary is not None
        return [str(binary), f"--config-file={self.conf_path}"]

    def ping(self, family: str = "unix") -> bool:
        """One zPING on the LocalSocket ("unix") or the TCPSocket ("tcp")."""
        try:
            if family == "unix":
                s = socket.socket(socket.AF_UNIX)
                target: str | tuple[str, int] = str(self.socket_path)
            else:
                s = socket.socket(socket.AF_INET)
                target = (self.address, self.port)
            with s:
                s.settimeout(2)
                s.connect(target)
                s.sendall(b"zPING\0")
                return s.recv(16) == b"PONG\0"
        except OSError:
            return False

    def _probe(self) -> bool:
        return self.ping("unix") and self.ping("tcp")

    def __enter__(self) -> ClamdInstance:
        self.start()
        return self

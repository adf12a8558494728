"""``ferry queue suspend / resume / suspended`` against a real ``ferry serve`` process:
mail held and released, suspensions that outlive a restart, clear errors."""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.testing.dns import DnsResponder
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for
from tests.e2e.test_cli import free_port, start, stop, wait_for_port
from tests.e2e.test_queue_cli import ferry_queue

ZONE = (
    "$TTL 60\nhold.test. IN MX 10 mx.hold.test.\nmx.hold.test. IN A 127.0.21.1\n"
    "probe.test. IN MX 10 mx.probe.test.\nmx.probe.test. IN A 127.0.21.2\n"
)
PROBE = "127.0.21.2"  # mx.probe.test: defers everything (see after_a_retry)
BODY = b"Subject: held\r\n\r\nheld\r\n"

Serve = Callable[[], tuple[subprocess.Popen[bytes], int]]


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    s = CountingSink(["127.0.21.1", PROBE])
    yield s
    s.stop()


@pytest.fixture
def serve(tmp_path: Path, sink: CountingSink) -> Iterator[Serve]:
    """``serve()`` starts ``ferry serve`` on the spool ``tmp_path / "s"``: (process, port)."""
    procs: list[subprocess.Popen[bytes]] = []
    with DnsResponder(ZONE) as responder:
        host, dns_port = responder.address

        def run() -> tuple[subprocess.Popen[bytes], int]:
            port = free_port()
            proc = start(["serve", "--listen", f"127.0.0.1:{port}", "--spool",
                          str(tmp_path / "s"), "--dns", f"{host}:{dns_port}", "--mx-port",
                          str(sink.port), "--retry-interval", "1"], tmp_path)
            procs.append(proc)
            wait_for_port(port, proc)
            return proc, port

        yield run
        for proc in procs:
            if proc.poll() is None:
                stop(proc)


def send(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("a@[127.0.0.1]", [rcpt], BODY)





def after_a_retry(spool: Path, port: int, sink: CountingSink) -> None:
    """Return once the server has retried a deferred message: a probe to probe.test, whose
    MX defers it, has had its second attempt.  Then the retry interval has passed in the
    server and a retry has run: held mail would have gone out by now, were it not held."""
    sink.state.data_replies[PROBE] = "451 4.3.0 probe: try again later"
    send(port, "p@probe.test")

    def retried() -> bool:
        listing = ferry_queue(spool, "list", "--state", "deferred").stdout.splitlines()[1:]
        for qid in (line.split()[0] for line in listing):
            shown = ferry_queue(spool, "show", qid).stdout
            if any(int(n) >= 2 for n in re.findall(r"(\d+) attempts", shown)):
                return True
        return False

    wait_for(retried, 30, "the probe's second attempt")


def suspended_listing(spool: Path) -> list[str]:
    out = ferry_queue(spool, "list", "--state", "suspended")
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[1:]


def test_suspend_holds_mail_and_resume_delivers_it(tmp_path: Path, serve: Serve,
                                                   sink: CountingSink) -> None:
    spool = tmp_path / "s"
    proc, port = serve()
    held = ferry_queue(spool, "suspend", "Hold.Test.")
    assert held.returncode == 0, held.stderr
    assert held.stdout == "suspended hold.test: 0 recipients held\n"
    send(port, "x@hold.test")
    wait_for(lambda: len(suspended_listing(spool)) == 1)
    assert "1 (1 suspended)" in suspended_listing(spool)[0]
    assert ferry_queue(spool, "suspended").stdout == "hold.test\n"
    after_a_retry(spool, port, sink)
    assert sink.state.messages == []  # still held

    bad = ferry_queue(spool, "suspend", "two words")
    assert bad.returncode == 1 and "the server refused" in bad.stderr
    assert "spaces" in bad.stderr

    resumed = ferry_queue(spool, "resume", "hold.test")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "resumed hold.test: 1 recipients back in the queue\n"
    wait_for(lambda: len(sink.state.messages) == 1)
    assert sink.state.messages[0].recipients == ["x@hold.test"]
    none = ferry_queue(spool, "suspended")
    assert none.returncode == 0 and none.stdout == ""
    assert "no destination is suspended" in none.stderr
    code, err = stop(proc)
    assert code == 0, err
    assert not (spool / "control.sock").exists()


def test_a_suspension_outlives_a_restart(tmp_path: Path, serve: Serve,
                                         sink: CountingSink) -> None:
    spool = tmp_path / "s"
    proc, port = serve()
    assert ferry_queue(spool, "suspend", "hold.test").returncode == 0
    send(port, "x@hold.test")
    wait_for(lambda: len(suspended_listing(spool)) == 1)
    code, err = stop(proc)
    assert code == 0, err

    proc, port = serve()
    assert ferry_queue(spool, "suspended").stdout == "hold.test\n"
    send(port, "y@hold.test")  # new mail is held too: the server loaded the set
    wait_for(lambda: len(suspended_listing(spool)) == 2)
    after_a_retry(spool, port, sink)
    assert sink.state.messages == []
    assert ferry_queue(spool, "resume", "hold.test").returncode == 0
    wait_for(lambda: len(sink.state.messages) == 2)
    assert sorted(m.recipients[0] for m in sink.state.messages) == ["x@hold.test",
                                                                    "y@hold.test"]


@pytest.mark.parametrize("args", [("suspend", "hold.test"), ("resume", "hold.test"),
                                  ("suspended",)])
def test_without_a_running_server_it_says_so(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = ferry_queue(tmp_path / "nothing", *args)
    assert out.returncode == 1 and out.stdout == ""
    assert "no running ferry serve answers on" in out.stderr
    assert str(tmp_path / "nothing" / "control.sock") in out.stderr

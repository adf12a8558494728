"""The injection route's own connections (engine.http.fast) against a real RunningFerry over
raw sockets: a request in the plain form gets the answer aiohttp gives the same request
(byte for byte but the Date and the queue ids), and anything else on the connection is
handed to aiohttp, in order, whatever came before it."""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from engine.config import HttpConfig, HttpToken
from engine.http.server import HttpServer
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.wait import wait_for

APP_TOKEN = "a" * 32
READER_TOKEN = "r" * 32
MESSAGE = orjson.dumps({"from": "a@example.com", "recipients": ["b@example.com"],
                        "content": "Subject: hi\r\n\r\nhello\r\n"})


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[RunningFerry]:
    config = ferry_config(tmp_path / "spool")
    tokens = {"app": HttpToken(token=APP_TOKEN, scopes=("inject",)),
              "reader": HttpToken(token=READER_TOKEN, scopes=("read",))}
    config = dataclasses.replace(config, accepted_domains=("example.com",), http=HttpConfig(
        listen=(("127.0.0.1", 0),), tokens=tokens, max_body_size=4096, idle_timeout=30))
    with RunningFerry(config) as f:
        yield f


def _http(f: RunningFerry) -> HttpServer:
    assert f.app.http is not None
    return f.app.http


def _connect(f: RunningFerry) -> socket.socket:
    host, _, port = _http(f).addresses[0].rpartition(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _request(body: bytes, *fields: str) -> bytes:
    head = "".join(f"{field}\r\n" for field in fields)
    return (b"POST /api/v1/messages HTTP/1.1\r\nHost: ferry.test\r\n"
            b"Content-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (head.encode(), len(body), body))


def _answers(client: socket.socket, count: int) -> list[bytes]:
    """``count`` answers read by their Content-Length."""
    data, out = b"", list[bytes]()
    while len(out) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            found = re.search(rb"Content-Length: (\d+)", data[:end])
            assert found is not None
            length = int(found.group(1))
            if len(data) >= end + 4 + length:
                out.append(data[:end + 4 + length])
                data = data[end + 4 + length:]
                continue
        more = client.recv(65536)
        assert more, f"closed after {len(out)} answers: {data!r}"
        data += more
    return out


def _normal(answer: bytes) -> bytes:
    """The answer without what differs between two answers to one request."""
    answer = re.sub(rb"Date: [^\r]*\r\n", b"", answer)
    return re.sub(rb"[0-9A-F]{24}", b"ID", answer)


CASES = {
    "queued": (MESSAGE, ()),
    "malformed JSON": (b"{nope", ()),
    "not an object": (b"[1]", ()),
    "unknown member": (orjson.dumps({"form": "a@example.com"}), ()),
    "bad recipient": (orjson.dumps({"from": "a@example.com", "recipients": ["nope"],
                                    "text": "x"}), ()),
    "bad token": (MESSAGE, ("Authorization: Bearer nope",)),
    "scope": (MESSAGE, (f"Authorization: Bearer {READER_TOKEN}",)),
    "relay": (orjson.dumps({"from": "a@example.com", "recipients": ["b@example.net"],
                            "text": "x"}), (f"Authorization: Bearer {APP_TOKEN}",)),
    "token": (MESSAGE, (f"Authorization: Bearer {APP_TOKEN}",)),
    "bad key": (MESSAGE, ("Idempotency-Key: \t",)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_plain_form_gets_aiohttps_answer(ferry: RunningFerry, case: str) -> None:
    body, fields = CASES[case]
    front = _http(ferry)._front
    assert front is not None
    with _connect(ferry) as plain, _connect(ferry) as other:
        plain.sendall(_request(body, *fields))
        [fast] = _answers(plain, 1)
        assert len(front.connections) == 2  # neither handed over yet
        # "Connection: keep-alive" changes nothing for HTTP/1.1 but makes it aiohttp's.
        other.sendall(_request(body, *fields, "Connection: keep-alive"))
        [slow] = _answers(other, 1)
        assert len(front.connections) == 1  # the second one went to aiohttp
    assert _normal(fast) == _normal(slow)


def test_idempotent_retry_gets_the_same_answer_by_either_door(ferry: RunningFerry) -> None:
    with _connect(ferry) as client:
        client.sendall(_request(MESSAGE, "Idempotency-Key: k1"))
        [first] = _answers(client, 1)
        client.sendall(_request(MESSAGE, "Idempotency-Key: k1"))
        [again] = _answers(client, 1)
        client.sendall(_request(MESSAGE, "Idempotency-Key: k1", "Connection: keep-alive"))
        [slow] = _answers(client, 1)
        client.sendall(_request(MESSAGE + b" ", "Idempotency-Key: k1"))
        [other] = _answers(client, 1)
    assert first.startswith(b"HTTP/1.1 200 ") and b"Idempotent-Replayed" not in first
    assert again.startswith(b"HTTP/1.1 200 OK\r\nIdempotent-Replayed: true\r\n")
    assert _normal(again).partition(b"\r\n\r\n")[2] == _normal(first).partition(b"\r\n\r\n")[2]
    assert _normal(slow) == _normal(again)
    assert other.startswith(b"HTTP/1.1 422 ")
    assert ferry.store.count() == 1


def test_pipelined_requests_are_answered_in_order_across_the_hand_over(
        ferry: RunningFerry) -> None:
    with _connect(ferry) as client:
        client.sendall(_request(MESSAGE) + _request(b"{nope")
                       + b"GET /healthz HTTP/1.1\r\nHost: ferry.test\r\n\r\n"
                       + _request(MESSAGE))
        answers = _answers(client, 4)
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [
        b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK"]
    assert answers[2].endswith(b'{"status":"ok"}')
    assert ferry.store.count() == 2


def test_a_request_that_comes_a_byte_at_a_time_is_served(ferry: RunningFerry) -> None:
    with _connect(ferry) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in _request(MESSAGE):
            client.send(bytes((byte,)))
        [answer] = _answers(client, 1)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert ferry.store.count() == 1


@pytest.mark.parametrize("request_bytes", [
    # chunked, without a Host, a body over max_body_size, HTTP/1.0, a query
    b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(MESSAGE), MESSAGE),
    b"POST /api/v1/messages HTTP/1.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(MESSAGE), MESSAGE),
    b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 5000\r\n\r\n" + b" " * 5000,
    b"POST /api/v1/messages HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(MESSAGE), MESSAGE),
    b"POST /api/v1/messages?x=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(MESSAGE), MESSAGE),
], ids=["chunked", "no-host", "too-large", "http10", "query"])
def test_other_forms_are_aiohttps(ferry: RunningFerry, request_bytes: bytes) -> None:
    front = _http(ferry)._front
    assert front is not None
    with _connect(ferry) as client:
        client.sendall(request_bytes)
        [answer] = _answers(client, 1)
        assert not front.connections  # handed over
    status = answer.split(b" ", 2)[1]
    if b"Host" not in request_bytes:
        assert status == b"400" and answer.endswith(b"Missing 'Host' header in request.")
    elif b"5000" in request_bytes:
        assert status == b"413"
    else:
        assert status == b"200"


def test_an_idle_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, http=HttpConfig(listen=(("127.0.0.1", 0),),
                                                         idle_timeout=0.5))
    with RunningFerry(config) as f, _connect(f) as client:
        client.sendall(_request(MESSAGE))
        answer = b""
        while data := client.recv(4096):  # the answer, then the close (not a timeout)
            answer += data
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in answer
        with _connect(f) as silent:
            assert silent.recv(4096) == b""  # a connection that never sends is closed too


def test_a_client_that_goes_away_leaves_its_request_to_run_to_its_end(
        ferry: RunningFerry) -> None:
    front = _http(ferry)._front
    assert front is not None
    with _connect(ferry) as client:
        client.sendall(_request(MESSAGE))
    # Queued all the same (as aiohttp does: handlers are not cancelled), and forgotten.
    wait_for(lambda: ferry.store.count() == 1, what="the request queued")
    wait_for(lambda: not front.connections and not front.serving, what="the connection gone")


def test_stopping_closes_the_connections_it_serves(tmp_path: Path) -> None:
    config = dataclasses.replace(ferry_config(tmp_path / "spool"),
                                 http=HttpConfig(listen=(("127.0.0.1", 0),)))
    with RunningFerry(config) as f:
        client = _connect(f)
        client.sendall(_request(MESSAGE))
        [answer] = _answers(client, 1)
        assert answer.startswith(b"HTTP/1.1 200 ")
    with client:
        assert client.recv(4096) == b""  # closed by the stop, not left open


def test_over_tls_both_doors_store_the_same_trace(tmp_path: Path, ca: trustme.CA,
                                                  cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    config = dataclasses.replace(ferry_config(tmp_path / "spool"), http=HttpConfig(
        listen=(("127.0.0.1", 0),), cert_file=cert, key_file=key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with RunningFerry(config) as f:
        front = _http(f)._front
        assert front is not None
        host, _, port = _http(f).addresses[0].rpartition(":")
        received = []
        for extra in ((), ("Connection: keep-alive",)):  # this module's door, then aiohttp's
            with context.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                     server_hostname="ferry.test") as client:
                client.sendall(_request(MESSAGE, *extra))
                [answer] = _answers(client, 1)
                assert len(front.connections) == (0 if extra else 1)
                version = client.version()
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            queue_id = bytes.fromhex(orjson.loads(answer.partition(b"\r\n\r\n")[2])["id"])
            field = re.match(rb"Received:.*?\r\n(?![ \t])", f.store.body(queue_id), re.S)
            assert field is not None
            received.append(_normal(field.group(0)).partition(b";")[0])  # (not its time)
    assert received[0] == received[1]
    assert f"version={version}".encode() in received[0] and b"with HTTPS" in received[0]


_NAMES = ("Accept", "X-Thing", "Authorization", "Connection", "Transfer-Encoding",
          "Content-Encoding", "Host", "Content-Type", "Content-Length", "Sec-WebSocket-Key1")
_VALUES = ("application/json", "application/json; charset=utf-8", "close", "keep-alive",
           "chunked", "gzip", f"Bearer {APP_TOKEN}", f"Bearer {READER_TOKEN}", "Bearer nope",
           "", "x", "\tx ", "ferry.test")
_CASES: tuple[Callable[[str], str], ...] = (str, str.lower, str.upper)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """A POST /api/v1/messages mostly in the plain form, with what could make it not so:
    fields added, dropped, repeated, in any case, with values of any text."""
    body = draw(st.sampled_from((MESSAGE, b"{nope", b"[]", b"", b'{"from": 1}')))
    fields = [("Host", "ferry.test"), ("Content-Type", "application/json"),
              ("Content-Length", str(len(body)))]
    if draw(st.booleans()):
        fields.pop(draw(st.integers(0, 1)))  # no Host, or no Content-Type
    for _ in range(draw(st.integers(0, 3))):
        value = draw(st.sampled_from(_VALUES) | st.text(
            st.characters(min_codepoint=0, max_codepoint=0xFF, exclude_characters="\r\n"),
            max_size=12))
        fields.insert(draw(st.integers(0, len(fields))), (draw(st.sampled_from(_NAMES)), value))
    head = "".join(f"{draw(st.sampled_from(_CASES))(name)}:{draw(st.sampled_from(('', ' ')))}"
                   f"{value}\r\n" for name, value in fields)
    return b"POST /api/v1/messages HTTP/1.1\r\n%s\r\n%s" % (head.encode("utf-8"), body)


def test_any_request_gets_the_answer_aiohttp_gives(ferry: RunningFerry) -> None:
    """Whatever this module answers itself is what aiohttp answers the same request (sent
    to it after a GET that handed the connection over), and what it does not, it hands on."""

    @given(_requests())
    def check(request: bytes) -> None:
        with _connect(ferry) as fast, _connect(ferry) as slow:
            fast.sendall(request)
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: ferry.test\r\n\r\n")
            _answers(slow, 1)  # (apart: aiohttp drops a pipelined answer at a parse error)
            slow.sendall(request)
            assert _normal(_answers(fast, 1)[0]) == _normal(_answers(slow, 1)[0])

    check()

"""The HTTP listener itself (engine.http.server): it serves on the configured address, over
TLS when asked, and every error is a problem document (RFC 9457)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from engine.config import HttpConfig
from engine.testing.server import RunningFerry, ferry_config


def _get(url: str, method: str = "GET", context: ssl.SSLContext | None = None,
         **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    async def go() -> tuple[int, dict[str, str], Any]:
        async with aiohttp.ClientSession() as session, session.request(
                method, url, ssl=context if context is not None else True, **kwargs) as answer:
            return answer.status, dict(answer.headers), await answer.json(content_type=None)

    return asyncio.run(go())


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[RunningFerry]:
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, http=HttpConfig(listen=(("127.0.0.1", 0),),
                                                         max_body_size=1024))
    with RunningFerry(config) as f:
        yield f


def _base(f: RunningFerry) -> str:
    assert f.app.http is not None
    return f"http://{f.app.http.addresses[0]}"


def test_healthz(ferry: RunningFerry) -> None:
    status, _, doc = _get(_base(ferry) + "/healthz")
    assert (status, doc) == (200, {"status": "ok"})


def test_unknown_route_and_method_are_problem_documents(ferry: RunningFerry) -> None:
    status, headers, doc = _get(_base(ferry) + "/no/such/thing")
    assert status == 404
    assert headers["Content-Type"] == "application/problem+json"
    assert doc == {"type": "about:blank", "title": "Not Found", "status": 404}
    status, headers, doc = _get(_base(ferry) + "/healthz", method="DELETE")
    assert (status, doc["status"]) == (405, 405)
    assert "GET" in headers["Allow"]


def test_https(tmp_path: Path, ca: trustme.CA, cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, http=HttpConfig(listen=(("127.0.0.1", 0),),
                                                         cert_file=cert, key_file=key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with RunningFerry(config) as f:
        assert f.app.http is not None
        status, _, doc = _get(f"https://{f.app.http.addresses[0]}/healthz", context=context)
        assert (status, doc) == (200, {"status": "ok"})
        with pytest.raises(aiohttp.ClientError):
            _get(f"http://{f.app.http.addresses[0]}/healthz")  # no plain HTTP there


def test_a_body_that_does_not_arrive_in_time_gets_408(tmp_path: Path) -> None:
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, http=HttpConfig(listen=(("127.0.0.1", 0),),
                                                         request_timeout=0.5))
    with RunningFerry(config) as f:
        assert f.app.http is not None
        host, _, port = f.app.http.addresses[0].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            # The header promises 100 bytes of body; 1 comes, and then nothing.
            client.sendall(b"POST /api/v1/messages HTTP/1.1\r\nHost: ferry.test\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            answer = b""
            while not answer.endswith(b"}") and (data := client.recv(4096)):
                answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        # The rest of the body could not be told from a next request: the server closes.
        assert b"Connection: close" in head
        assert b"application/problem+json" in head
        doc = json.loads(body)
        assert (doc["status"], doc["title"]) == (408, "Request timeout")
        assert "http.request_timeout" in doc["detail"]
        assert f.store.count() == 0


def test_an_idle_keep_alive_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    config = ferry_config(tmp_path / "spool")
    config = dataclasses.replace(config, http=HttpConfig(listen=(("127.0.0.1", 0),),
                                                         idle_timeout=0.5))
    with RunningFerry(config) as f:
        assert f.app.http is not None
        host, _, port = f.app.http.addresses[0].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=30) as client:
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: ferry.test\r\n\r\n")
            answer = b""
            while data := client.recv(4096):  # the answer, then the close (not a timeout)
                answer += data
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}')
        assert b"Connection: close" not in answer  # kept alive until it was idle

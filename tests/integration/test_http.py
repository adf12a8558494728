"""The HTTP listener itself (engine.http.server): it serves on the configured address, over
TLS when asked, and every error is a problem document (RFC 9457)."""

from __future__ import annotations

import asyncio
import dataclasses
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

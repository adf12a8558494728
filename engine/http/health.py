"""``GET /healthz``: the process answers (liveness).  ``GET /readyz`` (readiness: the queue
writable, free disk, every listener up) lives here too.  Public: no token needed, so a
load balancer or an orchestrator can probe without a secret."""

from __future__ import annotations

from aiohttp import web

from engine.http.api import json_response

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})

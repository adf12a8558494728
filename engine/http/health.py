"""``GET /healthz``: the process answers (liveness).  ``GET /readyz``: whether this server
should be sent mail now (readiness: the queue writable, free disk above its floor, every
listener up, and the checks other parts add; ``engine.ops.readiness``).  Public: no token
needed, so a load balancer or an orchestrator can probe without a secret."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from engine.http.api import APP, json_response
from engine.ops.readiness import checks, firing_alerts

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 ``{"status": "ready", "checks": {...}, "alerts": [...]}`` when every check
    passes; 503 with ``"status": "unready"``, the checks, and ``failing``: each failing
    check's reason.  ``alerts``: the [[alert]] rules firing now (detail, not checks)."""
    app = request.app[APP]
    found = checks(app)
    failing = {c.name: c.reason for c in found if not c.ok}
    doc: dict[str, Any] = {"status": "unready" if failing else "ready",
                           "checks": {c.name: c.to_json() for c in found},
                           "alerts": firing_alerts(app)}
    if failing:
        doc["failing"] = failing
    # Never cached: a probe must see now (RFC 9111 §5.2.2.5).
    return json_response(doc, status=503 if failing else 200,
                         headers={"Cache-Control": "no-store"})

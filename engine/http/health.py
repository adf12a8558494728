"""``GET /healthz``: the process answers (liveness).  ``GET /readyz``: whether this server
should be sent mail now (readiness: the queue writable, free disk above its floor, every
listener up, and the checks other parts add; ``engine.ops.readiness``).  Public: no token
needed, so a load balancer or an orchestrator can probe without a secret."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from engine.http.api import APP, json_response
from engine.ops.control import ask
from engine.ops.readiness import checks, firing_alerts

routes = web.RouteTableDef()

#: How long a worker of a node waits for worker 0's alerts (seconds): a probe answers fast.
NODE_ALERTS_TIMEOUT: Final = 2.0


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
                           "checks": {c.name: c.to_json() for c in found}}
    if app.node_control is not None and app.node_index != 0:
        # A node's rules are evaluated by worker 0 alone (engine.app._start_alerts).
        try:
            doc["alerts"] = (await ask(app.node_control, {"command": "alerts"},
                                       NODE_ALERTS_TIMEOUT))["alerts"]
        except (OSError, TimeoutError, KeyError, ValueError) as exc:
            doc["alerts"] = []
            doc["alerts_unknown"] = f"the node's alerts did not come: {exc}"
    else:
        doc["alerts"] = firing_alerts(app)
    if failing:
        doc["failing"] = failing
    # Never cached: a probe must see now (RFC 9111 §5.2.2.5).
    return json_response(doc, status=503 if failing else 200,
                         headers={"Cache-Control": "no-store"})

"""``GET /metrics``: Prometheus text format, names prefixed ``ferry_`` (docs/metrics.md).

Renders the server's own registry (``engine.ops.metrics``): figures in memory and two O(1)
lookups of the queue database, on the loop, in milliseconds; the per-destination depths are
those of the walk of the queue's hops index that the previous scrape started in a thread.
Scope ``read``.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from engine.http.api import APP, Problem, Scope, requires

routes = web.RouteTableDef()

#: The text exposition format, version 0.0.4 (what every Prometheus scrapes).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@routes.get("/metrics")
@requires(Scope.READ)
async def metrics(request: web.Request) -> web.Response:
    figures = request.app[APP].metrics
    if figures is None:  # the App made no registry: [http] is off (never served then)
        raise Problem(503, "Service unavailable", "metrics are not collected")
    body = figures.render()
    figures.walk_destinations()  # for the next scrape: this one never waits for a walk
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

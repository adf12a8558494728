"""``GET /metrics``: Prometheus text format, names prefixed ``ferry_`` (docs/metrics.md).

Renders the server's own registry (``engine.ops.metrics``): figures in memory and two O(1)
lookups of the queue database, on the loop, in milliseconds; the per-destination depths are
those of the walk of the queue's hops index that the previous scrape started in a thread.
Scope ``read``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

from engine.http.api import APP, Problem, Scope, requires
from engine.ops import control

#: How long a scrape waits for every worker's metrics (each renders in milliseconds).
NODE_TIMEOUT: Final = 10.0

routes = web.RouteTableDef()

#: The text exposition format, version 0.0.4 (what every Prometheus scrapes).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@routes.get("/metrics")
@requires(Scope.READ)
async def metrics(request: web.Request) -> web.Response:
    app = request.app[APP]
    if app.node_control is not None:  # a worker of a node: every worker's, labelled
        return web.Response(body=await _node_metrics(app.node_control),
                            headers={"Content-Type": CONTENT_TYPE})
    figures = app.metrics
    if figures is None:  # the App made no registry: [http] is off (never served then)
        raise Problem(503, "Service unavailable", "metrics are not collected")
    body = figures.render()
    figures.walk_destinations()  # for the next scrape: this one never waits for a walk
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _node_metrics(node: Path) -> bytes:
    """The node's metrics (engine.cluster.fanout.merge_metrics: a ``worker`` label on
    every sample) from its control channel; 503 when it does not answer."""
    try:
        reply = await control.ask(node, {"command": "metrics"}, NODE_TIMEOUT)
    except (OSError, ValueError) as exc:  # TimeoutError, ControlUnavailable
        raise Problem(503, "Service unavailable", f"the node's metrics: {exc}") from None
    if not reply.get("ok"):
        raise Problem(503, "Service unavailable", f"the node's metrics: {reply.get('error')}")
    return str(reply["text"]).encode("utf-8")

"""``GET /metrics``: Prometheus text format, names prefixed ``ferry_`` (docs/metrics.md)."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()

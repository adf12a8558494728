"""The admin API under ``/api/v1/``: the queue viewer's views and verbs and tracking search,
with the semantics of ``ferry queue`` and ``ferry track`` (one implementation behind both)."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()

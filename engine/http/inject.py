"""``POST /api/v1/messages``: the injection API (raw or structured messages, per-recipient
substitutions, idempotency); 200 only after the commit that holds the message."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()

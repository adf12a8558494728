"""Receive connectors: the asyncio glue between sockets and engine.protocol.server; TLS,
AUTH, policy hooks, ingest into the queue. Must never block the event loop.
"""

"""Sans-I/O SMTP: framing, commands, replies, DATA/BDAT decoding, state machines.

Nothing in this package may import asyncio, socket, ssl, lmdb or logging: it turns bytes
into events and events into bytes, so it can be tested and fuzzed without a network.
Keep this ``__init__`` free of imports (the compiled modules import ``errors`` from here).
"""

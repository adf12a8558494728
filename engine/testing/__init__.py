"""Test helpers that ship with the package (chunkings, and later a sink and a DNS responder).

Used by the test suite and the benchmarks; never imported by the running server.
"""

"""Test helpers that ship with the package (chunkings, a running Ferry,
a raw SMTP client, a counting sink, a DNS responder, private Postfix and Exim
instances, crash torture, bounded waits, a manual clock).

Used by the test suite and the benchmarks; never imported by the running server.
"""

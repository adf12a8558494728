"""The queue database: durable messages, their recipients' states and the indexes over them.

``api`` is the contract (``QueueStore``, ``Outcome``, ``BackPressure``), ``records`` the
record format, ``lmdb_store`` the LMDB implementation with group commit.  Nothing in this
package may know SMTP: it stores envelopes and bodies, it does not speak the protocol.
"""

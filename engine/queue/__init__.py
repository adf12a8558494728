"""The queue database: durable messages, their recipients' states and the indexes over them.

``api`` is the contract (``QueueStore``, ``Outcome``, ``BackPressure``, ``QueueStats``),
``records`` the record format, ``lmdb_store`` the caller's side of the LMDB store (reads,
back pressure, hand-over to the writer), ``writer`` the writer behind one interface (a
thread, or a process: ``writer_process``), ``lmdb_txn`` what one write transaction does
(layout, index keys, outcomes, map growth), ``window`` the active window.  Imports go one
way: ``lmdb_store`` → ``writer`` → ``writer_process`` → ``lmdb_txn``.  Nothing in this
package may know SMTP: it stores envelopes and bodies, it does not speak the protocol.
"""

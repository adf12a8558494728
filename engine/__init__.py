"""Ferry: a high-throughput SMTP delivery engine.

The package is split by role (see DESIGN.md): ``protocol`` (sans-I/O SMTP), ``message``
(header scanning, DSN), and the I/O roles built on them.  Importing ``engine`` must stay
cheap and side-effect free: no event loop, no sockets, no compiled-module selection.
"""

__version__ = "0.1.0"

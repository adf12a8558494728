"""The protocol log's renderer: raw buffered entries → the bytes of the log file.

Import it from here: this selector picks the compiled module (engine._ext.logline, built
from ext/logline.pyx) or its pure-Python twin (engine.ops._logline_py), which write the
same bytes.  The writer thread of engine.ops.protolog calls it for every buffer; the
compiled one does the per-line work in C, so the thread holds the GIL (and keeps it from
the event loop) a fraction as long.  It must never do I/O nor raise on any entry.
"""

from engine import _speedups
from engine.ops._logline_py import render

__all__ = ["render"]
COMPILED = _speedups.select("logline", __all__, globals())

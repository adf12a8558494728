"""The protocol log's renderer: each line logged → the bytes of the log file.

Import it from here: this selector picks the compiled module (engine._ext.logline, built
from ext/logline.pyx) or its pure-Python twin (engine.ops._logline_py), which write the
same bytes.  engine.ops.protolog renders every line as it is logged into a
:class:`Lines` buffer, on the event loop: the compiled one does it in C, for less than
keeping the line raw and rendering it later in a thread (which held the GIL, from the
loop, to walk entries long gone from the CPU's caches).  It must never do I/O, nor raise
on any text.
"""

from engine import _speedups
from engine.ops._logline_py import Lines, SessionLog, render

__all__ = ["Lines", "SessionLog", "render"]
COMPILED = _speedups.select("logline", __all__, globals())

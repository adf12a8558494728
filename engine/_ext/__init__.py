"""Where the compiled wire modules land (``ext/<name>.pyx`` → ``engine._ext.<name>``).

Nothing here is imported directly by the rest of the code: it goes through the selector
modules, which pick the compiled module or its pure-Python twin (``engine._speedups``).
"""

"""The ``ferry`` command line: argument parsing and printing only; the logic lives elsewhere."""

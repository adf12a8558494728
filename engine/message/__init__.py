"""Message content: header scanning, trace headers, DSN construction.  Never does I/O."""

"""A blocking raw SMTP client for tests: send exact bytes, read whole replies.

Real clients (smtplib, swaks) never send the malformed or pipelined input that attack
tests need; this one sends what it is given and parses replies with Ferry's own reply
parser, so tests can assert on codes, enhanced codes and texts.  Never used by the server.
"""

from __future__ import annotations

import socket
import ssl

from engine.protocol.reply import Reply, ReplyParser


class RawClient:
    """``source``: the local address to connect from (any of 127/8 on loopback, so one
    test can be several clients to the server's per-address policies)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0,
                 source: str | None = None) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout,
            source_address=None if source is None else (source, 0))
        self.parser = ReplyParser()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply:
        """The next whole reply; ConnectionError when the server closed first."""
        while True:
            reply = self.parser.pop_reply()
            if reply is not None:
                return reply
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.parser.push(data)

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def command(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        """True when the server has closed (reads EOF) within the socket timeout."""
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.parser = ReplyParser()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def one_message(host: str, port: int, data: bytes, *, mail: bytes = b"a@client.test",
                rcpt: bytes = b"b@example.net", helo: bytes = b"client.test",
                timeout: float = 10.0, source: str | None = None) -> Reply:
    """One transaction on a new session: the reply to the message's end of data, or to the
    MAIL or RCPT that was refused.  ``data`` is the message without its final ".": it must
    end with CRLF.  RSET and NOOP after it must get 250 (the session is still in step), or
    AssertionError."""
    with RawClient(host, port, timeout, source) as c:
        assert c.reply().code == 220
        assert c.command(b"EHLO " + helo).code == 250
        reply = c.command(b"MAIL FROM:<" + mail + b">")
        if reply.code == 250:
            reply = c.command(b"RCPT TO:<" + rcpt + b">")
            if reply.code == 250:
                assert c.command(b"DATA").code == 354
                reply = c.command(data + b".")
        assert c.command(b"RSET").code == 250
        assert c.command(b"NOOP").code == 250
        return reply

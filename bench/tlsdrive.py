"""New TLS connections for `python -m bench.instructions --tls`: the handshake counted.

    python -m bench.instructions --tls [--resume] [--rounds 20] [--connections 20]

Each round opens `connections` connections one after another, makes the TLS handshake on each
(full, or with `--resume` offering the session that slot's previous connection got), sends one
`GET / HTTP/1.1` with `Connection: close` and reads the answer up to the server's close: the
`tls-new` and `tls-resume` scenarios, counted by callgrind instead of timed. The client checks
what it gets (the body, and with `--resume` that the server resumed), so a count is never that
of a failure.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from bench.tls import client_context


class TLSDriver:
    """A `drive(port, connections, rounds)` for bench.instructions, one object per server."""

    def __init__(self, resume: bool) -> None:
        self.resume = resume
        self.context = client_context()
        self.sessions: dict[int, Any] = {}  # slot -> the session its last connection got
        self.resumed = 0
        self.handshakes = 0

    def __call__(self, port: int, connections: int, rounds: int, timeout: float = 60.0) -> None:
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
        for _ in range(rounds):
            for slot in range(connections):
                self.one(port, slot, request, timeout)

    def one(self, port: int, slot: int, request: bytes, timeout: float) -> None:
        session = self.sessions.get(slot) if self.resume else None
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.context.wrap_socket(raw, session=session) as sock:
            sock.sendall(request)
            buf = b""
            try:
                while chunk := sock.recv(4096):
                    buf += chunk
            except ssl.SSLZeroReturnError:
                pass
            if not buf.endswith(b"Vrypt"):
                raise RuntimeError(f"an answer without its body before the close: {buf[:80]!r}")
            self.handshakes += 1
            self.resumed += sock.session_reused
            if self.resume:
                self.sessions[slot] = sock.session


class TLSKeepAliveDriver:
    """`python -m bench.instructions --tls --keepalive`: `connections` TLS connections made once
    (their handshakes before the counters are zeroed), then each round one keep-alive request on
    every connection and its answer read (`Content-Length: 5`): the `tls-ka100` path, counted."""

    def __init__(self) -> None:
        self.context = client_context()
        self.socks: dict[int, Any] = {}
        self.port = 0

    def __call__(self, port: int, connections: int, rounds: int, timeout: float = 60.0) -> None:
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
        socks = [self.sock(port, slot, timeout) for slot in range(connections)]
        for _ in range(rounds):
            for sock in socks:
                sock.sendall(request)
            for sock in socks:
                buf = b""
                while not buf.endswith(b"\r\n\r\nVrypt"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise RuntimeError("the server closed a keep-alive TLS connection")
                    buf += chunk

    def sock(self, port: int, slot: int, timeout: float) -> Any:
        if slot not in self.socks:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks[slot] = self.context.wrap_socket(raw)
        return self.socks[slot]

"""Just enough of an HTTP/2 client (RFC 9113) to check readiness and to hold idle connections.

One GET on stream 1 of a connection: the preface, an empty SETTINGS, a HEADERS frame whose HPACK
block uses only static-table entries and one literal (so no encoder state), the server's SETTINGS
acknowledged, and frames read until stream 1 ends. The status is read from the first field of the
response's header block: an indexed static entry (`:status 200` is index 8, what nginx, the `h2`
package and a precomputed block send) or a literal with the `:status` name and a plain (not
Huffman) value. Anything else is reported as unreadable rather than guessed.
"""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
# HPACK static table (RFC 7541 Appendix A): indexes 8-14 are the :status values.
STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}


class H2Error(RuntimeError):
    pass


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


def request_block(authority: str, scheme: str) -> bytes:
    """:method GET (static 2), :path / (4), :scheme http (6) / https (7), :authority as a literal
    without indexing (name index 1)."""
    value = authority.encode()
    if len(value) > 126:
        raise ValueError("authority too long for this one-byte length")
    return bytes((0x82, 0x84, 0x86 if scheme == "http" else 0x87, 0x01, len(value))) + value


def opening(authority: str, scheme: str) -> bytes:
    """What a client writes to open a connection and send one GET on stream 1."""
    return (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_STREAM | END_HEADERS, 1, request_block(authority, scheme))
    )


def status_of(block: bytes) -> int:
    """The :status of a response header block, from its first field."""
    if not block:
        raise H2Error("empty header block")
    first = block[0]
    if first & 0x80:  # indexed field
        index = first & 0x7F
        if index in STATIC_STATUS:
            return STATIC_STATUS[index]
        raise H2Error(f"first field is static index {index}, not a :status")
    # Literal with incremental indexing (01xxxxxx, 6-bit name index), without indexing
    # (0000xxxx) or never indexed (0001xxxx, both 4-bit); name index 8-14 is :status.
    name = first & 0x3F if first & 0x40 else first & 0x0F
    if name not in STATIC_STATUS or len(block) < 2 or block[1] & 0x80:
        raise H2Error(f"unreadable :status field {block[:8].hex()}")
    length = block[1] & 0x7F
    return int(block[2 : 2 + length])


class Reader:
    """Frames from a socket (plain or TLS), one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise H2Error("connection closed by the server")
            self.buf += data

    def next(self) -> tuple[int, int, int, bytes]:
        self._fill(9)
        length = int.from_bytes(self.buf[:3], "big")
        kind, flags = self.buf[3], self.buf[4]
        stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        self._fill(9 + length)
        payload = self.buf[9 : 9 + length]
        self.buf = self.buf[9 + length :]
        return kind, flags, stream, payload


def split_frames(buf: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """The whole frames at the start of ``buf`` as (type, flags, stream, payload), and the rest:
    for a client that reads without blocking (bench/idlehold.py)."""
    frames = []
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            break
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        frames.append((buf[3], buf[4], stream, buf[9 : 9 + length]))
        buf = buf[9 + length :]
    return frames, buf


def header_payload(flags: int, payload: bytes) -> bytes:
    """A HEADERS (or DATA, with PRIORITY masked off) payload without its padding and priority."""
    if flags & PADDED:
        pad = payload[0]
        payload = payload[1 : len(payload) - pad]
    if flags & PRIORITY:
        payload = payload[5:]
    return payload


def get(sock: socket.socket, authority: str, scheme: str) -> tuple[int, bytes]:
    """Open an HTTP/2 connection on ``sock``, GET / on stream 1, return (status, body). The
    connection stays open (SETTINGS acknowledged), ready to be held idle."""
    sock.sendall(opening(authority, scheme))
    reader = Reader(sock)
    status, block, body = None, b"", b""
    while True:
        kind, flags, stream, payload = reader.next()
        if kind == SETTINGS and not flags & ACK:
            sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else -1
            raise H2Error(f"GOAWAY (error code {code}) {payload[8:80]!r}")
        elif kind == RST_STREAM and stream == 1:
            raise H2Error(f"stream 1 reset (error code {int.from_bytes(payload, 'big')})")
        elif kind in (HEADERS, CONTINUATION) and stream == 1:
            block += header_payload(flags, payload) if kind == HEADERS else payload
            if flags & END_HEADERS and status is None:
                status = status_of(block)
            if flags & END_STREAM:
                break
        elif kind == DATA and stream == 1:
            body += header_payload(flags & PADDED, payload)
            if flags & END_STREAM:
                break
    if status is None:
        raise H2Error("stream 1 ended without a header block")
    return status, body

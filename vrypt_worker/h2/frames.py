"""HTTP/2 frame layout (RFC 9113 §4, §6, §7): types, flags, error codes, SETTINGS ids, and the
few helpers that build the frames the server sends. Parsing is inlined in connection.py (one
`unpack_from` per frame header), so this module only names things and serialises.
"""

from __future__ import annotations

import struct

# The client connection preface (RFC 9113 §3.4), followed by its SETTINGS frame.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame header: 24-bit length (as a byte and a short), type, flags, R bit + 31-bit stream id.
HEADER = struct.Struct(">BHBBL")
HEADER_SIZE = 9
STREAM_MASK = 0x7FFFFFFF

# Frame types (§6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
FLAG_END_STREAM = 0x1  # DATA, HEADERS
FLAG_ACK = 0x1  # SETTINGS, PING
FLAG_END_HEADERS = 0x4  # HEADERS, CONTINUATION
FLAG_PADDED = 0x8  # DATA, HEADERS
FLAG_PRIORITY = 0x20  # HEADERS

# Error codes (§7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

# SETTINGS identifiers (§6.5.2).
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Protocol bounds.
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MIN_MAX_FRAME_SIZE = 16384  # also the default SETTINGS_MAX_FRAME_SIZE
MAX_MAX_FRAME_SIZE = 2**24 - 1
DEFAULT_HEADER_TABLE_SIZE = 4096

_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One whole frame. Not for the per-request hot path (answers.py precomputes those)."""
    size = len(payload)
    return HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def frame_prefix(kind: int, flags: int, size: int) -> bytes:
    """The first five bytes of a frame header: everything but the stream id."""
    return HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, 0)[:5]


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in values.items()))


SETTINGS_ACK = frame(SETTINGS, FLAG_ACK, 0)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a SETTINGS payload whose length is a multiple of 6."""
    return [_SETTING.unpack_from(payload, pos) for pos in range(0, len(payload), 6)]


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + debug)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def ping_ack(payload: bytes) -> bytes:
    return frame(PING, FLAG_ACK, 0, payload)

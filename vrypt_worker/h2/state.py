"""HTTP/2 connection state that the protocol's modules share, I/O-free: the bounds, gunicorn's
settings (`H2Config`), a connection error, and a stream that outlives the frame that opened it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vrypt_worker.h2 import frames
from vrypt_worker.h2.answers import Variant

UNPACK_U32 = struct.Struct(">L").unpack_from

# Output that one call may produce from answers (DATA); more waits for writable(). A peer can
# make a 1 MiB body leave once per 10-byte HEADERS frame: this keeps one call's output bounded.
OUTPUT_BUDGET = 256 * 1024
# Streams answered per call (receive or writable); the frames after the one that used the last
# wait, unparsed, for writable(). One 64 KiB read holds 5,000 13-byte HEAD requests: without
# this bound they made 338 KB of answers in one call, held as long as a peer that never reads
# keeps the connection (HTTP/1's _BATCH bounds the same thing). 128 answers are about 9 KB of
# the default answer and 0.1 ms of CPU.
ANSWERS_PER_CALL = 128
# DATA or CONTINUATION that carries fewer bytes than this and ends nothing (no END_STREAM, no
# END_HEADERS) costs a token of the frame budget: 9 bytes of frame header for one byte of body
# is work without content (nginx counts the same: its flood check is bytes read against payload).
SMALL_FRAGMENT = 128
# A WINDOW_UPDATE is free when it lets at least this much held DATA go (or finishes an answer);
# otherwise it costs a token: WINDOW_UPDATE(0, 1) with answers held makes one byte of DATA.
USEFUL_RELEASE = 1024
# A SETTINGS frame costs one token, plus one per this many entries (a frame may hold 2,730).
SETTINGS_PER_TOKEN = 8
# Streams we reset and remember, so that frames already in flight on them are dropped quietly
# (RFC 9113 §5.1 "closed") instead of answered with another RST_STREAM.
RESET_MEMORY = 256
# Connection-level credit goes back once this much DATA is consumed (half the initial window).
CONNECTION_CREDIT_AT = frames.DEFAULT_WINDOW // 2 + 1
# Gaps in the client's stream ids remembered, to tell a stream id that goes back (PROTOCOL_ERROR)
# from HEADERS on a stream that was used and closed (STREAM_CLOSED). Clients count up by 2.
SKIP_MEMORY = 32
# A mapped `http2_max_header_list_size = 0` ("unlimited" in gunicorn): still a bound here.
UNLIMITED_HEADER_LIST = 256 * 1024


@dataclass(frozen=True)
class H2Config:
    """gunicorn's HTTP/2 settings (`http2_max_concurrent_streams`, `http2_initial_window_size`,
    `http2_max_frame_size`, `http2_max_header_list_size`), the timeouts in seconds and the
    flood budgets (burst, refill per second: gunicorn 27 allows 200 RST_STREAM and 1000 control
    frames per 10 s, the same average rates)."""

    max_concurrent_streams: int = 100
    initial_window_size: int = 65535
    max_frame_size: int = 16384
    max_header_list_size: int = 65536
    idle_timeout: float = 5.0  # nothing in progress and nothing received: GOAWAY and close
    head_timeout: float = 10.0  # something in progress (frame, header block, body) that stalls
    reset_burst: int = 200
    reset_rate: int = 20
    control_burst: int = 1000
    control_rate: int = 100

    @classmethod
    def from_gunicorn(cls, cfg: object, **overrides: float) -> H2Config:
        """From a gunicorn Config (the `http2_*` settings, keepalive as the idle timeout)."""
        values = {
            "max_concurrent_streams": cfg.http2_max_concurrent_streams,  # type: ignore[attr-defined]
            "initial_window_size": cfg.http2_initial_window_size,  # type: ignore[attr-defined]
            "max_frame_size": cfg.http2_max_frame_size,  # type: ignore[attr-defined]
            "max_header_list_size": cfg.http2_max_header_list_size,  # type: ignore[attr-defined]
            "idle_timeout": max(getattr(cfg, "keepalive", 5) or 1, 1),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def header_list_limit(self) -> int:
        return self.max_header_list_size or UNLIMITED_HEADER_LIST


class ProtocolError(Exception):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with this code, then close."""

    def __init__(self, code: int, debug: str = "") -> None:
        super().__init__(debug)
        self.code = code


class Stream:
    """A stream that outlives the frame that opened it: still receiving a body, or holding back
    DATA that flow control does not let go yet (or both, for CONNECT)."""

    __slots__ = (
        "answered",
        "body",
        "head",
        "length",
        "offset",
        "received",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "send_window",
        "variant",
    )

    def __init__(self, length: int, recv_window: int, send_window: int, head: bool) -> None:
        self.length = length  # declared Content-Length, -1 when none
        self.received = 0  # DATA bytes (padding excluded) received so far
        self.recv_window = recv_window  # what the client may still send on this stream
        self.recv_unacked = 0  # consumed and not yet given back by WINDOW_UPDATE
        self.send_window = send_window
        self.head = head
        self.remote_closed = False
        self.answered = False
        self.body = b""  # DATA still owed: body[offset:]
        self.offset = 0
        self.variant: Variant | None = None

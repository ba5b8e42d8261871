"""Helpers for the HTTP/2 core tests: an `h2` sans-I/O client wired to an H2Protocol, raw
frames (hyperframe, or bytes for frames hyperframe refuses to build), and a parser for what the
server wrote. No sockets."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from vrypt_worker.answer import Answer
from vrypt_worker.framing import FramingRules
from vrypt_worker.h2 import H2Answers, H2Config, H2Protocol, frames

NOW = 1_780_000_000.0
PREFACE = frames.PREFACE
REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"example"),
    (b":path", b"/"),
]
H2LOAD = [*REQUEST, (b"user-agent", b"h2load nghttp2/1.52.0")]


def make(
    config: H2Config | None = None, answer: Answer | None = None, rules: FramingRules | None = None
) -> tuple[H2Protocol, FramingRules]:
    rules = rules or FramingRules()
    return H2Protocol(config or H2Config(), rules, H2Answers(NOW, answer)), rules


def raw(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """Any frame, valid or not, byte by byte."""
    return frames.frame(kind, flags, sid, payload)


def settings_frame(values: dict[int, int] | None = None) -> bytes:
    return SettingsFrame(0, settings=values or {}).serialize()


def client_start(values: dict[int, int] | None = None) -> bytes:
    return PREFACE + settings_frame(values)


def headers(
    sid: int,
    block: bytes,
    end_stream: bool = True,
    end_headers: bool = True,
    pad: int = 0,
    depends_on: int | None = None,
) -> bytes:
    frame = HeadersFrame(sid, data=block)
    if end_stream:
        frame.flags.add("END_STREAM")
    if end_headers:
        frame.flags.add("END_HEADERS")
    if pad:
        frame.flags.add("PADDED")
        frame.pad_length = pad
    if depends_on is not None:
        frame.flags.add("PRIORITY")
        frame.depends_on = depends_on
        frame.stream_weight = 15
    return frame.serialize()


def data(sid: int, payload: bytes, end_stream: bool = False, pad: int | None = None) -> bytes:
    flags = frames.FLAG_END_STREAM if end_stream else 0
    if pad is not None:
        return raw(
            frames.DATA, flags | frames.FLAG_PADDED, sid, bytes((pad,)) + payload + b"\0" * pad
        )
    return raw(frames.DATA, flags, sid, payload)


def encoder() -> hpack.Encoder:
    return hpack.Encoder()


def parse(out: bytes) -> list[Frame]:
    """Every frame the server wrote, in order (raises on a truncated or malformed frame)."""
    result = []
    view = memoryview(out)
    pos = 0
    while pos < len(out):
        assert len(out) - pos >= 9, "truncated frame header"
        frame, length = Frame.parse_frame_header(view[pos : pos + 9])
        assert len(out) - pos - 9 >= length, "truncated frame"
        frame.parse_body(view[pos + 9 : pos + 9 + length])
        result.append(frame)
        pos += 9 + length
    return result


def goaway(out: bytes) -> GoAwayFrame | None:
    found = [f for f in parse(out) if isinstance(f, GoAwayFrame)]
    assert len(found) <= 1, "more than one GOAWAY"
    return found[0] if found else None


def goaway_code(out: bytes) -> int | None:
    frame = goaway(out)
    return None if frame is None else frame.error_code


def resets(out: bytes) -> dict[int, int]:
    return {f.stream_id: f.error_code for f in parse(out) if isinstance(f, RstStreamFrame)}


def answered_streams(out: bytes) -> list[int]:
    """Streams that got a HEADERS frame (an answer), in order."""
    return [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)]


def u32(value: int) -> bytes:
    return struct.pack(">L", value)


@dataclass
class Response:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None


class Client:
    """The `h2` package as a client: it checks what the server sends against RFC 9113 (it
    raises on a protocol violation) and keeps its own flow control."""

    def __init__(
        self,
        proto: H2Protocol | None = None,
        local_settings: dict[int, int] | None = None,
        auto_ack: bool = True,
    ) -> None:
        if proto is None:
            proto, self.rules = make()
        self.proto = proto
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        if local_settings:
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values=local_settings
            )
        self.conn.initiate_connection()
        self.auto_ack = auto_ack
        self.responses: dict[int, Response] = {}
        self.events: list[h2.events.Event] = []
        self.outputs: list[bytes] = []
        self.goaway: h2.events.ConnectionTerminated | None = None

    def exchange(self, extra: bytes = b"") -> list[h2.events.Event]:
        """Send what the client has queued (plus `extra` raw bytes); read the server's answer."""
        sent = self.conn.data_to_send() + extra
        out = self.proto.receive(sent) if sent else b""
        return self.feed(out)

    def feed(self, out: bytes) -> list[h2.events.Event]:
        self.outputs.append(out)
        events = self.conn.receive_data(out) if out else []
        for event in events:
            self.events.append(event)
            if isinstance(event, h2.events.ResponseReceived):
                response = self.responses.setdefault(event.stream_id, Response())
                assert not response.headers, f"stream {event.stream_id} answered twice"
                response.headers = list(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.responses[event.stream_id].body += event.data
                if self.auto_ack and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.StreamEnded):
                self.responses[event.stream_id].ended = True
            elif isinstance(event, h2.events.StreamReset):
                self.responses.setdefault(event.stream_id, Response()).reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
        return events

    def request(
        self,
        method: bytes = b"GET",
        extra: list[tuple[bytes, bytes]] | None = None,
        end_stream: bool = True,
        send: bool = False,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method)] + REQUEST[1:] + (extra or [])
        self.conn.send_headers(sid, fields, end_stream=end_stream)
        if send:
            self.exchange()
        return sid

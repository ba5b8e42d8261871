"""HTTP/2 control frames, I/O-free: SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY and GOAWAY
(RFC 9113 §6.3-6.9), as the part of `H2Protocol` (connection.py) that handles them. Each costs
what the frame carries, not what the connection holds: a WINDOW_UPDATE walks only the held
streams whose own window is open, a SETTINGS frame moves the open windows once.
"""

from __future__ import annotations

from vrypt_worker.h2 import frames
from vrypt_worker.h2.frames import FLAG_ACK, MAX_WINDOW
from vrypt_worker.h2.state import (
    SETTINGS_PER_TOKEN,
    USEFUL_RELEASE,
    ProtocolError,
)


class ControlFrames:
    """A mixin of H2Protocol: the handlers of the control frames (its slots are the protocol's)."""

    __slots__ = ()

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ProtocolError(frames.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._control()
            return
        if len(payload) % 6:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "SETTINGS length")
        self._control(1 + len(payload) // (6 * SETTINGS_PER_TOKEN))
        self._apply_settings(payload)
        self._out.append(frames.SETTINGS_ACK)
        if self._ready:
            self._flush()  # a larger INITIAL_WINDOW_SIZE or MAX_FRAME_SIZE lets DATA go

    def _apply_settings(self, payload: bytes) -> None:
        """The entries in order (§6.5.3); the open windows move once, by the last
        INITIAL_WINDOW_SIZE, so a frame of 2,730 entries walks the streams once, not 2,730
        times. A value that would take an open window past 2^31-1 is an error even if a later
        entry brings it back (§6.9.2): checked against the largest open window."""
        old = self._peer_initial
        initial = old
        largest: int | None = None  # the largest open send window, computed at most once
        for ident, value in frames.parse_settings(payload):
            if ident == frames.SETTINGS_ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError(frames.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            elif ident == frames.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(frames.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE")
                if value > old and self._streams:
                    if largest is None:
                        largest = max(stream.send_window for stream in self._streams.values())
                    if largest + value - old > MAX_WINDOW:
                        raise ProtocolError(frames.FLOW_CONTROL_ERROR, "window overflow")
                initial = value
            elif ident == frames.SETTINGS_MAX_FRAME_SIZE:
                if not frames.MIN_MAX_FRAME_SIZE <= value <= frames.MAX_MAX_FRAME_SIZE:
                    raise ProtocolError(frames.PROTOCOL_ERROR, "MAX_FRAME_SIZE")
                self._peer_max_frame = value
            # HEADER_TABLE_SIZE: our blocks never use the client's table. MAX_CONCURRENT_STREAMS:
            # we open none. MAX_HEADER_LIST_SIZE: advisory. Unknown ids: ignored (§6.5.2).
        if initial != old:
            self._peer_initial = initial
            delta = initial - old
            held = self._held
            ready = self._ready
            for sid, stream in self._streams.items():  # §6.9.2: open windows move too
                stream.send_window += delta
                if sid in held:
                    if stream.send_window > 0:
                        ready[sid] = stream
                    else:
                        ready.pop(sid, None)

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        """Free when it lets DATA go (at least USEFUL_RELEASE bytes, or an answer's end), or
        when it gives back at least USEFUL_RELEASE of a window our DATA used (flow control as
        meant); otherwise a token of the frame budget."""
        if len(payload) != 4:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if not increment:
                raise ProtocolError(frames.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            before = self._send_window
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(frames.FLOW_CONTROL_ERROR, "connection window overflow")
            if self._ready and self._flush() >= USEFUL_RELEASE:
                return
            if increment < USEFUL_RELEASE or before >= frames.DEFAULT_WINDOW:
                self._control()
            return
        if sid > self._last_id or not sid & 1:
            raise ProtocolError(frames.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        stream = self._streams.get(sid)
        if stream is None:
            self._control()
            return  # closed: updates may cross our END_STREAM (§5.1)
        if not increment:
            self._stream_error(sid, frames.PROTOCOL_ERROR)
            return
        before = stream.send_window
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(sid, frames.FLOW_CONTROL_ERROR)
            return
        if sid in self._held and stream.send_window > 0:
            self._ready[sid] = stream
            if self._flush() >= USEFUL_RELEASE:
                return
        if increment < USEFUL_RELEASE or before >= self._peer_initial:
            self._control()

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid > self._last_id or not sid & 1:
            raise ProtocolError(frames.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        self._count_reset()  # CVE-2023-44487: opening and resetting streams costs us work
        self._streams.pop(sid, None)
        self._held.pop(sid, None)
        self._ready.pop(sid, None)

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, frames.FRAME_SIZE_ERROR)  # §6.3 (a reset: counted)
            return
        self._control()
        if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == sid:
            self._stream_error(sid, frames.PROTOCOL_ERROR)  # §5.3.1

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid:
            raise ProtocolError(frames.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "GOAWAY length")
        self._peer_goaway = True
        if int.from_bytes(payload[4:8], "big") != frames.NO_ERROR:
            self._held.clear()
            self._ready.clear()
            self._streams.clear()
            self.closing = True  # the client gave up: nothing more to say

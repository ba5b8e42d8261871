"""HTTP/2 requests, I/O-free: HEADERS and CONTINUATION (a header block decoded to a verdict and
answered), DATA (bodies read and dropped under flow control), RST_STREAM's counterpart for the
streams a request ends (RFC 9113 §6.1, §6.2, §6.10, §8.1), as the part of `H2Protocol`
(connection.py) that handles them.
"""

from __future__ import annotations

from vrypt_worker.h2 import frames
from vrypt_worker.h2 import hpack_decoder as hd
from vrypt_worker.h2.frames import FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FLAG_PRIORITY
from vrypt_worker.h2.state import (
    CONNECTION_CREDIT_AT,
    SKIP_MEMORY,
    SMALL_FRAGMENT,
    ProtocolError,
    Stream,
)


class Requests:
    """A mixin of H2Protocol: request frames (its slots are the protocol's)."""

    __slots__ = ()

    def _on_headers(self, flags: int, sid: int, buf: bytes, start: int, end: int) -> None:
        if sid == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "HEADERS on stream 0")
        pos = start
        pad = 0
        if flags & FLAG_PADDED:
            if end - pos < 1:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, "HEADERS too short")
            pad = buf[pos]
            pos += 1
        bad_priority = False
        if flags & FLAG_PRIORITY:
            if end - pos < 5:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, "HEADERS too short")
            bad_priority = int.from_bytes(buf[pos : pos + 4], "big") & 0x7FFFFFFF == sid
            pos += 5
        if pad > end - pos:
            raise ProtocolError(frames.PROTOCOL_ERROR, "padding longer than the payload")
        fragment = buf[pos : end - pad]
        if flags & FLAG_END_HEADERS:
            self._header_block(sid, flags, fragment, bad_priority)
            return
        if len(fragment) > self._block_limit:
            raise ProtocolError(frames.ENHANCE_YOUR_CALM, "header block too large")
        if len(fragment) < SMALL_FRAGMENT:
            self._control()
        self._cont_sid = sid
        self._cont_flags = flags
        self._cont_block = bytearray(fragment)
        self._cont_bad_priority = bad_priority
        self._blocks -= 1  # the block is not complete: no progress for the head timeout

    def _on_continuation(self, flags: int, sid: int, buf: bytes, start: int, end: int) -> None:
        if not self._cont_sid or sid != self._cont_sid:
            raise ProtocolError(frames.PROTOCOL_ERROR, "unexpected CONTINUATION")
        block = self._cont_block
        if len(block) + end - start > self._block_limit:
            raise ProtocolError(frames.ENHANCE_YOUR_CALM, "header block too large")
        block += buf[start:end]
        if not flags & FLAG_END_HEADERS:
            if end - start < SMALL_FRAGMENT:
                self._control()
            self._blocks -= 1
            return
        self._cont_sid = 0
        self._cont_block = bytearray()
        self._header_block(sid, self._cont_flags, bytes(block), self._cont_bad_priority)

    def _decode_request(self, block: bytes) -> int:
        try:
            verdict, self._table = hd.request_verdict(self._table, block)
        except hd.CompressionError as exc:
            raise ProtocolError(frames.COMPRESSION_ERROR, str(exc)) from None
        except hd.HeaderBomb:
            raise ProtocolError(frames.ENHANCE_YOUR_CALM, "header list bomb") from None
        return verdict

    def _decode_trailers(self, block: bytes) -> int:
        try:
            verdict, self._table = hd.trailers_verdict(self._table, block)
        except hd.CompressionError as exc:
            raise ProtocolError(frames.COMPRESSION_ERROR, str(exc)) from None
        except hd.HeaderBomb:
            raise ProtocolError(frames.ENHANCE_YOUR_CALM, "header list bomb") from None
        return verdict

    def _header_block(self, sid: int, flags: int, block: bytes, bad_priority: bool) -> None:
        """A complete header block: a new request, trailers, or a frame on a closed stream."""
        if not sid & 1:
            raise ProtocolError(frames.PROTOCOL_ERROR, "even stream id from a client")
        end_stream = bool(flags & FLAG_END_STREAM)
        if sid > self._last_id:
            # A new stream (§5.1.1: ids only grow). Decoded first: the table must stay right.
            verdict = self._decode_request(block)
            if sid > self._last_id + 2:
                self._skipped.append((self._last_id, sid))  # ids never used in between
                if len(self._skipped) > SKIP_MEMORY:
                    del self._skipped[0]
            self._last_id = sid
            if sid > self._accept_until:
                self._control()
                return  # after our GOAWAY: ignored (§6.8)
            if bad_priority:
                self._stream_error(sid, frames.PROTOCOL_ERROR)  # depends on itself (§5.3.1)
                return
            if verdict & hd.MALFORMED:
                self._stream_error(sid, frames.PROTOCOL_ERROR)  # §8.1.1
                return
            if len(self._streams) >= self.config.max_concurrent_streams:
                self._stream_error(sid, frames.REFUSED_STREAM)  # §5.1.2 (a reset: counted)
                return
            if verdict & (hd.TOO_LARGE | hd.URI_TOO_LONG):
                # §10.5.1: our choice is a 431 (or 414) answer on the stream, as HTTP/1 answers;
                # the connection lives on (the block was decoded, so the table is right).
                self.rules.rejected += 1
                answers = self.answers
                variant = answers.too_large if verdict & hd.TOO_LARGE else answers.uri_too_long
                self._answer(sid, variant, False, None)
                self._answered()
                if not end_stream:
                    self._count_reset()
                    self._reset(sid, frames.NO_ERROR)  # §8.1: the body is not needed
                return
            length = verdict >> hd.LENGTH_SHIFT if verdict & hd.HAS_LENGTH else -1
            head = bool(verdict & hd.HEAD)
            if end_stream:
                if length > 0:
                    self._stream_error(sid, frames.PROTOCOL_ERROR)  # §8.1.1: CL vs DATA
                    return
                self._answer(sid, self.answers.ok, head, None)
                self._answered()
                return
            stream = Stream(length, self.config.initial_window_size, self._peer_initial, head)
            self._streams[sid] = stream
            if verdict & hd.EXPECT_CONTINUE:
                # RFC 9110 §10.1.1: a client may wait for the 100 before sending its body.
                self._out.append(self.answers.continue_.headers_for(sid.to_bytes(4, "big"), False))
            if self.config.initial_window_size < 1024:
                # A tiny advertised window would make the client wait on us for every byte; we
                # discard the body anyway, so give it room at once.
                stream.recv_window += frames.DEFAULT_WINDOW
                self._out.append(frames.window_update(sid, frames.DEFAULT_WINDOW))
            if verdict & hd.CONNECT:
                # §8.5: the 2xx opens a tunnel; answer now, then discard what flows in.
                self._answer(sid, self.answers.tunnel, False, stream)
                self._answered()
            return
        stream = self._streams.get(sid)
        if stream is not None and not stream.remote_closed:
            # Trailers (§8.1): they end the stream, carry no pseudo-header.
            verdict = self._decode_trailers(block)
            if not end_stream or verdict & hd.MALFORMED or bad_priority:
                self._stream_error(sid, frames.PROTOCOL_ERROR)
                return
            self._end_of_request(sid, stream, bool(verdict & hd.TOO_LARGE))
            return
        # Half-closed (remote) or closed: decode for the table, then refuse (§5.1).
        self._decode_trailers(block)
        if sid in self._reset_by_us:
            self._control()  # dropped quietly, not for free
            return
        if stream is not None:
            self._stream_error(sid, frames.STREAM_CLOSED)
            return
        if any(low < sid < high for low, high in self._skipped):
            # Never used: an attempt to open a stream below the last one (§5.1.1).
            raise ProtocolError(frames.PROTOCOL_ERROR, "stream id lower than the last")
        raise ProtocolError(frames.STREAM_CLOSED, "HEADERS on a closed stream")

    def _on_data(self, flags: int, sid: int, buf: bytes, start: int, end: int) -> None:
        if sid == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "DATA on stream 0")
        size = end - start
        # Flow control counts the whole payload, padding included (§6.9.1).
        if size > self._recv_window:
            raise ProtocolError(frames.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_window -= size
        self._recv_unacked += size
        if self._recv_unacked >= CONNECTION_CREDIT_AT:
            self._credit_connection()
        data = size
        if flags & FLAG_PADDED:
            if size < 1 or buf[start] >= size:
                raise ProtocolError(frames.PROTOCOL_ERROR, "padding longer than the payload")
            data = size - 1 - buf[start]
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            if sid > self._last_id or not sid & 1:
                raise ProtocolError(frames.PROTOCOL_ERROR, "DATA on an idle stream")
            if sid not in self._reset_by_us and sid <= self._accept_until:
                self._stream_error(sid, frames.STREAM_CLOSED)  # §6.1
            else:
                self._control()  # dropped quietly, not for free
            return
        if size > stream.recv_window:
            self._stream_error(sid, frames.FLOW_CONTROL_ERROR)
            return
        stream.recv_window -= size
        stream.received += data
        if 0 <= stream.length < stream.received:
            self._stream_error(sid, frames.PROTOCOL_ERROR)  # more than Content-Length
            return
        if flags & FLAG_END_STREAM:
            self._end_of_request(sid, stream)
            return
        if data < SMALL_FRAGMENT:
            self._control()  # an empty or padding-only frame, or a trickle of bytes
        stream.recv_unacked += size
        if stream.recv_unacked >= self._stream_credit_at:
            self._out.append(frames.window_update(sid, stream.recv_unacked))
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    def _credit_connection(self) -> None:
        self._out.append(frames.window_update(0, self._recv_unacked))
        self._recv_window += self._recv_unacked
        self._recv_unacked = 0

    def _end_of_request(self, sid: int, stream: Stream, too_large: bool = False) -> None:
        """The client ended the stream: check the body's size, answer unless already done
        (431 when the trailer section was above the header list limit)."""
        if stream.length >= 0 and stream.received != stream.length and not stream.answered:
            self._stream_error(sid, frames.PROTOCOL_ERROR)  # §8.1.1
            return
        stream.remote_closed = True
        if not stream.answered:
            if too_large:
                self.rules.rejected += 1
                self._answer(sid, self.answers.too_large, False, stream)
            else:
                self._answer(sid, self.answers.ok, stream.head, stream)
            self._answered()
        if sid not in self._held:
            self._streams.pop(sid, None)

"""HTTP/2 output, I/O-free: answers as HEADERS and DATA under flow control and the call's
budgets, RST_STREAM and GOAWAY (RFC 9113 §5.4, §6.9), as the part of `H2Protocol`
(connection.py) that writes frames.
"""

from __future__ import annotations

from vrypt_worker.h2 import frames
from vrypt_worker.h2.answers import Variant
from vrypt_worker.h2.frames import DATA, FLAG_END_STREAM
from vrypt_worker.h2.state import RESET_MEMORY, USEFUL_RELEASE, ProtocolError, Stream


class Output:
    """A mixin of H2Protocol: the frames it sends (its slots are the protocol's)."""

    __slots__ = ()

    def _answer(self, sid: int, variant: Variant, head: bool, stream: Stream | None) -> None:
        """Queue an answer's HEADERS and as much of its DATA as flow control allows."""
        sid4 = sid.to_bytes(4, "big")
        body = variant.body
        if head or not body:
            self._out.append(variant.headers_for(sid4, True))
            if stream is not None:
                stream.answered = True
            return
        size = len(body)
        if (
            variant.one_frame
            and size <= self._send_window
            and size <= (self._peer_initial if stream is None else stream.send_window)
            and size <= self._budget
        ):
            # All of it fits: HEADERS and one DATA with END_STREAM, nothing held.
            self._send_window -= size
            self._budget -= size
            self._out += (variant.get_prefix, sid4, variant.get_middle, sid4, body)
            if stream is not None:
                stream.answered = True
            return
        self._out.append(variant.headers_for(sid4, False))
        if stream is None:
            stream = Stream(-1, 0, self._peer_initial, head)
            stream.remote_closed = True
            self._streams[sid] = stream
        stream.answered = True
        stream.body = body
        stream.offset = 0
        self._held[sid] = stream
        if stream.send_window > 0:
            self._ready[sid] = stream
            self._flush()

    def _flush(self) -> int:
        """Send held DATA as far as the windows, the peer's frame size and the budget allow,
        first come first served. Only streams whose own window is open are walked, and the walk
        stops at the first that cannot finish: the work is what is sent. Returns the DATA
        bytes sent, plus USEFUL_RELEASE for each answer finished."""
        out = self._out
        held = self._held
        ready = self._ready
        # Never above 16384, whatever the peer allows: every peer takes that size, and a larger
        # SETTINGS_MAX_FRAME_SIZE is not always applied by a client in the read that brings our
        # ACK (the `h2` package checks frame sizes per read). 9 bytes per 16 KiB is nothing.
        max_frame = min(self._peer_max_frame, frames.MIN_MAX_FRAME_SIZE)
        released = 0
        while ready and self._send_window > 0 and self._budget > 0:
            sid = next(iter(ready))
            stream = ready[sid]
            body = stream.body
            size = len(body)
            while True:
                count = min(
                    size - stream.offset,
                    stream.send_window,
                    self._send_window,
                    max_frame,
                    self._budget,
                )
                if count <= 0:
                    break
                offset = stream.offset
                stream.offset = offset + count
                stream.send_window -= count
                self._send_window -= count
                self._budget -= count
                released += count
                done = stream.offset == size
                out.append(
                    frames.frame(
                        DATA, FLAG_END_STREAM if done else 0, sid, body[offset : offset + count]
                    )
                )
                if done:
                    released += USEFUL_RELEASE
                    del held[sid]
                    del ready[sid]
                    stream.body = b""
                    if stream.remote_closed:
                        self._streams.pop(sid, None)
                    break
            if sid in ready:
                if stream.send_window > 0:
                    break  # the connection's window or the budget: the next stream waits too
                del ready[sid]  # its own window: it waits for a WINDOW_UPDATE on it
        self._starved = bool(ready) and self._budget <= 0
        return released

    def _answered(self) -> None:
        """A stream answered off the hot path: counted (the call's answers, max_requests), and
        a token of the frame budget given back (a request's frames are what a client is for)."""
        if self._controls < self.config.control_burst:
            self._controls += 1
        rules = self.rules
        rules.answered += 1
        if rules.answered >= rules.open_until and not self._goaway_sent:
            self._goaway(frames.NO_ERROR)  # max_requests reached, or the worker drains

    def _goaway(self, code: int, debug: bytes = b"") -> None:
        """GOAWAY with the last stream we process; a later GOAWAY never names a higher one."""
        last = min(self._last_id, self._accept_until)
        self._goaway_sent = True
        self._accept_until = last
        self._out.append(frames.goaway(last, code, debug))

    def _check_drain(self) -> None:
        """After our GOAWAY or the client's: close once every accepted stream is done."""
        if self.closing or not (self._goaway_sent or self._peer_goaway):
            return
        if not self._streams and not self._cont_sid:
            self.closing = True
            self.clean = False

    def _reset(self, sid: int, code: int) -> None:
        self._out.append(frames.rst_stream(sid, code))
        self._streams.pop(sid, None)
        self._held.pop(sid, None)
        self._ready.pop(sid, None)
        reset = self._reset_by_us
        reset[sid] = None
        if len(reset) > RESET_MEMORY:
            del reset[next(iter(reset))]

    def _stream_error(self, sid: int, code: int) -> None:
        """A stream error (§5.4.2): RST_STREAM, the stream is closed, the connection lives.
        Counted against the reset budget like the client's own resets: a client can make us
        reset streams (a WINDOW_UPDATE of 0, a bad PRIORITY, a self-dependency) as cheaply as
        it can reset them itself (CVE-2025-8671, MadeYouReset)."""
        self._count_reset()
        self.rules.rejected += 1
        self._reset(sid, code)

    def _fail(self, exc: ProtocolError) -> None:
        """A connection error (§5.4.1): GOAWAY with its code, nothing more is processed."""
        self.rules.rejected += 1
        self._goaway(exc.code, str(exc).encode()[:64])
        self._held.clear()
        self._ready.clear()
        self._streams.clear()
        self._cont_block = bytearray()
        self._buf = b""
        self.closing = True
        self.clean = False

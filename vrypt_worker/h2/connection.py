"""One HTTP/2 connection, I/O-free (RFC 9113, RFC 7541): bytes in, bytes out.

`H2Protocol` is a `vrypt_worker.protocol.PlaintextProtocol`: the transport hands it every piece
of plaintext (`receive`), writes what it returns, and asks from its sweep (`tick(now)`) whether a
timeout ran out. No sockets, no clocks, no hub: every behaviour is testable byte by byte.

This module holds the connection's state and its input path (the frame loop and its hot path);
the class's other parts are mixins, one concern each: requests.py (HEADERS, CONTINUATION, DATA),
control.py (SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY, GOAWAY), output.py (the frames it
sends); state.py holds the bounds, `H2Config`, `ProtocolError` and `Stream` they share.

What it does with requests: every request stream gets the operator's fixed answer (answers.py),
HEAD without DATA, as soon as the request is complete (END_STREAM). Request bodies are counted,
checked against Content-Length and thrown away, with WINDOW_UPDATE credit returned so that an
upload never stalls. All the answers one `receive` produces go out as one bytes object.

The hot path is the request that h2load, load balancers and browsers send over and over: one
HEADERS frame with END_STREAM|END_HEADERS (PRIORITY allowed) on the next odd stream, whose
block the connection's HPACK table has seen before (hpack_decoder caches verdicts per table
state). It costs a frame header unpack, a slice, a dict lookup and five list appends. Everything
else (bodies, padding, CONTINUATION, flow control that holds DATA back, errors) takes the
general path. Requests are judged by RFC 9113 §8 and by gunicorn's limit_request_* settings
(from the worker's FramingRules.limits), as gunicorn judges HTTP/2 requests.

Limits, each a bound on what a peer can make us hold or do (docs/http2.md has the numbers):
- input held: one partial frame (at most 9 + SETTINGS_MAX_FRAME_SIZE bytes) and one header
  block being assembled (at most SETTINGS_MAX_HEADER_LIST_SIZE bytes, else ENHANCE_YOUR_CALM);
- streams: at most SETTINGS_MAX_CONCURRENT_STREAMS open or holding an answer back (then
  REFUSED_STREAM); a held answer is a reference to the shared body and an offset;
- output per call: answers beyond OUTPUT_BUDGET bytes in one call wait for `writable()`, and at
  most ANSWERS_PER_CALL streams are answered per call: the rest of the input waits, unparsed,
  for `writable()` (HTTP/1's _BATCH), so a peer that never reads makes us hold one batch of
  answers and the rest of one read, and one call's CPU is bounded;
- every frame that is not a request, a body or a useful window counts against a per-connection
  budget, as nginx's flood counters do: PING (and its ACK), SETTINGS (and its ACK; by its size),
  PRIORITY, GOAWAY, WINDOW_UPDATE that lets no DATA go, DATA and CONTINUATION fragments of fewer
  than SMALL_FRAGMENT bytes that end nothing (padding-only DATA included), frames on streams
  we reset or ignore, unknown types; answered requests give one back. Stream resets have their
  own budget: the client's RST_STREAM and every stream we reset ourselves (REFUSED_STREAM and
  every stream error: CVE-2023-44487 rapid reset, CVE-2025-8671 MadeYouReset). Both are token
  buckets refilled once a second by `tick`; empty → GOAWAY ENHANCE_YOUR_CALM;
- work per frame follows the frame: a WINDOW_UPDATE walks only the held streams whose own
  window is open, and only until the connection's window or the call's budget is used; a
  SETTINGS frame moves the open windows once, whatever its number of entries.
"""

from __future__ import annotations

from collections.abc import Callable

from vrypt_worker.framing import FramingRules
from vrypt_worker.h2 import frames
from vrypt_worker.h2 import hpack_decoder as hd
from vrypt_worker.h2.answers import H2Answers
from vrypt_worker.h2.control import ControlFrames
from vrypt_worker.h2.frames import (
    CONTINUATION,
    DATA,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PRIORITY,
    GOAWAY,
    HEADERS,
    PING,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
)
from vrypt_worker.h2.output import Output
from vrypt_worker.h2.requests import Requests
from vrypt_worker.h2.state import (
    ANSWERS_PER_CALL,
    OUTPUT_BUDGET,
    UNPACK_U32,
    H2Config,
    ProtocolError,
    Stream,
)

_UNPACK_HEADER = frames.HEADER.unpack_from
_HOT_FLAGS = FLAG_END_STREAM | FLAG_END_HEADERS | FLAG_PRIORITY


class H2Protocol(Requests, ControlFrames, Output):
    """The server side of one HTTP/2 connection. See the module docstring; constructors:

    - `H2Protocol(config, rules, answers)`: TLS with ALPN `h2`, or h2c with prior knowledge
      (the client preface is expected at the start of the input, even if the transport already
      looked at it: hand over every byte read).
    - `H2Protocol.upgraded(config, rules, answers, settings, head)`: h2c after an HTTP/1.1
      `Upgrade: h2c` request; the transport has written `101 Switching Protocols` itself.

    Call `start()` first and write what it returns (the server preface SETTINGS, and for an
    upgrade the answer to stream 1); if the transport does not, the first `receive` prepends it.
    """

    __slots__ = (
        "_accept_until",
        "_block_limit",
        "_blocks",
        "_budget",
        "_buf",
        "_cont_bad_priority",
        "_cont_block",
        "_cont_flags",
        "_cont_sid",
        "_controls",
        "_goaway_sent",
        "_held",
        "_last_id",
        "_max_frame",
        "_out",
        "_paused",
        "_peer_goaway",
        "_peer_initial",
        "_peer_max_frame",
        "_preface_left",
        "_quiet_since",
        "_reads",
        "_ready",
        "_recv_unacked",
        "_recv_window",
        "_refilled_at",
        "_report",
        "_reset_by_us",
        "_resets",
        "_seen_blocks",
        "_seen_reads",
        "_send_window",
        "_settings_seen",
        "_skipped",
        "_started",
        "_starved",
        "_stream_credit_at",
        "_streams",
        "_stuck_since",
        "_table",
        "_upgrade_head",
        "answers",
        "clean",
        "closing",
        "config",
        "rules",
    )

    def __init__(self, config: H2Config, rules: FramingRules, answers: H2Answers) -> None:
        # The access log's seam (access_log.LoggingH2Protocol): a function called as
        # `_report(protocol, block, verdict)` for every stream the hot path answers (the general
        # path is seen through _answer). None: with the log off the hot path pays nothing per
        # answer (the test is folded into the max_requests comparison it makes anyway).
        self._report: Callable[[H2Protocol, bytes, int], None] | None = None
        self.config = config
        self.rules = rules
        self.answers = answers
        self.closing = False
        self.clean = False
        self._started = False
        self._preface_left = len(frames.PREFACE)  # client preface bytes still expected
        self._settings_seen = False  # the client's first frame must be SETTINGS (§3.4)
        self._buf = b""
        self._out: list[bytes] = []
        self._budget = OUTPUT_BUDGET
        limits = rules.limits  # gunicorn's limit_request_*, applied to HTTP/2 as gunicorn does
        self._table = hd.empty_table(
            hd.Limits(
                config.header_list_limit, limits.request_line, limits.fields, limits.field_size
            )
        )
        self._last_id = 0  # highest client stream id seen
        self._accept_until = frames.STREAM_MASK  # after our GOAWAY: its last stream id
        self._goaway_sent = False
        self._peer_goaway = False
        self._streams: dict[int, Stream] = {}
        self._held: dict[int, Stream] = {}  # streams with DATA waiting for flow control
        # The held streams whose own window is open: they wait for the connection's window or
        # the call's budget only. A connection WINDOW_UPDATE walks these, not every held stream.
        self._ready: dict[int, Stream] = {}
        self._reset_by_us: dict[int, None] = {}
        self._skipped: list[tuple[int, int]] = []  # (a, b): ids between a and b never opened
        # A header block in assembly (HEADERS without END_HEADERS, then CONTINUATION).
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_block = bytearray()
        self._cont_bad_priority = False
        # Flow control: what we may send, what the client may send.
        self._send_window = frames.DEFAULT_WINDOW
        self._peer_initial = frames.DEFAULT_WINDOW
        self._peer_max_frame = frames.MIN_MAX_FRAME_SIZE
        self._recv_window = frames.DEFAULT_WINDOW
        self._recv_unacked = 0
        self._stream_credit_at = max(1, config.initial_window_size // 2)
        self._max_frame = config.max_frame_size
        self._block_limit = config.header_list_limit
        # Flood budgets (token buckets refilled by tick).
        self._resets = config.reset_burst
        self._controls = config.control_burst
        self._refilled_at: float | None = None  # the last tick's time
        # Timeouts: progress counters observed by tick.
        self._reads = 0
        self._blocks = 0  # frames completed (CONTINUATION counts when its block ends)
        self._seen_reads = -1
        self._seen_blocks = -1
        self._quiet_since = 0.0
        self._stuck_since = 0.0
        self._upgrade_head: bool | None = None  # after an upgrade: stream 1 is owed (HEAD?)
        self._starved = False  # held DATA stopped by OUTPUT_BUDGET, not by flow control
        self._paused = False  # frames wait in _buf: the call's answers were used up

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def upgraded(
        cls,
        config: H2Config,
        rules: FramingRules,
        answers: H2Answers,
        settings: bytes,
        head: bool = False,
    ) -> H2Protocol:
        """After `Upgrade: h2c` (RFC 9113 §3.1 refers to RFC 7540 §3.2): `settings` is the
        decoded HTTP2-Settings payload (negotiation.upgrade_settings), applied as if the client
        had sent it in a SETTINGS frame (the 101 acknowledges it implicitly). The upgraded
        request is stream 1, half-closed (remote); its answer follows our SETTINGS."""
        proto = cls(config, rules, answers)
        if len(settings) % 6:
            raise ValueError("HTTP2-Settings payload is not a list of settings")
        try:
            proto._apply_settings(settings)
        except ProtocolError as exc:
            raise ValueError(f"HTTP2-Settings rejected: {exc}") from None
        proto._last_id = 1
        proto._upgrade_head = head
        return proto

    @classmethod
    def prior_knowledge(
        cls, config: H2Config, rules: FramingRules, answers: H2Answers, received: bytes
    ) -> tuple[H2Protocol, bytes]:
        """h2c with prior knowledge, or TLS with ALPN `h2`: `received` is every byte read so
        far (the client preface, at least in part, and perhaps requests after it). Returns the
        protocol and the bytes to write: our SETTINGS, then whatever `received` asked for."""
        proto = cls(config, rules, answers)
        out = proto.start()
        if received:
            out += proto.receive(received)
        return proto, out

    # -- PlaintextProtocol ------------------------------------------------------------------

    def start(self) -> bytes:
        """The server connection preface (SETTINGS, §3.4), and stream 1's answer after an
        upgrade. Idempotent: b"" once sent."""
        if self._started:
            return b""
        self._started = True
        config = self.config
        values = {
            frames.SETTINGS_MAX_CONCURRENT_STREAMS: config.max_concurrent_streams,
            frames.SETTINGS_INITIAL_WINDOW_SIZE: config.initial_window_size,
            frames.SETTINGS_MAX_FRAME_SIZE: config.max_frame_size,
        }
        if config.max_header_list_size:
            values[frames.SETTINGS_MAX_HEADER_LIST_SIZE] = config.max_header_list_size
        out = self._out
        out.clear()
        out.append(frames.settings(values))
        self._budget = OUTPUT_BUDGET
        if self._upgrade_head is not None:
            head = self._upgrade_head
            self._upgrade_head = None
            self._answer(1, self.answers.ok, head, None)
            self._answered()
            self._check_drain()
        data = b"".join(out)
        out.clear()
        return data

    def receive(self, data: bytes) -> bytes:
        if self.closing:
            return b""
        prefix = b"" if self._started else self.start()
        self._reads += 1
        out = self._out
        out.clear()
        if prefix:
            out.append(prefix)
        self._budget = OUTPUT_BUDGET
        if self._buf:
            buf = self._buf + data
            self._paused = False  # what waited is parsed now, before the new bytes
        else:
            buf = data
        try:
            if self._preface_left:
                buf = self._match_preface(buf)
            if buf:
                self._frames(buf)
            if self._starved:
                self._flush()  # output held past last call's budget (if writable() never came)
        except ProtocolError as exc:
            self._fail(exc)
        if self._goaway_sent or self._peer_goaway:
            self._check_drain()
        result = b"".join(out)
        out.clear()
        return result

    def eof(self) -> bytes:
        """The peer will send nothing more: nothing can complete, nothing is answered."""
        self.closing = True
        self.clean = True
        self._held.clear()
        self._ready.clear()
        return b""

    def idle(self) -> bool:
        return (
            not self._streams
            and not self._buf
            and not self._cont_sid
            and (self._preface_left in (0, len(frames.PREFACE)))
        )

    def shutdown(self) -> bytes:
        """GOAWAY(NO_ERROR, last stream id): streams up to it are still answered."""
        if self.closing:
            return b""
        prefix = b"" if self._started else self.start()
        out = self._out
        out.clear()
        out.append(prefix)
        if not self._goaway_sent:
            self._goaway(frames.NO_ERROR)
        self._check_drain()
        result = b"".join(out)
        out.clear()
        return result

    def refuse_preface(self) -> bytes:
        """The client did not send the connection preface (or not in time): a connection error
        of type PROTOCOL_ERROR (RFC 9113 §3.4). Our SETTINGS (the server preface comes first),
        then GOAWAY(PROTOCOL_ERROR), then close: nothing that is not an HTTP/2 frame."""
        if self.closing:
            return b""
        prefix = b"" if self._started else self.start()
        out = self._out
        out.clear()
        out.append(prefix)
        self._fail(ProtocolError(frames.PROTOCOL_ERROR, "invalid connection preface"))
        result = b"".join(out)
        out.clear()
        return result

    def tick(self, now: float, last_input: float | None = None) -> bytes:
        """The timeouts (idle, stalled), measured from what the previous call saw, and the flood
        budgets' refill: `rate` tokens per second since the previous call (the transport calls
        this every second while something is in progress, less often while idle). `last_input`:
        when the last input came, if the caller knows better than `now`."""
        config = self.config
        seconds = 1.0 if self._refilled_at is None else max(0.0, now - self._refilled_at)
        self._refilled_at = now
        self._resets = min(config.reset_burst, self._resets + config.reset_rate * seconds)
        self._controls = min(config.control_burst, self._controls + config.control_rate * seconds)
        if self.closing:
            return b""
        since = now if last_input is None else last_input
        if self._reads != self._seen_reads:
            self._seen_reads = self._reads
            self._quiet_since = since
        if self._blocks != self._seen_blocks:
            self._seen_blocks = self._blocks
            self._stuck_since = since
        if self.idle():
            if now - self._quiet_since < config.idle_timeout:
                return b""
        elif now - self._stuck_since < config.head_timeout:
            return b""
        # Timed out: say so (GOAWAY with the last stream we processed) and close.
        out = self._out
        out.clear()
        self._held.clear()
        self._ready.clear()
        self._goaway(frames.NO_ERROR)
        self.closing = True
        result = b"".join(out)
        out.clear()
        return result

    @property
    def wants_writable(self) -> bool:
        """Answers wait for nothing but `writable()` (a call's output budget or its answers
        were used up): a transport whose writes did not block should call it after writing."""
        return (self._starved or self._paused) and not self.closing

    def writable(self) -> bytes:
        """The transport's writes have gone: held DATA, then the frames a call left unparsed
        when its answers were used up (ANSWERS_PER_CALL), another call's worth."""
        if self.closing or not (self._held or self._paused):
            return b""
        out = self._out
        out.clear()
        self._budget = OUTPUT_BUDGET
        self._starved = False
        try:
            if self._ready:
                self._flush()
            if self._paused:
                self._paused = False
                buf = self._buf
                self._buf = b""
                self._frames(buf)
        except ProtocolError as exc:
            self._fail(exc)
        self._check_drain()
        result = b"".join(out)
        out.clear()
        return result

    # -- input ------------------------------------------------------------------------------

    def _match_preface(self, buf: bytes) -> bytes:
        done = len(frames.PREFACE) - self._preface_left
        take = min(self._preface_left, len(buf))
        if buf[:take] != frames.PREFACE[done : done + take]:
            raise ProtocolError(frames.PROTOCOL_ERROR, "invalid connection preface")
        self._preface_left -= take
        return buf[take:]

    def _frames(self, buf: bytes) -> None:
        """Every complete frame in buf until the call's answers are used up (then `_paused`);
        the rest is kept for the next call."""
        out = self._out
        answers = self.answers
        rules = self.rules
        limit = rules.answered + ANSWERS_PER_CALL  # this call's answers end at this count
        # One comparison per answer serves this bound, max_requests and the access log's seam.
        stop_at = rules.open_until
        if limit < stop_at:
            stop_at = limit
        if self._report is not None:
            stop_at = -1
        pos = 0
        end = len(buf)
        max_frame = self._max_frame
        try:
            while end - pos >= 9:
                hi, lo, kind, flags, sid = _UNPACK_HEADER(buf, pos)
                length = hi << 16 | lo
                if length > max_frame:
                    raise ProtocolError(frames.FRAME_SIZE_ERROR, "frame larger than allowed")
                start = pos + 9
                if end - start < length:
                    break
                pos = start + length
                sid &= 0x7FFFFFFF
                self._blocks += 1
                if (
                    kind == HEADERS
                    and flags | FLAG_PRIORITY == _HOT_FLAGS  # browsers add PRIORITY
                    and not self._streams
                    and not self._cont_sid
                    and sid == self._last_id + 2  # the next id: odd and new
                    and self._settings_seen
                    and not self._goaway_sent
                ):
                    # The hot path: a complete GET/HEAD-like request on a new stream.
                    if flags & FLAG_PRIORITY:
                        # 5 bytes of (deprecated) priority; depending on itself is an error
                        # that the general path reports.
                        depends = UNPACK_U32(buf, start)[0] & 0x7FFFFFFF
                        block = buf[start + 5 : pos] if depends != sid else None
                    else:
                        block = buf[start:pos]
                    verdict = self._table.reads.get(block)  # type: ignore[arg-type]
                    if verdict is not None and verdict <= hd.HEAD:
                        self._last_id = sid
                        variant = answers.ok
                        if verdict:
                            sid4 = sid.to_bytes(4, "big")
                            out.append(variant.headers_for(sid4, True))
                        else:
                            body_size = len(variant.body)
                            if (
                                variant.one_frame
                                and body_size <= self._send_window
                                and body_size <= self._peer_initial
                                and body_size <= self._budget
                            ):
                                self._send_window -= body_size
                                self._budget -= body_size
                                sid4 = sid.to_bytes(4, "big")
                                out += (variant.get_prefix, sid4, variant.get_middle, sid4)
                                out.append(variant.body)
                            else:
                                self._answer(sid, variant, False, None)
                        rules.answered += 1
                        if rules.answered >= stop_at:
                            report = self._report
                            if report is not None:
                                report(self, block, verdict)  # type: ignore[arg-type]
                            if rules.answered >= rules.open_until and not self._goaway_sent:
                                self._goaway(frames.NO_ERROR)
                            if rules.answered >= limit:
                                break
                        continue
                self._frame(kind, flags, sid, buf, start, pos)
                if self.closing:
                    pos = end
                    break
                if rules.answered >= limit:
                    break
        finally:
            if pos < end:
                self._buf = buf[pos:]
                if rules.answered >= limit:
                    self._paused = True  # the rest waits for writable()
            else:
                self._buf = b""

    def _frame(self, kind: int, flags: int, sid: int, buf: bytes, start: int, end: int) -> None:
        if self._cont_sid and kind != CONTINUATION:
            raise ProtocolError(frames.PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._settings_seen:
            if kind != SETTINGS or flags & FLAG_ACK:
                raise ProtocolError(frames.PROTOCOL_ERROR, "preface must be SETTINGS")
            self._settings_seen = True
        if kind == HEADERS:
            self._on_headers(flags, sid, buf, start, end)
        elif kind == DATA:
            self._on_data(flags, sid, buf, start, end)
        elif kind == CONTINUATION:
            self._on_continuation(flags, sid, buf, start, end)
        elif kind == SETTINGS:
            self._on_settings(flags, sid, buf[start:end])
        elif kind == WINDOW_UPDATE:
            self._on_window_update(sid, buf[start:end])
        elif kind == PING:
            if sid:
                raise ProtocolError(frames.PROTOCOL_ERROR, "PING on a stream")
            if end - start != 8:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, "PING length")
            self._control()
            if not flags & FLAG_ACK:
                self._out.append(frames.ping_ack(buf[start:end]))
        elif kind == RST_STREAM:
            self._on_rst_stream(sid, buf[start:end])
        elif kind == PRIORITY:
            self._on_priority(sid, buf[start:end])
        elif kind == GOAWAY:
            self._control()
            self._on_goaway(sid, buf[start:end])
        elif kind == PUSH_PROMISE:
            raise ProtocolError(frames.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            self._control()  # unknown frame types are ignored (§4.1, §5.5), but not for free

    def _control(self, tokens: int = 1) -> None:
        """A frame that costs work and carries no request."""
        self._controls -= tokens
        if self._controls < 0:
            raise ProtocolError(frames.ENHANCE_YOUR_CALM, "control frame flood")

    def _count_reset(self) -> None:
        self._resets -= 1
        if self._resets < 0:
            raise ProtocolError(frames.ENHANCE_YOUR_CALM, "stream reset flood")

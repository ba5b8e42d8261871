"""The answer's HTTP/2 form, precomputed: its HPACK header block and DATA payload, re-rendered
once a second for Date (RFC 9110 §6.6.1), like response.py does for HTTP/1.

The block is encoded so that it means the same to every client decoder whatever its dynamic
table holds: `:status 200` (static index 8) is an indexed field, everything else is a literal
*without indexing* with a static name index where the static table has the name. Nothing is
inserted into the client's table and nothing refers to it, so one block serves every stream of
every connection, and a client's SETTINGS_HEADER_TABLE_SIZE (even 0) needs no reaction.

The fields are those of the HTTP/1.1 answer (`server`, `date`, `content-type`, the operator's
extra fields, `content-length`) with names lowercased (RFC 9113 §8.2.1); connection-specific
fields are dropped (§8.2.2), answer.py already refuses them as extra fields.
"""

from __future__ import annotations

from vrypt_worker.answer import NO_CONTENT, Answer, active
from vrypt_worker.h2 import frames
from vrypt_worker.response import http_date

# Static table indexes (RFC 7541 Appendix A) for the names we send.
_STATIC_STATUS = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}
_STATUS_NAME = 8
_STATIC_NAMES = {
    b"accept-ranges": 18,
    b"access-control-allow-origin": 20,
    b"age": 21,
    b"allow": 22,
    b"cache-control": 24,
    b"content-disposition": 25,
    b"content-encoding": 26,
    b"content-language": 27,
    b"content-length": 28,
    b"content-location": 29,
    b"content-range": 30,
    b"content-type": 31,
    b"date": 33,
    b"etag": 34,
    b"expires": 36,
    b"last-modified": 44,
    b"link": 45,
    b"location": 46,
    b"refresh": 52,
    b"retry-after": 53,
    b"server": 54,
    b"set-cookie": 55,
    b"strict-transport-security": 56,
    b"vary": 59,
    b"via": 60,
    b"www-authenticate": 61,
}
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
# Every peer accepts frames of this size (the smallest SETTINGS_MAX_FRAME_SIZE there is).
_SAFE_FRAME = frames.MIN_MAX_FRAME_SIZE


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1, with `first` holding the representation's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(raw: bytes) -> bytes:
    return _integer(len(raw), 7, 0) + raw  # no Huffman: the block is built once a second


def literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing (§6.2.2)."""
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return _integer(index, 4, 0) + _string(value)
    return b"\x00" + _string(name) + _string(value)


def status_field(status: int) -> bytes:
    index = _STATIC_STATUS.get(status)
    if index is not None:
        return bytes((0x80 | index,))
    return _integer(_STATUS_NAME, 4, 0) + _string(b"%d" % status)


def header_block(answer: Answer, date: bytes, content_length: bool = True) -> bytes:
    """The HPACK block of the answer for one Date value."""
    block = status_field(answer.status) + literal(b"server", b"vrypt") + literal(b"date", date)
    if answer.content_type is not None:
        block += literal(b"content-type", answer.content_type)
    for line in answer.headers:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name not in _CONNECTION_SPECIFIC:
            block += literal(name, value.strip(b" \t"))
    if content_length and answer.status not in NO_CONTENT:
        block += literal(b"content-length", b"%d" % len(answer.body))
    return block


def headers_frames(block: bytes, flags: int, max_frame: int = _SAFE_FRAME) -> list[bytes]:
    """A header block as HEADERS (+ CONTINUATION) frames without their stream ids: a list of
    (5-byte prefix, payload) pairs flattened, so a stream's frames are
    `prefix0 + sid + payload0 + prefix1 + sid + payload1 ...`."""
    pieces = [block[i : i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = []
    for n, piece in enumerate(pieces):
        kind = frames.HEADERS if n == 0 else frames.CONTINUATION
        piece_flags = (flags if n == 0 else 0) & frames.FLAG_END_STREAM
        if n == len(pieces) - 1:
            piece_flags |= frames.FLAG_END_HEADERS
        out.append(frames.frame_prefix(kind, piece_flags, len(piece)))
        out.append(piece)
    return out


class Variant:
    """One answer as frames: `head` is the HEADERS (+ CONTINUATION) frames as alternating
    5-byte prefixes and payloads (stream id goes between them); `body` the DATA payload.

    `get_tail` and `head_tail` serve the hot path when the block fits one frame and the body
    fits one DATA frame: a GET answer is `head_prefix + sid + get_tail + sid + body`, where
    get_tail is the block followed by the DATA frame's prefix with END_STREAM; a HEAD answer
    is `head_end_prefix + sid + block`.
    """

    __slots__ = ("block", "body", "get_middle", "get_prefix", "head", "head_end", "one_frame")

    def __init__(self, block: bytes, body: bytes) -> None:
        self.block = block
        self.body = body
        self.head = headers_frames(block, 0)  # DATA follows
        self.head_end = headers_frames(block, frames.FLAG_END_STREAM)  # HEAD, or no body
        self.one_frame = len(block) <= _SAFE_FRAME and 0 < len(body) <= _SAFE_FRAME
        if self.one_frame:
            # GET: HEADERS(END_HEADERS) then DATA(END_STREAM), one stream id in each.
            self.get_prefix = self.head[0]
            self.get_middle = block + frames.frame_prefix(
                frames.DATA, frames.FLAG_END_STREAM, len(body)
            )
        else:
            self.get_prefix = b""
            self.get_middle = b""

    def headers_for(self, sid: bytes, end_stream: bool) -> bytes:
        parts = self.head_end if end_stream else self.head
        out = []
        for i in range(0, len(parts), 2):
            out.append(parts[i])
            out.append(sid)
            out.append(parts[i + 1])
        return b"".join(out)


def _error(status: int, reason: bytes) -> Answer:
    """The server's own error answers, worded as response.py words them for HTTP/1."""
    return Answer(status=status, reason=reason, body=reason + b"\n", content_type=b"text/plain")


_TOO_LARGE = _error(431, b"Request Header Fields Too Large")
_URI_TOO_LONG = _error(414, b"URI Too Long")


class H2Answers:
    """The live answers of one worker: `ok` (the operator's answer), `tunnel` (the same to a
    CONNECT: a 2xx there carries no Content-Length, RFC 9110 §9.3.6), `too_large` (431: a
    header list above SETTINGS_MAX_HEADER_LIST_SIZE, or fields beyond gunicorn's
    limit_request_fields / limit_request_field_size) and `uri_too_long` (414: a :path beyond
    limit_request_line). `refresh(now)` once a second renders the Date again; connections hold
    this object, never its variants."""

    __slots__ = ("_second", "answer", "continue_", "ok", "too_large", "tunnel", "uri_too_long")

    def __init__(self, now: float, answer: Answer | None = None) -> None:
        self.answer = answer or active()
        self._second = -1
        # The interim `100 Continue` (RFC 9110 §10.1.1): HEADERS without END_STREAM, no fields.
        self.continue_ = Variant(status_field(100), b"")
        self.refresh(now)

    def refresh(self, now: float) -> bool:
        second = int(now)
        if second == self._second:
            return False
        self._second = second
        date = http_date(second)
        answer = self.answer
        self.ok = Variant(header_block(answer, date), answer.body)
        tunnel_block = (
            header_block(answer, date, content_length=False)
            if 200 <= answer.status < 300
            else self.ok.block
        )
        self.tunnel = Variant(tunnel_block, answer.body)
        self.too_large = Variant(header_block(_TOO_LARGE, date), _TOO_LARGE.body)
        self.uri_too_long = Variant(header_block(_URI_TOO_LONG, date), _URI_TOO_LONG.body)
        return True

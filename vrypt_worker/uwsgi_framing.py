"""uwsgi packets, as gunicorn 27 reads them (`protocol = uwsgi`, gunicorn/uwsgi/message.py): bytes
in, one answer kind per complete request out. No sockets, no clocks.

A packet is a 4-byte header (modifier1, the vars block's size as 16 bits little-endian,
modifier2), the vars block (each var: a 16-bit little-endian key size, the key, a 16-bit value
size, the value), then the request body: CONTENT_LENGTH bytes (`int()` of the var, 0 when that
fails or is negative, as gunicorn's `set_body_reader`). Vars repeat with the last one winning.
What decides the answer:
- REQUEST_METHOD `HEAD` (exactly; none means GET): the answer's head without its body;
- HTTP_CONNECTION `close` (any case; gunicorn's `should_close`): the answer says close, and the
  connection closes after it;
- the worker's `open_until` (max_requests, draining), as for HTTP.

Refused, as gunicorn refuses them (its `UWSGIParseException`s, which its WSGI workers answer with
`500 Internal Server Error` and a close): modifier1 other than 0 (seen as soon as the 4 header
bytes are in), a vars block whose sizes overrun it, more than 1000 vars (gunicorn's
MAX_UWSGI_VARS), and a packet cut short by the end of the input (`eof`). The block itself cannot
be oversized: its size field has 16 bits (at most 65,535 bytes, which nginx enforces on its side).

Where this differs from gunicorn, it is in timing only: the answer is given once the body is in
(gunicorn's application-less answer goes out before the body is read, then the body is read and
dropped); and the end of the input between packets closes quietly (gunicorn answers a 500 that
nobody asked for there, logging `Error handling request (no URI read)`).

Verdicts are cached by the vars block's bytes (they are a pure function of it), so a block seen
before costs one dict lookup, as HTTP heads do in framing.py.
"""

from __future__ import annotations

from vrypt_worker.framing import INTERNAL_ERROR, OK, OK_CLOSE, OK_HEAD, FramingRules

# The 500 gunicorn's WSGI workers give every refused packet (a kind of the response table).
REFUSED = INTERNAL_ERROR
HEADER_SIZE = 4
MAX_VARS = 1000  # gunicorn/uwsgi/message.py MAX_UWSGI_VARS
_CACHE_ENTRIES = 1024
_CACHE_BLOCK_MAX = 4096
# A packed verdict: the answer kind (OK, OK_HEAD, OK_CLOSE, OK_CLOSE_HEAD) in bits 0-3, the body's
# length from bit 4. A refused block is cached as -1.
_LENGTH_SHIFT = 4
_KIND_MASK = 0xF
_BAD = -1
# Parser states: the header and vars (buffered), the body (counted), done (refused or closed),
# and forbidden (the peer is not allowed: the first input, or its end, is refused).
_PACKET, _BODY, _DONE, _FORBIDDEN = range(4)


class PacketRules:
    """What one worker's packet framers share: the worker's FramingRules (answered, rejected,
    open_until: the RPS gauge, max_requests and draining work as for HTTP) and the verdicts."""

    __slots__ = ("cache", "rules", "whole")

    def __init__(self, rules: FramingRules | None = None) -> None:
        self.rules = rules or FramingRules()
        self.cache: dict[bytes, int] = {}
        # Whole packets (header and vars, no body) answered OK or OK_HEAD, by their bytes: a
        # read that is exactly one of them needs no framer (`keep_alive_kind`).
        self.whole: dict[bytes, int] = {}

    def keep_alive_kind(self, data: bytes) -> int:
        """OK or OK_HEAD when `data` is exactly one whole packet without body whose answer
        keeps the connection open (open_until aside: the caller checks it); else -1. Changes
        no state but the caches: `feed` of a fresh framer would give that one answer."""
        kind = self.whole.get(data)
        if kind is not None:
            return kind
        if (
            len(data) < HEADER_SIZE
            or data[0]
            or len(data) != HEADER_SIZE + (data[1] | data[2] << 8)
        ):
            return -1
        verdict = self.verdict(data[HEADER_SIZE:])
        if not 0 <= verdict <= OK_HEAD:  # refused, closing, or with a body
            return -1
        if len(data) <= _CACHE_BLOCK_MAX:
            if len(self.whole) >= _CACHE_ENTRIES:
                self.whole.clear()
            self.whole[data] = verdict
        return verdict

    def verdict(self, block: bytes) -> int:
        """The packed verdict of a complete vars block (-1: refused)."""
        verdict = self.cache.get(block)
        if verdict is None:
            verdict = parse_block(block)[0]
            if len(block) <= _CACHE_BLOCK_MAX:
                if len(self.cache) >= _CACHE_ENTRIES:
                    self.cache.clear()
                self.cache[block] = verdict
        return verdict


def parse_vars(block: bytes) -> tuple[dict[bytes, bytes], str]:
    """The vars of a block, the last of each key winning (as gunicorn's dict), and why the block
    is refused ('' when it is not), in gunicorn's words."""
    found: dict[bytes, bytes] = {}
    pos = 0
    end = len(block)
    count = 0
    while pos < end:
        if count >= MAX_VARS:
            return found, "too many variables"
        if pos + 2 > end:
            return found, "truncated key size"
        key_at = pos + 2
        pos = key_at + (block[pos] | block[pos + 1] << 8)
        if pos > end:
            return found, "truncated key"
        if pos + 2 > end:
            return found, "truncated value size"
        value_at = pos + 2
        value_end = value_at + (block[pos] | block[pos + 1] << 8)
        if value_end > end:
            return found, "truncated value"
        found[block[key_at:pos]] = block[value_at:value_end]
        pos = value_end
        count += 1
    return found, ""


def parse_block(block: bytes) -> tuple[int, str]:
    """The packed verdict of a vars block and why it is refused (-1 and a reason, else '')."""
    found, error = parse_vars(block)
    if error:
        return _BAD, error
    kind = OK
    if found.get(b"HTTP_CONNECTION", b"").lower() == b"close":
        kind = OK_CLOSE
    if found.get(b"REQUEST_METHOD", b"GET") == b"HEAD":
        kind |= OK_HEAD
    length = 0
    raw = found.get(b"CONTENT_LENGTH")
    if raw is not None:
        try:
            length = max(int(raw.decode("latin-1")), 0)  # gunicorn's own int(): `+5`, ` 5 `, `5_0`
        except ValueError:
            length = 0
    return kind | length << _LENGTH_SHIFT, ""


class PacketFramer:
    """The framing state of one connection. Feed it each read; it says what to answer.

    `feed` returns the answer kinds owed, in order (a list of its own, reused by the next feed):
    OK, OK_HEAD, OK_CLOSE, OK_CLOSE_HEAD, or REFUSED (the last: nothing more is read). With a
    `blocks` list it appends, per answer, the vars block it answers (None for REFUSED): what the
    access log needs. `closed` once the last answer is given; `clean` when that was a 200 with
    nothing after its packet (a plain close, no lingering); `reason` says why a packet was refused.
    """

    __slots__ = (
        "_buf",
        "_kind",
        "_remaining",
        "_state",
        "body_block",
        "clean",
        "closed",
        "out",
        "packets",
        "reason",
    )

    def __init__(self, packets: PacketRules) -> None:
        self.packets = packets
        self._state = _PACKET
        self._buf = b""  # the header and vars of a packet still arriving
        self._remaining = 0  # body bytes still to drop
        self._kind = OK  # the answer owed once the body is in
        self.body_block = b""  # the vars block of the packet whose body is arriving (for the log)
        self.out: list[int] = []
        self.closed = False
        self.clean = False
        self.reason = ""

    @property
    def idle(self) -> bool:
        """Between packets: nothing partial buffered, no body being dropped."""
        return self._state == _PACKET and not self._buf

    @property
    def in_packet(self) -> bool:
        """A packet's header or vars began and are not complete (what the head timeout bounds)."""
        return self._state == _PACKET and bool(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def finish(self) -> None:
        """The connection ends without another answer (a timeout): accept no more input."""
        self._state = _DONE
        self._buf = b""
        self.closed = True

    def forbid(self, reason: str) -> None:
        """Refuse whatever comes first, input or its end (a peer outside uwsgi_allow_ips, when
        the answer cannot be given at once: over TLS, after the handshake)."""
        self._state = _FORBIDDEN
        self.reason = reason

    def refuse(self, reason: str) -> list[int]:
        """Refuse now (a peer outside uwsgi_allow_ips, before anything is read): REFUSED."""
        out = self.out
        out.clear()
        self._refuse(reason)
        out.append(REFUSED)
        return out

    def _refuse(self, reason: str) -> None:
        rules = self.packets.rules
        rules.answered += 1
        rules.rejected += 1
        self.reason = reason
        self.finish()
        self.clean = False

    def eof(self) -> list[int]:
        """The input ended: a packet cut short is refused (gunicorn's `incomplete header`,
        `incomplete vars block`); between packets there is nothing to answer."""
        out = self.out
        out.clear()
        state = self._state
        if state == _DONE or self.idle:
            self.finish()
            return out
        if state == _PACKET:
            self._refuse("incomplete packet")
        else:
            self._refuse("incomplete body" if state == _BODY else self.reason)
        out.append(REFUSED)
        return out

    def feed(self, data: bytes, blocks: list[bytes | None] | None = None) -> list[int]:
        out = self.out
        out.clear()
        state = self._state
        if state >= _DONE:
            if state == _FORBIDDEN:
                self._refuse(self.reason)
                out.append(REFUSED)
                if blocks is not None:
                    blocks.append(None)
            return out
        packets = self.packets
        rules = packets.rules
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        while pos < end:
            if state == _BODY:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                kind = self._kind
                if blocks is not None:
                    blocks.append(self.body_block)
            else:
                if end - pos < HEADER_SIZE:
                    break
                if buf[pos]:  # modifier1: only 0, a WSGI request, is served
                    self._refuse(f"unsupported modifier1 {buf[pos]}")
                    out.append(REFUSED)
                    if blocks is not None:
                        blocks.append(None)
                    return out
                block_end = pos + HEADER_SIZE + (buf[pos + 1] | buf[pos + 2] << 8)
                if block_end > end:
                    break
                block = buf[pos + HEADER_SIZE : block_end]
                verdict = packets.verdict(block)
                if verdict < 0:
                    self._refuse(parse_block(block)[1])
                    out.append(REFUSED)
                    if blocks is not None:
                        blocks.append(None)
                    return out
                pos = block_end
                kind = verdict & _KIND_MASK
                length = verdict >> _LENGTH_SHIFT
                if length:
                    self._remaining = length
                    self._kind = kind
                    self.body_block = block
                    state = _BODY
                    continue
                if blocks is not None:
                    blocks.append(block)
            # A packet is complete (its body too): its answer.
            if kind < OK_CLOSE and rules.answered >= rules.open_until:
                kind |= OK_CLOSE  # max_requests or draining: this answer is the last
            rules.answered += 1
            out.append(kind)
            state = _PACKET
            if kind >= OK_CLOSE:
                self._state = _DONE
                self._buf = b""
                self.closed = True
                self.clean = pos == end
                return out
        self._state = state
        self._buf = buf[pos:] if state == _PACKET and pos < end else b""
        return out

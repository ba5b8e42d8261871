"""Request framing: bytes in, one answer per complete request out. No sockets, no clocks.

A request ends after its head and its body (RFC 9112 §6): Content-Length bytes, or chunked data up
to the last chunk and its trailers; a request with neither has no body. The framer finds those ends
however the bytes are split across reads, decides which fixed answer each request gets (GET or
HEAD, keep-alive or close) and rejects anything ambiguous with a 4xx/5xx that ends the connection.

The hot path is the common keep-alive request: one head, already seen before on this worker. Heads
are validated once and the verdict is cached by their exact bytes (framing is a pure function of
the head and the limits), so a repeated head costs one dict lookup, pipelined or not.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

# Answers, as indexes into the response table (response.py renders the bytes). Bit 0 means HEAD:
# the same headers without the body. Every kind from CLOSING upwards ends the connection.
OK = 0  # HTTP/1.1, connection stays open
OK_HEAD = 1
OK_KEEP_ALIVE = 2  # HTTP/1.0 that asked for keep-alive: the answer must say so
OK_KEEP_ALIVE_HEAD = 3
OK_CLOSE = 4  # `Connection: close`, HTTP/1.0 without keep-alive, Upgrade, CONNECT, draining
OK_CLOSE_HEAD = 5
BAD_REQUEST = 6  # 400
URI_TOO_LONG = 7  # 414
FIELDS_TOO_LARGE = 8  # 431
NOT_IMPLEMENTED = 9  # 501: a transfer coding we do not know
VERSION_NOT_SUPPORTED = 10  # 505
REQUEST_TIMEOUT = 11  # 408: the worker's head timeout, never chosen by the framer itself
CONTINUE = 12  # interim `100 Continue`, not an answer
# CONNECT: a 2xx to CONNECT must carry neither Content-Length nor Transfer-Encoding (RFC 9110
# §9.3.6), so this 200 says neither; its body `Vrypt` is delimited by the close that follows.
TUNNEL = 13
# 500: never chosen by this framer; the answer uwsgi_framing.py gives a refused uwsgi packet.
INTERNAL_ERROR = 14
KINDS = 15
CLOSING = OK_CLOSE
ERRORS = frozenset(range(BAD_REQUEST, REQUEST_TIMEOUT + 1))

# A parsed head is cached as one int: the answer kind in bits 0-3, body framing in bits 4-5,
# the 100-continue expectation in bit 6 and the Content-Length from bit 8. A head without body
# and without expectation therefore caches as the bare kind (< 16), the value the hot path tests.
_BODY_LENGTH = 1 << 4
_BODY_CHUNKED = 2 << 4
_EXPECT_CONTINUE = 1 << 6
_LENGTH_SHIFT = 8

# Parser states.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _DONE = range(7)

_TCHAR = rb"!#$%&'*+.^_`|~0-9A-Za-z-"
_TARGET = rb"[\x21-\x7e\x80-\xff]"
_REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) (" + _TARGET + rb"+) HTTP/([0-9])\.([0-9])")
# Every prefix of a valid request line, so that garbage is refused before its line ends.
_VERSION_PREFIX = rb"(?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.[0-9]?)?)?)?)?)?)?)?"
_REQUEST_LINE_PREFIX = re.compile(
    rb"(?:[" + _TCHAR + rb"]+(?: (?:" + _TARGET + rb"+(?: " + _VERSION_PREFIX + rb")?)?)?)?"
)
# Field lines, each with its CRLF: a token, a colon with no space before it, then visible octets,
# spaces and tabs. This also rejects obsolete line folding, bare CR or LF, NUL and other controls.
_FIELD_LINES = re.compile(rb"(?:[" + _TCHAR + rb"]++:[\t\x20-\x7e\x80-\xff]*+\r\n)*+")
# A whole head in one pass (possessive: nothing to backtrack into): request line, field lines,
# the empty line. Groups: method, major and minor version.
_HEAD_RE = re.compile(
    rb"([" + _TCHAR + rb"]++) " + _TARGET + rb"++ HTTP/([0-9])\.([0-9])\r\n"
    rb"(?:[" + _TCHAR + rb"]++:[\t\x20-\x7e\x80-\xff]*+\r\n)*+\r\n"
)
# The fields that decide framing, found in the lowered head (names are case-insensitive).
_FRAMING_FIELDS = re.compile(
    rb"\n(content-length|transfer-encoding|connection|expect|upgrade):([^\r]*)"
)
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# A run of tiny chunks (sizes 1-f, no extension) in one C call: `1\r\nX\r\n` repeated is the
# cheapest body a client can make us parse, and a Python iteration per chunk would cost about
# 1 µs for every 6 bytes (issue 14: 2 MB in 1-byte chunks took 2.8 s; nginx 0.03 s). Possessive:
# a chunk that does not match whole (partial, bad terminator, extension) is left to the
# line-oriented path, which decides it exactly as before.
_SMALL_CHUNKS = re.compile(
    rb"(?:"
    + rb"|".join(
        (rb"%d" % n if n < 10 else rb"[%x%X]" % (n, n)) + rb"\r\n.{%d}\r\n" % n
        for n in range(1, 16)
    )
    + rb")*+",
    re.DOTALL,
)
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_TOKEN = rb"[" + _TCHAR + rb"]+"
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
# Codings a request may name before the final `chunked`. We never decode them (the body is
# discarded), but an unknown one must get 501, not a guess (RFC 9112 §6.1).
_KNOWN_CODINGS = frozenset((b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"))

# gunicorn's own bounds for its limit settings (gunicorn/http/message.py, Request.__init__ and
# Message.__init__): what 0, a negative value or a value above the ceiling turns into.
# Pipelined answers are rendered at most this many at a time, on every transport. More than that
# (one 64 KiB read of small requests owes thousands) are kept as counts per kind: a client that
# pipelines and never reads then costs one partial answer and a count, not the answers' bytes
# (issue 14: 3,000 such clients held 1.2 GB when answers were buffered).
BATCH = 64
# A partial head up to this size is always held (nginx holds up to 4 x 8 KB); a bigger one only
# while the worker's partial heads together stay within VRYPT_HEAD_BUFFER, else it gets 431.
SMALL_HEAD = 32 * 1024
MAX_REQUEST_LINE = 8190  # the ceiling of limit_request_line; a negative value means it too
REQUEST_LINE_UNLIMITED = 1024 * 1024  # limit_request_line = 0, bounded as gunicorn's fast parser
MAX_HEADERS = 32768  # limit_request_fields: 0, negative or above this means this
DEFAULT_FIELD_SIZE = 8190  # limit_request_field_size: 0 or negative means this (no ceiling)
_MAX_LEADING_EMPTY_LINES = 32
_MAX_CONTENT_LENGTH_DIGITS = 18
_CACHE_HEAD_MAX = 2048
# A partial head at least this long grows in place (a bytearray) and is searched for its end only
# in the bytes that arrived since: a head sent in small pieces costs time linear in its size.
_GROW_IN_PLACE = 4096
_CACHE_ENTRIES = 1024
# A head refused before its end is recorded for the access log (`feed`'s `heads`) up to this many
# bytes: its request line, not the megabyte a client may have sent of it.
PARTIAL_HEAD_RECORDED = 2048


@dataclass(frozen=True)
class Limits:
    """gunicorn's limit_request_* settings, normalised and counted the way gunicorn does.

    `request_line`: the longest request line, its CRLF not counted. `fields`: the most field lines
    in a head (and, separately, in a trailer section). `field_size`: the longest field line with
    its CRLF counted, so a line's own bytes may be at most `field_size - 2`.
    """

    request_line: int = 4094
    fields: int = 100
    field_size: int = 8190

    @classmethod
    def from_settings(cls, request_line: int, fields: int, field_size: int) -> Limits:
        if request_line == 0:
            # "Unlimited" in gunicorn: its Python parser has no bound at all, its fast parser
            # (gunicorn_h1c) uses this one. A buffer here must have a bound.
            request_line = REQUEST_LINE_UNLIMITED
        elif request_line < 0 or request_line > MAX_REQUEST_LINE:
            request_line = MAX_REQUEST_LINE
        if fields <= 0 or fields > MAX_HEADERS:
            fields = MAX_HEADERS
        if field_size <= 0:
            field_size = DEFAULT_FIELD_SIZE
        return cls(request_line, fields, field_size)


class FramingRules:
    """What one worker's framers share: the limits, the head cache, counters and the output list.

    `out` is reused by every `RequestFramer.feed` of this worker (one thread, one hub): read it
    before the next feed. `answered` counts final answers (4xx/5xx included), `rejected` the
    4xx/5xx among them. Answers keep their connection open only while `answered < open_until`:
    the worker lowers it to make the answer that reaches max_requests, and every answer once it
    drains, say `Connection: close`.

    `cache` maps complete heads to packed verdicts. The hot-path contract: a read that is exactly
    a cached head whose verdict is below CLOSING (a keep-alive answer, no body), fed to a framer
    that is `fresh`, while `answered < open_until`, gets `[verdict]` and leaves the framer fresh.
    The worker applies that shortcut itself, counting `answered`, without calling `feed`. It
    does the same for a cached head whose verdict is OK_CLOSE or OK_CLOSE_HEAD, and for one
    below CLOSING once `answered` has reached `open_until` (`OK_CLOSE | (verdict & OK_HEAD)`):
    `feed` would give that one answer, end the connection and find nothing after the head
    (`clean`), so the worker answers and closes it without a framer.
    `recent_head` and `recent_kind` are the last head (and its verdict, below CLOSING) that the
    worker answered that way: it compares a read with that head before it hashes the read for a
    cache lookup, because clients that repeat one request (load generators, health checkers) are
    the common case. A read that is one such head several times over (pipelined copies) is as
    many answers: `copies` says how many, for a fresh framer's connection, without a framer.
    `recent_close_head` and `recent_close_kind` are the same for the last cached head whose
    verdict is OK_CLOSE or OK_CLOSE_HEAD answered at an accept (worker._read_at_accept: probes
    that send `Connection: close` on a new connection each time). A head's verdict never
    changes, so the pairs stay true when `cache` is cleared.
    """

    __slots__ = (
        "answered",
        "cache",
        "limits",
        "open_until",
        "out",
        "recent_close_head",
        "recent_close_kind",
        "recent_head",
        "recent_kind",
        "rejected",
        "tick",
    )

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.cache: dict[bytes, int] = {}
        self.recent_head = b""  # a read is never empty: this matches nothing
        self.recent_kind = CLOSING
        self.recent_close_head = b""
        self.recent_close_kind = CLOSING
        self.out: list[int] = []
        self.answered = 0
        self.rejected = 0
        self.open_until = sys.maxsize
        # Not framing: the worker's sweep count, kept here because the connection's hot path
        # holds this object already (it notes the tick of each read: worker.py, Connections).
        self.tick = 0

    def copies(self, data: bytes, most: int) -> int:
        """How many copies of one cached head with a verdict below CLOSING `data` is, when it
        is 2 to `most` of them and every one keeps the connection open (`answered` stays within
        `open_until`): what `feed` of a fresh framer would answer, `[recent_kind] * copies`,
        leaving it fresh. They are counted in `answered` and the head becomes `recent_head`.
        0 for any other read (the framer's), having changed nothing. One search, one hash of
        one head and one comparison, where `feed` walks the read head by head (pipelined load
        generators send the same request over and over)."""
        end = data.find(b"\r\n\r\n") + 4
        size = len(data)
        if end <= 4 or size % end or size == end:
            return 0  # no head, an empty line first, a partial copy, or just one head
        count = size // end
        if count > most or self.answered + count > self.open_until:
            return 0
        head = data[:end]
        if head == self.recent_head:
            kind = self.recent_kind
        else:
            kind = self.cache.get(head, CLOSING)
            if kind >= CLOSING:
                return 0
        # count non-overlapping occurrences of `end` bytes in `count * end` bytes: they tile it
        if data.count(head) != count:
            return 0
        self.recent_head = head
        self.recent_kind = kind
        self.answered += count
        return count

    def parse_and_cache(self, head: bytes) -> int:
        """The packed verdict for a complete head (ending in CRLF CRLF) that is not in `cache`
        (the caller looked): parsed, and cached by its bytes."""
        verdict = self._parse_head(head)
        if len(head) <= _CACHE_HEAD_MAX:
            if len(self.cache) >= _CACHE_ENTRIES:
                self.cache.clear()
            self.cache[head] = verdict
        return verdict

    def _parse_head(self, head: bytes) -> int:
        limits = self.limits
        start = 0
        while head.startswith(b"\r\n", start):  # empty lines before a request line (§2.2)
            start += 2
        if start:
            if start == len(head) - 2 or start == len(head):
                return _SKIP
            if start > 2 * _MAX_LEADING_EMPTY_LINES:
                return BAD_REQUEST
            head = head[start:]
        # Limits first. Each check is skipped when the head is too short to break it: on this
        # cold path every C call counts.
        size = len(head)
        eol = head.find(b"\r\n") if size > limits.request_line else 0
        if eol > limits.request_line:
            return URI_TOO_LONG
        if size > 4 * limits.fields and head.count(b"\r\n") - 2 > limits.fields:
            return FIELDS_TOO_LARGE  # (a field line takes at least 4 bytes: `a:` CRLF)
        line_max = limits.field_size - 2  # gunicorn counts a field line's CRLF
        if size > line_max:
            eol = head.find(b"\r\n")
            field_lines = head[eol + 2 : -4]
            if field_lines and max(map(len, field_lines.split(b"\r\n"))) > line_max:
                return FIELDS_TOO_LARGE
        match = _HEAD_RE.fullmatch(head)
        if match is None:
            line = _REQUEST_LINE.fullmatch(head, 0, head.find(b"\r\n"))
            return VERSION_NOT_SUPPORTED if line and line.group(3) != b"1" else BAD_REQUEST
        method, major, minor = match.groups()
        if major != b"1":
            return VERSION_NOT_SUPPORTED
        http10 = minor == b"0"

        # Only five field names matter for framing (names are case-insensitive).
        framing = _FRAMING_FIELDS.findall(head.lower())

        lengths: list[bytes] = []
        codings: list[bytes] = []
        close = http10
        asked_close = False  # `close` in any Connection field wins over a later `keep-alive`
        connect = method == b"CONNECT"
        upgrade = connect
        expect = False
        for name, raw in framing:
            value = raw.strip(b" \t")
            if name == b"content-length":
                lengths.extend(part.strip(b" \t") for part in value.split(b","))
            elif name == b"transfer-encoding":
                # Parameters stay part of the coding: `chunked;foo=bar` is not `chunked` (the
                # chunked coding has none, RFC 9112 §7), so it is refused like any last coding
                # that is not chunked.
                codings.extend(c.strip(b" \t") for c in value.split(b","))
            elif name == b"connection":
                for option in value.split(b","):
                    option = option.strip(b" \t")
                    if option == b"close":
                        close = asked_close = True
                        break
                    if option == b"keep-alive" and http10 and not asked_close:
                        close = False
            elif name == b"expect":
                expect = value == b"100-continue"
            else:
                upgrade = True

        body = 0
        length = 0
        if codings:
            codings = [c for c in codings if c]
            if lengths or http10 or not codings or codings[-1] != b"chunked":
                return BAD_REQUEST
            if b"chunked" in codings[:-1]:
                return BAD_REQUEST
            if any(c not in _KNOWN_CODINGS for c in codings[:-1]):
                return NOT_IMPLEMENTED
            body = _BODY_CHUNKED
        elif lengths:
            first = lengths[0]
            if not first.isdigit() or len(first) > _MAX_CONTENT_LENGTH_DIGITS:
                return BAD_REQUEST
            if any(other != first for other in lengths):
                return BAD_REQUEST
            length = int(first)
            if length:
                body = _BODY_LENGTH

        if connect:
            kind = TUNNEL
        elif upgrade or close:
            kind = OK_CLOSE
        elif http10:
            kind = OK_KEEP_ALIVE
        else:
            kind = OK
        if method == b"HEAD":
            kind |= OK_HEAD
        if body and expect and not http10:  # HTTP/1.0 clients must not get a 1xx (RFC 9110 §10.1.1)
            body |= _EXPECT_CONTINUE
        return kind | body | (length << _LENGTH_SHIFT)


# Verdict for a "head" that was only empty lines: consume it, answer nothing.
_SKIP = 15


class RequestFramer:
    """The framing state of one connection. Feed it each read; it says what to answer."""

    __slots__ = (
        "_buf",
        "_checked",
        "_fields",
        "_kind",
        "_remaining",
        "_rules",
        "_state",
        "chunk_lines",
        "clean",
        "closed",
        "fresh",
    )

    def __init__(self, rules: FramingRules) -> None:
        self._rules = rules
        self._state = _HEAD
        self._buf = b""
        self._remaining = 0  # body bytes (or chunk bytes) still to consume
        self._kind = OK  # the answer owed once the current body is consumed
        self._checked = 0  # how far a partial head's lines have been checked against the limits
        self._fields = 0  # complete field lines in that checked part
        self.closed = False  # the last answer was given: close once it is sent
        self.clean = False  # ...and it was a 200 with no byte after its request: a plain close
        self.fresh = True  # at a request boundary with nothing buffered (see FramingRules)
        # Chunk-size lines parsed one at a time (the tiny-chunk scan takes the rest), about 1.5 µs
        # each; the worker reads and resets it to keep such a client's turns short.
        self.chunk_lines = 0

    @property
    def idle(self) -> bool:
        """Between requests: nothing partial buffered, no body being consumed."""
        return self._state == _HEAD and not self._buf

    @property
    def in_head(self) -> bool:
        """A request head has started and is not complete yet (what a head timeout measures)."""
        return self._state == _HEAD and bool(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def partial_head(self) -> bytes:
        """The bytes of a head still arriving (`in_head`), at most PARTIAL_HEAD_RECORDED of them:
        what the access log shows of a request the server answers 408 or 431 before its end."""
        return bytes(self._buf[:PARTIAL_HEAD_RECORDED]) if self.in_head else b""

    def finish(self) -> None:
        """The worker answered for us (a timeout): accept no more input on this connection."""
        self._state = _DONE
        self._buf = b""
        self.closed = True
        self.fresh = False

    def feed(self, data: bytes, heads: list[tuple[int, bytes]] | None = None) -> list[int]:
        """Consume one read. Returns the answers owed, in order (the rules' shared list).

        `heads`, the access log's (access_log.LoggingFramer): each head this read completes is
        appended as (the index in the returned list of the answer it gets, the head), and a head
        refused before its end as what it had sent of it; an answer without an entry of its own
        answers the entry before it (the same head again), or, when it comes first, the head
        whose body an earlier read began. Without it, the cost is one test per new head."""
        rules = self._rules
        cache = rules.cache
        out = rules.out
        out.clear()
        state = self._state
        held = self._buf
        if not held:
            if state == _DONE:
                return out
            buf = data
        elif len(held) < _GROW_IN_PLACE:
            buf = held + data
        elif state == _HEAD:
            # A big head still arriving: append in place and look for its end only in the new
            # bytes (the held part has none), so a head in many small reads stays linear.
            if type(held) is bytes:
                held = bytearray(held)
            scan = len(held) - 3
            held += data
            if held.find(b"\r\n\r\n", scan) < 0 and not self._check_partial_head(held, 0):
                self._buf = held
                return out
            buf = bytes(held)  # complete (or refused): the usual path, once
        else:
            buf = held + data

        answered = rules.answered
        open_until = rules.open_until
        pos = 0
        end = len(buf)
        last_head = None
        owed = -1  # a final answer to give at the bottom of this iteration
        while pos < end:
            if state == _HEAD:
                # Pipelined requests are often the same bytes again: a head identical to the
                # previous one ends at the same offset and gets the same verdict.
                if last_head is not None and buf.startswith(last_head, pos):
                    pos += len(last_head)
                else:
                    head_end = buf.find(b"\r\n\r\n", pos)
                    if head_end < 0:
                        owed = self._check_partial_head(buf, pos) or -1
                        if owed < 0:
                            break
                        if heads is not None:  # refused: what it sent, for the access log
                            heads.append((len(out), bytes(buf[pos : pos + PARTIAL_HEAD_RECORDED])))
                    else:
                        head_end += 4
                        last_head = buf[pos:head_end]
                        if heads is not None:
                            heads.append((len(out), last_head))
                        verdict = cache.get(last_head)
                        if verdict is None:
                            verdict = rules.parse_and_cache(last_head)
                        pos = head_end
                if owed < 0:
                    self._checked = self._fields = 0
                    if verdict < 16:
                        if verdict == _SKIP:
                            continue
                        owed = verdict
                    else:
                        self._kind = verdict & 0xF
                        if verdict & _EXPECT_CONTINUE:
                            out.append(CONTINUE)
                        if verdict & _BODY_CHUNKED:
                            state = _CHUNK_SIZE
                        else:
                            state = _BODY
                            self._remaining = verdict >> _LENGTH_SHIFT
                        continue
            elif state in (_BODY, _CHUNK_DATA):
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining:
                    continue
                if state == _CHUNK_DATA:
                    state = _CHUNK_END
                    continue
                owed = self._kind
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    owed = BAD_REQUEST
                else:
                    pos += 2
                    state = _CHUNK_SIZE
                    continue
            else:  # _CHUNK_SIZE or _TRAILERS: line-oriented
                limit = rules.limits.field_size
                if state == _CHUNK_SIZE:
                    pos = _SMALL_CHUNKS.match(buf, pos).end()  # type: ignore[union-attr]
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos <= limit:
                        break
                    owed = BAD_REQUEST if state == _CHUNK_SIZE else FIELDS_TOO_LARGE
                else:
                    line = buf[pos:eol]
                    pos = eol + 2
                    if state == _CHUNK_SIZE:
                        size = _chunk_size(line, limit)
                        if size > 0:
                            self.chunk_lines += 1
                            self._remaining = size
                            state = _CHUNK_DATA
                            continue
                        if size < 0:
                            owed = BAD_REQUEST
                        else:
                            state = _TRAILERS
                            self._fields = 0
                            continue
                    elif line:
                        owed = self._check_trailer(line)
                        if not owed:
                            owed = -1
                            continue
                    else:
                        self._fields = 0
                        owed = self._kind

            # A request is complete (or broken): give its answer.
            if owed < CLOSING and answered >= open_until:
                owed = OK_CLOSE | (owed & OK_HEAD)  # draining: this answer is the last
            out.append(owed)
            answered += 1
            if owed >= CLOSING:
                if BAD_REQUEST <= owed <= REQUEST_TIMEOUT:
                    rules.rejected += 1
                state = _DONE
                break
            state = _HEAD
            owed = -1

        rules.answered = answered
        self._state = state
        if state == _DONE:
            self._buf = b""
            self.closed = True
            self.clean = not BAD_REQUEST <= owed <= REQUEST_TIMEOUT and pos == end
            self.fresh = False
        else:
            self._buf = buf[pos:] if pos < end else b""
            self.fresh = state == _HEAD and not self._buf
        return out

    def _check_partial_head(self, buf: bytes, pos: int) -> int:
        """Apply the limits to a head still arriving, so the buffer never outgrows them."""
        limits = self._rules.limits
        start = pos
        while buf.startswith(b"\r\n", start):
            start += 2
        if start - pos > 2 * _MAX_LEADING_EMPTY_LINES:
            return BAD_REQUEST
        end = len(buf)
        eol = buf.find(b"\r\n", start)
        if eol < 0:
            # A request line still arriving. A CR at the end may be the first half of its CRLF.
            pending = end - start - (1 if buf.endswith(b"\r") else 0)
            if pending > limits.request_line:
                return URI_TOO_LONG
            # Reject what can never become a request line (a TLS ClientHello, binary noise) now,
            # not after the head timeout.
            if _REQUEST_LINE_PREFIX.fullmatch(buf, start, start + pending) is None:
                return BAD_REQUEST
            return 0
        if self._checked == 0:
            if eol - start > limits.request_line:
                return URI_TOO_LONG
            match = _REQUEST_LINE.fullmatch(buf, start, eol)
            if match is None:
                return BAD_REQUEST
            if match.group(3) != b"1":
                return VERSION_NOT_SUPPORTED
        # Field lines: count and measure the complete ones not checked yet, then the partial one.
        # A field line may hold field_size - 2 bytes before its CRLF (gunicorn counts the CRLF).
        line_max = limits.field_size - 2
        checked = max(self._checked, eol + 2)
        fields = self._fields
        while True:
            line_end = buf.find(b"\r\n", checked)
            if line_end < 0:
                break
            fields += 1
            if fields > limits.fields or line_end - checked > line_max:
                return FIELDS_TOO_LARGE
            checked = line_end + 2
        self._checked = checked
        self._fields = fields
        pending = end - checked - (1 if buf.endswith(b"\r") else 0)
        if pending > line_max and pending:  # an empty pending line may still end the head
            return FIELDS_TOO_LARGE
        return 0

    def _check_trailer(self, line: bytes) -> int:
        limits = self._rules.limits
        self._fields += 1
        if self._fields > limits.fields or len(line) + 2 > limits.field_size:
            return FIELDS_TOO_LARGE
        if _FIELD_LINES.fullmatch(line + b"\r\n") is None:
            return BAD_REQUEST
        return 0


def _chunk_size(line: bytes, limit: int) -> int:
    """The size a chunk-size line announces, or -1 when the line is malformed (§7.1)."""
    if len(line) > limit:
        return -1
    size, semicolon, _ = line.partition(b";")
    if semicolon:
        if _CHUNK_EXT.fullmatch(line, len(size.rstrip(b" \t"))) is None:
            return -1
        size = size.rstrip(b" \t")
    if _CHUNK_SIZE_RE.fullmatch(size) is None:
        return -1
    return int(size, 16)

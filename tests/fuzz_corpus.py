"""Mutation fuzzing material: valid seed requests, mutators, and an independent reference framer.

The reference framer is written from RFC 9112 (request line, field lines, Content-Length,
Transfer-Encoding, chunked coding, `Connection`) and shares no code with vrypt_worker/framing.py.
For any byte string it says which requests are complete and valid (each owed a 200, in order),
and how the stream ends: `open` (every byte consumed), `close` (a request ended the connection:
`Connection: close`, HTTP/1.0 without keep-alive, CONNECT, Upgrade), `broken` (a request whose
framing is invalid or ambiguous: it must never get a 200) or `incomplete` (the input stops inside a
request, which is owed nothing).

It checks a worker's answers to that input with `check`, which returns the violations (things the
worker must never do) and, separately, the divergences (the worker was stricter than the RFC
reading here: it refused a request the reference accepts, which costs a client an answer but
never desynchronises anything).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

_TCHAR = rb"!#$%&'*+.^_`|~0-9A-Za-z-"
_REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
_FIELD_LINE = re.compile(rb"([" + _TCHAR + rb"]+):([\t\x20-\x7e\x80-\xff]*)")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = rb"[" + _TCHAR + rb"]+"
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
# chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )   (RFC 9112 §7.1.1)
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
_KNOWN_CODINGS = {b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"}

# gunicorn's default limits, which the fuzzed worker runs with
REQUEST_LINE_LIMIT = 4094
FIELDS_LIMIT = 100
FIELD_SIZE_LIMIT = 8190
MAX_EMPTY_LINES = 32


@dataclass
class Owed:
    head: bool  # a HEAD request: the answer has no body
    close: bool  # the answer must say `Connection: close`
    connect: bool = False  # a CONNECT: 200 without Content-Length, ended by the close


@dataclass
class Expected:
    answers: list[Owed] = field(default_factory=list)
    end: str = "open"  # open | close | broken | incomplete
    why: str = ""


def reference_frame(data: bytes) -> Expected:
    """Frame `data` as a server reading RFC 9112 strictly would."""
    out = Expected()
    pos = 0
    end = len(data)
    while True:
        empty = 0
        while data.startswith(b"\r\n", pos):
            pos += 2
            empty += 1
        if empty > MAX_EMPTY_LINES:
            return _end(out, "broken", "too many empty lines before a request")
        if pos >= end:
            return _end(out, "open")
        head_end = data.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return _end(out, "incomplete", "head not complete")
        lines = data[pos:head_end].split(b"\r\n")
        pos = head_end + 4
        request = _REQUEST_LINE.fullmatch(lines[0])
        if request is None or len(lines[0]) > REQUEST_LINE_LIMIT:
            return _end(out, "broken", "request line")
        method, _target, major, minor = request.groups()
        if major != b"1":
            return _end(out, "broken", "HTTP version")
        http10 = minor == b"0"
        fields: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            match = _FIELD_LINE.fullmatch(line)
            if match is None or len(line) + 2 > FIELD_SIZE_LIMIT:  # gunicorn counts the CRLF
                return _end(out, "broken", f"field line {line[:40]!r}")
            fields.append((match.group(1).lower(), match.group(2).strip(b" \t")))
        if len(fields) > FIELDS_LIMIT:
            return _end(out, "broken", "too many fields")
        lengths = [
            part.strip(b" \t") for name, value in fields if name == b"content-length"
            for part in value.split(b",")
        ]  # fmt: skip
        has_te = any(name == b"transfer-encoding" for name, _ in fields)
        codings = [
            c.strip(b" \t").lower()  # `chunked;x=y` is no chunked (RFC 9112 §7: no parameters)
            for name, value in fields if name == b"transfer-encoding"
            for c in value.split(b",")
        ]  # fmt: skip
        codings = [c for c in codings if c]
        options = [
            o.strip(b" \t").lower()
            for name, value in fields if name == b"connection"
            for o in value.split(b",")
        ]  # fmt: skip
        close = b"close" in options or (http10 and b"keep-alive" not in options)
        close = close or method == b"CONNECT" or any(name == b"upgrade" for name, _ in fields)
        if has_te:
            if lengths:
                return _end(out, "broken", "Content-Length with Transfer-Encoding")
            if http10:
                return _end(out, "broken", "Transfer-Encoding in HTTP/1.0")
            if not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
                return _end(out, "broken", "transfer codings")
            if any(c not in _KNOWN_CODINGS for c in codings[:-1]):
                return _end(out, "broken", "unknown transfer coding")
            pos = _chunked_body(data, pos)
            if pos < 0:
                return _end(out, "broken" if pos == -1 else "incomplete", "chunked body")
        elif lengths:
            if not all(v.isdigit() and len(v) <= 18 for v in lengths):
                return _end(out, "broken", "Content-Length value")
            if len({int(v) for v in lengths}) != 1:
                return _end(out, "broken", "conflicting Content-Length")
            pos += int(lengths[0])
            if pos > end:
                return _end(out, "incomplete", "body")
        out.answers.append(Owed(head=method == b"HEAD", close=close, connect=method == b"CONNECT"))
        if close:
            return _end(out, "close")


def _end(out: Expected, how: str, why: str = "") -> Expected:
    out.end = how
    out.why = why
    return out


def _chunked_body(data: bytes, pos: int) -> int:
    """The offset after a chunked body and its trailers; -1 broken, -2 incomplete."""
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return -2 if len(data) - pos <= FIELD_SIZE_LIMIT else -1
        line = data[pos:eol]
        size, semicolon, _ = line.partition(b";")
        if semicolon:
            size = size.rstrip(b" \t")
            if _CHUNK_EXT.fullmatch(line[len(size) :]) is None:
                return -1
        if _HEX.fullmatch(size) is None or len(line) > FIELD_SIZE_LIMIT:
            return -1
        pos = eol + 2
        length = int(size, 16)
        if length == 0:
            break
        if len(data) < pos + length + 2:
            # incomplete, unless the bytes that are there already break the chunk's CRLF
            tail = data[pos + length : pos + length + 2]
            return -1 if tail and not b"\r\n".startswith(tail) else -2
        if data[pos + length : pos + length + 2] != b"\r\n":
            return -1
        pos += length + 2
    trailers = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return -2 if len(data) - pos <= FIELD_SIZE_LIMIT else -1
        line = data[pos:eol]
        pos = eol + 2
        if not line:
            return pos
        trailers += 1
        if _FIELD_LINE.fullmatch(line) is None or trailers > FIELDS_LIMIT:
            return -1
        if len(line) + 2 > FIELD_SIZE_LIMIT:
            return -1


# --- checking a worker's answers ------------------------------------------------------------

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [\x20-\x7e]*")
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.IGNORECASE)


@dataclass
class Answer:
    status: int
    head: bytes


def parse_answers(raw: bytes, expected: Expected) -> tuple[list[Answer], str]:
    """Split the bytes a worker sent into answers (interim 100s dropped). The i-th answer to a
    HEAD the reference expects carries no body. Returns the answers and an error text for bytes
    that are no well-formed answer (empty when all is well)."""
    answers: list[Answer] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0:
            return answers, f"truncated answer head at {pos}: {raw[pos : pos + 80]!r}"
        head = raw[pos : end + 2]
        status = _STATUS.match(head)
        if status is None:
            return answers, f"bad status line: {head[:80]!r}"
        pos = end + 4
        code = int(status.group(1))
        if code == 100:
            continue
        length = _LENGTH.search(head)
        index = len(answers)
        if length is None and code == 200 and index < len(expected.answers):
            # The answer to CONNECT (RFC 9110 §9.3.6): no Content-Length, the close ends it.
            if not expected.answers[index].connect or raw[pos:] != b"Vrypt":
                return answers, f"answer without Content-Length: {head!r}"
            answers.append(Answer(code, head))
            return answers, ""
        if length is None:
            return answers, f"answer without Content-Length: {head!r}"
        is_head = code == 200 and index < len(expected.answers) and expected.answers[index].head
        if not is_head:
            pos += int(length.group(1))
            if pos > len(raw):
                return answers, "truncated answer body"
        answers.append(Answer(code, head))
    return answers, ""


def check(expected: Expected, answers: list[Answer]) -> tuple[list[str], list[str]]:
    """(violations, divergences) of a worker's answers against the reference."""
    violations: list[str] = []
    divergences: list[str] = []
    oks = 0
    while oks < len(answers) and answers[oks].status == 200:
        oks += 1
    rest = answers[oks:]
    if len(rest) > 1 or (rest and rest[0].status < 400):
        violations.append(f"answers after the final one: {[a.status for a in answers]}")
    if oks > len(expected.answers):
        what = "a 200 for broken framing" if expected.end == "broken" else "more 200s than requests"
        violations.append(f"{what}: {oks} 200s, {len(expected.answers)} valid requests "
                          f"(end {expected.end}: {expected.why})")  # fmt: skip
    for answer, owed in zip(answers[:oks], expected.answers, strict=False):
        says_close = b"\r\nConnection: close\r\n" in answer.head + b"\r\n"
        if says_close != owed.close:
            violations.append(f"answer says close={says_close}, request asks close={owed.close}")
            break
    if oks < len(expected.answers):
        divergences.append(
            f"stricter: {oks} 200s then {[a.status for a in rest]}, reference accepts "
            f"{len(expected.answers)}"
        )
    elif expected.end == "broken" and not rest:
        divergences.append(f"no error answer for broken framing ({expected.why})")
    return violations, divergences


# --- seeds and mutations ---------------------------------------------------------------------

SEEDS: list[bytes] = [
    b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
    b"HEAD /x?y=1 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: e\r\nContent-Length: 11\r\n\r\nhello world",
    b"PUT /c HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: yes\r\n\r\n",
    b"POST /g HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
    b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"FOO /bar HTTP/1.1\r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n",
    b"DELETE /d HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"PATCH /q HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc",
    b'POST /x HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n2;a="b;c"\r\nab\r\n0\r\n\r\n',
    # contradictory but well-formed: `close` anywhere means close (RFC 9112 \u00a79.6)
    b"HEAD / HTTP/1.0\r\nConnection: close\r\nX: y\r\nConnection: Keep-Alive\r\n\r\n",
]
_INSERTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"0",
    b"1",
    b"9",
    b"a",
]


def _head_lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end incl. CRLF) of the field lines of the first head in data."""
    spans = []
    head_end = data.find(b"\r\n\r\n")
    pos = data.find(b"\r\n") + 2
    while 0 < pos <= head_end:
        eol = data.find(b"\r\n", pos)
        spans.append((pos, eol + 2))
        pos = eol + 2
    return spans


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))):
        if not buf:
            break
        op = rng.random()
        i = rng.randrange(len(buf) + 1)
        if op < 0.25:  # byte flip: a random byte or one flipped bit
            i = min(i, len(buf) - 1)
            buf[i] = rng.randrange(256) if rng.random() < 0.5 else buf[i] ^ (1 << rng.randrange(8))
        elif op < 0.55:
            buf[i:i] = rng.choice(_INSERTS)
        elif op < 0.65:
            del buf[i : i + rng.choice((1, 1, 2, 4))]
        elif op < 0.75:
            del buf[rng.randrange(len(buf)) :]  # truncation
        elif op < 0.9:
            spans = _head_lines(bytes(buf))
            if spans:
                start, stop = rng.choice(spans)
                buf[stop:stop] = buf[start:stop] * rng.choice((1, 1, 2))  # duplicated field line
        else:
            digits = [j for j, c in enumerate(buf) if 0x30 <= c <= 0x39]
            if digits:
                buf[rng.choice(digits)] = rng.choice(b"0123456789")  # another length, chunk size
    return bytes(buf)


def generate(rng: random.Random) -> tuple[bytes, list[bytes]]:
    """One fuzz input (a pipeline of 1-4 requests, mutated) and the pieces to send it in."""
    pipeline = b"".join(rng.choice(SEEDS) for _ in range(rng.choice((1, 1, 2, 3, 4))))
    data = mutate(rng, pipeline) if rng.random() < 0.95 else pipeline
    cuts = sorted({rng.randrange(1, max(2, len(data))) for _ in range(rng.choice((0, 0, 1, 3)))})
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return data, [p for p in pieces if p]

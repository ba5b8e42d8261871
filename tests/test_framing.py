"""The framing core on its own: every split point, generated input, each class of bad input."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrypt_worker import framing as f
from vrypt_worker.framing import FramingRules, Limits, RequestFramer

GET = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: example\r\n\r\n"
POST = b"POST /p HTTP/1.1\r\nHost: e\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (
    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5;name=value;q="a \\"b"\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: yes\r\n\r\n'
)
FOO = b"FOO * HTTP/1.1\r\n\r\n"
# Every size the tiny-chunk scan takes in one C call (1-f, either case), then a bigger one.
TINY_CHUNKS = (
    b"POST /t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (n, b"d" * n) for n in range(1, 16))
    + b"A\r\n0123456789\r\nF\r\n" + b"\r\n" * 7 + b"x\r\n1f\r\n" + b"z" * 31
    + b"\r\n1\r\n\n\r\n0\r\n\r\n"
)  # fmt: skip
SAMPLES = [
    (GET, f.OK),
    (HEAD, f.OK_HEAD),
    (POST, f.OK),
    (CHUNKED, f.OK),
    (FOO, f.OK),
    (b"OPTIONS * HTTP/1.1\r\n\r\n", f.OK),
    (b"GET http://example.com/a?b=c HTTP/1.1\r\nHost: example.com\r\n\r\n", f.OK),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", f.OK_KEEP_ALIVE),
    (b"HEAD / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", f.OK_KEEP_ALIVE_HEAD),
    (b"get / HTTP/1.1\r\n\r\n", f.OK),  # methods are case-sensitive: `get` is just a token
    (b"GET / HTTP/1.1\r\nX-Empty:\r\nX-Tab:\tv\t\r\nX-Obs: \xe9t\xe9\r\n\r\n", f.OK),
    (b"GET / HTTP/1.2\r\n\r\n", f.OK),  # a higher minor version is handled as 1.1
    # raw bytes >= 0x80 in the target are answered, as nginx does (README, "What is answered")
    (b"GET /caf\xc3\xa9?q=\xff HTTP/1.1\r\n\r\n", f.OK),
    (TINY_CHUNKS, f.OK),
]
CLOSING_SAMPLES = [
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", f.OK_CLOSE),
    (b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n", f.OK_CLOSE),
    (b"HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n", f.OK_CLOSE_HEAD),
    (b"GET / HTTP/1.0\r\n\r\n", f.OK_CLOSE),
    (b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n", f.OK_CLOSE),
    (b"GET / HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n", f.OK_CLOSE),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", f.TUNNEL),
    (b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", f.OK_CLOSE),
    (b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", f.OK_CLOSE),
]
BAD = [
    # ambiguous or broken framing
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\nabcd", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: foo, chunked\r\n\r\n", f.NOT_IMPLEMENTED),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: identity, chunked\r\n\r\n", f.NOT_IMPLEMENTED),
    # the chunked coding has no parameters (RFC 9112 §7)
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked;foo=bar\r\n\r\n0\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked ; q=1\r\n\r\n", f.BAD_REQUEST),
    # bad chunks
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nbX\r\n", f.BAD_REQUEST),
    (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n2\r\nb\r\n\r\n",
        f.BAD_REQUEST,
    ),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;\r\nabc\r\n", f.BAD_REQUEST),
    (b'POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;a="b\r\nabc\r\n', f.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", f.BAD_REQUEST),
    (
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer\r\n\r\n",
        f.BAD_REQUEST,
    ),
    # invalid request lines and field names
    (b"GET  / HTTP/1.1\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1 \r\n\r\n", f.BAD_REQUEST),
    (b"GET /a b HTTP/1.1\r\n\r\n", f.BAD_REQUEST),
    (b"GET / http/1.1\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.10\r\n\r\n", f.BAD_REQUEST),
    (b"GET /\x00 HTTP/1.1\r\n\r\n", f.BAD_REQUEST),
    (b"G(T / HTTP/1.1\r\n\r\n", f.BAD_REQUEST),
    (b"GET /\r\n\r\n", f.BAD_REQUEST),  # HTTP/0.9 form
    (b"GET / HTTP/1.1\nHost: x\n\n", f.BAD_REQUEST),  # bare LF
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\n: x\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\nHost\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", f.BAD_REQUEST),
    (b"GET / HTTP/1.1\r\n X: a\r\n\r\n", f.BAD_REQUEST),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", f.BAD_REQUEST),  # TLS ClientHello
    (b"\x00\x00\x00", f.BAD_REQUEST),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", f.VERSION_NOT_SUPPORTED),  # HTTP/2 preface
    (b"GET / HTTP/2.0\r\n\r\n", f.VERSION_NOT_SUPPORTED),
    (b"GET / HTTP/0.9\r\n\r\n", f.VERSION_NOT_SUPPORTED),
    (b"GET / HTTP/3.1\r\nHost: x", f.VERSION_NOT_SUPPORTED),  # decided at the end of the line
]


def frame(*chunks: bytes, limits: Limits | None = None) -> tuple[list[int], bool]:
    framer = RequestFramer(FramingRules(limits))
    answers: list[int] = []
    for chunk in chunks:
        answers += framer.feed(chunk)
    return answers, framer.closed


def splits(data: bytes, points: list[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


@pytest.mark.parametrize(("request_bytes", "answer"), SAMPLES + CLOSING_SAMPLES)
def test_each_sample_gets_its_answer(request_bytes: bytes, answer: int) -> None:
    assert frame(request_bytes) == ([answer], answer >= f.CLOSING)


@pytest.mark.parametrize(("request_bytes", "answer"), SAMPLES + CLOSING_SAMPLES)
def test_every_split_point_gives_the_same_answer(request_bytes: bytes, answer: int) -> None:
    for cut in range(1, len(request_bytes)):
        assert frame(request_bytes[:cut], request_bytes[cut:]) == (
            [answer],
            answer >= f.CLOSING,
        ), cut


@pytest.mark.parametrize(("request_bytes", "answer"), SAMPLES + CLOSING_SAMPLES)
def test_byte_by_byte(request_bytes: bytes, answer: int) -> None:
    chunks = [request_bytes[i : i + 1] for i in range(len(request_bytes))]
    assert frame(*chunks) == ([answer], answer >= f.CLOSING)


def test_pipeline_mixing_methods_and_bodies_is_answered_in_order() -> None:
    pipeline = GET + HEAD + POST + CHUNKED + FOO + HEAD + GET
    expected = [f.OK, f.OK_HEAD, f.OK, f.OK, f.OK, f.OK_HEAD, f.OK]
    assert frame(pipeline) == (expected, False)
    for cut in range(1, len(pipeline)):
        assert frame(pipeline[:cut], pipeline[cut:]) == (expected, False), cut


def test_identical_pipelined_heads_then_a_different_one() -> None:
    other = b"GET /other HTTP/1.1\r\n\r\n"
    assert frame(GET * 16 + other + GET * 3 + HEAD) == ([f.OK] * 20 + [f.OK_HEAD], False)


def test_body_bytes_that_look_like_requests_are_body() -> None:
    body = GET + GET  # a POST carrying request-shaped bytes must not be answered three times
    post = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert frame(post) == ([f.OK], False)
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body)
    assert frame(chunked + body + b"\r\n0\r\n\r\n") == ([f.OK], False)


def test_answer_waits_for_the_whole_body() -> None:
    framer = RequestFramer(FramingRules())
    assert framer.feed(POST[:-3]) == []
    assert not framer.idle
    assert framer.feed(POST[-3:]) == [f.OK]
    assert framer.idle


def test_large_chunked_body_keeps_no_buffer() -> None:
    framer = RequestFramer(FramingRules())
    assert framer.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n") == []
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    for _ in range(200):
        for piece in splits(chunk, [3, 100, 40000]):
            assert framer.feed(piece) == []
            assert framer.buffered < 16
    assert framer.feed(b"0\r\n\r\n") == [f.OK]


def test_empty_lines_before_a_request_are_ignored() -> None:
    assert frame(b"\r\n\r\n\r\n" + GET) == ([f.OK], False)
    assert frame(GET + b"\r\n" + GET) == ([f.OK, f.OK], False)


def test_expect_100_continue_gets_an_interim_answer_before_the_body() -> None:
    head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    framer = RequestFramer(FramingRules())
    assert framer.feed(head) == [f.CONTINUE]
    assert framer.feed(b"abc") == [f.OK]
    # HTTP/1.0 clients must not get a 1xx; a request without a body needs none.
    assert frame(head.replace(b"1.1", b"1.0") + b"abc") == ([f.OK_CLOSE], True)
    assert frame(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n") == ([f.OK], False)


def test_nothing_after_a_closing_answer_is_answered() -> None:
    assert frame(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n" + GET * 3) == ([f.OK_CLOSE], True)
    framer = RequestFramer(FramingRules())
    framer.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert framer.feed(GET) == []


def test_draining_turns_the_next_answer_into_the_last() -> None:
    rules = FramingRules()
    rules.open_until = 0
    assert RequestFramer(rules).feed(GET + GET) == [f.OK_CLOSE]
    rules = FramingRules()
    framer = RequestFramer(rules)
    framer.feed(POST[:-1])
    rules.open_until = 0
    assert framer.feed(POST[-1:]) == [f.OK_CLOSE]
    assert framer.closed


def test_the_answer_that_reaches_the_budget_closes() -> None:
    rules = FramingRules()
    rules.open_until = 4  # max_requests = 5
    framer = RequestFramer(rules)
    assert framer.feed(GET * 3) == [f.OK] * 3
    assert framer.feed(GET) == [f.OK]
    assert framer.feed(HEAD + GET) == [f.OK_CLOSE_HEAD]
    assert rules.answered == 5


@pytest.mark.parametrize(("request_bytes", "answer"), BAD)
def test_bad_input_gets_its_error_and_ends_the_connection(
    request_bytes: bytes, answer: int
) -> None:
    answers, closed = frame(GET + request_bytes + GET)
    assert (answers, closed) == ([f.OK, answer], True)


@pytest.mark.parametrize(("request_bytes", "answer"), BAD)
def test_bad_input_split_anywhere_never_gets_a_200(request_bytes: bytes, answer: int) -> None:
    for cut in range(1, len(request_bytes)):
        answers, _ = frame(request_bytes[:cut], request_bytes[cut:], b"\r\n\r\n" + GET)
        assert f.OK not in answers and answers[:1] in ([answer], []), (cut, answers)


# --- gunicorn's limits, counted as gunicorn counts them ---------------------------------------
# gunicorn/http/message.py (Request.read_line, Message.parse_headers; the fast parser agrees):
# a request line of `request_line` bytes passes, its CRLF not counted; `fields` field lines pass;
# a field line passes while its bytes plus CRLF are at most `field_size`.
# tests/test_limits_differential.py holds the same boundaries against gunicorn's sync worker.


def request_line(length: int) -> bytes:
    """A request line of exactly `length` bytes, CRLF not included."""
    assert length >= 16
    return b"GET /" + b"a" * (length - 14) + b" HTTP/1.1"


def field_line(length: int) -> bytes:
    """A field line of exactly `length` bytes, CRLF not included."""
    assert length >= 2
    return b"X:" + b"v" * (length - 2)


def assert_verdict(data: bytes, answer: int, limits: Limits, every_cut: bool = True) -> None:
    """`data` gets `answer` in one read, split at any point (or around its end when
    `every_cut` is off), and byte by byte when it is short."""
    assert frame(data, limits=limits)[0][:1] == [answer]
    cuts = range(1, len(data)) if every_cut else range(max(1, len(data) - 24), len(data))
    for cut in cuts:
        assert frame(data[:cut], data[cut:], limits=limits)[0][:1] == [answer], cut
    if len(data) <= 400:
        assert frame(*(data[i : i + 1] for i in range(len(data))), limits=limits)[0][:1] == [answer]


@pytest.mark.parametrize("limit", [16, 100, 4094, 8190, f.REQUEST_LINE_UNLIMITED])
def test_request_line_boundary(limit: int) -> None:
    limits = Limits(request_line=limit, fields=100, field_size=8190)
    small = limit <= 100
    for length, answer in ((limit - 1, f.OK), (limit, f.OK), (limit + 1, f.URI_TOO_LONG)):
        if length < 16:
            continue
        head = request_line(length) + b"\r\n\r\n"
        assert_verdict(head, answer, limits, every_cut=small)
        # gunicorn drops one empty line before the request line and measures the line after it
        assert_verdict(b"\r\n" + head, answer, limits, every_cut=small)
        assert_verdict(request_line(length) + b"\r\nHost: x\r\n\r\n", answer, limits, small)


@pytest.mark.parametrize("limit", [16, 100, 4094])
def test_request_line_is_refused_once_it_cannot_end_in_time(limit: int) -> None:
    limits = Limits(request_line=limit, fields=100, field_size=8190)
    line = request_line(limit + 1)
    framer = RequestFramer(FramingRules(limits))
    assert framer.feed(line[:limit]) == []
    assert framer.feed(b"\r") == []  # the first half of the CRLF of a line that fits
    framer = RequestFramer(FramingRules(limits))
    assert framer.feed(line[:limit]) == []
    assert framer.feed(line[limit:]) == [f.URI_TOO_LONG]  # limit + 1 bytes, no CRLF yet


@pytest.mark.parametrize("limit", [1, 2, 5, 100])
def test_field_count_boundary(limit: int) -> None:
    limits = Limits(request_line=4094, fields=limit, field_size=8190)
    for count, answer in ((limit - 1, f.OK), (limit, f.OK), (limit + 1, f.FIELDS_TOO_LARGE)):
        fields = b"".join(b"F%d: v\r\n" % i for i in range(count))
        assert_verdict(b"GET / HTTP/1.1\r\n" + fields + b"\r\n", answer, limits, limit <= 5)
        # the shortest field lines there are: `a:` CRLF
        assert_verdict(b"GET / HTTP/1.1\r\n" + b"a:\r\n" * count + b"\r\n", answer, limits)


@pytest.mark.parametrize("limit", [50, 100, 8190, 10000])
def test_field_size_counts_the_crlf(limit: int) -> None:
    limits = Limits(request_line=4094, fields=100, field_size=limit)
    small = limit <= 100
    for length, answer in (
        (limit - 3, f.OK),
        (limit - 2, f.OK),  # with its CRLF, exactly the limit
        (limit - 1, f.FIELDS_TOO_LARGE),  # 8,189 bytes + CRLF against the default 8,190
        (limit, f.FIELDS_TOO_LARGE),
    ):
        line = field_line(length) + b"\r\n"
        assert_verdict(b"GET / HTTP/1.1\r\n" + line + b"\r\n", answer, limits, small)
        # only the longest line counts, wherever it is
        others = b"A: 1\r\nB: 2\r\n"
        assert_verdict(
            b"GET / HTTP/1.1\r\n" + others + line + others + b"\r\n", answer, limits, small
        )


@pytest.mark.parametrize("limit", [1, 2, 3, 4])
def test_field_size_below_the_shortest_line(limit: int) -> None:
    """`a:` CRLF is 4 bytes: below that no field line passes, and a head without fields does."""
    limits = Limits(request_line=4094, fields=100, field_size=limit)
    assert_verdict(b"GET / HTTP/1.1\r\n\r\n", f.OK, limits)
    answer = f.OK if limit >= 4 else f.FIELDS_TOO_LARGE
    assert_verdict(b"GET / HTTP/1.1\r\na:\r\n\r\n", answer, limits)
    assert_verdict(b"GET / HTTP/1.1\r\nab:\r\n\r\n", f.FIELDS_TOO_LARGE, limits)


@pytest.mark.parametrize("limit", [20, 8190])
def test_field_line_is_refused_once_it_cannot_end_in_time(limit: int) -> None:
    limits = Limits(request_line=4094, fields=100, field_size=limit)
    head = b"GET / HTTP/1.1\r\nA: 1\r\n"
    line = field_line(limit - 1)
    framer = RequestFramer(FramingRules(limits))
    assert framer.feed(head + line[:-1]) == []  # limit - 2 bytes: its CRLF may still come
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n\r\n") == [f.OK]
    framer = RequestFramer(FramingRules(limits))
    assert framer.feed(head + line[:-1]) == []
    assert framer.feed(line[-1:]) == [f.FIELDS_TOO_LARGE]  # limit - 1 bytes and no CRLF yet


@pytest.mark.parametrize(("fields", "size"), [(2, 30), (5, 50), (100, 8190)])
def test_trailer_limits(fields: int, size: int) -> None:
    """gunicorn applies both field limits to a trailer section too (ChunkedReader.parse_trailers
    calls parse_headers), counting its fields apart from the head's."""
    limits = Limits(request_line=4094, fields=fields, field_size=size)
    small = size <= 50
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
    head += b"".join(b"H%d: v\r\n" % i for i in range(fields - 1)) + b"\r\n"  # a full head
    body = b"3\r\nabc\r\n0\r\n"
    for count, answer in ((fields, f.OK), (fields + 1, f.FIELDS_TOO_LARGE)):
        trailers = b"".join(b"T%d: v\r\n" % i for i in range(count))
        assert_verdict(head + body + trailers + b"\r\n", answer, limits, every_cut=small)
    for length, answer in ((size - 2, f.OK), (size - 1, f.FIELDS_TOO_LARGE)):
        trailer = b"T" + field_line(length)[1:] + b"\r\n"
        assert_verdict(head + body + trailer + b"\r\n", answer, limits, every_cut=small)
    assert frame(head + body + b"T: " + b"x" * (size + 1), limits=limits)[0] == [
        f.FIELDS_TOO_LARGE  # a trailer line that cannot end in time
    ]


def test_gunicorn_limit_settings_are_normalised_like_gunicorn() -> None:
    # gunicorn/http/message.py: Request.__init__ (request line), Message.__init__ (fields)
    assert Limits.from_settings(4094, 100, 8190) == Limits(4094, 100, 8190)
    assert Limits.from_settings(0, 0, 0) == Limits(f.REQUEST_LINE_UNLIMITED, 32768, 8190)
    assert Limits.from_settings(-1, -1, -1) == Limits(8190, 32768, 8190)
    assert Limits.from_settings(8190, 32768, 1) == Limits(8190, 32768, 1)
    assert Limits.from_settings(8191, 32769, 10**6) == Limits(8190, 32768, 10**6)
    assert f.REQUEST_LINE_UNLIMITED == 1024 * 1024


def test_a_cached_head_keeps_its_verdict_under_its_own_limits() -> None:
    """Verdicts are cached per worker, whose limits never change: the same head, first seen
    whole, then split, then again whole, gets the same answer every time."""
    limits = Limits(request_line=100, fields=5, field_size=50)
    rules = FramingRules(limits)
    over = b"GET / HTTP/1.1\r\n" + field_line(49) + b"\r\n\r\n"
    under = b"GET / HTTP/1.1\r\n" + field_line(48) + b"\r\n\r\n"
    for _ in range(2):
        assert RequestFramer(rules).feed(over) == [f.FIELDS_TOO_LARGE]
        assert RequestFramer(rules).feed(under) == [f.OK]
    assert rules.cache[under] == f.OK


def test_counters() -> None:
    rules = FramingRules()
    RequestFramer(rules).feed(GET * 3)
    RequestFramer(rules).feed(
        b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx"
    )
    RequestFramer(rules).feed(GET + b"BAD\r\n\r\n")
    assert (rules.answered, rules.rejected) == (6, 1)  # a 400 is an answer too


# --- generated input ---------------------------------------------------------------------------

_method = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"FOO", b"M-SEARCH"])
_target = st.sampled_from([b"/", b"/a/b?c=d", b"*", b"http://h/x", b"h:443", b"/%20"])
_field = st.tuples(
    st.sampled_from([b"Host", b"X-A", b"Accept", b"user-agent", b"Cookie"]),
    st.binary(max_size=20).map(lambda v: bytes(c for c in v if 0x20 <= c < 0x7F).strip()),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid keep-alive HTTP/1.1 request and the answer it is owed."""
    method = draw(_method)
    fields = draw(st.lists(_field, max_size=5))
    head = method + b" " + draw(_target) + b" HTTP/1.1\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    body_kind = draw(st.sampled_from(["none", "length", "chunked"]))
    body = draw(st.binary(max_size=60))
    if body_kind == "length":
        head += b"Content-Length: %d\r\n" % len(body)
        payload = body
    elif body_kind == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        sizes = draw(st.lists(st.integers(1, 20), max_size=4))
        payload = b""
        rest = body
        for size in sizes:
            piece, rest = rest[:size], rest[size:]
            if piece:
                payload += b"%x\r\n" % len(piece) + piece + b"\r\n"
        payload += b"0\r\n\r\n"
    else:
        payload = b""
    answer = f.OK_HEAD if method == b"HEAD" else f.OK
    return head + b"\r\n" + payload, answer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=8), st.data())
def test_generated_pipelines_split_anywhere(
    pipeline: list[tuple[bytes, int]], data: st.DataObject
) -> None:
    stream = b"".join(request for request, _ in pipeline)
    expected = [answer for _, answer in pipeline]
    points = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=10))
    assert frame(*splits(stream, points)) == (expected, False)


@settings(max_examples=500, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_mutated_input_never_gets_more_answers_than_requests(
    pipeline: list[tuple[bytes, int]], data: st.DataObject
) -> None:
    stream = bytearray(b"".join(request for request, _ in pipeline))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(stream) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            stream[index] = data.draw(st.integers(0, 255))
        elif action == "insert":
            stream[index:index] = data.draw(st.sampled_from([b"\r\n", b"\n", b" ", b":", b"0"]))
        else:
            del stream[index]
    answers, closed = frame(bytes(stream))
    finals = [a for a in answers if a != f.CONTINUE]
    assert len([a for a in finals if a not in f.ERRORS]) <= len(pipeline)
    errors = [a for a in finals if a in f.ERRORS]
    assert len(errors) <= 1 and (not errors or finals[-1] in f.ERRORS)
    assert not errors or closed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_and_errors_close(noise: bytes) -> None:
    answers, closed = frame(noise)
    if any(a in f.ERRORS for a in answers):
        assert closed and answers[-1] in f.ERRORS


@settings(max_examples=1000, deadline=None)
@given(st.randoms(use_true_random=False))
def test_mutated_pipelines_against_an_independent_reference(rnd: random.Random) -> None:
    """tests/fuzz_corpus.py's mutations, held against its RFC 9112 reference framer: no 200 for
    a request whose framing is broken, and HEAD / `Connection: close` as the request says."""
    from tests import fuzz_corpus

    data, pieces = fuzz_corpus.generate(rnd)
    expected = fuzz_corpus.reference_frame(data)
    answers, _ = frame(*pieces)
    oks = [a for a in answers if a < f.BAD_REQUEST]
    assert len(oks) <= len(expected.answers), (data, expected)
    for answer, owed in zip(oks, expected.answers, strict=False):
        assert bool(answer & f.OK_HEAD) == owed.head and (answer >= f.CLOSING) == owed.close, data


# --- pipelined copies without a framer (issue 13): FramingRules.copies against feed ----------


def _copies_against_feed(data: bytes, warm: list[bytes], most: int, open_until: int) -> int:
    """`copies` on one rules object, a fresh framer's `feed` on another in the same state:
    when `copies` answers, it is feed's answer (all alike, the framer left fresh); when it does
    not, nothing changed."""
    ours, theirs = FramingRules(), FramingRules()
    for rules in (ours, theirs):
        for head in warm:  # the cache (and the counters) as earlier connections left them
            RequestFramer(rules).feed(head)
        rules.open_until = rules.answered + open_until
    before = (ours.answered, ours.recent_head, ours.recent_kind)
    count = ours.copies(data, most)
    framer = RequestFramer(theirs)
    out = list(framer.feed(data))
    if count:
        assert 2 <= count <= most
        assert out == [ours.recent_kind] * count and framer.fresh, (data, out)
        assert ours.answered == theirs.answered and data == ours.recent_head * count
    else:
        assert (ours.answered, ours.recent_head, ours.recent_kind) == before
    return count


@pytest.mark.parametrize(("request_bytes", "answer"), SAMPLES + CLOSING_SAMPLES + BAD)
def test_copies_of_a_head_are_what_feed_answers(request_bytes: bytes, answer: int) -> None:
    for times in (1, 2, 3, 16, 64, 65):
        data = request_bytes * times
        count = _copies_against_feed(data, [request_bytes], 64, 1 << 30)
        bare = data.find(b"\r\n\r\n") + 4 == len(request_bytes)  # no body after the head
        assert bool(count) == (answer < f.CLOSING and bare and 2 <= times <= 64), times
        assert _copies_against_feed(data, [], 64, 1 << 30) == 0  # not cached: the framer's


def test_copies_are_left_to_the_framer_when_one_of_them_would_close() -> None:
    assert _copies_against_feed(GET * 16, [GET], 64, 16) == 16
    assert _copies_against_feed(GET * 16, [GET], 64, 15) == 0  # the 16th says close
    assert _copies_against_feed(GET * 16, [GET], 15, 100) == 0  # more than one batch


@pytest.mark.parametrize(
    "data",
    [
        GET * 3 + HEAD,  # another head last
        HEAD + GET * 3,
        GET * 2 + GET.replace(b"example", b"examplf"),  # the last copy altered
        GET * 2 + GET[:10],  # a partial copy
        b"\r\n" + GET * 2,  # an empty line first: the framer skips it
        GET * 2 + b"\r\n",
        b"\r\n\r\n" * 4,
        GET[:-2] * 3,
    ],
)
def test_anything_but_whole_copies_is_left_to_the_framer(data: bytes) -> None:
    assert _copies_against_feed(data, [GET, HEAD, b"\r\n" + GET], 64, 1 << 30) == 0


@settings(max_examples=300, deadline=None)
@given(requests(), st.integers(1, 70), st.binary(max_size=3), st.booleans())
def test_generated_copies_match_feed(
    request: tuple[bytes, int], times: int, noise: bytes, warm: bool
) -> None:
    head = request[0]
    _copies_against_feed(head * times, [head] if warm else [], 64, 1 << 30)
    _copies_against_feed(head * times + noise, [head] if warm else [], 64, 1 << 30)
    _copies_against_feed(noise + head * times, [head] if warm else [], 64, 1 << 30)


# --- time linear in the bytes, however they are split (issue 14) -----------------------------


def test_a_body_of_one_byte_chunks_is_framed_in_linear_time() -> None:
    """2 MiB in 1-byte chunks (12 MiB on the wire) in 64 KiB reads: one regex call per read
    takes every complete tiny chunk (a Python iteration per chunk took 2.8 s)."""
    body = b"1\r\nx\r\n" * (2 * 1024 * 1024) + b"0\r\n\r\n"
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + body + GET
    framer = RequestFramer(FramingRules())
    answers: list[int] = []
    started = time.perf_counter()
    for i in range(0, len(data), 65536 + 7):  # reads that split chunks anywhere
        answers += framer.feed(data[i : i + 65536 + 7])
    elapsed = time.perf_counter() - started
    assert answers == [f.OK, f.OK] and framer.fresh
    assert elapsed < 0.5, elapsed


def test_a_big_head_in_small_pieces_is_scanned_in_linear_time() -> None:
    """400 KB of head (within gunicorn's limits) in 10-byte reads: appended in place and searched
    only where new bytes arrived (copying and rescanning it per read took seconds)."""
    head = b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 8000 + b"\r\n"
    head = head[:16] + head[16:] * 50 + b"\r\n"
    framer = RequestFramer(FramingRules())
    answers: list[int] = []
    started = time.perf_counter()
    for i in range(0, len(head), 10):
        answers += framer.feed(head[i : i + 10])
    elapsed = time.perf_counter() - started
    assert answers == [f.OK] and framer.fresh
    assert elapsed < 1.0, elapsed
    too_many = head[:-2] + b"X-More: 1\r\n" * 60 + b"\r\n"  # over the 100 fields: 431 on the way
    assert frame(*[too_many[i : i + 10] for i in range(0, len(too_many), 10)]) == (
        [f.FIELDS_TOO_LARGE],
        True,
    )

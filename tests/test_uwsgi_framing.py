"""The uwsgi packet framer and protocol, in process (uwsgi_framing.py, uwsgi_protocol.py): every
split of the input, bad packets, bodies, limits, timeouts and budgets; and, packet by packet,
the same decisions as gunicorn 27's own parser (gunicorn/uwsgi/message.py) on a random corpus."""

from __future__ import annotations

import ast
import random
import struct

import pytest
from gunicorn.config import Config
from gunicorn.http.unreader import IterUnreader
from gunicorn.uwsgi.errors import UWSGIParseException
from gunicorn.uwsgi.message import UWSGIRequest

from vrypt_worker import framing as f
from vrypt_worker.framing import FramingRules
from vrypt_worker.response import render
from vrypt_worker.uwsgi_framing import MAX_VARS, REFUSED, PacketFramer, PacketRules, parse_vars
from vrypt_worker.uwsgi_protocol import AllowList, UwsgiProtocol

GET = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "QUERY_STRING": "a=1"}


def var(key: bytes | str, value: bytes | str) -> bytes:
    k = key.encode("latin-1") if isinstance(key, str) else key
    v = value.encode("latin-1") if isinstance(value, str) else value
    return struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v


def block_of(pairs: dict[str, str] | list[tuple[str, str]]) -> bytes:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return b"".join(var(k, v) for k, v in items)


def packet(pairs: dict[str, str] | list[tuple[str, str]] = GET, m1: int = 0, m2: int = 0) -> bytes:
    block = block_of(pairs)
    return bytes([m1]) + struct.pack("<H", len(block)) + bytes([m2]) + block


def framer(rules: FramingRules | None = None) -> PacketFramer:
    return PacketFramer(PacketRules(rules or FramingRules()))


def feed_all(fr: PacketFramer, pieces: list[bytes]) -> list[int]:
    answers: list[int] = []
    for piece in pieces:
        answers.extend(fr.feed(piece))
    return answers


# one packet --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "kind"),
    [
        (GET, f.OK),
        ({}, f.OK),  # an empty vars block: gunicorn's GET /
        ({"REQUEST_METHOD": "HEAD"}, f.OK_HEAD),
        ({"REQUEST_METHOD": "head"}, f.OK),  # gunicorn compares exactly
        ({"REQUEST_METHOD": "POST"}, f.OK),
        ({"REQUEST_METHOD": "FOO"}, f.OK),
        ({"HTTP_CONNECTION": "close"}, f.OK_CLOSE),
        ({"HTTP_CONNECTION": "Close"}, f.OK_CLOSE),
        ({"HTTP_CONNECTION": "keep-alive, close"}, f.OK),  # gunicorn: the whole value
        ({"REQUEST_METHOD": "HEAD", "HTTP_CONNECTION": "CLOSE"}, f.OK_CLOSE_HEAD),
        ([("REQUEST_METHOD", "HEAD"), ("REQUEST_METHOD", "GET")], f.OK),  # the last wins
        ([("REQUEST_METHOD", "GET"), ("REQUEST_METHOD", "HEAD")], f.OK_HEAD),
    ],
)
def test_one_packet_gets_its_answer(pairs, kind):
    fr = framer()
    assert fr.feed(packet(pairs)) == [kind]
    assert fr.idle == (kind < f.OK_CLOSE)
    assert fr.closed == (kind >= f.OK_CLOSE)


def test_modifier2_is_ignored():
    for m2 in range(256):
        assert framer().feed(packet(GET, m2=m2)) == [f.OK]


def test_a_modifier1_other_than_0_is_refused_as_soon_as_the_header_is_in():
    for m1 in range(1, 256):
        fr = framer()
        # (a vars block announced but not sent: gunicorn refuses before reading it)
        assert fr.feed(bytes([m1]) + b"\x10\x00\x00") == [REFUSED]
        assert fr.closed and not fr.clean and "modifier1" in fr.reason
        assert fr.feed(packet()) == []  # nothing more is read


def test_three_header_bytes_wait():
    fr = framer()
    assert fr.feed(b"\x05\x00\x00") == []  # gunicorn reads 4 before it looks at modifier1
    assert fr.in_packet and not fr.closed


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (b"\x01", "truncated key size"),
        (b"\x05\x00abc", "truncated key"),
        (b"\x03\x00abc", "truncated value size"),
        (b"\x03\x00abc\x01", "truncated value size"),
        (b"\x03\x00abc\x05\x00xy", "truncated value"),
        (var("A", "1") + b"\xff\xff", "truncated key"),
    ],
)
def test_a_vars_block_whose_sizes_overrun_it_is_refused(block, reason):
    assert parse_vars(block)[1] == reason
    fr = framer()
    data = b"\x00" + struct.pack("<H", len(block)) + b"\x00" + block
    assert fr.feed(data + packet()) == [REFUSED]
    assert fr.reason == reason and fr.closed


def test_at_most_1000_vars():
    many = [(f"K{i}", "v") for i in range(MAX_VARS)]
    assert framer().feed(packet(many)) == [f.OK]
    fr = framer()
    assert fr.feed(packet([*many, ("ONE", "more")])) == [REFUSED]
    assert fr.reason == "too many variables"


def test_the_largest_block_is_served():
    value = "x" * (65535 - 5)  # key size, key, value size: 5 bytes
    data = packet([("K", value)])
    assert data[1:3] == b"\xff\xff"
    assert framer().feed(data) == [f.OK]


# bodies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "length"),
    [
        ("5", 5),
        ("+5", 5),
        (" 5 ", 5),
        ("0_5", 5),  # Python's int(), as gunicorn's
        ("0", 0),
        ("-3", 0),
        ("abc", 0),
        ("", 0),
        ("5.0", 0),
        ("9" * 5000, 0),  # past int()'s digit limit: ValueError, as in gunicorn
    ],
)
def test_a_body_is_content_length_bytes_as_gunicorn_reads_it(value, length):
    body = b"P" * length
    fr = framer()
    head = packet({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": value})
    # the body may look like a packet: it is dropped, never framed
    assert fr.feed(head + body + packet()) == [f.OK, f.OK]
    assert fr.idle


def test_a_body_that_looks_like_a_packet_is_dropped():
    inner = packet({"REQUEST_METHOD": "HEAD"})
    head = packet({"CONTENT_LENGTH": str(len(inner))})
    assert framer().feed(head + inner + packet({"REQUEST_METHOD": "HEAD"})) == [f.OK, f.OK_HEAD]


def test_the_answer_waits_for_the_whole_body():
    fr = framer()
    assert fr.feed(packet({"CONTENT_LENGTH": "10"}) + b"12345") == []
    assert not fr.idle and not fr.in_packet
    assert fr.feed(b"6789") == []
    assert fr.feed(b"0") == [f.OK]
    assert fr.idle


def test_a_huge_content_length_is_counted_not_held():
    fr = framer()
    assert fr.feed(packet({"CONTENT_LENGTH": str(10**30)})) == []
    for _ in range(10):
        assert fr.feed(b"x" * 65536) == []
        assert fr.buffered == 0


# splits ------------------------------------------------------------------------------------------

STREAM = [
    packet(GET),
    packet({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "7"}) + b"abc\x00\x01de",
    packet({}),
    packet({"REQUEST_METHOD": "HEAD", "CONTENT_LENGTH": "3"}) + b"xyz",
    packet([(f"HTTP_X_{i}", "v" * i) for i in range(40)]),
    packet({"REQUEST_METHOD": "HEAD", "HTTP_CONNECTION": "close"}),
]
STREAM_ANSWERS = [f.OK, f.OK, f.OK, f.OK_HEAD, f.OK, f.OK_CLOSE_HEAD]


def test_every_byte_by_byte_split_gives_the_same_answers():
    data = b"".join(STREAM)
    fr = framer()
    assert feed_all(fr, [data[i : i + 1] for i in range(len(data))]) == STREAM_ANSWERS
    assert fr.closed and fr.clean


def test_every_two_piece_split_gives_the_same_answers():
    data = b"".join(STREAM)
    for cut in range(len(data) + 1):
        fr = framer()
        assert feed_all(fr, [data[:cut], data[cut:]]) == STREAM_ANSWERS, cut
        assert fr.closed and fr.clean


def test_random_splits_of_bad_packets_refuse_at_the_same_place():
    rng = random.Random(22)
    bad = [
        packet(GET) + packet(GET, m1=7) + packet(GET),
        packet(GET) + b"\x00\x06\x00\x00" + b"\x03\x00abc\x09\x00" + packet(GET),
    ]
    for data in bad:
        whole = framer().feed(data)
        assert whole == [f.OK, REFUSED]
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 6)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            assert feed_all(framer(), pieces) == [f.OK, REFUSED]


def test_after_the_closing_answer_the_rest_is_dropped_and_the_close_is_not_clean():
    fr = framer()
    assert fr.feed(packet({"HTTP_CONNECTION": "close"}) + packet()) == [f.OK_CLOSE]
    assert fr.closed and not fr.clean
    assert fr.feed(packet()) == []


# the end of the input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        b"\x00",
        b"\x00\x05\x00",
        packet(GET)[:-1],
        packet({"CONTENT_LENGTH": "4"}) + b"abc",
    ],
)
def test_a_packet_cut_short_by_the_end_is_refused(partial):
    rules = FramingRules()
    fr = framer(rules)
    assert fr.feed(partial) == []
    assert fr.eof() == [REFUSED]
    assert fr.closed and rules.rejected == 1 and rules.answered == 1


def test_the_end_between_packets_answers_nothing():
    rules = FramingRules()
    fr = framer(rules)
    assert fr.eof() == []
    fr = framer(rules)
    assert fr.feed(packet()) == [f.OK]
    assert fr.eof() == [] and fr.closed
    assert rules.answered == 1 and rules.rejected == 0


# counters, max_requests, draining ----------------------------------------------------------------


def test_answers_are_counted_and_open_until_closes():
    rules = FramingRules()
    rules.open_until = 1  # (as framing.py: answers keep the connection open while below it)
    fr = framer(rules)
    answers = fr.feed(packet() + packet({"REQUEST_METHOD": "HEAD"}) + packet())
    assert answers == [f.OK, f.OK_CLOSE_HEAD]  # the one past open_until says close
    assert rules.answered == 2 and fr.closed and not fr.clean


def test_refusals_are_counted_as_rejected():
    rules = FramingRules()
    fr = framer(rules)
    assert fr.feed(packet() + packet(m1=1)) == [f.OK, REFUSED]
    assert (rules.answered, rules.rejected) == (2, 1)


def test_forbidden_refuses_the_first_input_or_its_end():
    fr = framer()
    fr.forbid("uwsgi request from '10.0.0.1' not allowed")
    assert fr.feed(packet()) == [REFUSED]
    assert fr.reason.endswith("not allowed")
    fr = framer()
    fr.forbid("no")
    assert fr.eof() == [REFUSED]


def test_blocks_are_recorded_for_the_log():
    fr = framer()
    blocks: list[bytes | None] = []
    body_packet = {"CONTENT_LENGTH": "2", "PATH_INFO": "/b"}
    out = fr.feed(packet(GET) + packet(body_packet) + b"x", blocks)
    assert out == [f.OK] and blocks == [block_of(GET)]
    blocks.clear()
    assert fr.feed(b"y" + packet(m1=9), blocks) == [f.OK, REFUSED]
    assert blocks == [block_of(body_packet), None]


def test_verdicts_are_cached_and_bounded():
    packets = PacketRules()
    for i in range(3000):
        fr = PacketFramer(packets)
        assert fr.feed(packet({"REMOTE_PORT": str(i)})) == [f.OK]
        assert len(packets.cache) <= 1024


# the same decisions as gunicorn ------------------------------------------------------------------


def gunicorn_reads(data: bytes) -> tuple[str, ...]:
    """What gunicorn 27 makes of one packet: ('refused',) or (HEAD?, close?, the body's
    declared length, its length read, what is left after it)."""
    cfg = Config()
    cfg.set("protocol", "uwsgi")
    unreader = IterUnreader([data])
    try:
        req = UWSGIRequest(cfg, unreader, ("127.0.0.1", 1))
    except UWSGIParseException:
        return ("refused",)
    declared = req.body.reader.length
    body = req.body.read()
    rest = unreader.read()
    head, close = str(req.method == "HEAD"), str(req.should_close())
    return (head, close, str(declared), str(len(body)), repr(rest))


def we_read(data: bytes) -> tuple[str, ...]:
    fr = framer()
    out = fr.feed(data)
    if not out:
        out = fr.eof()
    if out[0] == REFUSED:
        return ("refused",)
    kind = out[0]
    # what followed the body is what the next packet sees: feed it a marker packet
    return (str(bool(kind & f.OK_HEAD)), str(kind >= f.OK_CLOSE))


KEYS = [
    "REQUEST_METHOD",
    "CONTENT_LENGTH",
    "HTTP_CONNECTION",
    "PATH_INFO",
    "QUERY_STRING",
    "HTTP_HOST",
    "",
    "X" * 300,
]
VALUES = ["GET", "HEAD", "head", "close", "CLOSE", "keep-alive", "3", "-1", "+2", " 4", "x", ""]


def random_packet(rng: random.Random) -> bytes:
    pairs = [(rng.choice(KEYS), rng.choice(VALUES)) for _ in range(rng.randint(0, 8))]
    block = block_of(pairs)
    roll = rng.random()
    if roll < 0.1:
        block = block[: rng.randint(0, len(block))]  # sizes that overrun the block
    elif roll < 0.15:
        block += bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 5)))
    m1 = rng.choice([0] * 12 + [1, 5, 255])
    size = len(block)
    if rng.random() < 0.05:
        size = rng.randint(0, 65535)  # a header that lies about the block
    data = bytes([m1]) + struct.pack("<H", size) + bytes([rng.randint(0, 255)]) + block
    return data + b"BODYBODY"[: rng.randint(0, 8)]


def test_the_same_decisions_as_gunicorn_on_a_random_corpus():
    rng = random.Random(27)
    compared = refused = 0
    for _ in range(4000):
        data = random_packet(rng)
        theirs = gunicorn_reads(data)
        ours = we_read(data)
        if theirs != ("refused",) and int(theirs[3]) < int(theirs[2]):
            # The input ends inside the body: gunicorn has answered (before reading it) and
            # then reads a short body; here the packet is cut short, so refused (module doc).
            assert ours == ("refused",), data
            continue
        if theirs == ("refused",) or ours == ("refused",):
            assert ours == theirs, data
            refused += 1
            continue
        assert ours == theirs[:2], data
        # Where gunicorn's body ends, the next packet begins: ours is framed from there too.
        rest = ast.literal_eval(theirs[4])
        fr = framer()
        out = fr.feed(data + packet({"REQUEST_METHOD": "HEAD"}))
        if out[0] < f.OK_CLOSE:
            after = framer()
            assert out[1:] == after.feed(rest + packet({"REQUEST_METHOD": "HEAD"})), data
        compared += 1
    assert compared > 1000 and refused > 300


# the protocol ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Budget:
    def __init__(self, head_budget: int) -> None:
        self.held = 0
        self.head_budget = head_budget


TABLE = render(b"Tue, 08 Dec 2026 03:00:00 GMT")


def protocol(
    rules: FramingRules | None = None,
    clock: Clock | None = None,
    budget: Budget | None = None,
    reports: list[str] | None = None,
) -> UwsgiProtocol:
    return UwsgiProtocol(
        PacketRules(rules or FramingRules()),
        TABLE,
        head_timeout=10,
        body_timeout=5,
        clock=clock or Clock(),
        budget=budget,
        report=None if reports is None else reports.append,
    )


def test_the_protocol_answers_with_the_response_table():
    p = protocol()
    assert p.receive(packet()) == TABLE[f.OK]
    assert p.receive(packet({"REQUEST_METHOD": "HEAD"})) == TABLE[f.OK_HEAD]
    assert TABLE[f.OK_HEAD] + b"Vrypt" == TABLE[f.OK]
    assert p.idle() and not p.closing
    assert p.receive(packet() * 3) == TABLE[f.OK] * 3
    answer = p.receive(packet({"HTTP_CONNECTION": "close"}))
    assert answer == TABLE[f.OK_CLOSE] and b"Connection: close\r\n" in answer
    assert p.closing and p.clean


def test_a_refused_packet_gets_500_after_the_answers_before_it():
    reports: list[str] = []
    p = protocol(reports=reports)
    out = p.receive(packet() + packet(m1=3))
    assert out == TABLE[f.OK] + TABLE[REFUSED]
    assert TABLE[REFUSED].startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"Connection: close\r\n" in TABLE[REFUSED]
    assert p.closing and not p.clean
    assert reports == ["unsupported modifier1 3"]


def test_many_pipelined_packets_are_answered_a_batch_at_a_time():
    p = protocol()
    first = p.receive(packet() * (f.BATCH * 2 + 3) + packet(m1=1))
    assert first == TABLE[f.OK] * f.BATCH and not p.closing
    assert p.writable() == TABLE[f.OK] * f.BATCH
    assert p.writable() == TABLE[f.OK] * 3 + TABLE[REFUSED]
    assert p.closing and p.writable() == b""


def test_the_end_of_input_mid_packet_gets_500_and_between_packets_nothing():
    p = protocol()
    assert p.receive(packet()[:5]) == b""
    assert p.eof() == TABLE[REFUSED] and p.closing
    p = protocol()
    assert p.receive(packet()) == TABLE[f.OK]
    assert p.eof() == b"" and p.closing


def test_a_stalled_packet_closes_without_an_answer_after_the_head_timeout():
    clock = Clock()
    p = protocol(clock=clock)
    assert p.receive(packet()[:6]) == b""
    assert not p.idle()
    clock.now += 9.9
    assert p.tick(clock.now) == b"" and not p.closing
    clock.now += 0.1
    assert p.tick(clock.now) == b"" and p.closing and not p.clean


def test_a_stalled_body_closes_without_an_answer_after_the_body_timeout():
    clock = Clock()
    p = protocol(clock=clock)
    assert p.receive(packet({"CONTENT_LENGTH": "9"}) + b"abc") == b""
    assert p.tick(clock.now, clock.now) == b"" and not p.closing
    clock.now += 4
    assert p.tick(clock.now) == b"" and not p.closing
    assert p.receive(b"d") == b""  # progress: counted from this read
    assert p.tick(clock.now, clock.now) == b"" and not p.closing
    clock.now += 5
    assert p.tick(clock.now) == b"" and p.closing


def test_partial_packets_are_held_within_the_worker_budget():
    budget = Budget(head_budget=40 * 1024)
    big = packet([("K", "v" * 60000)])
    p1 = protocol(budget=budget)
    assert p1.receive(big[:35000]) == b""  # past SMALL_HEAD but within the budget
    assert budget.held == 35000
    p2 = protocol(budget=budget, reports=(reports := []))
    assert p2.receive(big[:34000]) == TABLE[REFUSED]  # the two together are past it
    assert p2.closing and reports == ["partial packets past VRYPT_HEAD_BUFFER"]
    assert budget.held == 35000
    assert p1.receive(big[35000:]) == TABLE[f.OK]
    assert budget.held == 0
    p3 = protocol(budget=budget)
    assert p3.receive(big[:1000]) == b"" and budget.held == 1000
    p3.release()
    assert budget.held == 0


def test_a_forbidden_peer_gets_500_for_its_first_bytes():
    p = protocol(reports=(reports := []))
    p.forbid("uwsgi request from '10.1.1.1' not allowed")
    assert p.receive(packet()) == TABLE[REFUSED]
    assert p.closing and reports == ["uwsgi request from '10.1.1.1' not allowed"]
    p = protocol()
    assert p.refuse("not allowed") == TABLE[REFUSED] and p.closing


@pytest.mark.parametrize(
    ("entries", "peer", "allowed"),
    [
        (["127.0.0.1", "::1"], ("127.0.0.1", 5), True),
        (["127.0.0.1", "::1"], ("::1", 5, 0, 0), True),
        (["127.0.0.1", "::1"], ("::ffff:127.0.0.1", 5, 0, 0), True),
        (["127.0.0.1", "::1"], ("10.0.0.1", 5), False),
        (["127.0.0.1", "::1"], "/run/vrypt.sock", True),  # a unix socket: always
        (["127.0.0.1", "::1"], b"", True),
        (["10.0.0.0/8"], ("10.9.8.7", 5), True),
        (["10.0.0.0/8"], ("11.0.0.1", 5), False),
        (["*"], ("203.0.113.9", 5), True),
        ([], ("127.0.0.1", 5), False),
    ],
)
def test_allow_list(entries, peer, allowed):
    assert AllowList(entries).allows(peer) is allowed

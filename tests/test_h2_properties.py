"""Generated input for the HTTP/2 core (hypothesis): how the bytes are split never changes what
is answered, and no sequence of frames, valid or not, makes it raise or answer a stream twice."""

from __future__ import annotations

from hyperframe.frame import GoAwayFrame, HeadersFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.h2_peer import (
    REQUEST,
    client_start,
    data,
    encoder,
    headers,
    make,
    parse,
    raw,
    settings_frame,
    u32,
)
from vrypt_worker.h2 import H2Config, frames


def conversation(kinds: list[int]) -> bytes:
    """A valid client conversation: GET, HEAD, a POST with a body and trailers, PING,
    WINDOW_UPDATE and SETTINGS, in the generated order."""
    enc = encoder()
    out = [client_start()]
    sid = 1
    for kind in kinds:
        if kind == 0:
            out.append(headers(sid, enc.encode(REQUEST)))
        elif kind == 1:
            out.append(headers(sid, enc.encode([(b":method", b"HEAD"), *REQUEST[1:]])))
        elif kind == 2:
            block = enc.encode([(b":method", b"POST"), *REQUEST[1:], (b"content-length", b"40000")])
            out.append(headers(sid, block, end_stream=False))
            out.append(data(sid, b"a" * 16000) + data(sid, b"b" * 16000, pad=20))
            out.append(data(sid, b"c" * 8000))
            out.append(headers(sid, enc.encode([(b"x-trailer", b"1")])))
        elif kind == 3:
            out.append(raw(frames.PING, 0, 0, b"%08d" % sid))
        elif kind == 4:
            out.append(raw(frames.WINDOW_UPDATE, 0, 0, u32(1000)))
        else:
            out.append(settings_frame({frames.SETTINGS_INITIAL_WINDOW_SIZE: 65535 + sid}))
        sid += 2
    return b"".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12), st.data())
def test_any_split_of_the_input_gives_the_same_output(kinds, draw):
    stream = conversation(kinds)
    whole, rules_whole = make()
    expected = whole.receive(stream)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    split, rules_split = make()
    got = b""
    last = 0
    for cut in [*cuts, len(stream)]:
        if cut > last:
            got += split.receive(stream[last:cut])
            last = cut
    assert got == expected
    assert rules_whole.answered == rules_split.answered == sum(k <= 2 for k in kinds)
    assert not whole.closing and not split.closing


# Frames of every type, on a few stream ids, with flags and payloads that are often wrong.
_sids = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 0x80000001])
_blocks = st.sampled_from(
    [
        b"\x82\x86\x84\x41\x07example",  # GET http / example (inserts :authority)
        b"\x82\x86\x84\xbe",  # refers to the entry above
        b"\x83\x86\x84\x41\x01x\x5c\x011",  # POST, content-length 1
        b"\x82\x86",  # no :path
        b"\x80",  # undecodable
        b"\x3f\xe2\x1f",  # size update too large
        b"",
    ]
)
_payload = st.binary(max_size=24)


@st.composite
def _frame(draw) -> bytes:
    kind = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 0x21]))
    sid = draw(_sids)
    flags = draw(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0x2D, 0xFF]))
    if kind in (frames.HEADERS, frames.CONTINUATION):
        payload = draw(_blocks)
        if flags & frames.FLAG_PRIORITY and kind == frames.HEADERS:
            payload = u32(draw(_sids)) + b"\x10" + payload
        if flags & frames.FLAG_PADDED and kind == frames.HEADERS:
            payload = b"\x02" + payload + b"\0\0"
    elif kind == frames.WINDOW_UPDATE:
        payload = u32(draw(st.sampled_from([0, 1, 100, 2**31 - 1])))
    elif kind == frames.SETTINGS:
        payload = draw(
            st.sampled_from(
                [b"", b"\x00\x04" + u32(0), b"\x00\x04" + u32(10), b"\x00\x05" + u32(1)]
            )
        )
    else:
        payload = draw(_payload)
    return raw(kind, flags, sid, payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frame(), max_size=30), st.lists(st.integers(1, 60), max_size=10))
def test_random_frames_never_raise_and_never_answer_a_stream_twice(frame_list, sizes):
    proto, rules = make(H2Config(max_concurrent_streams=3))
    stream = client_start() + b"".join(frame_list)
    out = b""
    pos = 0
    for size in [*sizes, len(stream)]:
        piece = stream[pos : pos + size]
        pos += len(piece)
        if piece:
            out += proto.receive(piece)
    out += proto.writable() + proto.tick(1e9) + proto.shutdown()
    parsed = parse(out)  # well-formed frames only
    answered = [f.stream_id for f in parsed if isinstance(f, HeadersFrame)]
    assert len(answered) == len(set(answered))
    assert all(sid % 2 == 1 for sid in answered)
    assert len(answered) == rules.answered
    last_ids = [f.last_stream_id for f in parsed if isinstance(f, GoAwayFrame)]
    assert last_ids == sorted(last_ids, reverse=True)
    if proto.closing:
        assert proto.receive(b"\0" * 9) == b""


# -- a conforming client doing random things: the server stays conforming ------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), st.sampled_from([b"GET", b"HEAD", b"OPTIONS"])),
        st.tuples(st.just("post"), st.integers(0, 200_000)),
        st.tuples(st.just("reset"), st.integers(0, 5)),
        st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8)),
        st.tuples(st.just("window"), st.integers(0, 100_000)),
        st.tuples(st.just("exchange"), st.integers(0, 1)),
        st.tuples(
            st.just("settings"),
            st.fixed_dictionaries(
                {
                    frames.SETTINGS_INITIAL_WINDOW_SIZE: st.integers(0, 200_000),
                    frames.SETTINGS_MAX_FRAME_SIZE: st.sampled_from([16384, 20000, 1 << 20]),
                }
            ),
        ),
    ),
    max_size=25,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops, st.sampled_from([b"Vrypt", b"x" * 70_000]))
def test_a_conforming_client_gets_every_request_answered_once(ops, body):
    import h2.exceptions

    from tests.h2_peer import Client
    from vrypt_worker.answer import Answer

    proto, rules = make(H2Config(max_concurrent_streams=4), answer=Answer(body=body))
    client = Client(proto, auto_ack=False)
    client.exchange()
    conn = client.conn
    uploads: dict[int, int] = {}  # stream -> body bytes still to send
    expected: dict[int, bytes] = {}
    reset: set[int] = set()

    def pump_uploads():
        for sid, left in list(uploads.items()):
            if sid in reset:
                del uploads[sid]
                continue
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            chunk = min(window, left)
            if chunk or not left:
                conn.send_data(sid, b"u" * chunk, end_stream=chunk == left)
                uploads[sid] = left - chunk
                if chunk == left:
                    del uploads[sid]

    def room() -> bool:
        return conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams

    for op, arg in ops:
        if op == "get" and room():
            sid = client.request(arg)
            expected[sid] = b"" if arg == b"HEAD" else body
        elif op == "post" and room():
            sid = client.request(b"POST", [(b"content-length", b"%d" % arg)], end_stream=False)
            uploads[sid] = arg
            expected[sid] = body
            pump_uploads()
        elif op == "reset":
            open_ids = sorted(s for s in expected if s not in reset and not _done(client, s))
            if open_ids:
                sid = open_ids[arg % len(open_ids)]
                conn.reset_stream(sid)
                reset.add(sid)
        elif op == "ping":
            conn.ping(arg)
        elif op == "window" and arg:
            conn.increment_flow_control_window(arg)
        elif op == "settings":
            conn.update_settings(arg)
        else:
            pump_uploads()
            client.exchange()
    # Then a patient client: acknowledge everything until nothing moves.
    for _ in range(200):
        pump_uploads()
        for sid in expected:
            if sid in reset or _done(client, sid):
                continue
            try:
                got = len(client.responses.get(sid, _EMPTY).body)
                conn.increment_flow_control_window(max(1, got), sid)
            except h2.exceptions.StreamClosedError:
                pass
        conn.increment_flow_control_window(1 << 20)
        client.exchange()
        if all(s in reset or _done(client, s) for s in expected) and not uploads:
            break
    for sid, want in expected.items():
        if sid in reset:
            continue
        response = client.responses[sid]
        assert response.ended and response.body == want, sid
    assert client.goaway is None
    # Streams the client reset may have been answered before the reset arrived.
    visible = sum(1 for s in expected if s in client.responses and client.responses[s].headers)
    assert visible <= rules.answered <= len(expected)


class _Empty:
    body = b""


_EMPTY = _Empty()


def _done(client, sid: int) -> bool:
    response = client.responses.get(sid)
    return response is not None and (response.ended or response.reset is not None)


# Mostly valid traffic with the odd broken frame: reaches deep states before anything fails.
_actions = st.lists(
    st.one_of(
        st.tuples(st.just("get"), st.booleans()),  # (HEAD?)
        st.tuples(st.just("open"), st.integers(0, 3)),  # a request whose body follows
        st.tuples(st.just("body"), st.integers(0, 40_000)),
        st.tuples(st.just("end"), st.booleans()),  # end the newest open request (trailers?)
        st.tuples(st.just("split"), st.integers(1, 20)),  # a request in CONTINUATION frames
        st.tuples(st.just("rst"), st.integers(0, 3)),
        st.tuples(st.just("ping"), st.booleans()),
        st.tuples(st.just("window"), st.integers(0, 3)),
        st.tuples(st.just("priority"), st.integers(0, 9)),
        st.tuples(st.just("settings"), st.integers(0, 70_000)),
        st.tuples(st.just("junk"), _frame()),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_actions, st.lists(st.integers(1, 200), max_size=12))
def test_mostly_valid_traffic_never_raises_and_never_answers_twice(actions, sizes):
    enc = encoder()
    proto, rules = make(H2Config(max_concurrent_streams=3))
    pieces = [client_start()]
    sid = 1
    opened: list[int] = []
    for action, arg in actions:
        if action == "get":
            fields = [(b":method", b"HEAD" if arg else b"GET"), *REQUEST[1:]]
            pieces.append(headers(sid, enc.encode(fields)))
            sid += 2
        elif action == "open":
            fields = [(b":method", b"POST"), *REQUEST[1:]]
            if arg == 1:
                fields.append((b"content-length", b"10"))
            pieces.append(headers(sid, enc.encode(fields), end_stream=False))
            opened.append(sid)
            sid += 2
        elif action == "body" and opened:
            pieces.append(data(opened[-1], b"d" * min(arg, 16384)))
        elif action == "end" and opened:
            stream = opened.pop()
            if arg:
                pieces.append(headers(stream, enc.encode([(b"x-trailer", b"t")])))
            else:
                pieces.append(data(stream, b"", end_stream=True))
        elif action == "split":
            block = enc.encode([*REQUEST, (b"x-split", b"s" * 50)])
            cut = min(arg, len(block))
            pieces.append(headers(sid, block[:cut], end_headers=False))
            pieces.append(raw(frames.CONTINUATION, frames.FLAG_END_HEADERS, sid, block[cut:]))
            sid += 2
        elif action == "rst" and opened:
            stream = opened.pop(arg % len(opened))
            pieces.append(raw(frames.RST_STREAM, 0, stream, u32(8)))
        elif action == "ping":
            pieces.append(raw(frames.PING, frames.FLAG_ACK if arg else 0, 0, b"p" * 8))
        elif action == "window":
            target = opened[arg % len(opened)] if opened and arg else 0
            pieces.append(raw(frames.WINDOW_UPDATE, 0, target, u32(1000 * (arg + 1))))
        elif action == "priority":
            pieces.append(raw(frames.PRIORITY, 0, 2 * arg + 1, u32(0) + b"\x10"))
        elif action == "settings":
            pieces.append(settings_frame({frames.SETTINGS_INITIAL_WINDOW_SIZE: arg}))
        elif action == "junk":
            pieces.append(arg)
    stream_bytes = b"".join(pieces)
    out = b""
    pos = 0
    for size in [*sizes, len(stream_bytes)]:
        piece = stream_bytes[pos : pos + size]
        pos += len(piece)
        if piece:
            out += proto.receive(piece)
    out += proto.writable() + proto.shutdown()
    parsed = parse(out)
    answered = [f.stream_id for f in parsed if isinstance(f, HeadersFrame)]
    assert len(answered) == len(set(answered)) == rules.answered
    last_ids = [f.last_stream_id for f in parsed if isinstance(f, GoAwayFrame)]
    assert last_ids == sorted(last_ids, reverse=True)
    if not any(action == "junk" for action, _ in actions):
        # Valid traffic: no connection error, every GET/HEAD/split request answered.
        assert all(f.error_code == frames.NO_ERROR for f in parsed if isinstance(f, GoAwayFrame))

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

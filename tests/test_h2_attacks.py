"""Attacks on an HTTP/2 server, each defused by a bound (docs/http2.md lists them)."""

from __future__ import annotations

import hpack
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame

from tests.h2_peer import (
    REQUEST,
    client_start,
    data,
    encoder,
    goaway,
    goaway_code,
    headers,
    make,
    parse,
    raw,
    resets,
    settings_frame,
    u32,
)
from vrypt_worker.answer import Answer
from vrypt_worker.h2 import H2Config, frames
from vrypt_worker.h2.connection import OUTPUT_BUDGET
from vrypt_worker.h2.frames import COMPRESSION_ERROR, ENHANCE_YOUR_CALM, REFUSED_STREAM


def started(config: H2Config | None = None, values: dict[int, int] | None = None, answer=None):
    proto, rules = make(config, answer=answer)
    proto.receive(client_start(values))
    return proto, rules


def test_rapid_reset_cve_2023_44487_is_stopped():
    """Streams opened and reset at once cost work and never produce an answer: after the reset
    budget (gunicorn's 200 per 10 s) the connection ends with ENHANCE_YOUR_CALM."""
    config = H2Config()
    proto, rules = started(config)
    enc = encoder()
    block = enc.encode([*REQUEST, (b"content-length", b"10")])
    burst = b"".join(
        headers(sid, block, end_stream=False) + raw(frames.RST_STREAM, 0, sid, u32(8))
        for sid in range(1, 2 * (config.reset_burst + 5), 2)
    )
    out = proto.receive(burst)
    assert goaway_code(out) == ENHANCE_YOUR_CALM
    assert proto.closing and rules.answered == 0


def test_reset_budget_refills_each_second():
    config = H2Config(reset_burst=10, reset_rate=5)
    proto, _ = started(config)
    enc = encoder()
    block = enc.encode([*REQUEST, (b"content-length", b"10")])
    sid = 1
    for second in range(20):  # 5 resets a second, for 20 seconds: a client that cancels
        for _ in range(5):
            out = proto.receive(
                headers(sid, block, end_stream=False) + raw(frames.RST_STREAM, 0, sid, u32(8))
            )
            assert goaway(out) is None
            sid += 2
        proto.tick(float(second))
    assert not proto.closing


def test_refused_streams_count_as_resets():
    config = H2Config(max_concurrent_streams=1, reset_burst=20)
    proto, _ = started(config)
    enc = encoder()
    block = enc.encode([*REQUEST, (b"content-length", b"10")])
    out = proto.receive(b"".join(headers(sid, block, end_stream=False) for sid in range(1, 99, 2)))
    assert list(resets(out).values()).count(REFUSED_STREAM) == 21 - 1
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_continuation_flood_with_data_is_bounded_by_the_header_list_size():
    proto, _ = started(H2Config(max_header_list_size=4096))
    proto.receive(headers(1, b"\x82", end_headers=False))
    junk = raw(frames.CONTINUATION, 0, 1, b"\x00" * 1000)
    out = b"".join(proto.receive(junk) for _ in range(5))
    assert goaway_code(out) == ENHANCE_YOUR_CALM
    assert proto.closing and len(proto._cont_block) == 0


def test_continuation_flood_of_empty_frames_is_counted():
    proto, _ = started(H2Config(control_burst=100))
    proto.receive(headers(1, b"\x82", end_headers=False))
    out = proto.receive(raw(frames.CONTINUATION, 0, 1, b"") * 200)
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_hpack_bomb_is_refused():
    proto, _ = started(H2Config(max_header_list_size=16384))
    enc = hpack.Encoder()
    insert = enc.encode([*REQUEST, (b"x-bomb", b"b" * 4000)])
    proto.receive(headers(1, insert))
    out = proto.receive(headers(3, enc.encode(REQUEST) + b"\xbe" * 100))
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_table_size_update_above_our_setting_is_a_compression_error():
    proto, _ = started()
    out = proto.receive(headers(1, b"\x3f\xe2\x1f" + encoder().encode(REQUEST)))
    assert goaway_code(out) == COMPRESSION_ERROR


def test_oversized_header_list_gets_431_and_the_connection_goes_on():
    proto, rules = started(H2Config(max_header_list_size=1024))
    enc = hpack.Encoder()
    big = enc.encode([*REQUEST, (b"x-big", b"v" * 1500)])  # inserted into the table
    out = proto.receive(headers(1, big))
    answer = [f for f in parse(out) if isinstance(f, HeadersFrame)]
    assert len(answer) == 1
    decoded = hpack.Decoder().decode(answer[0].data, raw=True)
    assert decoded[0] == (b":status", b"431")
    assert rules.rejected == 1 and rules.answered == 1 and not proto.closing
    # The table is still right: the next block refers to the entry the big one inserted.
    out = proto.receive(headers(3, enc.encode(REQUEST)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [3]


def test_ping_flood_is_stopped():
    proto, _ = started(H2Config(control_burst=1000))
    out = proto.receive(PingFrame(0, b"12345678").serialize() * 1100)
    acks = [f for f in parse(out) if isinstance(f, PingFrame)]
    assert len(acks) == 1000 - 1  # answered until the budget ran out (the SETTINGS cost 1)
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_ping_budget_refills_each_second():
    proto, _ = started(H2Config(control_burst=50, control_rate=10))
    for second in range(30):
        out = proto.receive(PingFrame(0, b"12345678").serialize() * 10)
        assert goaway(out) is None
        proto.tick(float(second))


def test_settings_flood_is_stopped():
    proto, _ = started(H2Config(control_burst=100))
    out = proto.receive(settings_frame({frames.SETTINGS_MAX_FRAME_SIZE: 16384}) * 200)
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_empty_data_flood_is_stopped():
    proto, _ = started(H2Config(control_burst=100))
    proto.receive(headers(1, encoder().encode(REQUEST), end_stream=False))
    out = proto.receive(data(1, b"") * 200)
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_priority_and_unknown_frame_floods_are_stopped():
    proto, _ = started(H2Config(control_burst=100))
    out = proto.receive(raw(frames.PRIORITY, 0, 1, u32(0) + b"\x01") * 200)
    assert goaway_code(out) == ENHANCE_YOUR_CALM
    proto, _ = started(H2Config(control_burst=100))
    out = proto.receive(raw(0x42, 0, 0, b"") * 200)
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_zero_window_client_holds_at_most_max_concurrent_streams():
    """A client that grants no window makes every answer wait; what we hold is bounded by the
    stream limit, and each held answer refers to the shared body (no copy)."""
    proto, _ = started(
        H2Config(max_concurrent_streams=10),
        values={frames.SETTINGS_INITIAL_WINDOW_SIZE: 0},
        answer=Answer(body=b"z" * 100_000),
    )
    enc = encoder()
    out = proto.receive(b"".join(headers(sid, enc.encode(REQUEST)) for sid in range(1, 41, 2)))
    assert len(proto._streams) == 10
    assert list(resets(out).values()) == [REFUSED_STREAM] * 10
    assert all(s.body is proto.answers.ok.body for s in proto._streams.values())


def test_output_of_one_call_is_bounded():
    """A 10-byte HEADERS frame asks for a 1 MiB answer: one call writes at most the budget (plus
    headers); the rest waits for writable()."""
    proto, _ = started(
        values={frames.SETTINGS_INITIAL_WINDOW_SIZE: 2**31 - 1},
        answer=Answer(body=b"m" * (1 << 20)),
    )
    proto.receive(raw(frames.WINDOW_UPDATE, 0, 0, u32(2**31 - 1 - 65535)))
    enc = encoder()
    out = proto.receive(b"".join(headers(sid, enc.encode(REQUEST)) for sid in range(1, 201, 2)))
    sent = sum(len(f.data) for f in parse(out) if isinstance(f, DataFrame))
    assert sent <= OUTPUT_BUDGET
    assert len(proto._streams) <= 100


def test_partial_frame_buffer_is_bounded_by_the_frame_size():
    proto, _ = started()
    out = proto.receive(b"\x01\x00\x00\x00\x00\x00\x00\x00\x01")  # announces 65536 bytes
    assert goaway_code(out) == frames.FRAME_SIZE_ERROR


def _limited(request_line: int = 4094, fields: int = 100, field_size: int = 8190):
    from vrypt_worker.framing import FramingRules, Limits

    rules = FramingRules(Limits(request_line, fields, field_size))
    proto, _ = make(rules=rules)
    proto.receive(client_start())
    return proto, rules


def _status(out: bytes) -> list[bytes]:
    decoder = hpack.Decoder()
    return [
        dict(decoder.decode(f.data, raw=True))[b":status"]
        for f in parse(out)
        if isinstance(f, HeadersFrame)
    ]


def test_gunicorn_limits_apply_to_http2_requests_as_to_http1():
    """gunicorn checks HTTP/2 requests against limit_request_line (:path), limit_request_fields
    and limit_request_field_size (name + value + 2); so do we, with HTTP/1's statuses."""
    proto, rules = _limited(request_line=20, fields=3, field_size=30)
    enc = encoder()
    base = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"e")]
    out = proto.receive(
        headers(1, enc.encode([*base, (b":path", b"/" + b"p" * 20)]))  # 21 bytes: 414
        + headers(3, enc.encode([*base, (b":path", b"/" + b"p" * 19)]))  # 20 bytes: fine
        + headers(5, enc.encode([*base, (b":path", b"/"), *[(b"x%d" % i, b"v") for i in range(4)]]))
        + headers(7, enc.encode([*base, (b":path", b"/"), (b"x", b"v" * 27)]))  # 1+27+2 = 30
        + headers(9, enc.encode([*base, (b":path", b"/"), (b"x", b"v" * 28)]))  # 31: 431
    )
    assert _status(out) == [b"414", b"200", b"431", b"200", b"431"]
    assert (rules.answered, rules.rejected) == (5, 3) and not proto.closing


def test_a_block_of_very_many_fields_is_a_bomb():
    proto, _ = _limited(fields=10)
    block = encoder().encode(REQUEST) + b"\x90" * 40  # 40 x `accept-encoding: gzip, deflate`
    out = proto.receive(headers(1, block))
    assert goaway_code(out) == ENHANCE_YOUR_CALM


def test_method_that_is_not_a_token_is_malformed():
    proto, _ = started()
    out = proto.receive(headers(1, encoder().encode([(b":method", b"G T"), *REQUEST[1:]])))
    assert resets(out) == {1: frames.PROTOCOL_ERROR}

"""The HTTP/2 core against RFC 9113, one test per requirement a server must meet, named after
its section. The client is the `h2` package (sans-I/O) or hand-built frames; no sockets."""

from __future__ import annotations

import h2.errors
import h2.events
import pytest
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
)

from tests.h2_peer import (
    NOW,
    REQUEST,
    Client,
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
from vrypt_worker import response
from vrypt_worker.answer import Answer
from vrypt_worker.h2 import H2Answers, H2Config, H2Protocol, frames
from vrypt_worker.h2.frames import (
    COMPRESSION_ERROR,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
)


def started(config: H2Config | None = None, values: dict[int, int] | None = None):
    """A connection past the client preface and SETTINGS, and a fresh client-side encoder."""
    proto, rules = make(config)
    out = proto.receive(client_start(values))
    assert not proto.closing
    assert out
    return proto, rules, encoder()


def get_block(enc, fields=None) -> bytes:
    return enc.encode(fields or REQUEST)


# -- §3.4 connection preface ----------------------------------------------------------------


def test_3_4_server_preface_is_a_settings_frame_with_the_configured_limits():
    proto, _ = make(H2Config(max_concurrent_streams=7, initial_window_size=1000))
    first = parse(proto.start())
    assert isinstance(first[0], SettingsFrame)
    assert "ACK" not in first[0].flags
    assert first[0].settings[frames.SETTINGS_MAX_CONCURRENT_STREAMS] == 7
    assert first[0].settings[frames.SETTINGS_INITIAL_WINDOW_SIZE] == 1000
    assert first[0].settings[frames.SETTINGS_MAX_FRAME_SIZE] == 16384
    assert first[0].settings[frames.SETTINGS_MAX_HEADER_LIST_SIZE] == 65536
    assert proto.start() == b""  # once


def test_3_4_server_preface_goes_first_even_if_start_was_not_called():
    proto, _ = make()
    out = parse(proto.receive(client_start()))
    assert isinstance(out[0], SettingsFrame) and "ACK" not in out[0].flags
    assert isinstance(out[1], SettingsFrame) and "ACK" in out[1].flags


def test_3_4_client_settings_are_acknowledged():
    client = Client()
    events = client.exchange()
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in events)


def test_3_4_invalid_preface_is_a_connection_error():
    proto, rules = make()
    out = proto.receive(b"GET / HTTP/1.1\r\n\r\n")
    assert goaway_code(out) == PROTOCOL_ERROR
    assert proto.closing and rules.rejected == 1
    assert proto.receive(b"more") == b""


def test_3_4_first_frame_after_the_preface_must_be_settings():
    proto, _ = make()
    out = proto.receive(PREFACE_ONLY + PingFrame(0, b"12345678").serialize())
    assert goaway_code(out) == PROTOCOL_ERROR


PREFACE_ONLY = frames.PREFACE


def test_3_4_preface_one_byte_at_a_time():
    proto, _ = make()
    enc = encoder()
    stream = client_start() + headers(1, get_block(enc))
    out = b"".join(proto.receive(stream[i : i + 1]) for i in range(len(stream)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]


# -- §3.2 (RFC 7540) h2c upgrade ------------------------------------------------------------


def test_3_2_upgrade_answers_stream_1_after_the_server_settings():
    proto = H2Protocol.upgraded(H2Config(), _rules(), H2Answers(NOW), settings=b"", head=False)
    first = parse(proto.start())
    assert isinstance(first[0], SettingsFrame)
    assert isinstance(first[1], HeadersFrame) and first[1].stream_id == 1
    assert isinstance(first[2], DataFrame) and first[2].data == b"Vrypt"
    assert "END_STREAM" in first[2].flags
    # The client's preface and SETTINGS follow; stream 1 is closed, stream 3 is next.
    enc = encoder()
    out = parse(proto.receive(client_start() + headers(3, get_block(enc))))
    assert [f.stream_id for f in out if isinstance(f, HeadersFrame)] == [3]
    assert proto.rules.answered == 2


def _rules():
    from vrypt_worker.framing import FramingRules

    return FramingRules()


def test_3_2_upgrade_of_a_head_request_has_no_data():
    proto = H2Protocol.upgraded(H2Config(), _rules(), H2Answers(NOW), settings=b"", head=True)
    out = parse(proto.start())
    assert [type(f) for f in out] == [SettingsFrame, HeadersFrame]
    assert "END_STREAM" in out[1].flags


def test_3_2_upgrade_settings_are_applied_without_ack():
    payload = b"\x00\x04" + u32(2)  # INITIAL_WINDOW_SIZE 2: the body goes 2 bytes at a time
    proto = H2Protocol.upgraded(H2Config(), _rules(), H2Answers(NOW), settings=payload)
    out = parse(proto.start())
    assert not any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in out)
    assert [f.data for f in out if isinstance(f, DataFrame)] == [b"Vr"]
    with pytest.raises(ValueError):
        H2Protocol.upgraded(H2Config(), _rules(), H2Answers(NOW), settings=b"\x00\x05" + u32(1))
    with pytest.raises(ValueError):
        H2Protocol.upgraded(H2Config(), _rules(), H2Answers(NOW), settings=b"\x00")


def test_3_2_upgraded_stream_1_is_half_closed_remote():
    proto = H2Protocol.upgraded(H2Config(), _rules(), H2Answers(NOW), settings=b"")
    proto.start()
    out = proto.receive(client_start() + data(1, b"x"))
    # DATA on a stream the client has closed: STREAM_CLOSED (§5.1 half-closed (remote)).
    assert resets(out) == {1: STREAM_CLOSED}
    assert not proto.closing


# -- §4 frames ------------------------------------------------------------------------------


def test_4_1_unknown_frame_types_and_flags_are_ignored():
    proto, rules, enc = started()
    out = proto.receive(
        raw(0xFA, 0xFF, 0, b"whatever")
        + raw(0xFB, 0, 1, b"x")
        + raw(frames.HEADERS, 0xC5, 1, get_block(enc))
    )
    # Unknown flags (0xC0) on HEADERS are ignored too; the request is answered.
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]
    assert rules.answered == 1 and not proto.closing


def test_4_1_reserved_bit_of_the_stream_id_is_ignored():
    proto, _, enc = started()
    out = proto.receive(raw(frames.HEADERS, 5, 0x80000001, get_block(enc)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]


def test_4_2_frame_larger_than_max_frame_size_is_a_frame_size_error():
    proto, _, _enc = started()
    out = proto.receive(raw(frames.DATA, 0, 1, b"x" * 16385))
    assert goaway_code(out) == FRAME_SIZE_ERROR
    assert proto.closing


def test_4_2_larger_frames_accepted_up_to_the_configured_size():
    proto, rules, enc = started(H2Config(max_frame_size=32768))
    block = get_block(enc, [*REQUEST, (b"content-length", b"20000")])
    out = proto.receive(headers(1, block, end_stream=False) + data(1, b"x" * 20000, True))
    assert rules.answered == 1 and goaway(out) is None


def test_4_3_undecodable_header_block_is_a_compression_error():
    proto, _, _ = started()
    out = proto.receive(raw(frames.HEADERS, 5, 1, b"\x40"))  # literal, no name length
    assert goaway_code(out) == COMPRESSION_ERROR


def test_4_3_header_block_must_be_contiguous():
    proto, _, enc = started()
    block = get_block(enc)
    out = proto.receive(
        headers(1, block[:3], end_headers=False) + PingFrame(0, b"12345678").serialize()
    )
    assert goaway_code(out) == PROTOCOL_ERROR


# -- §5.1 stream states ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        data(1, b"x"),
        raw(frames.RST_STREAM, 0, 1, u32(8)),
        raw(frames.WINDOW_UPDATE, 0, 1, u32(1)),
        raw(frames.CONTINUATION, 4, 1, b""),
    ],
    ids=["DATA", "RST_STREAM", "WINDOW_UPDATE", "CONTINUATION"],
)
def test_5_1_idle_stream_frames_other_than_headers_priority_are_protocol_errors(frame):
    proto, _, _ = started()
    assert goaway_code(proto.receive(frame)) == PROTOCOL_ERROR


def test_5_1_priority_on_an_idle_stream_is_allowed():
    proto, rules, enc = started()
    out = proto.receive(raw(frames.PRIORITY, 0, 3, u32(0) + b"\x10"))
    assert out == b"" and not proto.closing
    out = proto.receive(headers(1, get_block(enc)) + headers(3, get_block(enc)))
    assert rules.answered == 2


def test_5_1_half_closed_remote_data_is_a_stream_error_stream_closed():
    # A request answered but whose DATA is held by flow control is half-closed (remote).
    proto, _, enc = started(values={frames.SETTINGS_INITIAL_WINDOW_SIZE: 0})
    out = proto.receive(headers(1, get_block(enc)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]
    out = proto.receive(data(1, b"late"))
    assert resets(out) == {1: STREAM_CLOSED}
    assert not proto.closing


def test_5_1_closed_stream_data_is_stream_closed():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc)))
    out = proto.receive(data(1, b"x"))
    assert resets(out) == {1: STREAM_CLOSED}


def test_5_1_closed_stream_headers_is_a_connection_error_stream_closed():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc)))
    out = proto.receive(headers(1, get_block(enc)))
    assert goaway_code(out) == STREAM_CLOSED


def test_5_1_closed_stream_window_update_rst_and_priority_are_ignored():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc)))
    out = proto.receive(
        raw(frames.WINDOW_UPDATE, 0, 1, u32(10))
        + raw(frames.RST_STREAM, 0, 1, u32(8))
        + raw(frames.PRIORITY, 0, 1, u32(0) + b"\x01")
    )
    assert out == b"" and not proto.closing


def test_5_1_frames_after_our_rst_stream_are_discarded():
    proto, _, enc = started()
    # A malformed request (uppercase name) is reset; its DATA that was in flight is dropped.
    block = get_block(enc, [*REQUEST, (b"X-Upper", b"1")])
    out = proto.receive(headers(1, block, end_stream=False))
    assert resets(out) == {1: PROTOCOL_ERROR}
    out = proto.receive(data(1, b"x" * 100) + data(1, b"", end_stream=True))
    assert out == b"" and not proto.closing


def test_5_1_received_rst_stream_closes_the_stream_without_an_answer():
    proto, rules, enc = started()
    out = proto.receive(
        headers(1, get_block(enc, [*REQUEST, (b"content-length", b"3")]), end_stream=False)
        + raw(frames.RST_STREAM, 0, 1, u32(8))
    )
    assert out == b"" and rules.answered == 0
    assert proto.idle()


# -- §5.1.1 stream identifiers --------------------------------------------------------------


def test_5_1_1_even_stream_id_from_a_client_is_a_protocol_error():
    proto, _, enc = started()
    assert goaway_code(proto.receive(headers(2, get_block(enc)))) == PROTOCOL_ERROR


def test_5_1_1_decreasing_stream_id_is_a_protocol_error():
    proto, _, enc = started()
    proto.receive(headers(5, get_block(enc)))
    assert goaway_code(proto.receive(headers(3, get_block(enc)))) == PROTOCOL_ERROR


def test_5_1_1_skipped_ids_are_closed():
    proto, rules, enc = started()
    out = proto.receive(headers(1, get_block(enc)) + headers(7, get_block(enc)))
    assert rules.answered == 2 and goaway(out) is None


# -- §5.1.2 concurrency ---------------------------------------------------------------------


def test_5_1_2_streams_beyond_max_concurrent_streams_are_refused():
    proto, rules, enc = started(H2Config(max_concurrent_streams=2))
    body = [*REQUEST, (b"content-length", b"1")]
    out = proto.receive(
        b"".join(headers(s, get_block(enc, body), end_stream=False) for s in (1, 3, 5))
    )
    assert resets(out) == {5: REFUSED_STREAM}
    assert rules.rejected == 1
    # Finishing one makes room again.
    out = proto.receive(data(1, b"x", True) + headers(7, get_block(enc)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1, 7]


# -- §5.3.1 self-dependency -----------------------------------------------------------------


def test_5_3_1_headers_depending_on_itself_is_a_stream_error():
    proto, _, enc = started()
    out = proto.receive(headers(1, get_block(enc), depends_on=1) + headers(3, get_block(enc)))
    assert resets(out) == {1: PROTOCOL_ERROR}
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [3]


def test_5_3_1_priority_depending_on_itself_is_a_stream_error():
    proto, _, _ = started()
    out = proto.receive(raw(frames.PRIORITY, 0, 1, u32(1) + b"\x10"))
    assert resets(out) == {1: PROTOCOL_ERROR}
    assert not proto.closing


# -- §5.4.1 connection errors ---------------------------------------------------------------


def test_5_4_1_connection_error_sends_goaway_with_the_last_stream_and_closes():
    proto, rules, enc = started()
    proto.receive(headers(1, get_block(enc)) + headers(3, get_block(enc)))
    out = proto.receive(raw(frames.PING, 0, 1, b"12345678"))
    frame = goaway(out)
    assert frame.last_stream_id == 3 and frame.error_code == PROTOCOL_ERROR
    assert proto.closing and not proto.clean
    assert rules.rejected == 1


# -- §6.1 DATA ------------------------------------------------------------------------------


def test_6_1_data_on_stream_0_is_a_protocol_error():
    proto, _, _ = started()
    assert goaway_code(proto.receive(data(0, b"x"))) == PROTOCOL_ERROR


def test_6_1_padding_as_long_as_the_payload_is_a_protocol_error():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(raw(frames.DATA, frames.FLAG_PADDED, 1, b"\x04abc"))
    assert goaway_code(out) == PROTOCOL_ERROR


def test_6_1_padded_data_is_accepted_and_padding_is_not_content():
    proto, rules, enc = started()
    block = get_block(enc, [*REQUEST, (b"content-length", b"4")])
    out = proto.receive(headers(1, block, end_stream=False) + data(1, b"abcd", True, pad=10))
    assert rules.answered == 1 and not resets(out)


# -- §6.2 HEADERS ---------------------------------------------------------------------------


def test_6_2_headers_on_stream_0_is_a_protocol_error():
    proto, _, enc = started()
    assert goaway_code(proto.receive(raw(frames.HEADERS, 5, 0, get_block(enc)))) == PROTOCOL_ERROR


def test_6_2_padded_headers_with_priority_are_answered():
    proto, _, enc = started()
    out = proto.receive(headers(1, get_block(enc), pad=7, depends_on=0))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]


def test_6_2_headers_padding_too_long_is_a_protocol_error():
    proto, _, enc = started()
    block = get_block(enc)
    out = proto.receive(
        raw(frames.HEADERS, 5 | frames.FLAG_PADDED, 1, bytes((len(block) + 1,)) + block)
    )
    assert goaway_code(out) == PROTOCOL_ERROR


# -- §6.3 PRIORITY --------------------------------------------------------------------------


def test_6_3_priority_with_a_wrong_length_is_a_stream_frame_size_error():
    proto, _, _ = started()
    out = proto.receive(raw(frames.PRIORITY, 0, 1, b"\0\0\0\0"))
    assert resets(out) == {1: FRAME_SIZE_ERROR}
    assert not proto.closing


def test_6_3_priority_on_stream_0_is_a_protocol_error():
    proto, _, _ = started()
    assert goaway_code(proto.receive(raw(frames.PRIORITY, 0, 0, u32(1) + b"\0"))) == PROTOCOL_ERROR


# -- §6.4 RST_STREAM ------------------------------------------------------------------------


def test_6_4_rst_stream_on_stream_0_is_a_protocol_error():
    proto, _, _ = started()
    assert goaway_code(proto.receive(raw(frames.RST_STREAM, 0, 0, u32(0)))) == PROTOCOL_ERROR


def test_6_4_rst_stream_with_a_wrong_length_is_a_frame_size_error():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    assert goaway_code(proto.receive(raw(frames.RST_STREAM, 0, 1, b"\0\0\0"))) == FRAME_SIZE_ERROR


# -- §6.5 SETTINGS --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw(frames.SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
        (raw(frames.SETTINGS, 0, 0, b"\0\0\0"), FRAME_SIZE_ERROR),
        (raw(frames.SETTINGS, 1, 0, b"\0\x01\0\0\0\0"), FRAME_SIZE_ERROR),
        (raw(frames.SETTINGS, 0, 0, b"\0\x02" + u32(2)), PROTOCOL_ERROR),
        (raw(frames.SETTINGS, 0, 0, b"\0\x04" + u32(2**31)), FLOW_CONTROL_ERROR),
        (raw(frames.SETTINGS, 0, 0, b"\0\x05" + u32(16383)), PROTOCOL_ERROR),
        (raw(frames.SETTINGS, 0, 0, b"\0\x05" + u32(2**24)), PROTOCOL_ERROR),
    ],
    ids=[
        "on-a-stream",
        "length-not-multiple-of-6",
        "ack-with-payload",
        "enable-push-2",
        "initial-window-too-large",
        "max-frame-size-too-small",
        "max-frame-size-too-large",
    ],
)
def test_6_5_invalid_settings_are_connection_errors(frame, code):
    proto, _, _ = started()
    assert goaway_code(proto.receive(frame)) == code


def test_6_5_unknown_settings_are_ignored_and_acknowledged():
    proto, _, _ = started()
    out = parse(proto.receive(raw(frames.SETTINGS, 0, 0, b"\x00\x99" + u32(5))))
    assert len(out) == 1 and isinstance(out[0], SettingsFrame) and "ACK" in out[0].flags


def test_6_5_settings_ack_from_the_client_is_accepted():
    proto, _, _ = started()
    assert proto.receive(raw(frames.SETTINGS, frames.FLAG_ACK, 0)) == b""


def test_6_5_2_our_data_frames_stay_within_16384_whatever_the_peer_allows():
    big = Answer(body=b"z" * 40000)
    proto, _ = make(answer=big)
    proto.receive(client_start({frames.SETTINGS_MAX_FRAME_SIZE: 20000}))
    # Open the connection window so only the frame size limits.
    out = proto.receive(
        raw(frames.WINDOW_UPDATE, 0, 0, u32(100000)) + headers(1, encoder().encode(REQUEST))
    )
    sizes = [len(f.data) for f in parse(out) if isinstance(f, DataFrame)]
    assert sizes == [16384, 16384, 40000 - 2 * 16384]


# -- §6.7 PING ------------------------------------------------------------------------------


def test_6_7_ping_is_answered_with_an_ack_and_the_same_payload():
    proto, _, _ = started()
    out = parse(proto.receive(PingFrame(0, b"abcdefgh").serialize()))
    assert len(out) == 1 and "ACK" in out[0].flags and out[0].opaque_data == b"abcdefgh"


def test_6_7_ping_ack_is_not_answered():
    proto, _, _ = started()
    assert proto.receive(raw(frames.PING, frames.FLAG_ACK, 0, b"abcdefgh")) == b""


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (raw(frames.PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
        (raw(frames.PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
    ],
    ids=["on-a-stream", "length-not-8"],
)
def test_6_7_invalid_ping_is_a_connection_error(frame, code):
    proto, _, _ = started()
    assert goaway_code(proto.receive(frame)) == code


# -- §6.8 GOAWAY ----------------------------------------------------------------------------


def test_6_8_client_goaway_finishes_open_streams_then_closes():
    proto, _, enc = started()
    block = get_block(enc, [*REQUEST, (b"content-length", b"2")])
    out = proto.receive(headers(1, block, end_stream=False) + GoAwayFrame(0, 0, 0).serialize())
    assert not proto.closing
    out = proto.receive(data(1, b"ab", True))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]
    assert proto.closing


def test_6_8_client_goaway_with_an_error_closes_at_once():
    proto, _, _ = started()
    out = proto.receive(GoAwayFrame(0, 0, PROTOCOL_ERROR).serialize())
    assert out == b"" and proto.closing


def test_6_8_goaway_length_and_stream_are_checked():
    proto, _, _ = started()
    assert goaway_code(proto.receive(raw(frames.GOAWAY, 0, 0, b"\0" * 7))) == FRAME_SIZE_ERROR
    proto, _, _ = started()
    assert goaway_code(proto.receive(raw(frames.GOAWAY, 0, 1, b"\0" * 8))) == PROTOCOL_ERROR


def test_6_8_shutdown_sends_goaway_finishes_earlier_streams_ignores_later_ones():
    proto, rules, enc = started()
    block = get_block(enc, [*REQUEST, (b"content-length", b"2")])
    proto.receive(headers(1, block, end_stream=False))
    out = proto.shutdown()
    frame = goaway(out)
    assert frame.error_code == NO_ERROR and frame.last_stream_id == 1
    assert not proto.closing and not proto.idle()
    out = proto.receive(headers(3, get_block(enc)) + data(1, b"ab", True))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]
    assert proto.closing and rules.answered == 1


def test_6_8_shutdown_of_an_idle_connection_closes_at_once():
    proto, _, _ = started()
    out = proto.shutdown()
    assert goaway(out).last_stream_id == 0 and proto.closing


def test_6_8_max_requests_sends_goaway_after_the_last_answer():
    proto, rules, enc = started()
    rules.open_until = 2
    out = proto.receive(b"".join(headers(s, get_block(enc)) for s in (1, 3, 5, 7)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1, 3]
    frame = goaway(out)
    assert frame.last_stream_id == 3 and frame.error_code == NO_ERROR
    assert proto.closing and rules.answered == 2


# -- §6.9 WINDOW_UPDATE and flow control ----------------------------------------------------


def test_6_9_zero_increment_on_the_connection_is_a_protocol_error():
    proto, _, _ = started()
    assert goaway_code(proto.receive(raw(frames.WINDOW_UPDATE, 0, 0, u32(0)))) == PROTOCOL_ERROR


def test_6_9_zero_increment_on_a_stream_is_a_stream_error():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(raw(frames.WINDOW_UPDATE, 0, 1, u32(0)))
    assert resets(out) == {1: PROTOCOL_ERROR} and not proto.closing


def test_6_9_window_update_length_is_checked():
    proto, _, _ = started()
    assert (
        goaway_code(proto.receive(raw(frames.WINDOW_UPDATE, 0, 0, b"\0\0\0"))) == FRAME_SIZE_ERROR
    )


def test_6_9_1_connection_window_overflow_is_a_flow_control_error():
    proto, _, _ = started()
    out = proto.receive(raw(frames.WINDOW_UPDATE, 0, 0, u32(2**31 - 1)))
    assert goaway_code(out) == FLOW_CONTROL_ERROR


def test_6_9_1_stream_window_overflow_is_a_stream_error():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(raw(frames.WINDOW_UPDATE, 0, 1, u32(2**31 - 1)))
    assert resets(out) == {1: FLOW_CONTROL_ERROR} and not proto.closing


def test_6_9_1_data_beyond_our_stream_window_is_a_stream_flow_control_error():
    proto, _, enc = started(H2Config(initial_window_size=16384, max_frame_size=32768))
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(data(1, b"x" * 16385))
    assert resets(out) == {1: FLOW_CONTROL_ERROR}
    assert not proto.closing


def test_6_9_1_data_beyond_the_connection_window_is_a_flow_control_error():
    proto, _, enc = started(H2Config(initial_window_size=2**20, max_frame_size=2**17))
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(data(1, b"x" * 65536))
    assert goaway_code(out) == FLOW_CONTROL_ERROR


def test_6_9_1_our_data_waits_for_the_stream_window():
    client = Client(local_settings={frames.SETTINGS_INITIAL_WINDOW_SIZE: 2}, auto_ack=False)
    client.exchange()
    sid = client.request(send=True)
    assert client.responses[sid].body == b"Vr" and not client.responses[sid].ended
    assert not client.proto.idle()
    client.conn.increment_flow_control_window(2, sid)
    client.exchange()
    assert client.responses[sid].body == b"Vryp"
    client.conn.increment_flow_control_window(10, sid)
    client.exchange()
    assert client.responses[sid].body == b"Vrypt" and client.responses[sid].ended
    assert client.proto.idle()


def test_6_9_1_our_data_waits_for_the_connection_window():
    proto, _ = make(answer=Answer(body=b"b" * 40000))
    client = Client(proto, auto_ack=False)
    client.exchange()
    sids = [client.request() for _ in range(3)]
    client.exchange()
    # 65535 bytes of connection window: the first stream whole, the second partly.
    sent = {sid: len(client.responses[sid].body) for sid in sids if sid in client.responses}
    assert sum(sent.values()) == 65535
    client.conn.increment_flow_control_window(60000)
    for sid in sids:
        if not client.responses.get(sid, None) or not client.responses[sid].ended:
            client.conn.increment_flow_control_window(60000, sid)
    client.exchange()
    assert all(client.responses[sid].ended for sid in sids)
    assert all(client.responses[sid].body == b"b" * 40000 for sid in sids)


def test_6_9_2_initial_window_size_change_applies_to_held_streams():
    client = Client(local_settings={frames.SETTINGS_INITIAL_WINDOW_SIZE: 0}, auto_ack=False)
    client.exchange()
    sid = client.request(send=True)
    assert client.responses[sid].body == b""
    client.conn.update_settings({frames.SETTINGS_INITIAL_WINDOW_SIZE: 100})
    client.exchange()
    assert client.responses[sid].body == b"Vrypt" and client.responses[sid].ended


def test_6_9_2_window_can_go_negative_and_recover():
    proto, _ = make(answer=Answer(body=b"q" * 100))
    proto.receive(client_start({frames.SETTINGS_INITIAL_WINDOW_SIZE: 60}))
    out = proto.receive(headers(1, encoder().encode(REQUEST)))
    assert sum(len(f.data) for f in parse(out) if isinstance(f, DataFrame)) == 60
    out = proto.receive(settings_frame({frames.SETTINGS_INITIAL_WINDOW_SIZE: 10}))  # -50
    out += proto.receive(raw(frames.WINDOW_UPDATE, 0, 1, u32(49)))  # still -1
    assert sum(len(f.data) for f in parse(out) if isinstance(f, DataFrame)) == 0
    out = proto.receive(raw(frames.WINDOW_UPDATE, 0, 1, u32(41)))  # +40
    assert sum(len(f.data) for f in parse(out) if isinstance(f, DataFrame)) == 40
    assert proto.idle()


def test_6_9_request_bodies_never_stall_the_client():
    """3 MB uploaded through 64 KiB windows: the client only sends what its windows allow, so
    it finishes only if we keep giving credit back."""
    client = Client()
    client.exchange()
    sid = client.request(b"POST", end_stream=False)
    body = b"u" * 3_000_000
    pos = 0
    while pos < len(body):
        window = min(
            client.conn.local_flow_control_window(sid), client.conn.max_outbound_frame_size
        )
        assert window > 0, f"client stalled after {pos} bytes"
        chunk = body[pos : pos + window]
        pos += len(chunk)
        client.conn.send_data(sid, chunk, end_stream=pos == len(body))
        client.exchange()
    assert client.responses[sid].ended and client.responses[sid].body == b"Vrypt"


# -- §6.10 CONTINUATION ---------------------------------------------------------------------


def test_6_10_header_block_in_continuation_frames_is_answered():
    proto, _, enc = started()
    block = get_block(enc, [*REQUEST, (b"x-long", b"v" * 100)])
    out = proto.receive(
        headers(1, block[:5], end_headers=False)
        + raw(frames.CONTINUATION, 0, 1, block[5:20])
        + raw(frames.CONTINUATION, 0, 1, b"")
        + raw(frames.CONTINUATION, frames.FLAG_END_HEADERS, 1, block[20:])
    )
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]


def test_6_10_continuation_on_another_stream_is_a_protocol_error():
    proto, _, enc = started()
    block = get_block(enc)
    out = proto.receive(
        headers(1, block[:5], end_headers=False) + raw(frames.CONTINUATION, 4, 3, block[5:])
    )
    assert goaway_code(out) == PROTOCOL_ERROR


def test_6_10_continuation_without_headers_is_a_protocol_error():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc)))
    assert goaway_code(proto.receive(raw(frames.CONTINUATION, 4, 1, b"\x82"))) == PROTOCOL_ERROR


# -- §8.1 HTTP message framing --------------------------------------------------------------


def test_8_1_trailers_end_the_request():
    client = Client()
    client.exchange()
    sid = client.request(b"POST", end_stream=False)
    client.conn.send_data(sid, b"body")
    client.conn.send_headers(sid, [(b"x-checksum", b"1")], end_stream=True)
    client.exchange()
    assert client.responses[sid].ended


def test_8_1_trailers_without_end_stream_are_malformed():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(headers(1, enc.encode([(b"x-t", b"1")]), end_stream=False))
    assert resets(out) == {1: PROTOCOL_ERROR}


def test_8_1_trailers_with_pseudo_headers_are_malformed():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(headers(1, enc.encode([(b":path", b"/")])))
    assert resets(out) == {1: PROTOCOL_ERROR}


@pytest.mark.parametrize(("declared", "sent"), [(b"5", b"abc"), (b"2", b"abc"), (b"3", b"")])
def test_8_1_1_content_length_must_match_the_data(declared, sent):
    proto, rules, enc = started()
    block = get_block(enc, [*REQUEST, (b"content-length", declared)])
    if sent:
        frames_in = headers(1, block, end_stream=False) + data(1, sent, True)
    else:
        frames_in = headers(1, block)
    out = proto.receive(frames_in)
    assert resets(out) == {1: PROTOCOL_ERROR}
    assert rules.answered == 0 and rules.rejected == 1 and not proto.closing


def test_8_1_1_content_length_matching_data_is_answered():
    proto, rules, enc = started()
    block = get_block(enc, [*REQUEST, (b"content-length", b"6")])
    proto.receive(headers(1, block, end_stream=False) + data(1, b"abc") + data(1, b"def", True))
    assert rules.answered == 1


# -- §8.2 fields ----------------------------------------------------------------------------


MALFORMED = {
    "uppercase-name": [*REQUEST, (b"X-Upper", b"1")],
    "space-in-name": [*REQUEST, (b"x y", b"1")],
    "colon-in-name": [*REQUEST, (b"x:y", b"1")],
    "empty-name": [*REQUEST, (b"", b"1")],
    "nul-in-value": [*REQUEST, (b"x", b"a\0b")],
    "cr-in-value": [*REQUEST, (b"x", b"a\rb")],
    "lf-in-value": [*REQUEST, (b"x", b"a\nb")],
    "leading-space": [*REQUEST, (b"x", b" a")],
    "trailing-tab": [*REQUEST, (b"x", b"a\t")],
    "connection": [*REQUEST, (b"connection", b"keep-alive")],
    "keep-alive": [*REQUEST, (b"keep-alive", b"5")],
    "proxy-connection": [*REQUEST, (b"proxy-connection", b"x")],
    "transfer-encoding": [*REQUEST, (b"transfer-encoding", b"chunked")],
    "upgrade": [*REQUEST, (b"upgrade", b"h2c")],
    "te-gzip": [*REQUEST, (b"te", b"gzip")],
    "content-length-letters": [*REQUEST, (b"content-length", b"1a")],
    "content-length-differ": [*REQUEST, (b"content-length", b"1"), (b"content-length", b"2")],
    "unknown-pseudo": [*REQUEST, (b":foo", b"1")],
    "response-pseudo": [*REQUEST, (b":status", b"200")],
    "pseudo-after-regular": [*REQUEST[:3], (b"x", b"1"), REQUEST[3]],
    "duplicate-pseudo": [*REQUEST, (b":path", b"/again")],
    "no-method": REQUEST[1:],
    "no-scheme": [REQUEST[0], *REQUEST[2:]],
    "no-path": REQUEST[:3],
    "empty-path": [*REQUEST[:3], (b":path", b"")],
    "protocol-pseudo": [*REQUEST, (b":protocol", b"websocket")],
    "connect-without-authority": [(b":method", b"CONNECT")],
    "connect-with-path": [(b":method", b"CONNECT"), (b":authority", b"e:1"), (b":path", b"/")],
}


@pytest.mark.parametrize("fields", MALFORMED.values(), ids=MALFORMED.keys())
def test_8_2_and_8_3_malformed_requests_are_stream_errors(fields):
    proto, rules, enc = started()
    out = proto.receive(headers(1, get_block(enc, fields)) + headers(3, get_block(enc)))
    assert resets(out) == {1: PROTOCOL_ERROR}
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [3]
    assert rules.rejected == 1 and rules.answered == 1


VALID = {
    "te-trailers": [*REQUEST, (b"te", b"trailers")],
    "options-star": [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*")],
    "unknown-method": [(b":method", b"FOO"), *REQUEST[1:]],
    "content-length-list": [*REQUEST, (b"content-length", b"0, 0")],
    "cookie-crumbs": [*REQUEST, (b"cookie", b"a=1"), (b"cookie", b"b=2")],
    "empty-value": [*REQUEST, (b"x-empty", b"")],
    "inner-space": [*REQUEST, (b"x", b"a b")],
    "obs-text-value": [*REQUEST, (b"x", b"caf\xc3\xa9")],
}


@pytest.mark.parametrize("fields", VALID.values(), ids=VALID.keys())
def test_8_2_and_8_3_valid_requests_are_answered(fields):
    proto, rules, enc = started()
    out = proto.receive(headers(1, get_block(enc, fields)))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [1]
    assert rules.answered == 1 and rules.rejected == 0


def test_8_5_connect_is_answered_at_once_without_content_length_and_body_discarded():
    client = Client()
    client.exchange()
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"example:443")])
    client.exchange()
    response = client.responses[sid]
    assert response.ended and response.body == b"Vrypt"
    assert b"content-length" not in dict(response.headers)
    assert client.rules.answered == 1
    client.conn.send_data(sid, b"tunnel bytes", end_stream=True)
    client.exchange()
    assert client.proto.idle() and client.rules.answered == 1


# -- answers --------------------------------------------------------------------------------


def test_answer_has_the_http1_fields_lowercased():
    client = Client()
    client.exchange()
    sid = client.request(send=True)
    got = client.responses[sid]
    http1 = response.render(response.http_date(int(NOW)))[0]
    head, _, body = http1.partition(b"\r\n\r\n")
    fields = [line.split(b": ", 1) for line in head.split(b"\r\n")[1:]]
    expected = [(b":status", b"200")] + [(name.lower(), value) for name, value in fields]
    assert got.headers == expected
    assert got.body == body == b"Vrypt"


def test_head_gets_the_same_fields_and_no_data():
    client = Client()
    client.exchange()
    get = client.request(send=True)
    head = client.request(b"HEAD", send=True)
    assert client.responses[head].headers == client.responses[get].headers
    assert client.responses[head].body == b"" and client.responses[head].ended
    frames_out = parse(client.outputs[-1])
    assert [type(f) for f in frames_out] == [HeadersFrame]


def test_operator_answer_status_fields_and_body():
    answer = Answer(
        status=503,
        reason=b"Busy",
        body=b"later",
        content_type=b"text/x",
        headers=(b"Retry-After: 5", b"X-Thing: a b"),
    )
    proto, _ = make(answer=answer)
    client = Client(proto)
    client.exchange()
    sid = client.request(send=True)
    got = client.responses[sid]
    assert got.headers[0] == (b":status", b"503")
    fields = dict(got.headers)
    assert fields[b"retry-after"] == b"5" and fields[b"x-thing"] == b"a b"
    assert fields[b"content-type"] == b"text/x" and fields[b"content-length"] == b"5"
    assert got.body == b"later"


def test_no_content_answer_has_no_data_and_no_content_length():
    proto, _ = make(answer=Answer(status=204, reason=b"No Content", body=b"", content_type=None))
    client = Client(proto)
    client.exchange()
    sid = client.request(send=True)
    assert client.responses[sid].ended and client.responses[sid].body == b""
    assert b"content-length" not in dict(client.responses[sid].headers)


def test_large_answer_header_block_goes_in_continuation_frames():
    many = tuple(b"X-F%d: %s" % (n, b"v" * 200) for n in range(100))
    proto, _ = make(answer=Answer(headers=many))
    client = Client(proto)
    client.exchange()
    sid = client.request(send=True)
    assert len(client.responses[sid].headers) == 105
    kinds = [type(f).__name__ for f in parse(client.outputs[-1])]
    assert "ContinuationFrame" in kinds


def test_date_is_rendered_again_each_second():
    answers = H2Answers(NOW)
    proto = H2Protocol(H2Config(), _rules(), answers)
    client = Client(proto)
    client.exchange()
    first = client.request(send=True)
    assert answers.refresh(NOW + 1.5) and not answers.refresh(NOW + 1.7)
    second = client.request(send=True)
    dates = [dict(client.responses[s].headers)[b"date"] for s in (first, second)]
    assert dates[0] != dates[1]
    assert dates[1] == response.http_date(int(NOW + 1))


def test_concurrent_streams_in_one_read_are_answered_in_one_write():
    client = Client()
    client.exchange()
    sids = [client.request() for _ in range(10)]
    client.exchange()
    assert all(client.responses[s].ended and client.responses[s].body == b"Vrypt" for s in sids)
    assert len(client.outputs) == 2  # the preface exchange, then one write for ten answers
    assert client.rules.answered == 10


def test_counters_answered_and_rejected():
    proto, rules, enc = started()
    proto.receive(headers(1, get_block(enc)) + headers(3, get_block(enc, [*REQUEST, (b"A", b"1")])))
    assert (rules.answered, rules.rejected) == (1, 1)


# -- timeouts and the transport seam --------------------------------------------------------


def test_idle_timeout_sends_goaway_and_closes():
    proto, _, enc = started(H2Config(idle_timeout=5))
    proto.receive(headers(1, get_block(enc)))
    assert proto.idle()
    assert proto.tick(100.0) == b""
    assert proto.tick(104.0) == b""
    out = proto.tick(105.0)
    assert goaway(out).error_code == NO_ERROR and goaway(out).last_stream_id == 1
    assert proto.closing


def test_head_timeout_for_a_stalled_partial_frame():
    proto, _, enc = started(H2Config(head_timeout=10, idle_timeout=1000))
    frame = headers(1, get_block(enc))
    proto.receive(frame[:5])
    assert not proto.idle()
    assert proto.tick(0.0) == b""
    proto.receive(frame[5:6])  # trickled bytes do not restart the budget
    assert proto.tick(9.0) == b""
    assert goaway(proto.tick(10.0)) is not None and proto.closing


def test_head_timeout_for_a_continuation_trickle():
    proto, _, enc = started(H2Config(head_timeout=10, idle_timeout=1000))
    proto.receive(headers(1, get_block(enc)[:2], end_headers=False))
    proto.tick(0.0)
    for second in range(1, 10):
        proto.receive(raw(frames.CONTINUATION, 0, 1, b""))
        assert proto.tick(float(second)) == b""
    assert goaway(proto.tick(10.0)) is not None


def test_eof_closes_cleanly():
    proto, _, _ = started()
    assert proto.eof() == b"" and proto.closing and proto.clean


def test_writable_releases_output_held_past_the_budget():
    proto, _ = make(answer=Answer(body=b"w" * 1_000_000))
    proto.receive(client_start({frames.SETTINGS_INITIAL_WINDOW_SIZE: 2**31 - 1}))
    proto.receive(raw(frames.WINDOW_UPDATE, 0, 0, u32(2**31 - 1 - 65535)))
    enc = encoder()
    out = proto.receive(b"".join(headers(s, get_block(enc)) for s in (1, 3, 5)))
    total = sum(len(f.data) for f in parse(out) if isinstance(f, DataFrame))
    assert total <= 256 * 1024
    rounds = 0
    while not proto.idle():
        more = proto.writable()
        assert more
        total += sum(len(f.data) for f in parse(more) if isinstance(f, DataFrame))
        rounds += 1
    assert total == 3_000_000 and rounds > 5


# -- more of §6, §8 and the seam ------------------------------------------------------------


def test_6_6_push_promise_from_a_client_is_a_protocol_error():
    proto, _, enc = started()
    out = proto.receive(raw(frames.PUSH_PROMISE, 4, 1, u32(2) + get_block(enc)))
    assert goaway_code(out) == PROTOCOL_ERROR


def test_8_1_trailers_above_the_header_list_limit_get_431():
    proto, rules, enc = started(H2Config(max_header_list_size=1024))
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(headers(1, enc.encode([(b"x-t", b"v" * 1200)])))
    answer = [f for f in parse(out) if isinstance(f, HeadersFrame)]
    assert len(answer) == 1 and b"431" in answer[0].data
    assert (rules.answered, rules.rejected) == (1, 1)


def test_5_3_1_trailers_depending_on_their_own_stream_are_a_stream_error():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    out = proto.receive(headers(1, enc.encode([(b"x-t", b"1")]), depends_on=1))
    assert resets(out) == {1: PROTOCOL_ERROR}


def test_6_8_later_goaway_never_names_a_higher_stream():
    proto, _, enc = started()
    proto.receive(headers(1, get_block(enc), end_stream=False))
    first = goaway(proto.shutdown())
    out = proto.receive(headers(3, get_block(enc)) + raw(frames.PING, 0, 1, b"12345678"))
    second = goaway(out)
    assert first.last_stream_id == second.last_stream_id == 1
    assert second.error_code == PROTOCOL_ERROR


def test_config_from_gunicorn_settings():
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("http2_max_concurrent_streams", "7")
    cfg.set("http2_initial_window_size", "1000")
    cfg.set("http2_max_frame_size", "32768")
    cfg.set("http2_max_header_list_size", "0")
    cfg.set("keepalive", "9")
    config = H2Config.from_gunicorn(cfg, head_timeout=3)
    assert (config.max_concurrent_streams, config.initial_window_size) == (7, 1000)
    assert (config.max_frame_size, config.max_header_list_size) == (32768, 0)
    assert (config.idle_timeout, config.head_timeout) == (9, 3)
    assert config.header_list_limit == 256 * 1024
    proto, _ = make(config)
    sent = parse(proto.start())[0].settings
    assert frames.SETTINGS_MAX_HEADER_LIST_SIZE not in sent  # 0: "unlimited" is not advertised


def test_wants_writable_when_a_call_used_its_output_budget():
    proto, _ = make(answer=Answer(body=b"w" * 300_000))
    proto.receive(client_start({frames.SETTINGS_INITIAL_WINDOW_SIZE: 2**31 - 1}))
    proto.receive(raw(frames.WINDOW_UPDATE, 0, 0, u32(2**31 - 1 - 65535)))
    proto.receive(headers(1, encoder().encode(REQUEST)))
    assert proto.wants_writable and not proto.idle()
    # A transport that never calls writable() still gets the rest with the next read.
    out = proto.receive(PingFrame(0, b"12345678").serialize())
    assert sum(len(f.data) for f in parse(out) if isinstance(f, DataFrame)) == 300_000 - 256 * 1024
    assert not proto.wants_writable and proto.idle()


def test_prior_knowledge_constructor_takes_the_bytes_already_read():
    enc = encoder()
    proto, out = H2Protocol.prior_knowledge(
        H2Config(), _rules(), H2Answers(NOW), client_start() + headers(1, get_block(enc))
    )
    kinds = [type(f) for f in parse(out)]
    assert kinds == [SettingsFrame, SettingsFrame, HeadersFrame, DataFrame]
    proto, out = H2Protocol.prior_knowledge(H2Config(), _rules(), H2Answers(NOW), b"PRI * HT")
    assert [type(f) for f in parse(out)] == [SettingsFrame] and not proto.closing
    assert proto.receive(b"TP/2.0\r\n\r\nSM\r\n\r\n" + settings_frame()) != b""


def test_connection_specific_answer_fields_are_dropped():
    proto, _ = make(answer=Answer(headers=(b"Connection: close", b"Keep-Alive: 5", b"X-Ok: 1")))
    client = Client(proto)
    client.exchange()
    sid = client.request(send=True)
    names = [name for name, _ in client.responses[sid].headers]
    assert b"x-ok" in names and b"connection" not in names and b"keep-alive" not in names


def test_expect_100_continue_gets_an_interim_100_then_the_answer():
    client = Client()
    client.exchange()
    sid = client.request(b"POST", [(b"expect", b"100-continue")], end_stream=False)
    events = client.exchange()
    interim = [e for e in events if isinstance(e, h2.events.InformationalResponseReceived)]
    assert len(interim) == 1 and interim[0].headers == [(b":status", b"100")]
    assert sid not in client.responses
    client.conn.send_data(sid, b"body", end_stream=True)
    client.exchange()
    assert client.responses[sid].ended and client.responses[sid].body == b"Vrypt"


def test_5_5_unknown_frame_in_the_middle_of_a_header_block_is_a_protocol_error():
    proto, _, enc = started()
    block = get_block(enc)
    out = proto.receive(
        headers(1, block[:2], end_headers=False)
        + raw(0xAB, 0, 1, b"ext")
        + raw(frames.CONTINUATION, 4, 1, block[2:])
    )
    assert goaway_code(out) == PROTOCOL_ERROR


def test_6_9_2_initial_window_change_that_overflows_a_window_is_a_flow_control_error():
    proto, _ = make(answer=Answer(body=b"o" * 100_000))
    proto.receive(client_start({frames.SETTINGS_INITIAL_WINDOW_SIZE: 10}))
    proto.receive(headers(1, encoder().encode(REQUEST)))  # 10 bytes go, the rest is held
    # The stream window to the maximum: the connection window (65525 left) lets some go.
    proto.receive(raw(frames.WINDOW_UPDATE, 0, 1, u32(2**31 - 1)))
    assert not proto.idle()  # still held, by the connection window
    out = proto.receive(settings_frame({frames.SETTINGS_INITIAL_WINDOW_SIZE: 70_000}))
    assert goaway_code(out) == FLOW_CONTROL_ERROR


def test_5_3_1_self_dependency_is_caught_on_the_fast_path_too():
    """Once a block is cached, HEADERS with PRIORITY take the fast path: a stream that depends
    on itself must still be reset, and a valid one answered."""
    proto, rules, _ = started()
    enc = encoder()
    for sid in (1, 3, 5):  # the same block from the second request on: cached
        proto.receive(headers(sid, get_block(enc), depends_on=0))
    assert rules.answered == 3
    out = proto.receive(headers(7, get_block(enc), depends_on=7))
    assert resets(out) == {7: PROTOCOL_ERROR}
    out = proto.receive(headers(9, get_block(enc), depends_on=7))
    assert [f.stream_id for f in parse(out) if isinstance(f, HeadersFrame)] == [9]
    assert rules.answered == 4

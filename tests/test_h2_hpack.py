"""HPACK decoding (RFC 7541) as the HTTP/2 core does it: exact against the RFC's examples and
against the `hpack` package's decoder, every decoding error, and the memoised verdicts."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrypt_worker.h2 import hpack_decoder as hd


def fresh(limit: int = 65536, **limits: int) -> hd.Table:
    return hd.empty_table(hd.Limits(header_list=limit, **limits))


def fields_of(table: hd.Table, block: bytes) -> tuple[list[tuple[bytes, bytes]], hd.Table]:
    fields, after, _size = hd.decode(table, block)
    return fields, after


# -- RFC 7541 Appendix C.3 and C.4: three requests on one connection ------------------------

C3 = [
    (
        "828684410f7777772e6578616d706c652e636f6d",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"www.example.com")],
        57,
    ),
    (
        "828684be58086e6f2d6361636865",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
        110,
    ),
    (
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
         (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
        164,
    ),
]  # fmt: skip
C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]


@pytest.mark.parametrize("huffman", [False, True], ids=["C.3", "C.4"])
def test_appendix_c_request_examples(huffman):
    table = fresh()
    for n, (plain, expected, size) in enumerate(C3):
        block = bytes.fromhex(C4[n] if huffman else plain)
        fields, table = fields_of(table, block)
        assert fields == expected
        assert table.size == size


# -- agreement with hpack.Decoder -----------------------------------------------------------

_name = st.sampled_from(
    [b"user-agent", b"accept", b"cookie", b"x-a", b"x-bb", b"cache-control", b"x-long-name"]
)
_value = st.binary(min_size=0, max_size=60).filter(lambda v: b"\0" not in v)
_field = st.tuples(_name, _value)
_block = st.tuples(
    st.lists(_field, min_size=1, max_size=8),
    st.booleans(),  # huffman
    st.sampled_from([None, 0, 64, 256, 4096]),  # table size update before the block
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_block, min_size=1, max_size=12))
def test_agrees_with_the_hpack_package_over_a_connection(blocks):
    encoder = hpack.Encoder()
    reference = hpack.Decoder()
    table = fresh()
    for fields, huffman, resize in blocks:
        if resize is not None:
            encoder.header_table_size = resize
        block = encoder.encode([(b":method", b"GET"), *fields], huffman=huffman)
        expected = reference.decode(block, raw=True)
        got, table = fields_of(table, block)
        assert got == [tuple(f) for f in expected]
        assert table.size == reference.header_table._current_size
        assert table.max_size == reference.header_table.maxsize


def test_h2load_request_sequence_is_cached_and_shared_between_connections():
    """Two connections whose clients encode the same requests share Table objects, and the
    steady-state block is a read-only lookup on the table."""
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8000"),
               (b":path", b"/"), (b"user-agent", b"h2load nghttp2/1.52.0")]  # fmt: skip
    tables = []
    for _ in range(2):
        encoder = hpack.Encoder()
        table = fresh()
        verdicts = []
        for _ in range(3):
            verdict, table = hd.request_verdict(table, encoder.encode(request))
            verdicts.append(verdict)
        assert verdicts == [0, 0, 0]
        tables.append(table)
    assert tables[0] is tables[1]
    second = hpack.Encoder()
    second.encode(request)
    assert second.encode(request) in tables[0].reads


def test_clearing_the_caches_changes_no_verdict():
    encoder = hpack.Encoder()
    blocks = [encoder.encode([(b":method", b"HEAD"), (b":scheme", b"http"), (b":path", b"/"),
                              (b"content-length", b"%d" % n)]) for n in range(5)]  # fmt: skip
    first = []
    table = fresh()
    for block in blocks:
        verdict, table = hd.request_verdict(table, block)
        first.append(verdict)
    hd.clear_caches()
    table = fresh()
    again = []
    for block in blocks:
        verdict, table = hd.request_verdict(table, block)
        again.append(verdict)
    assert first == again
    assert first[3] == hd.HEAD | hd.HAS_LENGTH | (3 << hd.LENGTH_SHIFT)


# -- decoding errors (COMPRESSION_ERROR) ----------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # indexed field 0 (§6.1)
        b"\xbe",  # index 62 with an empty dynamic table (§2.3.3)
        b"\xff\xff\xff\xff\xff\xff\x7f",  # integer beyond any index (§5.1)
        b"\xff",  # truncated integer
        b"\x40\x05ab",  # literal name shorter than its length (§5.2)
        b"\x00\x01a",  # literal without a value
        b"\x40",  # literal without its name length
        b"\x3f\xe2\x1f",  # table size update to 4096 + 30 + ...: above our SETTINGS (§4.2)
        b"\x82\x20",  # table size update after a field (§4.2)
        b"\x00\x81\xff\x01a",  # Huffman string with invalid padding (§5.2)
        b"\x00\x84\xff\xff\xff\xff\x01a",  # Huffman string that contains EOS (§5.2)
        b"\x00\x82\x1f\xff\x01a",  # Huffman padding longer than 7 bits (§5.2)
        b"\x00\x81\x18\x01a",  # Huffman padding that is not the EOS prefix (zeros, §5.2)
        b"\x20\xbe",  # size 0 evicts everything; index 62 is then out of range
    ],
)
def test_undecodable_blocks_are_compression_errors(block):
    with pytest.raises(hd.CompressionError):
        hd.decode(fresh(), block)


def test_entry_larger_than_the_table_empties_it():
    # §4.4: an entry bigger than the table's maximum size empties the table and is not added.
    table = fresh()
    _, table = fields_of(table, b"\x40\x01a\x01b")
    assert table.size == 34
    big = b"\x40\x01x\x7f\x82\x1f" + b"v" * 4097  # a value of 4097 bytes: 127 + 2 + 31 * 128
    fields, table = fields_of(table, big)
    assert table.size == 0 and table.entries == ()
    assert fields[0][1] == b"v" * 4097


def test_eviction_keeps_the_newest_entries():
    table = fresh()
    block = b"\x3f\xe1\x00"  # a table size update to 128 (5-bit prefix: 31, then 97)
    assert hd.decode(table, block)[1].max_size == 128
    _, table = fields_of(table, block)
    for n in range(5):
        _, table = fields_of(table, b"\x40\x01k\x01" + bytes((0x30 + n,)))  # 34 bytes each
    assert [value for _, value in table.entries] == [b"4", b"3", b"2"]
    assert table.size == 3 * 34


def test_header_list_size_above_the_limit_is_too_large_and_still_decoded():
    table = fresh(limit=200)
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x", b"v" * 150)]
    block = hpack.Encoder().encode(fields)
    verdict, after = hd.request_verdict(table, block)
    assert verdict == hd.TOO_LARGE
    assert after.entries  # the literal was inserted: the table stays right


def test_header_bomb_is_refused_before_it_is_decoded_whole():
    # One 4000-byte entry, then a block referencing it 100 times: 400 kB from 100 bytes.
    encoder = hpack.Encoder()
    insert = encoder.encode([(b"x", b"v" * 4000)])
    table = fresh(limit=65536)
    _, table = fields_of(table, insert)
    with pytest.raises(hd.HeaderBomb):
        hd.decode(table, b"\xbe" * 100)

"""HPACK decoding (RFC 7541) for a server that only needs a verdict per request.

The server's answer is constant, so of a request's header section it needs only: is it well
formed (RFC 9113 §8.2, §8.3), is it HEAD or CONNECT, what Content-Length does it declare, and is
it larger than SETTINGS_MAX_HEADER_LIST_SIZE. Decoding must still be exact, because the
decoder's dynamic table has to stay in step with the client's encoder for the rest of the
connection.

Decoding is a pure function of (dynamic table, header block) -> (verdict, next table), so it is
memoised. A `Table` is immutable: a block that inserts entries yields a new Table, which is shared
by every connection whose encoder made the same insertions from the same state (h2load, a load
balancer, a browser: their first block inserts the same fields, later blocks only reference
them). A block that inserts nothing is cached on the table itself (`Table.reads`, one dict lookup
by the block's bytes: the steady-state request costs that and nothing else); a block that inserts
is cached in a bounded global map by (table key, block). Both caches are bounded; clearing them
never changes an answer, only what it costs.

Huffman strings are decoded by the `hpack` package's table-driven decoder and the static table is
its table (`hpack` is a dependency of `h2`, which gunicorn requires for HTTP/2 anyway).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(STATIC)
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1, also the per-field overhead of SETTINGS_MAX_HEADER_LIST_SIZE
# Our SETTINGS_HEADER_TABLE_SIZE: we never advertise another, so a size update above it is an error.
MAX_TABLE_SIZE = 4096
# Integers in a block are lengths and indexes: anything above this cannot be valid here.
_MAX_INT = 1 << 24

# Verdict bits. The declared Content-Length, when there is one, is stored from bit 8.
HEAD = 1
CONNECT = 2
MALFORMED = 4  # RFC 9113 §8.1.1: a stream error PROTOCOL_ERROR
TOO_LARGE = 8  # 431: the list, a field or the number of fields above the limits
HAS_LENGTH = 16
URI_TOO_LONG = 32  # 414: :path longer than gunicorn's limit_request_line
EXPECT_CONTINUE = 64  # `expect: 100-continue`: the client may wait for a 100 before its body
LENGTH_SHIFT = 8

# Cache bounds. Per table, blocks that insert nothing: at most 32 of at most 512 bytes, and at
# most _READS_BYTES of them in all on a table other than the empty one (a client that fills its
# table with fields of its own has a table state of its own: what it makes us hold stays within
# nginx's 12 KB per idle connection; the empty table is shared by every connection and keeps
# 16 KiB). Globally, blocks that insert (512 of at most 1 KiB, and the table states they lead
# to, each at most 4 KiB).
_READS_MAX = 32
_READS_BLOCK_MAX = 512
_READS_BYTES = 1024
_ROOT_READS_BYTES = _READS_MAX * _READS_BLOCK_MAX
_TRANSITIONS_MAX = 512
CACHE_BLOCK_MAX = 1024  # public: the access log caches its request atoms by the same rule
# Field checks remembered by field (name, value): a 1-byte indexed reference to a 4 KB entry is
# checked once, not byte by byte at every reference (RFC 9113 §8.2 rules, Content-Length,
# Expect). Only fields that can sit in a table (at most MAX_TABLE_SIZE) and are long enough
# that a lookup costs less than the check; at most _FACTS_MAX of them (the references to the
# strings are shared with the table states that hold them).
_FACTS_MIN = 64
_FACTS_MAX = 256

# RFC 9113 §8.2.1: names without 0x00-0x20, uppercase, 0x7f-0xff, and a colon only as the first
# byte of a pseudo-header; values without NUL, CR, LF, and not starting or ending with SP/HTAB.
_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]+")
_VALUE = re.compile(rb"(?:[^\x00\x0a\x0d\x20\x09](?:[^\x00\x0a\x0d]*[^\x00\x0a\x0d\x20\x09])?)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a method is a token (RFC 9110 §9.1)
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))


class CompressionError(Exception):
    """The block cannot be decoded: a connection error of type COMPRESSION_ERROR (RFC 9113
    §4.3), since the dynamic table is no longer known."""


class HeaderBomb(Exception):
    """The decoded list is more than twice SETTINGS_MAX_HEADER_LIST_SIZE, or has more than
    twice the allowed number of fields: not a big request but an attack (RFC 9113 §10.5.1);
    the connection ends with ENHANCE_YOUR_CALM."""


@dataclass(frozen=True)
class Limits:
    """What a verdict is judged against: SETTINGS_MAX_HEADER_LIST_SIZE, and the limits gunicorn
    applies to HTTP/2 requests as to HTTP/1 ones (gunicorn/http2/request.py): `:path` at most
    `request_line` bytes (414), at most `fields` regular fields, each with
    `len(name) + len(value) + 2` at most `field_size` (431)."""

    header_list: int = 65536
    request_line: int = 4094
    fields: int = 100
    field_size: int = 8190


_keys = itertools.count()


class Table:
    """One state of a decoder's dynamic table: entries newest first (index 62 is entries[0])."""

    __slots__ = ("entries", "key", "limits", "max_size", "reads", "reads_room", "size")

    def __init__(
        self, entries: tuple[tuple[bytes, bytes], ...], size: int, max_size: int, limits: Limits
    ) -> None:
        self.entries = entries
        self.size = size
        self.max_size = max_size
        self.limits = limits  # part of what a verdict means: shared by a root's descendants
        self.key = next(_keys)
        self.reads: dict[bytes, int] = {}
        self.reads_room = _READS_BYTES  # bytes of blocks `reads` may still take


_roots: dict[Limits, Table] = {}
_transitions: dict[tuple[int, bytes], tuple[int, Table]] = {}


def empty_table(limits: Limits) -> Table:
    """The state every connection starts from (shared, so that caches are shared)."""
    root = _roots.get(limits)
    if root is None:
        root = _roots[limits] = Table((), 0, MAX_TABLE_SIZE, limits)
        root.reads_room = _ROOT_READS_BYTES
    return root


def clear_caches() -> None:
    """Forget every memoised verdict (tests, and measurements of the uncached path)."""
    _transitions.clear()
    _facts.clear()
    for root in _roots.values():
        root.reads.clear()
        root.reads_room = _ROOT_READS_BYTES


def request_verdict(table: Table, block: bytes) -> tuple[int, Table]:
    """The verdict for a request's complete header block, and the table after it."""
    verdict = table.reads.get(block)
    if verdict is not None:
        return verdict, table
    hit = _transitions.get((table.key, block))
    if hit is not None:
        return hit
    fields, after, size = decode(table, block)
    verdict = (
        _judge_request(fields, table.limits) if size <= table.limits.header_list else TOO_LARGE
    )
    if after is table:
        if len(block) <= _READS_BLOCK_MAX:
            if len(table.reads) >= _READS_MAX or len(block) > table.reads_room:
                table.reads.clear()
                table.reads_room = (
                    _ROOT_READS_BYTES if table is _roots.get(table.limits) else _READS_BYTES
                )
            table.reads[block] = verdict
            table.reads_room -= len(block)
    elif len(block) <= CACHE_BLOCK_MAX:
        if len(_transitions) >= _TRANSITIONS_MAX:
            _transitions.clear()
        _transitions[(table.key, block)] = (verdict, after)
    return verdict, after


def trailers_verdict(table: Table, block: bytes) -> tuple[int, Table]:
    """The verdict for a trailer section (rare: not cached): MALFORMED, TOO_LARGE or 0."""
    fields, after, size = decode(table, block)
    if size > table.limits.header_list:
        return TOO_LARGE, after
    for field in fields:
        if field[0][:1] == b":" or _facts_of(field) & _FIELD_BAD:
            return MALFORMED, after
    return 0, after


def _integer(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 §5.1: (value, position after it)."""
    mask = (1 << prefix_bits) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(block)
    while True:
        if pos >= end:
            raise CompressionError("truncated integer")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if value > _MAX_INT:
            raise CompressionError("integer too large")
        if not byte & 0x80:
            return value, pos
        shift += 7


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """RFC 7541 §5.2: (octets, position after them)."""
    if pos >= len(block):
        raise CompressionError("truncated string")
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise CompressionError("truncated string")
    raw = block[pos:end]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError as exc:
            raise CompressionError(str(exc)) from None
    return raw, end


def decode(table: Table, block: bytes) -> tuple[list[tuple[bytes, bytes]], Table, int]:
    """Decode a complete header block: (fields, table after it, decoded list size).

    Decoding continues past the limits (the table must stay right, RFC 9113 §10.5.1) but not
    past twice SETTINGS_MAX_HEADER_LIST_SIZE or twice the number of fields: that is a bomb
    (HeaderBomb), not a request to refuse. The field count bounds the work a block can cause
    (each field is a Python iteration), whatever its size.
    """
    entries: list[tuple[bytes, bytes]] | None = None  # a copy, made at the first change
    current = table.entries
    size = table.size
    max_size = table.max_size
    fields: list[tuple[bytes, bytes]] = []
    listed = 0
    bound = 2 * table.limits.header_list
    most_fields = 2 * table.limits.fields + 8  # + the pseudo-headers
    pos = 0
    end = len(block)
    while pos < end:
        byte = block[pos]
        if byte & 0x80:  # indexed field (§6.1)
            index, pos = _integer(block, pos, 7)
            field = _lookup(current if entries is None else entries, index)
        elif byte & 0x40 or not byte & 0x20:
            # A literal (§6.2): with incremental indexing (01), without (0000), never (0001).
            indexing = bool(byte & 0x40)
            index, pos = _integer(block, pos, 6 if indexing else 4)
            if index:
                name = _lookup(current if entries is None else entries, index)[0]
            else:
                name, pos = _string(block, pos)
            value, pos = _string(block, pos)
            field = (name, value)
            if indexing:
                if entries is None:
                    entries = list(current)
                cost = len(name) + len(value) + _ENTRY_OVERHEAD
                if cost > max_size:
                    entries.clear()  # §4.4: an entry larger than the table empties it
                    size = 0
                else:
                    entries.insert(0, field)
                    size += cost
                    while size > max_size:
                        old = entries.pop()
                        size -= len(old[0]) + len(old[1]) + _ENTRY_OVERHEAD
        else:  # 001: dynamic table size update (§6.3), only before the first field (§4.2)
            if fields:
                raise CompressionError("table size update after a field")
            new_max, pos = _integer(block, pos, 5)
            if new_max > MAX_TABLE_SIZE:
                raise CompressionError("table size update above SETTINGS_HEADER_TABLE_SIZE")
            if entries is None:
                entries = list(current)
            max_size = new_max
            while size > max_size:
                old = entries.pop()
                size -= len(old[0]) + len(old[1]) + _ENTRY_OVERHEAD
            continue
        fields.append(field)
        listed += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        if listed > bound or len(fields) > most_fields:
            raise HeaderBomb
    if entries is None and max_size == table.max_size:
        return fields, table, listed
    return fields, Table(tuple(entries or ()), size, max_size, table.limits), listed


def _lookup(entries: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]], index: int):
    if 0 < index <= _STATIC_LEN:
        return STATIC[index - 1]
    dynamic = index - _STATIC_LEN - 1
    if index == 0 or dynamic >= len(entries):
        raise CompressionError(f"index {index} not in the table")
    return entries[dynamic]


def _regular_field_ok(name: bytes, value: bytes) -> bool:
    if not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
        return False
    if name in _CONNECTION_SPECIFIC:
        return False
    return not (name == b"te" and value != b"trailers")


# What a request's verdict needs of one field, found once per field (`_facts_of`): bad (§8.2:
# malformed name or value, connection-specific), `expect: 100-continue`, a Content-Length (its
# value from bit 8). For a pseudo-header only whether its value is well formed.
_FIELD_BAD = 1
_FIELD_EXPECT = 2
_FIELD_LENGTH = 4
_facts: dict[tuple[bytes, bytes], int] = {}


def _field_facts(name: bytes, value: bytes) -> int:
    if name[:1] == b":":
        return 0 if _VALUE.fullmatch(value) else _FIELD_BAD
    if not _regular_field_ok(name, value):
        return _FIELD_BAD
    if name == b"expect" and value.lower() == b"100-continue":
        return _FIELD_EXPECT
    if name == b"content-length":
        # A list of equal values is one value (RFC 9110 §8.6); anything else is malformed.
        parts = {part.strip(b" \t") for part in value.split(b",")}
        if len(parts) != 1:
            return _FIELD_BAD
        (part,) = parts
        if not part.isdigit() or len(part) > 18:
            return _FIELD_BAD
        return _FIELD_LENGTH | int(part) << LENGTH_SHIFT
    return 0


def _facts_of(field: tuple[bytes, bytes]) -> int:
    """`_field_facts`, remembered for the long fields a table can hold: a table entry is the
    same tuple at every reference, so the lookup hashes nothing again."""
    name, value = field
    if not _FACTS_MIN <= len(name) + len(value) <= MAX_TABLE_SIZE:
        return _field_facts(name, value)
    facts = _facts.get(field)
    if facts is None:
        facts = _field_facts(name, value)
        if len(_facts) >= _FACTS_MAX:
            _facts.clear()
        _facts[field] = facts
    return facts


def _judge_request(fields: list[tuple[bytes, bytes]], limits: Limits) -> int:
    """RFC 9113 §8.2-8.3 for a request header section, then gunicorn's limits: the verdict."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    count = 0
    too_large = False
    length = -1
    expect = 0
    field_size = limits.field_size
    for field in fields:
        name, value = field
        if name[:1] == b":":
            # Only the request pseudo-headers, each once, all before the regular fields.
            if regular or name not in _REQUEST_PSEUDO or name in pseudo:
                return MALFORMED
            if _facts_of(field):
                return MALFORMED
            pseudo[name] = value
            continue
        regular = True
        count += 1
        facts = _facts_of(field)
        if facts & _FIELD_BAD:
            return MALFORMED
        if len(name) + len(value) + 2 > field_size:
            too_large = True
        if facts & _FIELD_EXPECT:
            expect = EXPECT_CONTINUE
        elif facts & _FIELD_LENGTH:
            value_length = facts >> LENGTH_SHIFT
            if length >= 0 and value_length != length:
                return MALFORMED
            length = value_length
    method = pseudo.get(b":method")
    if not method or not _TOKEN.fullmatch(method):
        return MALFORMED
    verdict = 0
    if method == b"CONNECT":
        # §8.5: :authority only; :scheme and :path omitted.
        if b":scheme" in pseudo or b":path" in pseudo or not pseudo.get(b":authority"):
            return MALFORMED
        verdict = CONNECT
    else:
        if not pseudo.get(b":scheme") or not pseudo.get(b":path"):
            return MALFORMED  # §8.3.1: both required, :path never empty
        if method == b"HEAD":
            verdict = HEAD
        if len(pseudo[b":path"]) > limits.request_line:
            return URI_TOO_LONG
    if too_large or count > limits.fields:
        return TOO_LARGE
    if length >= 0:
        verdict |= HAS_LENGTH | (length << LENGTH_SHIFT)
    return verdict | expect

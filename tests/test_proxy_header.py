"""The PROXY header reader (vrypt_worker/proxy_header.py), in-process and exhaustive: every
family and command, every malformation, every split of every header, and a differential
against gunicorn 27's own reader (`gunicorn.http.message.Request`, fed the same bytes through
its IterUnreader): where gunicorn accepts a header we read the same client from it and consume
the same bytes; where it refuses one we refuse it too, except for the documented cases the
PROXY specification makes a receiver accept (docs/proxy-protocol.md)."""

from __future__ import annotations

import itertools
import random
import socket

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import (
    ForbiddenProxyRequest,
    InvalidProxyHeader,
    InvalidProxyLine,
    NoMoreData,
    ParseException,
)
from gunicorn.http.message import Request
from gunicorn.http.unreader import IterUnreader

from vrypt_worker.proxy_header import (
    MODES,
    NOT_PROXY,
    PARTIAL,
    V1,
    V1_MAX,
    V2,
    V2_SIGNATURE,
    Header,
    ProxyHeaderError,
    detect,
    header_length,
    parse,
    v1_header,
    v2_header,
)

REQUEST = b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n"
GUNICORN_ERRORS = (InvalidProxyLine, InvalidProxyHeader)


def gunicorn_reads(data: bytes, mode: str = "auto", peer: object = ("127.0.0.1", 9)) -> object:
    """What gunicorn 27 makes of `data` + REQUEST: the proxy info, an exception class, or
    "more" (it ran out of bytes inside the header)."""
    cfg = Config()
    cfg.set("proxy_protocol", mode)
    try:
        request = Request(cfg, IterUnreader([data + REQUEST]), peer)
    except (*GUNICORN_ERRORS, ForbiddenProxyRequest) as exc:
        return type(exc)
    except NoMoreData:
        return "more"
    assert request.path == "/after", request.path  # the header's bytes, exactly, were consumed
    return request.proxy_protocol_info


def agrees(data: bytes, v1: bool, v2: bool, slow: object) -> None:
    """The accept path's `header_length` never contradicts `detect` and `parse` (`slow`, in
    slow_reads' shape): 0 exactly when there is no header, a length only for a valid complete
    header of that length, -1 (left to them) for anything else."""
    fast = header_length(data, v1, v2)
    if slow == NOT_PROXY:
        assert fast == 0, (data, fast)
    elif fast > 0:
        assert isinstance(slow, Header) and slow.length == fast, (data, fast, slow)
    else:
        assert fast == -1, (data, fast, slow)


def ours(data: bytes, mode: str = "auto") -> object:
    """What we make of `data` + REQUEST, in the shape gunicorn_reads gives (checking that the
    accept path's `header_length` agrees)."""
    v1, v2 = MODES[mode]
    whole = data + REQUEST
    slow = slow_reads(whole, v1, v2)
    agrees(whole, v1, v2, slow)
    return slow


def slow_reads(whole: bytes, v1: bool, v2: bool) -> object:
    version = detect(whole, v1, v2)
    if version == NOT_PROXY:
        return NOT_PROXY
    assert version != PARTIAL
    try:
        header = parse(whole, version)
    except ProxyHeaderError:
        return ProxyHeaderError
    if header is None:
        return PARTIAL
    assert whole[header.length :] == REQUEST, (header, whole)
    return header


def same(theirs: object, mine: object) -> bool:
    if theirs is None or mine == NOT_PROXY:
        return theirs is None and mine == NOT_PROXY
    if theirs == "more" or mine == PARTIAL:
        return theirs == "more" and mine == PARTIAL
    if isinstance(theirs, type):
        return mine is ProxyHeaderError
    if not isinstance(mine, Header):
        return False
    client = theirs["client_addr"]  # type: ignore[index]
    if client is None:  # LOCAL, UNSPEC: gunicorn logs None, we the connection's own peer
        return mine.source is None
    return mine.source == (client, theirs["client_port"]) and mine.destination == (  # type: ignore[index]
        theirs["proxy_addr"],  # type: ignore[index]
        theirs["proxy_port"],  # type: ignore[index]
    )


# --- v1 ------------------------------------------------------------------------------------------

V1_VALID = [
    b"PROXY TCP4 203.0.113.7 10.0.0.1 4242 80\r\n",
    b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
    b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 443\r\n",
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"65535 65535\r\n",  # the longest line there is: 104 bytes and CRLF
    b"PROXY TCP6 ::ffff:192.0.2.1 :: 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 0080 +80\r\n",  # Python's int, as gunicorn reads ports
]
V1_INVALID = [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # five fields
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # seven
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # a double space is an empty field
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # a trailing space too
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # an IPv6 address in TCP4
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",  # and the converse
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
    b"PROXY TCP4 1.2.3.\xe9 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4\r\n",
]


@pytest.mark.parametrize("header", V1_VALID)
def test_v1_valid_headers_read_as_gunicorn_reads_them(header: bytes) -> None:
    theirs, mine = gunicorn_reads(header), ours(header)
    assert isinstance(mine, Header) and mine.length == len(header)
    assert same(theirs, mine), (theirs, mine)


@pytest.mark.parametrize("header", V1_INVALID)
def test_v1_malformed_headers_are_refused_as_gunicorn_refuses_them(header: bytes) -> None:
    assert gunicorn_reads(header) is InvalidProxyLine
    assert ours(header) is ProxyHeaderError


@pytest.mark.parametrize(
    "header",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY UNKNOWN x\r\n"],
)
def test_v1_unknown_leaves_the_connections_own_address(header: bytes) -> None:
    # The specification: "the receiver must ignore anything presented before the CRLF". gunicorn
    # 27 answers it 400 (its six-field check comes first): a documented difference.
    assert gunicorn_reads(header) is InvalidProxyLine
    assert ours(header) == Header(len(header), "UNKNOWN", None, None)


def test_v1_line_bound_is_107_bytes() -> None:
    start = b"PROXY TCP4 "
    assert parse(start + b"1" * (V1_MAX - 1 - len(start)), V1) is None  # 106 bytes: may end
    with pytest.raises(ProxyHeaderError):
        parse(start + b"1" * (V1_MAX - len(start)), V1)  # 107 without CRLF: never valid
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + b"x" * 200, V1)  # a bare LF never ends it


# --- v2 ------------------------------------------------------------------------------------------


def raw_v2(ver_cmd: int, fam_proto: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((ver_cmd, fam_proto)) + len(body).to_bytes(2, "big") + body


ADDRESSES = {
    0x1: socket.inet_pton(socket.AF_INET, "192.0.2.10")
    + socket.inet_pton(socket.AF_INET, "198.51.100.1")
    + (40000).to_bytes(2, "big")
    + (443).to_bytes(2, "big"),
    0x2: socket.inet_pton(socket.AF_INET6, "2001:db8::10")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + (40001).to_bytes(2, "big")
    + (8443).to_bytes(2, "big"),
    0x3: b"/run/client.sock".ljust(108, b"\0") + b"/run/haproxy.sock".ljust(108, b"\0"),
}
TLV_SAMPLES = [
    b"",
    b"\x03\x00\x04\x12\x34\x56\x78",  # CRC32C
    b"\xea\x00\x17\x01vpce-0123456789abcdef",  # AWS: the VPC endpoint id
    b"\x20\x00\x05\x07\x00\x00\x00\x00",  # SSL, no sub-TLVs
    b"\x04\x00\x02\x00",  # NOOP, a length that runs past the header: never parsed, never read
    b"\xff\xff\xff",
]


def accepted_beyond_gunicorn(
    version: int, cmd: int, family: int, protocol: int, length: int
) -> bool:
    """The valid combinations gunicorn 27 refuses (500) and the specification makes us accept
    (falling back to the connection's own address)."""
    if version != 2 or cmd != 0x1 or family > 3 or protocol > 2:
        return False
    if family == 0:
        return protocol != 1  # UNSPEC/STREAM gunicorn accepts too
    need = {1: 12, 2: 36, 3: 216}[family]
    return length >= need and (family == 3 or protocol != 1)


def v2_corpus() -> list[tuple[int, int, int, int, bytes]]:
    cases = []
    for version, cmd, family, protocol in itertools.product(
        (1, 2, 3, 15), (0, 1, 2, 15), (0, 1, 2, 3, 4, 15), (0, 1, 2, 3, 15)
    ):
        for body in {b"", ADDRESSES.get(family, b""), ADDRESSES.get(family, b"")[:-1]}:
            cases.append((version, cmd, family, protocol, body))
    return cases


def test_v2_every_version_command_family_and_protocol_against_gunicorn() -> None:
    """Every combination of the four nibbles, with no address, the family's address, and one
    byte short of it: where gunicorn accepts, the same client; where it refuses, we refuse,
    except the combinations the specification makes valid."""
    differences = []
    for version, cmd, family, protocol, body in v2_corpus():
        for tlvs in (b"", TLV_SAMPLES[2]):
            header = raw_v2(version << 4 | cmd, family << 4 | protocol, body + tlvs)
            theirs, mine = gunicorn_reads(header), ours(header)
            if theirs is InvalidProxyHeader and accepted_beyond_gunicorn(
                version, cmd, family, protocol, len(body + tlvs)
            ):
                assert isinstance(mine, Header) and mine.source is None, (header, mine)
                continue
            wrong_error = isinstance(theirs, type) and theirs is not InvalidProxyHeader
            if wrong_error or not same(theirs, mine):
                differences.append((header, theirs, mine))
    assert not differences, differences[:5]


@pytest.mark.parametrize("tlvs", TLV_SAMPLES)
@pytest.mark.parametrize("family", [1, 2])
def test_v2_tlvs_are_skipped_whatever_they_hold(family: int, tlvs: bytes) -> None:
    header = raw_v2(0x21, family << 4 | 1, ADDRESSES[family] + tlvs)
    mine = ours(header)
    assert isinstance(mine, Header) and mine.length == len(header)
    assert mine.source == (("192.0.2.10", 40000) if family == 1 else ("2001:db8::10", 40001))
    assert same(gunicorn_reads(header), mine)


def test_v2_the_largest_header_the_format_allows() -> None:
    junk = random.Random(7).randbytes(0xFFFF - 12)
    header = raw_v2(0x21, 0x11, ADDRESSES[1] + junk)
    assert len(header) == 16 + 0xFFFF
    mine = ours(header)
    assert isinstance(mine, Header) and mine.length == len(header)
    assert parse(header[:-1], V2) is None


def test_v2_local_and_unspec_leave_the_connections_own_address() -> None:
    for header, command in (
        (v2_header(None, None, local=True), "LOCAL"),
        (raw_v2(0x20, 0x11, ADDRESSES[1]), "LOCAL"),  # LOCAL ignores what follows
        (raw_v2(0x21, 0x00, b""), "UNSPEC"),
        (raw_v2(0x21, 0x01, b"anything"), "UNSPEC"),
        (raw_v2(0x21, 0x31, ADDRESSES[3]), "UNIX"),
        (raw_v2(0x21, 0x12, ADDRESSES[1]), "UDP4"),
    ):
        assert ours(header) == Header(len(header), command, None, None)


# --- detection and the modes ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["v1", "v2", "auto"])
def test_detection_follows_the_mode_as_gunicorn(mode: str) -> None:
    v1_on, v2_on = MODES[mode]
    for header, on in (
        (v1_header(("192.0.2.1", 1), ("192.0.2.2", 2)), v1_on),
        (v2_header(("192.0.2.1", 1), ("192.0.2.2", 2)), v2_on),
    ):
        if on:
            theirs, mine = gunicorn_reads(header, mode), ours(header, mode)
            assert isinstance(mine, Header) and same(theirs, mine)
        else:  # not a header in this mode: HTTP, which the framer judges (a 400 for these)
            assert detect(header + REQUEST, v1_on, v2_on) == NOT_PROXY
            with pytest.raises(ParseException) as caught:
                gunicorn_reads(header, mode)
            assert not isinstance(caught.value, GUNICORN_ERRORS)


def test_bytes_that_do_not_begin_a_header_are_decided_at_once() -> None:
    for first in (b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PRI * HTTP/2.0", b"\r\nGET"):
        assert detect(first, True, True) == NOT_PROXY, first
    for prefix in (b"", b"P", b"PROXY", b"\r\n", b"\r\n\r\n\x00\r\nQUI"):
        assert detect(prefix, True, True) == PARTIAL, prefix
    assert detect(b"PROXY ", True, False) == V1
    assert detect(b"PROXY ", False, True) == NOT_PROXY
    assert detect(V2_SIGNATURE, True, False) == NOT_PROXY
    assert detect(V2_SIGNATURE, False, True) == V2


def test_plain_requests_pass_through_unchanged_as_in_gunicorn() -> None:
    for request in (b"", b"\r\n"):
        assert gunicorn_reads(request) is None and ours(request) == NOT_PROXY


# --- every split of every header --------------------------------------------------------------


def stage_reads(chunks: list[bytes], mode: str = "auto") -> tuple[object, bytes]:
    """The stage's loop (proxied.ProxyStage.decide), on bytes arriving in `chunks`: the header
    (or None, or the error) at the first read that decides, and the bytes after it (those read
    with it, then what the ordinary connection reads)."""
    v1, v2 = MODES[mode]
    data = b""
    for index, chunk in enumerate(chunks):
        data += chunk
        later = b"".join(chunks[index + 1 :])
        agrees(data, v1, v2, slow_reads_exact(data, v1, v2))  # the accept path's reader too
        version = detect(data, v1, v2)
        if version == NOT_PROXY:
            return None, data + later
        if version == PARTIAL:
            continue
        try:
            header = parse(data, version)
        except ProxyHeaderError:
            return ProxyHeaderError, b""
        if header is not None:
            return header, data[header.length :] + later
    return "more", data


SPLIT_HEADERS = [
    *V1_VALID,
    b"PROXY UNKNOWN\r\n",
    v2_header(("192.0.2.1", 1), ("192.0.2.2", 2)),
    v2_header(("2001:db8::7", 65535), ("2001:db8::8", 0), tlvs=TLV_SAMPLES[2]),
    v2_header(None, None, local=True),
    raw_v2(0x21, 0x31, ADDRESSES[3]),
]


@pytest.mark.parametrize("header", SPLIT_HEADERS)
def test_every_split_of_a_header_reads_the_same(header: bytes) -> None:
    """Byte by byte, and at every single and double cut: the same header and the same rest,
    never a decision before the last byte of the header."""
    wire = header + REQUEST
    whole, rest = stage_reads([wire])
    assert isinstance(whole, Header) and rest == REQUEST
    assert stage_reads([bytes((b,)) for b in wire]) == (whole, REQUEST)
    for cut in range(1, len(wire)):
        assert stage_reads([wire[:cut], wire[cut:]]) == (whole, REQUEST), cut
        if cut < len(header):
            assert stage_reads([wire[:cut]]) == ("more", wire[:cut]), cut
    for a, b in itertools.combinations(range(1, len(header) + 2), 2):
        assert stage_reads([wire[:a], wire[a:b], wire[b:]]) == (whole, REQUEST), (a, b)


@pytest.mark.parametrize("header", [*V1_INVALID[:6], raw_v2(0x22, 0x11, b""), raw_v2(0x11, 0, b"")])
def test_every_split_of_a_malformed_header_is_refused(header: bytes) -> None:
    wire = header + REQUEST
    for cut in range(1, len(wire)):
        assert stage_reads([wire[:cut], wire[cut:]])[0] is ProxyHeaderError, cut


def test_random_bytes_after_a_signature_never_crash_either_reader() -> None:
    """Random bytes after each signature (and after the prefixes `header_length` reads): a
    header within the bytes, PARTIAL or ProxyHeaderError from `parse`, never anything else,
    and never a contradiction from `header_length`."""
    rng = random.Random(22)
    prefixes = (
        V2_SIGNATURE,
        V2_SIGNATURE + b"\x21\x11",
        V2_SIGNATURE + b"\x21\x21",
        V2_SIGNATURE + b"\x20",
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP4 1.2.3.4 ",
    )
    for _ in range(20_000):
        tail = rng.randbytes(rng.randrange(0, 120))
        if rng.random() < 0.5:  # printable, closer to a line
            tail = bytes(b % 64 + 32 for b in tail) + b"\r\n"
        if rng.random() < 0.3:  # a plausible length
            tail = rng.randrange(0, 60).to_bytes(2, "big") + tail
        data = rng.choice(prefixes) + tail
        slow = slow_reads_exact(data)
        agrees(data, True, True, slow)
        if isinstance(slow, Header):
            assert 0 < slow.length <= len(data)
        else:
            assert slow in (PARTIAL, ProxyHeaderError), slow


def test_what_load_balancers_send_is_read_on_the_accept_path() -> None:
    """v1 TCP4, v2 TCP over IPv4 and IPv6 (TLVs too), v2 LOCAL: `header_length` reads them
    itself (the others go through `parse`, correct but slower)."""
    for header in (
        v1_header(CLIENT4, SERVER4),
        b"PROXY TCP4 10.0.0.1 10.0.0.2 65535 0\r\n",
        v2_header(CLIENT4, SERVER4),
        v2_header(("2001:db8::1", 1), ("2001:db8::2", 2), tlvs=TLV_SAMPLES[2]),
        v2_header(None, None, local=True),
    ):
        for _ in range(2):  # (the second time from the table of addresses seen)
            assert header_length(header + REQUEST, True, True) == len(header)


CLIENT4, SERVER4 = ("192.0.2.1", 40000), ("198.51.100.1", 80)


def slow_reads_exact(data: bytes, v1: bool = True, v2: bool = True) -> object:
    """`detect` then `parse`, as `decide` calls them, in slow_reads' shape."""
    version = detect(data, v1, v2)
    if version <= NOT_PROXY:
        return version
    try:
        header = parse(data, version)
    except ProxyHeaderError:
        return ProxyHeaderError
    return PARTIAL if header is None else header


def test_v1_tcp4_lines_agree_with_gunicorn_whichever_path_reads_them() -> None:
    """The usual TCP4 line is matched in one call (proxy_header's `_V1_TCP4`), anything else
    field by field: random octets and ports, leading zeros, signs and out-of-range values among
    them, get gunicorn's verdict either way."""
    rng = random.Random(2222)
    pieces = ["0", "1", "9", "10", "99", "100", "199", "249", "250", "255", "256", "00", "01"]
    ports = ["0", "1", "80", "08", "00080", "65535", "65536", "99999", "+80", "123456", "-0"]
    for _ in range(3000):
        quads = [".".join(rng.choice(pieces) for _ in range(4)) for _ in range(2)]
        line = f"PROXY TCP4 {quads[0]} {quads[1]} {rng.choice(ports)} {rng.choice(ports)}\r\n"
        header = line.encode()
        theirs, mine = gunicorn_reads(header), ours(header)
        assert same(theirs, mine), (header, theirs, mine)

"""The PROXY protocol header (v1 text, v2 binary), I/O-free: bytes in, a decision out.

A TCP load balancer (HAProxy `send-proxy`/`send-proxy-v2`, AWS NLB, stunnel `protocol = proxy`)
puts one header in front of everything else on a connection: the client's address and port as
it saw them. gunicorn 27 reads it in `gunicorn/http/message.py` (`proxy_protocol` off | v1 | v2 |
auto, `proxy_allow_ips`); this module reads it the same way, with the differences the
specification (haproxy's doc/proxy-protocol.txt) makes necessary, each said where it is made and
in docs/proxy-protocol.md:

- Detection, as gunicorn: the 12-byte v2 signature (modes v2, auto), or `PROXY ` (v1, auto).
  Anything else is not a PROXY header and the connection is served as without the setting
  (gunicorn does this too). We decide as soon as the first bytes cannot begin an enabled
  signature, where gunicorn waits for 12 bytes; for any byte stream that ends the same way.
- v1: `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`, six fields split on single spaces,
  the addresses as `inet_pton` reads them, the ports as Python's `int` reads them, 0..65535,
  as gunicorn. `PROXY UNKNOWN ...` is accepted (the specification's "the receiver must
  ignore anything presented before the CRLF"; gunicorn 27 answers it 400): the connection's own
  address stands. A line is at most 107 bytes (the specification's bound); one that has no CRLF
  by then is invalid (gunicorn reads on without a bound).
- v2: version 2, command LOCAL or PROXY, the 16-bit length; IPv4 and IPv6 over STREAM carry an
  address; LOCAL, AF_UNSPEC, AF_UNIX, and DGRAM over IPv4/IPv6 (valid combinations the
  specification lets a receiver fall back from) leave the connection's own address (gunicorn
  answers 500 for AF_UNIX and the non-STREAM ones, and logs `None` for LOCAL). TLVs after the
  addresses are never parsed: the whole length is skipped, so no TLV can do anything but cost
  its bytes (at most 65,535 by the format).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the specification)
V2_FIXED = 16  # signature, version/command, family/protocol, length
V2_MAX = V2_FIXED + 0xFFFF

# What `detect` says of a connection's first bytes.
PARTIAL = -1  # too few bytes to tell
NOT_PROXY = 0  # an ordinary connection: serve every byte as usual
V1 = 1
V2 = 2

# v2 commands, families and protocols (the high and low nibbles of bytes 12 and 13).
_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
_ADDRESS_BYTES = {_INET: 12, _INET6: 36, _UNIX: 216}

# Modes of gunicorn's `proxy_protocol` setting: which versions are looked for.
MODES = {"off": (False, False), "v1": (True, False), "v2": (False, True), "auto": (True, True)}


# The fixed part of a v2 header and an IPv4 address block, read in one call (`read_header`).
_V2_TCP4 = struct.Struct("!H4s4sHH").unpack_from
_V2_INET = struct.Struct("!4s4sHH").unpack_from
_V2_INET6 = struct.Struct("!16s16sHH").unpack_from
_ntop = socket.inet_ntop
_pton = socket.inet_pton
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_new = tuple.__new__  # a Header without NamedTuple's Python-level __new__ (the accept path)


class ProxyHeaderError(ValueError):
    """A PROXY header that is malformed (HTTP 400, as gunicorn's InvalidProxyLine)."""


class Header(NamedTuple):
    """A complete header: its length in bytes, what it said, and the client it carried."""

    length: int
    command: str  # v1: TCP4, TCP6, UNKNOWN; v2: TCP4, TCP6, LOCAL, UNSPEC, UNIX, UDP4, UDP6
    source: tuple[str, int] | None  # None: the connection's own peer stands
    destination: tuple[str, int] | None


def read_header(data: bytes, v1: bool, v2: bool) -> Header | int:
    """`detect` and `parse` in one call, for the accept path: a complete Header, NOT_PROXY, or
    PARTIAL (read more). Raises ProxyHeaderError. What a load balancer sends (v1 TCP4, v2 PROXY
    over TCP/IPv4) is read inline, in a few C calls; the rest, and every doubt (a field that
    does not convert), goes to `detect` and `parse`, so the verdicts are theirs (the tests
    compare both paths). The accept path's cost per new connection: docs/proxy-protocol.md."""
    if v1 and data.startswith(b"PROXY TCP4 "):
        end = data.find(b"\r\n", 11, V1_MAX)
        bits = data[11:end].split(b" ") if end > 0 else ()
        if len(bits) == 4:
            try:
                source, destination = bits[0].decode("latin-1"), bits[1].decode("latin-1")
                _pton(_AF_INET, source)
                _pton(_AF_INET, destination)
                s_port, d_port = int(bits[2]), int(bits[3])
            except (ValueError, OSError):  # (UnicodeEncodeError too) parse() says what is wrong
                pass
            else:
                if 0 <= s_port <= 65535 and 0 <= d_port <= 65535:
                    return _new(Header, (end + 2, "TCP4", (source, s_port), (destination, d_port)))
    elif v2 and data[12:14] == b"\x21\x11" and data.startswith(V2_SIGNATURE) and len(data) >= 28:
        length, source, destination, s_port, d_port = _V2_TCP4(data, 14)
        if length >= 12 and len(data) >= 16 + length:
            return _new(
                Header,
                (
                    16 + length,
                    "TCP4",
                    (_ntop(_AF_INET, source), s_port),
                    (_ntop(_AF_INET, destination), d_port),
                ),
            )
    version = detect(data, v1, v2)
    if version <= NOT_PROXY:
        return version
    header = parse(data, version)
    return PARTIAL if header is None else header


def detect(data: bytes, v1: bool, v2: bool) -> int:
    """Whether `data`, a connection's first bytes, begins a PROXY header of an enabled version:
    V1, V2, NOT_PROXY, or PARTIAL (a prefix of an enabled signature: read more)."""
    if v1 and data.startswith(V1_PREFIX):
        return V1
    if v2 and data.startswith(V2_SIGNATURE):
        return V2
    if (v1 and V1_PREFIX.startswith(data[:6])) or (v2 and V2_SIGNATURE.startswith(data[:12])):
        return PARTIAL
    return NOT_PROXY


def parse(data: bytes, version: int) -> Header | None:
    """The header at the start of `data` (which `detect` found to be `version`), or None when
    it is not complete yet. Raises ProxyHeaderError when it is malformed."""
    return parse_v1(data) if version == V1 else parse_v2(data)


def parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"no CRLF within {V1_MAX} bytes")
        return None
    line = data[:end].decode("latin-1")  # as gunicorn's bytes_to_str
    bits = line.split(" ")
    if len(bits) >= 2 and bits[1] == "UNKNOWN":
        return Header(end + 2, "UNKNOWN", None, None)
    if len(bits) != 6:
        raise ProxyHeaderError(f"Invalid PROXY line: {line!r}")
    proto, s_addr, d_addr = bits[1], bits[2], bits[3]
    if proto == "TCP4":
        family = socket.AF_INET
    elif proto == "TCP6":
        family = socket.AF_INET6
    else:
        raise ProxyHeaderError(f"protocol {proto!r} not supported")
    try:
        socket.inet_pton(family, s_addr)
        socket.inet_pton(family, d_addr)
    except (OSError, UnicodeError, ValueError):
        raise ProxyHeaderError(f"Invalid PROXY line: {line!r}") from None
    try:
        s_port = int(bits[4])
        d_port = int(bits[5])
    except ValueError:
        raise ProxyHeaderError(f"invalid port {line!r}") from None
    if not (0 <= s_port <= 65535 and 0 <= d_port <= 65535):
        raise ProxyHeaderError(f"invalid port {line!r}")
    return Header(end + 2, proto, (s_addr, s_port), (d_addr, d_port))


def parse_v2(data: bytes) -> Header | None:
    if len(data) < V2_FIXED:
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0xF
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"unsupported command {command}")
    total = V2_FIXED + int.from_bytes(data[14:16], "big")
    if len(data) < total:
        return None  # (checked before the family, as gunicorn reads the whole header first)
    if command == _LOCAL:  # the proxy's own connection (a health check): no client to carry
        return Header(total, "LOCAL", None, None)
    family, protocol = data[13] >> 4, data[13] & 0xF
    if family > _UNIX or protocol > _DGRAM:
        raise ProxyHeaderError(f"unsupported address family {family} / protocol {protocol}")
    if family == _UNSPEC:
        return Header(total, "UNSPEC", None, None)
    if total - V2_FIXED < _ADDRESS_BYTES[family]:
        raise ProxyHeaderError(f"insufficient address data for family {family}")
    if protocol != _STREAM or family == _UNIX:
        # Valid, but no TCP client address to log (AF_UNIX paths; UDP over a TCP stream): the
        # specification's fallback, the connection's own address.
        name = {_INET: "UDP4", _INET6: "UDP6"}.get(family, "UNIX")
        return Header(total, name, None, None)
    if family == _INET:
        source, destination, s_port, d_port = _V2_INET(data, 16)
        return _new(
            Header,
            (
                total,
                "TCP4",
                (_ntop(_AF_INET, source), s_port),
                (_ntop(_AF_INET, destination), d_port),
            ),
        )
    source, destination, s_port, d_port = _V2_INET6(data, 16)
    return _new(
        Header,
        (
            total,
            "TCP6",
            (_ntop(_AF_INET6, source), s_port),
            (_ntop(_AF_INET6, destination), d_port),
        ),
    )


# Builders, for tests, the bench's load generator and anyone who needs a header to send.


def v1_header(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """`PROXY TCP4|TCP6 ...\\r\\n`, or `PROXY UNKNOWN\\r\\n` without addresses."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n").encode(
        "ascii"
    )


def v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY over TCP with the two addresses, PROXY AF_UNSPEC without them, or
    LOCAL; `tlvs` appended after the addresses (counted in the length)."""
    if local or source is None or destination is None:
        fam, body = 0x00, b""
    elif ":" in source[0]:
        fam = 0x21
        body = socket.inet_pton(socket.AF_INET6, source[0]) + socket.inet_pton(
            socket.AF_INET6, destination[0]
        )
    else:
        fam = 0x11
        body = socket.inet_pton(socket.AF_INET, source[0]) + socket.inet_pton(
            socket.AF_INET, destination[0]
        )
    if body:
        body += source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")  # type: ignore[union-attr]
    body += tlvs
    cmd = 0x20 if local else 0x21
    return V2_SIGNATURE + bytes((cmd, fam)) + len(body).to_bytes(2, "big") + body

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


_V2_INET = struct.Struct("!4s4sHH").unpack_from
_V2_INET6 = struct.Struct("!16s16sHH").unpack_from
_ntop = socket.inet_ntop
_pton = socket.inet_pton
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6


class ProxyHeaderError(ValueError):
    """A PROXY header that is malformed (HTTP 400, as gunicorn's InvalidProxyLine)."""


class Header(NamedTuple):
    """A complete header: its length in bytes, what it said, and the client it carried."""

    length: int
    command: str  # v1: TCP4, TCP6, UNKNOWN; v2: TCP4, TCP6, LOCAL, UNSPEC, UNIX, UDP4, UDP6
    source: tuple[str, int] | None  # None: the connection's own peer stands
    destination: tuple[str, int] | None


# v1 TCP4 addresses that inet_pton took before: a load balancer's own address is in every
# header and its clients come back, so `header_length` mostly finds them here instead of
# validating them again. Only valid addresses are kept, at most _VALID_MAX of them (then
# addresses are checked as they come).
_VALID_MAX = 4096
_VALID_V1: set[bytes] = set()


def _valid_v1(raw: bytes) -> bool:
    """Whether a v1 TCP4 address is one inet_pton takes (as gunicorn checks it)."""
    try:
        _pton(_AF_INET, raw.decode("latin-1"))
    except (ValueError, OSError):  # (UnicodeEncodeError too)
        return False
    if len(_VALID_V1) < _VALID_MAX:
        _VALID_V1.add(raw)
    return True


def header_length(data: bytes, v1: bool, v2: bool) -> int:
    """The accept path's question, when nobody will ask which client the header carried (the
    access log is off): the length of the complete, valid header `data` begins with (> 0), 0
    when `data` begins no header at all (`detect`'s NOT_PROXY), or -1 for everything else
    (partial, malformed, or a kind not read here): `detect` and `parse` then decide. Read here:
    what load balancers send, v1 TCP4 and v2 PROXY over TCP (IPv4, IPv6) or LOCAL, in a few C
    calls and no object but the result (the tests hold it to `parse`'s verdicts; the cost per
    new connection is in docs/proxy-protocol.md)."""
    if v2 and data.startswith(V2_SIGNATURE):
        if len(data) >= V2_FIXED:
            total = V2_FIXED + (data[14] << 8 | data[15])
            command, family = data[12], data[13]
            if len(data) >= total and (
                command == 0x20  # LOCAL: a health check
                or (command == 0x21 and family == 0x11 and total >= V2_FIXED + 12)
                or (command == 0x21 and family == 0x21 and total >= V2_FIXED + 36)
            ):
                return total
        return -1
    if v1 and data.startswith(b"PROXY TCP4 "):
        end = data.find(b"\r\n")  # (bounds as arguments would be parsed: a tenth of the cost)
        bits = data[11:end].split(b" ") if 0 < end < V1_MAX else ()
        valid = _VALID_V1
        if (
            len(bits) == 4
            and (bits[0] in valid or _valid_v1(bits[0]))
            and (bits[1] in valid or _valid_v1(bits[1]))
        ):
            try:
                if 0 <= int(bits[2]) <= 65535 and 0 <= int(bits[3]) <= 65535:
                    return end + 2
            except ValueError:
                pass
        return -1
    return 0 if detect(data, v1, v2) == NOT_PROXY else -1


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
        address_family, name = _AF_INET, "TCP4"
    else:
        source, destination, s_port, d_port = _V2_INET6(data, 16)
        address_family, name = _AF_INET6, "TCP6"
    return Header(
        total,
        name,
        (_ntop(address_family, source), s_port),
        (_ntop(address_family, destination), d_port),
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

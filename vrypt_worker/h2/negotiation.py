"""Cleartext HTTP/2 (h2c) decisions, I/O-free, the same as gunicorn 27's own
(`gunicorn/http2/negotiation.py`), so that `http2_cleartext` means here what it means there:

- `http2_cleartext` is `off`, `prior-knowledge`, `upgrade` or `both`; the two mechanisms are
  enabled separately, and only when `h2` is in `http_protocols`, gunicorn's `protocol` setting is
  `http` and TLS is off (with TLS,
  HTTP/2 is chosen by ALPN).
- Only peers in `forwarded_allow_ips` may use h2c (Unix socket peers are trusted); everyone else
  is served HTTP/1.x as if the setting were off. An IPv4 peer of a dual-stack listener
  (`::ffff:a.b.c.d`) is judged by its IPv4 address, unlike gunicorn.
- With `prior-knowledge` alone, a trusted peer whose first bytes are not the connection preface
  (or whose preface does not complete within H2C_PREFACE_TIMEOUT) is refused; with `both`, an
  HTTP/1 request goes on as HTTP/1 (it may be the upgrade request).
- An upgrade (RFC 7540 §3.2, which RFC 9113 §3.1 deprecates but gunicorn honours) needs an
  HTTP/1.1 request with `Upgrade: h2c`, `Connection` naming both `Upgrade` and
  `HTTP2-Settings`, exactly one `HTTP2-Settings` field that is valid base64url of valid
  settings, and a body of at most 65536 bytes by Content-Length. Otherwise the request is
  served as HTTP/1.1, no 101.

Two differences, by choice:
- gunicorn answers the refused peer an HTTP/1.1 `400`. A peer served HTTP/2 only gets HTTP/2
  frames only: RFC 9113 §3.4 makes an invalid preface a connection error of type PROTOCOL_ERROR,
  so it gets our SETTINGS, GOAWAY(PROTOCOL_ERROR) and the close (`H2Protocol.refuse_preface`).
- gunicorn also upgrades a request with a chunked body (it reads the whole body first); here a
  chunked upgrade request is answered as HTTP/1.1 without upgrading, so that the transport only
  ever has a counted body to skip before the switch.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from vrypt_worker.h2.frames import PREFACE

H2C_PREFACE = PREFACE
# gunicorn's budget for the whole preface once its first bytes arrived (seconds).
H2C_PREFACE_TIMEOUT = 1.0
# The largest request body an upgrade request may carry (gunicorn's H2C_UPGRADE_BODY_LIMIT).
H2C_UPGRADE_BODY_LIMIT = 65536

MATCH = "match"
PARTIAL = "partial"
MISMATCH = "mismatch"

# What to do with a new cleartext connection's first bytes (`first_bytes`).
SERVE_H2 = "h2"  # the preface: hand every byte to H2Protocol
WAIT = "wait"  # a prefix of the preface: read more (within H2C_PREFACE_TIMEOUT)
SERVE_HTTP1 = "http1"  # not h2c: HTTP/1.x as usual
REJECT = "reject"  # prior-knowledge-only port, trusted peer, not the preface: GOAWAY, close

UPGRADE_101 = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"

_MODES = ("off", "prior-knowledge", "upgrade", "both")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) \S+ HTTP/([0-9])\.([0-9])")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def preface_match(buf: bytes) -> str:
    """MATCH when buf starts with the whole preface, PARTIAL while it is a prefix of it,
    MISMATCH as soon as a byte differs."""
    if len(buf) >= len(PREFACE):
        return MATCH if buf.startswith(PREFACE) else MISMATCH
    return PARTIAL if PREFACE.startswith(buf) else MISMATCH


@dataclass(frozen=True)
class H2cPolicy:
    """The h2c settings of one server, resolved once (from_config) and asked per connection."""

    mode: str = "off"
    available: bool = False  # h2 in http_protocols, plain HTTP listener, no TLS
    allow_all: bool = False  # `*` in forwarded_allow_ips
    networks: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"http2_cleartext must be one of {_MODES}: {self.mode!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> H2cPolicy:
        allow = list(cfg.forwarded_allow_ips)
        available = (
            "h2" in cfg.http_protocols
            and getattr(cfg, "protocol", "http") == "http"
            and not cfg.is_ssl
        )
        return cls(
            mode=cfg.http2_cleartext,
            available=available,
            allow_all="*" in allow,
            networks=tuple(cfg.forwarded_allow_networks()),
        )

    def trusted(self, peer: Any) -> bool:
        """A peer address as accept() gives it: a tuple for TCP, anything else (a Unix socket
        path) is trusted, as in gunicorn."""
        if not isinstance(peer, tuple):
            return True
        if self.allow_all:
            return True
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            # An IPv4 client of a dual-stack `[::]` listener (the default bind, families.py):
            # judged as the IPv4 address it is, so that `127.0.0.1` in forwarded_allow_ips
            # still means the local proxy. (gunicorn compares ::ffff:127.0.0.1 as IPv6.)
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def prior_knowledge_allowed(self, peer: Any) -> bool:
        return self.mode in ("prior-knowledge", "both") and self.available and self.trusted(peer)

    def upgrade_allowed(self, peer: Any) -> bool:
        return self.mode in ("upgrade", "both") and self.available and self.trusted(peer)

    @property
    def mismatch_is_error(self) -> bool:
        return self.mode == "prior-knowledge"

    def first_bytes(self, peer: Any, buf: bytes) -> str:
        """SERVE_H2, WAIT, SERVE_HTTP1 or REJECT for what a new connection sent so far."""
        if not self.prior_knowledge_allowed(peer):
            return SERVE_HTTP1
        state = preface_match(buf)
        if state == MATCH:
            return SERVE_H2
        if state == PARTIAL:
            return WAIT
        return REJECT if self.mismatch_is_error else SERVE_HTTP1


@dataclass(frozen=True)
class Upgrade:
    """A valid `Upgrade: h2c` request: its decoded HTTP2-Settings payload (for
    H2Protocol.upgraded), whether it was HEAD, and the body bytes to skip after its head."""

    settings: bytes
    head: bool
    body_length: int


def upgrade_request(head: bytes) -> Upgrade | None:
    """For a complete HTTP/1 request head (request line to the empty line): the upgrade, or
    None when it is not a well-formed h2c upgrade (then it is served as HTTP/1.1)."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        return None
    method, major, minor = match.groups()
    if (int(major), int(minor)) < (1, 1):
        return None  # RFC 7540 §3.2 describes the upgrade for HTTP/1.1 requests
    upgrade = None
    connection = b""
    settings: list[bytes] = []
    lengths: list[bytes] = []
    chunked = False
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        name = name.lower()
        value = value.strip(b" \t")
        # As gunicorn: the last Upgrade and Connection fields count.
        if name == b"upgrade":
            upgrade = value.lower()
        elif name == b"http2-settings":
            settings.append(value)
        elif name == b"connection":
            connection = value.lower()
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            chunked = True
    if upgrade != b"h2c" or len(settings) != 1:
        return None
    tokens = {token.strip(b" \t") for token in connection.split(b",")}
    if b"http2-settings" not in tokens or b"upgrade" not in tokens:
        return None
    if chunked:
        return None  # see the module docstring
    length = 0
    if lengths:
        if len(lengths) != 1 or not lengths[0].isdigit():
            return None
        length = int(lengths[0])
        if length > H2C_UPGRADE_BODY_LIMIT:
            return None
    raw = decode_settings(settings[0])
    if raw is None:
        return None
    return Upgrade(raw, method == b"HEAD", length)


def decode_settings(payload: bytes) -> bytes | None:
    """The SETTINGS payload in an HTTP2-Settings value (base64url, padding optional), or None
    when it does not decode or holds a value a SETTINGS frame may not (RFC 9113 §6.5.2)."""
    try:
        raw = base64.b64decode(payload + b"=" * (-len(payload) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 6:
        return None
    for pos in range(0, len(raw), 6):
        code = int.from_bytes(raw[pos : pos + 2], "big")
        value = int.from_bytes(raw[pos + 2 : pos + 6], "big")
        if code == 2 and value not in (0, 1):
            return None
        if code == 4 and value > 2**31 - 1:
            return None
        if code == 5 and not 16384 <= value <= 16777215:
            return None
    return raw

"""h2c decisions: the same as gunicorn 27's own (gunicorn.http2.negotiation), compared case by
case, plus the one documented difference (a chunked upgrade request is not upgraded)."""

from __future__ import annotations

import base64
import itertools

import pytest
from gunicorn.config import Config
from gunicorn.http2 import negotiation as gn

from vrypt_worker.h2 import negotiation as n

PEERS = [
    ("127.0.0.1", 5000),
    ("10.1.2.3", 5000),
    ("192.168.1.1", 5000),
    ("::1", 5000, 0, 0),
    ("not-an-ip", 1),
    "/run/gunicorn.sock",
    b"",
]


def config(mode: str, protocols: str = "h2,h1", allow: str = "127.0.0.1,10.0.0.0/8", ssl=False):
    cfg = Config()
    cfg.set("http_protocols", protocols)
    cfg.set("http2_cleartext", mode)
    cfg.set("forwarded_allow_ips", allow)
    if ssl:
        cfg.set("certfile", "cert.pem")
        cfg.set("keyfile", "key.pem")
    return cfg


CASES = list(
    itertools.product(
        ["off", "prior-knowledge", "upgrade", "both"],
        ["h2,h1", "h1", "h2"],
        ["127.0.0.1,10.0.0.0/8", "*", "192.168.0.0/16,::1"],
        [False, True],
    )
)


@pytest.mark.parametrize(("mode", "protocols", "allow", "ssl"), CASES)
def test_policy_agrees_with_gunicorn(mode, protocols, allow, ssl):
    cfg = config(mode, protocols, allow, ssl)
    policy = n.H2cPolicy.from_config(cfg)
    for peer in PEERS:
        assert policy.prior_knowledge_allowed(peer) == gn.prior_knowledge_allowed(cfg, peer), peer
        assert policy.upgrade_allowed(peer) == gn.upgrade_allowed(cfg, peer), peer
        assert policy.trusted(peer) == gn.peer_trusted_for_h2c(cfg, peer), peer
    assert policy.mismatch_is_error == gn.mismatch_is_error(cfg)


def test_first_bytes_decisions():
    both = n.H2cPolicy.from_config(config("both"))
    prior = n.H2cPolicy.from_config(config("prior-knowledge"))
    trusted, stranger = ("127.0.0.1", 1), ("8.8.8.8", 1)
    request = b"GET / HTTP/1.1\r\n"
    assert prior.first_bytes(trusted, n.H2C_PREFACE) == n.SERVE_H2
    assert prior.first_bytes(trusted, n.H2C_PREFACE[:5]) == n.WAIT
    assert prior.first_bytes(trusted, request) == n.REJECT  # gunicorn: 400; here GOAWAY (§3.4)
    assert both.first_bytes(trusted, request) == n.SERVE_HTTP1  # may be an upgrade
    assert prior.first_bytes(stranger, n.H2C_PREFACE) == n.SERVE_HTTP1  # as if off
    assert n.H2cPolicy().first_bytes(trusted, n.H2C_PREFACE) == n.SERVE_HTTP1


@pytest.mark.parametrize(
    "buf", [b"", b"P", b"PRI * HTTP/2.0", n.H2C_PREFACE, n.H2C_PREFACE + b"x", b"GET", b"PRX"]
)
def test_preface_match_agrees_with_gunicorn(buf):
    assert n.preface_match(buf) == gn.preface_match(buf)


class _Request:
    """What gunicorn's upgrade_settings reads from its parsed request."""

    def __init__(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.version = tuple(int(x) for x in lines[0].rsplit(b"/", 1)[1].split(b"."))
        self.headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                self.headers.append((name.decode().upper(), value.strip().decode("latin-1")))


SETTINGS = base64.urlsafe_b64encode(b"\x00\x03\x00\x00\x00\x64\x00\x04\x00\x01\x00\x00").rstrip(
    b"="
)
UPGRADES = {
    "valid": b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: " + SETTINGS + b"\r\n\r\n",
    "head": b"HEAD / HTTP/1.1\r\nConnection: upgrade,http2-settings\r\nUpgrade: H2C\r\n"
    b"HTTP2-Settings: \r\n\r\n",
    "padded": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABk\r\n\r\n",
    "body": b"POST / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABk\r\nContent-Length: 5\r\n\r\n",
    "body-too-large": b"POST / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nContent-Length: 65537\r\n\r\n",
    "no-connection-token": b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABk\r\n\r\n",
    "two-settings": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABk\r\nHTTP2-Settings: AAMAAABk\r\n\r\n",
    "no-settings": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n",
    "websocket": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: websocket\r\nHTTP2-Settings: AAMAAABk\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABk\r\n\r\n",
    "bad-base64": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: !!!!\r\n\r\n",
    "not-multiple-of-6": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n",
    "enable-push-2": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: " + base64.urlsafe_b64encode(b"\x00\x02\x00\x00\x00\x02") + b"\r\n\r\n",
    "frame-size-small": b"GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: "
    + base64.urlsafe_b64encode(b"\x00\x05\x00\x00\x00\x10")
    + b"\r\n\r\n",
    "bad-content-length": b"POST / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nContent-Length: x\r\n\r\n",
}


@pytest.mark.parametrize("head", UPGRADES.values(), ids=UPGRADES.keys())
def test_upgrade_request_agrees_with_gunicorn(head):
    ours = n.upgrade_request(head)
    theirs = gn.upgrade_settings(_Request(head))
    assert (ours is None) == (theirs is None)
    if ours is not None:
        assert ours.settings == n.decode_settings(theirs)
        assert ours.head == head.startswith(b"HEAD ")


def test_upgrade_request_reports_the_body_to_skip():
    assert n.upgrade_request(UPGRADES["body"]).body_length == 5
    assert n.upgrade_request(UPGRADES["valid"]).body_length == 0
    assert n.upgrade_request(UPGRADES["valid"]).settings == base64.urlsafe_b64decode(
        SETTINGS + b"=="
    )


def test_chunked_upgrade_is_not_upgraded_here():
    head = (
        b"POST / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABk\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert gn.upgrade_settings(_Request(head)) is not None  # gunicorn would (reading it all)
    assert n.upgrade_request(head) is None


def test_upgrade_101_is_gunicorns():
    assert n.UPGRADE_101 == gn.UPGRADE_101
    assert n.H2C_UPGRADE_BODY_LIMIT == gn.H2C_UPGRADE_BODY_LIMIT
    assert n.H2C_PREFACE_TIMEOUT == gn.H2C_PREFACE_TIMEOUT


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        n.H2cPolicy(mode="sometimes")

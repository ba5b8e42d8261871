"""A TLS connection's first read at its accept (issue 24, vrypt_worker/tls_accept.py): the
ClientHello that TCP_DEFER_ACCEPT brought is answered there; a connection handed over without
it (the kernel's deferral timed out, or deferral is off) is served from the loop as before; one
that closes at once costs nothing but its close. HTTP/1.1 behind TLS answers a cached
`Connection: close` head without the framer, with the close_notify in the same write.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.support import StrictReader, is_vrypt, start_server
from tests.test_tls import (  # noqa: F401
    certs,
    client_context,
    tls_connect,
    tls_server,
    wait_ready_tls,
)

CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"

pytestmark = pytest.mark.timeout(90)


def one_request(server, certs, payload: bytes = CLOSE) -> bytes:  # noqa: F811
    with tls_connect(server, client_context(certs)) as sock:
        sock.sendall(payload)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ssl.SSLZeroReturnError:
            pass
        return data


@pytest.mark.parametrize("defer", ["1", "0"])
def test_new_connections_are_served(certs, defer: str) -> None:  # noqa: F811
    with tls_server(certs, env={"VRYPT_DEFER_ACCEPT": defer}) as server:
        for _ in range(20):  # the same cached head: the framer's first answer, then the cache's
            data = one_request(server, certs)
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"Vrypt"), data
            assert b"\r\nConnection: close\r\n" in data


def test_client_silent_past_the_deferral_is_served(certs) -> None:  # noqa: F811
    """Handed over after TCP_DEFER_ACCEPT's second without a ClientHello: nothing to read at the
    accept, so the connection waits in the loop for it."""
    with tls_server(certs) as server:
        raw = socket.create_connection((server.host, server.port), timeout=5)
        time.sleep(1.6)
        context = client_context(certs)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert is_vrypt(StrictReader(sock).read_many(1)[0])


def test_connect_and_close_leaves_the_worker_serving(certs) -> None:  # noqa: F811
    with tls_server(certs) as server:
        for _ in range(20):
            with socket.create_connection((server.host, server.port), timeout=5) as raw:
                raw.sendall(b"\x16\x03\x01\x00")  # a ClientHello cut short, then the close
        with socket.create_connection((server.host, server.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP on the TLS port: an alert
            assert not raw.recv(4096).startswith(b"HTTP/")
        data = one_request(server, certs)
        assert data.endswith(b"Vrypt"), data


def test_sni_callback_from_the_hook_is_called(certs, tmp_path) -> None:  # noqa: F811
    """An `sni_callback` set in gunicorn's ssl_context hook runs, and may set the connection's
    context: what the session's object must keep offering whatever wraps OpenSSL's."""
    seen = tmp_path / "sni.txt"
    conf = tmp_path / "sni.conf.py"
    conf.write_text(
        "from vrypt_worker.conf import *  # noqa\n"
        "def ssl_context(conf, default_ssl_context_factory):\n"
        "    context = default_ssl_context_factory()\n"
        "    def sni(conn, name, ctx):\n"
        f"        open({str(seen)!r}, 'a').write(f'{{name}}\\n')\n"
        "        conn.context = ctx\n"
        "    context.sni_callback = sni\n"
        "    return context\n"
    )
    server = start_server(
        "-c", str(conf), "--certfile", str(certs["cert"]), "--keyfile", str(certs["key"]),
        conf=False, ready=False,
    )  # fmt: skip
    try:
        wait_ready_tls(server, certs)
        raw = socket.create_connection((server.host, server.port), timeout=5)
        with client_context(certs).wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert is_vrypt(StrictReader(sock).read_many(1)[0])
        assert "localhost" in seen.read_text().split()
    finally:
        server.stop()

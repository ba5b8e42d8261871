"""`protocol = uwsgi`, live: hand-built packets over raw sockets, and behind a real nginx
`uwsgi_pass` (Debian's nginx-light has the uwsgi module), with keep-alive, HEAD, bodies, bad
packets, `uwsgi_allow_ips`, the access log and the RPS gauge."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import CONF, StrictReader, base_env, free_port, is_vrypt, running
from tests.test_metrics import Collector, metrics_env

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_nginx = pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="nginx is not installed")
UWSGI = ("--protocol", "uwsgi")


def var(key: str, value: str | bytes) -> bytes:
    k = key.encode("latin-1")
    v = value if isinstance(value, bytes) else value.encode("latin-1")
    return struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v


def packet(pairs: dict[str, str] | None = None, body: bytes = b"", m1: int = 0) -> bytes:
    pairs = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", **(pairs or {})}
    if body:
        pairs["CONTENT_LENGTH"] = str(len(body))
    block = b"".join(var(k, v) for k, v in pairs.items())
    return bytes([m1]) + struct.pack("<H", len(block)) + b"\x00" + block + body


HEAD = {"REQUEST_METHOD": "HEAD"}


def is_500(response) -> bool:
    return (
        response.status == 500
        and response.header(b"Connection") == b"close"
        and response.body == b"Internal Server Error\n"
    )


# hand-built packets ---------------------------------------------------------------------------


def test_packets_are_answered_with_keep_alive_head_bodies_and_pipelining():
    with running(*UWSGI) as server, server.connect() as sock:
        reader = StrictReader(sock)
        sock.sendall(packet())
        assert is_vrypt(reader.read())
        time.sleep(0.3)  # the same connection, later: kept alive
        sock.sendall(packet(HEAD))
        assert is_vrypt(reader.read(head_request=True), head=True)
        # a body (that looks like packets) is dropped, and the packets after it are answered
        body = packet(HEAD) * 3000
        sock.sendall(packet({"REQUEST_METHOD": "POST"}, body) + packet() + packet(HEAD))
        assert is_vrypt(reader.read())
        assert is_vrypt(reader.read())
        assert is_vrypt(reader.read(head_request=True), head=True)
        # pipelined, in one write, many
        sock.sendall(packet() * 200)
        assert all(is_vrypt(r) for r in reader.read_many(200))
        # split byte by byte
        for byte in packet(HEAD):
            sock.sendall(bytes([byte]))
            time.sleep(0.001)
        assert is_vrypt(reader.read(head_request=True), head=True)
        sock.sendall(packet({"HTTP_CONNECTION": "close"}))
        response = reader.read()
        assert is_vrypt(response) and response.header(b"Connection") == b"close"
        assert reader.at_eof()


@pytest.mark.parametrize(
    ("name", "data", "shut"),
    [
        ("wrong modifier1", packet(m1=5), False),
        ("HTTP on the uwsgi port", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
        ("sizes that overrun the vars block", b"\x00\x06\x00\x00\x03\x00abc\x09\x00", False),
        ("1001 vars", packet({f"K{i}": "v" for i in range(1001)}), False),
        ("short header, then the end", b"\x00\x10", True),
        ("short vars, then the end", packet()[:-2], True),
        ("short body, then the end", packet({"REQUEST_METHOD": "POST"}, b"x" * 10)[:-3], True),
    ],
)
def test_bad_packets_get_500_and_the_close_as_in_gunicorn(name, data, shut):
    with running(*UWSGI) as server:
        with server.connect() as sock:
            reader = StrictReader(sock)
            sock.sendall(packet() + data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
            assert is_vrypt(reader.read())
            assert is_500(reader.read()), name
            assert reader.at_eof()
        server.wait_for_log(r"uwsgi: 1 packet\(s\) answered 500")


def test_the_end_between_packets_closes_quietly():
    with running(*UWSGI) as server, server.connect() as sock:
        reader = StrictReader(sock)
        sock.sendall(packet())
        sock.shutdown(socket.SHUT_WR)
        assert is_vrypt(reader.read())
        assert reader.at_eof()  # gunicorn would answer 500 here (uwsgi_framing.py says why)


def test_a_stalled_packet_is_closed_without_an_answer(tmp_path):
    env = base_env(VRYPT_HEAD_TIMEOUT="1")
    with running(*UWSGI, env=env) as server, server.connect() as sock:
        sock.sendall(packet()[:7])
        reader = StrictReader(sock)
        started = time.monotonic()
        assert reader.at_eof(timeout=5)
        assert 0.9 < time.monotonic() - started < 4


def test_a_peer_outside_uwsgi_allow_ips_gets_500_before_it_sends_anything():
    # (without TCP_DEFER_ACCEPT: with it, the kernel hands over a silent connection only later)
    env = base_env(VRYPT_DEFER_ACCEPT="0")
    with running(*UWSGI, "--uwsgi-allow-from", "10.0.0.1", env=env) as server:
        with server.connect() as sock:
            reader = StrictReader(sock)
            assert is_500(reader.read())
            assert reader.at_eof()
        server.wait_for_log(r"uwsgi request from '?127\.0\.0\.1'? not allowed")


def test_a_peer_outside_uwsgi_allow_ips_gets_500_for_its_packets():
    with running(*UWSGI, "--uwsgi-allow-from", "10.0.0.1") as server, server.connect() as sock:
        sock.sendall(packet() * 3)
        reader = StrictReader(sock)
        assert is_500(reader.read())
        assert reader.at_eof()


@pytest.mark.parametrize("allowed", ["*", "127.0.0.0/8", "10.0.0.1,127.0.0.1"])
def test_allowed_peers_are_served(allowed):
    with running(*UWSGI, "--uwsgi-allow-from", allowed) as server, server.connect() as sock:
        sock.sendall(packet())
        assert is_vrypt(StrictReader(sock).read())


def test_packets_are_written_to_the_access_log(tmp_path):
    log = tmp_path / "access.log"
    fmt = '%(h)s "%(r)s" %(s)s %(b)s "%(a)s" %(m)s %(U)s %(q)s %(H)s {%({x-test}i)s}'
    with running(*UWSGI, "--access-logfile", str(log), "--access-logformat", fmt) as server:
        with server.connect() as sock:
            reader = StrictReader(sock)
            pairs = {
                "PATH_INFO": "/a b",
                "QUERY_STRING": "q=1",
                "HTTP_USER_AGENT": "probe/1",
                "HTTP_X_TEST": 'say "hi"',
            }
            sock.sendall(packet(pairs) + packet({**HEAD, "PATH_INFO": "/h"}) + packet(m1=9))
            assert is_vrypt(reader.read())
            assert is_vrypt(reader.read(head_request=True), head=True)
            assert is_500(reader.read())
        deadline = time.monotonic() + 5
        while log.read_text().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    lines = log.read_text().splitlines()
    assert lines == [
        '127.0.0.1 "GET /a b?q=1 HTTP/1.1" 200 5 "probe/1" GET /a b q=1 HTTP/1.1 {say \\"hi\\"}',
        '127.0.0.1 "HEAD /h HTTP/1.1" 200 0 "-" HEAD /h  HTTP/1.1 {-}',
    ]  # (the refused packet gets no line, as in gunicorn)


def test_packets_count_in_the_rps_gauge():
    collector = Collector()
    try:
        env = metrics_env(collector)
        with running(*UWSGI, env=env) as server:
            for _ in range(5):
                with server.connect() as sock:
                    sock.sendall(packet() * 4)
                    assert len(StrictReader(sock).read_many(4)) == 4
            ready = 1  # support.wait_ready's GET, answered 500
            assert collector.wait_sum(20 + ready, 0.2) == 20 + ready
    finally:
        collector.close()


# behind nginx's uwsgi_pass ---------------------------------------------------------------------

# nginx's own `uwsgi_params`, written out so that the test needs no file of the distribution.
UWSGI_PARAMS = """
        uwsgi_param QUERY_STRING $query_string;
        uwsgi_param REQUEST_METHOD $request_method;
        uwsgi_param CONTENT_TYPE $content_type;
        uwsgi_param CONTENT_LENGTH $content_length;
        uwsgi_param REQUEST_URI $request_uri;
        uwsgi_param PATH_INFO $document_uri;
        uwsgi_param DOCUMENT_ROOT $document_root;
        uwsgi_param SERVER_PROTOCOL $server_protocol;
        uwsgi_param REQUEST_SCHEME $scheme;
        uwsgi_param HTTPS $https if_not_empty;
        uwsgi_param REMOTE_ADDR $remote_addr;
        uwsgi_param REMOTE_PORT $remote_port;
        uwsgi_param SERVER_PORT $server_port;
        uwsgi_param SERVER_NAME $server_name;
"""

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_buffer_size 1m;  # (bodies in memory: nginx's workers may not write in tmp)
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream vrypt {{
        server 127.0.0.1:{upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            {params}
            uwsgi_pass vrypt;
        }}
        location /modifier {{
            {params}
            uwsgi_modifier1 5;
            uwsgi_pass vrypt;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_in_front(upstream: int, tmp: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, upstream=upstream, params=UWSGI_PARAMS))
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def http(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def nginx_answered(response, head: bool = False) -> bool:
    """Our answer as nginx passes it on (its own Server field)."""
    return (
        response.status == 200
        and response.header(b"Content-Length") == b"5"
        and response.header(b"Content-Type") == b"text/plain"
        and response.body == (b"" if head else b"Vrypt")
    )


@needs_nginx
def test_behind_nginx_uwsgi_pass(tmp_path):
    log = tmp_path / "access.log"
    fmt = "%({remote_port}e)s %(m)s %(U)s %(s)s"
    args = (*UWSGI, "--access-logfile", str(log), "--access-logformat", fmt)
    with running(*args) as server, nginx_in_front(server.port, tmp_path) as port:
        with http(port) as sock:
            reader = StrictReader(sock)
            # keep-alive from the client: one connection, many requests
            for i in range(20):
                sock.sendall(f"GET /k{i}?x=1 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                assert nginx_answered(reader.read())
            sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n")
            assert nginx_answered(reader.read(head_request=True), head=True)
            body = os.urandom(200_000)
            sock.sendall(
                b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            assert nginx_answered(reader.read())
            chunked = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            sock.sendall(chunked + b"5\r\nhello\r\n0\r\n\r\n")  # nginx sends CONTENT_LENGTH 5
            assert nginx_answered(reader.read())
            # a packet we refuse (uwsgi_modifier1 5): our 500 reaches the client
            sock.sendall(b"GET /modifier HTTP/1.1\r\nHost: a\r\n\r\n")
            response = reader.read()
            assert response.status == 500 and response.body == b"Internal Server Error\n"
            sock.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
            assert nginx_answered(reader.read())
        deadline = time.monotonic() + 5
        while log.read_text().count("\n") < 24 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        *[f"GET /k{i} 200" for i in range(20)],
        "HEAD /h 200",
        "POST /p 200",
        "POST /c 200",
        "GET /after 200",
    ]
    # nginx's upstream `keepalive` does not keep uwsgi connections: its uwsgi module never
    # marks a response reusable (u->keepalive), so each request came on a connection of its own.
    ports = [line.split(" ", 1)[0] for line in lines]
    assert len(set(ports)) == len(ports)


@needs_nginx
def test_behind_nginx_many_clients_at_once(tmp_path):
    with running(*UWSGI) as server, nginx_in_front(server.port, tmp_path) as port:
        socks = [http(port) for _ in range(30)]
        try:
            for _ in range(3):
                for sock in socks:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                for sock in socks:
                    assert nginx_answered(StrictReader(sock).read())
        finally:
            for sock in socks:
                sock.close()
        assert re.search(r"Traceback|Error handling", server.log) is None, server.log


def test_keep_alive_timeout_closes_an_idle_connection():
    with running(*UWSGI, "--keep-alive", "1") as server, server.connect() as sock:
        reader = StrictReader(sock)
        sock.sendall(packet())  # answered inline (uwsgi.UwsgiConnection)
        assert is_vrypt(reader.read())
        started = time.monotonic()
        assert reader.at_eof(timeout=5)
        assert 0.9 < time.monotonic() - started < 4
        with server.connect() as other:  # and after the protocol was made (a body)
            reader = StrictReader(other)
            other.sendall(packet({"REQUEST_METHOD": "POST"}, b"abc"))
            assert is_vrypt(reader.read())
            assert reader.at_eof(timeout=5)


def test_max_requests_closes_with_the_answer_that_reaches_it_and_recycles():
    with running(*UWSGI, "--max-requests", "3") as server:
        first = server.worker_pids()
        with server.connect() as sock:
            reader = StrictReader(sock)
            sock.sendall(packet())
            assert is_vrypt(reader.read())  # (the readiness GET was the first answer)
            sock.sendall(packet(HEAD))
            response = reader.read(head_request=True)
            assert response.header(b"Connection") == b"close"
            assert reader.at_eof()
        deadline = time.monotonic() + 10
        while server.worker_pids() == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.worker_pids() != first


def test_draining_closes_idle_connections_and_answers_in_flight_packets():
    with running(*UWSGI, "--graceful-timeout", "5") as server:
        idle = server.connect()
        idle_reader = StrictReader(idle)
        idle.sendall(packet())
        assert is_vrypt(idle_reader.read())
        busy = server.connect()
        busy.sendall(packet({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "4"}) + b"ab")
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        time.sleep(0.3)
        busy.sendall(b"cd")
        response = StrictReader(busy).read()
        assert is_vrypt(response) and response.header(b"Connection") == b"close"
        assert idle_reader.at_eof()
        idle.close()
        busy.close()


# inside TLS (nginx's `uwsgi_pass suwsgi://`) ----------------------------------------------------


def test_packets_inside_tls_and_a_forbidden_peer_after_the_handshake(tmp_path_factory):
    import trustme

    from tests.test_tls import client_context, tls_connect, tls_server

    where = tmp_path_factory.mktemp("uwsgi-certs")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = {name: where / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    issued.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    issued.private_key_pem.write_to_path(str(paths["key"]))
    context = client_context(paths)
    with tls_server(paths, *UWSGI) as server, tls_connect(server, context) as sock:
        reader = StrictReader(sock)
        sock.sendall(packet() + packet(HEAD))
        assert is_vrypt(reader.read())
        assert is_vrypt(reader.read(head_request=True), head=True)
        sock.sendall(packet(m1=2))
        assert is_500(reader.read())
    with (
        tls_server(paths, *UWSGI, "--uwsgi-allow-from", "10.0.0.1") as server,
        tls_connect(server, context) as sock,
    ):
        sock.sendall(packet())
        assert is_500(StrictReader(sock).read())


def test_a_dual_stack_listener_sees_nginx_on_127_0_0_1_as_allowed():
    """On `[::]` (dual-stack), a peer on 127.0.0.1 is `::ffff:127.0.0.1`: still the default
    allow list's 127.0.0.1 (gunicorn 27.0.1 would refuse it: docs/uwsgi.md)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(CONF), "--bind", f"[::]:{port}"]
    cmd += ["--workers", "1", "--no-control-socket", *UWSGI]
    with running(cmd=cmd, port=port) as server:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(packet())
            assert is_vrypt(StrictReader(sock).read())
        assert "not allowed" not in server.log

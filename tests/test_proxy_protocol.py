"""PROXY protocol v1/v2 on a real worker over real sockets (issue 22, point 1): hand-built
headers sent byte by byte before plain HTTP/1, TLS (h1 and h2 by ALPN) and h2c; split, malformed
and truncated headers; a peer not in `proxy_allow_ips`; the access log showing the client the
header carried; and a real HAProxy (`send-proxy`, `send-proxy-v2`, with and without
`check-send-proxy` health checks) in front."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.h2client import H2Client, is_vrypt_h2
from tests.support import StrictReader, base_env, free_port, running
from tests.test_access_log import lines_of
from tests.test_tls import certs, client_context, tls_server  # noqa: F401
from vrypt_worker.proxy_header import v1_header, v2_header

GET = b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n"
LOG_FORMAT = "%(h)s %({remote_addr}e)s %({remote_port}e)s %(U)s %(s)s"
CLIENT4, SERVER4 = ("203.0.113.7", 4242), ("198.51.100.1", 80)
CLIENT6, SERVER6 = ("2001:db8::7", 6666), ("2001:db8::1", 443)
HEADERS = {
    "v1-tcp4": v1_header(CLIENT4, SERVER4),
    "v1-tcp6": v1_header(CLIENT6, SERVER6),
    "v2-tcp4": v2_header(CLIENT4, SERVER4),
    "v2-tcp6": v2_header(CLIENT6, SERVER6, tlvs=b"\xea\x00\x05\x01vpce"),
}
CARRIED = {"v1-tcp4": CLIENT4, "v1-tcp6": CLIENT6, "v2-tcp4": CLIENT4, "v2-tcp6": CLIENT6}


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vrypt-proxy-") as path:
        yield Path(path)


def logged(log: Path, *extra: str) -> tuple[str, ...]:
    return ("--access-logfile", str(log), "--access-logformat", LOG_FORMAT, *extra)


def dribble(sock: socket.socket, payload: bytes, step: int = 1, pause: float = 0.0) -> None:
    """Send `payload` `step` bytes per segment (TCP_NODELAY: each its own segment)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for start in range(0, len(payload), step):
        sock.sendall(payload[start : start + step])
        if pause:
            time.sleep(pause)


def answers(sock: socket.socket, count: int) -> list[int]:
    reader = StrictReader(sock)
    return [response.status for response in reader.read_many(count)]


def closed_silently(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


# --- plain HTTP/1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "v1", "v2"])
def test_headers_byte_by_byte_then_keep_alive_requests_log_the_carried_client(
    tmp: Path, mode: str
) -> None:
    log = tmp / "access.log"
    names = [name for name in HEADERS if mode == "auto" or name.startswith(mode)]
    with running(*logged(log, "--proxy-protocol", mode)) as server:
        for name in names:
            with server.connect() as sock:
                dribble(sock, HEADERS[name] + GET)  # the header and the request, byte by byte
                sock.sendall(GET * 3)  # keep-alive, then pipelined, after the header
                assert answers(sock, 4) == [200] * 4
        lines = lines_of(log, 4 * len(names))
    expected = []
    for name in names:
        host, port = CARRIED[name]
        expected += [f"{host} {host} {port} /p 200"] * 4
    assert lines == expected


def test_header_and_request_in_one_segment_are_answered_at_the_accept(tmp: Path) -> None:
    log = tmp / "access.log"
    close = b"GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    with running(*logged(log, "--proxy-protocol", "auto")) as server:
        for header in HEADERS.values():
            with server.connect() as sock:
                sock.sendall(header + close)
                assert answers(sock, 1) == [200]
                assert closed_silently(sock)
        lines = lines_of(log, 4)
    assert [line.split()[0] for line in lines] == [CLIENT4[0], CLIENT6[0]] * 2


@pytest.mark.parametrize("header", ["v1-tcp4", "v2-tcp6"])
def test_every_split_point_of_header_and_request(header: str) -> None:
    wire = HEADERS[header] + GET
    with running("--proxy-protocol", "auto") as server:
        for cut in range(1, len(wire)):
            with server.connect() as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(wire[:cut])
                time.sleep(0.002)
                sock.sendall(wire[cut:])
                assert answers(sock, 1) == [200], cut


def test_without_a_header_a_connection_is_served_as_before(tmp: Path) -> None:
    """As gunicorn: the setting allows a header, it does not require one."""
    log = tmp / "access.log"
    with running(*logged(log, "--proxy-protocol", "auto")) as server:
        # (PROPFIND begins as PROXY does, an empty line as the v2 signature)
        for payload in (GET, b"\r\n" + GET, b"PROPFIND" + GET[3:]):
            with server.connect() as sock:
                dribble(sock, payload, step=3)
                assert answers(sock, 1) == [200]
        lines = lines_of(log, 3)
    assert all(line.startswith("127.0.0.1 127.0.0.1 ") for line in lines), lines


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
        b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12),  # version 1
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),  # IPv4 with 4 address bytes
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x51\x00\x00",  # family 5
    ],
)
def test_a_malformed_header_is_answered_400_and_closed(header: bytes) -> None:
    with running("--proxy-protocol", "auto") as server, server.connect() as sock:
        dribble(sock, header + GET, step=7)
        reader = StrictReader(sock)
        response = reader.read()
        assert response is not None and response.status == 400
        assert response.header(b"Connection") == b"close"
        assert reader.at_eof()  # the request after the header is never answered


def test_a_truncated_header_is_closed_without_an_answer() -> None:
    with running("--proxy-protocol", "auto") as server:
        for part in (b"PROX", b"PROXY TCP4 1.2.3.4 5.6", HEADERS["v2-tcp6"][:30]):
            with server.connect() as sock:
                sock.sendall(part)
                sock.shutdown(socket.SHUT_WR)
                assert closed_silently(sock)


def test_a_header_that_never_completes_is_closed_after_the_head_timeout() -> None:
    env = base_env(VRYPT_HEAD_TIMEOUT="1")
    with running("--proxy-protocol", "auto", env=env) as server, server.connect() as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4 ")
        started = time.monotonic()
        assert closed_silently(sock, timeout=6)
        assert time.monotonic() - started < 4


def test_a_header_from_a_peer_not_allowed_is_refused_403(tmp: Path) -> None:
    log = tmp / "access.log"
    args = logged(log, "--proxy-protocol", "auto", "--proxy-allow-from", "10.1.2.3,192.0.2.0/24")
    with running(*args) as server:
        for header in HEADERS.values():
            with server.connect() as sock:
                dribble(sock, header + GET, step=5)
                reader = StrictReader(sock)
                response = reader.read()
                assert response is not None and response.status == 403
                assert response.body == b"Forbidden\n"
                assert reader.at_eof()
        with server.connect() as sock:  # without a header, as gunicorn: served
            sock.sendall(GET)
            assert answers(sock, 1) == [200]
            port = sock.getsockname()[1]
        assert lines_of(log, 1) == [f"127.0.0.1 127.0.0.1 {port} /p 200"]


def test_the_mode_decides_which_version_is_a_header() -> None:
    """`v1` does not read a v2 header (HTTP then: the framer's 400), `v2` not a v1 line."""
    with running("--proxy-protocol", "v1") as server, server.connect() as sock:
        sock.sendall(HEADERS["v2-tcp4"] + GET)
        assert answers(sock, 1) == [400]
    with running("--proxy-protocol", "v2") as server, server.connect() as sock:
        sock.sendall(HEADERS["v1-tcp4"] + GET)
        assert answers(sock, 1) == [400]


def test_local_and_unknown_log_the_connections_own_address(tmp: Path) -> None:
    log = tmp / "access.log"
    with running(*logged(log, "--proxy-protocol", "auto")) as server:
        ports = []
        for header in (b"PROXY UNKNOWN\r\n", v2_header(None, None, local=True)):
            with server.connect() as sock:
                dribble(sock, header + GET, step=4)
                assert answers(sock, 1) == [200]
                ports.append(sock.getsockname()[1])
        lines = lines_of(log, 2)
    assert lines == [f"127.0.0.1 127.0.0.1 {port} /p 200" for port in ports]


# --- TLS (h1 and h2 by ALPN) and h2c --------------------------------------------------------------


def tls_after_header(port: int, context: ssl.SSLContext, header: bytes) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    dribble(raw, header, step=9)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_tls_after_the_header_http1_and_http2(tmp: Path, certs) -> None:  # noqa: F811
    log = tmp / "access.log"
    args = logged(log, "--proxy-protocol", "auto", "--http-protocols", "h2,h1")
    with tls_server(certs, *args) as server:
        sock = tls_after_header(server.port, client_context(certs), HEADERS["v1-tcp6"])
        with sock:
            assert sock.selected_alpn_protocol() in (None, "http/1.1")
            sock.sendall(GET * 2)
            assert answers(sock, 2) == [200, 200]
        sock = tls_after_header(server.port, client_context(certs, alpn=["h2"]), HEADERS["v2-tcp4"])
        assert sock.selected_alpn_protocol() == "h2"
        client = H2Client.connect(server.port, sock=sock)
        try:
            ids = [client.request("GET", "/p") for _ in range(3)]
            client.wait(ids)
            assert all(is_vrypt_h2(client.streams[i]) for i in ids)
        finally:
            client.close()
        lines = lines_of(log, 5, pattern=" /p ")  # (not the readiness probe's)
    assert lines[:2] == [f"{CLIENT6[0]} {CLIENT6[0]} {CLIENT6[1]} /p 200"] * 2
    assert lines[2:] == [f"{CLIENT4[0]} {CLIENT4[0]} {CLIENT4[1]} /p 200"] * 3


def test_h2c_prior_knowledge_and_upgrade_after_the_header(tmp: Path) -> None:
    log = tmp / "access.log"
    args = logged(log, "--proxy-protocol", "auto", "--http-protocols", "h2,h1")
    with running(*args, "--http2-cleartext", "both") as server:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        dribble(raw, HEADERS["v2-tcp6"], step=11)
        client = H2Client.connect(server.port, sock=raw)
        try:
            ids = [client.request("GET", "/p") for _ in range(2)]
            client.wait(ids)
            assert all(is_vrypt_h2(client.streams[i]) for i in ids)
        finally:
            client.close()
        with server.connect() as sock:  # HTTP/1 on the same h2c port, after a v1 header
            dribble(sock, HEADERS["v1-tcp4"] + GET, step=13)
            assert answers(sock, 1) == [200]
        lines = lines_of(log, 3)
    assert lines[:2] == [f"{CLIENT6[0]} {CLIENT6[0]} {CLIENT6[1]} /p 200"] * 2
    assert lines[2] == f"{CLIENT4[0]} {CLIENT4[0]} {CLIENT4[1]} /p 200"


# --- a real HAProxy in front --------------------------------------------------------------------

HAPROXY = shutil.which("haproxy")


@contextlib.contextmanager
def haproxy(backend_port: int, server_options: str, checks: bool) -> Iterator[tuple[int, Path]]:
    """HAProxy in HTTP mode on a free port, one server (`server_options`), health checks with
    `option httpchk` when `checks`; yields its port and its log."""
    port = free_port()
    where = Path(tempfile.mkdtemp(prefix="vrypt-haproxy-"))
    check = "check inter 300ms fall 1 rise 1" if checks else ""
    (where / "haproxy.cfg").write_text(
        f"""
global
  log stderr format raw local0
defaults
  mode http
  log global
  option httplog
  timeout connect 2s
  timeout client 10s
  timeout server 10s
backend vrypt
  option httpchk GET /health
  server s1 127.0.0.1:{backend_port} {server_options} {check}
frontend front
  bind 127.0.0.1:{port}
  default_backend vrypt
"""
    )
    log = where / "haproxy.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [HAPROXY, "-f", str(where / "haproxy.cfg"), "-db"],  # type: ignore[list-item]
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(5)


def curl_through(port: int, source: str, local_port: int) -> str:
    out = subprocess.run(
        [
            *("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"),
            *("--interface", source, "--local-port", str(local_port)),
            f"http://127.0.0.1:{port}/p",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize(
    ("server_options", "checks"),
    [
        ("send-proxy", False),
        ("send-proxy-v2", False),
        ("send-proxy", True),  # checks without a header: plain HTTP, served as such
        ("send-proxy check-send-proxy", True),  # v1 checks: the check's own addresses
        ("send-proxy-v2 check-send-proxy", True),  # v2 checks: LOCAL
    ],
)
def test_behind_haproxy(tmp: Path, server_options: str, checks: bool) -> None:
    """curl from 127.0.0.2 (a port of its own) through HAProxy: the access log shows curl's
    address and port, not HAProxy's; health checks keep the server up."""
    log = tmp / "access.log"
    server_cm = running(*logged(log, "--proxy-protocol", "auto"))
    with server_cm as server, haproxy(server.port, server_options, checks) as (port, hap_log):
        if checks:
            deadline = time.monotonic() + 10
            while "/health" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
        local_ports = [free_port() for _ in range(3)]
        codes = [curl_through(port, "127.0.0.2", local) for local in local_ports]
        assert codes == ["200"] * 3, hap_log.read_text()
        lines = lines_of(log, 3, pattern=" /p ")
        text = hap_log.read_text()
        assert "DOWN" not in text, text
    assert lines == [f"127.0.0.2 127.0.0.2 {local} /p 200" for local in local_ports]
    if checks:
        checks_seen = [line for line in log.read_text().splitlines() if "/health" in line]
        assert checks_seen and all(line.startswith("127.0.0.1 ") for line in checks_seen)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize("alpn", ["http/1.1", "h2"])
def test_behind_haproxy_over_tls(tmp: Path, certs, alpn: str) -> None:  # noqa: F811
    """HAProxy re-encrypting to the worker (`ssl send-proxy-v2`): its header in cleartext, then
    its TLS handshake (HTTP/1.1 or HTTP/2 by ALPN), as load balancers send them."""
    log = tmp / "access.log"
    args = ("--access-logfile", str(log), "--access-logformat", LOG_FORMAT + " %(H)s")
    args += ("--proxy-protocol", "auto", "--http-protocols", "h2,h1")
    options = f"ssl verify none alpn {alpn} send-proxy-v2"
    with (
        tls_server(certs, *args) as server,
        haproxy(server.port, options, checks=False) as (port, hap_log),
    ):
        local_ports = [free_port() for _ in range(2)]
        codes = [curl_through(port, "127.0.0.2", local) for local in local_ports]
        assert codes == ["200"] * 2, hap_log.read_text()
        lines = lines_of(log, 2, pattern=" /p ")
    version = "HTTP/2.0" if alpn == "h2" else "HTTP/1.1"
    assert lines == [f"127.0.0.2 127.0.0.2 {local} /p 200 {version}" for local in local_ports]

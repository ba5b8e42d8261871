"""HTTP/2 in cleartext (h2c) against a real gunicorn: real clients (curl, nghttp, h2load, httpx,
node), the `h2` package's client over real sockets, and gunicorn's own negotiation rules."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from hyperframe.frame import SettingsFrame

from tests import h2_peer
from tests.h2client import H2Client, is_vrypt_h2
from tests.support import Server, StrictReader, running
from tests.test_metrics import Collector, metrics_env

H2C = ("--http-protocols", "h2,h1", "--http2-cleartext", "both")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(*H2C) as srv:
        yield srv


def run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return run("curl", "--silent", "--show-error", "--max-time", "10", *args)


def test_curl_prior_knowledge_get_head_post(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/any?q=1"
    get = curl("--http2-prior-knowledge", "-i", url)
    assert get.returncode == 0, get.stderr
    head, body = get.stdout.split("\n\n", 1)  # text mode turned CRLF into LF
    assert head.startswith("HTTP/2 200"), head
    assert body == "Vrypt"
    fields = head.lower()
    assert "content-type: text/plain" in fields and "content-length: 5" in fields
    assert "server: vrypt" in fields and "date: " in fields
    assert "connection:" not in fields  # connection-specific fields are forbidden in h2
    head_only = curl("--http2-prior-knowledge", "-I", url)
    assert head_only.stdout.startswith("HTTP/2 200") and "content-length: 5" in head_only.stdout
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"):
        answer = curl("--http2-prior-knowledge", "-X", method, "--data-binary", "x" * 100_000, url)
        assert answer.stdout == "Vrypt", (method, answer.stderr)


def test_curl_upgrade_h2c(server: Server) -> None:
    answer = curl("--http2", "-v", f"http://127.0.0.1:{server.port}/up")
    assert answer.returncode == 0, answer.stderr
    assert "101 Switching Protocols" in answer.stderr
    assert "HTTP/2 200" in answer.stderr
    assert answer.stdout == "Vrypt"


def test_curl_upgrade_with_a_body_and_head(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/"
    post = curl("--http2", "-v", "--data-binary", "y" * 1000, url)
    assert post.stdout == "Vrypt", post.stderr
    head = curl("--http2", "-I", url)
    assert head.returncode == 0, head.stderr
    assert "HTTP/2 200" in head.stdout and "content-length: 5" in head.stdout


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp is not installed")
def test_nghttp_prior_knowledge_and_upgrade(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}/n"
    for extra in ((), ("-u",)):
        verbose = run("nghttp", "-v", *extra, url, url + "2", url + "3")
        assert verbose.returncode == 0, verbose.stdout + verbose.stderr
        assert verbose.stdout.count(":status: 200") == 3, verbose.stdout
        bodies = run("nghttp", *extra, url, url + "2", url + "3")
        assert bodies.returncode == 0 and bodies.stdout == "Vrypt" * 3, bodies


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed")
def test_h2load_many_streams_no_errors(server: Server) -> None:
    answer = run("h2load", "-c", "10", "-m", "10", "-n", "5000", f"http://127.0.0.1:{server.port}/")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert re.search(r"5000 succeeded, 0 failed, 0 errored", answer.stdout), answer.stdout
    assert re.search(r"status codes: 5000 2xx", answer.stdout), answer.stdout


def test_httpx_prior_knowledge_concurrent(server: Server) -> None:
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        for path in ("/a", "/b?c=d"):
            answer = client.get(f"http://127.0.0.1:{server.port}{path}")
            assert answer.http_version == "HTTP/2"
            assert answer.status_code == 200 and answer.text == "Vrypt"
        big = client.post(f"http://127.0.0.1:{server.port}/", content=b"z" * 300_000)
        assert big.status_code == 200 and big.text == "Vrypt"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_http2_client(server: Server) -> None:
    script = """
const http2 = require('http2');
const client = http2.connect(process.argv[1]);
let pending = 20, bodies = [];
for (let i = 0; i < 20; i++) {
  const req = client.request({':path': '/n' + i, ':method': i % 2 ? 'POST' : 'GET'});
  let body = '', status = 0;
  req.on('response', (h) => { status = h[':status']; });
  req.setEncoding('utf8');
  req.on('data', (c) => { body += c; });
  req.on('end', () => {
    bodies.push([status, body]);
    if (--pending === 0) { console.log(JSON.stringify(bodies)); client.close(); }
  });
  if (i % 2) req.write('x'.repeat(70000));
  req.end();
}
"""
    answer = run("node", "-e", script, f"http://127.0.0.1:{server.port}", timeout=30)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == [[200, "Vrypt"]] * 20


def test_streams_are_answered_concurrently_each_once(server: Server) -> None:
    client = H2Client.connect(server.port)
    try:
        ids = [client.request("HEAD" if i % 5 == 0 else "GET", f"/{i}") for i in range(50)]
        client.wait(ids)
        for i, stream_id in enumerate(ids):
            assert is_vrypt_h2(client.streams[stream_id], head=i % 5 == 0), stream_id
    finally:
        client.close()


def test_large_bodies_flow_control_and_a_slow_window(server: Server) -> None:
    # The client's own receive window is tiny: the server must split and wait for updates.
    client = H2Client.connect(server.port, window=2)
    try:
        ids = [client.request("POST", "/", body=b"b" * 1_000_000) for _ in range(3)]
        client.wait(ids, timeout=20)
        for stream_id in ids:
            assert is_vrypt_h2(client.streams[stream_id]), client.streams[stream_id]
    finally:
        client.close()


def test_ping_and_settings_are_acknowledged(server: Server) -> None:
    client = H2Client.connect(server.port)
    try:
        client.conn.ping(b"12345678")
        client.flush()
        deadline = time.monotonic() + 5
        while (not client.pings or not client.settings_acked) and time.monotonic() < deadline:
            client.receive_some()
        assert client.pings == [b"12345678"] and client.settings_acked
    finally:
        client.close()


def test_http1_still_served_on_an_h2c_port(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nHEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        reader = StrictReader(sock)
        first, second = reader.read(), reader.read(head_request=True)
        assert first is not None and first.status == 200 and first.body == b"Vrypt"
        assert second is not None and second.status == 200 and second.body == b""


def read_to_eof(sock: socket.socket, limit: float = 5.0) -> bytes:
    sock.settimeout(limit)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_prior_knowledge_only_port_refuses_http1_with_goaway() -> None:
    # Issue 22: a trusted peer served HTTP/2 only that does not send the preface gets HTTP/2
    # frames only (our SETTINGS, GOAWAY(PROTOCOL_ERROR)) and the close, RFC 9113 §3.4; the
    # original answered an HTTP/1.1 400.
    with running("--http-protocols", "h2,h1", "--http2-cleartext", "prior-knowledge") as srv:
        with srv.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            got = read_to_eof(sock)
        frames = h2_peer.parse(got)  # raises on anything that is not whole HTTP/2 frames
        assert isinstance(frames[0], SettingsFrame), frames
        assert h2_peer.goaway_code(got) == 1, frames  # PROTOCOL_ERROR
        client = H2Client.connect(srv.port)
        try:
            stream_id = client.request()
            client.wait([stream_id])
            assert is_vrypt_h2(client.streams[stream_id])
        finally:
            client.close()
        # Upgrade is a mechanism of its own: not honoured on a prior-knowledge-only port.
        upgraded = curl("--http2", "-v", f"http://127.0.0.1:{srv.port}/")
        assert "101 Switching Protocols" not in upgraded.stderr


def test_upgrade_only_port_does_not_sniff_the_preface() -> None:
    with running("--http-protocols", "h2,h1", "--http2-cleartext", "upgrade") as srv:
        upgraded = curl("--http2", "-v", f"http://127.0.0.1:{srv.port}/")
        assert "101 Switching Protocols" in upgraded.stderr and upgraded.stdout == "Vrypt"
        prior = curl("--http2-prior-knowledge", f"http://127.0.0.1:{srv.port}/")
        assert prior.stdout != "Vrypt"


def test_untrusted_peer_gets_no_h2c() -> None:
    # h2c is for the trusted proxy in front (forwarded_allow_ips), exactly as gunicorn decides.
    with running(*H2C, "--forwarded-allow-ips", "10.9.8.7") as srv:
        prior = curl("--http2-prior-knowledge", f"http://127.0.0.1:{srv.port}/")
        assert prior.stdout != "Vrypt"
        upgraded = curl("--http2", "-v", f"http://127.0.0.1:{srv.port}/")
        assert "101 Switching Protocols" not in upgraded.stderr
        assert upgraded.stdout == "Vrypt"  # answered as HTTP/1.1


def test_h2c_off_by_default_even_with_h2_in_http_protocols() -> None:
    with running("--http-protocols", "h2,h1") as srv:
        upgraded = curl("--http2", "-v", f"http://127.0.0.1:{srv.port}/")
        assert "101 Switching Protocols" not in upgraded.stderr
        assert upgraded.stdout == "Vrypt"


def test_term_sends_goaway_and_answers_what_came_before() -> None:
    srv = running(*H2C, "--graceful-timeout", "5")
    with srv as server:
        client = H2Client.connect(server.port)
        try:
            first = client.request()
            client.wait([first])
            server.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while client.goaway is None and time.monotonic() < deadline:
                if not client.receive_some():
                    break
            assert client.goaway is not None, "no GOAWAY before the close"
            assert client.goaway.error_code == 0
            assert client.goaway.last_stream_id >= first
            assert is_vrypt_h2(client.streams[first])
        finally:
            client.close()


def test_max_requests_sends_goaway_after_the_last_stream_it_answers() -> None:
    with running(*H2C, "--max-requests", "30") as srv:
        client = H2Client.connect(srv.port)
        try:
            ids = [client.request() for _ in range(50)]
            deadline = time.monotonic() + 10
            while client.goaway is None and time.monotonic() < deadline:
                if not client.receive_some():
                    break
            assert client.goaway is not None
            last = client.goaway.last_stream_id
            # Every stream up to the last one announced is answered, once; none after it.
            while time.monotonic() < deadline and not client.closed:
                if all(
                    client.streams[s].ended or client.streams[s].reset is not None
                    for s in ids
                    if s <= last
                ):
                    break
                client.receive_some()
            answered = [s for s in ids if client.streams[s].responses]
            assert answered == [s for s in ids if s <= last]
            assert all(is_vrypt_h2(client.streams[s]) for s in answered)
        finally:
            client.close()
        # The worker recycles and its successor answers.
        again = curl("--http2-prior-knowledge", f"http://127.0.0.1:{srv.port}/")
        assert again.stdout == "Vrypt"


def frames_until_close(sock: socket.socket, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """(type, payload) of every frame the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def test_garbage_after_the_preface_closes_with_goaway_and_the_worker_lives(server: Server) -> None:
    with server.connect() as sock:
        # A frame header claiming a 16 MB HEADERS frame on stream 1: FRAME_SIZE_ERROR.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64)
        frames = frames_until_close(sock)
    goaways = [payload for kind, payload in frames if kind == 7]
    assert goaways, frames
    assert int.from_bytes(goaways[0][4:8], "big") != 0  # an error code, not NO_ERROR
    assert curl("--http2-prior-knowledge", f"http://127.0.0.1:{server.port}/").stdout == "Vrypt"


def test_h2_streams_are_counted_in_the_rps_gauges() -> None:
    collector = Collector()
    try:
        interval = 0.2
        with running(*H2C, workers=2, env=metrics_env(collector, interval)) as srv:
            sent = 0
            for _ in range(6):
                client = H2Client.connect(srv.port)
                try:
                    ids = [client.request() for _ in range(9)]
                    client.wait(ids)
                    assert all(is_vrypt_h2(client.streams[s]) for s in ids)
                    sent += len(ids)
                finally:
                    client.close()
            total = collector.wait_sum(sent + 1, interval)  # + the ready probe (HTTP/1)
            assert total == sent + 1
    finally:
        collector.close()


def test_rapid_reset_over_a_socket_ends_with_enhance_your_calm_and_others_are_served(
    server: Server,
) -> None:
    """CVE-2023-44487: streams opened and reset at once, thousands of them, on a real socket."""
    client = H2Client.connect(server.port)
    try:
        for _ in range(2000):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                stream_id,
                [(":method", "GET"), (":scheme", "http"), (":authority", "t"), (":path", "/")],
            )
            client.conn.reset_stream(stream_id)
        try:
            client.flush()
        except OSError:
            pass  # the server may have closed already
        deadline = time.monotonic() + 10
        while client.goaway is None and time.monotonic() < deadline:
            if not client.receive_some():
                break
        assert client.goaway is not None and client.goaway.error_code == 0xB  # ENHANCE_YOUR_CALM
    finally:
        client.sock.close()
    assert curl("--http2-prior-knowledge", f"http://127.0.0.1:{server.port}/").stdout == "Vrypt"


def test_a_zero_window_client_does_not_delay_others(server: Server) -> None:
    stalled = H2Client.connect(server.port, window=0)
    try:
        ids = [stalled.request() for _ in range(50)]
        started = time.monotonic()
        for _ in range(20):
            assert (
                curl("--http2-prior-knowledge", f"http://127.0.0.1:{server.port}/").stdout
                == "Vrypt"
            )
        assert time.monotonic() - started < 5
        # Its answers are held: HEADERS sent, DATA waiting for a window it never opens.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(stalled.streams[s].responses for s in ids):
            stalled.receive_some()
        assert all(stalled.streams[s].responses == 1 for s in ids)
        assert not any(stalled.streams[s].body for s in ids)
    finally:
        stalled.sock.close()


def test_gunicorn_http2_limits_are_advertised_and_enforced() -> None:
    limits = (
        "--http2-max-concurrent-streams",
        "3",
        "--http2-initial-window-size",
        "100000",
        "--http2-max-frame-size",
        "32768",
        "--http2-max-header-list-size",
        "4096",
    )
    with running(*H2C, *limits) as srv:
        client = H2Client.connect(srv.port)
        try:
            stream_id = client.request()
            client.wait([stream_id])
            remote = client.conn.remote_settings
            assert remote.max_concurrent_streams == 3
            assert remote.initial_window_size == 100000
            assert remote.max_frame_size == 32768
            assert remote.max_header_list_size == 4096
            # A header list over the limit: 431 on that stream, and the connection goes on.
            big = client.request(extra=[("x-big", "v" * 5000)])
            client.wait([big])
            assert client.streams[big].status == 431
            after = client.request()
            client.wait([after])
            assert is_vrypt_h2(client.streams[after])
        finally:
            client.close()
        # More open streams than allowed: the extra ones are refused (REFUSED_STREAM), the
        # others answered. Streams stay open while their request bodies are unfinished.
        client = H2Client.connect(srv.port)
        try:
            client.conn.remote_settings.max_concurrent_streams = 100  # let the client exceed it
            ids = [client.request("POST", body=b"x", end=False) for _ in range(5)]
            deadline = time.monotonic() + 5
            while (
                time.monotonic() < deadline
                and sum(client.streams[s].reset is not None for s in ids) < 2
            ):
                client.receive_some()
            assert [client.streams[s].reset for s in ids] == [None, None, None, 7, 7]
        finally:
            client.sock.close()


def test_access_log_on_an_h2c_port_logs_http1_and_http2(tmp_path) -> None:
    log = tmp_path / "access.log"
    with running(*H2C, "--access-logfile", str(log)) as srv:
        with srv.connect() as sock:
            sock.sendall(b"GET /logged-h1 HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = StrictReader(sock).read()
            assert answer is not None and answer.status == 200
        client = H2Client.connect(srv.port)
        try:
            client.wait([client.request("GET", "/logged-h2")])
        finally:
            client.close()
        assert "access log does not cover" not in srv.log  # the old warning is gone
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if log.exists() and "/logged-h2" in log.read_text():
                break
            time.sleep(0.1)
        text = log.read_text()
        assert '"GET /logged-h1 HTTP/1.1" 200 5' in text
        assert '"GET /logged-h2 HTTP/2.0" 200 5' in text


def answers_to_one_big_write(sock: socket.socket, tls: bool, count: int = 5000) -> set[int]:
    """`count` HEAD requests in one write (about 65 KB: many times what one call answers), then
    read until every stream has its answer (or 20 s pass): the stream ids answered."""
    from bench.h2_attacks import END_HEADERS, END_STREAM, HEADERS, PREFACE, frame, request_block
    from bench.h2_attacks import settings as settings_frame

    block = request_block(b"HEAD", tls=tls)
    requests = b"".join(
        frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, block) for i in range(count)
    )
    sock.settimeout(20)
    sock.sendall(PREFACE + settings_frame() + requests)
    answered: set[int] = set()
    buf = b""
    deadline = time.monotonic() + 20
    while len(answered) < count and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length = int.from_bytes(buf[:3], "big")
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            if buf[3] == HEADERS and buf[4] & END_STREAM:
                assert stream not in answered, f"stream {stream} answered twice"
                answered.add(stream)
            buf = buf[9 + length :]
    return answered


def test_one_write_of_thousands_of_requests_is_answered_whole(server: Server) -> None:
    """The answers of one big read go out a batch at a time (ANSWERS_PER_CALL, then
    transport.SessionConnection.more): every request is answered exactly once."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        answered = answers_to_one_big_write(sock, tls=False)
    assert answered == {2 * i + 1 for i in range(5000)}, len(answered)

"""HTTP/2 over TLS, chosen by ALPN from `http_protocols`: real clients (curl, nghttp, h2load,
httpx, node) and the `h2` package's client over a real TLS socket."""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.h2client import H2Client, is_vrypt_h2
from tests.support import Server
from tests.test_tls import certs, client_context, tls_connect, tls_server  # noqa: F401

H2_FIRST = ("--http-protocols", "h2,h1")


@pytest.fixture(scope="module")
def server(certs: dict[str, Path]) -> Iterator[Server]:  # noqa: F811
    with tls_server(certs, *H2_FIRST) as srv:
        yield srv


def run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_alpn_follows_http_protocols_order(certs) -> None:  # noqa: F811
    with (
        tls_server(certs, *H2_FIRST) as srv,
        tls_connect(srv, client_context(certs, alpn=["http/1.1", "h2"])) as sock,
    ):
        assert sock.selected_alpn_protocol() == "h2"
    with tls_server(certs, "--http-protocols", "h1,h2") as srv:
        with tls_connect(srv, client_context(certs, alpn=["h2", "http/1.1"])) as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
        with tls_connect(srv, client_context(certs, alpn=["h2"])) as sock:
            assert sock.selected_alpn_protocol() == "h2"
    with (
        tls_server(certs) as srv,  # the default, h1 only: h2 never offered
        tls_connect(srv, client_context(certs, alpn=["h2"])) as sock,
    ):
        assert sock.selected_alpn_protocol() is None


def test_curl_https_http2(server: Server, certs) -> None:  # noqa: F811
    url = f"https://127.0.0.1:{server.port}/a"
    answer = run("curl", "-si", "--http2", "--cacert", str(certs["ca"]), url, url + "b")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.count("HTTP/2 200") == 2 and answer.stdout.count("Vrypt") == 2
    head = run("curl", "-sI", "--http2", "--cacert", str(certs["ca"]), url)
    assert head.stdout.startswith("HTTP/2 200") and "content-length: 5" in head.stdout


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed")
def test_nghttp_and_h2load_over_tls(server: Server) -> None:
    url = f"https://127.0.0.1:{server.port}/"
    bodies = run("nghttp", url, url + "x", url + "y")
    assert bodies.returncode == 0 and bodies.stdout == "Vrypt" * 3, bodies
    load = run("h2load", "-c", "10", "-m", "10", "-n", "3000", url)
    assert load.returncode == 0, load.stdout + load.stderr
    assert "Application protocol: h2" in load.stdout
    assert re.search(r"3000 succeeded, 0 failed, 0 errored", load.stdout), load.stdout


def test_httpx_http2_over_tls(server: Server, certs) -> None:  # noqa: F811
    verify = ssl.create_default_context(cafile=str(certs["ca"]))
    with httpx.Client(http2=True, verify=verify, timeout=10) as client:
        for _ in range(3):
            answer = client.post(f"https://127.0.0.1:{server.port}/p", content=b"q" * 200_000)
            assert answer.http_version == "HTTP/2"
            assert answer.status_code == 200 and answer.text == "Vrypt"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_http2_over_tls(server: Server, certs) -> None:  # noqa: F811
    script = """
const http2 = require('http2'); const fs = require('fs');
const client = http2.connect(process.argv[1], {ca: fs.readFileSync(process.argv[2])});
let pending = 10, out = [];
for (let i = 0; i < 10; i++) {
  const req = client.request({':path': '/' + i});
  let body = '', status = 0;
  req.on('response', (h) => { status = h[':status']; });
  req.setEncoding('utf8');
  req.on('data', (c) => { body += c; });
  req.on('end', () => { out.push([status, body]); if (--pending === 0) {
    console.log(JSON.stringify(out)); client.close(); } });
  req.end();
}
"""
    answer = run("node", "-e", script, f"https://127.0.0.1:{server.port}", str(certs["ca"]))
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == [[200, "Vrypt"]] * 10


def test_h2_client_many_streams_over_tls(server: Server, certs) -> None:  # noqa: F811
    sock = tls_connect(server, client_context(certs, alpn=["h2"]))
    client = H2Client.connect(server.port, sock=sock)
    try:
        ids = [client.request("HEAD" if i % 3 == 0 else "GET", f"/{i}") for i in range(40)]
        client.wait(ids)
        for i, stream_id in enumerate(ids):
            assert is_vrypt_h2(client.streams[stream_id], head=i % 3 == 0)
    finally:
        client.close()


def test_term_sends_goaway_over_tls(certs) -> None:  # noqa: F811
    with tls_server(certs, *H2_FIRST, "--graceful-timeout", "5") as srv:
        sock = tls_connect(srv, client_context(certs, alpn=["h2"]))
        client = H2Client.connect(srv.port, sock=sock)
        try:
            first = client.request()
            client.wait([first])
            srv.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while client.goaway is None and time.monotonic() < deadline:
                if not client.receive_some():
                    break
            assert client.goaway is not None and client.goaway.error_code == 0
            assert client.goaway.last_stream_id >= first
        finally:
            client.close()


def test_one_write_of_thousands_of_requests_is_answered_whole_over_tls(server, certs) -> None:  # noqa: F811
    from tests.test_h2 import answers_to_one_big_write

    with tls_connect(server, client_context(certs, alpn=["h2"])) as sock:
        answered = answers_to_one_big_write(sock, tls=True)
    assert answered == {2 * i + 1 for i in range(5000)}, len(answered)

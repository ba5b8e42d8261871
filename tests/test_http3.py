"""HTTP/3 live (issue 23): real gunicorn with certfile/keyfile and VRYPT_HTTP3 on, aioquic's
HTTP/3 client (tests/h3client.py) over real UDP sockets on 127.0.0.1.

GET, HEAD (no body), POST with bodies (read and dropped), many streams and connections at once,
several workers; the answers over TLS (HTTP/1.1 and h2) carry Alt-Svc; the RPS gauge and the
access log count HTTP/3 answers; a start without TLS, or with a bad value, is refused.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("aioquic")

import httpx

from tests.h3client import Request, SocketClient, fetch, fetch_async, is_vrypt
from tests.support import CONF, Server, StrictReader, base_env, free_port, start_server
from tests.test_metrics import Collector, metrics_env
from tests.test_tls import certs, client_context, tls_connect, tls_server  # noqa: F401

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def h3_env(**extra: str) -> dict[str, str]:
    return base_env(VRYPT_HTTP3="1", **extra)


@pytest.fixture(scope="module")
def server(certs: dict[str, Path]) -> Iterator[Server]:  # noqa: F811
    with tls_server(certs, "--http-protocols", "h2,h1", env=h3_env()) as running:
        yield running


def test_get_head_and_post_over_http3(server: Server, certs) -> None:  # noqa: F811
    answers = fetch(
        server.port,
        [Request(), Request(b"HEAD"), Request(b"POST", body=b"x" * 1000), Request(path=b"/a?b")],
        cafile=str(certs["ca"]),
    )
    assert is_vrypt(answers[0])
    assert is_vrypt(answers[1], head=True)
    assert is_vrypt(answers[2])
    assert is_vrypt(answers[3])
    assert answers[0].header(b"server") == b"vrypt"
    assert re.fullmatch(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", answers[0].header(b"date"))
    assert answers[0].header(b"alt-svc") is None  # said over TCP, not over HTTP/3 itself


@pytest.mark.parametrize("size", [70_000, 3_000_000])
def test_request_bodies_are_dropped_without_stalling(server: Server, size: int) -> None:
    """3 MB is three times aioquic's initial windows: a server that does not widen them would
    leave the client waiting for flow-control credit."""
    [answer] = fetch(server.port, [Request(b"POST", body=b"y" * size)], timeout=30)
    assert is_vrypt(answer)


def test_many_streams_on_one_connection_and_many_connections(server: Server) -> None:
    """300 streams at once (aioquic allows 128 concurrent: the rest wait for the server to
    raise the limit as streams end), then 8 connections of 40 streams each, concurrently."""
    answers = fetch(server.port, [Request(path=b"/%d" % n) for n in range(300)], timeout=30)
    assert len(answers) == 300 and all(is_vrypt(answer) for answer in answers)

    async def together() -> list[list]:
        return await asyncio.gather(
            *(fetch_async(server.port, [Request()] * 40, timeout=30) for _ in range(8))
        )

    batches = asyncio.run(together())
    assert sum(1 for batch in batches for answer in batch if is_vrypt(answer)) == 320


def test_tls_answers_carry_alt_svc(server: Server, certs) -> None:  # noqa: F811
    alt_svc = f'h3=":{server.port}"'
    with tls_connect(server, client_context(certs)) as sock:
        sock.sendall(GET)
        response = StrictReader(sock).read()
    assert response is not None and response.status == 200
    assert response.header(b"alt-svc") == alt_svc.encode()
    with httpx.Client(http2=True, verify=client_context(certs)) as client:
        answer = client.get(f"https://127.0.0.1:{server.port}/")
    assert answer.http_version == "HTTP/2" and answer.text == "Vrypt"
    assert answer.headers["alt-svc"] == alt_svc


def test_the_start_line_says_where(server: Server) -> None:
    line = server.wait_for_log(r"HTTP/3 on, at (\S+) \((.*?)\)")
    assert line.group(1).rstrip(",") == f"udp://127.0.0.1:{server.port}"
    assert "per worker slot" in line.group(2)


def test_off_by_default_no_alt_svc_no_udp(certs) -> None:  # noqa: F811
    with tls_server(certs) as plain_tls:
        with tls_connect(plain_tls, client_context(certs)) as sock:
            sock.sendall(GET)
            response = StrictReader(sock).read()
        assert response is not None and response.header(b"alt-svc") is None
        assert "HTTP/3" not in plain_tls.log
        with pytest.raises((TimeoutError, ConnectionError, OSError)):
            fetch(plain_tls.port, [Request()], timeout=2)


def test_several_workers_each_answer_their_connections(certs) -> None:  # noqa: F811
    with tls_server(certs, workers=3, env=h3_env()) as srv:

        async def together() -> list[list]:
            return await asyncio.gather(
                *(fetch_async(srv.port, [Request(), Request(b"HEAD")]) for _ in range(12))
            )

        batches = asyncio.run(together())
        assert all(is_vrypt(get) and is_vrypt(head, head=True) for get, head in batches)


def test_own_sockets_without_slots_and_the_rps_gauge(certs) -> None:  # noqa: F811
    """VRYPT_REUSE_PORT=0 (no listener slots): each worker binds its own UDP socket; the
    answers count in the RPS gauge as TCP ones do."""
    collector = Collector()
    try:
        env = metrics_env(collector, 0.2, VRYPT_HTTP3="1")
        with tls_server(certs, env=env) as srv:
            assert "each worker binds its own" in srv.log
            before = collector.wait_sum(1, 0.2)  # the readiness probe's answer(s)
            answers = fetch(srv.port, [Request()] * 50)
            assert all(is_vrypt(answer) for answer in answers)
            assert collector.wait_sum(before + 50, 0.2) == before + 50
    finally:
        collector.close()


def test_the_access_log_says_http_3(certs, tmp_path: Path) -> None:  # noqa: F811
    log = tmp_path / "access.log"
    with tls_server(certs, "--access-logfile", str(log), env=h3_env()) as srv:
        fetch(srv.port, [Request(path=b"/h3?x=1"), Request(b"HEAD", path=b"/h")])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and log.read_text().count("HTTP/3.0") < 2:
            time.sleep(0.05)
        lines = [line for line in log.read_text().splitlines() if "HTTP/3.0" in line]
    assert any('"GET /h3?x=1 HTTP/3.0" 200 5' in line for line in lines), lines
    assert any('"HEAD /h HTTP/3.0" 200 0' in line for line in lines), lines


def _refused(*args: str, env: dict[str, str], conf: bool = True) -> Server:
    server = start_server(*args, env=env, ready=False, conf=conf)
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.stop()
        raise AssertionError(f"a refused start kept running:\n{server.log}") from None
    return server


def test_refused_without_tls() -> None:
    server = _refused(env=h3_env())
    assert server.proc.returncode == 2, server.log
    assert "$VRYPT_HTTP3: HTTP/3 needs TLS: set certfile and keyfile" in server.log


def test_a_bad_value_is_refused() -> None:
    server = _refused(env=base_env(VRYPT_HTTP3="maybe"))
    assert server.proc.returncode == 2, server.log
    assert "$VRYPT_HTTP3='maybe': expected 1/0" in server.log


def test_the_conf_file_twin(certs, tmp_path: Path) -> None:  # noqa: F811
    conf = tmp_path / "h3.conf.py"
    conf.write_text(f"exec(open({str(CONF)!r}).read())\nvrypt_http3 = True\n")
    without_tls = _refused("-c", str(conf), env=base_env(), conf=False)
    assert without_tls.proc.returncode == 2
    assert "vrypt_http3: HTTP/3 needs TLS" in without_tls.log
    with tls_server(certs, "-c", str(conf), conf=False) as srv:
        assert is_vrypt(fetch(srv.port, [Request()])[0])
    # the environment wins over the conf file
    with tls_server(certs, "-c", str(conf), conf=False, env=base_env(VRYPT_HTTP3="0")) as srv:
        assert "HTTP/3 on" not in srv.log


@pytest.mark.parametrize("new_connection_id", [False, True], ids=["nat-rebinding", "migration"])
def test_a_client_that_changes_its_port_keeps_reaching_its_worker(
    certs,  # noqa: F811
    new_connection_id: bool,
) -> None:
    """Four workers, each with its slot's UDP socket in one reuseport group: the kernel's hash
    of a new address picks any of them, so without steering by connection ID a moved client
    reaches its own worker one time in four. Eight moves in a row, each followed by a request
    that must be answered: by chance about 1 in 65,000."""
    with tls_server(certs, workers=4, env=h3_env()) as srv:
        time.sleep(0.5)  # every worker reading its slot's socket
        client = SocketClient(srv.port, cafile=str(certs["ca"]))
        try:
            client.connect()
            assert is_vrypt(client.get())
            ports = {client.local_port}
            for _ in range(8):
                client.rebind(new_connection_id)
                ports.add(client.local_port)
                assert is_vrypt(client.get(timeout=3))
            assert len(ports) == 9
        finally:
            client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["term", "hup"])
def test_drain_sends_goaway_and_closes_cleanly(certs, sig: int) -> None:  # noqa: F811
    """TERM (the server's stop) and HUP (new workers, the old ones drain): an open HTTP/3
    connection gets GOAWAY naming the first stream not processed, then CONNECTION_CLOSE with
    H3_NO_ERROR once its answers are acknowledged, well before graceful_timeout; after HUP a
    new connection is answered by the new workers."""
    with tls_server(certs, "--graceful-timeout", "20", workers=2, env=h3_env()) as srv:
        time.sleep(0.3)
        client = SocketClient(srv.port, cafile=str(certs["ca"]))
        try:
            client.connect()
            assert is_vrypt(client.get())
            assert is_vrypt(client.get(b"HEAD"), head=True)
            began = time.monotonic()
            srv.signal(sig)
            closed = client.wait_closed(timeout=10)
            assert time.monotonic() - began < 5
            assert closed.error_code == 0x100, closed  # H3_NO_ERROR
            assert client.h3.goaway == 8  # streams 0 and 4 were answered
        finally:
            client.sock.close()
        if sig == signal.SIGTERM:
            srv.proc.wait(10)
            assert srv.proc.returncode == 0
        else:
            assert is_vrypt(fetch(srv.port, [Request()])[0])


def test_a_taken_udp_port_is_refused(certs) -> None:  # noqa: F811
    """Another process on the UDP port: the start fails in the arbiter, naming it."""
    import socket

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        server = start_server(
            "--certfile", str(certs["cert"]), "--keyfile", str(certs["key"]),
            port=port, env=h3_env(), ready=False,
        )  # fmt: skip
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.stop()
            raise AssertionError(f"kept running:\n{server.log}") from None
    assert server.proc.returncode == 2, server.log
    assert f"HTTP/3 cannot bind UDP udp://127.0.0.1:{port}" in server.log


def test_max_requests_recycles_and_every_request_is_answered_on_a_retry(certs) -> None:  # noqa: F811
    """max_requests counts HTTP/3 answers: the worker recycles every 40, with its successor
    on the slot's UDP socket. A client that does what browsers do (a request refused after a
    GOAWAY, or a connection closed under it, is retried on a new connection) gets all of its
    300 answers, each within a bound: no request waits out a timeout."""
    with tls_server(certs, "--max-requests", "40", env=h3_env()) as srv:
        first_pids = set(srv.worker_pids())
        answered = retried = 0
        began = time.monotonic()
        while answered < 300:
            assert time.monotonic() - began < 60, f"{answered} answered, {retried} retried"
            client = SocketClient(srv.port, cafile=str(certs["ca"]))
            try:
                client.connect(timeout=3)
                for _ in range(15):
                    answer = client.try_get(timeout=3)
                    if answer is None:
                        retried += 1
                        break
                    assert is_vrypt(answer)
                    answered += 1
            finally:
                client.sock.close()
        assert answered >= 300
        assert set(srv.worker_pids()) - first_pids, "the worker never recycled"
        assert "Autorestarting worker" in srv.log


def test_ttou_leaves_no_udp_socket_unread(certs) -> None:  # noqa: F811
    """After TTOU the slot of the worker that left is adopted by one of the others, its UDP
    socket too: a new connection the kernel hashes to that socket is answered (without the
    adoption, about one in three of them would never hear back)."""
    with tls_server(certs, workers=3, env=h3_env()) as srv:
        srv.signal(signal.SIGTTOU)
        deadline = time.monotonic() + 10
        while len(srv.worker_pids()) != 2:
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.05)
        time.sleep(0.6)  # the others adopt the orphaned slot on their next clock tick
        for _ in range(24):  # a new client port each: the hash spreads them over 3 sockets
            client = SocketClient(srv.port, cafile=str(certs["ca"]))
            try:
                client.connect(timeout=2)
                assert is_vrypt(client.get(timeout=2))
            finally:
                client.sock.close()


def test_alt_svc_goes_into_the_answer_once() -> None:
    """The answer over TCP carries Alt-Svc naming each port once; an operator's own Alt-Svc
    line wins; HTTP/3 off leaves the answer as it is."""
    from vrypt_worker import http3
    from vrypt_worker.answer import Answer

    plan = http3.Plan((("127.0.0.1", 8443), ("::1", 8443), ("127.0.0.1", 9443)), None)
    assert http3.advertised(Answer(), plan).headers == (b'Alt-Svc: h3=":8443", h3=":9443"',)
    own = Answer(headers=(b"alt-svc: clear",))
    assert http3.advertised(own, plan) is own
    assert http3.advertised(Answer(), None) == Answer()

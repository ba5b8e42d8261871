"""10,000 concurrent keep-alive connections on one worker: every one answered; latency, memory.

Heavy (minutes of nothing, seconds of work, 10,000 descriptors on each side): `-m heavy`.
The client raises its own open-file limit and drives every connection from one selector.
Figures (printed with -s) go to docs/reliability.md.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time

import pytest

from tests.support import is_vrypt, read_responses, running
from tests.test_reliability import cpu_seconds, percentile, rss_kb

GET = b"GET /scale HTTP/1.1\r\nHost: scale\r\n\r\n"
ANSWER_END = b"\r\n\r\nVrypt"
CONNECTIONS = 10_000


def open_connections(port: int, count: int, batch: int = 500) -> list[socket.socket]:
    """Non-blocking connects in batches (the listen backlog is 4096), each batch completed."""
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    while len(socks) < count:
        pending = set()
        for _ in range(min(batch, count - len(socks))):
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect_ex(("127.0.0.1", port))
            sel.register(sock, selectors.EVENT_WRITE)
            pending.add(sock)
        deadline = time.monotonic() + 30
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} connects pending"
            for key, _ in sel.select(1.0):
                sock = key.fileobj
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # type: ignore[union-attr]
                sel.unregister(sock)
                pending.discard(sock)  # type: ignore[arg-type]
                socks.append(sock)  # type: ignore[arg-type]
    sel.close()
    return socks


def round_trip_all(socks: list[socket.socket], timeout: float = 60) -> list[float]:
    """Every connection sends one request at once; the latency of each answer, in ms."""
    sel = selectors.DefaultSelector()
    sent_at: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytes] = {}
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    for sock in socks:
        sent_at[sock] = time.perf_counter()
        assert sock.send(GET) == len(GET)
        buffers[sock] = b""
    latencies: list[float] = []
    deadline = time.monotonic() + timeout
    while len(latencies) < len(socks):
        assert time.monotonic() < deadline, f"{len(socks) - len(latencies)} connections unanswered"
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            data = sock.recv(4096)  # type: ignore[union-attr]
            assert data, "a connection was closed"
            buffers[sock] += data  # type: ignore[index]
            if buffers[sock].endswith(ANSWER_END):  # type: ignore[index]
                assert buffers[sock].startswith(b"HTTP/1.1 200 OK\r\n")  # type: ignore[index]
                latencies.append((time.perf_counter() - sent_at[sock]) * 1000)  # type: ignore[index]
                sel.unregister(sock)
    sel.close()
    return latencies


def steady(socks: list[socket.socket], seconds: float) -> list[float]:
    """Each connection sends one request a second, the connections spread evenly over the
    second (10,000 requests a second in all); the latency of each answer, in ms."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    count = len(socks)
    sent_at: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytes] = {sock: b"" for sock in socks}
    latencies: list[float] = []
    started = time.perf_counter()
    due = 0  # requests sent so far; request i goes to socks[i % count] at started + i / count
    total = int(seconds * count)
    while len(latencies) < due or due < total:
        now = time.perf_counter()
        target = min(total, int((now - started) * count))
        while due < target:
            sock = socks[due % count]
            if sock not in sent_at:  # its previous answer is in (else skip this turn)
                sent_at[sock] = time.perf_counter()
                sock.send(GET)
            else:
                total -= 1
            due += 1
        for key, _ in sel.select(0.001):
            sock = key.fileobj
            data = sock.recv(4096)  # type: ignore[union-attr]
            assert data, "a connection was closed"
            buffers[sock] += data  # type: ignore[index]
            if buffers[sock].endswith(ANSWER_END):  # type: ignore[index]
                latencies.append((time.perf_counter() - sent_at.pop(sock)) * 1000)  # type: ignore[arg-type]
                buffers[sock] = b""  # type: ignore[index]
        assert time.perf_counter() - started < seconds + 30, "answers missing"
    sel.close()
    return latencies


def normal_client(port: int, seconds: float) -> list[float]:
    latencies = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.perf_counter()
            sock.sendall(GET)
            response = read_responses(sock, 1)
            latencies.append((time.perf_counter() - started) * 1000)
            assert is_vrypt(response[0])
    return latencies


def settled_rss(pid: int) -> int:
    """RSS once the worker has gone through a few sweeps (no more growth)."""
    time.sleep(2.5)
    return rss_kb(pid)


@pytest.mark.heavy
def test_ten_thousand_keep_alive_connections_on_one_worker() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < CONNECTIONS + 200:
        pytest.skip(f"open-file hard limit {hard} < {CONNECTIONS + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        with running(workers=1) as server:
            (worker,) = server.worker_pids()
            alone = normal_client(server.port, 2.0)
            idle_rss = settled_rss(worker)
            started = time.monotonic()
            socks = open_connections(server.port, CONNECTIONS)
            opened = time.monotonic() - started
            cpu = cpu_seconds(worker)
            first = round_trip_all(socks)
            second = round_trip_all(socks)
            burst_cpu = (cpu_seconds(worker) - cpu) / 2
            held_rss = settled_rss(worker)
            cpu = cpu_seconds(worker)
            paced = steady(socks, 5.0)
            paced_cpu = cpu_seconds(worker) - cpu
            beside = normal_client(server.port, 3.0)
            assert len(first) == len(second) == CONNECTIONS
            assert server.worker_pids() == [worker]
            third = round_trip_all(socks)  # still all open and answered after the idle period
            assert len(third) == CONNECTIONS
            for sock in socks:
                sock.close()
            assert "Traceback" not in server.log
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    per_connection = (held_rss - idle_rss) * 1024 / CONNECTIONS
    print(
        f"\n{CONNECTIONS} connections opened in {opened:.2f}s; all send at once: "
        f"p50/p99/max {percentile(first, 0.5):.1f}/{percentile(first, 0.99):.1f}/"
        f"{max(first):.1f} ms (first), "
        f"{percentile(second, 0.5):.1f}/{percentile(second, 0.99):.1f}/"
        f"{max(second):.1f} ms (second); worker CPU per burst {burst_cpu * 1000:.0f} ms\n"
        f"paced, each connection once a second ({len(paced)} requests in 5 s): p50/p99/max "
        f"{percentile(paced, 0.5):.2f}/{percentile(paced, 0.99):.2f}/{max(paced):.2f} ms, "
        f"worker CPU {paced_cpu / len(paced) * 1e6:.1f} us per request\n"
        f"worker RSS idle {idle_rss} kB, with {CONNECTIONS} idle keep-alive connections "
        f"{held_rss} kB: {per_connection:.0f} bytes per connection\n"
        f"one sequential client p50/p99: alone {percentile(alone, 0.5):.3f}/"
        f"{percentile(alone, 0.99):.3f} ms, beside {CONNECTIONS} idle connections "
        f"{percentile(beside, 0.5):.3f}/{percentile(beside, 0.99):.3f} ms"
    )
    assert idle_rss <= 32 * 1024, f"idle worker RSS {idle_rss} kB > 32 MB"
    assert per_connection <= 2048, f"{per_connection:.0f} bytes per idle connection > 2 KB"

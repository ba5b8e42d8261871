"""Hostile and unlucky clients against each server, side by side in one run (issue 14).

    python -m bench.hostile [--servers vrypt,nginx] [--connections 1000]
                            [--patterns steady,nonreaders,bigheads,chunks1]

Each pattern runs against each server in turn, with its default settings (vrypt:
conf/gunicorn.conf.py, nginx: bench/servers.py's configuration), one worker pinned to the first
CPU; the clients run unpinned. Figures (worker RSS and CPU from /proc, a bystander's latency)
are printed as a markdown table: docs/reliability.md, "Hostile clients".
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.scenarios import Placement, available_cpus
from bench.servers import BUILTIN, RunningServer, running

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def workers(server: RunningServer) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(pid) for pid in out.split()]


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def read_answer(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """One answer with a Content-Length (b"" when the connection ended first), and the rest."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return b"", buf
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            return b"", buf
        rest += data
    return head, rest[length:]


def bystander(port: int, seconds: float) -> list[float]:
    """Latencies (ms) of sequential keep-alive GETs for `seconds`."""
    latencies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                sock.sendall(GET)
                head, buf = read_answer(sock, buf)
            except OSError:  # no answer within the socket's 10 s: count the wait, stop there
                head = b""
            latencies.append((time.perf_counter() - started) * 1000)
            if not head:
                break
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def steady(server: RunningServer, connections: int) -> dict[str, str]:
    """One keep-alive client whose every head takes 0.9 s to arrive, 14 heads."""
    answered = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        head = b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Slow: yes\r\n\r\n"
        buf = b""
        for _ in range(14):
            for i in range(0, len(head), 8):
                try:
                    sock.sendall(head[i : i + 8])
                except OSError:
                    break
                time.sleep(0.9 / ((len(head) + 7) // 8))
            answer, buf = read_answer(sock, buf)
            if not answer.startswith(b"HTTP/1.1 200"):
                break
            answered += 1
    return {"answered of 14 heads of 0.9 s": str(answered)}


def nonreaders(server: RunningServer, connections: int) -> dict[str, str]:
    """`connections` clients pipeline GETs until the kernel takes no more, and never read."""
    pids = workers(server)
    bystander(server.port, 0.3)
    before = rss_kb(pids)
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.setblocking(False)
        socks.append(sock)
    burst = GET * 2000
    blocked: set[int] = set()
    deadline = time.monotonic() + 60
    while len(blocked) < connections and time.monotonic() < deadline:
        for i, sock in enumerate(socks):
            if i not in blocked:
                try:
                    sock.send(burst)
                except OSError:
                    blocked.add(i)
        time.sleep(0.01)
    time.sleep(1.0)
    held = rss_kb(pids)
    during = bystander(server.port, 1.0)
    for sock in socks:
        sock.close()
    return {
        "RSS added": f"{(held - before) / 1024:.1f} MB",
        "bystander p99": f"{pct(during, 0.99):.2f} ms",
    }


def bigheads(server: RunningServer, connections: int) -> dict[str, str]:
    """`connections` clients each send 785 KB of a head (within gunicorn's limits), unfinished."""
    pids = workers(server)
    bystander(server.port, 0.3)
    before, cpu = rss_kb(pids), cpu_s(pids)
    field = b"X-Big: " + b"b" * 8000 + b"\r\n"
    head = b"GET / HTTP/1.1\r\nHost: t\r\n" + field * 97
    socks, refused = [], 0
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 0.2
        while sent < len(head) and time.monotonic() < deadline:
            try:
                sent += sock.send(head[sent : sent + 16384])
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                break
        socks.append(sock)
    time.sleep(1.0)
    peak, used = rss_kb(pids), cpu_s(pids) - cpu
    during = bystander(server.port, 1.0)
    for sock in socks:
        try:
            refused += sock.recv(64).startswith(b"HTTP/1.1 4")
        except OSError:
            pass
        sock.close()
    return {
        "RSS added": f"{(peak - before) / 1024:.1f} MB",
        "worker CPU": f"{used:.2f} s",
        "answered 4xx": str(refused),
        "bystander p99": f"{pct(during, 0.99):.2f} ms",
    }


def chunks1(server: RunningServer, connections: int) -> dict[str, str]:
    """A 2 MiB body in 1-byte chunks (12 MiB on the wire), 5 times; a bystander meanwhile."""
    pids = workers(server)
    alone = bystander(server.port, 1.0)
    chunks = b"1\r\nx\r\n" * (2 * 1024 * 1024)
    during: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            during.extend(bystander(server.port, 0.05))

    watcher = threading.Thread(target=watch, daemon=True)
    cpu = cpu_s(pids)
    elapsed = []
    watcher.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        buf = b""
        for _ in range(5):
            started = time.perf_counter()
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            sock.sendall(chunks)
            sock.sendall(b"0\r\n\r\n")
            answer, buf = read_answer(sock, buf)
            elapsed.append(time.perf_counter() - started)
            assert answer.startswith(b"HTTP/1.1 200"), answer
    done.set()
    watcher.join()
    return {
        "seconds per body": f"{sorted(elapsed)[2]:.3f} s",
        "worker CPU per body": f"{(cpu_s(pids) - cpu) / 5:.3f} s",
        "bystander p50 alone / during": f"{pct(alone, 0.5):.2f} / {pct(during, 0.5):.2f} ms",
    }


PATTERNS: dict[str, Callable[[RunningServer, int], dict[str, str]]] = {
    "steady": steady,
    "nonreaders": nonreaders,
    "bigheads": bigheads,
    "chunks1": chunks1,
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--servers", default="vrypt,nginx")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--connections", type=int, default=1000, help="for nonreaders and bigheads")
    args = p.parse_args()
    cpus = available_cpus()
    where = Placement(cpus[:1], cpus[1:] or cpus, 1)
    rows = []
    for pattern in args.patterns.split(","):
        for name in args.servers.split(","):
            with running(BUILTIN[name], where) as server:
                figures = PATTERNS[pattern](server, args.connections)
            print(f"{pattern} {name}: {figures}", flush=True)
            rows.append((pattern, name, figures))
    print("\n| pattern | server | figures |\n|---|---|---|")
    for pattern, name, figures in rows:
        text = "; ".join(f"{k}: {v}" for k, v in figures.items())
        print(f"| {pattern} | {name} | {text} |")


if __name__ == "__main__":
    main()

"""A new TLS connection per request, with or without session resumption: the load for `tls-new`
and `tls-resume`.

    python -m bench.tlsload --port PORT [--seconds 5] [--procs 4] [--resume]

Each of `--procs` processes loops until the time is up: connect, TLS handshake, one
`GET / HTTP/1.1` with `Connection: close`, the answer read in full (Content-Length), close. With
`--resume` every handshake but a process's first offers the session of its previous connection
(Python's `SSLSocket.session`: a TLS 1.3 ticket, or a TLS 1.2 ticket or session id); without it
none is offered, so every handshake is a full one. Each connection's `session_reused` (OpenSSL's
`SSL_session_reused`: the server accepted the offered session) is counted, so the report says how
many handshakes really were resumed, and every answer's status line is checked.

wrk and h2load (with `Connection: close`) and `openssl s_time -reuse` all resume sessions when they
reconnect; only s_time can be told not to (`-new`), and it runs one connection at a time and checks
no status: hence this client. It prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time

from bench.tls import client_context


def read_answer(sock: socket.socket) -> bytes:
    """The status line once the whole answer (head + Content-Length) is in, or b"" at EOF."""
    buf = b""
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            length = 0
            for line in buf[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(buf) >= head_end + 4 + length:
                return buf.split(b"\r\n", 1)[0]
        chunk = sock.recv(65536)
        if not chunk:
            return buf.split(b"\r\n", 1)[0] if head_end >= 0 else b""
        buf += chunk


def worker(port: int, deadline: float, resume: bool, out: multiprocessing.Queue) -> None:
    ctx = client_context()
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
    session = None
    counts = {"requests": 0, "ok": 0, "non_2xx": 0, "resumed": 0}
    errors: dict[str, int] = {}
    latencies: list[int] = []
    version = cipher = ""
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with ctx.wrap_socket(raw, session=session if resume else None) as sock:
                    sock.sendall(request)
                    status = read_answer(sock)
                    if resume:
                        session = sock.session
                    counts["resumed"] += sock.session_reused
                    version, cipher = sock.version() or "", (sock.cipher() or ("",))[0]
        except (OSError, ValueError) as exc:
            kind = type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            session = None
            continue
        latencies.append(round((time.perf_counter() - started) * 1e6))
        counts["requests"] += 1
        if not status:
            errors["no answer"] = errors.get("no answer", 0) + 1
        elif status.split()[1:2] == [b"200"]:
            counts["ok"] += 1
        else:
            counts["non_2xx"] += 1
    out.put({**counts, "errors": errors, "latencies": latencies, "tls": version, "cipher": cipher})


def run(port: int, seconds: float, procs: int, resume: bool) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    started = time.monotonic()
    deadline = started + seconds
    workers = [ctx.Process(target=worker, args=(port, deadline, resume, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    parts = [out.get(timeout=seconds + 30) for _ in workers]
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    latencies = sorted(x for p in parts for x in p["latencies"])
    errors: dict[str, int] = {}
    for p in parts:
        for kind, n in p["errors"].items():
            errors[kind] = errors.get(kind, 0) + n

    def pct(q: float) -> int:
        return latencies[min(len(latencies) - 1, int(len(latencies) * q))] if latencies else 0

    return {
        "requests": sum(p["requests"] for p in parts),
        "ok": sum(p["ok"] for p in parts),
        "non_2xx": sum(p["non_2xx"] for p in parts),
        "resumed": sum(p["resumed"] for p in parts),
        "errors": errors,
        "seconds": elapsed,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "tls": next((p["tls"] for p in parts if p["tls"]), ""),
        "cipher": next((p["cipher"] for p in parts if p["cipher"]), ""),
        "resume": resume,
        "procs": procs,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tlsload", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    print(json.dumps(run(args.port, args.seconds, args.procs, args.resume)))


if __name__ == "__main__":
    main()

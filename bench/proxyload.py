"""A new plain connection per request, with or without a PROXY protocol header in front: the load
for `new-py`, `proxy-v1-new` and `proxy-v2-new`.

    python -m bench.proxyload --port PORT [--seconds 5] [--procs 4] [--header v1|v2]

Each of `--procs` processes loops until the time is up: connect, send (in one segment) the
header, if any, and one `GET / HTTP/1.1` with `Connection: close`, read the answer in full
(Content-Length), close. Every answer's status line is checked. The header says the client is
192.0.2.1 (v1 `PROXY TCP4 ...`, v2 PROXY over TCP/IPv4), as a load balancer in front would.

wrk cannot send bytes before its request on each new connection (its Lua `request()` is per
request, not per connection), and the comparison must be between two runs of the same client:
`new-py` is this client without the header, so the ratio of the two is the header's cost. It
prints one JSON object on stdout, as bench.tlsload does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time

from bench.tlsload import read_answer

# Built here, not by vrypt_worker.proxy_header: the harness measures other servers too.
CLIENT, SERVER = ("192.0.2.1", 40000), ("198.51.100.1", 80)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADERS = {
    "": b"",
    "v1": b"PROXY TCP4 %s %s %d %d\r\n"
    % (CLIENT[0].encode(), SERVER[0].encode(), CLIENT[1], SERVER[1]),
    "v2": V2_SIGNATURE
    + b"\x21\x11\x00\x0c"  # PROXY, TCP over IPv4, 12 address bytes
    + socket.inet_aton(CLIENT[0])
    + socket.inet_aton(SERVER[0])
    + CLIENT[1].to_bytes(2, "big")
    + SERVER[1].to_bytes(2, "big"),
}


def worker(port: int, deadline: float, header: str, out: multiprocessing.Queue) -> None:
    request = HEADERS[header] + (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
    )
    counts = {"requests": 0, "ok": 0, "non_2xx": 0}
    errors: dict[str, int] = {}
    latencies: list[int] = []
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                status = read_answer(sock)
        except (OSError, ValueError) as exc:
            kind = type(exc).__name__
            errors[kind] = errors.get(kind, 0) + 1
            continue
        latencies.append(round((time.perf_counter() - started) * 1e6))
        counts["requests"] += 1
        if not status:
            errors["no answer"] = errors.get("no answer", 0) + 1
        elif status.split()[1:2] == [b"200"]:
            counts["ok"] += 1
        else:
            counts["non_2xx"] += 1
    out.put({**counts, "errors": errors, "latencies": latencies})


def run(port: int, seconds: float, procs: int, header: str) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    started = time.monotonic()
    deadline = started + seconds
    workers = [ctx.Process(target=worker, args=(port, deadline, header, out)) for _ in range(procs)]
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
        "errors": errors,
        "seconds": elapsed,
        "p50_us": pct(0.5),
        "p99_us": pct(0.99),
        "header": header,
        "procs": procs,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.proxyload", description=__doc__.split("\n")[0]
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--header", choices=("", "v1", "v2"), default="")
    args = p.parse_args()
    print(json.dumps(run(args.port, args.seconds, args.procs, args.header)))


if __name__ == "__main__":
    main()

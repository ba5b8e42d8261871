"""HTTP/3 load from aioquic's client: the load for the `h3` scenario.

    python -m bench.h3load --port PORT [--seconds 5] [--procs 2] [--streams 20]

Nothing in Debian 12 loads HTTP/3 (its curl and h2load have none), so this is built from aioquic:
each of `--procs` processes opens one QUIC connection (TLS 1.3, ALPN h3, the certificate not
verified) and keeps `--streams` GET requests in flight on it, each answered stream replaced by a
new one, until the time is up. Every answer's status and body are checked (200, `Vrypt`).
aioquic's client costs far more CPU per request than a server written for speed, so the load
core, not the server, is usually what limits the rate: the figure that matters is the server's
CPU per request, which the harness reads from /proc around the run. It prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import ssl
import time
from typing import Any

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.open: dict[int, list[Any]] = {}  # stream -> [status, body, started, future]

    def quic_event_received(self, event: Any) -> None:
        for h3_event in self.h3.handle_event(event):
            entry = self.open.get(getattr(h3_event, "stream_id", -1))
            if entry is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                entry[0] = dict(h3_event.headers).get(b":status", b"")
            elif isinstance(h3_event, DataReceived):
                entry[1] += h3_event.data
            if getattr(h3_event, "stream_ended", False):
                del self.open[h3_event.stream_id]
                entry[3].set_result(entry)

    def get(self, authority: bytes) -> asyncio.Future[Any]:
        sid = self._quic.get_next_available_stream_id()
        waiter = asyncio.get_running_loop().create_future()
        self.open[sid] = [b"", b"", time.perf_counter(), waiter]
        self.h3.send_headers(
            sid,
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
             (b":path", b"/")],
            end_stream=True,
        )  # fmt: skip
        self.transmit()
        return waiter


async def one_connection(port: int, deadline: float, streams: int) -> dict:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
    counts = {"requests": 0, "ok": 0, "non_2xx": 0}
    errors: dict[str, int] = {}
    latencies: list[int] = []
    authority = b"127.0.0.1:%d" % port
    try:
        async with connect("127.0.0.1", port, configuration=config, create_protocol=Client) as c:
            assert isinstance(c, Client)
            pending = {c.get(authority) for _ in range(streams)}
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    errors["timeout"] = errors.get("timeout", 0) + len(pending)
                    break
                now = time.perf_counter()
                for future in done:
                    status, body, started, _ = future.result()
                    counts["requests"] += 1
                    latencies.append(round((now - started) * 1e6))
                    if status == b"200" and body == b"Vrypt":
                        counts["ok"] += 1
                    else:
                        counts["non_2xx"] += 1
                    if time.monotonic() < deadline:
                        pending.add(c.get(authority))
    except (TimeoutError, OSError, ConnectionError) as exc:
        kind = type(exc).__name__
        errors[kind] = errors.get(kind, 0) + 1
    return {**counts, "errors": errors, "latencies": latencies}


def worker(port: int, deadline: float, streams: int, out: multiprocessing.Queue) -> None:
    out.put(asyncio.run(one_connection(port, deadline, streams)))


def run(port: int, seconds: float, procs: int, streams: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    started = time.monotonic()
    deadline = started + seconds
    workers = [
        ctx.Process(target=worker, args=(port, deadline, streams, out)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    parts = [out.get(timeout=seconds + 60) for _ in workers]
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
        "procs": procs,
        "streams": streams,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.h3load", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--streams", type=int, default=20)
    args = p.parse_args()
    print(json.dumps(run(args.port, args.seconds, args.procs, args.streams)))


if __name__ == "__main__":
    main()

"""HTTP/2 core costs, in process (no sockets): HPACK decoding candidates and the whole core per
request, as h2load sends requests.

    python -m bench.h2_candidates            (h2 and hpack are dependencies; nothing else)
    python -m bench.h2_candidates --log      (only the access log's cost: log off vs on)

h2load's request is `:method GET, :scheme http, :authority host:port, :path /, user-agent
h2load nghttp2/...`: the first block of a connection inserts :authority and user-agent into the
dynamic table, every later block is five indexed fields. Times are the minimum over repeats of
a timed loop (the least disturbed run on a shared machine), in microseconds per request.
"""

from __future__ import annotations

import time
import timeit

import h2.config
import h2.connection
import h2.events
import hpack

from vrypt_worker.framing import FramingRules
from vrypt_worker.h2 import H2Answers, H2Config, H2Protocol, frames
from vrypt_worker.h2 import hpack_decoder as hd

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:8000"),
    (b":path", b"/"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
WINDOW = 2**30 - 1
LIMITS = (
    hd.Limits()
)  # gunicorn's defaults  # h2load's default stream and connection windows (-w 30, -W 30)


def blocks() -> tuple[bytes, bytes]:
    """The first and the steady-state header block of an h2load connection."""
    encoder = hpack.Encoder()
    return encoder.encode(REQUEST), encoder.encode(REQUEST)


def per_call(func, number: int = 20000, repeat: int = 7) -> float:
    return min(timeit.repeat(func, number=number, repeat=repeat)) / number * 1e6


def hpack_candidates() -> list[tuple[str, float, float]]:
    """(candidate, µs for the first block, µs for a steady-state block)."""
    first, steady = blocks()
    rows = []

    def with_hpack_first():
        hd._judge_request(hpack.Decoder().decode(first, raw=True), LIMITS)

    decoder = hpack.Decoder()
    decoder.decode(first, raw=True)

    def with_hpack_steady():
        hd._judge_request(decoder.decode(steady, raw=True), LIMITS)

    rows.append(
        ("hpack.Decoder + validation", per_call(with_hpack_first), per_call(with_hpack_steady))
    )

    root = hd.empty_table(LIMITS)
    _, after_first = hd.decode(root, first)[:2]

    def own_uncached_first():
        fields, _table, _size = hd.decode(root, first)
        hd._judge_request(fields, LIMITS)

    def own_uncached_steady():
        fields, _table, _size = hd.decode(after_first, steady)
        hd._judge_request(fields, LIMITS)

    rows.append(
        (
            "own decoder, uncached + validation",
            per_call(own_uncached_first),
            per_call(own_uncached_steady),
        )
    )

    _, cached_after = hd.request_verdict(root, first)
    hd.request_verdict(cached_after, steady)

    def own_memo_first():
        hd.request_verdict(root, first)

    def own_memo_steady():
        hd.request_verdict(cached_after, steady)

    rows.append(
        (
            "own decoder, memoised (request_verdict)",
            per_call(own_memo_first),
            per_call(own_memo_steady),
        )
    )
    reads = cached_after.reads

    def inline_steady():
        reads.get(steady)

    rows.append(("hot path inline: table.reads.get(block)", float("nan"), per_call(inline_steady)))
    return rows


def connection_rounds(
    connections: int, streams: int, rounds: int, priority: bool = False
) -> tuple[list[bytes], list[list[bytes]]]:
    """Per connection: the opening bytes (preface, SETTINGS, WINDOW_UPDATE, first request batch),
    then `rounds` reads of `streams` HEADERS frames each, as h2load -m<streams> sends them
    (with `priority`, each HEADERS carries the PRIORITY flag and 5 bytes, as browsers send)."""
    flags = 0x25 if priority else 0x05
    prefix = b"\x80\x00\x00\x00\xff" if priority else b""
    openings = []
    reads = []
    for _ in range(connections):
        encoder = hpack.Encoder()
        opening = (
            frames.PREFACE
            + frames.settings(
                {frames.SETTINGS_INITIAL_WINDOW_SIZE: WINDOW, frames.SETTINGS_ENABLE_PUSH: 0}
            )
            + frames.window_update(0, WINDOW - frames.DEFAULT_WINDOW)
        )
        sid = 1
        batch = []
        for _ in range(streams):
            batch.append(frames.frame(frames.HEADERS, flags, sid, prefix + encoder.encode(REQUEST)))
            sid += 2
        openings.append(opening + b"".join(batch))
        mine = []
        for _ in range(rounds):
            batch = []
            for _ in range(streams):
                batch.append(
                    frames.frame(frames.HEADERS, flags, sid, prefix + encoder.encode(REQUEST))
                )
                sid += 2
            mine.append(b"".join(batch))
        reads.append(mine)
    return openings, reads


def _access_log():
    """gunicorn's access log as the worker has it on (default format, `combined`), its lines
    collected and never written: the hub's side of the cost, without a writer thread's."""
    import logging
    from types import SimpleNamespace

    from gunicorn.config import Config

    from vrypt_worker.access_log import AccessLog

    logger = logging.getLogger("bench.h2_candidates.access")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    logger.setLevel(logging.INFO)
    log = SimpleNamespace(access_log=logger, error=print, warning=print)
    worker = SimpleNamespace(log=log, cfg=Config(), responses=None)
    return AccessLog(worker)


class _Peer:
    @staticmethod
    def getpeername() -> tuple[str, int]:
        return ("127.0.0.1", 40000)


def core_cost(
    connections: int = 100,
    streams: int = 10,
    rounds: int = 40,
    repeat: int = 5,
    priority: bool = False,
    logged: bool = False,
) -> float:
    """µs of CPU per request for H2Protocol, steady state (openings not timed); with `logged`,
    for LoggingH2Protocol with the access log on."""
    openings, reads = connection_rounds(connections, streams, rounds, priority)
    access = _access_log() if logged else None
    best = float("inf")
    for _ in range(repeat):
        rules = FramingRules()
        answers = H2Answers(time.time())
        if access is not None:
            from vrypt_worker.access_log import LoggingH2Protocol

            protos: list[H2Protocol] = [
                LoggingH2Protocol(H2Config(), rules, answers, access, _Peer())
                for _ in range(connections)
            ]
        else:
            protos = [H2Protocol(H2Config(), rules, answers) for _ in range(connections)]
        for proto, opening in zip(protos, openings, strict=True):
            proto.receive(opening)
        start = time.process_time()
        for r in range(rounds):
            for proto, mine in zip(protos, reads, strict=True):
                proto.receive(mine[r])
        elapsed = time.process_time() - start
        assert rules.answered == connections * streams * (rounds + 1), rules.answered
        if access is not None:
            assert len(access.lines) == rules.answered, len(access.lines)
            access.lines = []
        best = min(best, elapsed / (connections * streams * rounds) * 1e6)
    if access is not None:
        access.close()
    return best


def h2_package_cost(
    connections: int = 100, streams: int = 10, rounds: int = 40, repeat: int = 3
) -> float:
    """The same load through the `h2` package's server state machine (what gunicorn drives),
    answering each request with HEADERS and DATA: the floor of an h2-based server."""
    openings, reads = connection_rounds(connections, streams, rounds)
    response = [
        (b":status", b"200"),
        (b"server", b"vrypt"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"5"),
    ]
    best = float("inf")
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    for _ in range(repeat):
        conns = [h2.connection.H2Connection(config) for _ in range(connections)]

        def serve(conn, data):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    conn.send_headers(event.stream_id, response)
                    conn.send_data(event.stream_id, b"Vrypt", end_stream=True)
            return conn.data_to_send()

        for conn, opening in zip(conns, openings, strict=True):
            conn.initiate_connection()
            serve(conn, opening)
        start = time.process_time()
        for r in range(rounds):
            for conn, mine in zip(conns, reads, strict=True):
                serve(conn, mine[r])
        elapsed = time.process_time() - start
        best = min(best, elapsed / (connections * streams * rounds) * 1e6)
    return best


def main() -> None:
    print("HPACK decoding of h2load's request, µs per header block")
    print(f"{'candidate':45} {'first block':>12} {'steady':>8}")
    for name, first, steady in hpack_candidates():
        print(f"{name:45} {first:12.2f} {steady:8.2f}")
    print()
    print("Whole core, µs of CPU per request (process_time), steady state")
    for streams in (10, 1):
        ours = core_cost(streams=streams, rounds=400 // streams)
        theirs = h2_package_cost(streams=streams, rounds=100 // streams)
        print(
            f"100 connections x {streams:2} streams per read:"
            f" H2Protocol {ours:6.2f}   h2 package {theirs:7.2f}"
        )
    browser = core_cost(streams=1, rounds=400, priority=True)
    print(f"100 connections x  1 stream per read, HEADERS with PRIORITY: H2Protocol {browser:6.2f}")
    print()
    log_main()


def log_main() -> None:
    print("Access log on (LoggingH2Protocol, default format), µs of CPU per request, steady state")
    for streams in (10, 1):
        off = core_cost(streams=streams, rounds=400 // streams)
        on = core_cost(streams=streams, rounds=400 // streams, logged=True)
        print(
            f"100 connections x {streams:2} streams per read:"
            f" H2Protocol {off:6.2f}   LoggingH2Protocol {on:6.2f}   (+{on - off:.2f})"
        )


if __name__ == "__main__":
    import sys

    if "--log" in sys.argv[1:]:
        log_main()
    else:
        main()

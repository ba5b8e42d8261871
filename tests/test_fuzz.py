"""Mutation fuzzing over real sockets against one running worker (tests/fuzz_corpus.py).

Each input is a pipeline of valid requests with a few mutations (byte flips, inserted CR, LF,
space, colon, digits, deletions, truncation, duplicated field lines, other digits), sent on a
connection of its own in 1-4 writes split at random points, then half-closed. The answers are read
to EOF and held against an independent reference framer: no input may get more answers than it
holds requests, a 200 never answers a request whose framing is broken, the `Connection: close`
promise matches the request, and the worker never dies or logs a traceback.

`VRYPT_FUZZ_INPUTS` and `VRYPT_FUZZ_SEED` change the amount and the seed (the seed of a failing
run is in the assertion message, so it can be replayed).
"""

from __future__ import annotations

import collections
import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests import fuzz_corpus
from tests.support import Server, running

THREADS = 16


@dataclass
class FuzzRun:
    inputs: int = 0
    sent_bytes: int = 0
    answers: int = 0
    oks: int = 0
    errors: collections.Counter[int] = field(default_factory=collections.Counter)
    resets: int = 0
    violations: list[str] = field(default_factory=list)
    divergences: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: dict[str, bytes] = field(default_factory=dict)


def talk(port: int, pieces: list[bytes], timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send the pieces as separate writes, half-close, read to EOF. (bytes, reset?)"""
    received = []
    reset = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in pieces:
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the worker refused early and closed; its answer is still there to read
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not data:
                break
            received.append(data)
    return b"".join(received), reset


def fuzz(server: Server, count: int, seed: int) -> FuzzRun:
    run = FuzzRun()
    rng = random.Random(seed)
    cases = [fuzz_corpus.generate(rng) for _ in range(count)]

    def one(case: tuple[bytes, list[bytes]]) -> tuple[bytes, list[bytes], bytes, bool]:
        data, pieces = case
        try:
            raw, reset = talk(server.port, pieces)
        except TimeoutError:
            return data, pieces, b"<timeout>", False
        return data, pieces, raw, reset

    with ThreadPoolExecutor(THREADS) as pool:
        for data, pieces, raw, reset in pool.map(one, cases, chunksize=64):
            run.inputs += 1
            run.sent_bytes += len(data)
            run.resets += reset
            if raw == b"<timeout>":
                run.violations.append(f"no EOF within 10 s for {data!r}")
                continue
            expected = fuzz_corpus.reference_frame(data)
            answers, malformed = fuzz_corpus.parse_answers(raw, expected)
            if malformed and not reset:
                run.violations.append(f"{malformed} for {data!r} split {pieces!r}")
            violations, divergences = fuzz_corpus.check(expected, answers)
            run.violations += [f"{v} for {data!r} split {pieces!r}" for v in violations]
            for text in divergences:
                kind = text.split(":")[0] + ": " + (expected.why or expected.end)
                run.divergences[kind] += 1
                run.samples.setdefault(kind, data)
            run.answers += len(answers)
            run.oks += sum(a.status == 200 for a in answers)
            run.errors.update(a.status for a in answers if a.status != 200)
    return run


def fuzz_and_check(count: int) -> FuzzRun:
    seed = int(os.environ.get("VRYPT_FUZZ_SEED") or random.randrange(1 << 30))
    count = int(os.environ.get("VRYPT_FUZZ_INPUTS") or count)
    with running() as server:
        (worker,) = server.worker_pids()
        started = time.monotonic()
        run = fuzz(server, count, seed)
        elapsed = time.monotonic() - started
        assert server.worker_pids() == [worker], "the worker died and was replaced"
        log = server.log
    print(
        f"\nfuzz seed={seed}: {run.inputs} inputs, {run.sent_bytes} bytes in {elapsed:.1f}s; "
        f"{run.oks} 200s, errors {dict(run.errors)}, resets {run.resets}, "
        f"divergences {dict(run.divergences)}"
    )
    for kind, sample in run.samples.items():
        print(f"  e.g. {kind}: {sample!r}")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    if run.violations:
        pytest.fail(f"seed {seed}: " + "\n".join(run.violations[:20]), pytrace=False)
    assert run.oks > count // 10 and sum(run.errors.values()) > count // 10  # both kinds tried
    return run


def test_mutation_fuzzing_over_sockets() -> None:
    fuzz_and_check(8_000)


@pytest.mark.heavy
def test_mutation_fuzzing_over_sockets_heavy() -> None:
    fuzz_and_check(50_000)

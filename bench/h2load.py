"""Load generation with h2load (nghttp2-client), and parsing of its report.

h2load runs one thread, `-c` connections with `-m` concurrent streams each, for a number of
requests (`-n`) that lasts about the run's duration at the rate the server showed just before
(see `timed`). Not for a fixed time: in timing mode (`-D`), h2load 1.52 hangs after "Stopped all
clients" in about one run in three against gunicorn's h2 over TLS, with no connection left open
on either side, and never prints its figures (`-N` does not help); counted runs did not hang.

Its summary counts requests `done`, `succeeded`, `failed` (which includes non-2xx answers),
`errored` (failures other than HTTP status: resets, network errors) and `timeout`; every failure
becomes an error in the report. Latency percentiles come from its per-request log (`--log-file`:
start, status, duration in µs per request), since its summary gives only min/max/mean/sd.

Over TLS it says which protocol ALPN chose and which TLS version and cipher: a run that did not
get what the scenario asks for (h2 over TLS, or HTTP/1.1 over TLS for the `--h1` runs) fails
rather than be reported as a figure for the wrong protocol.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from bench.load import LoadError, LoadResult
from bench.scenarios import Placement, cpu_list

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"
INACTIVITY_TIMEOUT = 5  # seconds
CALIBRATION = 2  # requests per stream slot of a run that measures the server's rate first


def h2load_available() -> bool:
    return Path(H2LOAD).exists()


def h2load_command(
    url: str,
    connections: int,
    streams: int,
    where: Placement,
    requests: int,
    log_file: Path | None,
    h1: bool = False,
) -> list[str]:
    argv = [
        "taskset", "-c", cpu_list(where.load_cpus),
        H2LOAD,
        "-t", "1",
        "-c", str(connections),
        "-m", str(streams),
        "-n", str(requests),
        # A connection silent this long is closed and its requests count as timeouts, so that
        # a server that stalls gives errors rather than a run that never ends.
        "-N", str(INACTIVITY_TIMEOUT),
    ]  # fmt: skip
    if h1:
        argv.append("--h1")
    if log_file is not None:
        log_file.unlink(missing_ok=True)  # h2load appends to it
        argv += ["--log-file", str(log_file)]
    return [*argv, url]


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    values.sort()
    return float(values[min(len(values) - 1, int(len(values) * q))])


def parse_h2load(output: str, log_file: Path | None = None) -> tuple[LoadResult, dict[str, str]]:
    """The run's figures, and what was negotiated (`protocol`, `tls`, `cipher`, when said)."""
    finished = re.search(r"^finished in ([\d.]+)(us|ms|s)", output, re.M)
    counts = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        output,
        re.M,
    )
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output, re.M)
    if not (finished and counts and codes):
        raise LoadError(f"unreadable h2load output:\n{output[-2000:]}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[finished[2]]
    seconds = float(finished[1]) * scale
    _total, _started, done, _ok, failed, errored, timeout = (int(g) for g in counts.groups())
    non_2xx = sum(int(g) for g in codes.groups()[1:])
    # `failed` counts non-2xx answers too; what is left are failures without an answer.
    kinds = {
        "failed without answer": max(0, failed - non_2xx),
        "of which errored": errored,
        "of which timeout": timeout,
    }
    latencies: list[int] = []
    if log_file is not None and log_file.exists():
        with open(log_file) as lines:
            for line in lines:
                fields = line.split("\t")
                if len(fields) >= 3 and fields[2].strip().isdigit():
                    latencies.append(int(fields[2]))
    negotiated = {}
    for key, pattern in (
        ("tls", r"^TLS Protocol: (\S+)"),
        ("cipher", r"^Cipher: (\S+)"),
        ("protocol", r"^Application protocol: (\S+)"),
    ):
        if match := re.search(pattern, output, re.M):
            negotiated[key] = match[1]
    result = LoadResult(
        requests=done,
        seconds=seconds,
        rps=done / seconds if seconds else 0.0,
        p50_us=_percentile(latencies, 0.50),
        p99_us=_percentile(latencies, 0.99),
        socket_errors=kinds["failed without answer"],
        non_2xx=non_2xx,
        socket_error_kinds={k: v for k, v in kinds.items() if v},
    )
    return result, negotiated


def run_h2load(
    argv: list[str], timeout: float, log_file: Path | None, expect_protocol: str | None
) -> tuple[LoadResult, dict[str, str]]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"h2load did not finish in {timeout:.0f} s: {shlex.join(argv)}") from exc
    if done.returncode != 0 and "requests:" not in done.stdout:
        raise LoadError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
    result, negotiated = parse_h2load(done.stdout, log_file)
    got = negotiated.get("protocol")
    if expect_protocol and got and got != expect_protocol:
        raise LoadError(f"h2load negotiated {got}, not {expect_protocol}")
    if expect_protocol and not got and result.requests == 0:
        raise LoadError(f"h2load completed no request (no protocol negotiated):\n{done.stdout}")
    return result, negotiated


def timed(
    url: str,
    connections: int,
    streams: int,
    where: Placement,
    seconds: float,
    log_file: Path | None,
    expect_protocol: str | None,
    rate: float | None,
) -> tuple[LoadResult, dict[str, str]]:
    """A run of about ``seconds``: ``rate`` (requests per second, from the previous run on the
    same server) times the duration; without a rate, a short run of CALIBRATION requests per
    stream slot measures it first."""
    slots = connections * streams
    if not rate:
        argv = h2load_command(url, connections, streams, where, CALIBRATION * slots, None)
        calibration, _ = run_h2load(argv, 60 + seconds, None, expect_protocol)
        rate = calibration.rps
    requests = max(slots, round(rate * seconds))
    argv = h2load_command(url, connections, streams, where, requests, log_file)
    # Three times the expected time (the machine is shared), plus the inactivity timeout.
    return run_h2load(argv, 3 * seconds + 30 + INACTIVITY_TIMEOUT, log_file, expect_protocol)

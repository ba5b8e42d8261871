"""The HTTP/2 and TLS scenarios (issue 11): what each one loads, and how a run of it is measured.

| name | server transport | load |
|---|---|---|
| h2c | h2c, prior knowledge | h2load, 100 connections x 10 streams |
| h2-tls | TLS, ALPN h2 | h2load https, 100 connections x 10 streams (fails unless ALPN picks h2) |
| tls-ka100 | TLS, HTTP/1.1 | wrk https, keep-alive, 100 connections |
| tls-new | TLS, HTTP/1.1 | bench.tlsload: a new connection and a full handshake per request |
| tls-resume | TLS, HTTP/1.1 | bench.tlsload --resume: a new connection per request, resuming |
| idle-h1 | plain HTTP/1.1 | 1,000 connections, one request each, then held idle: memory |
| idle-tls | TLS, HTTP/1.1 | the same over TLS |
| idle-h2 | h2c, prior knowledge | the same with HTTP/2 (one stream each) |
| idle-h2-tls | TLS, ALPN h2 | the same with HTTP/2 over TLS |
| h3 | TLS and HTTP/3 on UDP | bench.h3load: aioquic client processes, 2 conns x 20 streams |
| new-py | plain HTTP/1.1 | bench.proxyload: a new connection per request, no header |
| proxy-v1-new | plain, `proxy_protocol` on | bench.proxyload --header v1: the same, v1 header |
| proxy-v2-new | plain, `proxy_protocol` on | bench.proxyload --header v2: the same, v2 header |
| proxy-ka100 | plain, `proxy_protocol` on | wrk keep-alive, 100 connections (no header) |

Every scenario here runs one server worker on the first CPU and the load on the others, like the
one-core HTTP/1 scenarios, and is measured the same way (bench/runner.py): the server tree's CPU
time from /proc around the load, a warm-up first on the same freshly started server, the noise
guard. What is particular to a scenario goes into the run's `extra` figures:

- tls-new / tls-resume: `resumed` (the share of handshakes the server resumed, as the client saw
  it: OpenSSL's `SSL_session_reused`) and `full handshakes`.
- idle-*: `idle B/conn`: the growth of the server's resident memory (VmRSS summed over its
  processes, read 1 s after the last connection had its answer, before the connections are
  opened minus after) divided by the connections. Kernel socket buffers are not in it; for every
  server alike, they are the kernel's. The CPU figure of an idle-* run is the CPU per connection
  opened (connect, handshake if any, one request).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import h2wire
from bench.h2load import h2load_command
from bench.h2load import timed as h2load_timed
from bench.load import LoadError, LoadResult, run_wrk, wrk_command
from bench.procstat import (
    core_times,
    cpu_by_command,
    sample_tree,
    session_pids,
    tcp_passive_opens,
)
from bench.scenarios import Placement, ProtoScenario, Scenario, cpu_list
from bench.servers import ROOT, ServerSpec, running
from bench.tls import client_context
from bench.tlsload import read_answer
from bench.transports import TRANSPORTS, FrontTransport, Transport

if TYPE_CHECKING:
    from bench.runner import Run

IDLE_SETTLE = 1.0  # seconds between the last answer and the memory reading
IDLE_KEEPALIVE = 30  # gunicorn --keep-alive in the idle-* scenarios (nginx's and vrypt's value)


def _tlsload(scenario: ProtoScenario, where: Placement, port: int, seconds: float) -> dict:
    argv = [
        "taskset", "-c", cpu_list(where.load_cpus),
        sys.executable, "-m", "bench.tlsload",
        "--port", str(port), "--seconds", str(seconds), "--procs", str(scenario.connections),
    ] + (["--resume"] if scenario.resume else [])  # fmt: skip
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"bench.tlsload did not finish: {exc}") from exc
    if done.returncode != 0:
        raise LoadError(f"bench.tlsload failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _h3load(
    scenario: ProtoScenario, where: Placement, port: int, seconds: float
) -> tuple[LoadResult, dict[str, float], str]:
    argv = [
        "taskset", "-c", cpu_list(where.load_cpus),
        sys.executable, "-m", "bench.h3load", "--port", str(port), "--seconds", str(seconds),
        "--procs", str(scenario.connections), "--streams", str(scenario.streams),
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 90)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"bench.h3load did not finish: {exc}") from exc
    if done.returncode != 0:
        raise LoadError(f"bench.h3load failed ({done.returncode}): {done.stderr[-2000:]}")
    data = json.loads(done.stdout)
    errors = dict(data["errors"])
    result = LoadResult(
        requests=data["requests"],
        seconds=data["seconds"],
        rps=data["requests"] / data["seconds"] if data["seconds"] else 0.0,
        p50_us=float(data["p50_us"]),
        p99_us=float(data["p99_us"]),
        socket_errors=sum(errors.values()),
        non_2xx=data["non_2xx"],
        socket_error_kinds=errors,
    )
    return result, {}, "HTTP/3 (QUIC v1, TLS 1.3)"


def _proxyload(scenario: ProtoScenario, where: Placement, port: int, seconds: float) -> dict:
    argv = [
        "taskset", "-c", cpu_list(where.load_cpus),
        sys.executable, "-m", "bench.proxyload", "--port", str(port), "--seconds", str(seconds),
        "--procs", str(scenario.connections), "--header", scenario.header,
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"bench.proxyload did not finish: {exc}") from exc
    if done.returncode != 0:
        raise LoadError(f"bench.proxyload failed ({done.returncode}): {done.stderr[-2000:]}")
    data = json.loads(done.stdout)
    data.update(resumed=0, tls="", cipher="")
    return data


def _tlsload_result(data: dict) -> tuple[LoadResult, dict[str, float], str]:
    errors = dict(data["errors"])
    result = LoadResult(
        requests=data["requests"],
        seconds=data["seconds"],
        rps=data["requests"] / data["seconds"] if data["seconds"] else 0.0,
        p50_us=float(data["p50_us"]),
        p99_us=float(data["p99_us"]),
        socket_errors=sum(errors.values()),
        non_2xx=data["non_2xx"],
        socket_error_kinds=errors,
    )
    requests = max(1, data["requests"])
    extra = {"resumed": data["resumed"] / requests, "full handshakes": requests - data["resumed"]}
    return result, extra, f"{data['tls']} {data['cipher']}".strip()


def _open_idle(
    transport: Transport | None, port: int, count: int, where: Placement
) -> tuple[list, int, int]:
    """``count`` connections, each with one answered GET, kept open; and how many answers were
    not 200 and how many connections failed."""
    socks: list[socket.socket] = []
    # This client runs in the harness's own process: on the load's CPUs for the time, like the
    # load tools, so that it does not take the server's core.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, where.load_cpus)
    try:
        return _open_idle_pinned(transport, port, count, socks)
    finally:
        os.sched_setaffinity(0, affinity)


def _open_idle_pinned(
    transport: Transport | None, port: int, count: int, socks: list[socket.socket]
) -> tuple[list, int, int]:
    non_2xx = failed = 0
    ctx = None
    if transport is not None and transport.tls:
        ctx = client_context(("h2",) if transport.h2 else ("http/1.1",))
    get = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if ctx is not None:
                sock = ctx.wrap_socket(sock)
            if transport is not None and transport.h2:
                status, _ = h2wire.get(sock, f"127.0.0.1:{port}", transport.scheme)
            else:
                sock.sendall(get)
                line = read_answer(sock)
                if not line:
                    raise ConnectionError("closed before the answer")
                status = int(line.split(b" ", 2)[1])
        except (OSError, h2wire.H2Error, ValueError, IndexError):
            failed += 1
            continue
        non_2xx += status != 200
        socks.append(sock)
    return socks, non_2xx, failed


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed this connection (nothing to read is open; EOF or a
    reset is closed; bytes, e.g. an HTTP/2 PING, count as open)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False


def _wchar(sid: int) -> int:
    """Bytes the server's processes have written so far (/proc/PID/io `wchar`: every write and
    send, to sockets too)."""
    total = 0
    for pid in session_pids(sid):
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _rss_kb(sid: int) -> int:
    total = 0
    for pid in session_pids(sid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(
    spec: ServerSpec,
    scenario: ProtoScenario,
    where: Placement,
    round_no: int,
    seconds: float,
    warmup: float,
) -> Run:
    """As bench.runner.measure, with this scenario's transport and load tool."""
    from bench.runner import record  # runner imports this module: import when used

    transport = TRANSPORTS.get(scenario.transport)
    if scenario.tool == "idle" and transport is not None:
        transport = dataclasses.replace(transport, keepalive=IDLE_KEEPALIVE)
    extra: dict[str, float] = {}
    note = ""
    state: dict[str, float] = {}  # what a warm-up tells the measured run (h2load: the rate)
    with (
        tempfile.TemporaryDirectory(prefix="bench-load-") as tmp,
        running(spec, where, transport=transport) as server,
    ):
        scheme = transport.scheme if transport else "http"
        url = f"{scheme}://127.0.0.1:{server.port}/"
        log = Path(tmp) / "h2load.log"
        expect = "h2" if transport and transport.h2 and transport.tls else None
        if scenario.tool == "idle":
            # A few requests first, so that the figure is not the first request's allocations.
            warm, _, _ = _open_idle(transport, server.port, 10, where)
            for sock in warm:
                sock.close()
            time.sleep(IDLE_SETTLE)
            rss_before = _rss_kb(server.sid)
        elif warmup > 0:
            _load(scenario, where, server.port, url, warmup, None, expect, Path(tmp), state)
        before, core_before = sample_tree(server.sid), core_times(where.server_cpus)
        split_before = cpu_by_command(server.sid, "nginx")
        wchar_before = _wchar(server.sid)
        opens_before, started = tcp_passive_opens(), time.monotonic()
        if scenario.tool == "idle":
            socks, non_2xx, failed = _open_idle(transport, server.port, scenario.connections, where)
            opened = time.monotonic() - started
            time.sleep(IDLE_SETTLE)
            rss_after = _rss_kb(server.sid)
            # The figure holds only if every connection was still open at the reading.
            closed = sum(not _still_open(sock) for sock in socks)
            kinds = {"connection failed": failed, "closed by the server before the reading": closed}
            result = LoadResult(
                requests=len(socks) + non_2xx,
                seconds=opened,
                rps=len(socks) / opened if opened else 0.0,
                p50_us=0.0,
                p99_us=0.0,
                socket_errors=failed + closed,
                non_2xx=non_2xx,
                socket_error_kinds={k: v for k, v in kinds.items() if v},
            )
            extra["idle B/conn"] = (rss_after - rss_before) * 1024 / max(1, len(socks))
            extra["idle connections"] = len(socks)
            wall = time.monotonic() - started
            after, core_after = sample_tree(server.sid), core_times(where.server_cpus)
            for sock in socks:
                sock.close()
        else:
            result, extra, note = _load(
                scenario, where, server.port, url, seconds, log, expect, Path(tmp), state
            )
            wall = time.monotonic() - started
            after, core_after = sample_tree(server.sid), core_times(where.server_cpus)
            if isinstance(transport, FrontTransport) and result.requests:
                # nginx in front: its share and the server's, per request
                split = cpu_by_command(server.sid, "nginx")
                extra["front µs/req"] = (split[0] - split_before[0]) * 1e6 / result.requests
                extra["backend µs/req"] = (split[1] - split_before[1]) * 1e6 / result.requests
            if scenario.tool == "tlsload" and result.requests:
                # Server side: a full TLS 1.3 handshake sends the certificate and its signature,
                # a resumed one does not, so the bytes the server wrote per connection say
                # whether resumption really happened, whatever the client believes.
                extra["server B out/conn"] = (_wchar(server.sid) - wchar_before) / result.requests
        opens = tcp_passive_opens() - opens_before
    if not result.requests:
        raise LoadError(f"no request completed in {seconds} s ({result.socket_error_kinds})")
    return record(
        spec, scenario, where, round_no, result, (before, after), (core_before, core_after), wall,
        opens, extra, note,
    )


def _load(
    scenario: ProtoScenario,
    where: Placement,
    port: int,
    url: str,
    seconds: float,
    log: Path | None,
    expect: str | None,
    tmp: Path,
    state: dict[str, float],
) -> tuple[LoadResult, dict[str, float], str]:
    """One load run of the scenario's tool: its result, extra figures and what was negotiated."""
    if scenario.tool == "h2load":
        result, negotiated = h2load_timed(
            url, scenario.connections, scenario.streams, where, seconds, log, expect,
            state.get("rate"),
        )  # fmt: skip
        state["rate"] = result.rps
        note = " ".join(negotiated.get(k, "") for k in ("protocol", "tls", "cipher")).strip()
        return result, {}, note
    if scenario.tool == "tlsload":
        return _tlsload_result(_tlsload(scenario, where, port, seconds))
    if scenario.tool == "h3load":
        return _h3load(scenario, where, port, seconds)
    if scenario.tool == "proxyload":
        result, _extra, _note = _tlsload_result(_proxyload(scenario, where, port, seconds))
        return result, {}, f"PROXY {scenario.header}" if scenario.header else ""
    argv = wrk_command(scenario, where, port, seconds, tmp)
    argv[-1] = url
    return run_wrk(argv, seconds), {}, ""


def tools_missing(scenarios: list[Scenario]) -> list[str]:
    """What the chosen scenarios need that is not installed (apt packages named)."""
    from bench.h2load import h2load_available
    from bench.tls import openssl_available

    missing = []
    if any(getattr(s, "tool", "") == "h2load" for s in scenarios) and not h2load_available():
        missing.append("h2load (apt-get install nghttp2-client)")
    if any(getattr(s, "transport", "plain") != "plain" for s in scenarios) and not (
        openssl_available()
    ):
        missing.append("openssl (apt-get install openssl)")
    return missing


def describe_load(scenario: Scenario, seconds: float) -> str:
    """The load of a scenario as a command line, with PORT for the server's port."""
    if not isinstance(scenario, ProtoScenario):
        return ""
    transport = TRANSPORTS.get(scenario.transport)
    if scenario.tool == "idle" and transport is not None:
        transport = dataclasses.replace(transport, keepalive=IDLE_KEEPALIVE)
    scheme = transport.scheme if transport else "http"
    url = f"{scheme}://127.0.0.1:PORT/"
    served = f"; server: {transport.describe()}" if transport else "; server: plain HTTP/1.1"
    if scenario.tool == "h2load":
        argv = h2load_command(
            url, scenario.connections, scenario.streams, Placement((0,), (1,), 1), 0, None
        )
        text = " ".join(argv[3:]).replace("/usr/bin/", "").replace("-n 0", "-n N")
        return (
            f"`{text}`, N = the server's req/s in the warm-up x {seconds:g} s (h2load's timed "
            "mode hangs now and then: bench/h2load.py)" + served
        )
    if scenario.tool == "tlsload":
        resume = " --resume" if scenario.resume else ""
        return (
            f"`python -m bench.tlsload --port PORT --seconds {seconds:g} "
            f"--procs {scenario.connections}{resume}`" + served
        )
    if scenario.tool == "h3load":
        return (
            f"`python -m bench.h3load --port PORT --seconds {seconds:g} --procs "
            f"{scenario.connections} --streams {scenario.streams}`" + served
        )
    if scenario.tool == "proxyload":
        header = f" --header {scenario.header}" if scenario.header else ""
        return (
            f"`python -m bench.proxyload --port PORT --seconds {seconds:g} "
            f"--procs {scenario.connections}{header}`" + served
        )
    if scenario.tool == "idle":
        return (
            f"{scenario.connections} connections opened one after another by the harness, one "
            "GET each (HTTP/2: stream 1), held open; server VmRSS read 1 s later, then every "
            "connection checked to be still open" + served
        )
    return f"`wrk -t1 -c{scenario.connections} -d{seconds:g}s --timeout 5s {url}`" + served

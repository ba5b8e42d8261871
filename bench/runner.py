"""One measured run, and the interleaved schedule of runs (A B C D, A B C D, ...)."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import proto
from bench.load import LoadError, LoadResult, run_wrk, wrk_command
from bench.procstat import core_times, sample_tree, tcp_passive_opens
from bench.scenarios import Placement, ProtoScenario, Scenario, available_cpus, placement
from bench.servers import ServerSpec, running


@dataclass(frozen=True)
class Run:
    server: str
    scenario: str
    round: int
    requests: int
    seconds: float
    rps: float
    cpu_us_per_req: float  # user + system, all the server's processes
    user_us_per_req: float
    sys_us_per_req: float
    core_us_per_req: float | None  # busy time of the server's core(s), when not shared with wrk
    other_load: float | None  # share of the server's core(s) used by other processes
    p50_us: float
    p99_us: float
    peak_rss_kb: int  # sum of VmHWM over the server's processes
    peak_rss_max_kb: int  # the largest single process (e.g. one worker)
    processes: int
    connections_per_req: float  # TCP connections accepted per request (~1 when closing)
    socket_errors: int
    socket_error_kinds: dict[str, int]
    non_2xx: int
    # HTTP/2 and TLS scenarios (bench/proto.py): figures of their own (e.g. the share of resumed
    # handshakes, bytes per idle connection), and what was negotiated (ALPN, TLS version, cipher).
    extra: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def measure(
    spec: ServerSpec,
    scenario: Scenario,
    where: Placement,
    round_no: int,
    seconds: float,
    warmup: float,
) -> Run:
    """Start the server, warm it up, run wrk while reading the tree's CPU time around it."""
    if isinstance(scenario, ProtoScenario):  # HTTP/2 and TLS: own transports and load tools
        return proto.measure(spec, scenario, where, round_no, seconds, warmup)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp, running(spec, where) as server:
        if warmup > 0:
            run_wrk(wrk_command(scenario, where, server.port, warmup, Path(tmp)), warmup)
        argv = wrk_command(scenario, where, server.port, seconds, Path(tmp))
        before, core_before = sample_tree(server.sid), core_times(where.server_cpus)
        opens_before, started = tcp_passive_opens(), time.monotonic()
        result = run_wrk(argv, seconds)
        opens, wall = tcp_passive_opens() - opens_before, time.monotonic() - started
        after, core_after = sample_tree(server.sid), core_times(where.server_cpus)
    if not result.requests or not result.p50_us:
        # A server that answers a pipelined batch only in part leaves wrk waiting forever.
        raise LoadError(
            f"{result.requests} responses but no complete round trip in {seconds} s"
            + (" (does it answer every pipelined request?)" if scenario.pipeline > 1 else "")
        )
    return record(
        spec, scenario, where, round_no, result, (before, after), (core_before, core_after), wall,
        opens,
    )


def record(
    spec: ServerSpec,
    scenario: Scenario,
    where: Placement,
    round_no: int,
    result: LoadResult,
    tree: tuple[Any, Any],
    core: tuple[Any, Any],
    wall: float,
    opens: int,
    extra: dict[str, float] | None = None,
    note: str = "",
) -> Run:
    """A run's record from the load's result and the samples around it: the server tree's
    (sample_tree) and its core's (core_times), before and after."""
    before, after = tree
    core_before, core_after = core
    per_req = 1e6 / result.requests
    server_cpu = after.cpu_s - before.cpu_s
    # Share of the server's core(s) that other processes used during the run.
    other = (core_after.task_s - core_before.task_s - server_cpu) / (wall * len(where.server_cpus))
    return Run(
        server=spec.name,
        scenario=scenario.name,
        round=round_no,
        requests=result.requests,
        seconds=result.seconds,
        rps=result.rps,
        cpu_us_per_req=server_cpu * per_req,
        user_us_per_req=(after.user_s - before.user_s) * per_req,
        sys_us_per_req=(after.sys_s - before.sys_s) * per_req,
        core_us_per_req=None
        if where.shared
        else (core_after.busy_s - core_before.busy_s) * per_req,
        other_load=None if where.shared else max(0.0, other),
        p50_us=result.p50_us,
        p99_us=result.p99_us,
        peak_rss_kb=sum(after.rss_kb),
        peak_rss_max_kb=max(after.rss_kb, default=0),
        processes=after.procs,
        connections_per_req=opens / result.requests,
        socket_errors=result.socket_errors,
        socket_error_kinds=result.socket_error_kinds,
        non_2xx=result.non_2xx,
        extra=extra or {},
        note=note,
    )


def schedule(
    servers: list[ServerSpec], scenarios: list[Scenario], rounds: int
) -> Iterator[tuple[int, Scenario, ServerSpec]]:
    """Round after round; within a round each scenario, and within it each server in turn, so
    that drift of the machine falls on every server alike. Even rounds take the servers in the
    reverse order, so that a server is not always measured just before another: a steady drift
    (the machine getting busier through a run) then cancels out of the paired ratios."""
    for round_no in range(1, rounds + 1):
        order = servers if round_no % 2 else servers[::-1]
        for scenario in scenarios:
            for spec in order:
                yield round_no, scenario, spec


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_all(
    servers: list[ServerSpec],
    scenarios: list[Scenario],
    rounds: int,
    seconds: float,
    warmup: float,
    on_failure: Callable[[int, str, str, Exception], None],
    recoverable: tuple[type[Exception], ...],
    max_other_load: float = 0.1,
    retries: int = 0,
    runs: list[Run] | None = None,
) -> list[Run]:
    """Every scheduled run; a run that fails (server did not start, wrk failed) is reported
    through ``on_failure`` and the others go on. A run during which other processes took more
    than ``max_other_load`` of the server's core is done again, up to ``retries`` times.
    Completed runs are appended to ``runs`` as they finish, so an interrupted caller keeps them."""
    cpus = available_cpus()
    plan = list(schedule(servers, scenarios, rounds))
    runs = [] if runs is None else runs
    started = time.monotonic()
    for index, (round_no, scenario, spec) in enumerate(plan):
        where = placement(scenario, cpus)
        progress(
            f"[{index + 1}/{len(plan)}] round {round_no}/{rounds} · {scenario.name} · "
            f"{spec.name} · {len(plan) - index - 1} runs left · "
            f"{time.monotonic() - started:.0f} s elapsed"
        )
        for attempt in range(retries + 1):
            try:
                run = measure(spec, scenario, where, round_no, seconds, warmup)
            except recoverable as exc:
                on_failure(round_no, scenario.name, spec.name, exc)
                run = None
                break
            if run.other_load is None or run.other_load <= max_other_load:
                break
            progress(
                f"    disturbed: other processes used {run.other_load:.0%} of the server's core"
                + (" - again" if attempt < retries else " - kept, flagged in the report")
            )
        if run is None:
            continue
        progress(
            f"    {run.rps:,.0f} rps, {run.cpu_us_per_req:.2f} µs CPU/req"
            + (
                f" ({run.core_us_per_req:.2f} core, {run.other_load:.0%} other load)"
                if run.core_us_per_req is not None and run.other_load is not None
                else ""
            )
            + ", "
            f"p50 {run.p50_us:,.0f} µs, p99 {run.p99_us:,.0f} µs, errors: "
            f"{run.non_2xx} non-2xx, socket {run.socket_error_kinds or 0}"
        )
        runs.append(run)
    return runs

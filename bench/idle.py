"""Idle keep-alive connections: what they cost a busy server, in memory and in CPU.

    python -m bench.idle                    # 100 busy connections beside 0, 10k, 50k, 100k idle
    python -m bench.idle --idle 0,10000 --servers vrypt,nginx --rounds 3
    python -m bench.idle --idle-kind tls --idle 10000,50000 --keepalive 300   # idle TLS ones
    python -m bench.idle --memory           # bytes per idle connection, 5,000 answered once each
    python -m bench.idle --timeouts --idle 100000 --keepalive 5   # do keep-alive timeouts fire?

Busy mode: for each count of idle connections, each server is started afresh (one worker on
CPU 0), holder processes (on CPU 1, bench/idlehold.py) open that many connections, send one
request on each and read its answer, then leave them open and idle; then wrk (CPU 1) drives 100
busy keep-alive connections for `--duration` seconds while the server's CPU time is read from
/proc around the run (bench.procstat), as in `python -m bench`. Reported per idle count: CPU per
busy request, its ratio to the same server's run without idle connections (same round, same
workers, same server flags), the server's memory (RSS and PSS summed over its processes,
from /proc/PID/smaps_rollup) with the idle connections, and the quiet reading: the server's CPU
time (every thread's schedstat, in ns) over `--quiet` seconds with only the idle connections
open, before the busy run. The quiet reading is what the server's timers and sweeps cost and
nothing else; a server that looks at an idle connection only when one of its timeouts is due
reads there what it reads without idle connections.

`--idle-kind` says what the idle connections speak (bench/idlehold.py): `plain` HTTP/1.1 (the
default), `tls` (HTTP/1.1 over TLS), `h2c` (HTTP/2 by prior knowledge) or `h2-tls` (HTTP/2 over
TLS, ALPN h2); the server is started to match (gunicorn: `--certfile/--keyfile`, `--http-protocols
h2,h1`, `--http2-cleartext prior-knowledge`; nginx: `listen ... ssl [http2]`; nginx 1.22 cannot
serve h2c and HTTP/1.1 on one port, so it sits out `h2c`). The busy load is always wrk's 100
keep-alive HTTP/1.1 connections, over TLS when the server listens with TLS (`tls`, `h2-tls`: wrk
offers no ALPN, so it gets HTTP/1.1) and in cleartext otherwise: for `h2c` the server trusts for
h2c only the holders' addresses (127.0.0.2 and up, `--forwarded-allow-ips`), so wrk, from
127.0.0.1, is served the plain HTTP/1.1 path. Why wrk and not h2load for the h2 kinds: what an
idle connection costs a busy one is the server's time spent on it (walking it at each sweep,
the memory it holds), which takes the same share of a saturated core whatever the busy
connections speak; wrk keep-alive is the steadiest load there is (no calibration run, the least
CPU per request on the load's core), and it keeps the busy path the same in both runs of a
pair, so the ratio is the idle connections' cost alone.

A process may hold at most as many descriptors as the hard RLIMIT_NOFILE allows (20,000 on the
machine these figures come from; raising it needs CAP_SYS_RESOURCE, which that machine's root
does not have). So each holder process keeps at most `PER_PROCESS` idle connections, from a
loopback source address of its own, and a server gets one worker per `PER_PROCESS` idle
connections (vrypt `--workers W`, nginx `worker_processes W` with `reuseport`), every worker on
the same core. The busy run without idle connections that each count is compared with uses the
same number of workers. The servers get `worker_connections` that fit the limit and a keep-alive
timeout longer than the run (`--keepalive`, default 600 s), so no idle connection closes
meanwhile.

Memory mode: RSS and PSS of the whole server before and after `--connections` idle connections
(each answered once, then 3 s for the server to settle: vrypt's sweep runs every second), the
difference divided by the connections. Kernel socket memory is not in either figure.

Timeouts mode: the keep-alive timeout set to `--keepalive` seconds; the holder records, for each
idle connection, the time from its answer to the server's close. A timeout that fires "within its
second" closes between `keepalive` and `keepalive + 1` seconds after the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.idlehold import (
    H2_KINDS,
    KINDS,
    PER_PROCESS,
    TLS_KINDS,
    finish,
    holder_networks,
    holding,
    raise_nofile,
)
from bench.load import run_wrk, wrk_command
from bench.procstat import run_ns, sample_tree, session_pids
from bench.scenarios import SCENARIOS, Placement, available_cpus
from bench.servers import NGINX, NGINX_CONF, ServerSpec, nginx_available, probe, running
from bench.tls import make_certificate
from bench.transports import TRANSPORTS

PER_CONNS = PER_PROCESS + 1_500  # worker_connections of each server worker
DEFAULT_IDLE = (0, 10_000, 50_000, 100_000)


# --- servers with room for the idle connections ---------------------------------------------------


def kind_flags(kind: str, cert: Path, key: Path) -> list[str]:
    """gunicorn's flags for a server whose idle connections speak `kind`."""
    flags = ["--certfile", str(cert), "--keyfile", str(key)] if kind in TLS_KINDS else []
    if kind in H2_KINDS:
        flags += ["--http-protocols", "h2,h1"]
    if kind == "h2c":
        flags += ["--http2-cleartext", "prior-knowledge"]
        flags += ["--forwarded-allow-ips", holder_networks()]
    return flags


def _certificate(kind: str, tmp: Path) -> tuple[Path, Path]:
    return make_certificate(tmp) if kind in TLS_KINDS else (Path(), Path())


def _vrypt(keepalive: int, connections: int, kind: str):
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py",
            "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
            "--worker-connections", str(connections), "--keep-alive", str(keepalive),
            *kind_flags(kind, *_certificate(kind, tmp)),
        ]  # fmt: skip

    return build


def _nginx(keepalive: int, connections: int, kind: str):
    listen = {"plain": "", "tls": "ssl ", "h2-tls": "ssl http2 "}[kind]

    def build(port: int, workers: int, tmp: Path) -> list[str]:
        conf = tmp / "nginx.conf"
        text = NGINX_CONF.format(workers=workers, tmp=tmp, port=port, access_log="off")
        extra = f"listen 127.0.0.1:{port} {listen}reuseport backlog=4096;"
        if kind in TLS_KINDS:
            cert, key = make_certificate(tmp)
            extra += (
                f" ssl_certificate {cert}; ssl_certificate_key {key};"
                " ssl_protocols TLSv1.2 TLSv1.3;"
            )
        text = (
            text.replace("keepalive_timeout 30s;", f"keepalive_timeout {keepalive}s;")
            .replace("worker_connections 10000;", f"worker_connections {connections};")
            .replace("worker_rlimit_nofile 20000;", f"worker_rlimit_nofile {connections + 300};")
            .replace(f"listen 127.0.0.1:{port};", extra)
        )
        conf.write_text(text)
        return [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]

    return build


def _peer(command: str, keepalive: int, connections: int, kind: str):
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        cert, key = _certificate(kind, tmp)
        text = (
            command.replace("{port}", str(port))
            .replace("{workers}", str(workers))
            .replace("{keepalive}", str(keepalive))
            .replace("{connections}", str(connections))
            .replace("{kind_flags}", " ".join(kind_flags(kind, cert, key)))
            .replace("{certfile}", str(cert))
            .replace("{keyfile}", str(key))
        )
        return ["sh", "-c", text]

    return build


class _BusyLoad:
    """For `running`: the server's command as its spec builds it, and the readiness probe in
    the busy load's protocol (HTTP/1.1, over TLS when the server listens with TLS)."""

    def __init__(self, kind: str) -> None:
        self.tls = kind in TLS_KINDS

    @staticmethod
    def build(spec: ServerSpec, port: int, workers: int, tmp: Path) -> list[str]:
        return spec.build(port, workers, tmp)

    def probe(self, port: int, timeout: float = 1.0) -> bytes | None:
        return TRANSPORTS["tls"].probe(port, timeout) if self.tls else probe(port, timeout)


def specs(
    names: list[str], peers: list[str], keepalive: int, connections: int, kind: str = "plain"
) -> list[ServerSpec]:
    out = []
    for name in names:
        if name == "vrypt":
            out.append(
                ServerSpec(
                    "vrypt",
                    "gunicorn -c conf/gunicorn.conf.py --worker-connections N --keep-alive K",
                    _vrypt(keepalive, connections, kind),
                    env=(("VRYPT_STATSD_HOST", ""),),
                )
            )
        elif name == "nginx" and kind == "h2c":
            print("nginx sits out h2c: 1.22 serves h2c and HTTP/1.1 on two ports", file=sys.stderr)
        elif name == "nginx" and nginx_available():
            out.append(
                ServerSpec(
                    "nginx",
                    "nginx as in bench, worker_connections N, keepalive_timeout K, backlog 4096",
                    _nginx(keepalive, connections, kind),
                )
            )
    for arg in peers:
        name, _, command = arg.partition("=")
        out.append(
            ServerSpec(
                name,
                "given with --peer",
                _peer(command, keepalive, connections, kind),
                command=command,
            )
        )
    return out


def workers_for(idle: int) -> int:
    return max(1, -(-idle // PER_PROCESS))


# --- memory of a process tree ---------------------------------------------------------------


def memory_kb(sid: int) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(RSS, PSS) summed over the server's processes, in kB, and each process's pair."""
    per: dict[int, tuple[int, int]] = {}
    for pid in session_pids(sid):
        values = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0])
        if values:
            per[pid] = (values.get("Rss", 0), values.get("Pss", 0))
    return sum(r for r, _ in per.values()), sum(p for _, p in per.values()), per


# --- modes ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class BusyRun:
    server: str
    idle: int
    workers: int
    round: int
    requests: int
    cpu_us_per_req: float
    user_us_per_req: float
    sys_us_per_req: float
    rss_kb: int
    pss_kb: int
    other_load: float
    quiet_ms_per_s: float  # the server's CPU with no busy load (only the idle ones open)


def placement_for(idle: int, workers: int = 0) -> Placement:
    cpus = available_cpus()
    return Placement(cpus[:1], cpus[1:] or cpus, workers or workers_for(idle))


def busy_run(
    spec: ServerSpec,
    idle: int,
    workers: int,
    round_no: int,
    seconds: float,
    kind: str = "plain",
    quiet: float = 5.0,
) -> BusyRun:
    where = placement_for(idle, workers)
    scenario = SCENARIOS["ka100"]
    with (
        tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp,
        running(spec, where, transport=_BusyLoad(kind)) as server,
        contextlib.ExitStack() as stack,
    ):
        if idle:
            stack.enter_context(holding(server.port, idle, where.load_cpus, kind))
        time.sleep(2.0)  # a sweep or two over the idle connections
        rss, pss, _ = memory_kb(server.sid)
        # What the idle connections cost with nothing else to do: the sweeps that walk them.
        quiet_ns, quiet_at = run_ns(server.sid), time.monotonic()
        time.sleep(quiet)
        quiet_ns, quiet_s = run_ns(server.sid) - quiet_ns, time.monotonic() - quiet_at
        url = f"{'https' if kind in TLS_KINDS else 'http'}://127.0.0.1:{server.port}/"
        warm = wrk_command(scenario, where, server.port, 1, Path(tmp))
        run_wrk([*warm[:-1], url], 1)
        argv = [*wrk_command(scenario, where, server.port, seconds, Path(tmp))[:-1], url]
        before = sample_tree(server.sid)
        core_before = _core_task(where.server_cpus)
        started = time.monotonic()
        result = run_wrk(argv, seconds)
        wall = time.monotonic() - started
        after = sample_tree(server.sid)
        core_after = _core_task(where.server_cpus)
    per = 1e6 / max(result.requests, 1)
    cpu = after.cpu_s - before.cpu_s
    return BusyRun(
        spec.name,
        idle,
        where.workers,
        round_no,
        result.requests,
        cpu * per,
        (after.user_s - before.user_s) * per,
        (after.sys_s - before.sys_s) * per,
        rss,
        pss,
        max(0.0, (core_after - core_before - cpu) / wall),
        quiet_ns / 1e6 / quiet_s,
    )


def _core_task(cpus: tuple[int, ...]) -> float:
    from bench.procstat import core_times

    return core_times(cpus).task_s


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def busy_mode(
    servers: list[ServerSpec],
    counts: list[int],
    rounds: int,
    seconds: float,
    kind: str,
    quiet: float = 5.0,
) -> None:
    runs: list[BusyRun] = []
    plan = []  # (idle, workers): each count, and no idle connection with as many workers
    for idle in counts:
        for pair in ((0, workers_for(idle)), (idle, workers_for(idle))):
            if pair not in plan:
                plan.append(pair)
    for round_no in range(1, rounds + 1):
        for idle, workers in plan:
            order = servers if round_no % 2 else servers[::-1]
            for spec in order:
                print(
                    f"round {round_no} · {idle:,} idle {kind} · {workers} worker(s) · {spec.name}",
                    file=sys.stderr,
                )
                run = busy_run(spec, idle, workers, round_no, seconds, kind, quiet)
                print(
                    f"    {run.cpu_us_per_req:.2f} µs CPU/req ({run.user_us_per_req:.2f} / "
                    f"{run.sys_us_per_req:.2f}), {run.requests / seconds:,.0f} rps, RSS "
                    f"{run.rss_kb:,} kB, PSS {run.pss_kb:,} kB, other load {run.other_load:.0%}; "
                    f"quiet: {run.quiet_ms_per_s:.2f} ms CPU/s",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(run)
    print(
        "| server | idle connections | workers | CPU µs per busy request (min-max) | user / sys "
        "| vs 0 idle, same workers and round | vs nginx, same round | RSS MB | PSS MB "
        "| quiet: server CPU ms/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    by = {(r.server, r.idle, r.workers, r.round): r for r in runs}
    for spec in servers:
        for idle, workers in plan:
            mine = [
                r for r in runs if r.server == spec.name and r.idle == idle and r.workers == workers
            ]
            if not mine:
                continue
            cpu = [r.cpu_us_per_req for r in mine]
            base = [
                r.cpu_us_per_req / by[(spec.name, 0, workers, r.round)].cpu_us_per_req
                for r in mine
                if (spec.name, 0, workers, r.round) in by
            ]
            ref = [
                r.cpu_us_per_req / by[("nginx", idle, workers, r.round)].cpu_us_per_req
                for r in mine
                if ("nginx", idle, workers, r.round) in by
            ]
            print(
                f"| {spec.name} | {idle:,} | {workers} | "
                f"{median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | "
                f"{median([r.user_us_per_req for r in mine]):.2f} / "
                f"{median([r.sys_us_per_req for r in mine]):.2f} | "
                + (f"{median(base):.2f}x" if base else "-")
                + " | "
                + (f"{median(ref):.2f}x" if ref else "-")
                + f" | {median([r.rss_kb for r in mine]) / 1024:.1f} | "
                f"{median([r.pss_kb for r in mine]) / 1024:.1f} | "
                + " / ".join(f"{r.quiet_ms_per_s:.2f}" for r in mine)
                + " |"
            )
    print(
        f"\n100 busy keep-alive connections (wrk, {seconds:g} s, "
        f"{'HTTP/1.1 over TLS' if kind in TLS_KINDS else 'HTTP/1.1'}) beside idle {kind} ones; "
        f"{rounds} round(s); memory with the idle connections open, before the busy run; "
        f"quiet: the server's CPU time (schedstat) over {quiet:g} s with only the idle "
        "connections open, before the busy run (each round's)."
    )


def memory_mode(servers: list[ServerSpec], connections: int, rounds: int, kind: str) -> None:
    where = placement_for(connections)
    print(
        "| server | round | RSS before kB | RSS after kB | bytes per idle connection (RSS) "
        "| PSS before kB | PSS after kB | bytes per idle connection (PSS) "
        "| processes: RSS/PSS kB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for round_no in range(1, rounds + 1):
        for spec in servers:
            with running(spec, where, transport=_BusyLoad(kind)) as server:
                time.sleep(3.0)
                rss0, pss0, _ = memory_kb(server.sid)
                with holding(server.port, connections, where.load_cpus, kind):
                    time.sleep(3.0)
                    rss1, pss1, per = memory_kb(server.sid)
            procs = ", ".join(f"{r:,}/{p:,}" for r, p in per.values())
            print(
                f"| {spec.name} | {round_no} | {rss0:,} | {rss1:,} | "
                f"{(rss1 - rss0) * 1024 / connections:.0f} | {pss0:,} | {pss1:,} | "
                f"{(pss1 - pss0) * 1024 / connections:.0f} | {procs} |",
                flush=True,
            )
    print(
        f"\n{connections:,} {kind} connections, each answered once and then idle; memory "
        "3 s after the server answered (before) and 3 s after the last answer (after)."
    )


def timeouts_mode(servers: list[ServerSpec], idle: int, keepalive: int, kind: str) -> None:
    where = placement_for(idle)
    print("| server | idle connections | workers | keep-alive s | closed | answer to close: min / "
          "p50 / p99 / max s | closed within [K, K+1] s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for spec in servers:
        with (
            running(spec, where, transport=_BusyLoad(kind)) as server,
            holding(server.port, idle, where.load_cpus, kind) as h,
        ):
            time.sleep(keepalive + 3.0)
            result = finish(h)
        after = sorted(result["closed_after"])
        if not after:
            print(f"| {spec.name} | {idle:,} | {where.workers} | {keepalive} | 0 | - | - |")
            continue
        within = sum(keepalive <= a <= keepalive + 1 for a in after)

        def q(p: float, values: list[float] = after) -> float:
            return values[min(len(values) - 1, int(p * len(values)))]

        print(
            f"| {spec.name} | {idle:,} | {where.workers} | {keepalive} | "
            f"{len(after):,} of {idle:,} | "
            f"{after[0]:.2f} / {q(0.5):.2f} / {q(0.99):.2f} / {after[-1]:.2f} | "
            f"{within:,} ({within / len(after):.1%}) |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="vrypt,nginx", help="comma-separated (default vrypt,nginx)")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="any server; {port} {workers} {keepalive} {connections} are filled in, and "
        "{kind_flags} (gunicorn's flags for --idle-kind), {certfile} {keyfile}",
    )
    p.add_argument("--idle", default=",".join(map(str, DEFAULT_IDLE)), help="idle counts")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per run")
    p.add_argument(
        "--quiet", type=float, default=5.0, help="seconds of the quiet reading (default 5)"
    )
    p.add_argument("--keepalive", type=int, default=0, help="seconds (default 600; 5 timeouts)")
    p.add_argument("--memory", action="store_true", help="bytes per idle connection")
    p.add_argument("--connections", type=int, default=5000, help="with --memory (default 5000)")
    p.add_argument("--timeouts", action="store_true", help="keep-alive timeouts of idle ones")
    p.add_argument(
        "--idle-kind",
        choices=KINDS,
        default="plain",
        help="what the idle connections speak (default plain HTTP/1.1)",
    )
    args = p.parse_args(argv)
    counts = [int(c) for c in args.idle.split(",") if c]
    raise_nofile(PER_PROCESS + 1_500)
    keepalive = args.keepalive or (5 if args.timeouts else 600)
    names = [s for s in args.servers.split(",") if s]
    servers = specs(names, args.peer, keepalive, PER_CONNS, args.idle_kind)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    if args.memory:
        memory_mode(servers, args.connections, args.rounds, args.idle_kind)
    elif args.timeouts:
        timeouts_mode(servers, max(counts), keepalive, args.idle_kind)
    else:
        if 0 not in counts:
            counts.insert(0, 0)
        busy_mode(servers, counts, args.rounds, args.duration, args.idle_kind, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Idle keep-alive connections: what they cost a busy server, in memory and in CPU.

    python -m bench.idle                    # 100 busy connections beside 0, 10k, 50k, 100k idle
    python -m bench.idle --idle 0,10000 --servers vrypt,nginx --rounds 3
    python -m bench.idle --memory           # bytes per idle connection, 5,000 answered once each
    python -m bench.idle --timeouts --idle 100000 --keepalive 5   # do keep-alive timeouts fire?

Busy mode: for each count of idle connections, each server is started afresh (one worker on
CPU 0), a holder process (on CPU 1) opens that many connections, sends one request on each and
reads its answer, then leaves them open and idle; then wrk (CPU 1) drives 100 busy keep-alive
connections for `--duration` seconds while the server's CPU time is read from /proc around the
run (bench.procstat), as in `python -m bench`. Reported per idle count: CPU per busy request, its
ratio to the same server's run without idle connections (same round), and the server's memory
(RSS and PSS summed over its processes, from /proc/PID/smaps_rollup) with the idle connections.

A process may hold at most as many descriptors as the hard RLIMIT_NOFILE allows (20,000 on the
machine these figures come from; raising it needs CAP_SYS_RESOURCE, which that machine's root
does not have). So each holder process keeps at most `PER_PROCESS` idle connections, from a
loopback source address of its own (127.0.0.2, 127.0.0.3, ...: one source address has only
~28k ports towards one destination), and a server gets one worker per `PER_PROCESS` idle
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
import errno
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import run_wrk, wrk_command
from bench.procstat import sample_tree, session_pids
from bench.scenarios import SCENARIOS, Placement, available_cpus, cpu_list
from bench.servers import NGINX, NGINX_CONF, ROOT, ServerSpec, nginx_available, running

PER_PROCESS = 18_000  # idle connections per holder process and per server worker
PER_CONNS = PER_PROCESS + 1_500  # worker_connections of each server worker
# Holders' source ports: below the ephemeral range (32768 and up here), so that they never take
# a port that another program has just been given by the kernel and is about to bind.
FIRST_SOURCE_PORT, LAST_SOURCE_PORT = 10_000, 32_767
REQUEST = b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n"
IN_FLIGHT = 1_000  # connects (and first requests) outstanding at once
DEFAULT_IDLE = (0, 10_000, 50_000, 100_000)


# --- servers with room for the idle connections ---------------------------------------------------


def _vrypt(keepalive: int, connections: int):
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py",
            "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
            "--worker-connections", str(connections), "--keep-alive", str(keepalive),
        ]  # fmt: skip

    return build


def _nginx(keepalive: int, connections: int):
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        conf = tmp / "nginx.conf"
        text = NGINX_CONF.format(workers=workers, tmp=tmp, port=port, access_log="off")
        text = (
            text.replace("keepalive_timeout 30s;", f"keepalive_timeout {keepalive}s;")
            .replace("worker_connections 10000;", f"worker_connections {connections};")
            .replace("worker_rlimit_nofile 20000;", f"worker_rlimit_nofile {connections + 300};")
            .replace(
                f"listen 127.0.0.1:{port};", f"listen 127.0.0.1:{port} reuseport backlog=4096;"
            )
        )
        conf.write_text(text)
        return [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]

    return build


def _peer(command: str, keepalive: int, connections: int):
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        text = (
            command.replace("{port}", str(port))
            .replace("{workers}", str(workers))
            .replace("{keepalive}", str(keepalive))
            .replace("{connections}", str(connections))
        )
        return ["sh", "-c", text]

    return build


def specs(names: list[str], peers: list[str], keepalive: int, connections: int) -> list[ServerSpec]:
    out = []
    for name in names:
        if name == "vrypt":
            out.append(
                ServerSpec(
                    "vrypt",
                    "gunicorn -c conf/gunicorn.conf.py --worker-connections N --keep-alive K",
                    _vrypt(keepalive, connections),
                    env=(("VRYPT_STATSD_HOST", ""),),
                )
            )
        elif name == "nginx" and nginx_available():
            out.append(
                ServerSpec(
                    "nginx",
                    "nginx as in bench, worker_connections N, keepalive_timeout K, backlog 4096",
                    _nginx(keepalive, connections),
                )
            )
    for arg in peers:
        name, _, command = arg.partition("=")
        out.append(
            ServerSpec(
                name, "given with --peer", _peer(command, keepalive, connections), command=command
            )
        )
    return out


def raise_nofile(need: int) -> None:
    """The soft open-file limit up to `need` (within the hard limit, which children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"RLIMIT_NOFILE: hard limit {hard} < {need} needed per process")
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


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


# --- the holder: a process that keeps the idle connections -----------------------------------


def hold(port: int, count: int, source: int) -> int:
    """Open `count` connections, one request and its answer on each, print `ready`, then keep
    them and note when the server closes each; on stdin's EOF print the closes as JSON."""
    raise_nofile(count + 100)
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    answered_at: dict[int, float] = {}
    buffers: dict[int, bytes] = {}
    closed_after: list[float] = []
    opened = 0
    started = time.monotonic()
    in_flight = 0
    ready = False
    port_no = FIRST_SOURCE_PORT - 1
    ep.register(sys.stdin.fileno(), select.EPOLLIN)
    while True:
        while not ready and opened < count and in_flight < IN_FLIGHT:
            sock = socket.socket()
            sock.setblocking(False)
            # A source port of our own choosing, below the ephemeral range: taking ~100k
            # ephemeral ports would collide with other programs that bind 0.0.0.0:PORT (tests
            # that pick a free port and bind it a moment later).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            while True:
                port_no += 1
                if port_no > LAST_SOURCE_PORT:
                    raise OSError(errno.EADDRNOTAVAIL, "no source port left")
                try:
                    sock.bind((f"127.0.0.{source}", port_no))
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            socks[sock.fileno()] = sock
            ep.register(sock.fileno(), select.EPOLLOUT)
            opened += 1
            in_flight += 1
        if not ready and opened == count and in_flight == 0:
            ready = True
            print(f"ready {count} {time.monotonic() - started:.2f}", flush=True)
        for fd, events in ep.poll(1.0):
            if fd == sys.stdin.fileno():
                if not os.read(fd, 4096):
                    print(json.dumps({"open": len(socks), "closed_after": closed_after}))
                    return 0
                continue
            sock = socks[fd]
            if events & select.EPOLLOUT:
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, f"connect: {os.strerror(error)}")
                sock.send(REQUEST)
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(4096)
            except ConnectionError:
                data = b""
            if data:
                buf = buffers.pop(fd, b"") + data
                if buf.endswith(b"Vrypt"):
                    answered_at[fd] = time.monotonic()
                    in_flight -= 1
                else:
                    buffers[fd] = buf
                continue
            ep.unregister(fd)
            sock.close()
            del socks[fd]
            if fd in answered_at:
                closed_after.append(time.monotonic() - answered_at.pop(fd))
            else:
                raise RuntimeError("the server closed an idle connection before its answer")


@contextlib.contextmanager
def holding(port: int, count: int, cpus: tuple[int, ...]):
    """Holder processes with `count` idle connections in all (at most PER_PROCESS each, one after
    the other), pinned to `cpus`; yields them. `finish` collects the closes they saw."""
    procs: list[subprocess.Popen] = []
    try:
        for index, start in enumerate(range(0, count, PER_PROCESS)):
            argv = ["taskset", "-c", cpu_list(cpus), sys.executable, "-m", "bench.idle", "--hold"]
            argv += [str(port), str(min(PER_PROCESS, count - start)), str(2 + index)]
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            line = proc.stdout.readline() if proc.stdout else ""  # until ready (or its death)
            if not line.startswith("ready"):
                raise RuntimeError(f"a holder of idle connections failed: {line!r}")
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def finish(procs: list[subprocess.Popen]) -> dict:
    closed: list[float] = []
    still_open = 0
    for proc in procs:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        result = json.loads(proc.stdout.readline())
        closed += result["closed_after"]
        still_open += result["open"]
    return {"open": still_open, "closed_after": closed}


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


def placement_for(idle: int, workers: int = 0) -> Placement:
    cpus = available_cpus()
    return Placement(cpus[:1], cpus[1:] or cpus, workers or workers_for(idle))


def busy_run(spec: ServerSpec, idle: int, workers: int, round_no: int, seconds: float) -> BusyRun:
    where = placement_for(idle, workers)
    scenario = SCENARIOS["ka100"]
    with (
        tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp,
        running(spec, where) as server,
        contextlib.ExitStack() as stack,
    ):
        if idle:
            stack.enter_context(holding(server.port, idle, where.load_cpus))
        time.sleep(2.0)  # a sweep or two over the idle connections
        rss, pss, _ = memory_kb(server.sid)
        run_wrk(wrk_command(scenario, where, server.port, 1, Path(tmp)), 1)
        argv = wrk_command(scenario, where, server.port, seconds, Path(tmp))
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
    )


def _core_task(cpus: tuple[int, ...]) -> float:
    from bench.procstat import core_times

    return core_times(cpus).task_s


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def busy_mode(servers: list[ServerSpec], counts: list[int], rounds: int, seconds: float) -> None:
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
                    f"round {round_no} · {idle:,} idle · {workers} worker(s) · {spec.name}",
                    file=sys.stderr,
                )
                run = busy_run(spec, idle, workers, round_no, seconds)
                print(
                    f"    {run.cpu_us_per_req:.2f} µs CPU/req ({run.user_us_per_req:.2f} / "
                    f"{run.sys_us_per_req:.2f}), {run.requests / seconds:,.0f} rps, RSS "
                    f"{run.rss_kb:,} kB, PSS {run.pss_kb:,} kB, other load {run.other_load:.0%}",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(run)
    print(
        "| server | idle connections | workers | CPU µs per busy request (min-max) | user / sys "
        "| vs 0 idle, same workers and round | vs nginx, same round | RSS MB | PSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
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
                f"{median([r.pss_kb for r in mine]) / 1024:.1f} |"
            )
    print(
        f"\n100 busy keep-alive connections (wrk, {seconds:g} s) beside the idle ones; "
        f"{rounds} round(s); memory with the idle connections open, before the busy run."
    )


def memory_mode(servers: list[ServerSpec], connections: int, rounds: int) -> None:
    where = placement_for(connections)
    print(
        "| server | round | RSS before kB | RSS after kB | bytes per idle connection (RSS) "
        "| PSS before kB | PSS after kB | bytes per idle connection (PSS) "
        "| processes: RSS/PSS kB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for round_no in range(1, rounds + 1):
        for spec in servers:
            with running(spec, where) as server:
                time.sleep(3.0)
                rss0, pss0, _ = memory_kb(server.sid)
                with holding(server.port, connections, where.load_cpus):
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
        f"\n{connections:,} keep-alive connections, each answered once and then idle; memory "
        "3 s after the server answered (before) and 3 s after the last answer (after)."
    )


def timeouts_mode(servers: list[ServerSpec], idle: int, keepalive: int) -> None:
    where = placement_for(idle)
    print("| server | idle connections | workers | keep-alive s | closed | answer to close: min / "
          "p50 / p99 / max s | closed within [K, K+1] s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for spec in servers:
        with running(spec, where) as server, holding(server.port, idle, where.load_cpus) as h:
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
        help="any server; {port} {workers} {keepalive} {connections} are filled in",
    )
    p.add_argument("--idle", default=",".join(map(str, DEFAULT_IDLE)), help="idle counts")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per run")
    p.add_argument("--keepalive", type=int, default=0, help="seconds (default 600; 5 timeouts)")
    p.add_argument("--memory", action="store_true", help="bytes per idle connection")
    p.add_argument("--connections", type=int, default=5000, help="with --memory (default 5000)")
    p.add_argument("--timeouts", action="store_true", help="keep-alive timeouts of idle ones")
    p.add_argument("--hold", nargs=3, type=int, help=argparse.SUPPRESS)  # PORT COUNT SOURCE
    args = p.parse_args(argv)
    if args.hold:
        return hold(*args.hold)
    counts = [int(c) for c in args.idle.split(",") if c]
    raise_nofile(PER_PROCESS + 1_500)
    keepalive = args.keepalive or (5 if args.timeouts else 600)
    servers = specs([s for s in args.servers.split(",") if s], args.peer, keepalive, PER_CONNS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    if args.memory:
        memory_mode(servers, args.connections, args.rounds)
    elif args.timeouts:
        timeouts_mode(servers, max(counts), keepalive)
    else:
        if 0 not in counts:
            counts.insert(0, 0)
        busy_mode(servers, counts, args.rounds, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Workers replaced under load (reload, recycling, TTIN/TTOU, kills, upgrade, stop), counted
request by request.

`python -m tests.lifecycle_load --listener reuse|shared --event EVENT` starts gunicorn with
VryptWorker on 127.0.0.1, drives it with two load clients (tests/loadgen.py: keep-alive
connections, and a new connection per request), replaces workers for the whole run, and prints one
JSON object: what each client saw (ok / refused / stale / lost by kind, latencies), how many
workers booted, whether the worker warned about net.ipv4.tcp_migrate_req, and the sysctl's value.

Events: `hup` (a reload every --hup-every seconds), `recycle` (--max-requests with a quarter of it
as jitter), `ttin` (TTIN and TTOU in turn), `kill` (SIGKILL of one worker every second), `usr2`
(a USR2 upgrade, then TERM of the old arbiter once the new one serves), `term` (TERM of the
arbiter 1.5 s before the clients stop: connects after that are refused, as for any stopped
server, and nothing accepted may be lost).

`--netns` runs the same thing inside a private network namespace (`unshare --net`, root only) with
net.ipv4.tcp_migrate_req set to 1 there; the host's sysctls are never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import loadgen
from tests.support import CONF, ROOT, base_env, free_port, start_server

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")
WARNING = "net.ipv4.tcp_migrate_req is not 1"
EVENTS = ("hup", "recycle", "ttin", "kill", "usr2", "term")


def migrate_req() -> str:
    try:
        return MIGRATE_REQ.read_text().strip()
    except OSError:
        return "absent"


def run(
    listener: str,
    event: str,
    workers: int = 2,
    duration: float = 6.0,
    connections: int = 20,
    max_requests: int = 3000,
    hup_every: float = 0.7,
    modes: tuple[str, ...] = ("keepalive", "close"),
) -> dict[str, object]:
    env = base_env(VRYPT_REUSE_PORT="1" if listener == "reuse" else "0")
    args = ["--graceful-timeout", "10", "--timeout", "30"]
    if event == "recycle":
        jitter = str(max_requests // 4)
        args += ["--max-requests", str(max_requests), "--max-requests-jitter", jitter]
    cmd = None
    if event == "usr2":
        # USR2 re-executes the command line: with `python -m gunicorn` that runs gunicorn's
        # __main__.py as a script, whose folder (gunicorn/, with its `http` package) then shadows
        # the standard library. Operators run the console script; so does this scenario.
        port = free_port()
        script = str(Path(sys.executable).parent / "gunicorn")
        cmd = [script, "-c", str(CONF), "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
        cmd += ["--no-control-socket", *args]
        server = start_server(workers=workers, env=env, cmd=cmd, port=port)
    else:
        server = start_server(*args, workers=workers, env=env)
    arbiter = server.proc.pid
    stopped_at = None
    try:
        clients = {
            mode: loadgen.spawn(server.port, mode, connections, duration, latencies=True)
            for mode in modes
        }
        started = time.monotonic()
        hups = 0
        if event in ("hup", "ttin", "kill"):
            # a signal every hup_every seconds (kill: every second), the last one well before
            # the clients stop
            every = 1.0 if event == "kill" else hup_every
            while time.monotonic() - started < duration - 1.5:
                time.sleep(every)
                if event == "hup":
                    server.signal(signal.SIGHUP)
                elif event == "ttin":
                    server.signal(signal.SIGTTIN if hups % 2 == 0 else signal.SIGTTOU)
                else:
                    pids = server.worker_pids()
                    if pids:
                        os.kill(random.choice(pids), signal.SIGKILL)
                hups += 1
        elif event == "usr2":
            time.sleep(1.0)
            server.signal(signal.SIGUSR2)
            arbiter = _new_arbiter(server, workers, timeout=max(duration - 2.5, 3.0))
            server.signal(signal.SIGTERM)
            hups = 1
        elif event == "term":
            time.sleep(max(duration - 1.5, 0.5))
            server.signal(signal.SIGTERM)
            stopped_at = time.monotonic() - started
        tallies = {mode: loadgen.collect(p, timeout=duration + 60) for mode, p in clients.items()}
        alive = _alive(arbiter)
        time.sleep(0.5)
        log = server.log
    finally:
        server.stop()
    return {
        "listener": listener,
        "event": event,
        "workers": workers,
        "duration_s": duration,
        "connections_per_client": connections,
        "tcp_migrate_req": migrate_req(),
        "hups": hups,  # signals sent; gunicorn runs one reload for HUPs that arrive during one
        "reloads": log.count("Hang up: "),
        "workers_booted": log.count("Booting worker with pid"),
        "recycles": log.count("Autorestarting worker"),
        "warned_migrate_req": WARNING in log,
        "killed": log.count("was sent SIGKILL") + log.count("was sent KILL"),
        "stopped_at_s": stopped_at,
        "traceback": "Traceback" in log,
        "arbiter_alive": alive,
        "clients": {mode: tally.summary() for mode, tally in tallies.items()},
        "lost": sum(tally.lost for tally in tallies.values()),
    }


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(child) for child in out.stdout.split()]


def _new_arbiter(server: object, workers: int, timeout: float) -> int:
    """After USR2: the new arbiter (a child of the old one with workers of its own), once all
    its workers are up."""
    old = server.proc.pid  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(old):
            if len(_children(child)) >= workers:
                time.sleep(0.3)  # let the last one reach its loop
                return child
        time.sleep(0.05)
    raise AssertionError("no new arbiter after USR2")


def netns_available() -> bool:
    try:
        result = subprocess.run(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && sysctl -qw "
             "net.ipv4.tcp_migrate_req=1 && cat /proc/sys/net/ipv4/tcp_migrate_req"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == "1"


def run_in_netns(argv: list[str], migrate: int = 1, timeout: float = 180) -> dict[str, object]:
    """This module's command line, run inside a fresh network namespace with the sysctl set."""
    inner = shlex.join([sys.executable, "-m", "tests.lifecycle_load", *argv])
    script = f"ip link set lo up && sysctl -qw net.ipv4.tcp_migrate_req={migrate} && exec {inner}"
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.lifecycle_load", description=__doc__)
    parser.add_argument("--listener", choices=("reuse", "shared"), default="reuse")
    parser.add_argument("--event", choices=EVENTS, default="hup")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=20, help="per client")
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--hup-every", type=float, default=0.7)
    parser.add_argument("--modes", default="keepalive,close")
    parser.add_argument(
        "--netns", type=int, choices=(0, 1), default=None,
        help="run inside `unshare --net` with net.ipv4.tcp_migrate_req set to this value",
    )  # fmt: skip
    return parser


def main_result(argv: list[str]) -> dict[str, object]:
    """This module's command line, run here (no namespace), as a dict."""
    args = _parser().parse_args(argv)
    return run(
        args.listener,
        args.event,
        workers=args.workers,
        duration=args.duration,
        connections=args.connections,
        max_requests=args.max_requests,
        hup_every=args.hup_every,
        modes=tuple(args.modes.split(",")),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = _parser().parse_args(argv)
    if args.netns is not None:
        i = argv.index("--netns")
        del argv[i : i + 2]
        print(json.dumps(run_in_netns(argv, args.netns)))
        return 0
    print(json.dumps(main_result(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: parse options, pick servers and scenarios, run, write the reports."""

from __future__ import annotations

import argparse
import platform
import resource
import shlex
import signal
import ssl
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from types import FrameType

from bench import report
from bench.h2load import H2LOAD
from bench.load import LoadError, wrk_available
from bench.proto import describe_load, tools_missing
from bench.runner import Run, progress, run_all
from bench.scenarios import (
    DEFAULT_SCENARIOS,
    QUICK_SCENARIOS,
    SCENARIOS,
    ProtoScenario,
    Scenario,
    available_cpus,
    cpu_list,
    placement,
)
from bench.servers import (
    BUILTIN,
    NGINX,
    OPT_IN,
    ROOT,
    ServerError,
    ServerSpec,
    describe_command,
    hypercorn_available,
    nginx_available,
    peer_spec,
    vrypt_importable,
)
from bench.stats import check_targets, summarize
from bench.tls import OPENSSL

DEFAULT_OUT = ROOT / "bench" / "results"


class UsageError(Exception):
    """A bad choice of servers or scenarios: reported like an argparse error, exit code 2."""


def _peer(arg: str) -> ServerSpec:
    try:
        return peer_spec(arg)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark vrypt_worker side by side with nginx and gunicorn's gevent workers.",
    )
    p.add_argument(
        "--servers",
        help=(
            "comma-separated built-in servers (default: those available of "
            f"{','.join(n for n in BUILTIN if n not in OPT_IN)}; also {','.join(sorted(OPT_IN))})"
        ),
    )
    p.add_argument(
        "--peer",
        type=_peer,
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another server to compare, started by sh; {port} and {workers} are filled in",
    )
    p.add_argument(
        "--scenarios",
        help=f"comma-separated, of {','.join(SCENARIOS)} (default: {','.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per run (default 1)")
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.1,
        help="redo a run if other processes took more than this share of the server's core "
        "(default 0.1)",
    )
    p.add_argument("--retries", type=int, default=2, help="redos of a disturbed run (default 2)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round of 1 s, keep-alive only, vrypt and one reference",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir (bench/results/)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--rounds and --duration must be >= 1, --warmup >= 0")
    return args


def available(name: str) -> bool:
    if name in ("vrypt", "vrypt-log"):
        return vrypt_importable()
    if name in ("nginx", "nginx-log", "nginx-deferred"):
        return nginx_available()
    if name == "hypercorn":
        return hypercorn_available()
    return True


def pick_servers(args: argparse.Namespace) -> list[ServerSpec]:
    if args.servers:
        names = [n.strip() for n in args.servers.split(",") if n.strip()]
        unknown = [n for n in names if n not in BUILTIN]
        if unknown:
            raise UsageError(f"unknown server(s) {unknown}; built-in: {list(BUILTIN)}")
        missing = [n for n in names if not available(n)]
        if missing:
            raise UsageError(f"not available on this machine: {missing}")
    else:
        names = [n for n in BUILTIN if n not in OPT_IN and available(n)]
        for skipped in sorted(set(BUILTIN) - OPT_IN - set(names)):
            progress(f"warning: {skipped} is not available here; skipped")
        if args.quick:
            refs = [n for n in names if n != "vrypt"]
            names = [n for n in names if n == "vrypt"] + refs[:1]
    specs = [BUILTIN[n] for n in names]
    specs += args.peer
    if len({s.name for s in specs}) != len(specs):
        raise UsageError("server names must be unique")
    return specs


def pick_scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.scenarios:
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    else:
        names = list(QUICK_SCENARIOS if args.quick else DEFAULT_SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UsageError(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    scenarios = [SCENARIOS[n] for n in names]
    if len(available_cpus()) < 2:
        progress("warning: one CPU only: server and wrk share it; all-cores scenarios skipped")
        scenarios = [s for s in scenarios if not s.all_cores]
    return scenarios


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def collect_meta(
    args: argparse.Namespace, argv: list[str], specs: list[ServerSpec], scenarios: list[Scenario]
) -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("gunicorn", "gevent"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "?"
    versions["nginx"] = _version([NGINX, "-v"]).split("/")[-1]
    versions["wrk"] = _version(["wrk", "-v"]).split(" [")[0]
    if any(isinstance(s, ProtoScenario) for s in scenarios):  # HTTP/2 and TLS
        versions["h2load"] = _version([H2LOAD, "--version"]).split(" ")[-1]
        versions["openssl"] = " ".join(_version([OPENSSL, "version"]).split()[:2])
        versions["python ssl"] = ssl.OPENSSL_VERSION
    cpus = available_cpus()
    one = placement(SCENARIOS["ka100"], cpus)
    return {
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu": _cpu_model(), "cpus": len(cpus), "kernel": platform.release()},
        "versions": versions,
        "rounds": args.rounds,
        "seconds": args.duration,
        "warmup": args.warmup,
        "max_other_load": args.max_other_load,
        "retries": args.retries,
        "placement": {
            "one_core_server": cpu_list(one.server_cpus),
            "one_core_load": cpu_list(one.load_cpus),
            "all_cores": cpu_list(cpus),
        },
        "servers": [
            {"name": s.name, "description": s.description, "command": describe_command(s, 1)}
            for s in specs
        ],
        "scenarios": [
            {**s.__dict__, **({"load": load} if (load := describe_load(s, args.duration)) else {})}
            for s in scenarios
        ],
        "failures": [],
    }


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # Once: a second Ctrl-C must not interrupt the cleanup that kills the servers.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.retries = 1, 1, 0, 0
    if not wrk_available():
        progress("wrk is not installed (apt-get install wrk)")
        return 2
    # Ctrl-C, SIGTERM and SIGHUP unwind the run, so every started server's group is killed.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _raise_interrupt)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    try:
        specs = pick_servers(args)
        scenarios = pick_scenarios(args)
    except UsageError as exc:
        progress(f"python -m bench: error: {exc}")
        return 2
    if missing := tools_missing(scenarios):
        progress(f"python -m bench: not installed: {', '.join(missing)}")
        return 2
    meta = collect_meta(args, argv, specs, scenarios)
    runs: list[Run] = []

    def on_failure(run_round: int, scenario: str, server: str, error: Exception) -> None:
        progress(f"    FAILED: {error}")
        meta["failures"].append(
            {"server": server, "scenario": scenario, "round": run_round, "error": str(error)}
        )

    interrupted = False
    try:
        run_all(
            specs, scenarios, args.rounds, args.duration, args.warmup, on_failure,
            (ServerError, LoadError), args.max_other_load, args.retries, runs,
        )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        progress(f"interrupted: servers stopped; {len(runs)} completed run(s) kept")
        if not runs:
            return 130
    meta["interrupted"] = interrupted
    summaries = summarize(runs, args.max_other_load)
    targets = check_targets(summaries)
    paths = report.write(args.out, meta, [r.to_dict() for r in runs], summaries, targets)
    progress("")
    print(report.markdown(meta, summaries, targets))
    progress("wrote " + ", ".join(str(p) for p in paths))
    return 130 if interrupted else 1 if meta["failures"] else 0

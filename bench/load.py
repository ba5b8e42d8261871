"""Load generation with wrk, and parsing of its report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.scenarios import Placement, Scenario, cpu_list

WRK = shutil.which("wrk") or "/usr/bin/wrk"

# One write of N requests per connection; wrk waits for all N responses before the next write
# (it counts the requests in what request() returns) and records one latency per batch.
PIPELINE_LUA = """\
local depth = {depth}
init = function(args)
  local batch = {{}}
  for i = 1, depth do
    batch[i] = wrk.format(nil, "/")
  end
  req = table.concat(batch)
end
request = function()
  return req
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


class LoadError(RuntimeError):
    pass


def wrk_available() -> bool:
    return shutil.which("wrk") is not None or Path(WRK).exists()


def wrk_command(
    scenario: Scenario, where: Placement, port: int, seconds: float, script_dir: Path
) -> list[str]:
    threads = min(len(where.load_cpus), scenario.connections)
    argv = [
        "taskset", "-c", cpu_list(where.load_cpus),
        WRK, "--latency",
        "-t", str(threads),
        "-c", str(scenario.connections),
        "-d", f"{max(1, round(seconds))}s",
        "--timeout", "5s",
    ]  # fmt: skip
    if scenario.close:
        argv += ["-H", "Connection: close"]
    if scenario.pipeline > 1:
        script = script_dir / f"pipeline{scenario.pipeline}.lua"
        script.write_text(PIPELINE_LUA.format(depth=scenario.pipeline))
        argv += ["-s", str(script)]
    return [*argv, f"http://127.0.0.1:{port}/"]


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise LoadError(f"unreadable wrk duration {text!r}")
    return float(match[1]) * _UNITS_US[match[2]]


def parse_wrk(output: str) -> LoadResult:
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.M)
    p50 = re.search(r"^\s*50(?:\.0+)?%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s*99(?:\.0+)?%\s+(\S+)", output, re.M)
    if not (done and p50 and p99):
        raise LoadError(f"unreadable wrk output:\n{output}")
    seconds = _duration_us(done[2] + done[3]) / 1e6
    requests = int(done[1])
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return LoadResult(
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds else 0.0,
        p50_us=_duration_us(p50[1]),
        p99_us=_duration_us(p99[1]),
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def run_wrk(argv: list[str], seconds: float) -> LoadResult:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish: {exc}") from exc
    if done.returncode != 0:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)

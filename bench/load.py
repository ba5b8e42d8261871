"""Load generation with wrk, and parsing of its report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.scenarios import Placement, Scenario, cpu_list

WRK = shutil.which("wrk") or "/usr/bin/wrk"

# Lua for wrk. With depth > 1, one write of `depth` requests per connection: wrk counts the
# requests in what request() returns and waits for all their responses before the next write,
# and records one latency per batch.
#
# done() prints p50/p99 itself, because wrk 4.1's own "Latency Distribution" breaks with
# pipelining (99% shows 0, wg/wrk#236): its coordinated-omission correction adds samples below
# the histogram's recorded minimum, which the percentile scan (from that minimum) never reaches,
# while the rank is taken over all samples. Percentiles here are over the samples the scan sees:
# the share it sees is found by bisection on percentile() (0 once the rank is past the end),
# and every rank is scaled by that share. percentile() is one linear pass over the histogram;
# (walking it with latency(i) would be quadratic and takes minutes on slow servers).
SCRIPT_LUA = """\
local depth = {depth}
if depth > 1 then
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
end
done = function(summary, latency, requests)
  local seen = 100
  if latency:percentile(100) == 0 then
    local lo, hi = 0, 100
    for _ = 1, 30 do
      local mid = (lo + hi) / 2
      if latency:percentile(mid) == 0 then hi = mid else lo = mid end
    end
    seen = lo
  end
  local p50 = seen > 0 and latency:percentile(50 * seen / 100) or 0
  local p99 = seen > 0 and latency:percentile(99 * seen / 100) or 0
  io.write(string.format("bench-latency seen=%.4f p50=%d p99=%d\\n", seen, p50, p99))
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
    socket_error_kinds: dict[str, int]  # connect, read, write, timeout

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
        WRK,
        "-t", str(threads),
        "-c", str(scenario.connections),
        "-d", f"{max(1, round(seconds))}s",
        "--timeout", "5s",
    ]  # fmt: skip
    if scenario.close:
        argv += ["-H", "Connection: close"]
    script = script_dir / f"depth{scenario.pipeline}.lua"
    script.write_text(SCRIPT_LUA.format(depth=scenario.pipeline))
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
    latency = re.search(r"^bench-latency seen=([\d.]+) p50=(\d+) p99=(\d+)", output, re.M)
    if not (done and latency):
        raise LoadError(f"unreadable wrk output:\n{output}")
    seconds = _duration_us(done[2] + done[3]) / 1e6
    requests = int(done[1])
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    kinds = ("connect", "read", "write", "timeout")
    counts = dict(zip(kinds, (int(g) for g in sock.groups()), strict=True)) if sock else {}
    return LoadResult(
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds else 0.0,
        p50_us=float(latency[2]),
        p99_us=float(latency[3]),
        socket_errors=sum(counts.values()),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_error_kinds=counts,
    )


def run_wrk(argv: list[str], seconds: float) -> LoadResult:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 20)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish: {exc}") from exc
    if done.returncode != 0:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)

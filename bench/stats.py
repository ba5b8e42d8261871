"""Medians, spread, ratios to the references, and the worker's performance targets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import median

from bench.runner import Run

REFERENCES = ("nginx", "gevent")
# Issue 2's targets: vrypt's CPU per request relative to nginx's, same run, one core, 100 conns.
TARGETS = {"ka100": 1.0, "pipe16": 0.2}


@dataclass(frozen=True)
class Summary:
    server: str
    scenario: str
    runs: int
    disturbed: int  # runs kept although other processes loaded the server's core
    rps: float
    rps_min: float
    rps_max: float
    cpu_us: float
    cpu_us_min: float
    cpu_us_max: float
    user_us: float
    sys_us: float
    core_us: float | None
    p50_us: float
    p99_us: float
    peak_rss_kb: int
    peak_rss_max_kb: int
    errors: int
    connections_per_req: float
    # server / reference, paired within each round, then the median over rounds
    rps_vs: dict[str, float]
    cpu_vs: dict[str, float]
    core_vs: dict[str, float]
    # HTTP/2 and TLS scenarios: medians of each run's extra figures; what was negotiated.
    extra: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    error_kinds: dict[str, int] = field(default_factory=dict)  # summed over the runs

    def to_dict(self) -> dict:
        return asdict(self)


def _paired_ratio(mine: list[Run], ref: list[Run], attr: str) -> float | None:
    ref_by_round = {r.round: getattr(r, attr) for r in ref}
    ratios = [getattr(r, attr) / ref_by_round[r.round] for r in mine if ref_by_round.get(r.round)]
    return median(ratios) if ratios else None


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def _error_kinds(group: list[Run]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for run in group:
        if run.non_2xx:
            kinds["non-2xx"] = kinds.get("non-2xx", 0) + run.non_2xx
        for kind, count in run.socket_error_kinds.items():
            if count:
                kinds[kind] = kinds.get(kind, 0) + count
    return kinds


def summarize(runs: list[Run], max_other_load: float) -> list[Summary]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.server, run.scenario), []).append(run)
    out = []
    for (server, scenario), group in groups.items():
        rps = [r.rps for r in group]
        cpu = [r.cpu_us_per_req for r in group]
        ratios: dict[str, dict[str, float]] = {
            "rps": {},
            "cpu_us_per_req": {},
            "core_us_per_req": {},
        }
        for ref in REFERENCES:
            ref_runs = groups.get((ref, scenario), [])
            for attr, found in ratios.items():
                if (ratio := _paired_ratio(group, ref_runs, attr)) is not None:
                    found[ref] = ratio
        out.append(
            Summary(
                server=server,
                scenario=scenario,
                runs=len(group),
                disturbed=sum(
                    1 for r in group if r.other_load is not None and r.other_load > max_other_load
                ),
                rps=median(rps),
                rps_min=min(rps),
                rps_max=max(rps),
                cpu_us=median(cpu),
                cpu_us_min=min(cpu),
                cpu_us_max=max(cpu),
                user_us=median(r.user_us_per_req for r in group),
                sys_us=median(r.sys_us_per_req for r in group),
                core_us=_median_or_none([r.core_us_per_req for r in group]),
                p50_us=median(r.p50_us for r in group),
                p99_us=median(r.p99_us for r in group),
                peak_rss_kb=max(r.peak_rss_kb for r in group),
                peak_rss_max_kb=max(r.peak_rss_max_kb for r in group),
                errors=sum(r.socket_errors + r.non_2xx for r in group),
                connections_per_req=median(r.connections_per_req for r in group),
                rps_vs=ratios["rps"],
                cpu_vs=ratios["cpu_us_per_req"],
                core_vs=ratios["core_us_per_req"],
                extra={
                    key: median(r.extra[key] for r in group if key in r.extra)
                    for key in dict.fromkeys(k for r in group for k in r.extra)
                },
                notes=tuple(dict.fromkeys(r.note for r in group if r.note)),
                error_kinds=_error_kinds(group),
            )
        )
    return out


@dataclass(frozen=True)
class TargetCheck:
    scenario: str
    limit: float  # vrypt CPU/request at most this times nginx's
    ratio: float  # process CPU time (utime+stime of the trees), as issue 2 defines it
    core_ratio: float | None  # busy time of the server's core, softirq included
    holds: bool


def check_targets(summaries: list[Summary]) -> list[TargetCheck]:
    checks = []
    for s in summaries:
        if s.server == "vrypt" and s.scenario in TARGETS and "nginx" in s.cpu_vs:
            limit = TARGETS[s.scenario]
            ratio = s.cpu_vs["nginx"]
            core = s.core_vs.get("nginx")
            checks.append(TargetCheck(s.scenario, limit, ratio, core, ratio <= limit))
    return checks

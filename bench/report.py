"""Writes the results: results.json, results.md and PNG charts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.stats import REFERENCES, Summary, TargetCheck


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _opt(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _us(value: float) -> str:
    if not value:  # not measured (the idle-* scenarios)
        return "-"
    return f"{value / 1000:,.1f} ms" if value >= 10_000 else f"{value:,.0f} µs"


COLUMNS = [
    "server",
    "runs",
    "req/s",
    "CPU µs/req",
    "user / sys",
    "core µs/req",
    "p50",
    "p99",
    "peak RSS MB",
    "errors",
    "conn/req",
    *(f"{what} vs {ref}" for ref in REFERENCES for what in ("req/s", "CPU")),
]


def _row(s: Summary) -> list[str]:
    return [
        s.server,
        f"{s.runs} ({s.disturbed} disturbed)" if s.disturbed else str(s.runs),
        f"{s.rps:,.0f} ({s.rps_min:,.0f}-{s.rps_max:,.0f})",
        f"{s.cpu_us:.2f} ({s.cpu_us_min:.2f}-{s.cpu_us_max:.2f})",
        f"{s.user_us:.2f} / {s.sys_us:.2f}",
        _opt(s.core_us),
        _us(s.p50_us),
        _us(s.p99_us),
        f"{s.peak_rss_kb / 1024:.1f} / {s.peak_rss_max_kb / 1024:.1f}",
        str(s.errors),
        f"{s.connections_per_req:.2f}",
        *(_ratio(vs.get(ref)) for ref in REFERENCES for vs in (s.rps_vs, s.cpu_vs)),
    ]


def _table(rows: list[Summary]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    return lines + ["| " + " | ".join(_row(s)) + " |" for s in rows]


def _extra_value(key: str, value: float) -> str:
    if key == "resumed":
        return f"{value:.1%}"
    return f"{value:,.0f}"


def _proto_lines(rows: list[Summary]) -> list[str]:
    """Below a scenario's table: the HTTP/2 and TLS scenarios' own figures (resumed handshakes,
    bytes per idle connection, with the ratio to nginx's), what each server negotiated, and every
    server whose runs had errors, so that no figure stands without saying so."""
    lines: list[str] = []
    keys = list(dict.fromkeys(k for s in rows for k in s.extra))
    if keys:
        nginx = next((s for s in rows if s.server == "nginx"), None)
        head = ["server", *keys]
        if nginx is not None and "idle B/conn" in keys:
            head.append("idle B/conn vs nginx")
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for s in rows:
            cells = [s.server]
            cells += [_extra_value(k, s.extra[k]) if k in s.extra else "-" for k in keys]
            if len(head) > len(keys) + 1:
                ref = nginx.extra.get("idle B/conn") if nginx else None
                mine = s.extra.get("idle B/conn")
                cells.append(_ratio(mine / ref) if mine is not None and ref else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    negotiated = [f"{s.server}: {', '.join(s.notes)}" for s in rows if s.notes]
    if negotiated:
        lines += ["Negotiated: " + "; ".join(negotiated) + ".", ""]
    with_errors = [s for s in rows if s.errors]
    if with_errors:
        lines += [
            "**Errors** (the figures above include failed requests): "
            + "; ".join(
                f"{s.server}: {s.errors} ("
                + ", ".join(f"{k} {v}" for k, v in s.error_kinds.items())
                + ")"
                for s in with_errors
            )
            + ".",
            "",
        ]
    return lines


def markdown(meta: dict, summaries: list[Summary], targets: list[TargetCheck]) -> str:
    lines = [
        "# Benchmark results",
        "",
        *(["**Interrupted: partial results.**", ""] if meta.get("interrupted") else []),
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cpus']} CPUs, "
        f"Linux {meta['machine']['kernel']}",
        f"- software: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- runs: {meta['rounds']} interleaved round(s) x {meta['seconds']} s per server and "
        f"scenario, after a {meta['warmup']} s warm-up on a freshly started server; "
        "figures are medians, min-max in brackets",
        f"- one-core scenarios: server on CPU {meta['placement']['one_core_server']}, wrk on "
        f"CPU {meta['placement']['one_core_load']}; all-cores scenarios: server and wrk share "
        f"CPUs {meta['placement']['all_cores']} (noisier: wrk takes CPU from the server)",
        "- CPU/req: utime+stime of all the server's processes (master and workers) from "
        "/proc/PID/stat around the run, divided by the requests wrk completed; user / sys: "
        "its two parts (medians)",
        "- core µs/req: busy time (user+system+irq+softirq) of the server's core from /proc/stat, "
        "per request; it includes the loopback TCP softirq work that the kernel does not charge "
        "to processes; one-core scenarios only",
        "- conn/req: TCP connections the server's namespace accepted per request during the run "
        "(/proc/net/snmp PassiveOpens): ~1 in the close scenario if the server honours "
        "`Connection: close`, ~0 with keep-alive",
        "- errors: non-2xx responses plus wrk's socket errors (connect, read, write, timeout)",
        "- RSS: peak (VmHWM) summed over the server's processes / of its largest process",
        f"- disturbed: a run during which other processes used more than "
        f"{meta['max_other_load']:.0%} of the server's core (/proc/stat user+system of the core "
        f"minus the server's own CPU time) was done again, up to {meta['retries']} times; "
        "runs still disturbed are kept and counted in the runs column",
        "- ratios: server ÷ reference within each round, median over rounds",
        "",
    ]
    for scenario in meta["scenarios"]:
        rows = [s for s in summaries if s.scenario == scenario["name"]]
        if rows:
            lines += [f"## {scenario['name']}: {scenario['title']}", ""]
            if scenario.get("load"):  # HTTP/2 and TLS scenarios say how they were loaded
                lines += [f"Load: {scenario['load']}.", ""]
            lines += [*_table(rows), ""]
            lines += _proto_lines(rows)
            kept = [s.server for s in rows if scenario["close"] and s.connections_per_req < 0.5]
            if kept:
                lines += [
                    f"Not a new connection per request for {', '.join(kept)}: it kept the "
                    "connections open despite `Connection: close` (see conn/req).",
                    "",
                ]
    if targets:
        lines += [
            "## Targets (issue 2): vrypt CPU per request relative to nginx's",
            "",
            "| scenario | vrypt ÷ nginx, process CPU | target | holds | vrypt ÷ nginx, core busy |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {t.scenario} | {t.ratio:.2f}x | ≤ {t.limit:g}x | {'yes' if t.holds else 'NO'} "
            f"| {_ratio(t.core_ratio)} |"
            for t in targets
        ]
        lines.append("")
    if meta["failures"]:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {f['server']} / {f['scenario']} / round {f['round']}: "
            + " / ".join(f["error"].splitlines())
            for f in meta["failures"]
        ]
        lines.append("")
    lines += ["## Servers", ""]
    lines += [f"- **{s['name']}**: {s['description']} — `{s['command']}`" for s in meta["servers"]]
    return "\n".join(lines) + "\n"


def charts(out: Path, meta: dict, summaries: list[Summary]) -> list[Path]:
    """rps.png and cpu.png; none (and a warning) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(
            "warning: matplotlib is not installed (pip install -e '.[bench]'): no charts",
            file=sys.stderr,
        )
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [s["name"] for s in meta["servers"]]
    scenarios = [s["name"] for s in meta["scenarios"]]
    by_key = {(s.server, s.scenario): s for s in summaries}
    paths = []
    for field, title, filename in (
        ("rps", "requests per second (median, min-max; log scale)", "rps.png"),
        (
            "cpu_us",
            "server CPU µs per request (median, min-max; log scale, lower is better)",
            "cpu.png",
        ),
    ):
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scenarios) + 2), 4.5))
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            xs, ys, lo, hi = [], [], [], []
            for j, scenario in enumerate(scenarios):
                s = by_key.get((server, scenario))
                if s is None:
                    continue
                value = getattr(s, field)
                xs.append(j + (i - (len(servers) - 1) / 2) * width)
                ys.append(value)
                lo.append(value - getattr(s, f"{field}_min"))
                hi.append(getattr(s, f"{field}_max") - value)
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=server)
            ax.bar_label(bars, fmt="{:,.3g}", fontsize="x-small", padding=2)
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(
            fontsize="small", ncols=len(servers), loc="upper center", bbox_to_anchor=(0.5, -0.08)
        )
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write(
    out: Path, meta: dict, runs: list[dict], summaries: list[Summary], targets: list[TargetCheck]
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        **meta,
        "summary": [s.to_dict() for s in summaries],
        "targets": [t.__dict__ for t in targets],
        "runs": runs,
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path = out / "results.md"
    md_path.write_text(markdown(meta, summaries, targets))
    return [json_path, md_path, *charts(out, meta, summaries)]

"""CPU time and peak memory of a whole server process tree, read from /proc.

A server is started in a session of its own (``start_new_session``), so every process it forks
(gunicorn's arbiter and workers, nginx's master and workers, a peer's threads or children) shares
its session id. The tree is found by scanning /proc for that session.
"""

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces), or None."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process whose session id is ``sid``."""
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # fields[0] is the state (field 3 of stat), fields[3] the session (field 6).
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return sorted(pids)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and all its threads, plus those of the children
    it has reaped (cutime, cstime), so that a worker that exits during a run still counts."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    # stat fields 14-17: utime stime cutime cstime -> indexes 11-14 here.
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + cutime) / CLK_TCK, (stime + cstime) / CLK_TCK


def peak_rss_kb(pid: int) -> int:
    """VmHWM (peak resident set size) of a process, in KiB; 0 if it is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


@dataclass(frozen=True)
class TreeSample:
    """One reading of a process tree: CPU seconds (user, system), per-process peak RSS."""

    user_s: float
    sys_s: float
    rss_kb: tuple[int, ...]

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def procs(self) -> int:
        return len(self.rss_kb)


def sample_tree(sid: int) -> TreeSample:
    pids = session_pids(sid)
    times = [cpu_seconds(p) for p in pids]
    return TreeSample(
        user_s=sum(u for u, _ in times),
        sys_s=sum(s for _, s in times),
        rss_kb=tuple(peak_rss_kb(p) for p in pids),
    )


def cpu_by_command(sid: int, name: str) -> tuple[float, float]:
    """CPU seconds (user + system) of a session's processes whose command is `name` (nginx in
    front of a server: bench/transports.py), and of the others."""
    named = other = 0.0
    for pid in session_pids(sid):
        try:
            command = (PROC / str(pid) / "comm").read_text().strip()
        except OSError:
            continue
        seconds = sum(cpu_seconds(pid))
        if command == name:
            named += seconds
        else:
            other += seconds
    return named, other


@dataclass(frozen=True)
class CoreTimes:
    """Busy time of some CPUs from /proc/stat, in seconds."""

    task_s: float  # user + nice + system: whatever ran there, our server or anything else
    irq_s: float  # irq + softirq: with IRQ_TIME_ACCOUNTING, charged to no process

    @property
    def busy_s(self) -> float:
        return self.task_s + self.irq_s


def core_times(cpus: tuple[int, ...]) -> CoreTimes:
    """Busy time of the given CPUs. Unlike a process's utime+stime, it includes the softirq
    time the kernel spends on the server's core for loopback TCP, and it shows whether other
    processes ran on the server's core during a run."""
    wanted = {f"cpu{c}" for c in cpus}
    task = irq = 0
    for line in (PROC / "stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            user, nice, system, _idle, _iowait, hard, soft = (int(v) for v in fields[1:8])
            task += user + nice + system
            irq += hard + soft
    return CoreTimes(task / CLK_TCK, irq / CLK_TCK)


def tcp_passive_opens() -> int:
    """Connections accepted by this network namespace so far (Tcp PassiveOpens, /proc/net/snmp).

    Its change across a run, divided by the requests, tells how many connections the load
    really opened per request: about 1 when each request gets a new connection, about 0 with
    keep-alive. A server that ignores `Connection: close` shows up here."""
    header: list[str] = []
    for line in (PROC / "net" / "snmp").read_text().splitlines():
        if line.startswith("Tcp:"):
            if not header:
                header = line.split()
            else:
                return int(line.split()[header.index("PassiveOpens")])
    return 0


def run_ns(sid: int) -> int:
    """Nanoseconds on a CPU so far, summed over every thread of a session's live processes
    (/proc/PID/task/TID/schedstat): exact where utime + stime count 10 ms ticks, for the small
    amounts an idle server spends (bench.idle's quiet reading). Threads that ended are not
    counted."""
    total = 0
    for pid in session_pids(sid):
        try:
            tasks = list((PROC / str(pid) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total

"""Metrics: the shared counter slots and the StatsD pushes (vrypt_worker/metrics/).

The server tests run real gunicorn processes against a real UDP socket standing in for the
collector, and check what arrives: exact totals across everything gunicorn does to its workers,
cadence, names, tags, and quiet failure when nobody listens."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from tests.support import base_env, is_vrypt, read_responses, running, start_server
from vrypt_worker import metrics

# --- the counter module itself --------------------------------------------------------------


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_slot_is_reused_only_when_its_holder_is_gone_and_counts_go_on():
    board = metrics.Board(3)
    live, dead, zombie = sleeper(), sleeper(), sleeper()
    try:
        dead.kill()
        dead.wait()
        zombie.kill()  # not waited for: a zombie until the end of the test
        while metrics.alive_child(zombie.pid, os.getpid()):
            time.sleep(0.01)
        holders = [SimpleNamespace(pid=live.pid), SimpleNamespace(pid=dead.pid)]
        assert board.claim(holders[0]) == 0
        assert board.claim(holders[1]) == 1
        # The holder of slot 1 counted, then died: its slot is the next one given out.
        board.words[1 * metrics.WORDS + metrics.ANSWERED] = 41
        board.words[1 * metrics.WORDS + metrics.REJECTED] = 2
        board.words[1 * metrics.WORDS + metrics.OPEN] = 7
        assert board.claim(SimpleNamespace(pid=zombie.pid)) == 1
        assert board.values(1) == (41, 2), "a reused slot keeps its counts"
        assert board.words[1 * metrics.WORDS + metrics.OPEN] == 0
        # A zombie holder is dead too; a holder not forked yet ("[booting]") never ran.
        assert board.claim(SimpleNamespace(pid="[booting]")) == 1
        assert board.claim(SimpleNamespace(pid=live.pid)) == 1
        assert board.claim(SimpleNamespace(pid=live.pid)) == 2
        assert board.claim(SimpleNamespace(pid=live.pid)) is None, "all slots held by a live pid"
    finally:
        for proc in (live, dead, zombie):
            proc.kill()
            proc.wait()


def test_a_slot_whose_writer_lives_is_not_given_out_even_without_a_record():
    """The pid a worker wrote into its slot counts too (e.g. a record lost with a reload)."""
    live = sleeper()
    try:
        board = metrics.Board(2)
        board.words[0 * metrics.WORDS + metrics.OWNER] = live.pid
        board.words[board.header + metrics.USED] = 1
        assert board.claim(SimpleNamespace(pid="[booting]")) == 1
        assert not metrics.alive_child(live.pid, parent=1), "a child of another parent"
    finally:
        live.kill()
        live.wait()


def test_deltas_are_differences_of_monotonic_sums_kept_in_shared_memory():
    board = metrics.Board(4)
    words = board.words
    words[board.header + metrics.USED] = 3  # slots 0..2 handed out
    assert board.take() == (0, 0)
    words[0 * 8 + metrics.ANSWERED] = 10
    words[2 * 8 + metrics.ANSWERED] = 5
    words[2 * 8 + metrics.REJECTED] = 1
    assert board.take() == (15, 1)
    assert board.take() == (0, 0)
    # A slot taken over goes on from its values: the sum never drops, the delta never goes
    # negative, and the final counts of the previous holder were already in the sum.
    words[2 * 8 + metrics.ANSWERED] = 9
    assert board.take() == (4, 0)
    # What was sent lives in the mapping: a pusher forked later (after one died) goes on from it.
    words[0 * 8 + metrics.ANSWERED] = 12
    pid = os.fork()
    if pid == 0:
        os._exit(0 if board.take() == (2, 0) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert board.take() == (0, 0)
    # uint64 counters: no wrap-around at any rate this server reaches (2**64 requests).
    words[1 * 8 + metrics.ANSWERED] = 2**63
    assert board.take() == (2**63, 0)


def test_open_connections_count_only_live_writers():
    live, dead = sleeper(), sleeper()
    dead.kill()
    dead.wait()
    try:
        board = metrics.Board(3)
        board.words[board.header + metrics.USED] = 3
        for slot, (pid, conns) in enumerate([(live.pid, 4), (dead.pid, 100), (0, 50)]):
            board.words[slot * 8 + metrics.OWNER] = pid
            board.words[slot * 8 + metrics.OPEN] = conns
        assert board.open_connections(os.getpid()) == 4
    finally:
        live.kill()
        live.wait()


def test_settings_follow_gunicorn_prefix_and_interval_env(monkeypatch):
    assert metrics.statsd_prefix("") == ""
    assert metrics.statsd_prefix("app") == "app."
    assert metrics.statsd_prefix("app...") == "app."
    monkeypatch.setenv("VRYPT_STATSD_INTERVAL", "0.5")
    assert metrics.interval_from_env() == 0.5
    for bad in ("0", "-1", "x", "4000"):
        monkeypatch.setenv("VRYPT_STATSD_INTERVAL", bad)
        with pytest.raises(ValueError, match="VRYPT_STATSD_INTERVAL"):
            metrics.interval_from_env()


def test_clients_append_tags_and_speak_unix_datagrams(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(2)
        client = metrics.TaggedStatsClient("127.0.0.1", udp.getsockname()[1], "a:1,b:2")
        client.gauge("vrypt.rps", 3)
        client.incr("gunicorn.requests", 3)
        assert udp.recv(512) == b"vrypt.rps:3|g|#a:1,b:2"
        assert udp.recv(512) == b"gunicorn.requests:3|c|#a:1,b:2"
        client.close()
    path = str(tmp_path / "statsd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        unix.bind(path)
        unix.settimeout(2)
        client = metrics.make_client(metrics.Settings(host=path))
        client.gauge("vrypt.rps", 0)
        assert unix.recv(512) == b"vrypt.rps:0|g"
        client.close()


def test_statsd_logger_is_the_plain_logger_without_statsd_host():
    """The conf names the logger class explicitly, so gunicorn no longer picks its plain logger
    by itself when statsd_host is unset: ours must then send nothing and need no socket."""
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("logger_class", "vrypt_worker.metrics.StatsdLogger")
    assert cfg.logger_class is metrics.StatsdLogger
    log = cfg.logger_class(cfg)
    assert log.sock is None
    log.info("", extra={"metric": "gunicorn.workers", "value": 2, "mtype": "gauge"})
    log.warning("a warning that would count in gunicorn.log.warning")
    cfg.set("statsd_host", "127.0.0.1:9")
    cfg.set("statsd_prefix", "edge")
    log = cfg.logger_class(cfg)
    assert log.sock is not None and log.prefix == "edge."
    log.sock.close()


# --- real servers ---------------------------------------------------------------------------


class Collector:
    """A UDP socket on 127.0.0.1 and a thread that keeps every StatsD line with its time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.lines: list[tuple[float, str]] = []
        self.senders: list[tuple[float, str, int]] = []  # (time, line, source port)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                packet, (_host, port) = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            lines = [line for line in packet.decode().splitlines() if line]
            self.senders += [(now, line, port) for line in lines]
            self.lines += [(now, line) for line in lines]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def values(self, name: str, kind: str = "g") -> list[int]:
        pattern = re.compile(rf"{re.escape(name)}:(\d+)\|{kind}(\||$)")
        return [int(m.group(1)) for _t, line in list(self.lines) if (m := pattern.match(line))]

    def rps_sum(self) -> int:
        return sum(self.values("vrypt.rps"))

    def wait_sum(self, expected: int, interval: float, timeout: float = 6.0) -> int:
        """Until the rps gauges add up to `expected`, then two more intervals: still equal?"""
        deadline = time.monotonic() + timeout
        while self.rps_sum() < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2 * interval + 0.1)
        return self.rps_sum()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def metrics_env(collector: Collector | None, interval: float = 0.2, **extra: str) -> dict:
    host = f"127.0.0.1:{collector.port}" if collector else ""
    return base_env(
        VRYPT_STATSD_HOST=host,
        VRYPT_STATSD_INTERVAL=str(interval),
        VRYPT_REUSE_PORT="0",  # one shared listener: no connection reset when a worker goes
        **extra,
    )


def hit(server, requests: int, per_connection: int = 5) -> int:
    """Send `requests` GETs, pipelined `per_connection` at a time; return how many were
    answered (a connection a dying worker drops does not count: it was not answered)."""
    answered = 0
    while requests > 0:
        batch = min(per_connection, requests)
        requests -= batch
        try:
            with server.connect() as sock:
                sock.sendall(b"GET /m HTTP/1.1\r\nHost: x\r\n\r\n" * batch)
                responses = read_responses(sock, batch)
        except OSError:
            continue
        assert all(is_vrypt(r) for r in responses)
        answered += len(responses)
    return answered


def pusher_pid(server) -> int:
    """The worker whose turn it is to push: the last one that said it took the turn."""
    server.wait_for_log(r"worker pid \d+ sends the metrics")
    return int(re.findall(r"worker pid (\d+) sends the metrics", server.log)[-1])


def turns_taken(server) -> int:
    """How many times a worker took the turn to push (each says so once)."""
    return len(re.findall(r"worker pid \d+ sends the metrics", server.log))


def workers(server, count: int, timeout: float = 10.0) -> list[int]:
    """The worker pids, once there are `count` of them (the metrics have no process of their
    own: every child of the arbiter is a worker)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = server.worker_pids()
        if len(pids) == count or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def fd_targets(pid: int) -> dict[int, str]:
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return fds


def listening_sockets() -> set[str]:
    """`socket:[inode]` of every listening TCP socket of this machine."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                for row in list(rows)[1:]:
                    fields = row.split()
                    if fields[3] == "0A":  # TCP_LISTEN
                        found.add(f"socket:[{fields[9]}]")
        except OSError:
            pass
    return found


READY = 1  # support.wait_ready's GET /ready, answered once


def test_rps_gauges_add_up_across_worker_sigkill(collector):
    interval = 1.0  # long enough that the kill lands between two sends
    with running(workers=2, env=metrics_env(collector, interval)) as server:
        answered = READY + hit(server, 40)
        for pid in workers(server, 2):  # counted since the last send, then SIGKILL
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        answered += hit(server, 30)  # queued on the shared listener until the new workers
        assert len(workers(server, 2)) == 2
        answered += hit(server, 25)
        assert collector.wait_sum(answered, interval) == answered
        # The listener must not stay open in a process that never accepts: the server has no
        # process but the arbiter and its workers (the metrics have none of their own), and
        # every child of the arbiter holds the listener because it serves it.
        arbiter = fd_targets(server.proc.pid)
        listeners = listening_sockets() & set(arbiter.values())
        children = server.worker_pids()
        assert listeners and len(children) == 2, children
        for child in children:
            assert listeners <= set(fd_targets(child).values()), (child, arbiter)
        assert "Traceback" not in server.log


def test_rps_gauges_add_up_across_hup_reload_and_the_last_send_at_stop(collector):
    interval = 5.0  # longer than the test: the last send, as the server stops, carries it all
    with running(workers=2, env=metrics_env(collector, interval)) as server:
        answered = READY + hit(server, 30)
        old = set(workers(server, 2))
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        reloading = 0
        while old & set(server.worker_pids()) and time.monotonic() < deadline:
            reloading += hit(server, 10)  # old and new workers answer side by side
        assert not old & set(server.worker_pids()), "the old workers did not leave"
        assert reloading
        answered += reloading + hit(server, 20)
        # TERM right away: what was answered since the last send goes out as the arbiter leaves,
        # after its workers.
        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        deadline = time.monotonic() + 3
        while collector.rps_sum() < answered and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert collector.rps_sum() == answered


def test_rps_gauges_add_up_across_recycling_and_ttin_ttou(collector):
    """max_requests: a reused slot continues from its counts and the recycling threshold moves
    with them (neither at once nor never); TTIN/TTOU add and remove workers."""
    interval = 0.2
    with running("--max-requests", "5", workers=2, env=metrics_env(collector, interval)) as s:
        answered = READY + hit(s, 40, per_connection=1)
        # The worker that pushes dies: another one takes the turn over, from where it stopped
        # (with max_requests 5 the pushing worker also recycles every few requests, and hands
        # the turn over each time).
        pusher, taken = pusher_pid(s), turns_taken(s)
        with contextlib.suppress(ProcessLookupError):  # it may have recycled already
            os.kill(pusher, signal.SIGKILL)
        answered += hit(s, 5, per_connection=1)
        deadline = time.monotonic() + 10
        while turns_taken(s) == taken:  # another worker took the turn
            assert time.monotonic() < deadline, s.log
            time.sleep(0.05)
        s.signal(signal.SIGTTIN)
        assert len(workers(s, 3)) == 3
        answered += hit(s, 20, per_connection=1)
        s.signal(signal.SIGTTOU)
        assert len(workers(s, 2)) == 2
        answered += hit(s, 10, per_connection=1)
        assert collector.wait_sum(answered, interval) == answered
        # gunicorn's own count after TTOU, which the arbiter sent once, goes on every interval.
        assert collector.values("gunicorn.workers")[-3:] == [2, 2, 2]
        recycled = s.log.count("Autorestarting worker")
        assert "ERROR" not in s.log
        assert answered // 5 - 4 <= recycled <= answered // 5 + 1, recycled


def test_cadence_names_prefix_tags_and_gunicorn_metrics(collector):
    """The default interval (1 s), gunicorn's statsd_prefix and dogstatsd_tags on every line
    the pusher sends, open connections, bad requests, and gunicorn's own gauge still arriving."""
    env = metrics_env(collector, interval=1.0)
    del env["VRYPT_STATSD_INTERVAL"]
    args = ("--statsd-prefix", "edge", "--dogstatsd-tags", "env:test,role:canary")
    with running(*args, workers=2, env=env) as server:
        idle = [server.connect() for _ in range(3)]
        with server.connect() as bad:
            bad.sendall(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            assert read_responses(bad, 1)[0].status == 400
        start = time.monotonic()
        time.sleep(3.6)
        for sock in idle:
            sock.close()
    sent = [(t, line) for t, line in collector.lines if t >= start]
    tags = "|#env:test,role:canary"
    ours = [line for _t, line in sent if ".vrypt." in line or ".gunicorn.requests" in line]
    assert ours and all(line.startswith("edge.") and line.endswith(tags) for line in ours), ours
    times = [t for t, line in sent if line.startswith("edge.vrypt.rps:")]
    assert 3 <= len(times) <= 4, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.8 <= gap <= 1.2 for gap in gaps), gaps
    assert 3 in collector.values("edge.vrypt.connections"), collector.lines
    assert sum(collector.values("edge.vrypt.bad_requests", "c")) == 1
    rps = collector.values("edge.vrypt.rps")
    assert sum(collector.values("edge.gunicorn.requests", "c")) == sum(rps) >= 2
    assert any(line == f"edge.gunicorn.workers:2|g{tags}" for _t, line in collector.lines)


def test_k_form_sends_metrics_exactly_when_statsd_host_is_set(collector):
    cmd_k = ["-k", "vrypt_worker.VryptWorker", "vrypt_worker.wsgi:application"]
    env = metrics_env(None)
    with running(*cmd_k, conf=False, workers=2, env=env) as server:
        assert hit(server, 5) == 5
        time.sleep(0.6)
        assert len(server.worker_pids()) == 2, "no pusher without statsd_host"
        assert "vrypt metrics" not in server.log
    with running(
        *cmd_k, "--statsd-host", f"127.0.0.1:{collector.port}", conf=False, workers=2, env=env
    ) as server:
        pusher_pid(server)
        answered = READY + hit(server, 5)
        assert collector.wait_sum(answered, 0.2) == answered
        # gunicorn's own statsd logger here (no logger_class): the arbiter sends the worker count
        # once, and the pusher every interval, counting the serving workers itself.
        sent = [line for _t, line in collector.lines if line.startswith("gunicorn.workers:")]
        assert len(sent) >= 3 and set(sent) == {"gunicorn.workers:2|g"}, sent


def statsd_complaints(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if "statsd" in line.lower() and ("[WARNING]" in line or "[ERROR]" in line)
    ]


@pytest.mark.parametrize(
    ("host", "complaints"),
    [("127.0.0.1:{port}", 0), ("no-such-host.invalid:8125", 1)],
    ids=["nobody-listening", "unresolvable"],
)
def test_a_missing_collector_changes_nothing_and_a_bad_target_is_reported_once(host, complaints):
    """Issue 12: a collector that is not running is normal (fire-and-forget gauges, and the
    default target): not a word but the one announcement of the target at start. A name that
    does not resolve is a setting to fix: one warning for the whole server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nobody listens there
    env = base_env(
        VRYPT_STATSD_HOST=host.format(port=port),
        VRYPT_STATSD_INTERVAL="0.1",
        VRYPT_REUSE_PORT="0",
    )
    server = start_server(workers=2, env=env)
    try:
        started = time.monotonic()
        answered = hit(server, 200, per_connection=10)
        assert answered == 200
        server.signal(signal.SIGTTIN)  # gunicorn's own gauge (gunicorn.workers) to send too
        assert len(workers(server, 3)) == 3
        while time.monotonic() - started < 2.0:
            assert hit(server, 10) == 10
        server.signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        time.sleep(0.3)  # the pusher's last send
        found = statsd_complaints(server.log)
        assert len(found) == complaints, server.log
        assert all("not logged again" in line for line in found)
        announced = re.findall(
            r"\[INFO\] vrypt metrics: the workers send StatsD to (\S+) every", server.log
        )
        assert announced == [host.format(port=port)], server.log
        assert "Traceback" not in server.log
    finally:
        server.stop()


# --- the pusher is not a single point of failure (issue 10) ------------------------------------


def rps_lines(collector: Collector, since: float = 0.0) -> list[tuple[float, str, int]]:
    return [
        (t, line, port) for t, line, port in collector.senders if t >= since and ".rps:" in line
    ]


@pytest.mark.parametrize("interval", [0.3, 1.5], ids=["shorter-than-the-sweep", "longer"])
def test_a_killed_pusher_is_replaced_within_two_intervals_and_totals_stay_exact(
    collector, interval
):
    """SIGKILL the worker that pushes, twice, under a known number of requests: another worker
    takes the turn over and the gauges go on within two intervals of each kill, with intervals
    shorter and longer than the workers' 1 s sweep. At no time do two processes send
    (consecutive gauges stay an interval apart), and the gauges and counters add up exactly to
    the requests answered, before and after each kill. (Before issue 21 the pusher was a process
    of its own, killed here, with a worker standing in until the arbiter forked a new one.)"""
    with running(workers=2, env=metrics_env(collector, interval)) as server:
        answered = READY + hit(server, 40)
        assert collector.wait_sum(answered, interval) == answered
        for _kill in range(2):
            workers(server, 2)
            time.sleep(1.2)  # every worker has swept once
            pusher = pusher_pid(server)
            before = rps_lines(collector)
            killed_at = time.monotonic()
            os.kill(pusher, signal.SIGKILL)
            answered += hit(server, 30)  # answered while nobody pushes
            deadline = killed_at + 2 * interval + 2.0
            while not rps_lines(collector, killed_at) and time.monotonic() < deadline:
                time.sleep(0.01)
            after = rps_lines(collector, killed_at)
            assert after, f"no gauge within {deadline - killed_at:.1f}s of the kill"
            resumed = after[0][0] - killed_at
            assert resumed <= 2 * interval, f"first gauge {resumed:.2f}s after the kill"
            assert after[0][2] != before[-1][2], "the same socket sent: was the pusher killed?"
            server.wait_for_log(rf"pid {pusher} no longer sends the metrics; worker pid \d+ sends")
            answered += hit(server, 25)
            assert collector.wait_sum(answered, interval) == answered
        assert sum(collector.values("gunicorn.requests", "c")) == answered
        # One sender at a time, each at its own cadence: the first pusher, the worker that took
        # its turn over, the one that took it from that one, never interleaved.
        lines = rps_lines(collector)
        runs = [
            (port, [t for t, _l, _p in run])
            for port, run in itertools.groupby(lines, lambda x: x[2])
        ]
        assert len(runs) == len({port for port, _ in runs}) == 3, [p for p, _ in runs]
        for _port, times in runs:
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert min(gaps, default=interval) >= 0.5 * interval, gaps
        assert "Traceback" not in server.log


@pytest.mark.parametrize("count", [1, 2], ids=["one-worker", "two-workers"])
def test_no_gap_of_two_intervals_when_the_pushing_worker_dies_or_is_reloaded(collector, count):
    """Issue 21: with the workers as the only pushers, a gauge still arrives at least every two
    intervals when the worker that pushes is killed (its replacement, or another worker, takes
    the turn) and across a HUP reload (the draining pusher hands the turn to a new worker), with
    one worker as with two; and the totals stay exact."""
    interval = 0.5
    with running(workers=count, env=metrics_env(collector, interval)) as server:
        answered = READY + hit(server, 10)
        assert collector.wait_sum(answered, interval) == answered
        start = time.monotonic()
        os.kill(pusher_pid(server), signal.SIGKILL)
        assert len(workers(server, count)) == count
        time.sleep(3 * interval)
        answered += hit(server, 10)
        old = set(workers(server, count))
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while old & set(server.worker_pids()) and time.monotonic() < deadline:
            answered += hit(server, 5)
            time.sleep(0.05)
        assert not old & set(server.worker_pids()), "the old workers did not leave"
        answered += hit(server, 10)
        assert collector.wait_sum(answered, interval) == answered
        times = [t for t, _line, _port in rps_lines(collector, start)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) >= 6 and max(gaps) < 2 * interval, gaps
        assert collector.values("gunicorn.workers")[-3:] == [count] * 3
        assert "Traceback" not in server.log


# --- what reaches Prometheus (issue 15) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "tags"),
    [("", ""), ("edge", "env:test,role:canary"), ("canary.eu-west-1", "team:web")],
    ids=["plain", "prefix-and-tags", "dotted-prefix"],
)
def test_every_line_the_server_sends_maps_to_the_documented_series(collector, prefix, tags):
    """What a real server sends, captured on a real UDP socket, fed to the exporter's mapping
    rules (tests/statsd_mapping.py re-implements statsd_exporter's line parser and mapper): every
    line gets its documented Prometheus name, type and labels, the prefix as `statsd_prefix` and
    the tags as labels, and every gauge arrives every interval."""
    from tests.statsd_mapping import Mapper, scraped_labels
    from tests.test_deploy import STATSD_TO_PROMETHEUS, mapping_config

    interval = 0.25
    args = ["--statsd-prefix", prefix] if prefix else []
    args += ["--dogstatsd-tags", tags] if tags else []
    with running(*args, workers=2, env=metrics_env(collector, interval)) as server:
        hit(server, 20)
        with server.connect() as bad:
            bad.sendall(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            assert read_responses(bad, 1)[0].status == 400
        os.kill(workers(server, 2)[0], signal.SIGKILL)  # the arbiter logs an error: a counter
        assert len(workers(server, 2)) == 2
        start = time.monotonic()
        time.sleep(6 * interval)
    mapper = Mapper(mapping_config())
    normalised = metrics.statsd_prefix(prefix)
    tag_labels = dict(tag.split(":", 1) for tag in tags.split(",")) if tags else {}
    seen = set()
    for _t, line in collector.lines:
        name = line.partition(":")[0]
        assert name.startswith(normalised), line
        kind = {"g": "gauge", "c": "counter"}[line.split("|")[1]]
        documented = STATSD_TO_PROMETHEUS.get((name[len(normalised) :], kind))
        assert documented, f"{line}: not a documented metric"
        [series] = mapper.series(line)
        want_labels = {**documented[1], **tag_labels}
        if prefix:
            want_labels["statsd_prefix"] = prefix
        got = (series.mapped, series.name, series.kind, scraped_labels(series.labels))
        assert got == (True, documented[0], kind, want_labels), line
        seen.add(series.name)
    assert seen >= {
        "vrypt_requests_per_second",
        "vrypt_open_connections",
        "gunicorn_workers",
        "vrypt_bad_requests_total",
        "gunicorn_requests_total",
        "gunicorn_log_messages_total",
    }, seen
    # Every gauge every interval (gunicorn.workers too, which gunicorn sends only on a change):
    # no gap of two intervals, whatever the scheduling jitter of a loaded machine.
    for gauge in ("vrypt.rps", "vrypt.connections", "gunicorn.workers"):
        times = [
            t
            for t, line in collector.lines
            if t >= start and line.startswith(normalised + gauge + ":")
        ]
        assert len(times) >= 4, (gauge, times)
        assert max(b - a for a, b in itertools.pairwise(times)) < 2 * interval, (gauge, times)
    assert collector.values(normalised + "gunicorn.workers")[-3:] == [2, 2, 2]


# --- units: the worker count, the deputy, what is reported -------------------------------------


def test_worker_count_is_gunicorns_own_else_the_serving_workers():
    live, draining, dead = sleeper(), sleeper(), sleeper()
    dead.kill()
    dead.wait()
    try:
        board = metrics.Board(4)
        board.words[board.header + metrics.USED] = 4
        for slot, (pid, serving) in enumerate([(live, 1), (draining, 0), (dead, 1)]):
            board.words[slot * metrics.WORDS + metrics.OWNER] = pid.pid
            board.words[slot * metrics.WORDS + metrics.SERVING] = serving
        me = os.getpid()
        assert board.workers(me) == 1, "the live, serving one"
        board.words[board.header + metrics.WORKERS] = 2 + 1  # what the arbiter sent last
        assert board.workers(me) == 2
        # The deputy: the live, serving worker with the lowest slot.
        assert board.first_serving(me, below=0, me=live.pid)
        assert not board.first_serving(me, below=3, me=12345), "slot 0 serves"
        # Whose turn it is may stay with a live worker that serves, not one that drains or died.
        assert board.serving(live.pid, me)
        assert not board.serving(draining.pid, me) and not board.serving(dead.pid, me)
        assert not board.serving(12345, me), "not a worker on the board"
        board.words[0 * metrics.WORDS + metrics.SERVING] = 0
        assert board.first_serving(me, below=3, me=12345), "draining and dead ones do not count"
    finally:
        for proc in (live, draining):
            proc.kill()
            proc.wait()


def test_a_collector_not_listening_is_not_reported_but_a_bad_target_is():
    said: list[tuple] = []
    refused = ConnectionRefusedError(111, "Connection refused")
    metrics.collector_problem(lambda *a: said.append(a), "127.0.0.1:8125", refused)
    assert said == []
    unresolvable = socket.gaierror(-2, "Name or service not known")
    assert not metrics.not_listening(unresolvable)
    assert not metrics.not_listening(FileNotFoundError(2, "No such file or directory"))


def test_an_ip_literal_is_not_resolved_and_a_name_is():
    """A worker that pushes to an IP literal (the default 127.0.0.1:8125) calls no resolver:
    gevent's, imported after the fork, would cost it about 3 MB of memory of its own."""

    def refuse(*args):
        raise AssertionError(f"resolved {args}")

    assert metrics.literal_address("127.0.0.1", 8125, socket.AF_INET) == ("127.0.0.1", 8125)
    assert metrics.literal_address("::1", 9, socket.AF_INET6) == ("::1", 9, 0, 0)
    assert metrics.literal_address("statsd.local", 9, socket.AF_INET) is None
    assert not metrics.is_name(("127.0.0.1", 8125)) and not metrics.is_name("/run/statsd.sock")
    assert metrics.is_name(("localhost", 8125))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(2)
        client = metrics.TaggedStatsClient("127.0.0.1", udp.getsockname()[1], getaddrinfo=refuse)
        client.gauge("vrypt.rps", 1)
        assert udp.recv(512) == b"vrypt.rps:1|g"
        client.close()
        asked = []

        def resolve(*args):
            asked.append(args[0])
            return socket.getaddrinfo(*args)

        client = metrics.TaggedStatsClient("localhost", udp.getsockname()[1], getaddrinfo=resolve)
        client.close()
        assert asked == ["localhost"]

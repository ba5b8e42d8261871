"""Workers come and go under load without a refused, reset or unanswered connection.

Every scenario runs tests/lifecycle_load.py: two load clients (keep-alive, and a new connection per
request) count every request's fate while gunicorn reloads, recycles, grows and shrinks, loses a
worker to SIGKILL, upgrades itself with USR2 or stops. Inside a private network namespace
(`unshare --net`, root) each runs with net.ipv4.tcp_migrate_req at 0 and at 1; the host's sysctl is
never touched. The figures of these runs are in docs/reliability.md.

A refused connect, a reset, a request without its answer and a keep-alive connection closed
under a request all count against the server here. The only exceptions are the ones no server
can avoid: what a SIGKILLed worker held, and connects after a stopped server closed its port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import lifecycle_load, loadgen
from tests.support import (
    CONF,
    RESET_AT_STOP,
    ROOT,
    base_env,
    free_port,
    is_vrypt,
    read_responses,
    running,
)

NETNS = lifecycle_load.netns_available()
MIGRATE = (0, 1) if NETNS else (None,)
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def run(event: str, workers: int, migrate: int | None, duration: float = 3.0, **extra: object):
    argv = ["--listener", "reuse", "--event", event, "--workers", str(workers)]
    argv += ["--duration", str(duration)]
    for name, value in extra.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    if migrate is None:
        result = lifecycle_load.main_result(argv)
    else:
        result = lifecycle_load.run_in_netns(argv, migrate=migrate)
    print(result)
    return result


def assert_nothing_lost(result: dict[str, object], *, refused_after_stop: bool = False) -> None:
    clients = result["clients"]
    assert isinstance(clients, dict)
    for mode, tally in clients.items():
        assert tally["ok"] > 500, (mode, result)
        lost = {k: tally[k] for k in loadgen.LOST_KINDS if tally[k]}
        assert not lost, f"{mode}: lost {lost}: {result}"
        assert tally["stale"] == 0, f"{mode}: keep-alive closed under a request: {result}"
        if not refused_after_stop:
            # (after a stop, a connect that meets the closing listener is refused or reset
            # before it could send anything: nothing was accepted, nothing is lost)
            assert tally["refused"] == 0 and tally["connect_reset"] == 0, (mode, result)
    assert not result["traceback"], result
    assert not result["warned_migrate_req"], result


# --- quick ones, in the default suite ---------------------------------------------------------


@pytest.mark.parametrize("migrate", MIGRATE)
def test_one_worker_recycling_refuses_and_loses_nothing(migrate: int | None) -> None:
    """The case that refused thousands of connections when each worker bound its own listener:
    one worker, recycled about twenty times a second; the port never lacks its listener."""
    result = run("recycle", 1, migrate, max_requests=1000)
    assert_nothing_lost(result)
    assert int(result["recycles"]) >= 5, result


def test_reload_under_load_loses_nothing() -> None:
    result = run("hup", 2, MIGRATE[0])
    assert_nothing_lost(result)
    reloads, workers = int(result["reloads"]), int(result["workers"])
    assert reloads >= 2 and result["workers_booted"] == workers * (1 + reloads), result


def test_usr2_upgrade_then_term_of_the_old_arbiter_loses_nothing() -> None:
    """The new arbiter adopts the old one's listeners (the same sockets), so the old one's exit
    changes nothing in the kernel."""
    result = run("usr2", 2, MIGRATE[0], duration=6)
    assert_nothing_lost(result)
    assert result["arbiter_alive"], "the new arbiter must be serving after the old one left"


# --- the whole matrix, under -m heavy ---------------------------------------------------------

PLANNED = [
    ("recycle", {"max_requests": 300}),
    ("recycle", {"max_requests": 1000}),
    ("hup", {}),
    ("ttin", {}),
    ("usr2", {}),
]


@pytest.mark.heavy
@pytest.mark.parametrize("migrate", MIGRATE)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("event", "extra"), PLANNED, ids=[f"{e}{x}" for e, x in PLANNED])
def test_planned_replacements_lose_nothing(
    event: str, extra: dict[str, int], workers: int, migrate: int | None
) -> None:
    result = run(event, workers, migrate, duration=6, **extra)
    assert_nothing_lost(result)
    assert result["arbiter_alive"], result
    if event == "recycle":
        assert int(result["recycles"]) >= 3, result


@pytest.mark.heavy
@pytest.mark.parametrize("migrate", MIGRATE)
@pytest.mark.parametrize("workers", [1, 2])
def test_term_of_the_arbiter_answers_everything_it_accepted(
    workers: int, migrate: int | None
) -> None:
    """Everything accepted is answered, but for the stopping server's own race (a handshake that
    completes just before a listener closes for good: tests/support.py RESET_AT_STOP)."""
    result = run("term", workers, migrate, duration=4)
    clients = result["clients"]
    assert isinstance(clients, dict)
    for tally in clients.values():
        assert tally["reset"] <= RESET_AT_STOP, result
        tally["lost"] -= tally["reset"]
        tally["reset"] = 0
    assert_nothing_lost(result, refused_after_stop=True)
    assert not result["arbiter_alive"]


@pytest.mark.heavy
@pytest.mark.parametrize("migrate", MIGRATE)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_never_makes_the_port_refuse(workers: int, migrate: int | None) -> None:
    """SIGKILL of a worker every second: the listener slot lives on in the arbiter, so no connect
    is refused or reset, and the connections queued on it wait for the replacement. What the dead
    worker had accepted is lost (counted and printed: docs/reliability.md)."""
    result = run("kill", workers, migrate, duration=6)
    clients = result["clients"]
    assert isinstance(clients, dict)
    assert int(result["killed"]) >= 3, result
    for tally in clients.values():
        assert tally["refused"] == 0 and tally["connect_reset"] == 0, result
        assert tally["truncated"] == tally["bad"] == tally["timeout"] == 0, result
    assert result["arbiter_alive"] and not result["traceback"], result


# --- starting on a port that is taken ----------------------------------------------------------


def start_blocking(cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def gunicorn_cmd(port: int, workers: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "-c", str(CONF), "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers), "--no-control-socket",
    ]  # fmt: skip


def test_a_second_server_on_the_same_port_fails_to_start() -> None:
    """With SO_REUSEPORT a second server would silently join the first one's group and take half
    its traffic; it must fail as gunicorn does, and the first one keeps every connection."""
    with running(workers=2) as first:
        started = time.monotonic()
        second = start_blocking(gunicorn_cmd(first.port))
        print(f"second server exited {second.returncode} after {time.monotonic() - started:.1f}s")
        output = second.stdout + second.stderr
        assert second.returncode != 0, output
        assert f"Connection in use: ('127.0.0.1', {first.port})" in output, output
        assert "Booting worker" not in output, output
        for _ in range(50):  # all of them answered by the first server
            with first.connect() as sock:
                sock.sendall(GET)
                assert is_vrypt(read_responses(sock, 1)[0])
        assert first.proc.poll() is None


def test_a_plain_listener_on_the_port_fails_the_start_without_a_respawn_loop() -> None:
    port = free_port()
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        result = start_blocking(gunicorn_cmd(port))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Connection in use" in output and "Booting worker" not in output, output


def test_the_arbiter_names_its_address() -> None:
    with running(workers=2) as server:
        # Each address once, with its listener count (issue 22; the original repeated it per slot).
        found = server.wait_for_log(r"Listening at: (\S+) \(\d+\)(.*)")
        assert found.group(1) == f"http://127.0.0.1:{server.port}", found.group(0)
        assert found.group(2) == "; 2 SO_REUSEPORT listeners on each address, one per worker slot"
        assert "one SO_REUSEPORT listener per worker on each address" in server.log
        assert "tcp_migrate_req" not in server.log


def test_ttou_leaves_no_listener_unserved() -> None:
    """After TTOU the slot of the worker that left is adopted by the others: every connection
    is still answered, whichever listener the kernel picks."""
    with running(workers=3) as server:
        server.signal(signal.SIGTTOU)
        deadline = time.monotonic() + 10
        while len(server.worker_pids()) != 2:
            assert time.monotonic() < deadline, server.log
            time.sleep(0.05)
        time.sleep(0.6)  # the others adopt the orphaned slot on their next clock tick
        for _ in range(60):
            with server.connect(timeout=2) as sock:
                sock.sendall(GET)
                responses = read_responses(sock, 1)
                assert responses and is_vrypt(responses[0])


def test_a_stuck_worker_s_listener_is_served_by_the_others() -> None:
    """A worker that stops answering (SIGSTOP here; a blocking call or a starved CPU alike) but
    is not yet killed by gunicorn's `timeout`: the others adopt its listener once it has not said
    "mine" for a second, so the connections the kernel hashes to it do not wait for the kill."""
    with running("--timeout", "120", workers=2) as server:
        stuck, _other = server.worker_pids()
        os.kill(stuck, signal.SIGSTOP)
        try:
            time.sleep(2.0)
            started = time.monotonic()
            for _ in range(60):
                with server.connect(timeout=2) as sock:
                    sock.sendall(GET)
                    responses = read_responses(sock, 1)
                    assert responses and is_vrypt(responses[0])
            elapsed = time.monotonic() - started
            print(f"60 connections answered in {elapsed:.2f}s beside a stuck worker")
        finally:
            os.kill(stuck, signal.SIGCONT)
        assert stuck in server.worker_pids()

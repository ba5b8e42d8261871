"""The worker inside gunicorn's arbiter: signals, recycling, the connection cap, listeners."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    StrictReader,
    base_env,
    exchange,
    free_port,
    is_vrypt,
    read_responses,
    running,
    start_server,
    wait_ready,
)
from vrypt_worker import families

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def pid_alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float) -> float:
    started = time.monotonic()
    while pid_alive(pid):
        assert time.monotonic() - started < timeout, f"pid {pid} still alive after {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_term_answers_a_half_received_request_and_closes_idle_connections() -> None:
    with running("--graceful-timeout", "10") as server:
        (worker,) = server.worker_pids()
        idle = server.connect()
        idle.sendall(GET)
        assert is_vrypt(read_responses(idle, 1)[0])
        busy = server.connect()
        busy.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Half: ")
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        started = time.monotonic()
        # the idle keep-alive connection is closed at once, not after the 30 s keepalive
        assert StrictReader(idle).at_eof(timeout=5) and time.monotonic() - started < 3
        time.sleep(0.5)
        busy.sendall(b"yes\r\n\r\n")
        reader = StrictReader(busy)
        response = reader.read()
        assert response is not None and is_vrypt(response)
        assert response.header(b"Connection") == b"close" and reader.at_eof()
        wait_gone(worker, 5)
        assert server.proc.wait(10) == 0
        idle.close()
        busy.close()


def test_term_gives_up_on_a_stalled_request_after_graceful_timeout() -> None:
    with running("--graceful-timeout", "2") as server:
        (worker,) = server.worker_pids()
        with server.connect() as stalled:
            stalled.sendall(b"GET / HTTP/1.1\r\nHost: never-finished")
            time.sleep(0.2)
            server.signal(signal.SIGTERM)
            assert 1 < wait_gone(worker, 8) < 5
        server.proc.wait(10)


def test_quit_exits_at_once() -> None:
    with running("--graceful-timeout", "30") as server:
        (worker,) = server.worker_pids()
        with server.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: half")
            time.sleep(0.2)
            server.signal(signal.SIGQUIT)
            assert wait_gone(worker, 5) < 3
        server.proc.wait(10)


def test_usr1_reopens_the_log_file(tmp_path: Path) -> None:
    log = tmp_path / "error.log"
    with running("--error-logfile", str(log)) as server:
        (worker,) = server.worker_pids()
        rotated = tmp_path / "error.log.1"
        log.rename(rotated)
        server.signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the arbiter forwards USR1 to its workers
        os.kill(worker, signal.SIGTERM)  # make the worker write a line: "Worker exiting"
        wait_gone(worker, 5)
        time.sleep(0.3)
        assert f"Worker exiting (pid: {worker})" in log.read_text()
        assert f"Worker exiting (pid: {worker})" not in rotated.read_text()


def test_max_requests_recycles_the_worker_without_failing_a_request() -> None:
    args = ("--max-requests", "40", "--max-requests-jitter", "0")
    with running(*args, env=base_env(VRYPT_REUSE_PORT="0")) as server:
        first = server.worker_pids()
        answered = 0
        closes = 0
        while answered < 150:
            with server.connect() as sock:
                reader = StrictReader(sock)
                while answered < 150:
                    sock.sendall(GET)
                    response = reader.read()
                    assert response is not None and is_vrypt(response)
                    answered += 1
                    if response.header(b"Connection") == b"close":
                        closes += 1
                        assert reader.at_eof()
                        break
        assert closes >= 3
        assert server.log.count("Autorestarting worker after current request.") >= 3
        assert server.worker_pids() != first


def test_worker_connections_is_a_real_cap() -> None:
    with running("--worker-connections", "3") as server:
        held = [server.connect() for _ in range(3)]
        for sock in held:
            # A second head begun: busy, so not closed to make room (idle keep-alive ones are:
            # tests/test_hostile.py)
            sock.sendall(GET + b"GET /next HTTP/1.1\r\n")
            assert is_vrypt(read_responses(sock, 1)[0])
        with server.connect() as waiting:  # the kernel completes the handshake; we do not accept
            waiting.sendall(GET)
            waiting.settimeout(1.0)
            with pytest.raises(TimeoutError):
                waiting.recv(100)
            held.pop().close()
            waiting.settimeout(5)
            assert is_vrypt(read_responses(waiting, 1)[0])
        for sock in held:
            sock.close()


def test_worker_exits_when_the_arbiter_dies() -> None:
    server = start_server()
    try:
        (worker,) = server.worker_pids()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(5)
        wait_gone(worker, 8)
    finally:
        server.stop()


def test_heartbeat_keeps_an_idle_worker_alive_and_open_files_limit_is_raised() -> None:
    with running("--timeout", "2") as server:
        (worker,) = server.worker_pids()
        limits = Path(f"/proc/{worker}/limits").read_text()
        time.sleep(5)
        assert server.worker_pids() == [worker]
        assert "WORKER TIMEOUT" not in server.log
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    soft, hard = (int(value) for value in line.split()[3:5])
    assert soft == min(hard, 50_000 + 128)


def test_drop_in_worker_class_never_imports_the_application() -> None:
    port = free_port()
    cmd = [
        sys.executable, "-m", "gunicorn",
        "-k", "vrypt_worker.VryptWorker",
        "--bind", f"127.0.0.1:{port}",
        "--no-control-socket",
        "no_such_module_anywhere:app",
    ]  # fmt: skip
    with running(cmd=cmd, port=port) as server:
        responses, _ = exchange(server, GET, 1)
        assert is_vrypt(responses[0])
        assert server.log.count("never imported") == 1
        assert "no_such_module_anywhere:app" in server.log


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--certfile", "{cert}", "--keyfile", "{cert}"], "certfile"),
        # (proxy_protocol is served since issue 22: tests/test_proxy_protocol.py)
        (["--bind", "unix:{cert}.sock"], "reuse_port with a unix"),
    ],
)
def test_settings_it_cannot_honour_refuse_to_start(
    flags: list[str], named: str, tmp_path: Path
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not really a certificate\n")
    args = [flag.format(cert=cert) for flag in flags]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "conf/gunicorn.conf.py",
            "--no-control-socket",
            "--bind",
            f"127.0.0.1:{free_port()}",
            *args,
        ],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert named in result.stderr + result.stdout


def test_unix_socket_listener(tmp_path: Path) -> None:
    path = tmp_path / "vrypt.sock"
    port = free_port()
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(ROOT / "conf" / "gunicorn.conf.py"),
        "--bind", f"unix:{path}", "--bind", f"127.0.0.1:{port}",
        "--workers", "1", "--no-control-socket",
    ]  # fmt: skip
    env = base_env(VRYPT_REUSE_PORT="0")
    with running(cmd=cmd, port=port, env=env), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(GET)
        assert is_vrypt(read_responses(sock, 1)[0])


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_ipv6_listener() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(ROOT / "conf" / "gunicorn.conf.py"),
        "--bind", f"[::1]:{port}", "--workers", "1", "--no-control-socket",
    ]  # fmt: skip
    server = start_server(cmd=cmd, port=port, ready=False)
    server.host = "::1"
    try:
        wait_ready(server)
        responses, _ = exchange(server, GET, 1)
        assert is_vrypt(responses[0])
    finally:
        server.stop()


@pytest.mark.parametrize(
    "argv",
    [
        ["{python}", "-m", "vrypt_worker", "{port}"],
        ["{script}", "-p", "{port}"],
        ["{script}", "--port", "{port}"],
    ],
)
def test_command_line_forms(argv: list[str]) -> None:
    port = free_port()
    script = str(Path(sys.executable).with_name("vrypt-server"))
    cmd = [a.format(python=sys.executable, script=script, port=port) for a in argv]
    # PYTHONPATH: the script imports this checkout, not whatever the venv installed
    env = base_env(GUNICORN_CMD_ARGS="--no-control-socket", PYTHONPATH=str(ROOT))
    with running(cmd=cmd, port=port, workers=2, env=env) as server:
        responses, _ = exchange(server, GET, 1)
        assert is_vrypt(responses[0])
        # Both families (issue 22): `[::]` with IPV6_V6ONLY off, or 0.0.0.0 without IPv6.
        assert f"Listening at: http://{families.default_bind(port)} (" in server.log


@pytest.mark.parametrize("bad", ["0", "65536", "http", "-1", "80.5"])
def test_command_line_rejects_a_bad_port(bad: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vrypt_worker", "--port", bad],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "port" in result.stderr


def test_command_line_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vrypt_worker", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and "vrypt-server" in result.stdout and "PORT" in result.stdout


def _worker_socket(worker_pid: int, peer: tuple[str, int]) -> socket.socket:
    """A duplicate of the worker's own end of our connection (pidfd_getfd, Linux 5.6+, root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, worker_pid, 0)  # pidfd_open
    if pidfd < 0:
        pytest.skip("pidfd_open is not available")
    try:
        for entry in Path(f"/proc/{worker_pid}/fd").iterdir():
            if not os.readlink(entry).startswith("socket:"):
                continue
            fd = libc.syscall(438, pidfd, int(entry.name), 0)  # pidfd_getfd
            if fd < 0:
                pytest.skip("pidfd_getfd is not permitted here")
            sock = socket.socket(fileno=fd)
            try:
                if sock.type == socket.SOCK_STREAM and sock.getpeername() == peer:
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("the worker holds no socket connected to us")


def test_accepted_tcp_sockets_have_nodelay() -> None:
    with running() as server, server.connect() as client:
        client.sendall(GET)
        assert is_vrypt(read_responses(client, 1)[0])
        (worker,) = server.worker_pids()
        with _worker_socket(worker, client.getsockname()) as theirs:
            assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_systemd_socket_activation_with_a_shared_listener() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # What systemd does before it executes the service: the socket as fd 3, LISTEN_PID, LISTEN_FDS.
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "conf/gunicorn.conf.py", "--workers", "2"]
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *gunicorn, "--no-control-socket"],
        cwd=ROOT,
        env=base_env(VRYPT_REUSE_PORT="0"),
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    listener.close()  # the server holds it now, as under systemd
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(GET)
                    assert is_vrypt(read_responses(sock, 1)[0])
                    break
            except (OSError, IndexError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise AssertionError(proc.communicate(timeout=10)[0].decode()) from None
                time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_heartbeat_is_not_starved_under_load() -> None:
    """A worker kept busy for several `timeout` periods must still tell the arbiter it lives."""
    from tests.loadgen import collect, spawn

    with running("--timeout", "2") as server:
        (worker,) = server.worker_pids()
        clients = [spawn(server.port, "keepalive", 50, 7.0) for _ in range(2)]
        tallies = [collect(client) for client in clients]
        assert sum(t.ok for t in tallies) > 1000
        assert server.worker_pids() == [worker]
        assert "WORKER TIMEOUT" not in server.log


def test_gunicorn_exit_hooks_run_for_every_leaving_worker(tmp_path: Path) -> None:
    """A worker leaves with os._exit (no interpreter teardown), after gunicorn's own steps:
    the `Worker exiting` line and the worker_exit server hook, on recycling and on TERM."""
    marks = tmp_path / "exits"
    conf = tmp_path / "hooks.py"
    conf.write_text(
        "from vrypt_worker.conf import *  # noqa: F403\n"
        "def worker_exit(server, worker):\n"
        f"    with open({str(marks)!r}, 'a') as f:\n"
        "        f.write(f'{worker.pid} {type(server).__name__}\\n')\n"
    )
    port = free_port()
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(conf), "--bind", f"127.0.0.1:{port}",
        "--workers", "1", "--no-control-socket", "--max-requests", "5",
        "--max-requests-jitter", "0",
    ]  # fmt: skip
    server = start_server(cmd=cmd, port=port)
    try:
        first = server.worker_pids()
        deadline = time.monotonic() + 10
        while server.log.count("Worker exiting") < 2:  # two recycles
            assert time.monotonic() < deadline, server.log
            with server.connect() as sock:
                sock.sendall(GET)
                assert is_vrypt(read_responses(sock, 1)[0])
            time.sleep(0.01)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
    finally:
        server.stop()
    lines = marks.read_text().split()
    exits = server.log.count("Worker exiting")
    assert exits >= 3 and len(lines) == 2 * exits, (lines, server.log)
    assert f"{first[0]}" in lines and set(lines[1::2]) == {"Arbiter"}

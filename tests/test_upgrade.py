"""USR2 upgrades however the server was started (issue 22): `python -m gunicorn`, gunicorn's
`__main__.py` run by path (what an arbiter of the original code re-executes), and the control
socket's plain name after the new arbiter is promoted. Real gunicorn processes, ephemeral ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gunicorn

from tests.support import CONF, Server, base_env, free_port, is_vrypt, read_responses, start_server

GUNICORN_MAIN = str(Path(gunicorn.__file__).resolve().parent / "__main__.py")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(child) for child in out.stdout.split()]


def new_arbiter(server: Server, timeout: float = 15.0) -> int:
    """After USR2: the old arbiter's child that has a worker of its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children(server.proc.pid):
            if children(child):
                return child
        time.sleep(0.05)
    raise AssertionError(f"no new arbiter serving after USR2:\n{server.log}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def answers(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = read_responses(sock, 1)
    return len(got) == 1 and is_vrypt(got[0])


def upgrade_then_stop_the_old(server: Server) -> int:
    """USR2, wait for the new arbiter's worker, TERM the old arbiter: the new one's pid."""
    server.signal(signal.SIGUSR2)
    arbiter = new_arbiter(server)
    server.signal(signal.SIGTERM)
    server.proc.wait(15)
    server.wait_for_log(r"Master has been promoted", timeout=15)
    assert alive(arbiter)
    return arbiter


def command(*head: str, port: int, control: bool = False) -> list[str]:
    cmd = [*head, "-c", str(CONF), "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    return cmd if control else [*cmd, "--no-control-socket"]


def test_usr2_after_python_dash_m_gunicorn_serves() -> None:
    # The original re-executed gunicorn's __main__.py by path: its folder (gunicorn/, with its
    # `http` package) shadowed the standard library and the new arbiter failed to load the conf.
    port = free_port()
    server = start_server(port=port, cmd=command(sys.executable, "-m", "gunicorn", port=port))
    try:
        upgrade_then_stop_the_old(server)
        assert answers(port)
        assert "Traceback" not in server.log, server.log
        assert "Failed to read config file" not in server.log, server.log
    finally:
        server.stop()


def test_gunicorn_main_run_by_path_serves_and_upgrades() -> None:
    # What an arbiter of the original code re-executes on USR2 (the first upgrade onto this
    # version): gunicorn's __main__.py as a script, gunicorn/ first on sys.path.
    port = free_port()
    server = start_server(port=port, cmd=command(sys.executable, GUNICORN_MAIN, port=port))
    try:
        assert answers(port)
        upgrade_then_stop_the_old(server)
        assert answers(port)
        assert "Traceback" not in server.log, server.log
    finally:
        server.stop()


def test_usr2_after_vrypt_server_serves() -> None:
    # The original re-executed `python vrypt-server -c python:vrypt_worker.conf ...`: the argv it
    # had handed gunicorn, whose first word is no file ("can't open file .../vrypt-server").
    port = free_port()
    env = base_env(GUNICORN_CMD_ARGS="--no-control-socket --workers 1")
    cmd = [sys.executable, "-m", "vrypt_worker", str(port)]
    server = start_server(port=port, env=env, cmd=cmd)
    try:
        upgrade_then_stop_the_old(server)
        assert answers(port)
        assert "Traceback" not in server.log, server.log
    finally:
        server.stop()


def test_promoted_arbiter_takes_the_plain_control_socket_name() -> None:
    # The new arbiter starts while the old one holds vrypt-127.0.0.1-PORT.ctl and takes a
    # pid-suffixed name; the old one deletes the plain name when it exits. The original left the
    # promoted arbiter on the suffixed name and the plain one gone.
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vrypt-ctl-") as runtime:
        env = base_env(XDG_RUNTIME_DIR=runtime)
        # The console script: this test is about the name, whatever starts the server.
        cmd = command(str(Path(sys.executable).parent / "gunicorn"), port=port, control=True)
        server = start_server(port=port, env=env, cmd=cmd)
        plain = os.path.join(runtime, f"vrypt-127.0.0.1-{port}.ctl")
        try:
            server.wait_for_log(r"Control socket listening at", timeout=10)
            assert os.path.exists(plain), os.listdir(runtime)
            arbiter = upgrade_then_stop_the_old(server)
            suffixed = os.path.join(runtime, f"vrypt-127.0.0.1-{port}-{arbiter}.ctl")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                os.path.exists(plain) and not os.path.exists(suffixed)
            ):
                time.sleep(0.05)
            assert sorted(os.listdir(runtime)) == [os.path.basename(plain)], server.log
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(2)
                probe.connect(plain)  # the promoted arbiter answers there
            assert answers(port)
        finally:
            server.stop()

"""What vrypt_worker does in gunicorn's arbiter (vrypt_worker/arbiter.py), and what of gunicorn's it
relies on.

The first tests read gunicorn's own Arbiter and Config (their source, with `ast`) and fail, naming
the thing, when a gunicorn release no longer calls our hooks where we need them or no longer has
what we wrap: then arbiter.py must be looked at before the pin in pyproject.toml moves. The others
run real servers in both forms, the package's conf and the bare `-k vrypt_worker.VryptWorker`
drop-in: the arbiter holds one listener per worker, forks the missing workers at once, forks a
recycled worker's successor first, and still calls the hooks an operator's conf set.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gunicorn
import pytest
from gunicorn.arbiter import Arbiter
from gunicorn.config import Config

from tests.support import CONF, base_env, free_port, is_vrypt, read_responses, running
from vrypt_worker import announce, arbiter

CHECKED = "27.0.1"  # the gunicorn arbiter.py's stack lookup and wrappers were checked against
SLOTS_SAID = "one SO_REUSEPORT listener per worker"
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


# --- gunicorn still calls us where arbiter.py needs it -------------------------------------------


def _source_tree(function: Callable[..., Any]) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def where(function: Callable[..., Any], code: str) -> int:
    """The first line of `function`'s source holding an expression or statement that reads
    `code` (or starts with it), relative to the function; fails naming it when there is none."""
    tree = _source_tree(function)
    lines = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, (ast.expr, ast.stmt)) and ast.unparse(node).startswith(code)
    ]
    assert lines, (
        f"gunicorn {gunicorn.__version__}: {function.__qualname__} no longer has `{code}`, "
        f"which vrypt_worker/arbiter.py relies on (checked against gunicorn {CHECKED})"
    )
    return min(lines)


def before(function: Callable[..., Any], first: str, then: str) -> None:
    assert where(function, first) < where(function, then), (
        f"gunicorn {gunicorn.__version__}: {function.__qualname__} no longer runs `{first}` "
        f"before `{then}`, which vrypt_worker/arbiter.py relies on (checked against gunicorn "
        f"{CHECKED})"
    )


def test_gunicorn_calls_our_hooks_where_arbiter_py_needs_them() -> None:
    num_workers = Arbiter.__dict__.get("num_workers")
    assert isinstance(num_workers, property) and num_workers.fset is not None, (
        f"gunicorn {gunicorn.__version__}: Arbiter.num_workers is no longer a property whose "
        "setter calls the nworkers_changed hook, arbiter.py's way in"
    )
    worker_class = Config.__dict__.get("worker_class")
    assert isinstance(worker_class, property) and worker_class.fget is not None
    # Arbiter.setup (at start and on HUP): the worker class's setup() (the drop-in's way in,
    # arbiter.worker_class_setup), then nworkers_changed (every form's), before any listener.
    where(worker_class.fget, "worker_class.setup()")
    before(Arbiter.setup, "self.cfg = app.cfg", "self.worker_class = self.cfg.worker_class")
    before(Arbiter.setup, "self.worker_class = self.cfg.worker_class", "self.num_workers =")
    where(num_workers.fset, "self.cfg.nworkers_changed(self, value, old_value)")
    before(Arbiter.run, "self.start()", "self.manage_workers()")
    # Arbiter.start: the control socket's name before gunicorn binds; gunicorn binds only when
    # the slots left it nothing to bind; check_config before the first fork (run's manage).
    before(Arbiter.start, "self.cfg.on_starting(self)", "if not self.LISTENERS")
    before(Arbiter.start, "if not self.LISTENERS", "self.worker_class.check_config(")
    where(Arbiter.start, "if not (self.cfg.reuse_port and hasattr(socket, 'SO_REUSEPORT'))")
    # Arbiter.reload: setup() with the new config (the slots keep the bind) before gunicorn
    # compares the bind; the answer's reload after it.
    before(Arbiter.reload, "self.setup(self.app)", "if old_address != self.cfg.address")
    before(Arbiter.reload, "self.setup(self.app)", "self.cfg.on_reload(self)")
    # spawn_worker: VryptWorker.__init__ takes its slot, then pre_fork, then the fork; the
    # worker_exit hook gets the arbiter.
    before(Arbiter.spawn_worker, "worker = self.worker_class(", "self.cfg.pre_fork(self, worker)")
    before(Arbiter.spawn_worker, "self.cfg.pre_fork(self, worker)", "pid = os.fork()")


def test_gunicorn_arbiter_still_has_what_arbiter_py_wraps() -> None:
    version = f"gunicorn {gunicorn.__version__} (checked against {CHECKED})"
    for name, parameters in (
        ("setup", ["self", "app"]),
        ("spawn_worker", ["self"]),
        ("spawn_workers", ["self"]),  # replaced on the instance: forks without the stagger
        ("manage_workers", ["self"]),  # wrapped on the instance: successors first
        ("kill_worker", ["self", "pid", "sig"]),
    ):
        method = getattr(Arbiter, name, None)
        assert callable(method), f"{version}: Arbiter.{name} is gone"
        got = list(inspect.signature(method).parameters)
        assert got == parameters, f"{version}: Arbiter.{name}{tuple(got)}, not {parameters}"
    assert isinstance(Arbiter.LISTENERS, list), f"{version}: Arbiter.LISTENERS"
    assert isinstance(Arbiter.WORKERS, dict), f"{version}: Arbiter.WORKERS (pid -> worker)"
    # What the replacement of spawn_workers does in its stead, and what the successors'
    # wrapper counts on: manage_workers forks through spawn_workers when WORKERS is short of
    # num_workers and stops the oldest beyond it.
    where(Arbiter.spawn_workers, "self.spawn_worker()")
    where(Arbiter.spawn_workers, "time.sleep(")  # the stagger we drop
    before(
        Arbiter.manage_workers, "if len(self.WORKERS) < self.num_workers", "self.spawn_workers()"
    )
    where(Arbiter.manage_workers, "self.kill_worker(pid, signal.SIGTERM)")
    # What the hooks read from the arbiter object.
    where(Arbiter.setup, "self.log = ")
    where(Arbiter.start, "self.pid = os.getpid()")
    where(arbiter.nworkers_changed, "server.cfg")


def test_gunicorn_still_does_what_announce_and_reexec_rewrite() -> None:
    # announce.py rewrites these two records; reexec.py the command a USR2 re-executes and the
    # control socket at promotion (issue 22).
    where(Arbiter.start, f"self.log.info({announce.AT_START!r}, listeners_str, self.pid)")
    where(Arbiter.reload, f"self.log.info({announce.AT_RELOAD!r}, listeners_str)")
    where(Arbiter.__init__, "args = sys.argv[:]")
    where(Arbiter.reexec, "os.execvpe(self.START_CTX[0], self.START_CTX['args'], environ)")
    before(
        Arbiter.maybe_promote_master, "if self.master_pid != os.getppid()", "self.master_pid = 0"
    )
    before(Arbiter.run, "self.manage_workers()", "self.maybe_promote_master()")
    for name in ("_start_control_server", "_stop_control_server", "maybe_promote_master"):
        assert callable(getattr(Arbiter, name, None)), f"gunicorn {gunicorn.__version__}: {name}"


def test_listening_at_names_each_address_once() -> None:
    urls = "http://0.0.0.0:8080,http://[::]:8443,http://0.0.0.0:8080,http://[::]:8443"
    assert announce.once_per_address(urls) == ("http://0.0.0.0:8080,http://[::]:8443", 2)
    record = logging.LogRecord("gunicorn.error", 20, "", 0, announce.AT_START, (urls, 7), None)
    assert announce.ListeningOnce().filter(record)
    assert record.getMessage() == (
        "Listening at: http://0.0.0.0:8080,http://[::]:8443 (7); "
        "2 SO_REUSEPORT listeners on each address, one per worker slot"
    )
    one = logging.LogRecord("gunicorn.error", 20, "", 0, announce.AT_START, ("http://a:1", 7), None)
    assert (
        announce.ListeningOnce().filter(one) and one.getMessage() == "Listening at: http://a:1 (7)"
    )


@pytest.mark.parametrize(
    ("name", "hook"),
    [
        ("nworkers_changed", arbiter.nworkers_changed),
        ("pre_fork", arbiter.pre_fork),
        ("on_starting", arbiter.on_starting),
        ("on_reload", arbiter.on_reload),
    ],
)
def test_gunicorn_takes_our_hooks_and_our_chains(name: str, hook: Callable[..., None]) -> None:
    """gunicorn checks a hook's arity when it is set: ours, and ours chained before the
    operator's (arbiter.chain_hook), both pass; the operator's still runs, after ours."""
    cfg = Config()
    cfg.set(name, hook)
    assert cfg.settings[name].get() is hook
    calls: list[str] = []
    arity = len(inspect.signature(hook).parameters)

    def record(who: str) -> Callable[..., None]:
        def recorded(*args: Any) -> None:
            calls.append(f"{who}{args}")

        recorded.__signature__ = inspect.signature(hook)  # type: ignore[attr-defined]
        return recorded

    cfg = Config()
    cfg.set(name, record("theirs"))
    ours = functools.wraps(hook)(record("ours"))
    arbiter.chain_hook(cfg, name, ours)
    arbiter.chain_hook(cfg, name, ours)  # a second time (a reload) changes nothing
    getattr(cfg, name)(*range(arity))
    args = tuple(range(arity))
    assert calls == [f"ours{args}", f"theirs{args}"]


# --- real servers, in both forms ----------------------------------------------------------------


def command(form: str, port: int, workers: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "gunicorn"]
    if form == "conf":
        cmd += ["-c", str(CONF)]
    else:  # the bare drop-in: gunicorn's own defaults, reuse_port asked for
        cmd += ["-k", "vrypt_worker.VryptWorker", "--reuse-port"]
    cmd += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--no-control-socket"]
    cmd += list(extra)
    if form != "conf":
        cmd.append("vrypt_worker.wsgi:application")
    return cmd


def listening_sockets(port: int) -> int:
    """Listening sockets on the port, whoever holds them (one per SO_REUSEPORT group member)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())


def wait_for(check: Callable[[], bool], what: str, log: Callable[[], str], timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log()}"
        time.sleep(0.05)


def answered(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(GET)
        return is_vrypt(read_responses(sock, 1)[0])


FORMS = ["conf", "drop-in"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", FORMS)
def test_the_arbiter_holds_one_listener_per_worker(form: str) -> None:
    port = free_port()
    with running(cmd=command(form, port, 2), port=port, workers=2) as server:
        assert server.log.count(SLOTS_SAID) == 1, server.log
        assert listening_sockets(port) == 2
        server.signal(signal.SIGTTIN)  # a third worker gets a third slot
        wait_for(lambda: len(server.worker_pids()) == 3, "third worker", lambda: server.log)
        wait_for(lambda: listening_sockets(port) == 3, "third listener", lambda: server.log)
        for pid in server.worker_pids():  # every worker gone: the arbiter's listeners stay
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        assert listening_sockets(port) == 3
        wait_for(lambda: len(server.worker_pids()) == 3, "respawned workers", lambda: server.log)
        assert answered(port)
        assert "did not see gunicorn's arbiter" not in server.log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", [*FORMS, "gunicorn's own"])
def test_the_missing_workers_are_forked_at_once(form: str, tmp_path: Path) -> None:
    """At start and after every worker is gone, the arbiter forks the missing workers one right
    after the other; gunicorn's own spawn_workers (its sync worker here, the control) sleeps
    0-0.1 s after each fork. tests/audited_gunicorn.py has the arbiter write its forks and
    sleeps down."""
    events = tmp_path / "events"
    port = free_port()
    workers = 4
    if form == "gunicorn's own":
        cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers"]
        cmd += [str(workers), "--no-control-socket", "vrypt_worker.wsgi:application"]
    else:
        cmd = command(form, port, workers)
    cmd[1:3] = ["-m", "tests.audited_gunicorn"]
    env = base_env(VRYPT_TEST_EVENTS=str(events))
    with running(cmd=cmd, port=port, workers=workers, env=env) as server:
        for pid in server.worker_pids():
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        wait_for(
            lambda: events.read_text().count("fork") == 2 * workers,
            "respawned workers",
            lambda: server.log,
        )
        wait_for(lambda: len(server.worker_pids()) == workers, "workers", lambda: server.log)
        seen = events.read_text().split()
    if form == "gunicorn's own":
        assert seen.count("sleep") >= workers, seen  # the recording sees gunicorn's stagger
    else:
        assert seen == ["fork"] * (2 * workers), seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", FORMS)
def test_a_recycled_worker_s_successor_boots_before_it_leaves(form: str) -> None:
    port = free_port()
    extra = ("--max-requests", "10", "--max-requests-jitter", "0")
    with running(cmd=command(form, port, 1, *extra), port=port) as server:
        (first,) = server.worker_pids()
        deadline = time.monotonic() + 20
        while f"Worker exiting (pid: {first})" not in server.log:
            assert time.monotonic() < deadline, server.log
            try:
                answered(port)
            except OSError:
                pass
        log = server.log
        booted = [line for line in log.splitlines() if "Booting worker with pid" in line]
        assert len(booted) >= 2, log
        assert log.index(booted[1]) < log.index(f"Worker exiting (pid: {first})"), log


OPERATOR_HOOKS = """
def nworkers_changed(server, new_value, old_value):
    with open({marks!r}, "a") as f:
        f.write(f"nworkers_changed {{new_value}}\\n")

def pre_fork(server, worker):
    with open({marks!r}, "a") as f:
        f.write("pre_fork\\n")

def worker_exit(server, worker):
    with open({marks!r}, "a") as f:
        f.write(f"worker_exit {{type(server).__name__}}\\n")
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["drop-in with the operator's conf", "our conf, hooks replaced"])
def test_the_operator_s_hooks_still_run_beside_ours(form: str, tmp_path: Path) -> None:
    """A conf of the operator's own with the drop-in, and a conf that takes the package's and
    defines nworkers_changed itself: gunicorn calls their hooks, and ours run too (the slots)."""
    marks = tmp_path / "marks"
    conf = tmp_path / "operator.conf.py"
    star = "from vrypt_worker.conf import *  # noqa: F403\n" if form.startswith("our") else ""
    conf.write_text(star + OPERATOR_HOOKS.format(marks=str(marks)))
    port = free_port()
    cmd = [*command("drop-in", port, 2, "-c", str(conf))]
    if star:
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--bind", f"127.0.0.1:{port}"]
        cmd += ["--workers", "2", "--no-control-socket"]
    with running(cmd=cmd, port=port, workers=2) as server:
        assert server.log.count(SLOTS_SAID) == 1, server.log
        assert listening_sockets(port) == 2
        assert answered(port)
        pids = server.worker_pids()
        server.signal(signal.SIGTERM)
        server.proc.wait(20)
    lines = marks.read_text().splitlines()
    assert lines[:3] == ["nworkers_changed 2", "pre_fork", "pre_fork"], lines
    assert lines.count("worker_exit Arbiter") == len(pids), lines

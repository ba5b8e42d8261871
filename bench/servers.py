"""The servers under test: how each is started, how readiness is checked, how it is stopped.

Each server runs in a session (and process group) of its own, pinned with ``taskset``; its whole
tree is measured through that session (see procstat) and killed through that group.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.scenarios import Placement, cpu_list

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# build(port, workers, tmpdir) -> argv (before taskset), run in ROOT
Builder = Callable[[int, int, Path], list[str]]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    description: str
    build: Builder
    env: tuple[tuple[str, str], ...] = ()
    command: str = ""  # how to show the command line in reports, when build() would not do


class ServerError(RuntimeError):
    pass


def _gunicorn(*args: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", *args]


def wsgi_app() -> str:
    """The project's 3-line WSGI app if it is there, else the harness's own copy."""
    if (ROOT / "vrypt_worker" / "wsgi.py").exists():
        return "vrypt_worker.wsgi:application"
    return "bench.wsgi_app:application"


def vrypt_importable() -> bool:
    probe = "import vrypt_worker; vrypt_worker.VryptWorker"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=server_env(()), capture_output=True
    )
    return result.returncode == 0


def nginx_available() -> bool:
    return os.access(NGINX, os.X_OK)


def _vrypt(port: int, workers: int, tmp: Path) -> list[str]:
    return _gunicorn(
        "-c", "conf/gunicorn.conf.py", "--workers", str(workers), "--bind", f"127.0.0.1:{port}"
    )


def _vrypt_log(port: int, workers: int, tmp: Path) -> list[str]:
    """vrypt with gunicorn's access log to a file, in gunicorn's default format, which is the
    `combined` format nginx logs in by default."""
    return [*_vrypt(port, workers, tmp), "--access-logfile", str(tmp / "access.log")]


def _gevent_builder(worker_class: str) -> Builder:
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        return _gunicorn(
            "-k", worker_class,
            "--workers", str(workers),
            "--worker-connections", "10000",
            "--bind", f"127.0.0.1:{port}",
            wsgi_app(),
        )  # fmt: skip

    return build


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 10000;
}}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 30s;
    keepalive_requests 1000000000;
    server {{
        listen 127.0.0.1:{port};
        default_type text/plain;
        location / {{
            return 200 "Vrypt";
        }}
    }}
}}
"""


def _nginx(port: int, workers: int, tmp: Path) -> list[str]:
    """nginx in the foreground (daemon off) with its master, so the master is our child and the
    workers its children: the whole tree stays in our session and is measured."""
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, port=port, access_log="off"))
    return [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]


def _nginx_log(port: int, workers: int, tmp: Path) -> list[str]:
    """nginx logging every request to a file in its default `combined` format."""
    conf = tmp / "nginx.conf"
    log = f"{tmp}/access.log combined"
    conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, port=port, access_log=log))
    return [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]


def _nginx_deferred(port: int, workers: int, tmp: Path) -> list[str]:
    """nginx with `listen ... deferred` (TCP_DEFER_ACCEPT), as vrypt's listeners have it by
    default: the fair reference for new connections when nginx is tuned the same way."""
    conf = tmp / "nginx.conf"
    text = NGINX_CONF.format(workers=workers, tmp=tmp, port=port, access_log="off")
    listen = f"listen 127.0.0.1:{port};"
    assert listen in text
    conf.write_text(text.replace(listen, f"listen 127.0.0.1:{port} deferred;"))
    return [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]


# nginx in front of a gunicorn server (bench/transports.py, `FrontTransport`): the
# nginx-uwsgi, nginx-proxy and nginx-proxy-ka scenarios. One worker, on the server's core with
# the backend (taskset covers both); the client side as in NGINX_CONF.
NGINX_FRONT_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/front.pid;
error_log {tmp}/front-error.log warn;
events {{
    worker_connections 10000;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 30s;
    keepalive_requests 1000000000;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
{location}
        }}
    }}
}}
"""
# What each front passes to the backend. uwsgi: nginx's own `uwsgi_params`, written out; nginx's
# uwsgi module never keeps an upstream connection (docs/uwsgi.md), `keepalive` or not. proxy:
# nginx's default proxy_pass (HTTP/1.0 and `Connection: close`: a new upstream connection per
# request, like uwsgi); proxy-ka: HTTP/1.1 to the upstream with its connections kept.
FRONT_LOCATIONS = {
    "uwsgi": """\
            uwsgi_param QUERY_STRING $query_string;
            uwsgi_param REQUEST_METHOD $request_method;
            uwsgi_param CONTENT_TYPE $content_type;
            uwsgi_param CONTENT_LENGTH $content_length;
            uwsgi_param REQUEST_URI $request_uri;
            uwsgi_param PATH_INFO $document_uri;
            uwsgi_param DOCUMENT_ROOT $document_root;
            uwsgi_param SERVER_PROTOCOL $server_protocol;
            uwsgi_param REQUEST_SCHEME $scheme;
            uwsgi_param HTTPS $https if_not_empty;
            uwsgi_param REMOTE_ADDR $remote_addr;
            uwsgi_param REMOTE_PORT $remote_port;
            uwsgi_param SERVER_PORT $server_port;
            uwsgi_param SERVER_NAME $server_name;
            uwsgi_pass backend;""",
    "proxy": """\
            proxy_pass http://backend;""",
    "proxy-ka": """\
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://backend;""",
}


def peer_spec(arg: str) -> ServerSpec:
    """``NAME=COMMAND``: COMMAND is run by sh, with ``{port}`` and ``{workers}`` filled in."""
    name, sep, command = arg.partition("=")
    if not sep or not name or "{port}" not in command:
        raise ValueError(f"--peer {arg!r}: expected NAME=COMMAND with {{port}} in COMMAND")

    def build(port: int, workers: int, tmp: Path) -> list[str]:
        return ["sh", "-c", command.replace("{port}", str(port)).replace("{workers}", str(workers))]

    return ServerSpec(name, "given with --peer", build, command=command)


BUILTIN: dict[str, ServerSpec] = {
    "vrypt": ServerSpec(
        "vrypt",
        "gunicorn -c conf/gunicorn.conf.py (vrypt_worker.VryptWorker)",
        _vrypt,
        env=(("VRYPT_STATSD_HOST", ""),),
    ),
    "nginx": ServerSpec(
        "nginx",
        'nginx, return 200 "Vrypt"',
        _nginx,
        command="nginx -p TMPDIR -e TMPDIR/error.log -c TMPDIR/nginx.conf (written by bench)",
    ),
    "vrypt-log": ServerSpec(
        "vrypt-log",
        "vrypt with --access-logfile TMPDIR/access.log (gunicorn's default format: combined)",
        _vrypt_log,
        env=(("VRYPT_STATSD_HOST", ""),),
    ),
    "nginx-log": ServerSpec(
        "nginx-log",
        'nginx, return 200 "Vrypt", access_log to a file (combined)',
        _nginx_log,
        command="nginx as above, with `access_log TMPDIR/access.log combined;`",
    ),
    "nginx-deferred": ServerSpec(
        "nginx-deferred",
        'nginx, return 200 "Vrypt", `listen ... deferred` (TCP_DEFER_ACCEPT)',
        _nginx_deferred,
        command="nginx as above, with `listen 127.0.0.1:PORT deferred;`",
    ),
    "gevent": ServerSpec(
        "gevent", "gunicorn -k gevent + 3-line WSGI app", _gevent_builder("gevent")
    ),
    "gevent_pywsgi": ServerSpec(
        "gevent_pywsgi",
        "gunicorn -k gevent_pywsgi + 3-line WSGI app",
        _gevent_builder("gevent_pywsgi"),
    ),
}


def _hypercorn(port: int, workers: int, tmp: Path) -> list[str]:
    """hypercorn with HTTP/3 (`--quic-bind`, aioquic) on the TLS port, a 3-line ASGI app; the
    certificate is filled in by the h3 transport (bench/transports.py)."""
    command = (
        f"exec {shlex.quote(sys.executable)} -m hypercorn --workers {workers} "
        f"--bind 127.0.0.1:{port} --quic-bind 127.0.0.1:{port} "
        "--certfile {certfile} --keyfile {keyfile} bench.asgi_app:app"
    )
    return ["sh", "-c", command]


def hypercorn_available() -> bool:
    probe = "import hypercorn, aioquic"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


BUILTIN["hypercorn"] = ServerSpec(
    "hypercorn",
    "hypercorn --quic-bind (aioquic) + 3-line ASGI app; only with the h3 scenario's transport",
    _hypercorn,
    command=(
        "python -m hypercorn --workers N --bind 127.0.0.1:PORT --quic-bind 127.0.0.1:PORT "
        "--certfile TMPDIR/cert.pem --keyfile TMPDIR/key.pem bench.asgi_app:app"
    ),
)

# Run only when named (--servers): the access-log and deferred-accept comparisons, not part of
# the default set.
OPT_IN = frozenset(("vrypt-log", "nginx-log", "nginx-deferred", "hypercorn"))


def server_env(extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GUNICORN_CMD_ARGS", "PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def probe(port: int, timeout: float = 1.0, header: bytes = b"") -> bytes | None:
    """Connect, send a GET, and return the response's status line once its head and body
    (Content-Length, else up to the close) have arrived; None on any failure. It does not wait
    for the close, so servers that ignore `Connection: close` are probed too. `header`: sent
    first (a PROXY protocol header)."""
    buf = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(header + PROBE)
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = buf[:head_end].lower()
                    length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                    if length and len(buf) >= head_end + 4 + int(length[1]):
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return None
    return buf.split(b"\r\n", 1)[0] if b"\r\n\r\n" in buf else None


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def sid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_ready(
    server: RunningServer, timeout: float, probe: Callable[[int], bytes | None] = probe
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(
                f"{server.spec.name} failed to start: exited with {server.proc.returncode} "
                "before answering:\n" + server.log_tail()
            )
        try:
            status = probe(server.port)
        except ServerError as exc:  # answered, but in a protocol waiting will not change
            raise ServerError(
                f"{server.spec.name} failed to start: {exc}\n" + server.log_tail()
            ) from None
        if status is not None:
            if not status.startswith((b"HTTP/1.", b"HTTP/2")) or status.split()[1:2] != [b"200"]:
                raise ServerError(f"{server.spec.name} answered {status!r}, not 200")
            return
        time.sleep(0.05)
    raise ServerError(
        f"{server.spec.name} gave no answer within {timeout} s:\n" + server.log_tail()
    )


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no child is left behind in its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


@contextlib.contextmanager
def running(
    spec: ServerSpec, where: Placement, ready_timeout: float = 20.0, transport: Any = None
) -> Iterator[RunningServer]:
    """Start ``spec`` pinned to ``where.server_cpus``, wait until it answers a GET, and always
    kill its process group when the block ends (error, Ctrl-C or normal exit).

    ``transport`` (bench/transports.py: TLS, HTTP/2) changes the command line and the probe."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-") as tmpdir:
        tmp = Path(tmpdir)
        port = free_port()
        command = (
            transport.build(spec, port, where.workers, tmp)
            if transport is not None
            else spec.build(port, where.workers, tmp)
        )
        argv = ["taskset", "-c", cpu_list(where.server_cpus), *command]
        log = tmp / "server.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=server_env(spec.env),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = RunningServer(spec, proc, port, log)
        try:
            _wait_ready(server, ready_timeout, transport.probe if transport else probe)
            yield server
        finally:
            kill_group(proc)


def describe_command(spec: ServerSpec, workers: int) -> str:
    """The command line as a user would type it, with PORT and TMPDIR placeholders."""
    if spec.command:
        return spec.command
    argv = spec.build(0, workers, Path("TMPDIR"))
    if argv[:3] == [sys.executable, "-m", "gunicorn"]:
        argv = ["gunicorn", *argv[3:]]
    text = argv[2] if argv[:2] == ["sh", "-c"] else shlex.join(argv)
    return text.replace("127.0.0.1:0", "127.0.0.1:PORT")

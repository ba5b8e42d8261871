"""Operators' settings, through real gunicorn processes: the chosen answer (conf file and
environment), bad values refused at start, a quiet default start, one control socket per server,
and $PORT / WEB_CONCURRENCY / VRYPT_* checked like the port argument."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from tests.support import (
    CONF,
    DATE,
    ROOT,
    Server,
    base_env,
    free_port,
    is_vrypt,
    read_responses,
    running,
    start_server,
)
from vrypt_worker import response
from vrypt_worker.answer import DEFAULT, parse_header_lines
from vrypt_worker.settings import SettingError

GUNICORN = [sys.executable, "-m", "gunicorn"]
VRYPT_SERVER = [sys.executable, "-m", "vrypt_worker"]
START_TIMEOUT = 30.0
# Warnings other branches own (tcp_migrate_req, an absent StatsD collector): counted elsewhere.
NOT_OURS = re.compile(r"tcp_migrate_req|statsd")


# --- a strict client ------------------------------------------------------------------------


class Answer:
    def __init__(self, event: h11.Response, body: bytes) -> None:
        self.status = event.status_code
        self.reason = event.reason
        self.headers = [(name.decode(), value.decode()) for name, value in event.headers]
        self.body = body

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def one(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, f"repeated {name}: {self.headers}"
        return values[0] if values else None


def ask(
    server: Server, *methods: str, extra: list[tuple[str, str]] | None = None
) -> tuple[list[Answer], bytes]:
    """One connection, the requests one after the other (keep-alive), each answer read by h11
    (a strict parser: framing, field syntax, no stray byte) and checked for Date and Server.
    Returns the answers and the raw bytes received."""
    raw = b""
    answers = []
    with server.connect(timeout=5) as sock:
        conn = h11.Connection(h11.CLIENT)
        for method in methods:
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            headers = [("Host", "t"), *(extra or [])]
            sock.sendall(conn.send(h11.Request(method=method, target="/x", headers=headers)))
            sock.sendall(conn.send(h11.EndOfMessage()))
            body, response_event = b"", None
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    raw += data
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    response_event = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert response_event is not None
            answer = Answer(response_event, body)
            assert answer.one("server") == "vrypt", answer.headers
            date = answer.one("date")
            assert date is not None and DATE.fullmatch(date.encode()), answer.headers
            answers.append(answer)
    return answers, raw


# --- servers ---------------------------------------------------------------------------------


def gunicorn_cmd(port: int, *args: str, conf: Path | None = CONF) -> list[str]:
    cmd = [*GUNICORN]
    if conf is not None:
        cmd += ["-c", str(conf)]
    return [*cmd, "--bind", f"127.0.0.1:{port}", "--workers", "1", "--no-control-socket", *args]


@contextlib.contextmanager
def serve(*args: str, conf: Path | None = CONF, workers: int = 1, **env: str) -> Iterator[Server]:
    """A server whose answer may be any status (support.wait_ready wants a Content-Length), ready
    once every worker has booted and one answers."""
    port = free_port()
    cmd = gunicorn_cmd(port, *args, conf=conf)
    cmd[cmd.index("--workers") + 1] = str(workers)
    with running(cmd=cmd, port=port, env=base_env(**env), ready=False) as server:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert server.proc.poll() is None, f"exited {server.proc.returncode}:\n{server.log}"
            assert time.monotonic() < deadline, f"not ready:\n{server.log}"
            if len(server.worker_pids()) >= workers:
                try:
                    ask(server, "GET")
                    break
                except OSError:
                    pass
            time.sleep(0.05)
        time.sleep(0.2 if workers > 1 else 0)  # let the other workers bind too
        yield server


def refused(
    cmd: list[str], env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run a start that must fail; bounded in time (a start that does not fail would hang)."""
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=START_TIMEOUT, check=False
    )
    return result


# --- the chosen answer ---------------------------------------------------------------------------


def test_default_answer_bytes_are_unchanged() -> None:
    """The precomputed table of the default answer is byte for byte what it always was."""
    date = b"Tue, 01 Dec 2026 03:00:00 GMT"
    table = response.render(date, DEFAULT)
    head = (
        b"HTTP/1.1 200 OK\r\nServer: vrypt\r\nDate: " + date + b"\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 5\r\n"
    )
    assert table[0] == head + b"\r\nVrypt"
    assert table[1] == head + b"\r\n"
    assert table[2] == head + b"Connection: keep-alive\r\n\r\nVrypt"
    assert table[4] == head + b"Connection: close\r\n\r\nVrypt"


def check_maintenance(server: Server, page: bytes) -> None:
    (get, head, get2), _ = ask(server, "GET", "HEAD", "GET")
    for answer in (get, head, get2):
        assert (answer.status, answer.reason) == (503, b"Service Unavailable")
        assert answer.one("content-type") == "text/html; charset=utf-8"
        assert answer.one("retry-after") == "120"
        assert answer.one("x-canary") == "blue"
        assert answer.one("content-length") == str(len(page))
    assert get.body == get2.body == page
    assert head.body == b""


@pytest.mark.timeout(60)
def test_answer_from_the_environment(tmp_path: Path) -> None:
    page = "<h1>Back soon — maintenance</h1>\n".encode()
    (tmp_path / "maintenance.html").write_bytes(page)
    with serve(
        VRYPT_STATUS="503",
        VRYPT_BODY_FILE=str(tmp_path / "maintenance.html"),
        VRYPT_CONTENT_TYPE="text/html; charset=utf-8",
        VRYPT_HEADERS="Retry-After: 120\nX-Canary: blue\n",
    ) as server:
        check_maintenance(server, page)
        assert "answers 503 Service Unavailable" in server.log


@pytest.mark.timeout(60)
def test_answer_from_the_conf_file(tmp_path: Path) -> None:
    page = b"<h1>maintenance</h1>\n"
    (tmp_path / "maintenance.html").write_bytes(page)
    conf = tmp_path / "maintenance.conf.py"
    conf.write_text(
        "from vrypt_worker.conf import *\n"
        "vrypt_status = 503\n"
        f"vrypt_body_file = {str(tmp_path / 'maintenance.html')!r}\n"
        "vrypt_content_type = 'text/html; charset=utf-8'\n"
        "vrypt_headers = {'Retry-After': '120', 'X-Canary': 'blue'}\n"
    )
    with serve(conf=conf) as server:
        check_maintenance(server, page)


@pytest.mark.timeout(60)
def test_environment_wins_over_the_conf_file(tmp_path: Path) -> None:
    conf = tmp_path / "health.conf.py"
    conf.write_text(
        "from vrypt_worker.conf import *\n"
        "vrypt_status = '404 Not Here'\n"
        "vrypt_body = 'conf body'\n"
        "vrypt_headers = ['X-From: conf']\n"
    )
    with serve(conf=conf, VRYPT_BODY='{"status":"ok"}', VRYPT_CONTENT_TYPE="application/json") as s:
        (answer,), _ = ask(s, "GET")
        assert (answer.status, answer.reason) == (404, b"Not Here")
        assert answer.body == b'{"status":"ok"}'
        assert answer.one("content-type") == "application/json"
        assert answer.values("x-from") == ["conf"]


@pytest.mark.timeout(60)
def test_drop_in_worker_class_takes_the_answer_from_its_own_conf_and_the_environment(
    tmp_path: Path,
) -> None:
    """`-k vrypt_worker.VryptWorker` with a conf of one's own that does not import the package's,
    and the default backend answer (404) from the environment alone."""
    conf = tmp_path / "own.conf.py"
    conf.write_text(
        "wsgi_app = 'vrypt_worker.wsgi:application'\n"
        "vrypt_body = 'default backend - 404\\n'\n"
        "vrypt_headers = 'X-Canary: green'\n"
    )
    with serve("-k", "vrypt_worker.VryptWorker", conf=conf, VRYPT_STATUS="404") as server:
        (answer, head), _ = ask(server, "GET", "HEAD")
        assert answer.status == head.status == 404
        assert answer.body == b"default backend - 404\n" and head.body == b""
        assert answer.one("content-type") == "text/plain"
        assert answer.one("x-canary") == "green"
        assert "never imported" not in server.log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [204, 304])
def test_no_content_answers_have_no_body_and_no_length(status: int) -> None:
    with serve(VRYPT_STATUS=str(status), VRYPT_HEADERS="Cache-Control: no-store") as server:
        answers, raw = ask(server, "GET", "HEAD", "POST", "GET")
        assert [a.status for a in answers] == [status] * 4
        assert all(a.body == b"" for a in answers)
        assert b"Content-Length" not in raw and b"Content-Type" not in raw
        assert raw.count(b"Cache-Control: no-store\r\n") == 4
        # Nothing after each head: the next answer starts right after the blank line.
        assert raw.count(b"\r\n\r\nHTTP/1.1 ") == 3 and raw.endswith(b"\r\n\r\n")


@pytest.mark.timeout(60)
def test_reset_content_is_framed_with_a_zero_length() -> None:
    with serve(VRYPT_STATUS="205") as server:
        answers, raw = ask(server, "GET", "HEAD", "GET")
        assert [(a.status, a.body, a.one("content-length")) for a in answers] == [
            (205, b"", "0")
        ] * 3
        assert b"Content-Type" not in raw


@pytest.mark.timeout(60)
def test_chosen_answer_closes_and_keeps_alive_like_the_default() -> None:
    with serve(VRYPT_STATUS="201", VRYPT_BODY="made") as server:
        with server.connect() as sock:
            sock.sendall(
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        answers = data.split(b"HTTP/1.1 201 Created\r\n")[1:]
        assert len(answers) == 3, data
        assert b"Connection: keep-alive\r\n" in answers[0]
        assert b"Connection" not in answers[1]
        assert b"Connection: close\r\n" in answers[2]
        assert all(b"Content-Length: 4\r\n" in a for a in answers)
        assert all(a.endswith(b"\r\n\r\nmade") for a in answers)


@pytest.mark.timeout(60)
def test_error_answers_stay_the_servers_own() -> None:
    with serve(VRYPT_STATUS="503", VRYPT_BODY="down", VRYPT_HEADERS="X-Canary: on") as server:
        with server.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert data.endswith(b"\r\n\r\nBad Request\n") and b"X-Canary" not in data


# --- bad values stop the start -------------------------------------------------------------------


BAD_ANSWER_ENV = [
    ("VRYPT_STATUS", "199", "outside 200-599"),
    ("VRYPT_STATUS", "600", "outside 200-599"),
    ("VRYPT_STATUS", "ok", "status code"),
    ("VRYPT_HEADERS", "X-Fine: 1\nno colon here", "line 2"),
    ("VRYPT_HEADERS", "Bad Name: x", "not a field line"),
    ("VRYPT_HEADERS", "X-Bell: a\x07b", "visible ASCII"),
    ("VRYPT_HEADERS", "Content-Length: 3", "written by the server"),
    ("VRYPT_CONTENT_TYPE", "text/\x01plain", "not a valid field value"),
    ("VRYPT_BODY_FILE", "/nonexistent/vrypt/page.html", "cannot read"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "value", "why"), BAD_ANSWER_ENV)
def test_bad_answer_variable_stops_the_start(name: str, value: str, why: str) -> None:
    for cmd in (
        gunicorn_cmd(free_port()),
        gunicorn_cmd(free_port(), "-k", "vrypt_worker.VryptWorker", "x:y", conf=None),
    ):
        result = refused(cmd, base_env(**{name: value}))
        assert result.returncode == 2, result.stderr
        assert f"${name}" in result.stderr and why in result.stderr, result.stderr
        assert "Booting worker" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_a_bad_answer_is_refused_before_anything_binds(tmp_path: Path) -> None:
    # Issue 22: the original logged `Listening at:` (and bound the port) before the refusal, so
    # at a glance the server seemed to have started. Env and conf file, conf and bare drop-in.
    conf = tmp_path / "bad.conf.py"
    conf.write_text("from vrypt_worker.conf import *\nvrypt_status = 99\n")
    for cmd, env, name in (
        (gunicorn_cmd(free_port()), base_env(VRYPT_STATUS="ok"), "$VRYPT_STATUS"),
        (
            gunicorn_cmd(free_port(), "-k", "vrypt_worker.VryptWorker", "x:y", conf=None),
            base_env(VRYPT_HEADERS="X-A: 1\rX-B: 2"),
            "$VRYPT_HEADERS",
        ),
        (gunicorn_cmd(free_port(), conf=conf), base_env(), "vrypt_status"),
        ([*VRYPT_SERVER, str(free_port())], base_env(VRYPT_BODY_FILE="/nonexistent"), "$VRYPT"),
    ):
        result = refused(cmd, env)
        assert result.returncode == 2, result.stderr
        assert f"cannot start: {name}" in result.stderr, result.stderr
        assert "Listening at" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("X-A: 1\rX-B: 2", "line 1 'X-A: 1\\rX-B: 2': a bare CR (\\r) inside the value is invalid"),
        ("X-A: 1\x0bX-B: 2", "a vertical tab (\\x0b) inside the value is invalid"),
        ("X-A: 1\x0cX-B: 2", "a form feed (\\x0c) inside the value is invalid"),
        ("X-A: 1\x85X-B: 2", "U+0085 (NEL, next line) inside the value is invalid"),
        ("X-A: 1\u2028X-B: 2", "U+2028 (line separator) inside the value is invalid"),
        ("X-A: 1\nX\x0bB: 2", "line 2 'X\\x0bB: 2' is not a field line `Name: value`: a vertical"),
    ],
)
def test_header_lines_split_on_line_ends_only_and_say_what_is_wrong(value: str, said: str) -> None:
    # Issue 22: str.splitlines made `b` of "X-A: a\rb" a line of its own ("line 2 'b' is not a
    # field line"); only LF and CRLF end a line, and the character at fault is named.
    with pytest.raises(SettingError) as caught:
        parse_header_lines("$VRYPT_HEADERS", value)
    assert said in str(caught.value), str(caught.value)


def test_header_lines_end_at_lf_and_crlf() -> None:
    lines = parse_header_lines("$VRYPT_HEADERS", "X-A: 1\r\nX-B: 2\nX-C: 3\r\n\n")
    assert lines == (b"X-A: 1", b"X-B: 2", b"X-C: 3")


BAD_ANSWER_CONF = [
    ("vrypt_status = 99", "vrypt_status", "outside 200-599"),
    ("vrypt_headers = ['X-Ok: 1', 'X-Bad: 1\\r\\nInjected: 1']", "vrypt_headers", "visible ASCII"),
    ("vrypt_body_file = 'no-such-file.html'", "vrypt_body_file", "cannot read"),
    ("vrypt_body = 'x'\nvrypt_body_file = 'page.html'", "vrypt_body_file", "choose one"),
    ("vrypt_status = 204\nvrypt_body = 'x'", "vrypt_body", "has no body"),
    ("vrypt_content_type = 3", "vrypt_content_type", "expected text"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("lines", "name", "why"), BAD_ANSWER_CONF)
def test_bad_answer_conf_variable_stops_the_start(
    tmp_path: Path, lines: str, name: str, why: str
) -> None:
    conf = tmp_path / "bad.conf.py"
    conf.write_text(f"from vrypt_worker.conf import *\n{lines}\n")
    result = refused(gunicorn_cmd(free_port(), conf=conf), base_env(), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"cannot start: {name}: " in result.stderr and why in result.stderr, result.stderr


BAD_ENV = [
    ("PORT", "99999", "port out of range 1-65535"),
    ("PORT", "abc", "not a port number"),
    ("WEB_CONCURRENCY", "0", "at least 1"),
    ("VRYPT_REUSE_PORT", "maybe", "expected 1/0"),
    ("VRYPT_DEFER_ACCEPT", "later", "expected 1/0"),
    ("VRYPT_HEAD_TIMEOUT", "soon", "whole number of seconds"),
    ("VRYPT_BODY_TIMEOUT", "0", "whole number of seconds"),
    ("VRYPT_SEND_TIMEOUT", "later", "whole number of seconds"),
    ("VRYPT_HEAD_BUFFER", "-5", "whole number of bytes"),
    ("VRYPT_STATSD_INTERVAL", "0", "between 0.05 and 3600"),
    ("VRYPT_STATSD_HOST", "host:port:x", "host:port"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "value", "why"), BAD_ENV)
def test_bad_environment_variable_exits_2_naming_it(name: str, value: str, why: str) -> None:
    env = base_env(**{name: value})
    for cmd in (VRYPT_SERVER, gunicorn_cmd(free_port())):
        result = refused(cmd, env)
        assert result.returncode == 2, (cmd, result.stderr)
        assert f"${name}={value!r}" in result.stderr and why in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_bad_web_concurrency_is_refused_by_vrypt_server_before_gunicorn_reads_it() -> None:
    """gunicorn itself calls int($WEB_CONCURRENCY) as it is imported (a traceback, exit 1, before
    any conf file is read); vrypt-server checks it first."""
    result = refused(VRYPT_SERVER, base_env(WEB_CONCURRENCY="four"))
    assert result.returncode == 2, result.stderr
    assert "$WEB_CONCURRENCY='four': not a whole number" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_argument_and_port_variable_are_refused_alike() -> None:
    by_argument = refused([*VRYPT_SERVER, "99999"], base_env())
    by_variable = refused(VRYPT_SERVER, base_env(PORT="99999"))
    assert by_argument.returncode == by_variable.returncode == 2
    message = "port out of range 1-65535: 99999"
    assert message in by_argument.stderr and message in by_variable.stderr
    by_argument = refused([*VRYPT_SERVER, "abc"], base_env())
    by_variable = refused(VRYPT_SERVER, base_env(PORT="abc"))
    assert "not a port number: 'abc'" in by_argument.stderr
    assert "not a port number: 'abc'" in by_variable.stderr


def test_help_shows_the_port_variable() -> None:
    plain = refused([*VRYPT_SERVER, "--help"], base_env())
    assert plain.returncode == 0 and "default 8080, or $PORT when set" in plain.stdout
    env = base_env(PORT="9000")
    with_port = refused([*VRYPT_SERVER, "--help"], env)
    assert with_port.returncode == 0 and "default: $PORT, now 9000" in with_port.stdout
    assert "default 8080" not in with_port.stdout


def test_help_says_a_bad_port_variable_is_invalid() -> None:
    # Issue 22: the original said "default: $PORT, now abc", a port the start then refused.
    bad = refused([*VRYPT_SERVER, "--help"], base_env(PORT="abc"))
    assert bad.returncode == 0, bad.stderr
    text = " ".join(bad.stdout.split())
    assert "now abc" not in text, text
    assert "the default, $PORT, is invalid: $PORT='abc': not a port number" in text, text


@pytest.mark.timeout(60)
def test_a_port_argument_wins_over_a_bad_port_variable() -> None:
    # Issue 22: the original refused `PORT=abc vrypt-server 9000` although a port was given.
    port = free_port()
    env = base_env(PORT="abc", GUNICORN_CMD_ARGS="--no-control-socket --workers 1")
    server = start_server(cmd=[*VRYPT_SERVER, str(port)], port=port, env=env)
    try:
        with server.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert is_vrypt(read_responses(sock, 1)[0])
        assert "abc" not in server.log, server.log
    finally:
        server.stop()


# --- a quiet, clear first start ------------------------------------------------------------------


def under_nofile(hard: int, cmd: list[str]) -> list[str]:
    """`cmd` with a hard open-file limit of `hard`, as on a machine configured that way."""
    return ["prlimit", f"--nofile={min(hard, 1024)}:{hard}", *cmd]


def warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if "[WARNING]" in line and not NOT_OURS.search(line)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hard", [20_000, 200])
def test_a_default_start_is_quiet_on_a_machine_with_few_descriptors(hard: int) -> None:
    """The README's first command, two workers, a low hard open-file limit: no warning about a
    default the user never chose, no word about an application the user never named."""
    port = free_port()
    cmd = under_nofile(hard, [*GUNICORN, "-c", str(CONF), "--bind", f"127.0.0.1:{port}"])
    cmd += ["--workers", "2", "--no-control-socket"]
    with running(cmd=cmd, port=port, workers=2) as server:
        ask(server, "GET")
        time.sleep(0.5)
        log = server.log
    assert warnings(log) == [], log
    assert "never imported" not in log and "open-file" not in log, log
    assert log.count("Booting worker") == 2


@pytest.mark.timeout(60)
def test_worker_connections_the_machine_cannot_hold_are_reported_once() -> None:
    port = free_port()
    cmd = under_nofile(20_000, [*GUNICORN, "-c", str(CONF), "--bind", f"127.0.0.1:{port}"])
    cmd += ["--workers", "2", "--no-control-socket", "--worker-connections", "50000"]
    with running(cmd=cmd, port=port, workers=2) as server:
        ask(server, "GET")
        log = server.log
    lines = warnings(log)
    assert len(lines) == 1, log
    assert "worker_connections=50000 does not fit the hard open-file limit 20000" in lines[0]


@pytest.mark.timeout(60)
def test_an_application_named_on_the_command_line_is_mentioned_once() -> None:
    with serve("myproject.wsgi:application", workers=2) as server:
        ask(server, "GET")
        assert server.log.count("never imported") == 1
        assert "myproject.wsgi:application" in server.log


# --- one control socket per server ---------------------------------------------------------------


@pytest.fixture
def home() -> Iterator[Path]:
    """A short $HOME: a unix socket path holds at most 107 bytes, pytest's tmp_path is long."""
    with tempfile.TemporaryDirectory(prefix="vh") as path:
        yield Path(path)


def control_env(home: Path) -> dict[str, str]:
    env = base_env(HOME=str(home))
    env.pop("XDG_RUNTIME_DIR", None)  # gunicorn's default is then under $HOME/.gunicorn
    return env


def control_socket(server: Server) -> Path:
    return Path(server.wait_for_log(r"Control socket listening at (\S+)").group(1))


@pytest.mark.timeout(90)
def test_two_servers_have_two_control_sockets(home: Path) -> None:
    env = control_env(home)
    port_a, port_b = free_port(), free_port()
    cmd_a = [*GUNICORN, "-c", str(CONF), "--bind", f"127.0.0.1:{port_a}", "-w", "1"]
    # vrypt-server, moved to 127.0.0.1 through GUNICORN_CMD_ARGS as an operator would.
    env_b = {**env, "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port_b} -w 1"}
    with (
        running(cmd=cmd_a, port=port_a, env=env) as a,
        running(cmd=VRYPT_SERVER, port=port_b, env=env_b) as b,
    ):
        path_a, path_b = control_socket(a), control_socket(b)
        assert path_a != path_b
        assert path_a.name == f"vrypt-127.0.0.1-{port_a}.ctl"
        assert path_b.name == f"vrypt-127.0.0.1-{port_b}.ctl"
        assert path_a.parent == path_b.parent == home / ".gunicorn"
        assert path_a.is_socket() and path_b.is_socket()
        a.signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0
        assert not path_a.exists() and path_b.is_socket()
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(5)
            probe.connect(str(path_b))  # still b's, still answering


@pytest.mark.timeout(90)
def test_a_chosen_control_socket_is_kept_and_a_live_one_never_taken(home: Path) -> None:
    env = control_env(home)
    chosen = home / "mine.ctl"
    port = free_port()
    cmd = [*GUNICORN, "-c", str(CONF), "--bind", f"127.0.0.1:{port}", "-w", "1"]
    with running(cmd=[*cmd, "--control-socket", str(chosen)], port=port, env=env) as server:
        assert control_socket(server) == chosen
    # A second server on the same port fails to start (tests/test_replacement.py) and leaves
    # the first one's control socket where it is.
    with running(cmd=cmd, port=port, env=env) as first:
        first_path = control_socket(first)
        second = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert second.returncode != 0, second.stdout + second.stderr
        assert first_path.is_socket()


# --- metrics ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_metrics_count_a_chosen_answer_as_they_count_the_default() -> None:
    """vrypt.rps adds up to the answers given, a 400 included, and bad_requests to the 400."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as statsd:
        statsd.bind(("127.0.0.1", 0))
        statsd.settimeout(0.1)
        host = f"127.0.0.1:{statsd.getsockname()[1]}"
        env = {"VRYPT_STATSD_HOST": host, "VRYPT_STATSD_INTERVAL": "0.2"}
        with serve(VRYPT_STATUS="404", VRYPT_BODY="nope", **env) as server:
            answers, _ = ask(server, "GET", "HEAD", "POST")  # + 1 readiness request
            with server.connect() as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 5)
                data = b""
                while data.count(b"nope") < 5:
                    data += sock.recv(65536)
                sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
                while b"400 Bad Request" not in data:
                    data += sock.recv(65536)
            assert [a.status for a in answers] == [404] * 3
            lines: list[str] = []
            deadline = time.monotonic() + 10
            # 10 answers: the readiness GET, GET HEAD POST, five pipelined GETs and the 400.
            expected = {"vrypt.rps": 10, "gunicorn.requests": 10, "vrypt.bad_requests": 1}
            totals: dict[str, int] = {}
            while time.monotonic() < deadline:
                try:
                    lines += statsd.recv(65535).decode().splitlines()
                except TimeoutError:
                    pass
                totals = {
                    name: sum(
                        int(m.group(1))
                        for line in lines
                        if (m := re.fullmatch(rf"{re.escape(name)}:(\d+)\|[gc]", line))
                    )
                    for name in expected
                }
                if totals == expected:
                    break
            assert totals == expected, lines


# --- HUP -----------------------------------------------------------------------------------------


def status_of_new_connection(server: Server) -> int:
    (answer,), _ = ask(server, "GET")
    return answer.status


def hup_and_wait_for_new_workers(server: Server, workers: int, timeout: float = 15.0) -> None:
    """HUP, then until every old worker is gone (with reuse_port an old one keeps accepting for
    a moment after the new ones bound) and the new ones are listening."""
    before = set(server.worker_pids())
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while set(server.worker_pids()) & before or len(server.worker_pids()) < workers:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.1)
    time.sleep(0.3)


@pytest.mark.timeout(90)
def test_hup_switches_to_the_answer_of_the_edited_conf_and_keeps_it_on_a_bad_value(
    tmp_path: Path,
) -> None:
    page = tmp_path / "maintenance.html"
    page.write_text("<h1>maintenance</h1>\n")
    conf = tmp_path / "live.conf.py"
    conf.write_text("from vrypt_worker.conf import *\n")
    with serve(conf=conf, workers=2) as server:
        assert status_of_new_connection(server) == 200
        conf.write_text(
            "from vrypt_worker.conf import *\n"
            "vrypt_status = 503\n"
            f"vrypt_body_file = {str(page)!r}\n"
            "vrypt_headers = 'Retry-After: 120'\n"
        )
        hup_and_wait_for_new_workers(server, 2)
        server.wait_for_log("now answers 503 Service Unavailable")
        assert {status_of_new_connection(server) for _ in range(10)} == {503}
        (answer,), _ = ask(server, "GET")
        assert answer.body == page.read_bytes() and answer.one("retry-after") == "120"
        assert answer.one("content-type") == "text/html"
        conf.write_text("from vrypt_worker.conf import *\nvrypt_status = 700\n")
        hup_and_wait_for_new_workers(server, 2)
        server.wait_for_log("keeps its answer, the reloaded settings are bad: vrypt_status")
        assert {status_of_new_connection(server) for _ in range(10)} == {503}
        assert server.proc.poll() is None

"""Real gunicorn processes and real sockets for the tests: starting, talking, reading answers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "gunicorn.conf.py"
# A stopping server's listeners close for good: a connection whose handshake completes in the
# microseconds between a worker's last accept and its listener's close is reset by the kernel
# (every worker is leaving, nothing can take it over). Seen once in ~13,000 connections in a CI
# run (docs/reliability.md); the stop tests allow this many, and fail on anything more.
RESET_AT_STOP = 2
DATE = re.compile(rb"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")


def free_port() -> int:
    """A port nobody listens on right now (the workers bind it themselves with reuse_port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GUNICORN_CMD_ARGS", None)
    env["VRYPT_STATSD_HOST"] = ""  # no collector unless a test brings one
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Server:
    """A gunicorn master with its workers, in its own process group, logging to a file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    _log: object = field(default=None, repr=False)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return sorted(int(pid) for pid in out.split())

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log)
            if match:
                return match
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the log within {timeout}s:\n{self.log}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        # The whole process group, even when the arbiter is gone: a USR2 upgrade's new arbiter
        # and its workers outlive the one this test started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)


def start_server(
    *args: str,
    conf: bool = True,
    workers: int = 1,
    env: dict[str, str] | None = None,
    port: int | None = None,
    ready: bool = True,
    cmd: list[str] | None = None,
) -> Server:
    port = port or free_port()
    log = Path(tempfile.mkstemp(prefix="vrypt-test-", suffix=".log")[1])
    if cmd is None:
        cmd = [sys.executable, "-m", "gunicorn"]
        if conf:
            cmd += ["-c", str(CONF)]
        cmd += [
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--no-control-socket",
            *args,
        ]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or base_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, port, log)
    if ready:
        try:
            wait_ready(server, workers)
        except BaseException:
            server.stop()
            raise
    return server


def wait_ready(server: Server, workers: int = 1, timeout: float = 20.0) -> None:
    """Until every worker answers: with reuse_port each binds its own listener after booting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.proc.returncode}:\n{server.log}")
        if len(server.worker_pids()) >= workers:
            try:
                with server.connect(timeout=1) as sock:
                    sock.sendall(b"GET /ready HTTP/1.1\r\n\r\n")
                    if refused_as_h2(sock) or read_responses(sock, 1):
                        time.sleep(0.2 if workers > 1 else 0)  # let the others finish binding
                        return
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"server not ready within {timeout}s:\n{server.log}")


def refused_as_h2(sock: socket.socket) -> bool:
    """A prior-knowledge-only h2c port answers HTTP/1 with HTTP/2 frames (a SETTINGS frame
    first, then GOAWAY): the worker is up, though the readiness probe gets no HTTP/1 answer."""
    first = sock.recv(9, socket.MSG_PEEK | socket.MSG_WAITALL)
    return len(first) == 9 and first[3] == 4 and first[5:9] == b"\0\0\0\0"  # SETTINGS, stream 0


@contextlib.contextmanager
def running(*args: str, **kwargs: object) -> Iterator[Server]:
    server = start_server(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"repeated {name!r}: {self.headers}"
        return values[0] if values else None


class StrictReader:
    """A strict HTTP/1.1 response parser over a socket: CRLF only, well-formed fields,
    Content-Length framing, and no byte left over that is not a response."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read(self, head_request: bool = False) -> Response | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                assert not self.buf, f"truncated response head: {self.buf!r}"
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.1 (\d{3}) ([\x20-\x7e]*)", lines[0])
        assert match, f"bad status line {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            field_match = re.fullmatch(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ([\x21-\x7e ]*)", line)
            assert field_match, f"bad field line {line!r}"
            headers.append((field_match.group(1), field_match.group(2)))
        response = Response(int(match.group(1)), match.group(2), headers, b"")
        if response.status == 100:
            assert not headers, headers
            return response
        length = response.header(b"Content-Length")
        assert length is not None and length.isdigit(), f"no Content-Length: {headers}"
        date = response.header(b"Date")
        assert date is not None and DATE.fullmatch(date), f"bad Date {date!r}"
        if not head_request:
            while len(self.buf) < int(length):
                assert self._fill(), f"truncated body: {self.buf!r}"
            response.body, self.buf = self.buf[: int(length)], self.buf[int(length) :]
        return response

    def at_eof(self, timeout: float = 3.0) -> bool:
        """True when the server closed the connection with nothing more to read."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except TimeoutError:
            assert not self.buf, f"bytes that are no answer: {self.buf!r}"
            return False
        assert not self.buf, f"bytes that are no answer: {self.buf!r}"
        return True

    def read_many(
        self, count: int, heads: set[int] | frozenset[int] = frozenset()
    ) -> list[Response]:
        """Up to `count` final answers, 1xx skipped; indexes in `heads` answered a HEAD."""
        responses: list[Response] = []
        while len(responses) < count:
            response = self.read(head_request=len(responses) in heads)
            if response is None:
                break
            if response.status != 100:
                responses.append(response)
        return responses


def read_responses(
    sock: socket.socket, count: int, heads: set[int] | frozenset[int] = frozenset()
) -> list[Response]:
    """Read `count` responses (indexes in `heads` answered a HEAD and carry no body)."""
    return StrictReader(sock).read_many(count, heads)


def exchange(
    server: Server, payload: bytes, count: int, heads: frozenset[int] = frozenset()
) -> tuple[list[Response], bool]:
    """Send raw bytes, read `count` answers, and say whether the server then closed."""
    with server.connect() as sock:
        sock.sendall(payload)
        reader = StrictReader(sock)
        responses = reader.read_many(count, heads)
        return responses, reader.at_eof(timeout=0.5)


def is_vrypt(response: Response, head: bool = False) -> bool:
    return (
        response.status == 200
        and response.header(b"Content-Type") == b"text/plain"
        and response.header(b"Content-Length") == b"5"
        and response.header(b"Server") == b"vrypt"
        and response.body == (b"" if head else b"Vrypt")
    )

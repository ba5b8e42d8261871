"""gunicorn's access log with VryptWorker: real servers, real log files and stdout, parsed back."""

from __future__ import annotations

import ast
import base64
import inspect
import os
import random
import re
import signal
import socket
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fuzz_corpus
from tests.support import StrictReader, base_env, read_responses, running
from vrypt_worker.access_log import LoggingConnection, LoggingFramer, LoggingH1Protocol, escape
from vrypt_worker.framing import FramingRules, RequestFramer
from vrypt_worker.h1_protocol import H1Protocol
from vrypt_worker.worker import Connection

pytestmark = pytest.mark.timeout(60)

# gunicorn's default access_log_format: the `combined` format.
COMBINED = re.compile(
    r'(?P<h>\S+) - (?P<u>\S+) \[(?P<t>[^\]]+)\] "(?P<r>(?:[^"\\]|\\.)*)" (?P<s>\d{3}) (?P<b>\S+) '
    r'"(?P<f>(?:[^"\\]|\\.)*)" "(?P<a>(?:[^"\\]|\\.)*)"'
)


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vrypt-access-") as path:
        yield Path(path)


def lines_of(path: Path, count: int, timeout: float = 10.0, pattern: str = "") -> list[str]:
    """The first `count` lines of `path` (matching `pattern`), once they are there."""
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            text = ""
        # Not the readiness probe's request (tests.support.wait_ready).
        found = [
            line for line in text.splitlines() if "/ready" not in line and re.search(pattern, line)
        ]
        if len(found) >= count:
            return found[:count]
        time.sleep(0.05)
    raise AssertionError(f"{count} lines not in {path.name} within {timeout}s: {found}")


def send(port: int, payload: bytes, answers: int, heads: frozenset[int] = frozenset()) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        got = StrictReader(sock).read_many(answers, heads)
        assert len(got) == answers, got


def test_off_by_default(tmp: Path) -> None:
    with running() as server:
        send(server.port, b"GET /not-logged HTTP/1.1\r\n\r\n" * 3, 3)
        time.sleep(0.5)
        assert "/not-logged" not in server.log
        assert "access log" not in server.log  # the old "writes no access log" warning is gone


def test_stdout_combined_format() -> None:
    with running("--access-logfile", "-") as server:
        send(server.port, b"GET /out?x=1 HTTP/1.1\r\nUser-Agent: probe/1\r\n\r\n", 1)
        line = server.wait_for_log(r".*GET /out\?x=1.*").group(0)
    match = COMBINED.fullmatch(line)
    assert match, line
    assert match["h"] == "127.0.0.1" and match["r"] == "GET /out?x=1 HTTP/1.1"
    assert (match["s"], match["b"], match["f"], match["a"]) == ("200", "5", "-", "probe/1")
    time.strptime(match["t"], "%d/%b/%Y:%H:%M:%S %z")


ATOMS = [
    "h",
    "l",
    "u",
    "t",
    "r",
    "m",
    "U",
    "q",
    "H",
    "s",
    "B",
    "b",
    "f",
    "a",
    "T",
    "D",
    "M",
    "L",
    "p",
]
EXTRA = [
    "{x-test}i",
    "{X-Missing}i",
    "{content-type}o",
    "{date}o",
    "{server}o",
    "{remote_port}e",
    "{path_info}e",
    "{http_x_test}e",
]


def test_every_atom(tmp: Path) -> None:
    log = tmp / "access.log"
    fmt = "|".join(f"%({atom})s" for atom in ATOMS + EXTRA)
    auth = base64.b64encode(b"alice:secret").decode()
    request = (
        "GET /a%20b/c?k=v&z=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + auth + "\r\n"
        "Referer: http://ref/\r\nUser-Agent: agent/2\r\nX-Test:  spaced value \r\n\r\n"
        "HEAD /h HTTP/1.0\r\n\r\n"
    ).encode()
    with running("--access-logfile", str(log), "--access-logformat", fmt) as server:
        with server.connect() as sock:
            sock.sendall(request)
            assert len(read_responses(sock, 2, heads=frozenset({1}))) == 2
            port = sock.getsockname()[1]
        worker = server.worker_pids()[0]
        first, second = lines_of(log, 2, pattern=r"\|/(a|h)")
    fields = dict(zip(ATOMS + EXTRA, first.split("|"), strict=True))
    assert fields["h"] == "127.0.0.1" and fields["l"] == "-" and fields["u"] == "alice"
    assert re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", fields["t"])
    assert fields["r"] == "GET /a%20b/c?k=v&z=1 HTTP/1.1"
    assert (fields["m"], fields["U"], fields["q"], fields["H"]) == (
        "GET", "/a b/c", "k=v&z=1", "HTTP/1.1"
    )  # fmt: skip
    assert (fields["s"], fields["B"], fields["b"]) == ("200", "5", "5")
    assert (fields["f"], fields["a"]) == ("http://ref/", "agent/2")
    assert fields["T"] == "0" and fields["D"].isdigit() and fields["M"].isdigit()
    assert re.fullmatch(r"0\.\d{6}", fields["L"])
    assert int(fields["D"]) < 1_000_000 and int(fields["M"]) == int(fields["D"]) // 1000
    assert fields["p"] == f"<{worker}>"
    assert fields["{x-test}i"] == "spaced value" and fields["{X-Missing}i"] == "-"
    assert fields["{content-type}o"] == "text/plain" and fields["{server}o"] == "vrypt"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", fields["{date}o"])
    assert fields["{remote_port}e"] == str(port)
    assert fields["{path_info}e"] == "/a b/c" and fields["{http_x_test}e"] == "spaced value"
    head = dict(zip(ATOMS + EXTRA, second.split("|"), strict=True))
    assert (head["r"], head["m"], head["H"], head["s"], head["b"]) == (
        "HEAD /h HTTP/1.0", "HEAD", "HTTP/1.0", "200", "0"
    )  # fmt: skip
    assert head["u"] == "-" and head["f"] == "-" and head["q"] == ""


def test_hostile_bytes_are_escaped(tmp: Path) -> None:
    log = tmp / "access.log"
    with running("--access-logfile", str(log)) as server:
        # Valid requests carrying quotes, backslashes and non-ASCII where the grammar allows them.
        send(
            server.port,
            b'GET /q"uo\\te\xe9 HTTP/1.1\r\nUser-Agent: a" "forged\xff\r\nReferer: x\\" y\r\n\r\n',
            1,
        )
        # Malformed: a bare CR, a bare LF and a NEL inside the request line (answered 400).
        for line in (b"GET /a\rb HTTP/1.1", b"GET /x\n1.2.3.4 - - [x] HTTP/1.1", b"GET /\x85"):
            with server.connect() as sock:
                sock.sendall(line + b"\r\n\r\n")
                answers = StrictReader(sock).read_many(1)
                assert answers[0].status == 400
        got = lines_of(log, 4)
    raw = log.read_bytes()
    assert raw.count(b"\n") == 5 and all(0x20 <= c < 0x7F or c == 0x0A for c in raw), raw
    for line in got:
        assert COMBINED.fullmatch(line), line
    first = COMBINED.fullmatch(got[0])
    assert first is not None
    assert first["r"] == 'GET /q\\"uo\\\\te\\xE9 HTTP/1.1'
    assert first["a"] == 'a\\" \\"forged\\xFF' and first["f"] == 'x\\\\\\" y'
    assert [COMBINED.fullmatch(line)["s"] for line in got[1:]] == ["400"] * 3  # type: ignore[index]
    assert "\\x0D" in got[1] and "\\x0A1.2.3.4" in got[2] and "\\x85" in got[3]
    assert escape(b'\r\n"\\\x00\x7f\x80') == '\\x0D\\x0A\\"\\\\\\x00\\x7F\\x80'


def test_errors_and_pipelined_requests_in_order(tmp: Path) -> None:
    log = tmp / "access.log"
    fmt = "%(r)s|%(s)s|%(b)s"
    env = base_env(VRYPT_HEAD_TIMEOUT="1")
    with running("--access-logfile", str(log), "--access-logformat", fmt, env=env) as server:
        pipeline = (
            b"GET /1 HTTP/1.1\r\n\r\n"
            b"GET /2 HTTP/1.1\r\n\r\n"
            b"HEAD /3 HTTP/1.1\r\n\r\n"
            b"POST /4 HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nbody"
            b"PUT /5 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"GET /1 HTTP/1.1\r\n\r\n"
            b"GET /6 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        with server.connect() as sock:
            sock.sendall(pipeline)
            answers = StrictReader(sock).read_many(7, heads=frozenset({2}))
        assert [a.status for a in answers] == [200] * 6 + [400]
        with server.connect() as sock:  # the worker's own 408: a head that never ends
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            assert StrictReader(sock).read_many(1)[0].status == 408
        with server.connect() as sock:  # 505 and 414
            sock.sendall(b"GET / HTTP/2.0\r\n\r\n")
            assert StrictReader(sock).read_many(1)[0].status == 505
        with server.connect() as sock:
            sock.sendall(b"GET /" + b"x" * 5000 + b" HTTP/1.1\r\n\r\n")
            assert StrictReader(sock).read_many(1)[0].status == 414
        got = lines_of(log, 10)
    assert got[:8] == [
        "GET /1 HTTP/1.1|200|5",
        "GET /2 HTTP/1.1|200|5",
        "HEAD /3 HTTP/1.1|200|0",
        "POST /4 HTTP/1.1|200|5",
        "PUT /5 HTTP/1.1|200|5",
        "GET /1 HTTP/1.1|200|5",
        "GET /6 HTTP/1.1|400|12",
        "GET /slow HTTP/1.1|408|16",
    ]
    assert got[8] == "GET / HTTP/2.0|505|27"
    assert got[9].startswith("GET /xxxx") and got[9].endswith("|414|13")


def test_many_pipelined_requests_all_logged(tmp: Path) -> None:
    log = tmp / "access.log"
    with running("--access-logfile", str(log), "--access-logformat", "%(U)s %(s)s") as server:
        payload = b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(500))
        send(server.port, payload, 500)
        got = lines_of(log, 500)
    assert got == [f"/{i} 200" for i in range(500)]


def test_pipelined_copies_of_the_last_head_are_each_logged(tmp: Path) -> None:
    """A read that is the head answered last several times over skips the framer: each of its
    answers still gets its line."""
    log = tmp / "access.log"
    head = b"GET /same HTTP/1.1\r\nHost: t\r\n\r\n"
    with running("--access-logfile", str(log), "--access-logformat", "%(U)s %(s)s") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            reader = StrictReader(sock)
            for count in (1, 1, 16):  # the second is the hot path's: the head answered last
                sock.sendall(head * count)
                assert len(reader.read_many(count)) == count
        got = lines_of(log, 18)
    assert got == ["/same 200"] * 18


def test_usr1_reopens_after_rename(tmp: Path) -> None:
    log = tmp / "access.log"
    with running("--access-logfile", str(log), "--access-logformat", "%(U)s") as server:
        send(server.port, b"GET /before HTTP/1.1\r\n\r\n", 1)
        assert lines_of(log, 1) == ["/before"]
        rotated = tmp / "access.log.1"
        log.rename(rotated)
        server.signal(signal.SIGUSR1)  # the arbiter reopens its files and signals the workers
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the worker reopens on its own USR1, just after the arbiter
        send(server.port, b"GET /after HTTP/1.1\r\n\r\n", 1)
        assert lines_of(log, 1) == ["/after"]
    assert rotated.read_text().splitlines() == ["/ready", "/before"]


def test_logconfig_dict_routes_the_access_log(tmp: Path) -> None:
    log = tmp / "routed.log"
    conf = tmp / "conf.py"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": "INFO", "handlers": []},
        "formatters": {"tagged": {"format": "ACCESS %(message)s"}},
        "handlers": {
            "routed": {"class": "logging.FileHandler", "filename": str(log), "formatter": "tagged"}
        },
        "loggers": {
            "gunicorn.access": {"level": "INFO", "handlers": ["routed"], "propagate": False}
        },
    }
    conf.write_text(
        "from vrypt_worker.conf import *  # noqa: F403\n"
        f"logconfig_dict = {config!r}\n"
        "access_log_format = '%(m)s %(U)s %(s)s'\n"
    )
    with running("-c", str(conf), conf=False) as server:
        send(server.port, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n", 2)
        # One record per line: the routed handler's formatter tags every line.
        assert lines_of(log, 2) == ["ACCESS GET /a 200", "ACCESS GET /b 200"]
        assert "GET /a 200" not in server.log


def test_logging_framer_agrees_with_the_framer() -> None:
    """LoggingFramer.feed is a copy of RequestFramer.feed: same answers, same state, on the fuzz
    corpus cut at random points, and one head per answer."""
    rng = random.Random(12)
    for _ in range(3000):
        data, pieces = fuzz_corpus.generate(rng)
        plain_rules, logged_rules = FramingRules(), FramingRules()
        plain, logged = RequestFramer(plain_rules), LoggingFramer(logged_rules, [])
        for piece in pieces:
            want = list(plain.feed(piece))
            got = list(logged.feed(piece))
            assert got == want, (data, pieces)
            assert len(logged.heads) == len(got)
            for kind, head in zip(got, logged.heads, strict=True):
                assert (head is None) == (kind == 12), (kind, head)
            for slot in set(RequestFramer.__slots__) - {"_rules"}:  # every state the framer has
                assert getattr(plain, slot) == getattr(logged, slot), slot
        assert (plain_rules.answered, plain_rules.rejected) == (
            logged_rules.answered, logged_rules.rejected
        )  # fmt: skip


def test_answers_not_delayed_when_the_log_is_a_pipe_nobody_reads(tmp: Path) -> None:
    """A log output that blocks stalls the writer thread, never the hub: answers keep coming."""
    fifo = tmp / "blocked"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)  # opened but never read: its writer blocks when full
    try:
        with running("--access-logfile", str(fifo)) as server:
            started = time.monotonic()
            long_agent = b"User-Agent: " + b"a" * 4000 + b"\r\n"
            for _ in range(20):  # well past the pipe's 64 KiB
                send(server.port, (b"GET / HTTP/1.1\r\n" + long_agent + b"\r\n") * 50, 50)
            assert time.monotonic() - started < 10
    finally:
        os.close(holder)


def test_two_workers_on_a_stdout_pipe_never_mix_lines() -> None:
    """`-` with several workers: their records share one pipe, each written whole."""
    with running("--access-logfile", "-", workers=2) as server:
        agent = b"User-Agent: " + b"w" * 300 + b"\r\n"
        payload = b"".join(b"GET /p%d HTTP/1.1\r\n%s\r\n" % (i, agent) for i in range(200))
        for _ in range(10):
            send(server.port, payload, 200)
        deadline = time.monotonic() + 10
        while server.log.count('"GET /p') < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [line for line in server.log.splitlines() if "/p" in line and "GET" in line]
    assert len(lines) == 2000
    assert all(COMBINED.fullmatch(line) for line in lines)


def test_a_format_that_cannot_be_rendered_turns_the_log_off_once() -> None:
    with running("--access-logfile", "-", "--access-logformat", "%(s)d %(r)s") as server:
        send(server.port, b"GET /x HTTP/1.1\r\n\r\n" * 3, 3)
        server.wait_for_log(r"access log off: access_log_format")
        assert server.log.count("access log off") == 1


def _code_without_log_lines(function: object) -> str:
    """A function's code with the lines marked `# log` removed, comments and docstring gone
    (tests/test_h2_access_log.py's check of LoggingH2Protocol's copy)."""
    source = textwrap.dedent(inspect.getsource(function))  # type: ignore[arg-type]
    kept = "\n".join(line for line in source.splitlines() if not line.endswith("# log"))
    node = ast.parse(kept).body[0]
    assert isinstance(node, ast.FunctionDef)
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return "\n".join(ast.unparse(statement) for statement in body)


def test_the_logging_classes_override_only_the_seam() -> None:
    """The access log reaches the HTTP/1 paths through a few overrides that call the originals;
    the one copied code is LoggingConnection.on_readable's keep-alive branch (its docstring and
    docs/performance.md say why). A hot method copied again shows up here first."""

    def overridden(cls: type, base: type) -> set[str]:
        return {
            name
            for name, value in vars(cls).items()
            if callable(value) and name in dir(base) and name != "__init__"
        }

    assert overridden(LoggingFramer, RequestFramer) == {"feed"}
    assert overridden(LoggingConnection, Connection) == {
        "on_readable", "__call__", "frame", "new_framer", "refuse"
    }  # fmt: skip
    assert overridden(LoggingH1Protocol, H1Protocol) == {"receive", "refuse"}
    # No framing in the logging framer nor the logging protocol: they call the originals.
    assert "RequestFramer.feed(self, data" in inspect.getsource(LoggingFramer.feed)
    assert "H1Protocol.receive(self, data)" in inspect.getsource(LoggingH1Protocol.receive)
    assert "Connection.frame(self, data)" in inspect.getsource(LoggingConnection.frame)


def _talk(port: int, pieces: list[bytes]) -> tuple[bytes, bool, int]:
    """Send the pieces as separate writes, half-close, read to EOF: (bytes, reset?, our port)."""
    received = []
    reset = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ours = sock.getsockname()[1]
        try:
            for piece in pieces:
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not data:
                break
            received.append(data)
    return b"".join(received), reset, ours


_DATE = re.compile(rb"\r\nDate: [^\r]*")


def test_the_log_changes_no_answer_and_logs_each_once(tmp: Path) -> None:
    """The fuzz corpus (valid, mutated and split pipelines, on new connections) against a worker
    with the log off and one with it on: the same answers byte for byte, and with the log on
    exactly one line per final answer, in order, with its status."""
    log = tmp / "access.log"
    rng = random.Random(21)
    cases = [fuzz_corpus.generate(rng)[1] for _ in range(300)]
    cases += [[b"GET /k HTTP/1.1\r\n\r\n"] * 3, [b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n"]]
    fmt = "%({remote_port}e)s %(s)s"
    with running() as off, running("--access-logfile", str(log), "--access-logformat", fmt) as on:
        expected: dict[int, list[str]] = {}
        for pieces in cases:
            plain, plain_reset, _ = _talk(off.port, pieces)
            logged, logged_reset, port = _talk(on.port, pieces)
            if plain_reset or logged_reset:
                continue  # a reset may have destroyed answers in flight: not comparable
            assert _DATE.sub(b"", logged) == _DATE.sub(b"", plain), pieces
            statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", logged)
            expected[port] = [code.decode() for code in statuses if code != b"100"]
        want = sum(map(len, expected.values()))
        got = lines_of(log, want, pattern=r"^\d+ \d{3}$")
        time.sleep(0.3)
    lines = [line for line in log.read_text().splitlines() if "/ready" not in line]
    by_port: dict[int, list[str]] = {}
    for line in lines:
        port_text, status = line.split()
        by_port.setdefault(int(port_text), []).append(status)
    assert len(got) == want
    for port, statuses in expected.items():
        assert by_port.get(port, []) == statuses, port


def test_the_read_at_accept_works_with_the_log_on(tmp: Path) -> None:
    """With the log on, a request that closes its connection is still answered at the accept
    (read(2) on the bare descriptor, counted in /proc/PID/io's syscr; a Connection reads with
    recvfrom, which is not) and logged with the client's address and port."""
    log = tmp / "access.log"
    fmt = "%(h)s %({remote_port}e)s %(r)s %(s)s %(b)s"
    close = b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with running("--access-logfile", str(log), "--access-logformat", fmt) as server:
        (worker,) = server.worker_pids()

        def reads() -> int:
            text = Path(f"/proc/{worker}/io").read_text()
            return int(re.search(r"^syscr: (\d+)", text, re.MULTILINE)[1])  # type: ignore[index]

        before = reads()
        ports = []
        for _ in range(20):
            with server.connect() as sock:
                ports.append(sock.getsockname()[1])
                sock.sendall(close)
                reader = StrictReader(sock)
                assert reader.read_many(1)[0].status == 200
                assert reader.at_eof(timeout=2.0)
        assert reads() - before >= 20
        got = lines_of(log, 20, pattern="/bye")
    assert got == [f"127.0.0.1 {port} GET /bye HTTP/1.1 200 5" for port in ports]


def test_bodies_over_several_reads_are_logged_with_their_heads(tmp: Path) -> None:
    """A body that ends in a later read than its head, and the server's 408 to a body that
    stops: each logged with the request line of its head."""
    log = tmp / "access.log"
    fmt = "%(r)s|%(s)s"
    env = base_env(VRYPT_BODY_TIMEOUT="1")
    with running("--access-logfile", str(log), "--access-logformat", fmt, env=env) as server:
        with server.connect() as sock:
            reader = StrictReader(sock)
            sock.sendall(b"POST /split HTTP/1.1\r\nContent-Length: 6\r\n\r\nab")
            time.sleep(0.2)
            sock.sendall(b"cd")
            time.sleep(0.2)
            sock.sendall(b"efGET /next HTTP/1.1\r\n\r\n")
            assert [a.status for a in reader.read_many(2)] == [200, 200]
            sock.sendall(b"PUT /chunks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n")
            time.sleep(0.2)
            sock.sendall(b"abc\r\n0\r\n\r\n")
            assert reader.read_many(1)[0].status == 200
            sock.sendall(b"POST /stalled HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            assert reader.read_many(1)[0].status == 408
        got = lines_of(log, 4)
    assert got == ["POST /split HTTP/1.1|200", "GET /next HTTP/1.1|200", "PUT /chunks HTTP/1.1|200",
                   "POST /stalled HTTP/1.1|408"]  # fmt: skip


def test_lines_past_the_bound_are_dropped_and_counted_while_the_output_is_blocked(
    tmp: Path,
) -> None:
    """Up to 16 MiB of lines wait for a blocked output; past that they are dropped, answers go
    on, and the count reaches the error log once the output moves again."""
    fifo = tmp / "blocked"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with running("--access-logfile", str(fifo), "--access-logformat", "%(a)s") as server:
            request = b"GET / HTTP/1.1\r\nUser-Agent: " + b"d" * 8000 + b"\r\n\r\n"
            for _ in range(50):  # 5,000 lines of 8 KB: 40 MB
                send(server.port, request * 100, 100)
            time.sleep(0.5)  # the last lines handed to the (blocked) writer
            deadline = time.monotonic() + 20
            while "lines dropped" not in server.log and time.monotonic() < deadline:
                try:
                    os.read(holder, 1 << 20)  # the output moves again
                except BlockingIOError:
                    time.sleep(0.01)
            match = server.wait_for_log(r"access log: (\d+) lines dropped", timeout=1)
            assert 0 < int(match.group(1)) < 5000
    finally:
        os.close(holder)


# Request targets whose path and query gunicorn takes from urlsplit (issue 22): absolute-form,
# credentials, fragments, `//`, percent-escapes, asterisk-form.
TARGETS = [
    b"http://absolute.example/abs?x=1",
    b"https://u:p@host/",
    b"https://u:p@host:8443/in?side=1#frag",
    b"/p#frag?x=1",
    b"//double/slash?q=1",
    b"/a%20b/c%2Fd?k=v&z=1",
    b"/plain?x=1",
    b"http://h",
]
PATH_FORMAT = "LOG|%(m)s|%(U)s|%(q)s|%({path_info}e)s|%({query_string}e)s|%(r)s"


def _path_lines(tmp: Path, name: str, *args: str, **kwargs: object) -> list[str]:
    log = tmp / f"{name}.log"
    requests = [(b"GET", target) for target in TARGETS] + [(b"OPTIONS", b"*")]
    with running(
        "--access-logfile", str(log), "--access-logformat", PATH_FORMAT, *args, **kwargs
    ) as server:
        for method, target in requests:
            send(server.port, method + b" " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n", 1)
        return lines_of(log, len(requests), pattern=r"^LOG\|")


def test_path_and_query_atoms_are_gunicorns(tmp: Path) -> None:
    ours = _path_lines(tmp, "vrypt")
    theirs = _path_lines(tmp, "sync", "-k", "sync", "vrypt_worker.wsgi:application", conf=False)
    assert ours == theirs
    fields = {line.split("|")[6]: line.split("|")[2:6] for line in ours}
    # What the original logged wrong: the whole URL with its credentials, the fragment's text.
    assert fields["GET http://absolute.example/abs?x=1 HTTP/1.1"] == ["/abs", "x=1", "/abs", "x=1"]
    assert fields["GET https://u:p@host/ HTTP/1.1"] == ["/", "", "/", ""]
    assert fields["GET /p#frag?x=1 HTTP/1.1"] == ["/p", "", "/p", ""]

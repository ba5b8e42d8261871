"""gunicorn's access log for HTTP/2 streams (access_log.LoggingH2Protocol): real gunicorn
servers, h2c (prior knowledge, upgrade) and h2 over TLS, real clients, the log file parsed back.

Every answered stream is one line, as gunicorn's own HTTP/2 worker writes it: the request line
`METHOD PATH HTTP/2.0`, the status, the body length (0 for HEAD), referer and user-agent from
the request's fields, the client's address from the socket. A stream without an answer (reset,
refused, malformed) has none. In process: the logging protocol answers byte for byte as the core
does, whatever the frames (hypothesis), with one line per answer.
"""

from __future__ import annotations

import base64
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hpack
import pytest
from gunicorn.config import Config
from hyperframe.frame import HeadersFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.h2_peer import client_start, make, parse
from tests.h2client import H2Client, StreamResult, is_vrypt_h2
from tests.support import Server, StrictReader, running
from tests.test_access_log import COMBINED, _code_without_log_lines
from tests.test_h2_properties import _frame, conversation
from tests.test_tls import certs, client_context, tls_connect, tls_server  # noqa: F401
from vrypt_worker.access_log import AccessLog, LoggingH2Protocol
from vrypt_worker.framing import FramingRules
from vrypt_worker.h2.connection import H2Config, H2Protocol

pytestmark = pytest.mark.timeout(60)

H2C = ("--http-protocols", "h2,h1", "--http2-cleartext", "both")
H2_TLS = ("--http-protocols", "h2,h1")


def log_lines(path: Path, count: int, pattern: str, timeout: float = 10.0) -> list[str]:
    """The lines of `path` matching `pattern`, once there are `count` of them; then a moment
    more, so that a line too many would be seen too."""
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        text = path.read_text(encoding="ascii") if path.exists() else ""
        found = [line for line in text.splitlines() if re.search(pattern, line)]
        if len(found) >= count:
            time.sleep(0.3)  # lines are handed to the writer every 0.1 s
            text = path.read_text(encoding="ascii")
            return [line for line in text.splitlines() if re.search(pattern, line)]
        time.sleep(0.05)
    raise AssertionError(f"{count} lines matching {pattern!r} not in the log: {found}")


def combined(line: str) -> dict[str, str]:
    match = COMBINED.fullmatch(line)
    assert match, line
    return match.groupdict()


@pytest.fixture
def h2c_logged(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    log = tmp_path / "access.log"
    with running(*H2C, "--access-logfile", str(log)) as server:
        yield server, log


def many_streams(client: H2Client, prefix: str, count: int) -> list[int]:
    ids = [
        client.request(
            "HEAD" if i % 4 == 3 else "GET",
            f"/{prefix}/{i}?n={i}",
            extra=[("user-agent", f"agent/{i % 3}"), ("referer", "http://ref/x")],
        )
        for i in range(count)
    ]
    client.wait(ids)
    for i, sid in enumerate(ids):
        assert is_vrypt_h2(client.streams[sid], head=i % 4 == 3)
    return ids


def check_many(lines: list[str], prefix: str, count: int) -> None:
    assert len(lines) == count, "\n".join(lines)
    seen = set()
    for line in lines:
        fields = combined(line)
        method, target, version = fields["r"].split(" ")
        i = int(target.split("/")[2].split("?")[0])
        seen.add(i)
        assert (method, target, version) == (
            "HEAD" if i % 4 == 3 else "GET",
            f"/{prefix}/{i}?n={i}",
            "HTTP/2.0",
        )
        assert fields["h"] == "127.0.0.1" and fields["u"] == "-"
        assert fields["s"] == "200" and fields["b"] == ("0" if i % 4 == 3 else "5")
        assert fields["f"] == "http://ref/x" and fields["a"] == f"agent/{i % 3}"
        time.strptime(fields["t"], "%d/%b/%Y:%H:%M:%S %z")
    assert seen == set(range(count))


def test_h2c_prior_knowledge_every_stream_one_line(h2c_logged: tuple[Server, Path]) -> None:
    server, log = h2c_logged
    client = H2Client.connect(server.port)
    try:
        many_streams(client, "pk", 60)  # the first block inserts, the rest take the hot path
    finally:
        client.close()
    client = H2Client.connect(server.port)  # a second connection: the same blocks again
    try:
        many_streams(client, "pk2", 20)
    finally:
        client.close()
    check_many(log_lines(log, 60, r'"(GET|HEAD) /pk/'), "pk", 60)
    check_many(log_lines(log, 20, r'"(GET|HEAD) /pk2/'), "pk2", 20)
    assert "does not cover HTTP/2" not in server.log


def test_h2c_bodies_errors_and_what_is_not_answered(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with running(*H2C, "--access-logfile", str(log), "--http2-max-header-list-size", "4096",
                 "--limit-request-line", "200") as server:  # fmt: skip
        client = H2Client.connect(server.port)
        try:
            post = client.request("POST", "/body", body=b"x" * 100_000)
            big = client.request("GET", "/big", extra=[("x-big", "y" * 5000)])  # 431
            long = client.request("GET", "/" + "l" * 300)  # over limit_request_line: 414
            # A header block split into HEADERS (without END_HEADERS) and CONTINUATION.
            cont = client.conn.get_next_available_stream_id()
            client.conn.send_headers(cont, [*PSEUDO, (":path", "/cont"), ("user-agent", "c/1")],
                                     end_stream=True)  # fmt: skip
            frame = client.conn.data_to_send()
            block, flags, ids = frame[9:], frame[4], frame[5:9]
            half = len(block) // 2
            client.sock.sendall(
                half.to_bytes(3, "big") + bytes((1, flags & ~0x4)) + ids + block[:half]
                + (len(block) - half).to_bytes(3, "big") + b"\x09\x04" + ids + block[half:]
            )  # fmt: skip
            client.streams[cont] = StreamResult()
            # A malformed request (an uppercase field name) is reset, not answered: no line.
            client.conn.config.validate_outbound_headers = False
            client.conn.config.normalize_outbound_headers = False
            bad = client.request("GET", "/bad", extra=[("X-Bad", "v")])
            # A request reset by the client before its body ended: no answer, no line.
            gone = client.request("POST", "/gone", body=b"z" * 10, end=False)
            client.conn.reset_stream(gone)
            client.flush()
            after = client.request("GET", "/after")
            client.wait([post, big, long, cont, bad, after])
            assert client.streams[post].status == 200 and client.streams[post].body == b"Vrypt"
            assert client.streams[big].status == 431
            assert client.streams[long].status == 414
            assert client.streams[cont].status == 200
            assert client.streams[bad].reset == 1  # PROTOCOL_ERROR
            assert client.streams[after].status == 200
        finally:
            client.close()
        lines = log_lines(log, 5, r'HTTP/2\.0"')
    parsed = [combined(line) for line in lines]
    by_path = {fields["r"].split(" ")[1]: fields for fields in parsed}
    assert len(lines) == 5 and len(by_path) == 5, "\n".join(lines)
    assert by_path["/body"]["r"] == "POST /body HTTP/2.0" and by_path["/body"]["s"] == "200"
    assert by_path["/big"]["s"] == "431"
    assert by_path["/big"]["b"] == str(len(b"Request Header Fields Too Large\n"))
    assert by_path["/" + "l" * 300]["s"] == "414"
    assert by_path["/" + "l" * 300]["b"] == str(len(b"URI Too Long\n"))
    assert by_path["/cont"]["s"] == "200" and by_path["/cont"]["a"] == "c/1"
    assert by_path["/after"]["s"] == "200"
    assert "/bad" not in by_path and "/gone" not in by_path


PSEUDO = [(":method", "GET"), (":scheme", "http"), (":authority", "127.0.0.1")]


def test_h2c_upgrade_is_logged_as_http2(h2c_logged: tuple[Server, Path]) -> None:
    server, log = h2c_logged
    url = f"http://127.0.0.1:{server.port}"
    answer = subprocess.run(
        ["curl", "-s", "--http2", "-A", "up/1", "-e", "http://r/", url + "/up", url + "/up2"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert answer.stdout == "Vrypt" * 2, answer.stderr
    head = subprocess.run(
        ["curl", "-s", "-I", "--http2", url + "/uphead"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert "HTTP/2 200" in head.stdout, head
    lines = log_lines(log, 3, r'"(GET|HEAD) /up')
    parsed = sorted((combined(line) for line in lines), key=lambda fields: fields["r"])
    assert [fields["r"] for fields in parsed] == [
        "GET /up HTTP/2.0",  # stream 1: the upgrade request itself
        "GET /up2 HTTP/2.0",
        "HEAD /uphead HTTP/2.0",
    ]
    assert [(f["s"], f["b"]) for f in parsed] == [("200", "5"), ("200", "5"), ("200", "0")]
    assert [f["a"] for f in parsed[:2]] == ["up/1", "up/1"]
    assert [f["f"] for f in parsed[:2]] == ["http://r/", "http://r/"]


def test_h2c_custom_format(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    fmt = (
        "%(h)s|%(m)s|%(U)s|%(q)s|%(H)s|%(s)s|%(B)s|%({host}i)s|%({x-test}i)s|"
        "%({content-type}o)s|%({server_protocol}e)s|%({wsgi.url_scheme}e)s|%(u)s|"
        "%({remote_port}e)s|%(D)s"
    )
    with running(*H2C, "--access-logfile", str(log), "--access-logformat", fmt) as server:
        client = H2Client.connect(server.port)
        try:
            auth = "Basic " + base64.b64encode(b"bob:pw").decode()
            ids = [
                client.request(
                    "GET", "/a%20b/c?k=v", extra=[("x-test", 'q"uote'), ("authorization", auth)]
                )
                for _ in range(3)
            ]
            client.wait(ids)
            port = client.sock.getsockname()[1]
        finally:
            client.close()
        lines = log_lines(log, 3, r"\|/a b/c\|")
    assert len(lines) == 3
    for line in lines:
        *fields, duration = line.split("|")
        assert fields == [
            "127.0.0.1", "GET", "/a b/c", "k=v", "HTTP/2.0", "200", "5", "127.0.0.1",
            'q\\"uote', "text/plain", "HTTP/2.0", "http", "bob", str(port),
        ]  # fmt: skip
        assert duration.isdigit()


def test_h2_over_tls(certs, tmp_path: Path) -> None:  # noqa: F811
    log = tmp_path / "access.log"
    fmt = '%(h)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({wsgi.url_scheme}e)s'
    with tls_server(
        certs, *H2_TLS, "--access-logfile", str(log), "--access-logformat", fmt
    ) as server:
        sock = tls_connect(server, client_context(certs, alpn=["h2"]))
        client = H2Client.connect(server.port, sock=sock)
        try:
            ids = [
                client.request(
                    "HEAD" if i % 5 == 0 else "GET", f"/tls/{i}", extra=[("user-agent", "tls/1")]
                )
                for i in range(30)
            ]
            client.wait(ids)
            big = client.request("GET", "/tls-big", extra=[("x-big", "y" * 70_000)])
            client.wait([big])
            assert client.streams[big].status == 431
        finally:
            client.close()
        # And HTTP/1.1 by ALPN on the same port, as before.
        with tls_connect(server, client_context(certs, alpn=["http/1.1"])) as h1:
            h1.sendall(b"GET /tls-h1 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert StrictReader(h1).read().status == 200  # type: ignore[union-attr]
        lines = log_lines(log, 32, r'"(GET|HEAD) /tls')
    assert len(lines) == 32, "\n".join(lines)
    for i in range(30):
        method = "HEAD" if i % 5 == 0 else "GET"
        size = "0" if i % 5 == 0 else "5"
        expected = f'127.0.0.1 "{method} /tls/{i} HTTP/2.0" 200 {size} "-" "tls/1" https'
        assert lines.count(expected) == 1, (expected, lines)
    assert sum('"GET /tls-big HTTP/2.0" 431 ' in line for line in lines) == 1
    assert sum('"GET /tls-h1 HTTP/1.1" 200 5' in line for line in lines) == 1


def test_h2load_every_stream_logged(h2c_logged: tuple[Server, Path]) -> None:
    server, log = h2c_logged
    url = f"http://127.0.0.1:{server.port}/load"
    load = subprocess.run(
        ["h2load", "-c", "8", "-m", "10", "-n", "4000", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert re.search(r"4000 succeeded, 0 failed, 0 errored", load.stdout), load.stdout
    lines = log_lines(log, 4000, r'"GET /load HTTP/2\.0" 200 5 ', timeout=20)
    assert len(lines) == 4000
    assert all(combined(line)["a"].startswith("h2load") for line in lines)


def test_the_logging_frames_follow_h2protocol() -> None:
    """LoggingH2Protocol copies H2Protocol._frames, so that the unlogged hot path stays as it
    is: a change made to one and not the other fails here."""
    assert _code_without_log_lines(LoggingH2Protocol._frames) == _code_without_log_lines(
        H2Protocol._frames
    )


# -- in process: the logging protocol answers exactly as the core, one line per answer ------------

_ACCESS: list[AccessLog] = []


def _access_log() -> AccessLog:
    """One AccessLog for these tests (format `r s b`), its lines collected, never written."""
    if not _ACCESS:
        logger = logging.getLogger("tests.h2_access_log")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        logger.setLevel(logging.INFO)
        cfg = Config()
        cfg.set("access_log_format", '"%(r)s" %(s)s %(b)s')
        worker = SimpleNamespace(log=SimpleNamespace(access_log=logger), cfg=cfg, responses=None)
        _ACCESS.append(AccessLog(worker))
    access = _ACCESS[0]
    access.lines = []
    return access


def _statuses(out: bytes) -> list[str]:
    decoder = hpack.Decoder()
    found = []
    for frame in parse(out):
        if isinstance(frame, HeadersFrame):
            status = dict(decoder.decode(frame.data, raw=True))[b":status"].decode()
            if status != "100":
                found.append(status)
    return sorted(found)


def _both(stream: bytes, sizes: list[int], config: H2Config) -> tuple[bytes, list[str], Any]:
    """The same input, in the same pieces, to H2Protocol and to LoggingH2Protocol: the same
    output, byte for byte; returns it, the lines logged and the logging protocol."""
    access = _access_log()
    plain, _ = make(config)
    logged = LoggingH2Protocol(config, FramingRules(), plain.answers, access, None)
    outs = [b"", b""]
    pos = 0
    for size in [*sizes, len(stream)]:
        piece = stream[pos : pos + size]
        pos += len(piece)
        if piece:
            for i, proto in enumerate((plain, logged)):
                outs[i] += proto.receive(piece)
    for i, proto in enumerate((plain, logged)):
        outs[i] += proto.writable() + proto.tick(1e9) + proto.shutdown()
    assert outs[0] == outs[1]
    return outs[1], access.lines, logged


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frame(), max_size=30), st.lists(st.integers(1, 60), max_size=10))
def test_random_frames_same_answers_and_one_line_per_answer(frame_list, sizes) -> None:
    out, lines, proto = _both(
        client_start() + b"".join(frame_list), sizes, H2Config(max_concurrent_streams=3)
    )
    assert sorted(line.split('" ')[1].split(" ")[0] for line in lines) == _statuses(out)
    assert len(proto._log_requests) <= 3 + len(proto._held)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12), st.lists(st.integers(1, 500)))
def test_conversations_same_answers_and_the_right_lines(kinds, sizes) -> None:
    _, lines, _ = _both(conversation(kinds), sizes, H2Config())
    methods = {0: "GET", 1: "HEAD", 2: "POST"}
    expected = sorted(
        f'"{methods[kind]} / HTTP/2.0" 200 {0 if kind == 1 else 5}'
        for kind in kinds
        if kind in methods
    )
    assert sorted(lines) == expected

"""gunicorn's limits, held against gunicorn itself: the same bytes at each boundary go to a
VryptWorker and to gunicorn's own sync worker started with the same limit settings, and both must
give the same verdict (the same status: 200, 414 or 431).

Cases sit at N-1, N and N+1 of every limit as gunicorn counts it (the request line without its
CRLF, the number of field lines, a field line with its CRLF), in the head and in a chunked body's
trailer section, for gunicorn's defaults, small values, 0 and values above gunicorn's ceilings.
gunicorn's sync worker parses with its pure-Python parser, or with gunicorn_h1c when that is
installed ("auto"); both are tested, the second only when gunicorn_h1c imports.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.support import Server, start_server
from vrypt_worker.framing import REQUEST_LINE_UNLIMITED, Limits

HAVE_H1C = importlib.util.find_spec("gunicorn_h1c") is not None


@dataclass(frozen=True)
class Setting:
    """gunicorn's three limit settings as given on the command line."""

    line: int
    fields: int
    size: int

    def args(self) -> list[str]:
        return [
            *("--limit-request-line", str(self.line)),
            *("--limit-request-fields", str(self.fields)),
            *("--limit-request-field_size", str(self.size)),
        ]


SETTINGS = {
    "defaults": Setting(4094, 100, 8190),
    "small": Setting(100, 5, 50),
    "zero": Setting(0, 0, 0),  # line: unlimited; fields: 32768; field size: 8190
    "above-ceiling": Setting(9000, 40000, 10000),  # line: 8190; fields: 32768; size as given
}


def request_line(length: int) -> bytes:
    return b"GET /" + b"a" * (length - 14) + b" HTTP/1.1"


def field_line(name: bytes, length: int) -> bytes:
    return name + b": " + b"v" * (length - len(name) - 2)


def head(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def chunked(*trailers: bytes) -> bytes:
    start = head(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1")
    return start + b"5\r\nhello\r\n0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def cases(setting: Setting, parser: str) -> dict[str, bytes]:
    """The requests at each boundary, by name. The boundaries are gunicorn's, derived here
    from its rules, not from the framer under test."""
    # gunicorn/http/message.py: Request.__init__ and Message.__init__
    line = 8190 if setting.line > 8190 else setting.line
    fields = 32768 if setting.fields == 0 or setting.fields > 32768 else setting.fields
    size = setting.size or 8190
    out: dict[str, bytes] = {}
    if line:
        lengths = [line - 1, line, line + 1]
    else:  # unlimited: gunicorn's Python parser has no bound, its fast parser 1 MiB
        lengths = [8190, 8191, 100_000]
        if parser == "fast":
            lengths += [REQUEST_LINE_UNLIMITED, REQUEST_LINE_UNLIMITED + 1]
    for n in lengths:
        out[f"request line {n}"] = head(line=request_line(n))
        if n <= 100_000:
            # Not past 1 MiB: gunicorn with gunicorn_h1c before 0.6.12 and limit_request_line = 0
            # measures no request line after an empty line (message.py: Request._parse_fast).
            out[f"request line {n} after an empty line"] = b"\r\n" + head(line=request_line(n))
    for n in (fields - 1, fields, fields + 1):
        if parser == "fast" and n > 256:
            # gunicorn_h1c (0.6.10) parses at most 256 field lines and answers 400 beyond,
            # whatever limit_request_fields says; its Python parser holds to the setting.
            continue
        out[f"{n} fields"] = head(*(b"F%d: v" % i for i in range(n)))
    for n in (size - 3, size - 2, size - 1, size):  # each with its CRLF: size - 1 ... size + 2
        out[f"field line {n} + CRLF"] = head(b"A: 1", field_line(b"X", n), b"B: 2")
    if fields <= 100:  # a trailer section of 32,768 fields adds nothing the head does not test
        for n in (fields, fields + 1):
            out[f"{n} trailer fields"] = chunked(*(b"T%d: v" % i for i in range(n)))
    for n in (size - 3, size - 2, size - 1):
        out[f"trailer line {n} + CRLF"] = chunked(field_line(b"T", n))
    return out


def verdict(server: Server, payload: bytes, timeout: float = 20.0) -> int | None:
    """The status of the first answer to `payload`, or None when the server closed without
    one. The payload is written from a thread, so that an answer given before the server read
    it all (and the close after it) cannot stall the test."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:

        def send() -> None:
            try:
                sock.sendall(payload)
            except OSError:
                pass

        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        data = b""
        while b"\r\n" not in data:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            data += chunk
        writer.join(max(0.1, deadline - time.monotonic()))
    if not data.startswith(b"HTTP/1.1 ") or b"\r\n" not in data:
        assert not data, f"not an HTTP answer: {data[:80]!r}"
        return None
    return int(data[9:12])


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[str, str], Server]]:
    """Start servers lazily, one per (worker, setting), and stop them all at the end."""
    started: dict[tuple[str, str], Server] = {}

    def get(kind: str, name: str) -> Server:
        if (kind, name) not in started:
            args = SETTINGS[name].args()
            if kind == "vrypt":
                started[kind, name] = start_server(*args)
            else:
                started[kind, name] = start_server(
                    *("-k", "sync", "--http-parser", kind, *args),
                    "tests.limits_app:application",
                    conf=False,
                )
        return started[kind, name]

    try:
        yield get
    finally:
        for server in started.values():
            server.stop()


def _all_cases() -> list[object]:
    params = []
    for name, setting in SETTINGS.items():
        for parser in ("python", "fast"):
            marks = []
            if parser == "fast" and not HAVE_H1C:
                marks.append(pytest.mark.skip(reason="gunicorn_h1c is not installed"))
            for case in cases(setting, parser):
                params.append(
                    pytest.param(name, parser, case, marks=marks, id=f"{name}-{parser}-{case}")
                )
    return params


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("setting", "parser", "case"), _all_cases())
def test_same_verdict_as_gunicorn(
    servers: Callable[[str, str], Server], setting: str, parser: str, case: str
) -> None:
    payload = cases(SETTINGS[setting], parser)[case]
    ours = verdict(servers("vrypt", setting), payload)
    theirs = verdict(servers(parser, setting), payload)
    assert ours == theirs, f"{case}: vrypt {ours}, gunicorn ({parser} parser) {theirs}"
    assert ours in (200, 414, 431), ours


def test_cases_sit_on_the_framers_boundaries() -> None:
    """The boundaries above are derived from gunicorn's rules independently of the framer: the
    framer's own normalisation must land on the same numbers."""
    for setting in SETTINGS.values():
        limits = Limits.from_settings(setting.line, setting.fields, setting.size)
        assert limits.fields == (32768 if setting.fields in (0, 40000) else setting.fields)
        assert limits.field_size == (setting.size or 8190)
        assert limits.request_line == {0: REQUEST_LINE_UNLIMITED, 9000: 8190}.get(
            setting.line, setting.line
        )

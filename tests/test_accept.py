"""New connections: TCP_DEFER_ACCEPT on the listeners, and the first read made at the accept.

With the option on (the default), the kernel hands a connection to the worker once its first bytes
have arrived, and the worker reads them at once: a whole cached request after which the
connection closes is answered and closed on the bare descriptor (worker._read_at_accept), and
anything else becomes a Connection given those bytes. These tests hold every branch of that path
to the same answers as the loop's: one answer per request, in order, closes where they belong.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Server, StrictReader, base_env, is_vrypt, running

CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
KEEP = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
SYN_RECV, ESTABLISHED = "03", "01"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running() as srv:
        yield srv


def ask(server: Server, payload: bytes, count: int, heads: frozenset[int] = frozenset()) -> tuple:
    """A new connection: send `payload` in one write, read `count` answers, say whether the
    server then closed it (with nothing more sent: no answer too many)."""
    with server.connect() as sock:
        sock.sendall(payload)
        reader = StrictReader(sock)
        answers = reader.read_many(count, heads)
        return answers, reader.at_eof(timeout=1.0)


def server_side_state(port: int, client: socket.socket) -> str | None:
    """The kernel's state (/proc/net/tcp, hex) of the server's end of `client`'s connection to
    `port`: a connection the listener defers shows as SYN_RECV until its first bytes arrive."""
    client_port = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            return state
    return None


@pytest.mark.parametrize(
    ("request_bytes", "head"),
    [
        (CLOSE, False),
        (b"HEAD / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", True),
        (b"GET /x HTTP/1.0\r\n\r\n", False),
        (b"DELETE /y HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", False),
    ],
    ids=["close", "head-close", "http10", "delete-close"],
)
def test_a_request_that_closes_is_answered_once_then_closed_every_time(
    server: Server, request_bytes: bytes, head: bool
) -> None:
    """The first time a head is seen it is parsed (through a Connection); after that it is a
    cached head answered at the accept. Both give one answer, then the close."""
    for _ in range(5):
        answers, closed = ask(server, request_bytes, 1, frozenset({0}) if head else frozenset())
        assert len(answers) == 1 and is_vrypt(answers[0], head=head), answers
        assert answers[0].header(b"Connection") == b"close"
        assert closed


def test_a_keep_alive_request_read_at_the_accept_keeps_its_connection(server: Server) -> None:
    with server.connect() as sock:
        reader = StrictReader(sock)
        for _ in range(4):
            sock.sendall(KEEP)
            [answer] = reader.read_many(1)
            assert is_vrypt(answer) and answer.header(b"Connection") is None
        sock.sendall(CLOSE)
        assert [is_vrypt(a) for a in reader.read_many(1)] == [True]
        assert reader.at_eof()


@pytest.mark.parametrize(
    ("payload", "count", "open_after"),
    [
        (KEEP * 3, 3, True),  # pipelined in the first read
        (KEEP + CLOSE, 2, False),
        (CLOSE + KEEP, 1, False),  # bytes after the close: answered once, then the close
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nVrypt" + CLOSE, 2, False),
    ],
    ids=["pipelined", "keep-then-close", "close-then-more", "body-then-close"],
)
def test_a_first_read_that_is_more_than_one_head_goes_through_the_framer(
    server: Server, payload: bytes, count: int, open_after: bool
) -> None:
    for _ in range(3):  # the second and third time, every head is cached
        answers, closed = ask(server, payload, count)
        assert len(answers) == count and all(is_vrypt(a) for a in answers), answers
        assert closed is not open_after


def test_a_first_read_that_is_half_a_head_waits_for_the_rest(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(CLOSE[:10])
        time.sleep(0.2)
        sock.sendall(CLOSE[10:])
        reader = StrictReader(sock)
        assert [is_vrypt(a) for a in reader.read_many(1)] == [True]
        assert reader.at_eof()


def test_bad_input_at_the_accept_gets_its_error_and_the_close(server: Server) -> None:
    for _ in range(2):
        answers, closed = ask(server, b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n", 1)
        assert [a.status for a in answers] == [400] and closed


def test_connections_closed_without_a_request_cost_nothing(server: Server) -> None:
    for _ in range(50):
        with server.connect():
            pass
    answers, closed = ask(server, CLOSE, 1)
    assert [is_vrypt(a) for a in answers] == [True] and closed


def test_the_listener_defers_a_connection_until_its_first_bytes(server: Server) -> None:
    with server.connect() as sock:
        time.sleep(0.2)
        assert server_side_state(server.port, sock) == SYN_RECV
        sock.sendall(KEEP)
        reader = StrictReader(sock)
        assert [is_vrypt(a) for a in reader.read_many(1)] == [True]
        assert server_side_state(server.port, sock) == ESTABLISHED


def test_a_client_silent_past_the_deferral_is_still_answered(server: Server) -> None:
    """After a second without bytes the kernel hands the connection over anyway: the read at
    the accept finds nothing, and the connection waits on the loop as any other does."""
    with server.connect() as sock:
        time.sleep(2.5)
        sock.sendall(CLOSE)
        reader = StrictReader(sock)
        assert [is_vrypt(a) for a in reader.read_many(1)] == [True]
        assert reader.at_eof()


def test_defer_accept_can_be_turned_off() -> None:
    with running(env=base_env(VRYPT_DEFER_ACCEPT="0")) as srv, srv.connect() as sock:
        time.sleep(0.2)
        assert server_side_state(srv.port, sock) == ESTABLISHED
        for _ in range(3):
            answers, closed = ask(srv, CLOSE, 1)
            assert [is_vrypt(a) for a in answers] == [True] and closed
        sock.sendall(KEEP)
        assert [is_vrypt(a) for a in StrictReader(sock).read_many(1)] == [True]


def test_max_requests_counts_answers_given_at_the_accept() -> None:
    """Every answer counts toward max_requests, the ones given at the accept included: the
    worker is replaced, and each answer is given exactly once, the keep-alive ones that fall on
    the budget saying close."""
    with running("--max-requests", "5") as srv:
        first = srv.worker_pids()
        closes = 0
        for i in range(30):
            answers, closed = ask(srv, CLOSE if i % 2 else KEEP, 1)
            assert len(answers) == 1 and is_vrypt(answers[0]), (i, answers)
            closes += answers[0].header(b"Connection") == b"close"
            assert closed == (answers[0].header(b"Connection") == b"close")
        assert closes > 15  # the odd requests, and the even ones that reached the budget
        deadline = time.monotonic() + 10
        while srv.worker_pids() == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.worker_pids() != first


def test_an_answer_too_big_for_one_write_at_the_accept_is_sent_in_full(tmp_path: Path) -> None:
    """A 1 MiB body does not fit the socket's buffer (128 KiB): what the first write leaves goes
    out as the client reads, through a Connection made for it, then the close."""
    body = bytes(range(256)) * 4096
    (tmp_path / "big.bin").write_bytes(body)
    env = base_env(VRYPT_BODY_FILE=str(tmp_path / "big.bin"))
    with running(env=env) as srv:
        for _ in range(3):
            with srv.connect() as sock:
                sock.sendall(CLOSE)
                time.sleep(0.3)  # the worker's first write fills what the kernel will take
                reader = StrictReader(sock)
                [answer] = reader.read_many(1)
                assert answer.status == 200 and answer.body == body
                assert reader.at_eof()

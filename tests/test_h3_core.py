"""The HTTP/3 core (vrypt_worker/h3/) in-process, against aioquic's own client connection: no
sockets, datagrams handed across by hand, the clock advanced by hand (issue 23).

Every request on every stream gets the chosen answer: GET, HEAD (no body), POST with bodies of
any size (read and dropped with flow control, so the client never stalls), many streams at once
and one after another beyond the initial stream limit, several connections; timers; an unknown
version gets Version Negotiation.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

pytest.importorskip("aioquic")

import trustme
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import pull_quic_header

from tests.h3client import HeadAwareH3
from vrypt_worker.answer import Answer
from vrypt_worker.h3.answers import H3Answers
from vrypt_worker.h3.endpoint import H3Endpoint

SERVER = ("127.0.0.1", 4433)
NOW = 1000.0


class Tally:
    answered = 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("h3certs")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: where / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def server_config(certs: dict[str, Path]) -> QuicConfiguration:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(str(certs["cert"]), str(certs["key"]))
    return config


class Client:
    """aioquic's client connection and H3Connection, wired to an endpoint by hand."""

    def __init__(self, certs: dict[str, Path], endpoint: H3Endpoint, port: int = 50000) -> None:
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
        config.load_verify_locations(str(certs["ca"]))
        config.server_name = "localhost"
        self.quic = QuicConnection(configuration=config)
        self.h3 = HeadAwareH3(self.quic)
        self.endpoint = endpoint
        self.addr = ("127.0.0.1", port)
        self.now = NOW
        self.heads: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.terminated: ConnectionTerminated | None = None
        self.quic.connect(SERVER, self.now)

    def pump(self, rounds: int = 50) -> None:
        """Datagrams both ways until neither side has anything to send. The clock moves a
        millisecond per round: aioquic paces its sending by it."""
        idle = 0
        for _ in range(rounds):
            self.now += 0.001
            moved = False
            timer = self.quic.get_timer()
            if timer is not None and timer <= self.now:
                self.quic.handle_timer(self.now)
            self.endpoint.expire(self.now)  # the server's timers (delayed ACKs, losses)
            for data, _addr in self.quic.datagrams_to_send(self.now):
                self.endpoint.feed(data, self.addr, self.now)
                moved = True
            for data, addr in self.endpoint.flush(self.now):
                assert addr == self.addr
                self.quic.receive_datagram(data, SERVER, self.now)
                moved = True
            self._events()
            idle = 0 if moved else idle + 1
            if idle > 100:  # past the peers' ACK delay (25 ms)
                return

    def _events(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            if isinstance(event, ConnectionTerminated):
                self.terminated = event
            for h3_event in self.h3.handle_event(event):
                sid = h3_event.stream_id
                if isinstance(h3_event, HeadersReceived):
                    self.heads[sid] = h3_event.headers
                elif isinstance(h3_event, DataReceived):
                    self.bodies[sid] = self.bodies.get(sid, b"") + h3_event.data
                if getattr(h3_event, "stream_ended", False):
                    self.ended.add(sid)
            event = self.quic.next_event()

    def request(self, method: bytes = b"GET", body: bytes = b"", path: bytes = b"/") -> int:
        sid = self.quic.get_next_available_stream_id()
        fields = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path),
        ]
        if body:
            fields.append((b"content-length", b"%d" % len(body)))
        if method == b"HEAD":
            self.h3.head_streams.add(sid)
        self.h3.send_headers(sid, fields, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        return sid

    def answer(self, sid: int) -> tuple[int, dict[bytes, bytes], bytes]:
        assert sid in self.ended, f"stream {sid} not ended"
        fields = dict(self.heads[sid])
        return int(fields[b":status"]), fields, self.bodies.get(sid, b"")


@pytest.fixture
def endpoint(certs: dict[str, Path]) -> H3Endpoint:
    return H3Endpoint(server_config(certs), H3Answers(NOW, Answer()), Tally())


def test_get_is_answered_vrypt(certs, endpoint) -> None:
    client = Client(certs, endpoint)
    client.pump()
    sid = client.request()
    client.pump()
    status, fields, body = client.answer(sid)
    assert (status, body) == (200, b"Vrypt")
    assert fields[b"content-type"] == b"text/plain"
    assert fields[b"content-length"] == b"5"
    assert fields[b"server"] == b"vrypt"
    assert fields[b"date"].endswith(b" GMT")
    assert endpoint.tally.answered == 1


def test_head_has_no_body(certs, endpoint) -> None:
    client = Client(certs, endpoint)
    client.pump()
    sid = client.request(b"HEAD")
    client.pump()
    status, fields, body = client.answer(sid)
    assert (status, body, fields[b"content-length"]) == (200, b"", b"5")


@pytest.mark.parametrize("size", [1, 1000, 70_000, 3_000_000])
def test_bodies_are_read_and_dropped(certs, endpoint, size: int) -> None:
    """3 MB is three times the stream's and the connection's initial window: the client
    stalls unless the server widens them."""
    client = Client(certs, endpoint)
    client.pump()
    sid = client.request(b"POST", b"x" * size)
    client.pump(rounds=5000)
    assert client.answer(sid)[::2] == (200, b"Vrypt")
    # the whole body left the client and was acknowledged, nothing stuck behind flow control:
    # aioquic forgets a stream once both of its directions are done
    assert not client.quic.datagrams_to_send(client.now)
    assert sid not in client.quic._streams  # (the test peeks at aioquic's client state)


def test_many_streams_at_once_and_beyond_the_stream_limit(certs, endpoint) -> None:
    """100 streams in one flight, then 400 more one batch after another: aioquic's initial
    limit is 128 concurrent bidirectional streams, so the server must raise it as they end."""
    client = Client(certs, endpoint)
    client.pump()
    sids = [client.request(b"HEAD" if n % 3 == 0 else b"GET", path=b"/%d" % n) for n in range(100)]
    client.pump(rounds=500)
    for n, sid in enumerate(sids):
        assert client.answer(sid)[::2] == (200, b"" if n % 3 == 0 else b"Vrypt")
    for _ in range(8):
        batch = [client.request() for _ in range(50)]
        client.pump(rounds=500)
        assert all(client.answer(sid)[::2] == (200, b"Vrypt") for sid in batch)
    assert endpoint.tally.answered == 500


def test_several_connections_are_kept_apart(certs, endpoint) -> None:
    clients = [Client(certs, endpoint, port=50000 + n) for n in range(5)]
    for client in clients:
        client.pump()
    for client in clients:
        client.request()
        client.request(b"HEAD")
    for client in clients:
        client.pump()
    for client in clients:
        assert client.answer(0)[::2] == (200, b"Vrypt")
        assert client.answer(4)[::2] == (200, b"")
    assert len(endpoint) == 5


def test_the_operators_answer(certs) -> None:
    answer = Answer(503, b"Service Unavailable", b"down\n", b"text/html", (b"Retry-After: 120",))
    endpoint = H3Endpoint(server_config(certs), H3Answers(NOW, answer), Tally())
    client = Client(certs, endpoint)
    client.pump()
    sid = client.request()
    client.pump()
    status, fields, body = client.answer(sid)
    assert (status, body) == (503, b"down\n")
    assert fields[b"retry-after"] == b"120"
    assert fields[b"content-type"] == b"text/html"


def test_timers_close_an_idle_connection(certs) -> None:
    config = server_config(certs)
    config.idle_timeout = 5.0
    endpoint = H3Endpoint(config, H3Answers(NOW, Answer()), Tally())
    client = Client(certs, endpoint)
    client.pump()
    assert len(endpoint) == 1
    deadline = endpoint.next_deadline()
    assert deadline is not None and deadline > NOW
    now = NOW
    for _ in range(100):  # the server's timers only: the client stays silent
        deadline = endpoint.next_deadline()
        if deadline is None:
            break
        now = max(now, deadline)
        endpoint.expire(now)
        endpoint.flush(now)
    assert len(endpoint) == 0, "an idle connection outlived its idle timeout"
    assert NOW + 5 <= now < NOW + 60
    assert endpoint.by_cid == {}


def test_an_unknown_version_gets_version_negotiation(endpoint) -> None:
    # A long header with version 0x1a2a3a4a (reserved, RFC 9000 §15) and 1200 bytes of it.
    dcid, scid = b"\x01" * 8, b"\x02" * 8
    packet = b"\xc0" + (0x1A2A3A4A).to_bytes(4, "big") + b"\x08" + dcid + b"\x08" + scid
    endpoint.feed(packet + b"\x00" * (1200 - len(packet)), ("127.0.0.1", 5), NOW)
    [(reply, addr)] = endpoint.flush(NOW)
    assert addr == ("127.0.0.1", 5)
    header = pull_quic_header(Buffer(data=reply), host_cid_length=8)
    assert header.version == 0 and header.destination_cid == scid
    assert len(endpoint) == 0


def test_garbage_and_strays_make_no_connection(endpoint) -> None:
    endpoint.feed(b"", ("127.0.0.1", 5), NOW)
    endpoint.feed(b"\x40" + b"\x07" * 40, ("127.0.0.1", 5), NOW)  # a short header, unknown ID
    endpoint.feed(b"\xc0\x00\x00\x00\x01\x08" + b"\x01" * 8 + b"\x00", ("127.0.0.1", 5), NOW)
    assert endpoint.flush(NOW) == [] and len(endpoint) == 0


def test_tls_verification_of_the_client_holds(certs, endpoint) -> None:
    """The client checks the server's certificate (a sanity check of the test's wiring)."""
    client = Client(certs, endpoint)
    assert client.quic.configuration.verify_mode in (None, ssl.CERT_REQUIRED)
    client.pump()
    sid = client.request()
    client.pump()
    assert client.answer(sid)[0] == 200


def test_connection_ids_carry_the_slot(certs) -> None:
    """With a prefix (the worker's slot, for the BPF steering in http3.py) every connection ID
    the server issues begins with it: the first, and those issued after the handshake."""
    endpoint = H3Endpoint(
        server_config(certs), H3Answers(NOW, Answer()), Tally(), cid_prefix=b"\x00\x07"
    )
    client = Client(certs, endpoint)
    client.pump()
    sid = client.request()
    client.pump()
    assert client.answer(sid)[0] == 200
    [session] = endpoint.sessions
    issued = session.cids - {session.quic.original_destination_connection_id}
    assert len(issued) >= 2  # the handshake's and the NEW_CONNECTION_ID ones
    assert all(cid[:2] == b"\x00\x07" and len(cid) == 8 for cid in issued)
    # what the client may switch to are the same IDs
    assert client.quic._peer_cid.cid[:2] == b"\x00\x07"
    assert all(entry.cid[:2] == b"\x00\x07" for entry in client.quic._peer_cid_available)


def test_drain_sends_goaway_refuses_later_streams_and_closes_when_answered(certs, endpoint) -> None:
    """Draining (TERM, HUP, max_requests): GOAWAY naming the first stream not processed; a
    request the client sent before it saw the GOAWAY is refused (H3_REQUEST_REJECTED, safe to
    retry), the answered ones are delivered, then the connection closes with H3_NO_ERROR and
    leaves the endpoint; a new connection is not made."""
    client = Client(certs, endpoint)
    client.pump()
    first = client.request()
    client.pump()
    assert client.answer(first)[0] == 200
    late = client.request()  # in flight when the drain begins
    endpoint.drain()
    client.pump(rounds=2000)
    assert client.h3.goaway == first + 4 == late
    assert late not in client.ended
    assert client.terminated is not None and client.terminated.error_code == 0x100
    for _ in range(200):  # the closing period (aioquic: three PTOs) on the server's clock
        client.now += 0.05
        client.endpoint.expire(client.now)
        client.endpoint.flush(client.now)
    assert len(endpoint) == 0 and endpoint.by_cid == {}
    newcomer = Client(certs, endpoint, port=50001)
    newcomer.pump()
    assert len(endpoint) == 0 and not newcomer.ended


def test_no_connection_beyond_the_cap(certs) -> None:
    """worker_connections bounds QUIC connections too: an Initial beyond it is dropped."""
    endpoint = H3Endpoint(
        server_config(certs), H3Answers(NOW, Answer()), Tally(), max_connections=2
    )
    clients = [Client(certs, endpoint, port=50000 + n) for n in range(3)]
    for client in clients:
        client.pump()
    assert len(endpoint) == 2
    assert clients[2].quic._state.name == "FIRSTFLIGHT"  # never heard back
    sid = clients[0].request()
    clients[0].pump()
    assert clients[0].answer(sid)[0] == 200


def test_the_handshake_buffers_are_shed_once_it_completes(certs, endpoint) -> None:
    """aioquic keeps three 16 KiB TLS output buffers per connection for its whole life; the
    session empties them once the handshake is complete (docs/http3.md, "Memory"), and the
    connection goes on answering."""
    client = Client(certs, endpoint)
    client.pump()
    [session] = endpoint.sessions
    buffers = session.quic._crypto_buffers  # (the test peeks at aioquic's state)
    assert all(buf.capacity == 0 for buf in buffers.values())
    sids = [client.request() for _ in range(20)]
    client.pump(rounds=500)
    assert all(client.answer(sid)[::2] == (200, b"Vrypt") for sid in sids)

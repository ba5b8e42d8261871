"""The I/O-free pieces behind TLS, without sockets: TLSSession (ssl.SSLObject over MemoryBIOs)
fed byte by byte, the context built from gunicorn's settings, and H1Protocol."""

from __future__ import annotations

import ssl
from types import SimpleNamespace

import hypothesis
import pytest
import trustme
from gunicorn.config import Config
from hypothesis import strategies as st

from vrypt_worker import framing as f
from vrypt_worker import tls
from vrypt_worker.framing import FramingRules
from vrypt_worker.h1_protocol import H1Protocol
from vrypt_worker.response import ResponseTable
from vrypt_worker.tls import TLSError, TLSSession

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = SimpleNamespace(ca=where / "ca.pem", cert=where / "cert.pem", key=where / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    cert.cert_chain_pems[0].write_to_path(str(paths.cert))
    cert.private_key_pem.write_to_path(str(paths.key))
    return paths


def config(pki: SimpleNamespace, **settings: object) -> Config:
    cfg = Config()
    cfg.set("certfile", str(pki.cert))
    cfg.set("keyfile", str(pki.key))
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


class Client:
    """A TLS client over memory buffers, to talk to a TLSSession by hand."""

    def __init__(self, pki, version=None, alpn=None) -> None:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if version:
            context.minimum_version = context.maximum_version = version
        if alpn:
            context.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    def step(self) -> bytes:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()


def handshake(client: Client, server: TLSSession, byte_by_byte: bool = False) -> None:
    to_server = client.step()
    for _ in range(10):
        if byte_by_byte:
            for i in range(len(to_server)):
                assert server.receive(to_server[i : i + 1]) == b""
        else:
            assert server.receive(to_server) == b""
        client.incoming.write(server.output())
        to_server = client.step()
        if server.handshaken and not to_server:
            return
    raise AssertionError("no handshake")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_handshake_alpn_and_data_byte_by_byte(pki, version, byte_by_byte) -> None:
    cfg = config(pki)
    session = TLSSession(tls.server_context(cfg))
    client = Client(pki, version, alpn=["h2", "http/1.1"])
    handshake(client, session, byte_by_byte)
    assert session.handshaken and session.alpn == "http/1.1"
    assert session.version() == client.obj.version()
    client.obj.write(GET * 3)
    record = client.outgoing.read()
    plain = b""
    for i in range(len(record)):  # a record cut anywhere gives its plaintext once complete
        plain += session.receive(record[i : i + 1])
    assert plain == GET * 3
    client.incoming.write(session.send(b"answer"))
    assert client.obj.read() == b"answer"


def test_many_records_in_one_read_are_all_decrypted(pki) -> None:
    session = TLSSession(tls.server_context(config(pki)))
    client = Client(pki)
    handshake(client, session)
    for i in range(50):
        client.obj.write(b"%d;" % i)  # 50 records
    data = client.outgoing.read()
    assert session.receive(data) == b"".join(b"%d;" % i for i in range(50))


def test_close_notify_both_ways(pki) -> None:
    session = TLSSession(tls.server_context(config(pki)))
    client = Client(pki)
    handshake(client, session)
    client.incoming.write(session.close())
    assert client.obj.read() == b""  # CPython's answer to close_notify
    session = TLSSession(tls.server_context(config(pki)))
    client = Client(pki)
    handshake(client, session)
    try:
        client.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    assert session.receive(client.outgoing.read()) == b""
    assert session.peer_closed and session.eof()


@pytest.mark.parametrize(
    "garbage", [GET, b"\x16\x03\x01\x00\x05hello", bytes(range(256)) * 4, b"\x00" * 64]
)
def test_garbage_and_plain_http_raise(pki, garbage: bytes) -> None:
    session = TLSSession(tls.server_context(config(pki)))
    with pytest.raises(TLSError):
        for _ in range(3):
            session.receive(garbage)


def test_ragged_eof_follows_suppress_ragged_eofs(pki) -> None:
    context = tls.server_context(config(pki))
    for suppress in (True, False):
        session = TLSSession(context, suppress)
        handshake(Client(pki), session)
        assert session.eof() is suppress


def test_context_from_settings(pki) -> None:
    context = tls.server_context(config(pki, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    names = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert names == {"ECDHE-ECDSA-AES128-GCM-SHA256"}
    mutual = tls.server_context(config(pki, cert_reqs=2, ca_certs=str(pki.ca)))
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):
        tls.server_context(config(pki, ciphers="NO-SUCH-CIPHER"))


def test_the_hook_is_called_with_the_factory_and_renegotiation_stays_refused(pki) -> None:
    seen = []

    def hook(conf, factory):
        seen.append(conf)
        context = factory()
        context.options &= ~ssl.OP_NO_RENEGOTIATION
        return context

    cfg = config(pki, ssl_context=hook)
    context = tls.server_context(cfg)
    assert seen == [cfg]
    assert context.options & ssl.OP_NO_RENEGOTIATION
    with pytest.raises(TypeError):
        tls.server_context(config(pki, ssl_context=lambda conf, factory: None))


def test_one_context_per_configuration(pki) -> None:
    cfg = config(pki)
    assert tls.context_for(cfg) is tls.context_for(cfg)
    assert tls.context_for(config(pki)) is not tls.context_for(cfg)  # a reload: new keys


def test_alpn_from_http_protocols() -> None:
    assert tls.alpn_protocols(["h1"]) == ["http/1.1"]
    assert tls.alpn_protocols(None) == ["http/1.1"]
    assert tls.alpn_protocols(["h2", "h1"]) == ["h2", "http/1.1"]
    assert tls.alpn_protocols(["h1", "h2"]) == ["http/1.1", "h2"]
    assert tls.alpn_protocols(["h2"]) == ["h2"]


# --- H1Protocol ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def protocol(clock=None, open_until: int | None = None) -> tuple[H1Protocol, FramingRules, list]:
    rules = FramingRules()
    if open_until is not None:
        rules.open_until = open_until
    table = ResponseTable(0).bytes_for
    return H1Protocol(rules, table, 10, 60, clock or Clock()), rules, table


def test_keep_alive_answers_are_counted_like_the_plain_path() -> None:
    proto, rules, table = protocol()
    for _ in range(3):
        assert proto.receive(GET) == table[f.OK]
    assert rules.answered == 3 and proto.idle() and not proto.closing


def test_pipelined_beyond_a_batch_is_rendered_as_the_transport_writes() -> None:
    proto, rules, table = protocol()
    first = proto.receive(GET * 200)
    assert first == table[f.OK] * 64
    assert rules.answered == 200 and not proto.idle()
    rest = b""
    while chunk := proto.writable():
        rest += chunk
    assert rest == table[f.OK] * 136 and proto.idle()


def test_head_close_and_errors() -> None:
    proto, _rules, table = protocol()
    assert proto.receive(b"HEAD / HTTP/1.1\r\n\r\n") == table[f.OK_HEAD]
    close = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"
    assert proto.receive(close) == table[f.OK_CLOSE]
    assert proto.closing and proto.clean
    proto, rules, table = protocol()
    assert proto.receive(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n") == table[f.BAD_REQUEST]
    assert proto.closing and not proto.clean and rules.rejected == 1


def test_the_answer_reaching_open_until_says_close() -> None:
    proto, rules, table = protocol(open_until=1)  # the worker: max_requests - 1
    assert proto.receive(GET) == table[f.OK]
    assert proto.receive(GET) == table[f.OK_CLOSE]
    assert proto.closing and rules.answered == 2


def test_expect_continue_then_body() -> None:
    proto, _rules, table = protocol()
    head = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    assert proto.receive(head) == table[f.CONTINUE]
    assert proto.receive(b"abc") == table[f.OK]


def test_head_timeout_and_body_timeout_give_408() -> None:
    clock = Clock()
    proto, rules, table = protocol(clock)
    assert proto.receive(b"GET / HT") == b""
    assert proto.tick(clock.now + 9) == b""
    assert proto.tick(clock.now + 10) == table[f.REQUEST_TIMEOUT]
    assert proto.closing and rules.rejected == 1 and rules.answered == 1
    proto, rules, table = protocol(clock)
    assert proto.receive(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab") == b""
    outs = [proto.tick(clock.now + i) for i in range(61)]
    assert outs[:-1] == [b""] * 60 and outs[-1] == table[f.REQUEST_TIMEOUT]


def test_alpn_h2_gets_the_http2_core_and_anything_else_http11() -> None:
    from vrypt_worker.h2 import H2Answers, H2Config, H2cPolicy, H2Protocol
    from vrypt_worker.protocols import ProtocolFactory

    worker = SimpleNamespace(
        rules=FramingRules(),
        responses=ResponseTable(0),
        head_timeout=10,
        body_timeout=60,
    )
    factory = ProtocolFactory(worker, H2cPolicy(), H2Config(), H2Answers(0))
    assert isinstance(factory.for_alpn("h2"), H2Protocol)
    assert isinstance(factory.for_alpn("http/1.1"), H1Protocol)
    assert isinstance(factory.for_alpn(None), H1Protocol)


REQUESTS = [
    GET,
    b"HEAD / HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nok",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"\x16\x03\x01 not http",
]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    picks=st.lists(st.integers(0, len(REQUESTS) - 1), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 40), max_size=60),
)
def test_any_split_gives_the_answers_of_one_read(picks: list[int], cuts: list[int]) -> None:
    """H1Protocol fed a stream in any pieces answers exactly as when fed it whole (and as the
    framer does: the plain path's answers)."""
    stream = b"".join(REQUESTS[i] for i in picks)
    whole, _rules, _table = protocol()
    expected = whole.receive(stream)
    while more := whole.writable():
        expected += more
    split, _rules, _table = protocol()
    got = b""
    position = 0
    for cut in [*cuts, len(stream)]:
        if position >= len(stream):
            break
        got += split.receive(stream[position : position + cut])
        while more := split.writable():
            got += more
        position += cut
    assert got == expected
    assert split.closing == whole.closing

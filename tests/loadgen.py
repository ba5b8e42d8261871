"""A load client that classifies every request's fate, for the reliability tests and docs.

`python -m tests.loadgen --port P --mode keepalive|close --connections N --duration S` drives N
connections on one selector for S seconds and prints one JSON object of counts. It is a plain
program (no pytest) so that a test can run it anywhere the server runs, inside a private network
namespace included.

Every request ends in exactly one of these counts:

- `ok`: the complete `200 Vrypt` answer.
- `refused`: connect() was refused (no listener on the port at that instant). Nothing was
  accepted, so nothing is lost; the client tries again 10 ms later. Counted per attempt.
- `connect_reset`: connect() itself failed with a reset: the listener that answered the SYN closed
  before the handshake completed and no sibling listener took it over. The client never had a
  connection and sent nothing, so nothing is lost either; it tries again 10 ms later.
- `stale`: a reused keep-alive connection closed (FIN or RST) before any byte of the answer. The
  request is sent again on a new connection, as RFC 9112 §9.3.1.1 lets a client do for an
  idempotent request and as browsers, urllib3 and Go's net/http do. The retry is counted in its own
  right (so `ok` includes it); `stale` says how often the race happened.
- `reset`: a fresh connection (its first request) closed or reset before any byte of the answer.
  LOST: the kernel accepted it, no worker answered it.
- `truncated`: part of an answer, then the connection ended. LOST.
- `timeout`: no complete answer within `--deadline` seconds. LOST.
- `bad`: an answer that is not the `200 Vrypt` (or bytes nobody asked for). LOST.
- `connect_error`: connect() failed otherwise (e.g. EADDRNOTAVAIL). LOST.

`closes` counts answers that said `Connection: close` (the server's way to end a keep-alive
connection cleanly) and `connections` the connections opened.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REQUESTS = {
    "keepalive": b"GET /load HTTP/1.1\r\nHost: load\r\n\r\n",
    "close": b"GET /load HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n",
}
LOST_KINDS = ("reset", "truncated", "timeout", "bad", "connect_error")
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection: *close", re.IGNORECASE)
_REFUSED_PAUSE = 0.01


@dataclass
class Tally:
    ok: int = 0
    refused: int = 0
    connect_reset: int = 0
    stale: int = 0
    reset: int = 0
    truncated: int = 0
    timeout: int = 0
    bad: int = 0
    connect_error: int = 0
    closes: int = 0
    connections: int = 0
    # the longest time with no answer at all on this client's connections: a replaced worker's
    # gap, seen from outside
    max_gap_ms: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few unusual errors, for reports

    @property
    def lost(self) -> int:
        return sum(getattr(self, kind) for kind in LOST_KINDS)

    def add(self, other: Tally) -> None:
        for name, value in asdict(other).items():
            if isinstance(value, list):
                getattr(self, name).extend(value)
            elif name == "max_gap_ms":
                self.max_gap_ms = max(self.max_gap_ms, value)  # type: ignore[arg-type]
            else:
                setattr(self, name, getattr(self, name) + value)
        del self.errors[10:]

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out["lost"] = self.lost
        out["max_gap_ms"] = round(self.max_gap_ms, 3)
        lat = sorted(self.latencies_ms)
        if lat:
            out["p50_ms"] = round(lat[len(lat) // 2], 3)
            out["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3)
            out["max_ms"] = round(lat[-1], 3)
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Tally:
        tally = cls()
        for name in asdict(tally):
            if name in data:
                setattr(tally, name, data[name])
        return tally


class _Conn:
    __slots__ = ("buf", "reused", "sent_at", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.reused = False  # at least one answer arrived on this connection
        self.sent_at = 0.0
        self.state = "connecting"


class Load:
    """N client connections on one selector; each sends a request, reads its answer, repeats."""

    def __init__(
        self,
        host: str,
        port: int,
        mode: str,
        connections: int,
        deadline: float = 10.0,
    ) -> None:
        self.addr = (host, port)
        self.request = REQUESTS[mode]
        self.close_mode = mode == "close"
        self.connections = connections
        self.deadline = deadline
        self.tally = Tally()
        self.last_answer_at = 0.0
        self.sel = selectors.DefaultSelector()
        self.retry_at: list[float] = []  # connections waiting to reconnect after a refusal
        self.stopping = False
        self.live: set[_Conn] = set()

    # one connection's life ------------------------------------------------------------------

    def _open(self) -> None:
        if self.stopping:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock)
        self.tally.connections += 1
        err = sock.connect_ex(self.addr)
        if err in (0, errno.EINPROGRESS):
            self.live.add(conn)
            conn.sent_at = time.monotonic()
            self.sel.register(sock, selectors.EVENT_WRITE, conn)
            return
        sock.close()
        self._connect_failed(err)

    def _connect_failed(self, err: int) -> None:
        if err == errno.ECONNREFUSED:
            self.tally.refused += 1
        elif err == errno.ECONNRESET:
            self.tally.connect_reset += 1
        else:
            self.tally.connect_error += 1
            self._note(f"connect: {errno.errorcode.get(err, err)}")
        self.retry_at.append(time.monotonic() + _REFUSED_PAUSE)

    def _note(self, text: str) -> None:
        if len(self.tally.errors) < 10:
            self.tally.errors.append(text)

    def _drop(self, conn: _Conn) -> None:
        self.live.discard(conn)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _send(self, conn: _Conn) -> None:
        conn.state = "waiting"
        conn.buf = b""
        conn.sent_at = time.monotonic()
        try:
            conn.sock.send(self.request)  # tiny: always fits an empty send buffer
        except OSError as exc:
            self._ended(conn, exc)
            return
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _ended(self, conn: _Conn, exc: OSError | None) -> None:
        """The connection closed or failed while an answer was owed."""
        if conn.buf:
            self.tally.truncated += 1
            self._note(f"truncated after {len(conn.buf)} bytes: {exc!r}")
            self._drop(conn)
            self._open()
        elif conn.reused:
            self.tally.stale += 1  # retried below on a fresh connection
            self._drop(conn)
            self._open()
        else:
            self.tally.reset += 1
            self._note(f"fresh connection ended before any answer byte: {exc!r}")
            self._drop(conn)
            self._open()

    def _on_event(self, conn: _Conn) -> None:
        if conn.state == "connecting":
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop(conn)
                self._connect_failed(err)
                return
            if self.stopping:
                self._drop(conn)
                return
            self._send(conn)
            return
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._ended(conn, exc)
            return
        if not data:
            self._ended(conn, None)
            return
        conn.buf += data
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = buf[: end + 2]
        length = _LENGTH.search(head)
        if length is None:
            self.tally.bad += 1
            self._note(f"no Content-Length: {head[:200]!r}")
            self._drop(conn)
            self._open()
            return
        total = end + 4 + int(length.group(1))
        if len(buf) < total:
            return
        if not head.startswith(b"HTTP/1.1 200 OK\r\n") or buf[end + 4 : total] != b"Vrypt":
            self.tally.bad += 1
            self._note(f"bad answer: {buf[:200]!r}")
            self._drop(conn)
            self._open()
            return
        if len(buf) > total:
            self.tally.bad += 1
            self._note(f"bytes after the answer: {buf[total:200]!r}")
            self._drop(conn)
            self._open()
            return
        self.tally.ok += 1
        now = time.monotonic()
        self.tally.latencies_ms.append((now - conn.sent_at) * 1000)
        if self.last_answer_at:
            self.tally.max_gap_ms = max(self.tally.max_gap_ms, (now - self.last_answer_at) * 1000)
        self.last_answer_at = now
        closing = _CLOSE.search(head) is not None
        if closing:
            self.tally.closes += 1
        elif self.close_mode:
            self.tally.bad += 1  # asked to close, yet the answer does not say so
            self._note(f"close request answered without close: {head!r}")
        if closing or self.close_mode or self.stopping:
            self._drop(conn)
            self._open()
            return
        conn.reused = True
        self._send(conn)

    # the loop --------------------------------------------------------------------------------

    def run(self, duration: float) -> Tally:
        for _ in range(self.connections):
            self._open()
        stop_at = time.monotonic() + duration
        hard_stop = stop_at + self.deadline + 1
        while True:
            now = time.monotonic()
            if not self.stopping and now >= stop_at:
                self.stopping = True
                self.retry_at.clear()
                for conn in list(self.live):
                    if conn.state == "connecting":
                        self._drop(conn)
            if self.stopping and not self.live:
                break
            if now >= hard_stop:
                break
            for event_key, _mask in self.sel.select(0.05):
                self._on_event(event_key.data)
            now = time.monotonic()
            if self.retry_at and not self.stopping:
                due = [t for t in self.retry_at if t <= now]
                if due:
                    self.retry_at = [t for t in self.retry_at if t > now]
                    for _ in due:
                        self._open()
            for conn in list(self.live):
                if now - conn.sent_at > self.deadline:
                    if conn.state == "connecting":
                        self.tally.connect_error += 1
                        self._note("connect timed out")
                    else:
                        self.tally.timeout += 1
                        self._note(f"no answer in {self.deadline}s (got {conn.buf[:100]!r})")
                    self._drop(conn)
                    self._open()
        for conn in list(self.live):
            self.tally.timeout += 1
            self._drop(conn)
        self.sel.close()
        return self.tally


def spawn(
    port: int,
    mode: str,
    connections: int,
    duration: float,
    host: str = "127.0.0.1",
    latencies: bool = False,
) -> subprocess.Popen[str]:
    """Start this client as a process of its own (the caller's CPU stays free for signals)."""
    cmd = [
        sys.executable, "-m", "tests.loadgen",
        "--host", host, "--port", str(port), "--mode", mode,
        "--connections", str(connections), "--duration", str(duration),
    ]  # fmt: skip
    if latencies:
        cmd.append("--latencies")
    return subprocess.Popen(
        cmd, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True
    )


def collect(proc: subprocess.Popen[str], timeout: float = 60) -> Tally:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"load client failed ({proc.returncode}): {out}"
    return Tally.from_json(json.loads(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.loadgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=sorted(REQUESTS), default="keepalive")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--latencies", action="store_true", help="keep every latency (JSON)")
    args = parser.parse_args(argv)
    load = Load(args.host, args.port, args.mode, args.connections, args.deadline)
    tally = load.run(args.duration)
    data = asdict(tally)
    data.update({k: v for k, v in tally.summary().items() if k.endswith("_ms")})
    if not args.latencies:
        data["latencies_ms"] = []
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

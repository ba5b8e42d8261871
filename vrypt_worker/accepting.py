"""The listeners a worker accepts from: one read watcher each on the hub, paused at the
connection cap, backed off after EMFILE and friends, and the options every listener passes on to
the connections it accepts. What an accepted connection becomes is the worker's choice
(intake.py, called from `VryptWorker._accept_one`); this module only decides when the worker is
called.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from vrypt_worker.connection import READ

# After EMFILE/ENFILE, accepting pauses this long instead of spinning on a queue it cannot drain.
BACKOFF = 0.5
# The kernel's send buffer per connection (it doubles the value: 128 KiB, about 1,000 answers).
# Left to autotuning, a client that pipelines and never reads makes the kernel hold megabytes of
# our answers for it: with 3,000 such clients the machine's TCP memory went into pressure and a
# normal client waited 4 s (p99; nginx, also autotuned, over 10 s). Fixed at this size: 0.05 ms.
# Our answers are small, so a bigger buffer buys nothing but memory. Set on the listener once.
SNDBUF = 64 * 1024

Pair = tuple[Any, socket.socket]  # (read watcher, listener)


def raw_socket(listener: Any) -> Any:
    """The socket of a gunicorn listener object (None once closed), or the socket itself."""
    return listener.sock if hasattr(listener, "sock") else listener


def raise_nofile_limit(need: int) -> None:
    """Raise the soft limit on descriptors to `need`, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def defer_accepts(sock: socket.socket, on: bool) -> None:
    """TCP_DEFER_ACCEPT, the listener's own option (shared by every worker that holds it):
    1 s, the kernel's first SYN-ACK retransmission, after which a connection that has sent
    nothing is handed over anyway."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, int(on))


class Listening:
    """The worker's accepting listeners. `on_acceptable(listener, family)` is called from the
    loop when one of them has a connection queued."""

    def __init__(
        self, log: Any, on_acceptable: Callable[[socket.socket, int], None], defer_accept: bool
    ) -> None:
        self.loop: Any = None  # the hub's loop, once the worker runs (start)
        self.log = log
        self.on_acceptable = on_acceptable
        self.defer_accept = defer_accept
        self.pairs: list[Pair] = []
        self.paused = False
        self.draining = False  # no resume once the worker drains
        self._last_error = 0.0

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def start(self, loop: Any, listeners: list[socket.socket]) -> None:
        self.loop = loop
        for sock in listeners:
            sock.setblocking(False)
            self.add(sock)

    def add(self, sock: socket.socket) -> Pair:
        """Accept from `sock` too (started at once unless accepting is paused)."""
        self.tune(sock)
        pair = (self.loop.io(sock.fileno(), READ), sock)
        self.pairs.append(pair)
        if not self.paused and not self.draining:
            pair[0].start(self.on_acceptable, sock, int(sock.family))
        return pair

    def remove(self, pair: Pair) -> None:
        pair[0].close()
        self.pairs.remove(pair)

    def close(self) -> None:
        for watcher, _sock in self.pairs:
            watcher.close()
        self.pairs.clear()

    def tune(self, sock: socket.socket) -> None:
        """Options TCP listeners pass on to the connections they accept (Linux), set once."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        defer_accepts(sock, self.defer_accept)

    def defer(self, on: bool) -> None:
        for _watcher, sock in self.pairs:
            defer_accepts(sock, on)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            for watcher, _sock in self.pairs:
                watcher.stop()

    def resume(self, force: bool = False) -> None:
        if (self.paused or force) and not self.draining:
            self.paused = False
            for watcher, sock in self.pairs:
                watcher.start(self.on_acceptable, sock, int(sock.family))

    def back_off(self, exc: OSError, room: Callable[[], bool]) -> None:
        """Out of descriptors or memory: pause for BACKOFF, then resume if `room()` says so."""
        now = time.monotonic()
        if now - self._last_error > 60:
            self._last_error = now
            self.log.warning("accept failed (%s): pausing accepts for %.1fs", exc, BACKOFF)
        self.pause()
        timer = self.loop.timer(BACKOFF)
        timer.start(self._end_back_off, timer, room)

    def _end_back_off(self, timer: Any, room: Callable[[], bool]) -> None:
        timer.close()
        if room():
            self.resume()

"""VryptWorker: gunicorn's worker lifecycle around one gevent hub serving raw sockets.

The path of one request: the hub's epoll reports a client socket readable and calls
`Connection.on_readable` directly in the loop (no greenlet switch); it does one `recv`, hands the
bytes to the connection's `RequestFramer`, and sends the precomputed answers for every complete
request in that read with one `send`. Everything else here is lifecycle: accepting, the connection
cap, timeouts, signals, draining on shutdown and recycling.
"""

from __future__ import annotations

import errno
import gc
import heapq
import itertools
import logging
import os
import pprint
import resource
import signal
import socket
import sys
import time
from _socket import socket as RawSocket
from typing import Any

import gevent
import gevent.event
from gunicorn.workers.base import Worker

from vrypt_worker import cleartext, listeners, metrics, settings, tls, transport
from vrypt_worker.framing import (
    CLOSING,
    FIELDS_TOO_LARGE,
    OK_CLOSE_HEAD,
    OK_HEAD,
    REQUEST_TIMEOUT,
    FramingRules,
    Limits,
    RequestFramer,
)
from vrypt_worker.h2 import H2Answers, H2Config, H2cPolicy
from vrypt_worker.response import ResponseTable
from vrypt_worker.transport import TLSConnection

# gevent imports pprint the first time a signal handler is installed (gevent.util), which every
# worker does in init_signals: imported with this module, in the arbiter, it costs no worker's
# boot (a few milliseconds each, measured with cProfile; a recycled worker's slot waits for them).
_PRELOADED = (pprint,)
_READ, _WRITE = 1, 2
_STREAM = socket.SOCK_STREAM
# A connection whose first bytes were read at its accept has O_NONBLOCK set already: with
# SOCK_NONBLOCK in the type its socket object agrees (timeout 0) without the ioctl setblocking
# makes.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
# The cache's answer for a head it does not hold: above every bare answer kind, so the hot path
# leaves it to the framer.
_UNCACHED = 1 << 16
# Closed connections leave their stopped read watcher here for the next accepted one (its fd is
# set, no new object, and no fcntl: gevent checks a descriptor with F_GETFD when it makes a
# watcher); at most this many wait.
_SPARE_READERS = 256
_RECV_SIZE = 65536
# A connection's reads start at this size: a bytes object of up to 512 bytes (33 of them its
# header) comes from CPython's small-object allocator, while a 64 KiB receive buffer goes through
# malloc and is shrunk with realloc on every read (about 500 more instructions per request,
# measured with callgrind). A read that fills it moves the connection to _RECV_SIZE for good.
# Reads and writes stay socket.recv/socket.send (recvfrom/sendto): os.read/os.write on the
# descriptor parse their arguments for about 800 fewer user-space instructions per request, but
# the kernel's read/write path costs more than that on a socket (perf: +0.35 µs per read and
# +0.4 µs per write against recvfrom/sendto), so they lose overall. docs/performance.md.
_FIRST_RECV_SIZE = 512 - 33
# Accepts per readable event on one listener. Several workers share the load through
# SO_REUSEPORT or a shared queue, so a worker takes a batch and lets the loop serve its clients.
_MAX_ACCEPT = 64
# After EMFILE/ENFILE, accepting pauses this long instead of spinning on a queue it cannot drain.
_ACCEPT_BACKOFF = 0.5
# A connection whose last answer said `close` is shut for writing and read until the peer closes,
# so that unread request bytes do not turn our close into a reset that destroys the answer: for
# at most this many sweeps.
_LINGER_TICKS = 2
# Draining: a connection with no request in progress may have one on the wire (a client that has
# just connected, a keep-alive client about to send its next request). It gets this long for that
# request to arrive and be answered with `Connection: close` before it is closed as idle.
_DRAIN_GRACE = 0.2
# ...but a connection that has not sent a single byte yet is a client that has just connected
# (its request follows the handshake, later on a busy machine) or a load balancer's spare: it gets
# this long from its accept (or from the start of the drain) before it is closed as idle.
_FRESH_GRACE = 1.0
# A recycled worker keeps serving its slot at most this long for the successor it asked the
# arbiter for (a reload in progress, say, keeps the arbiter busy); then it leaves as before.
_SUCCESSOR_WAIT = 2.0
_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info


def _raw(listener: Any) -> Any:
    """The socket of a gunicorn listener object (None once closed), or the socket itself."""
    return listener.sock if hasattr(listener, "sock") else listener


def never_received(sock: Any) -> bool:
    """The peer has sent nothing on this TCP connection yet (kernel's count, not ours)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_RECEIVED + 8)
    except OSError:
        return False
    if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
        return False
    return int.from_bytes(info[_TCP_INFO_BYTES_RECEIVED:], "little") == 0


# TERM with listeners that each worker binds itself (reuse_port with systemd's sockets, the one
# case that is not served from the arbiter's slots, listeners.py): a reload (HUP) forks the new
# workers and TERMs the old ones at once, before the new ones have bound. The old one keeps
# accepting this long (every answer now says close) so that the port is never without a listener.
_HANDOVER = 0.2
# TCP_DEFER_ACCEPT keeps a connection that has completed its handshake in the listener's SYN
# queue until its first bytes arrive, and closing the last descriptor of a listener resets what
# that queue holds. A worker TERMed (which may be the server's stop) therefore stops deferring at
# once (new handshakes go to the accept queue, which it takes before it closes) and keeps
# accepting at least this long, so that the requests of connections deferred before the TERM
# arrive and are answered. A client's first bytes follow its handshake by one trip at most.
_DEFER_SETTLE = 0.3
_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_NOT_LISTENING = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK))
# Pipelined answers are rendered at most this many at a time. More than that (one 64 KiB read of
# small requests owes thousands) are kept as counts per kind: a client that pipelines and never
# reads then costs one partial answer and a count, not the answers' bytes (issue 14: 3,000 such
# clients held 1.2 GB when answers were buffered).
_BATCH = 64
# At the connection cap or out of descriptors, idle keep-alive connections (least recently used
# first) are closed to make room, as nginx's ngx_drain_connections does: an eighth of them, at
# least one and at most 32.
_EVICT = 32
# A partial head up to this size is always held (nginx holds up to 4 x 8 KB); a bigger one only
# while the worker's partial heads together stay within VRYPT_HEAD_BUFFER, else it gets 431.
_SMALL_HEAD = 32 * 1024
# A read whose body had more chunk-size lines than this parsed one at a time (chunks with
# extensions, leading zeros or 16+ bytes: about 1.5 µs each, so up to 14 ms for 64 KiB) moves
# its connection to reads of _CHUNKY_RECV_SIZE: about 1 ms of one loop turn at most, so a
# client sending such a body cannot hold up the others for longer.
_MANY_CHUNK_LINES = 256
_CHUNKY_RECV_SIZE = 4096
# The kernel's send buffer per connection (it doubles the value: 128 KiB, about 1,000 answers).
# Left to autotuning, a client that pipelines and never reads makes the kernel hold megabytes of
# our answers for it: with 3,000 such clients the machine's TCP memory went into pressure and a
# normal client waited 4 s (p99; nginx, also autotuned, over 10 s). Fixed at this size: 0.05 ms.
# Our answers are small, so a bigger buffer buys nothing but memory. Set on the listener once.
_SNDBUF = 64 * 1024
DEFAULT_HEAD_TIMEOUT = 10
# The other per-request timeouts and the partial-head budget: (default, what it bounds).
TIMEOUTS = {
    "VRYPT_HEAD_TIMEOUT": DEFAULT_HEAD_TIMEOUT,  # a head's first byte to its end, then 408
    "VRYPT_BODY_TIMEOUT": 60,  # between two reads of a body, then 408 (nginx: 60 s too)
    "VRYPT_SEND_TIMEOUT": 60,  # answers owed, none taken for this long: close (nginx: 60 s)
}
DEFAULT_HEAD_BUFFER = 32 * 1024 * 1024
HOSTILE_SETTINGS = {**TIMEOUTS, "VRYPT_HEAD_BUFFER": DEFAULT_HEAD_BUFFER}


def positive_int_from_env(name: str, default: int) -> int:
    """A positive integer setting from the environment; a bad value raises ValueError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        unit = "bytes" if name == "VRYPT_HEAD_BUFFER" else "seconds"
        raise ValueError(f"{name}={raw!r}: expected a whole number of {unit}, at least 1")
    return value


def hostile_setting_from_env(name: str) -> int:
    """One of HOSTILE_SETTINGS (a timeout in seconds, or VRYPT_HEAD_BUFFER in bytes)."""
    return positive_int_from_env(name, HOSTILE_SETTINGS[name])


def head_timeout_from_env() -> int:
    """VRYPT_HEAD_TIMEOUT: seconds from a request head's first byte to its end (slowloris)."""
    return positive_int_from_env("VRYPT_HEAD_TIMEOUT", DEFAULT_HEAD_TIMEOUT)


def hostile_settings_from_env() -> dict[str, int]:
    """Every VRYPT_* timeout (seconds) and VRYPT_HEAD_BUFFER (bytes), validated."""
    return {name: hostile_setting_from_env(name) for name in HOSTILE_SETTINGS}


def tcp_migrate_req_enabled() -> bool:
    """Whether the kernel hands a closing SO_REUSEPORT listener's queue to its siblings."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as sysctl:
            return sysctl.read().strip() == "1"
    except OSError:
        return False


def _spawn_replacements_at_once(arbiter: Any) -> None:
    """gunicorn's spawn_workers sleeps up to 0.1 s (at random) after every fork, to stagger
    workers that start together, and handles no signal meanwhile. That sleep delays the next
    replacement: with max_requests 1000 a worker lives a few tens of milliseconds under load, so
    with one worker the port spent most of its time waiting for the arbiter (docs/reliability.md).
    These workers boot in milliseconds and their listeners need no staggering (SO_REUSEPORT
    slots, no accept herd), so the arbiter forks every missing worker at once."""
    if getattr(arbiter, "_vrypt_spawn_patched", False):
        return

    def spawn_workers() -> None:
        for _ in range(arbiter.num_workers - len(arbiter.WORKERS)):
            arbiter.spawn_worker()

    arbiter.spawn_workers = spawn_workers
    if listeners.slot_mode():
        # max_requests: the successor is forked before the old worker stops serving its slot
        arbiter.manage_workers = listeners.succession(arbiter, arbiter.manage_workers)
    arbiter._vrypt_spawn_patched = True


_fork_hooked = False


def _freeze_heap_at_fork() -> None:
    """Every fork of the arbiter hands its objects to the worker in the garbage collector's
    permanent generation (gc.freeze), and takes them back right after (gc.unfreeze), so that the
    arbiter still collects its own garbage. A worker's collections then never walk the objects it
    inherited: walking them writes their GC headers, which copies every page they live on out of
    the memory shared with the arbiter (docs/performance.md, "Memory")."""
    global _fork_hooked
    if not _fork_hooked:
        os.register_at_fork(before=gc.freeze, after_in_parent=gc.unfreeze)
        _fork_hooked = True


class VryptWorker(Worker):
    """A gunicorn worker that answers every HTTP request with `Vrypt`, without WSGI."""

    @classmethod
    def setup(cls) -> None:
        """gunicorn calls this from Arbiter.setup, before it binds (at start and on reload):
        the arbiter's SO_REUSEPORT listener slots are made here (listeners.py)."""
        # Loaded here, in the arbiter, rather than in every worker's run(): a module imported
        # after the fork is executed again in each worker (it imports this module, so not at
        # the top).
        from vrypt_worker import access_log  # noqa: F401

        _freeze_heap_at_fork()
        arbiter = listeners.calling_arbiter(2)
        if arbiter is not None:
            listeners.prepare(arbiter)
            _spawn_replacements_at_once(arbiter)

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs once in the arbiter before any worker starts: refuse what we cannot honour."""
        refused = []
        if cfg.is_ssl:
            try:  # made here, in the arbiter, so that every worker shares its ticket keys
                tls.context_for(cfg)
            except Exception as exc:
                refused.append(
                    "TLS settings that cannot be loaded (certfile, keyfile, ca_certs, ciphers, "
                    f"ssl_context): {exc}"
                )
        if (cfg.proxy_protocol or "off") != "off":
            refused.append("proxy_protocol: PROXY protocol headers are not parsed")
        if cfg.protocol != "http":
            refused.append(f"protocol={cfg.protocol}: only http is served")
        if cfg.reuse_port and any(not isinstance(address, tuple) for address in cfg.address):
            # gunicorn sets SO_REUSEPORT on every listener it creates; unix sockets refuse it and
            # inherited descriptors are ignored, so the worker would loop on errors instead.
            refused.append(
                "reuse_port with a unix: or fd:// bind: set VRYPT_REUSE_PORT=0 (one shared "
                "listener) for unix sockets and inherited descriptors"
            )
        if refused:
            raise RuntimeError(
                "vrypt_worker.VryptWorker cannot honour these settings: " + "; ".join(refused)
            )
        # A bad VRYPT_* variable or answer setting stops the start here, in the arbiter, with
        # a message naming it (exit 2), instead of failing in every worker; the chosen answer is
        # inherited by every worker forked after this.
        settings.check_at_start(cfg, log)
        if cfg.reuse_port and not tcp_migrate_req_enabled():
            # Only where the arbiter could not hold the listeners (systemd's sockets with
            # reuse_port): then every worker binds its own, and its exit resets its queue.
            log.warning(
                "reuse_port is on with listeners each worker binds itself, and "
                "net.ipv4.tcp_migrate_req is not 1: connections still queued on a worker's "
                "listener when it exits are reset by the kernel. Set VRYPT_REUSE_PORT=0 with "
                "systemd sockets; see docs/reliability.md"
            )
        if listeners.slot_mode():
            # gunicorn's `Listening at:` names every slot's listener, so an address shows once per
            # worker: say why, once.
            log.info(
                "vrypt_worker: one SO_REUSEPORT listener per worker on each address, kept by "
                "the arbiter so that restarts never leave the port without one "
                "(VRYPT_REUSE_PORT=0 for a single shared listener)"
            )
        metrics.start(cfg, log)  # shared counter slots and the StatsD pusher, before any fork

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[Connection] = set()
        self.rules = FramingRules(
            Limits.from_settings(
                self.cfg.limit_request_line,
                self.cfg.limit_request_fields,
                self.cfg.limit_request_field_size,
            )
        )
        # Metrics: a counter slot in shared memory, claimed here in the arbiter (metrics.py). A
        # reused slot goes on from its counts, and the recycling threshold moves with them.
        self.counts, self.slot_base, self.rules.answered, self.rules.rejected = metrics.claim(self)
        # Listeners: with reuse_port, a slot of the arbiter's SO_REUSEPORT listeners (the
        # others' slots are inherited too, to adopt one whose worker is gone); else gunicorn's.
        # The arbiter object (this runs in its spawn_worker): the worker_exit hook's argument.
        self._arbiter = listeners.calling_arbiter(1)
        self.slot = -1
        self.spare_slots: dict[int, list[Any]] = {}
        if listeners.slot_mode():
            self.slot, self.sockets, self.spare_slots = listeners.assign(self)
        self._adopted: dict[int, list[tuple[Any, Any]]] = {}
        self._old: set[Connection] = set()
        self._late: dict[Connection, float] = {}  # accepted while draining: when
        self._drain_started = 0.0
        self._listeners_closed = False
        self._settle_until = 0.0  # after TERM: listeners stay open until then (_DEFER_SETTLE)
        self._settling: Any = None  # the timer that closes them then
        self._awaiting_successor = False
        if self.max_requests < sys.maxsize:
            self.max_requests += self.rules.answered
        # The answer that reaches max_requests says `Connection: close` (see FramingRules);
        # keepalive = 0 means no keep-alive at all, as in gunicorn's own workers.
        self.rules.open_until = self.max_requests - 1 if self.cfg.keepalive > 0 else 0
        hostile = hostile_settings_from_env()
        self.head_timeout = hostile["VRYPT_HEAD_TIMEOUT"]  # a TLS handshake's bound too
        self.body_timeout = hostile["VRYPT_BODY_TIMEOUT"]
        self.send_timeout = hostile["VRYPT_SEND_TIMEOUT"]
        self.head_budget = hostile["VRYPT_HEAD_BUFFER"]
        self.held = 0  # bytes of partial heads (and chunk lines) held by all connections
        self.accepted = 0  # connections accepted so far (their order, for eviction)
        # The timer wheel (see the Connection section below): sweeps so far, and the connections
        # each coming sweep must look at, by its tick, as (tick, set): a connection's `due` is
        # that tuple's int, one object for all of them (an int of its own would be 32 bytes
        # each); `_arrivals` is the next sweep's set. `unread`: `seen` of a connection accepted
        # since the last sweep and never read, -1 - tick (shared likewise).
        self.tick = 0
        self.unread = -1
        self._arrivals: set[Connection] = set()
        self._arrival_tick = 1
        self.wheel: dict[int, tuple[int, set[Connection]]] = {1: (1, self._arrivals)}
        self.spare_readers: list[Any] = []
        self.draining = False
        self._accepting: list[tuple[Any, socket.socket]] = []
        self.max_connections = self.cfg.worker_connections
        self._accept_paused = False
        self._stopped = False
        self._last_accept_error = 0.0
        # The access log, when gunicorn's logger has it on, swaps in LoggingConnection at start
        # (access_log.py), so with it off the request path has not one check more.
        self.connection_class: type[Connection] = Connection
        # TCP_DEFER_ACCEPT: the kernel hands over a connection once its first bytes arrived (or
        # after a second without any), so plain HTTP/1 connections are read at their accept
        # (_read_at_accept). Set in run(), once the connection class is known.
        self.defer_accept = settings.env_flag("VRYPT_DEFER_ACCEPT", True)
        self.read_at_accept = False
        self.access_log: Any = None
        # TLS (gunicorn's certfile/keyfile): one context per configuration, made here in the
        # arbiter before the fork, so that every worker resumes every worker's sessions.
        self.tls_context = tls.context_for(self.cfg, self.log) if self.cfg.is_ssl else None

    # gunicorn lifecycle -------------------------------------------------------------------------

    def init_process(self) -> None:
        metrics.attach(self)
        gevent.reinit()  # the hub must not share an epoll instance with the arbiter
        self._raise_nofile_limit()
        super().init_process()

    def load_wsgi(self) -> None:
        self.wsgi = None  # the answer is fixed: never import the deployment's application

    def init_signals(self) -> None:
        # Signals arrive as libev watchers so their handlers run on the hub between callbacks,
        # never interrupting a send halfway.
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        gevent.signal_handler(signal.SIGTERM, self._on_term)
        gevent.signal_handler(signal.SIGQUIT, self._on_quit)
        gevent.signal_handler(signal.SIGINT, self._on_quit)
        gevent.signal_handler(signal.SIGUSR1, self.log.reopen_files)
        gevent.signal_handler(signal.SIGABRT, self._on_abort)
        # A sibling that stops serving its listener slot asks the others to adopt it now.
        gevent.signal_handler(signal.SIGWINCH, self._on_slots_changed)

    def notify(self) -> None:
        super().notify()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self._stop()

    def run(self) -> None:
        hub = gevent.get_hub()
        self.loop = loop = hub.loop
        self.responses = ResponseTable(time.time())
        from vrypt_worker import access_log  # imports this module

        self.access_log = access_log.start(self)
        # HTTP/1 inside TLS and HTTP/2 (by ALPN, or h2c from trusted peers) are protocols on
        # one generic transport (transport.py); plain HTTP/1 stays on Connection.
        self.protocols = cleartext.ProtocolFactory(
            self,
            H2cPolicy.from_config(self.cfg),
            H2Config.from_gunicorn(self.cfg, head_timeout=self.head_timeout),
            H2Answers(time.time()),
        )
        policy = self.protocols.policy
        # Only then does an accept look at the peer (h2c is for trusted peers only).
        self.h2c = self.protocols if policy.available and policy.mode != "off" else None
        if self.tls_context is not None:
            transport.serve_tls(self)  # TLSConnection instead of Connection
        # Plain HTTP/1 only (not TLS, not h2c); with the access log on too, which is told of an
        # answer given there.
        self.read_at_accept = self.defer_accept and self.tls_context is None and self.h2c is None
        self._done = gevent.event.Event()
        for listener in self.sockets:
            sock = _raw(listener)
            sock.setblocking(False)
            self._tune_listener(sock)
            watcher = loop.io(sock.fileno(), _READ)
            self._accepting.append((watcher, sock))
        self._resume_accepting(force=True)
        # Metrics: the answered count reaches shared memory once per loop iteration, just before
        # the hub waits for I/O again, instead of once per request (a memoryview store costs a
        # few hundred instructions; under load one iteration answers dozens of requests).
        publisher = loop.prepare()
        answered_at = self.slot_base + metrics.ANSWERED
        publisher.start(self._publish_answered, self.counts, answered_at, self.rules)
        if self.slot >= 0:
            listeners.claim(self.slot, first=True)
        clock = loop.timer(0.25, 0.25)
        clock.start(self._on_clock)
        sweep = loop.timer(1.0, 1.0)
        sweep.start(self._on_sweep)
        if self.cfg.reuse_port:  # listeners bound by each worker: the arbiter has none to name
            self.log.info(
                "Listening at: %s (worker %s)", ",".join(map(str, self.sockets)), self.pid
            )
        self.notify()
        try:
            self._done.wait()
        finally:
            publisher.stop()
            clock.stop()
            sweep.stop()
            for conn in list(self.connections):
                conn.close()
        self._exit_now()

    def _exit_now(self) -> None:
        """Leave without the interpreter's teardown (tens of milliseconds of freeing modules and
        the hub, measured with strace): with one worker, that time is the replacement's wait,
        since gunicorn forks it only once we are gone. Does first what gunicorn's spawn_worker
        does after run() returns: its log line, the heartbeat file, the worker_exit hook."""
        self.log.info("Worker exiting (pid: %s)", self.pid)
        try:
            self.tmp.close()
            if self._arbiter is not None:
                self.cfg.worker_exit(self._arbiter, self)
        except Exception:
            self.log.exception("Exception during worker exit")
        metrics.publish(self)
        if self.access_log is not None:
            self.access_log.close()  # the lines still collected, before the handlers close
        logging.shutdown()  # flushes every handler, gunicorn's included
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    # accepting ----------------------------------------------------------------------------------

    def _tune_listener(self, sock: socket.socket) -> None:
        """Options TCP listeners pass on to the connections they accept (Linux), set once."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        self._defer_accepts(sock, self.defer_accept)

    @staticmethod
    def _defer_accepts(sock: socket.socket, on: bool) -> None:
        """TCP_DEFER_ACCEPT, the listener's own option (shared by every worker that holds it):
        1 s, the kernel's first SYN-ACK retransmission, after which a connection that has sent
        nothing is handed over anyway."""
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, int(on))

    def _on_acceptable(self, listener: socket.socket, family: int) -> None:
        evicted = False
        for _ in range(_MAX_ACCEPT):
            # At the cap, a readable listener means a client waits: idle keep-alive connections
            # make room for it; with none, accepting pauses (the sweep retries once a second).
            if len(self.connections) >= self.max_connections and not self._make_room():
                self._pause_accepting()
                return
            try:
                if not self._accept_one(listener, family):
                    return
            except OSError as exc:
                if not evicted and self._make_room():
                    evicted = True
                    continue  # descriptors freed: take the waiting client now
                self._back_off_accepting(exc)
                return
            if len(self.connections) >= self.max_connections:
                return

    def _accept_one(self, listener: socket.socket, family: int) -> bool:
        """Accept one queued connection: False when the queue is empty. Raises OSError when
        the process is out of descriptors or memory (EMFILE and friends)."""
        while True:
            try:
                # socket.accept() would convert family and type to enums for every connection
                # and wrap the result in socket.py's class: the C-level pieces cost a fifth less
                # per new connection, and a Connection needs nothing more than they offer.
                fd, _addr = listener._accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    raise
                if exc.errno in _NOT_LISTENING:
                    return False  # closed under us (a drain that began in this batch)
                continue  # ECONNABORTED and the like: that client is gone, the next one is not
            if self.read_at_accept:
                self._read_at_accept(fd, family)
                return True
            sock = RawSocket(family, _STREAM, 0, fd)
            try:
                sock.setblocking(False)
            except OSError:
                sock.close()
                continue
            conn = None
            if self.h2c is not None:  # h2c for trusted peers (cleartext.py), else Connection
                negotiation = self.h2c.negotiation(_addr, sock)
                if negotiation is not None:
                    conn = TLSConnection(self, sock, cleartext.PLAIN, negotiation)
            self._add(conn if conn is not None else self.connection_class(self, sock))
            return True

    def _add(self, conn: Connection) -> None:
        self.connections.add(conn)
        conn.due = self._arrival_tick  # the wheel: looked at by the next sweep first
        self._arrivals.add(conn)
        if self.draining:
            self._late[conn] = time.monotonic()

    def _read_at_accept(self, fd: int, family: int) -> None:
        """A plain HTTP/1 connection, just accepted: with TCP_DEFER_ACCEPT its request is
        usually here already. Read it now; a whole cached head whose answer closes the connection
        (`Connection: close`, HTTP/1.0, draining: what health checks and probes send) is
        answered and closed on the descriptor, without a socket object, a watcher or a
        Connection (the hot path of Connection.on_readable and answer_and_close, for a
        connection that never reaches the loop), and reported to the access log when it is on.
        Anything else becomes a Connection, given what was read."""
        try:
            # os.set_blocking is one ioctl; fcntl.fcntl(fd, F_SETFL, O_NONBLOCK) would first try
            # its third argument as a buffer and format the TypeError it then drops (a tenth
            # of this path's instructions, measured with callgrind).
            os.set_blocking(fd, False)
            data: bytes | None = os.read(fd, _FIRST_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            data = None  # nothing yet (a second passed, or the option is off for this listener)
        except OSError:
            os.close(fd)
            return
        if data is not None:
            if not data:  # connected and closed without a request
                os.close(fd)
                return
            rules = self.rules
            if data == rules.recent_close_head:  # a probe's request again: no hashing
                kind = rules.recent_close_kind
            else:
                kind = rules.cache.get(data, _UNCACHED)
                if CLOSING <= kind <= OK_CLOSE_HEAD:
                    rules.recent_close_head = data
                    rules.recent_close_kind = kind
            if kind <= OK_CLOSE_HEAD and (kind >= CLOSING or rules.answered >= rules.open_until):
                kind = CLOSING | (kind & OK_HEAD)
                rules.answered += 1
                payload = self.responses.bytes_for[kind]
                try:
                    sent = os.write(fd, payload)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = len(payload)  # the client is gone: nothing more to send it
                if self.access_log is not None:  # its one test on this path, where it is used
                    self.access_log.accepted(fd, family, data, kind)
                if sent == len(payload):
                    os.close(fd)
                    if rules.answered >= self.max_requests:  # as in Connection.linger
                        self.recycle()  # may close the listener under _accept_one's loop
                    return
                conn = self.connection_class(self, RawSocket(family, _NONBLOCKING_STREAM, 0, fd))
                self._add(conn)
                conn.close_after(payload[sent:])
                return
        conn = self.connection_class(self, RawSocket(family, _NONBLOCKING_STREAM, 0, fd))
        self._add(conn)
        if data is not None:
            conn.seen = self.rules.tick
            conn.frame(data)

    def _make_room(self) -> bool:
        """Close some idle keep-alive connections, least recently used first (at the sweep's
        one-second resolution). False when none is idle."""
        idle = [conn for conn in self.connections if conn.evictable()]
        if not idle:
            return False
        count = max(1, min(_EVICT, len(idle) // 8))
        for conn in heapq.nlargest(count, idle, key=lambda conn: conn.idleness()):
            conn.close()
        return True

    def _pause_accepting(self) -> None:
        if not self._accept_paused:
            self._accept_paused = True
            for watcher, _sock in self._accepting:
                watcher.stop()

    def _resume_accepting(self, force: bool = False) -> None:
        if (self._accept_paused or force) and not self.draining:
            self._accept_paused = False
            for watcher, sock in self._accepting:
                watcher.start(self._on_acceptable, sock, int(sock.family))

    def _back_off_accepting(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_accept_error > 60:
            self._last_accept_error = now
            self.log.warning("accept failed (%s): pausing accepts for %.1fs", exc, _ACCEPT_BACKOFF)
        self._pause_accepting()
        timer = self.loop.timer(_ACCEPT_BACKOFF)
        timer.start(self._end_back_off, timer)

    def _end_back_off(self, timer: Any) -> None:
        timer.close()
        if len(self.connections) < self.max_connections:
            self._resume_accepting()

    def wake(self, conn: Connection, due: int) -> None:
        """The sweep of tick `due` (at the earliest the next one) looks at `conn`, unless one
        before it does already: a connection calls this when a timeout shorter than the one it
        was filed under starts (a head, a body, answers owed, lingering)."""
        tick = self.tick
        current = conn.due
        if tick < current <= due:
            return
        if due <= tick:
            due = tick + 1
        wheel = self.wheel
        if current > tick:
            filed = wheel.get(current)
            if filed is not None:
                filed[1].discard(conn)
        entry = wheel.get(due)
        if entry is None:
            wheel[due] = (due, {conn})
            conn.due = due
        else:
            entry[1].add(conn)
            conn.due = entry[0]

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        filed = self.wheel.get(conn.due)
        if filed is not None:
            filed[1].discard(conn)
        if self._late:
            self._late.pop(conn, None)
        if self._accept_paused and len(self.connections) < self.max_connections:
            self._resume_accepting()
        if self.draining:
            if self._old:
                self._old.discard(conn)
                if not self._old and self._accepting and not self._awaiting_successor:
                    self._close_listeners()  # the last connection from before the drain left
            if not self.connections and not self._accepting:
                self._stop()

    # listener slots (listeners.py) ----------------------------------------------------------------

    def _tend_slots(self) -> None:
        """Every clock tick: say again that this worker serves its slot, and serve any other
        slot nobody serves (its worker died or left and no replacement has claimed it)."""
        if self.draining:
            if self._accepting and (
                listeners.served_by_another(self.slot, self.ppid)
                or (
                    self._awaiting_successor
                    and not self._old
                    and time.monotonic() - self._drain_started > _SUCCESSOR_WAIT
                )
            ):
                self._close_listeners()  # a successor serves our slot: leave it to it
            return
        listeners.claim(self.slot)
        for slot, socks in self.spare_slots.items():
            orphan = listeners.orphaned(slot, self.ppid)
            if orphan and slot not in self._adopted:
                watchers = []
                for listener in socks:
                    sock = _raw(listener)
                    if sock is None:
                        break
                    self._tune_listener(sock)
                    watchers.append((self.loop.io(sock.fileno(), _READ), sock))
                self._adopted[slot] = watchers
                self._accepting.extend(watchers)
                if not self._accept_paused:
                    for watcher, sock in watchers:
                        watcher.start(self._on_acceptable, sock, int(sock.family))
            elif not orphan and slot in self._adopted:
                self._drop_adopted(slot)

    def _on_slots_changed(self) -> None:
        if self.slot >= 0 and getattr(self, "loop", None) is not None:
            self._tend_slots()

    def _drop_adopted(self, slot: int) -> None:
        for pair in self._adopted.pop(slot):
            pair[0].close()
            self._accepting.remove(pair)

    def _close_spare_copies(self) -> None:
        """Leaving: close our copies of the other slots' listeners, so that at shutdown each
        slot's socket closes with its own worker (which takes its queue first), not with us."""
        for slot in list(self._adopted):
            self._drop_adopted(slot)
        for socks in self.spare_slots.values():
            for listener in socks:
                try:
                    listener.close()
                except OSError:
                    pass
        self.spare_slots = {}

    # timers ---------------------------------------------------------------------------------------

    @staticmethod
    def _publish_answered(counts: Any, index: int, rules: FramingRules) -> None:
        counts[index] = rules.answered

    def _on_clock(self) -> None:
        now = time.time()
        self.responses.refresh(now)
        self.protocols.h2_answers.refresh(now)
        if self.slot >= 0:
            self._tend_slots()
        if self.defer_accept and not self.draining:
            # A worker TERMed turned deferral off on a listener it shares with us (a reload,
            # TTOU, a worker killed by hand): serving it, we turn it on again.
            for _watcher, sock in self._accepting:
                self._defer_accepts(sock, True)

    def _on_sweep(self) -> None:
        self.notify()
        metrics.publish(self)
        metrics.watch(self)  # takes over a dead metrics pusher's role (at most once per sweep)
        keepalive = max(self.cfg.keepalive, 1)  # 0 closes after each answer; idle bound 1 s
        now = time.monotonic()
        # The wheel: only the connections filed under this tick are looked at (their timeouts
        # are due, or they were accepted since the last sweep); each says when it is due next.
        tick = self.tick = self.rules.tick = self.tick + 1
        self.unread = -1 - tick
        _, due = self.wheel.pop(tick, (tick, None))
        self._arrival_tick, self._arrivals = self.wheel.setdefault(tick + 1, (tick + 1, set()))
        if due:
            connections = self.connections
            wake = self.wake
            for conn in due:
                later = conn.on_tick(keepalive, now)
                if conn in connections:  # None: a connection that wants every sweep
                    wake(conn, tick + 1 if later is None else later)
        if self._accept_paused and len(self.connections) >= self.max_connections:
            self._resume_accepting()  # paused at the cap: a waiting client retries _make_room
        if self.draining and self._accepting and time.monotonic() >= self._drain_deadline:
            self._close_listeners()
        if (
            self.draining
            and not self._accepting  # still listening during a handover
            and (not self.connections or time.monotonic() >= self._drain_deadline)
        ):
            if self.connections:
                self.log.warning(
                    "Worker graceful timeout (pid:%s): closing %d connections",
                    self.pid,
                    len(self.connections),
                )
            self._stop()

    # shutdown -------------------------------------------------------------------------------------

    def recycle(self) -> None:
        """max_requests (+ jitter) reached: drain and exit so the arbiter starts a fresh worker."""
        if not self.draining:
            self.log.info("Autorestarting worker after current request.")
            if self.slot >= 0 and self._arbiter is not None:
                # Keep serving the slot until the successor the arbiter forks now claims it
                # (_tend_slots), or _SUCCESSOR_WAIT has passed.
                self._awaiting_successor = True
                listeners.want_successor(self.slot)
            self.start_draining()

    def start_draining(self, handover: bool = False) -> None:
        """Stop accepting, answer what was received, close idle connections, then exit.
        With `handover`, keep accepting for _HANDOVER seconds first."""
        if self.draining:
            return
        self.draining = True
        self.alive = False
        self.rules.open_until = 0
        self._drain_started = time.monotonic()
        self._drain_deadline = self._drain_started + self.cfg.graceful_timeout
        if self.slot >= 0:
            # The slot's socket lives on in the arbiter, so nothing is lost whenever we stop
            # accepting. But our replacement is forked only once we have exited (recycling) or
            # may not come at all (TTOU, shutdown): keep serving the slot, every answer saying
            # close, until the connections we had before the drain are done or a successor
            # claims the slot (HUP); _tend_slots and connection_closed watch for both.
            self._close_spare_copies()
            self._old = set(self.connections)
            if listeners.served_by_another(self.slot, self.ppid) or not (
                self._old or self._awaiting_successor
            ):
                self._close_listeners()
                return
            for conn in list(self.connections):
                conn.drain()  # may close them all, and the listeners with the last one
            grace = self.loop.timer(_DRAIN_GRACE)
            grace.start(self._close_idle, grace)
            return
        if handover and self._accepting:
            timer = self.loop.timer(_HANDOVER)
            timer.start(self._close_listeners, timer)
        else:
            self._close_listeners()

    def _close_listeners(self, timer: Any = None) -> None:
        if timer is not None:
            timer.close()
        if self._listeners_closed:
            return
        settle = self._settle_until - time.monotonic()
        settled = (timer is not None and timer is self._settling) or (
            self.slot >= 0 and listeners.served_by_another(self.slot, self.ppid)
        )  # a successor holds the slot's socket: our close is not its last
        if self._accepting and settle > 0 and not settled:
            if self._settling is None:  # the connections deferred before the drain first
                self._settling = self.loop.timer(settle)
                self._settling.start(self._close_listeners, self._settling)
            return
        self._listeners_closed = True
        if self.slot >= 0:
            listeners.release(self.slot)
        self._old.clear()
        for watcher, _sock in self._accepting:
            watcher.close()
        self._accepting.clear()
        for listener in self.sockets:
            sock = _raw(listener)
            if sock is None:
                continue  # closed already
            self._accept_queued(sock)
            try:
                listener.close()
            except OSError:
                pass
        for conn in list(self.connections):
            conn.drain()
        if not self.connections:
            self._stop()
        else:
            grace = self.loop.timer(_DRAIN_GRACE)
            grace.start(self._close_idle, grace)

    def _close_idle(self, timer: Any) -> None:
        """Close the idle connections; one that has sent nothing yet gets _FRESH_GRACE (from its
        accept, or from the drain's start) and is looked at again until then."""
        timer.close()
        now = time.monotonic()
        waiting = False
        for conn in list(self.connections):
            since = self._late.get(conn, self._drain_started)
            if conn.close_if_idle(spare_fresh=now - since < _FRESH_GRACE):
                waiting = True
        if waiting and not self._stopped:
            again = self.loop.timer(0.1)
            again.start(self._close_idle, again)

    def _accept_queued(self, listener: socket.socket) -> None:
        """Take the connections already in this listener's queue before it closes: with
        per-worker SO_REUSEPORT listeners, closing resets them otherwise. They are taken, not
        read (drain() answers what they sent): answering at the accept would let a client that
        reconnects at once keep this loop, and its listener, going."""
        family = int(listener.family)
        read_at_accept, self.read_at_accept = self.read_at_accept, False
        try:
            for _ in range(10_000):
                if not self._accept_one(listener, family):
                    return
        except OSError:
            return
        finally:
            self.read_at_accept = read_at_accept

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.alive = False
            self._done.set()

    def _on_term(self) -> None:
        # TERM may be the server's stop, after which our close of a listener is its last:
        # connections the kernel still defers would be reset then (_DEFER_SETTLE). Recycling
        # never closes the last descriptor (the arbiter holds it), so it skips this.
        if self.defer_accept and not self._listeners_closed and not self._settle_until:
            self._settle_until = time.monotonic() + _DEFER_SETTLE
            for _watcher, sock in self._accepting:
                self._defer_accepts(sock, False)
        self.start_draining(handover=self.cfg.reuse_port)  # reuse_port is off in slot mode

    def _on_quit(self) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        self._stop()

    def _on_abort(self) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def _raise_nofile_limit(self) -> None:
        # As far as the hard limit allows; a hard limit too low for worker_connections was
        # reported once by check_config, not again by every worker.
        need = self.cfg.worker_connections + settings.NOFILE_RESERVE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# Connections ------------------------------------------------------------------------------------
#
# What the worker asks of a connection class (Connection here; any other transport's class too):
#
# - `due`: an int slot that only the worker writes: the tick (sweep number, `worker.tick`) under
#   which the worker's timer wheel has it filed. `_accept_one` files a new connection under the
#   next sweep (`conn.due = worker.tick + 1` and `worker._arrivals`); `worker.connection_closed`
#   takes it out of the wheel (and out of `worker.connections`), so every close must call it.
# - `on_tick(keepalive, now) -> int | None`: called by the sweep only at the tick the connection
#   is filed under. It checks every timeout that may be due (closing, or answering 408), and
#   returns the tick at which it must be looked at next: the earliest of its running timeouts.
#   None means "the next sweep" (a class that keeps the old contract, a per-sweep count, still
#   works: it is then looked at every second, as all connections were before the wheel).
# - `worker.wake(conn, tick)`: a connection calls it when a timeout shorter than the one it is
#   filed under starts (a partial head, a body between reads, answers owed, lingering); it moves
#   the connection to that tick if that is earlier. Nothing else moves it: a read on the hot path
#   only notes the tick it happened in (`self.seen = rules.tick`), and the sweep that finds the
#   connection not due yet files it again under the tick its timeout now falls on. So a busy
#   keep-alive connection is looked at about once per keep-alive timeout, an idle one once, when
#   it closes, and a sweep costs what its due connections cost, not what the open ones do.
# - `drain()`, `close_if_idle(spare_fresh)`, `evictable()`, `idleness()` (a sortable key, larger
#   for the less recently used: sweeps since the last use first, so that connections of different
#   classes compare; `_make_room` calls each one's own), `close()`: as documented on Connection.


class Connection:
    """One client socket on the hub: read, frame, answer; back-pressure on slow readers."""

    __slots__ = (
        "born",
        "due",
        "framer",
        "head_since",
        "held",
        "lingering",
        "owed",
        "pending",
        "reader",
        "recv_size",
        "rules",
        "seen",
        "sock",
        "table",
        "worker",
        "writer",
    )

    def __init__(self, worker: VryptWorker, sock: RawSocket) -> None:
        self.worker = worker
        self.sock = sock
        self.rules = worker.rules
        # The framing state, made only when a read is not one whole request (new_framer) and
        # dropped when it is back at a request boundary with nothing held: None means `fresh`
        # (FramingRules' hot-path contract), so an idle keep-alive connection holds no framer.
        self.framer: RequestFramer | None = None
        self.table = worker.responses.bytes_for
        self.pending = b""  # answer bytes the kernel did not take yet
        # Answers owed beyond `pending`, as [kind, count] runs, rendered a batch at a time when
        # the kernel takes them. Whenever it is not empty, `pending` is not empty either. An
        # empty tuple until then: no list per connection (10,000 idle ones, 0.5 MB).
        self.owed: list[list[int]] | tuple[()] = ()
        self.writer: Any = None
        # The tick (worker.tick) of the last read, or of the last answer bytes the kernel took;
        # until the first read, -1 minus the tick of the accept, so that a client whose request
        # is still unread is never taken for an idle keep-alive one (evictable).
        self.seen = worker.unread
        self.head_since = 0.0  # monotonic time of the current partial head's first read, or 0
        self.held = 0  # partial bytes the framer holds, as counted in worker.held
        self.born = worker.accepted  # accept order: among equally idle ones, older goes first
        worker.accepted += 1
        self.lingering = 0  # while lingering: the tick at which it closes anyway
        self.recv_size = _FIRST_RECV_SIZE
        spare = worker.spare_readers
        if spare:
            reader = spare.pop()
            reader.fd = sock.fileno()
        else:
            reader = worker.loop.io(sock.fileno(), _READ)
        self.reader = reader
        # The connection itself is the callback (__call__ is on_readable): no bound method
        # object per connection.
        reader.start(self)

    def new_framer(self) -> RequestFramer:
        return RequestFramer(self.rules)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        rules = self.rules
        self.seen = rules.tick
        framer = self.framer
        if framer is None:
            # The hot path, inlined (a Python call costs as much as the rest): a read that is
            # exactly one keep-alive head seen before. See FramingRules for the contract.
            if data == rules.recent_head:  # the head answered last, again: no hashing
                kind = rules.recent_kind
            else:
                kind = rules.cache.get(data, _UNCACHED)
                if kind < CLOSING:
                    rules.recent_head = data
                    rules.recent_kind = kind
            if kind < CLOSING and rules.answered < rules.open_until:
                rules.answered += 1
                payload = self.table[kind]
                try:
                    sent = self.sock.send(payload)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self.close()
                    return
                if sent != len(payload):
                    self.wait_writable(payload[sent:])
                return
            if kind <= OK_CLOSE_HEAD:  # one whole request, after which the connection closes
                self.answer_and_close(CLOSING | (kind & OK_HEAD))
                return
        self.frame(data)

    __call__ = on_readable

    def frame(self, data: bytes) -> None:
        """A read the hot path does not take: through the framer, which is made if need be."""
        framer = self.framer
        try:
            if len(data) == self.recv_size == _FIRST_RECV_SIZE:
                self.recv_size = _RECV_SIZE  # more may be waiting: pipelined, or a body
            if framer is None:
                # Pipelined copies of one keep-alive head (load generators, checkers that
                # pipeline): the answers feed() would give, without a framer.
                rules = self.rules
                count = rules.copies(data, _BATCH)
                if count:
                    self.send(self.table[rules.recent_kind] * count)
                    return
                framer = self.framer = self.new_framer()
            out = framer.feed(data)
            if out:
                table = self.table
                first = out[0]
                if len(out) == 1:
                    payload = table[first]
                elif len(out) > _BATCH:  # counted, rendered as the kernel takes them
                    self.owe(out)
                    payload = b""
                elif out.count(first) == len(out):  # pipelined, all alike: no list to build
                    payload = table[first] * len(out)
                else:
                    payload = b"".join(map(table.__getitem__, out))
                if payload:
                    self.send(payload)
            if not framer.fresh or self.held:  # something partial held now, or until now
                self.track_partial(bool(out))
            if framer.closed:
                if not self.pending:
                    self.linger()
            elif framer.fresh:
                self.framer = None  # nothing held: the next read may take the hot path
        except Exception:
            # A bug must cost one connection, never the worker and its other clients.
            self.worker.log.exception("vrypt_worker: closing a connection after an internal error")
            self.close()

    def answer_and_close(self, kind: int) -> None:
        """A read that was exactly one cached head after which the connection closes
        (`Connection: close`, HTTP/1.0, draining), as RequestFramer.feed would decide it: its
        answer, then the close at once (nothing followed the request: no lingering needed)."""
        rules = self.rules
        rules.answered += 1
        payload = self.table[kind]
        try:
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent == len(payload):
            self.close()
            worker = self.worker
            if rules.answered >= worker.max_requests:  # as in linger()
                worker.recycle()
            return
        self.close_after(payload[sent:])

    def close_after(self, rest: bytes) -> None:
        """The rest of a final answer the kernel did not take at once: sent as the client reads,
        then the close."""
        framer = self.framer = self.new_framer()
        framer.finish()
        framer.clean = True  # linger() closes once the rest has gone
        self.wait_writable(rest)

    def track_partial(self, answered: bool) -> None:
        """Off the hot path: account the bytes a partial head holds against the worker's
        budget, and note when the current head began (the head timeout runs from there)."""
        if self.reader is None:  # the send just failed and closed the connection
            return
        framer = self.framer
        worker = self.worker
        if framer.chunk_lines:
            if framer.chunk_lines > _MANY_CHUNK_LINES:
                self.recv_size = _CHUNKY_RECV_SIZE  # small chunks the scan cannot take
            framer.chunk_lines = 0
        held = framer.buffered
        if framer.in_head:
            if answered or not self.head_since:  # a new head began in this read
                self.head_since = time.monotonic()
                worker.wake(self, worker.tick + worker.head_timeout)
            if held > _SMALL_HEAD and worker.held + held - self.held > worker.head_budget:
                self.refuse(FIELDS_TOO_LARGE)  # the budget is spent: big heads are refused
                return
        else:
            self.head_since = 0.0
            if not framer.idle and not framer.closed:  # a body: the time to its next read
                worker.wake(self, worker.tick + 1 + worker.body_timeout)
        worker.held += held - self.held
        self.held = held

    def owe(self, out: list[int]) -> None:
        """Many answers from one read: keep them as counts, send what the kernel takes."""
        owed = self.owed = self.owed or []
        first = out[0]
        if out.count(first) == len(out):
            owed.append([first, len(out)])
        else:
            for kind, run in itertools.groupby(out):
                owed.append([kind, sum(1 for _ in run)])
        if not self.pending:
            self.flush(waiting=False)

    def flush(self, waiting: bool) -> bool:
        """Render and send owed answers a batch at a time. When the kernel stops taking them,
        the unsent rest of the answer it stopped in (or the next whole one) becomes `pending`
        and the connection waits to be writable; returns whether everything went."""
        owed: list[list[int]] = self.owed  # type: ignore[assignment]  # called when not empty
        table = self.table
        while owed:
            run = owed[0]
            kind, count = run
            answer = table[kind]
            size = len(answer)
            payload = answer * min(count, _BATCH)
            try:
                sent = self.sock.send(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return False
            # When the kernel stopped short, the answer it stopped in (or the next whole one)
            # goes to pending, so `pending` holds at most one answer.
            done = len(payload) // size if sent == len(payload) else sent // size + 1
            if done < count:
                run[1] = count - done
            else:
                del owed[0]
            if sent != len(payload):
                if sent:
                    self.seen = self.worker.tick
                rest = payload[sent : done * size]
                if waiting:
                    self.pending = rest
                else:
                    self.wait_writable(rest)
                return False
        return True

    def refuse(self, kind: int) -> None:
        """The worker's own final answer (408 on a timeout, 431 past the head budget)."""
        worker = self.worker
        worker.held -= self.held  # finish() drops the partial bytes
        self.held = 0
        self.head_since = 0.0
        worker.rules.rejected += 1
        worker.rules.answered += 1
        metrics.publish(worker)
        if self.owed:  # after the answers still owed, in order (a list when not empty)
            self.owed.append([kind, 1])  # type: ignore[union-attr]
        else:
            self.send(self.table[kind])
        self.close_after_send()

    def on_discard(self) -> None:
        """Lingering after the final answer: read and drop until the peer closes."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def send(self, payload: bytes) -> None:
        if self.pending:
            self.pending += payload
            return
        try:
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent != len(payload):
            self.wait_writable(payload[sent:])

    def wait_writable(self, rest: bytes) -> None:
        # The peer reads slower than it sends: stop reading it until it has taken our answers,
        # so a client that pipelines without reading cannot grow our memory.
        self.pending = rest
        worker = self.worker
        metrics.publish(worker)  # a final (rejected?) answer may wait here
        worker.wake(self, worker.tick + 1 + worker.send_timeout)
        self.reader.stop()
        if self.writer is None:
            self.writer = worker.loop.io(self.sock.fileno(), _WRITE)
        self.writer.start(self.on_writable)

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if sent:
            self.seen = self.worker.tick  # progress: the send timeout starts again
        self.pending = self.pending[sent:]
        if self.pending or (self.owed and not self.flush(waiting=True)):
            return
        if self.reader is None:  # closed by flush
            return
        self.writer.stop()
        framer = self.framer
        if framer is not None and framer.closed:
            self.linger()
        else:
            if self.head_since:  # we stopped reading that head, not the client sending it
                self.head_since = time.monotonic()
            self.reader.start(self)

    def linger(self) -> None:
        """After the final answer: close; when bytes may still come (an error, or requests after
        the last one), half-close first and read and drop them until the peer closes."""
        if self.lingering:
            return
        worker = self.worker
        # The answer that reaches max_requests always closes (FramingRules.open_until), so
        # recycling is checked here, off the keep-alive path.
        if worker.rules.answered >= worker.max_requests:
            worker.recycle()
        metrics.publish(worker)  # the final answer left: a rejection is counted now
        if self.framer.clean:  # type: ignore[union-attr]  # closed: a framer said so
            # A 200 after which the client sent nothing: no unread byte can turn our close into
            # a reset that destroys the answer, so close now (as nginx does), without lingering.
            self.close()
            return
        self.lingering = worker.tick + _LINGER_TICKS
        worker.wake(self, self.lingering)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        if self.reader is not None:
            self.reader.stop()
            self.reader.start(self.on_discard)

    def drain(self) -> None:
        """Graceful shutdown (the rules now make every answer close): a request already waiting
        in the kernel is answered now; an idle connection is closed after _DRAIN_GRACE."""
        framer = self.framer
        if (framer is None or framer.idle) and not self.pending and not self.lingering:
            self.on_readable()

    def close_if_idle(self, spare_fresh: bool = False) -> bool:
        """Draining: close this connection if it has nothing in progress. A request that has
        reached the kernel is read and answered first (closing over unread bytes would reset the
        connection and lose it). Returns True when it was spared because it is fresh."""
        if self.reader is None or not self.idle() or self.pending or self.lingering:
            return False
        self.on_readable()
        if self.reader is None or not self.idle() or self.pending or self.lingering:
            return False
        if spare_fresh and never_received(self.sock):
            return True
        self.close()
        return False

    def idle(self) -> bool:
        """Between requests: nothing partial, no body being read."""
        framer = self.framer
        return framer is None or framer.idle

    def on_tick(self, keepalive: int, now: float) -> int | None:
        """From the worker's sweep, at the tick the connection is filed under: every timeout of
        the connection, each measured per request (docs/reliability.md, "Timeouts"). Returns
        the tick at which the next one falls due (None once closed).

        A timeout of N sweeps measured from the last use (`seen`, the tick it happened in)
        fires at the sweep of tick seen + 1 + N, as when each sweep counted one idle tick."""
        if self.reader is None:
            return None
        worker = self.worker
        tick = worker.tick
        if self.lingering:
            if tick < self.lingering:
                return self.lingering
            self.close()
            return None
        seen = self.seen
        if seen < 0:  # never read: counted from the accept
            seen = -1 - seen
        if self.pending:  # answers owed that the client does not take: the send timeout
            due = seen + 1 + worker.send_timeout
        elif self.head_since:  # a head from its first byte to its end: the head timeout
            left = worker.head_timeout - (now - self.head_since)
            if left > 0:
                return tick + max(1, int(left))
            self.refuse(REQUEST_TIMEOUT)
            return None if self.reader is None else tick + 1
        elif self.idle():  # between requests: keep-alive
            due = seen + 1 + keepalive
        else:  # between two reads of a body
            due = seen + 1 + worker.body_timeout
            if tick >= due:
                self.refuse(REQUEST_TIMEOUT)
                return None if self.reader is None else tick + 1
            return due
        if tick < due:
            return due
        self.close()
        return None

    def evictable(self) -> bool:
        """An idle keep-alive connection: read from, nothing partial, nothing owed, not closing."""
        return (
            self.seen >= 0
            and self.reader is not None
            and not self.pending
            and not self.lingering
            and self.idle()
        )

    def idleness(self) -> tuple[int, int]:
        """Larger for connections used less recently: sweeps since their last use, then
        accepted earlier (a just-accepted client's request may not be read)."""
        return self.worker.tick - self.seen, -self.born

    def close_after_send(self) -> None:
        framer = self.framer
        if framer is None:
            framer = self.framer = self.new_framer()
        framer.finish()
        if not self.pending:
            self.linger()

    def close(self) -> None:
        reader = self.reader
        if reader is None:
            return
        self.reader = None
        spare = self.worker.spare_readers
        if len(spare) < _SPARE_READERS:
            reader.stop()  # for the next connection: stopping drops its callback
            spare.append(reader)
        else:
            reader.close()
        if self.held:
            self.worker.held -= self.held
            self.held = 0
        self.owed = ()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        try:
            self.sock.close()
        except OSError:
            pass
        self.worker.connection_closed(self)

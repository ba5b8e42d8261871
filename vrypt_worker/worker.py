"""VryptWorker: gunicorn's worker lifecycle around one gevent hub serving raw sockets.

The path of one request: the hub's epoll reports a client socket readable and calls the
connection (plain.Connection; transport.SessionConnection behind TLS or h2c) directly in the
loop, with no greenlet switch; it reads, frames and answers (plain.py). Everything here is
lifecycle: accepting (and the first read at the accept), the connection cap and eviction, the
timer wheel's sweep, listener slots, signals, draining on shutdown and recycling.
"""

from __future__ import annotations

import errno
import functools
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

from vrypt_worker import arbiter, listeners, metrics, settings, tls
from vrypt_worker.connection import READ, BaseConnection, WorkerState, evict
from vrypt_worker.framing import FramingRules, Limits
from vrypt_worker.h2 import H2Answers, H2Config, H2cPolicy
from vrypt_worker.plain import Connection, FirstRead
from vrypt_worker.protocols import ProtocolFactory
from vrypt_worker.response import ResponseTable
from vrypt_worker.settings import hostile_settings_from_env
from vrypt_worker.tls import TLSSession
from vrypt_worker.tls_accept import TLSFirstRead
from vrypt_worker.transport import PLAIN, SessionConnection

# gevent imports pprint the first time a signal handler is installed (gevent.util), which every
# worker does in init_signals: imported with this module, in the arbiter, it costs no worker's
# boot (a few milliseconds each, measured with cProfile; a recycled worker's slot waits for them).
_PRELOADED = (pprint,)
_STREAM = socket.SOCK_STREAM
# Accepts per readable event on one listener. Several workers share the load through
# SO_REUSEPORT or a shared queue, so a worker takes a batch and lets the loop serve its clients.
_MAX_ACCEPT = 64
# After EMFILE/ENFILE, accepting pauses this long instead of spinning on a queue it cannot drain.
_ACCEPT_BACKOFF = 0.5
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


def _raw(listener: Any) -> Any:
    """The socket of a gunicorn listener object (None once closed), or the socket itself."""
    return listener.sock if hasattr(listener, "sock") else listener


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
# The kernel's send buffer per connection (it doubles the value: 128 KiB, about 1,000 answers).
# Left to autotuning, a client that pipelines and never reads makes the kernel hold megabytes of
# our answers for it: with 3,000 such clients the machine's TCP memory went into pressure and a
# normal client waited 4 s (p99; nginx, also autotuned, over 10 s). Fixed at this size: 0.05 ms.
# Our answers are small, so a bigger buffer buys nothing but memory. Set on the listener once.
_SNDBUF = 64 * 1024


class VryptWorker(Worker):
    """A gunicorn worker that answers every HTTP request with `Vrypt`, without WSGI."""

    @classmethod
    def setup(cls) -> None:
        """gunicorn calls this from Arbiter.setup (at start and on HUP), before it binds: the
        drop-in's way into the arbiter (arbiter.py: the listener slots and the rest)."""
        # Loaded here, in the arbiter, rather than in every worker's run(): a module imported
        # after the fork is executed again in each worker (it imports this module, so not at
        # the top).
        from vrypt_worker import access_log  # noqa: F401

        arbiter.worker_class_setup()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Runs once in the arbiter before any worker starts: refuse what we cannot honour,
        choose the answer, start the metrics (arbiter.check_config)."""
        arbiter.check_config(cfg, log)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[BaseConnection] = set()
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
        self._arbiter = arbiter.gunicorn_arbiter()
        self.slot = -1
        self.spare_slots: dict[int, list[Any]] = {}
        if listeners.slot_mode():
            self.slot, self.sockets, self.spare_slots = listeners.assign(self)
        self._adopted: dict[int, list[tuple[Any, Any]]] = {}
        self._old: set[BaseConnection] = set()
        self._late: dict[BaseConnection, float] = {}  # accepted while draining: when
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
        # The VRYPT_* timeouts and the partial-head budget, checked here in the arbiter; the
        # connections' shared state (connection.WorkerState) is made in run(), with the loop.
        self.timeouts = hostile_settings_from_env()
        self.state: WorkerState | None = None
        self.draining = False
        self._accepting: list[tuple[Any, socket.socket]] = []
        self.max_connections = self.cfg.worker_connections
        self._accept_paused = False
        self._stopped = False
        self._last_accept_error = 0.0
        # The access log, when gunicorn's logger has it on, swaps in LoggingConnection at start
        # (access_log.py), so with it off the request path has not one check more.
        self.connection_class: type[BaseConnection] = Connection
        # TCP_DEFER_ACCEPT: the kernel hands over a connection once its first bytes arrived (or
        # after a second without any), so plain HTTP/1 connections are read at their accept
        # (plain.FirstRead). Set in run(), once the connection class is known.
        self.defer_accept = settings.env_flag("VRYPT_DEFER_ACCEPT", True)
        self.read_at_accept = False
        self.access_log: Any = None
        # TLS (gunicorn's certfile/keyfile): one context per configuration, made here in the
        # arbiter before the fork, so that every worker resumes every worker's sessions.
        self.tls_context = tls.context_for(self.cfg, self.log) if self.cfg.is_ssl else None
        # (read once: gunicorn's Config.__getattr__ costs a few Python calls per new connection)
        self.suppress_ragged_eofs = bool(self.cfg.suppress_ragged_eofs)

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
        state = self.state = WorkerState(
            self.rules,
            self.responses,
            loop,
            self.log,
            self.timeouts,
            closed=self.connection_closed,
            recycle=self.recycle,
            publish=functools.partial(metrics.publish, self),
        )
        state.max_requests = self.max_requests
        state.access_log = self.access_log
        # HTTP/1 inside TLS and HTTP/2 (by ALPN, or h2c from trusted peers) are protocols behind
        # a session (transport.py); plain HTTP/1 stays on plain.Connection.
        self.protocols = ProtocolFactory(
            state,
            H2cPolicy.from_config(self.cfg),
            H2Config.from_gunicorn(self.cfg, head_timeout=state.head_timeout),
            H2Answers(time.time()),
        )
        policy = self.protocols.policy
        # Only then does an accept look at the peer (h2c is for trusted peers only).
        self.h2c = self.protocols if policy.available and policy.mode != "off" else None
        if self.tls_context is not None:
            self.connection_class = self._tls_connection  # type: ignore[assignment]
        # Plain HTTP/1 only (not TLS, not h2c); with the access log on too, which is told of an
        # answer given there.
        self.read_at_accept = self.defer_accept and self.tls_context is None and self.h2c is None
        # (a bound method made once: calling it costs less than calling an instance)
        self.first_read = FirstRead(state, self.connection_class, self._add).read  # type: ignore[arg-type]
        if self.defer_accept and self.tls_context is not None:  # the ClientHello, at the accept
            self.read_at_accept = True
            self.first_read = TLSFirstRead(state, self._tls_connection, self._add).read
        self._done = gevent.event.Event()
        for listener in self.sockets:
            sock = _raw(listener)
            sock.setblocking(False)
            self._tune_listener(sock)
            watcher = loop.io(sock.fileno(), READ)
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

    def _tls_connection(self, state: WorkerState, sock: Any) -> SessionConnection:
        """What a TLS listener's connection becomes: a session, the protocol chosen by ALPN."""
        session = TLSSession(self.tls_context, self.suppress_ragged_eofs)
        return SessionConnection(state, sock, session, None, self.protocols.for_alpn)

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
                self.first_read(fd, family)
                return True
            sock = RawSocket(family, _STREAM, 0, fd)
            try:
                sock.setblocking(False)
            except OSError:
                sock.close()
                continue
            conn = None
            state = self.state
            if self.h2c is not None:  # h2c for trusted peers (protocols.py), else Connection
                negotiation = self.h2c.negotiation(_addr, sock)
                if negotiation is not None:
                    conn = SessionConnection(state, sock, PLAIN, negotiation)
            self._add(conn if conn is not None else self.connection_class(state, sock))
            return True

    def _add(self, conn: BaseConnection) -> None:
        self.connections.add(conn)
        self.state.wheel.add(conn)  # looked at by the next sweep first
        if self.draining:
            self._late[conn] = time.monotonic()

    def _make_room(self) -> bool:
        return evict(self.connections)

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

    def connection_closed(self, conn: BaseConnection) -> None:
        self.connections.discard(conn)
        self.state.wheel.discard(conn)  # type: ignore[union-attr]  # (connections: in run())
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
                    watchers.append((self.loop.io(sock.fileno(), READ), sock))
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
        # are due, or they were accepted or used since the last sweep); each says when it is due
        # next (connection.py).
        state = self.state
        due = state.advance()  # type: ignore[union-attr]  # (sweeps: in run())
        if due:
            connections = self.connections
            file = state.wheel.file  # type: ignore[union-attr]
            for conn in due:
                later = conn.on_tick(keepalive, now)
                if later is not None and conn in connections:
                    file(conn, later)
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

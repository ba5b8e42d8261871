"""The pusher: once per interval it reads the board and sends the differences. It runs as a
process of its own forked from the arbiter, and in a worker (the deputy) while that process is
gone (docs/metrics.md, "How it works").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

from gunicorn import util
from statsd.client.base import StatsClientBase

from vrypt_worker.metrics.board import PUSHER, SERVING, WORDS, WORKERS, Board, alive_child
from vrypt_worker.metrics.statsd import Resolver, Settings, collector_problem, make_client

_RESOLVE_BACKOFF_MAX = 30.0
_PR_SET_PDEATHSIG = 1
# Signals meant for the arbiter; a pusher in the same process group must not die of them (a
# Ctrl-C in a terminal reaches the whole group) and leaves when the arbiter does.
_IGNORED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGWINCH,
)


# --- the pusher --------------------------------------------------------------------------------


class Pusher:
    """Once per interval: read the board, send the differences. Runs in the pusher process, or in
    a worker that took the role over (`Deputy`); `me` is the pid the board's PUSHER word names
    while it is this one's turn."""

    def __init__(
        self,
        board: Board,
        settings: Settings,
        parent: int,
        log: Any,
        getaddrinfo: Resolver = socket.getaddrinfo,
    ) -> None:
        self.board = board
        self.settings = settings
        self.parent = parent
        self.log = log
        self.getaddrinfo = getaddrinfo
        self.me = os.getpid()
        prefix = settings.prefix
        self.names = (
            prefix + "vrypt.rps",
            prefix + "vrypt.connections",
            prefix + "gunicorn.workers",
            prefix + "vrypt.bad_requests",
            prefix + "gunicorn.requests",
        )
        self.client: StatsClientBase | None = None
        self._failed = False
        self._resolve_at = 0.0
        self._backoff = settings.interval

    def _error_log(self) -> Any:
        # The logging.Logger underneath: gunicorn's statsd logger would send a metric.
        return getattr(self.log, "error_log", self.log)

    def _warn(self, msg: str, *args: Any) -> None:
        self._error_log().warning(msg, *args)

    def mine(self) -> bool:
        """Is it this process's turn? Another process that took the role over wrote its pid."""
        return self.board.words[self.board.header + PUSHER] == self.me

    def connect(self, now: float) -> None:
        if self.client is not None or now < self._resolve_at:
            return
        try:
            self.client = make_client(self.settings, self.getaddrinfo)
            self._backoff = self.settings.interval
        except OSError as exc:  # unresolvable (gaierror), no route, no such unix socket
            collector_problem(self._warn, self.settings.target, exc)
            self._resolve_at = now + self._backoff
            self._backoff = min(self._backoff * 2, _RESOLVE_BACKOFF_MAX)

    def push(self) -> None:
        board = self.board
        answered, rejected = board.take()
        connections, serving = board.live(self.parent)
        recorded = board.words[board.header + WORKERS]
        workers = recorded - 1 if recorded else serving
        self.connect(time.monotonic())
        client = self.client
        if client is None:
            return
        rps, conns, workers_name, bad, requests = self.names
        try:
            # Every gauge every interval, so a collector that restarts knows them all at once.
            client.gauge(rps, answered)
            client.gauge(conns, connections)
            client.gauge(workers_name, workers)
            client.incr(bad, rejected)
            client.incr(requests, answered)
        except OSError as exc:
            collector_problem(self._warn, self.settings.target, exc)

    def push_safely(self) -> None:
        try:
            self.push()
        except Exception:
            if not self._failed:
                self._failed = True
                self._error_log().exception("vrypt metrics: push failed")

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    def run(self) -> None:
        """Send every interval until the arbiter is gone, then send the last one.

        SIGTERM (the arbiter's death through PR_SET_PDEATHSIG, or a stop sent to the whole
        process group) does not end the pusher at once while the arbiter lives: the workers are
        still answering their last requests, which the final send must include. A pusher whose
        turn was taken (it was stopped long enough for a worker to think it dead) leaves."""
        interval = self.settings.interval
        next_at = time.monotonic() + interval
        leave_at: float | None = None
        while os.getppid() == self.parent:
            now = time.monotonic()
            if leave_at is not None and now >= leave_at:
                break
            if now >= next_at:
                if not self.mine():
                    self._error_log().info(
                        "vrypt metrics: pid %s sends the metrics now; pusher pid %s leaves",
                        self.board.words[self.board.header + PUSHER],
                        self.me,
                    )
                    return
                self.push_safely()
                next_at += interval
                if next_at <= now:  # we were stopped for a while: no burst of catching up
                    next_at = now + interval
                continue
            if signal.sigtimedwait((signal.SIGTERM,), next_at - now) and leave_at is None:
                leave_at = now + self.settings.grace + 2 * interval
        if self.mine():
            self.push_safely()


# --- a worker standing in for a dead pusher ----------------------------------------------------

# How long a worker that wrote its pid into the PUSHER word waits before it reads the word again
# and, if it still names it, pushes. Anyone who claimed at the same moment (another worker that
# also thought itself the deputy, a pusher the arbiter just forked) has written by then; the
# last writer wins and the others stand down, so two processes never take the same totals.
_CLAIM_SETTLE = 0.1


def _cooperative_getaddrinfo(*args: Any) -> list[Any]:
    """Name resolution in a worker that pushes: gevent's resolver, which does not block the hub
    that serves the requests (the pusher process may block; a worker must not)."""
    import gevent.socket  # only in workers, which run gevent already

    return gevent.socket.getaddrinfo(*args)


class Deputy:
    """In a worker: takes the pusher's role over while the pusher process is gone.

    Every worker looks once per sweep (`watch`) whether it is the deputy: the live, serving
    worker with the lowest slot. Only the deputy runs a timer on its hub, once per interval, that
    looks at the process the board's PUSHER word names (one /proc read). When that process is
    gone, the deputy writes its own pid there, waits `_CLAIM_SETTLE` and, if the word still names
    it, pushes from then on, once per interval from the same timer, until another process claims
    the word: the pusher the arbiter forks when it next spawns a worker. A dead pusher is thus
    replaced within one interval plus the settle time, at any interval. The totals sent live in
    the board, so the deputy goes on exactly where the dead pusher stopped."""

    def __init__(self, worker: Any, board: Board, settings: Settings, arbiter: int) -> None:
        self.worker = worker
        self.board = board
        self.settings = settings
        self.arbiter = arbiter
        self.slot = worker.slot_base // WORDS
        self.me = os.getpid()
        self.deputy = False
        self.claiming = False
        self.timer: Any = None
        self.pusher: Pusher | None = None
        self.busy = False

    def _pushing(self) -> bool:
        return self.board.words[self.board.header + PUSHER] == self.me

    def sweep(self) -> None:
        board = self.board
        serving = bool(self.worker.alive)
        board.words[self.worker.slot_base + SERVING] = int(serving)
        self.deputy = serving and board.first_serving(self.arbiter, self.slot, self.me)
        needed = self.deputy or self.claiming or self._pushing()
        if needed and self.timer is None:
            # The first look right away: a worker that becomes the deputy because the previous
            # one died (perhaps while it was pushing) does not wait a whole interval.
            self.timer = self.worker.loop.timer(0.0, self.settings.interval)
            self.timer.start(self.tick)
        elif not needed and self.timer is not None:
            self.timer.close()
            self.timer = None
            self._stand_down()

    def tick(self) -> None:
        board = self.board
        current = board.words[board.header + PUSHER]
        if current == self.me:
            if not self.claiming:  # a claim is confirmed first (`_confirm`), then pushed
                self._push()
            return
        self._stand_down()
        if self.claiming or not self.deputy:
            return
        if current and alive_child(current, self.arbiter):
            return
        board.words[board.header + PUSHER] = self.me
        self.claiming = True
        settle = self.worker.loop.timer(min(self.settings.interval / 2, _CLAIM_SETTLE))
        settle.start(self._confirm, settle, current)

    def _confirm(self, settle: Any, gone: int) -> None:
        settle.close()
        self.claiming = False
        if not self._pushing():
            return  # someone claimed after us: theirs
        self.worker.log.warning(
            "vrypt metrics: the pusher (pid %s) is gone; worker pid %s sends the metrics until "
            "the arbiter starts a new pusher",
            gone,
            self.me,
        )
        self._push()

    def _push(self) -> None:
        if self.busy:  # the last push still waits for a name to resolve
            return
        if self.pusher is None:
            self.pusher = Pusher(
                self.board,
                self.settings,
                self.arbiter,
                self.worker.log,
                getaddrinfo=_cooperative_getaddrinfo,
            )
        import gevent

        self.busy = True
        gevent.spawn(self._push_in_greenlet, self.pusher)

    def _push_in_greenlet(self, pusher: Pusher) -> None:
        # A greenlet, not the timer callback: resolving a name may wait (cooperatively).
        try:
            if pusher.mine():
                pusher.push_safely()
        finally:
            self.busy = False

    def _stand_down(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None


# --- the process that runs the pusher ------------------------------------------------------------


def _kept_fds(log: Any) -> set[int]:
    """stdio and whatever the log writes to: every other descriptor of the arbiter (listeners,
    worker heartbeat files, the control socket) is closed in the pusher."""
    keep = {0, 1, 2}
    loggers = [logging.getLogger()] + [
        item
        for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger)
    ]
    for item in loggers:
        for handler in item.handlers:
            for attr in ("stream", "socket"):
                with contextlib.suppress(Exception):
                    keep.add(getattr(handler, attr).fileno())
    with contextlib.suppress(Exception):
        keep.add(log.sock.fileno())
    return {fd for fd in keep if fd >= 0}


def _close_fds_except(keep: set[int]) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(4096 if soft == resource.RLIM_INFINITY else soft, max(keep) + 1)
    low = 0
    for fd in sorted(keep):
        if low < fd:  # never an empty range: CPython 3.11 turns closerange(0, 0) into "all"
            os.closerange(low, fd)
        low = fd + 1
    if low < top:
        os.closerange(low, top)


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _pusher_main(board: Board, settings: Settings, parent: int, log: Any, keep: set[int]) -> None:
    for sig in _IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _close_fds_except(keep)
    _die_with_parent()  # then check: the arbiter may have died before prctl took effect
    board.words[board.header + PUSHER] = os.getpid()
    with contextlib.suppress(Exception):
        util._setproctitle(f"vrypt metrics [{getattr(log.cfg, 'proc_name', 'gunicorn')}]")
    Pusher(board, settings, parent, log).run()


def fork_pusher(board: Board, settings: Settings, arbiter: int, log: Any) -> int:
    """In the arbiter: fork the pusher process; its pid."""
    keep = _kept_fds(log)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the pusher: never return into gunicorn's code
        code = 0
        try:
            _pusher_main(board, settings, arbiter, log, keep)
        except BaseException:
            code = 1
            with contextlib.suppress(BaseException):
                getattr(log, "error_log", log).exception("vrypt metrics: the pusher failed")
        finally:
            os._exit(code)
    # Written here too, not only in the child: from the fork on, the word names the new pusher,
    # so a worker that was standing in stands down at its next tick, before the first push.
    board.words[board.header + PUSHER] = pid
    return pid


def pusher_alive(pid: int) -> bool:
    """In the arbiter. gunicorn's reap_workers (waitpid(-1)) may already have reaped our child:
    it logs "Reaped unknown child process" at debug level and goes on, and then so do we."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0

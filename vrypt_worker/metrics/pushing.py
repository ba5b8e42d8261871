"""Pushing: once per interval, one process reads the board and sends the differences to StatsD.

That process is one of the serving workers, from a timer on its hub (`Turn`); the board's PUSHER
word names it. No process of its own: the counts, the totals sent so far and the time of the
last push all live in the shared board, so whichever worker pushes next goes on exactly where
the last one stopped. The arbiter sends the last interval as it exits, once every worker is gone
(`Pusher` is the same there). docs/metrics.md, "How it works", tells the whole story.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

from statsd.client.base import StatsClientBase

from vrypt_worker.metrics.board import PUSHED, PUSHER, SERVING, WORDS, WORKERS, Board
from vrypt_worker.metrics.statsd import Resolver, Settings, collector_problem, make_client

_RESOLVE_BACKOFF_MAX = 30.0
# How long a worker that wrote its pid into the PUSHER word waits before it reads the word again
# and, if it still names it, pushes. Anyone who claimed at the same moment (another worker that
# also took itself for the first serving one) has written by then, and a pusher that read the
# word just before the claim has taken its totals: the last writer wins and the others stand
# down, so two processes never take the same totals.
_CLAIM_SETTLE = 0.1


class Pusher:
    """One push: read the board, send the differences and the gauges. `me` is the pid the
    board's PUSHER word names while it is this process's turn."""

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
        """Is it this process's turn? A process that took the turn over wrote its pid."""
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
        board.words[board.header + PUSHED] = time.monotonic_ns()  # the next pusher keeps pace
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


def cooperative_getaddrinfo(*args: Any) -> list[Any]:
    """Name resolution in a worker that pushes: gevent's resolver, which does not block the hub
    that serves the requests (an IP literal needs none: `literal_address`)."""
    import gevent.socket  # only for a name; preloaded in the arbiter then (`preload_resolver`)

    return gevent.socket.getaddrinfo(*args)


def preload_resolver() -> None:
    """In the arbiter, when statsd_host is a name: gevent's resolver and what it imports (its
    thread pool, the IDNA codec), loaded before the workers fork so that the one that pushes
    shares them instead of importing them on its own (about 3 MB each time)."""
    import encodings.idna  # noqa: F401  # getaddrinfo's codec for a str host

    import gevent.resolver.thread
    import gevent.socket
    import gevent.threadpool  # noqa: F401


class Turn:
    """In a worker: whose turn it is to push, and this worker's pushes while it is its own.

    A serving worker looks every half interval (one timer on its hub, from its start) at the
    process the board's PUSHER word names: one /proc read. While that process serves, nothing
    more. When it is gone (killed, exited) or drains (a reload, TTOU, recycling, the stop), or
    when nobody pushes yet, the first serving worker (the live one with the lowest slot, so that
    the workers do not all claim at once) writes its own pid there, waits `_CLAIM_SETTLE` and,
    if the word still names it, pushes from then on, every interval, keeping the pace of the last
    push (the board keeps its time): one interval after it, or at once if that is past. A worker
    that finds the word naming someone else stops pushing and looks again. A pusher that drains
    goes on pushing until a serving worker has taken the turn, so a reload leaves no gap; one that
    dies is replaced within half an interval plus the settle time."""

    def __init__(self, worker: Any, board: Board, settings: Settings, arbiter: int) -> None:
        self.worker = worker
        self.board = board
        self.settings = settings
        self.arbiter = arbiter
        self.slot = worker.slot_base // WORDS
        self.me = os.getpid()
        self.timer: Any = None  # every half interval while looking, every interval while pushing
        self.pushing = False
        self.claiming = False
        self.pusher: Pusher | None = None
        self.busy = False

    def _mine(self) -> bool:
        return self.board.words[self.board.header + PUSHER] == self.me

    def _every(self, after: float, repeat: float, callback: Any) -> None:
        if self.timer is not None:
            self.timer.close()
        self.timer = self.worker.loop.timer(after, repeat)
        self.timer.start(callback)

    def sweep(self) -> None:
        """At the worker's start and once per sweep: say whether it still serves; look from now
        on (the first look right away: a worker that replaces a dead pusher does not wait)."""
        self.board.words[self.worker.slot_base + SERVING] = int(bool(self.worker.alive))
        if self.timer is None and self.worker.alive:
            self._every(0.0, self.settings.interval / 2, self.look)

    def look(self) -> None:
        if self.claiming or not self.worker.alive:  # a worker that drains never takes the turn
            return
        board = self.board
        current = board.words[board.header + PUSHER]
        if current == self.me:
            self._push_from_now()
            return
        if current and board.serving(current, self.arbiter):
            return
        if not board.first_serving(self.arbiter, self.slot, self.me):
            return
        board.words[board.header + PUSHER] = self.me
        self.claiming = True
        settle = self.worker.loop.timer(min(self.settings.interval / 2, _CLAIM_SETTLE))
        settle.start(self._confirm, settle, current)

    def _confirm(self, settle: Any, previous: int) -> None:
        settle.close()
        self.claiming = False
        if not self._mine():
            return  # someone claimed after us: theirs
        if previous:
            # Not a warning: a worker that recycles or drains for a reload hands over this way,
            # and gunicorn itself reports a worker that was killed.
            self.worker.log.info(
                "vrypt metrics: pid %s no longer sends the metrics; worker pid %s sends the "
                "metrics now",
                previous,
                self.me,
            )
        else:
            self.worker.log.info("vrypt metrics: worker pid %s sends the metrics", self.me)
        self._push_from_now()

    def _push_from_now(self) -> None:
        interval = self.settings.interval
        last = self.board.words[self.board.header + PUSHED]
        wait = 0.0
        if last:  # keep the pace: a gauge is "requests in one interval"
            wait = max(0.0, last / 1e9 + interval - time.monotonic())
        self.pushing = True
        self._every(wait, interval, self._tick)

    def _tick(self) -> None:
        if self._mine():
            self._push()
            return
        # Another worker took the turn (it found this one draining, or took it for dead).
        self.pushing = False
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None
        if self.worker.alive:
            self._every(self.settings.interval / 2, self.settings.interval / 2, self.look)
        else:
            self.timer.close()
            self.timer = None

    def _push(self) -> None:
        if self.busy:  # the last push still waits for a name to resolve
            return
        if self.pusher is None:
            self.pusher = Pusher(
                self.board,
                self.settings,
                self.arbiter,
                self.worker.log,
                getaddrinfo=cooperative_getaddrinfo,
            )
        import gevent  # only in workers, which run gevent already

        self.busy = True
        gevent.spawn(self._push_in_greenlet, self.pusher)

    def _push_in_greenlet(self, pusher: Pusher) -> None:
        # A greenlet, not the timer callback: resolving a name may wait (cooperatively).
        try:
            if pusher.mine():
                pusher.push_safely()
        finally:
            self.busy = False

"""Per-worker counters in shared memory and the one StatsD pusher of the server.

docs/metrics.md explains the design; in short:

- `start()` runs once in the arbiter (from `VryptWorker.check_config`) when `statsd_host` is set.
  It maps an anonymous shared `Board` of counter slots, 64 bytes (one cache line) each, before any
  worker forks, and forks the pusher: one small process that closes every inherited descriptor
  but the log's and sends, once per interval, what the workers counted.
- `claim()` runs in the arbiter too, in `VryptWorker.__init__` (gunicorn builds the worker object
  there before it forks), so giving out slots needs no lock. A slot whose holder died is given to
  the next worker, which goes on counting from the slot's values: every slot counter only ever
  grows, and the pusher sends differences of sums.
- Workers store into their own slot: `answered` once per turn of the hub's loop, just before it
  waits for I/O (one memoryview store, no lock, no syscall), the rest where it changes and in the
  1 s sweep.

- The pusher is not a single point of failure: if it dies, the live worker with the lowest slot
  (the deputy, which looks once per sweep and then every interval) takes over its role from a
  timer on its hub, and the arbiter forks a new pusher process, which takes the role back, the
  next time it spawns a worker. The totals sent live in shared memory, so whoever pushes goes on
  where the last one stopped; one word names the process whose turn it is, so exactly one sends.

Slot layout (uint64 words): answered, rejected, open connections, owner pid, serving (1 until the
worker starts draining), 3 words of padding. After the slots one more line holds the pusher's
bookkeeping: the totals it has sent, the number of slots ever handed out, the pid of the process
that pushes, and gunicorn's own worker count (+1; 0 when the arbiter has not said).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.instrument.statsd import Statsd
from statsd.client.base import StatsClientBase

SLOT_BYTES = 64  # one cache line: a worker's stores never share a line with another worker's
WORDS = SLOT_BYTES // 8
ANSWERED, REJECTED, OPEN, OWNER, SERVING = 0, 1, 2, 3, 4
# The line after the slots: written by the pusher (SENT_*, PUSHER), the arbiter (USED, WORKERS)
# and a worker that takes the pusher's role over (PUSHER).
SENT_ANSWERED, SENT_REJECTED, USED, PUSHER, WORKERS = 0, 1, 2, 3, 4
MIN_SLOTS = 1024
DEFAULT_INTERVAL = 1.0
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


class Holder(Protocol):
    """What the arbiter knows of a slot's holder: gunicorn sets `pid` right after the fork."""

    pid: Any


_PROCFS = os.path.exists("/proc/self/stat")


def alive_child(pid: int, parent: int) -> bool:
    """True if `pid` runs (not a zombie) as a child of `parent`: a pid reused by some other
    process after its worker was reaped does not count."""
    if not _PROCFS:  # no procfs: "the pid exists" (a zombie counts; the arbiter reaps first)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return False
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X", b"x") and int(fields[1]) == parent


class Board:
    """The shared counter slots. Made before the workers fork, so every process of the server
    maps the same pages (MAP_SHARED | MAP_ANONYMOUS, no file, no descriptor)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a board needs at least one slot")
        self.slots = slots
        self._map = mmap.mmap(-1, (slots + 1) * SLOT_BYTES)
        self.words = memoryview(self._map).cast("Q")
        self.header = slots * WORDS
        self._holders: dict[int, Holder] = {}

    # the arbiter ------------------------------------------------------------------------------

    def claim(self, holder: Holder, parent: int | None = None) -> int | None:
        """Give `holder` a slot whose previous holder is gone; None when all are taken.

        Runs only in the arbiter, which is single-threaded and reaps dead workers before it
        spawns their replacements. A slot is free when both the arbiter's record of its holder
        and the pid the holder wrote into it name no live child of the arbiter. The counters are
        left as they are: the new holder goes on from them (`values`)."""
        parent = os.getpid() if parent is None else parent
        words = self.words
        for slot in range(self.slots):
            previous = self._holders.get(slot)
            if previous is not None:
                pid = previous.pid
                if isinstance(pid, int) and alive_child(pid, parent):
                    continue
            owner = words[slot * WORDS + OWNER]
            if owner and alive_child(owner, parent):
                continue
            self._holders[slot] = holder
            words[slot * WORDS + OWNER] = 0
            words[slot * WORDS + OPEN] = 0
            words[slot * WORDS + SERVING] = 0
            if slot >= words[self.header + USED]:
                words[self.header + USED] = slot + 1
            return slot
        return None

    def values(self, slot: int) -> tuple[int, int]:
        """The slot's (answered, rejected): where its next holder starts counting."""
        base = slot * WORDS
        return self.words[base + ANSWERED], self.words[base + REJECTED]

    # the pusher -------------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(answered, rejected) summed over every slot ever used: both only ever grow."""
        words = self.words
        answered = rejected = 0
        for base in range(0, words[self.header + USED] * WORDS, WORDS):
            answered += words[base + ANSWERED]
            rejected += words[base + REJECTED]
        return answered, rejected

    def take(self) -> tuple[int, int]:
        """Requests (answered, rejected) since the last take, and remember the new totals.

        The totals sent so far live in the shared header, so a pusher started after another one
        died goes on where the dead one stopped: nothing counted twice."""
        answered, rejected = self.totals()
        header = self.header
        words = self.words
        delta = answered - words[header + SENT_ANSWERED], rejected - words[header + SENT_REJECTED]
        words[header + SENT_ANSWERED] = answered
        words[header + SENT_REJECTED] = rejected
        return delta

    def live(self, parent: int) -> tuple[int, int]:
        """(open connections, serving workers) over the slots whose writer is a live worker of
        `parent`. A worker that drains still holds connections but is no longer one of gunicorn's
        workers: the arbiter has retired it (reload, TTOU, recycling, stop)."""
        words = self.words
        connections = serving = 0
        for base in range(0, words[self.header + USED] * WORDS, WORDS):
            owner = words[base + OWNER]
            if owner and alive_child(owner, parent):
                connections += words[base + OPEN]
                serving += words[base + SERVING] != 0
        return connections, serving

    def open_connections(self, parent: int) -> int:
        """Open connections of the slots whose writer is a live worker of `parent`."""
        return self.live(parent)[0]

    def workers(self, parent: int) -> int:
        """The worker count to send: gunicorn's own (the arbiter records each value it sends,
        `StatsdLogger.gauge`), else the serving workers on the board."""
        recorded = self.words[self.header + WORKERS]
        return recorded - 1 if recorded else self.live(parent)[1]

    def first_serving(self, parent: int, below: int, me: int) -> bool:
        """True if no live, serving worker of `parent` other than `me` holds a slot below
        `below`: the worker in slot `below` is then the deputy that takes over a dead pusher."""
        words = self.words
        for base in range(0, below * WORDS, WORDS):
            owner = words[base + OWNER]
            if owner and owner != me and words[base + SERVING] and alive_child(owner, parent):
                return False
        return True


# --- settings --------------------------------------------------------------------------------


def interval_from_env() -> float:
    """VRYPT_STATSD_INTERVAL: seconds between two sends of the pusher (default 1)."""
    raw = os.environ.get("VRYPT_STATSD_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise ValueError(f"VRYPT_STATSD_INTERVAL={raw!r}: expected seconds between 0.05 and 3600")
    return value


def statsd_prefix(raw: str | None) -> str:
    """gunicorn's normalisation of statsd_prefix (gunicorn/instrument/statsd.py): one dot."""
    return re.sub(r"^(.+[^.]+)\.*$", "\\g<1>.", raw or "")


@dataclass(frozen=True)
class Settings:
    """What the pusher sends where, from gunicorn's own statsd settings."""

    host: Any  # gunicorn's parsed statsd_host: (host, port), or a path for unix://PATH
    prefix: str = ""
    tags: str = ""
    interval: float = DEFAULT_INTERVAL
    grace: float = 30.0  # how long a pusher sent SIGTERM waits for the arbiter to leave

    @classmethod
    def from_cfg(cls, cfg: Any) -> Settings | None:
        if cfg.statsd_host is None:
            return None
        return cls(
            host=cfg.statsd_host,
            prefix=statsd_prefix(cfg.statsd_prefix),
            tags=cfg.dogstatsd_tags or "",
            interval=interval_from_env(),
            grace=float(cfg.graceful_timeout),
        )

    @property
    def target(self) -> str:
        host = self.host
        return f"unix:{host}" if isinstance(host, str) else f"{host[0]}:{host[1]}"


# --- StatsD clients --------------------------------------------------------------------------


class _TaggedSend:
    """Sends each line on the client's connected socket with the dogstatsd tags appended."""

    _sock: socket.socket
    _suffix: str

    def _send(self, data: str) -> None:
        self._sock.send((data + self._suffix).encode("ascii"))


Resolver = Callable[..., list[Any]]  # socket.getaddrinfo's signature


class TaggedStatsClient(_TaggedSend, StatsClientBase):
    """pystatsd's UDP client with dogstatsd tags (`|#k:v,...` on every line, as gunicorn does),
    on a connected socket whose send errors reach the caller: pystatsd swallows them, and an
    unconnected socket never hears that nobody listens. `getaddrinfo` is replaceable so that a
    worker that pushes can resolve through gevent's resolver instead of blocking its hub."""

    def __init__(
        self,
        host: str,
        port: int,
        tags: str = "",
        ipv6: bool = False,
        getaddrinfo: Resolver = socket.getaddrinfo,
    ) -> None:
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        # As pystatsd's StatsClient does; may raise gaierror.
        family, _, _, _, addr = getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0]
        self._addr = addr
        self._prefix = None
        self._maxudpsize = 512
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.connect(addr)
        except OSError:
            self._sock.close()
            raise
        self._suffix = f"|#{tags}" if tags else ""

    def close(self) -> None:
        self._sock.close()


class UnixDatagramStatsClient(_TaggedSend, StatsClientBase):
    """The same for `statsd_host = "unix://PATH"`: a datagram socket, like gunicorn's logger."""

    def __init__(self, path: str, tags: str = "") -> None:
        self._prefix = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._suffix = f"|#{tags}" if tags else ""

    def close(self) -> None:
        self._sock.close()


def make_client(settings: Settings, getaddrinfo: Resolver = socket.getaddrinfo) -> StatsClientBase:
    host = settings.host
    if isinstance(host, str):
        return UnixDatagramStatsClient(host, settings.tags)
    return TaggedStatsClient(
        host[0], int(host[1]), settings.tags, ipv6=util.is_ipv6(host[0]), getaddrinfo=getaddrinfo
    )


# --- reporting a broken collector once ---------------------------------------------------------

_notice_map: mmap.mmap | None = None
_notice_words: memoryview | None = None


def _notices() -> memoryview:
    """A shared page of "already reported" flags, mapped by the arbiter before it forks (the
    logger maps it when gunicorn builds it, `start` at the latest)."""
    global _notice_map, _notice_words
    if _notice_words is None:
        _notice_map = mmap.mmap(-1, mmap.PAGESIZE)
        _notice_words = memoryview(_notice_map).cast("Q")
    return _notice_words


def first_report() -> bool:
    """True the first time any process of this server asks (a process that mapped the page
    itself, after the fork, counts on its own)."""
    flags = _notices()
    if flags[0]:
        return False
    flags[0] = 1
    return True


def _not_listening(exc: BaseException) -> bool:
    """ECONNREFUSED: the collector's host answered that nobody listens there (ICMP port
    unreachable, or a unix socket nobody has bound). A collector that is not running, or not yet,
    is normal for fire-and-forget gauges, so this is never reported; the metrics go out again as
    soon as it listens. Anything else (a name that does not resolve, no route, no such unix
    socket) is a setting to fix, and is reported once."""
    return isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED


def _collector_problem(emit: Any, target: str, exc: BaseException) -> None:
    if _not_listening(exc):
        return
    if first_report():
        emit(
            "statsd: cannot send to %s (%s: %s); metrics are dropped until it is back, and this "
            "is not logged again",
            target,
            type(exc).__name__,
            exc,
        )


class StatsdLogger(Statsd):
    """gunicorn's statsd logger, set by vrypt_worker/conf.py, that reports a collector it cannot
    reach once for the whole server instead of a warning with a traceback per metric. Without
    statsd_host it is the plain gunicorn logger (with an explicit logger_class gunicorn no longer
    switches between the two by itself)."""

    def __init__(self, cfg: Any) -> None:
        Logger.__init__(self, cfg)
        self.prefix = statsd_prefix(cfg.statsd_prefix)
        self.dogstatsd_tags = cfg.dogstatsd_tags
        self.sock: socket.socket | None = None
        host = cfg.statsd_host
        if host is None:
            return
        if isinstance(host, str):
            family = socket.AF_UNIX
        elif util.is_ipv6(host[0]):
            family = socket.AF_INET6
        else:
            family = socket.AF_INET
        self._target = f"unix:{host}" if isinstance(host, str) else f"{host[0]}:{host[1]}"
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect(host)
        except Exception as exc:
            sock.close()
            _collector_problem(self._warn, self._target, exc)
            return
        self.sock = sock

    def _warn(self, msg: str, *args: Any) -> None:
        Logger.warning(self, msg, *args)  # not self.warning: that would send a metric

    def gauge(self, name: str, value: Any) -> None:
        # gunicorn's arbiter sends gunicorn.workers only when the count changes; the pusher sends
        # it every interval (a restarted exporter knows it at once), with this same value.
        if name == "gunicorn.workers":
            record_workers(value)
        super().gauge(name, value)

    def _sock_send(self, msg: str | bytes) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            if isinstance(msg, str):
                msg = msg.encode("ascii")
            if self.dogstatsd_tags:
                msg = msg + b"|#" + self.dogstatsd_tags.encode("ascii")
            sock.send(msg)
        except Exception as exc:
            _collector_problem(self._warn, self._target, exc)


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
            _collector_problem(self._warn, self.settings.target, exc)
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
            _collector_problem(self._warn, self.settings.target, exc)

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

    def __init__(self, worker: Any, server: _Server) -> None:
        self.worker = worker
        self.server = server
        self.board = server.board
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
        self.deputy = serving and board.first_serving(self.server.arbiter, self.slot, self.me)
        needed = self.deputy or self.claiming or self._pushing()
        if needed and self.timer is None:
            # The first look right away: a worker that becomes the deputy because the previous
            # one died (perhaps while it was pushing) does not wait a whole interval.
            self.timer = self.worker.loop.timer(0.0, self.server.settings.interval)
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
        if current and alive_child(current, self.server.arbiter):
            return
        board.words[board.header + PUSHER] = self.me
        self.claiming = True
        settle = self.worker.loop.timer(min(self.server.settings.interval / 2, _CLAIM_SETTLE))
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
                self.server.settings,
                self.server.arbiter,
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


@dataclass
class _Server:
    """This arbiter's metrics state (module-level: one arbiter per process)."""

    board: Board
    settings: Settings
    arbiter: int
    pusher: int = 0


_server: _Server | None = None


def _fork_pusher(server: _Server, log: Any) -> int:
    keep = _kept_fds(log)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the pusher: never return into gunicorn's code
        code = 0
        try:
            _pusher_main(server.board, server.settings, server.arbiter, log, keep)
        except BaseException:
            code = 1
            with contextlib.suppress(BaseException):
                getattr(log, "error_log", log).exception("vrypt metrics: the pusher failed")
        finally:
            os._exit(code)
    server.pusher = pid
    # Written here too, not only in the child: from the fork on, the word names the new pusher,
    # so a worker that was standing in stands down at its next tick, before the first push.
    server.board.words[server.board.header + PUSHER] = pid
    return pid


def _pusher_alive(pid: int) -> bool:
    """In the arbiter. gunicorn's reap_workers (waitpid(-1)) may already have reaped our child:
    it logs "Reaped unknown child process" at debug level and goes on, and then so do we."""
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


def start(cfg: Any, log: Any) -> None:
    """In the arbiter, once, before any worker forks (VryptWorker.check_config)."""
    global _server
    settings = Settings.from_cfg(cfg)  # a bad VRYPT_STATSD_INTERVAL fails here, at start
    _notices()  # map the shared "reported once" page before anything forks
    if settings is None or _server is not None:
        return
    workers = max(int(cfg.workers or 1), 1)
    server = _Server(Board(max(MIN_SLOTS, 4 * workers)), settings, os.getpid())
    _server = server
    pid = _fork_pusher(server, log)
    # The one announcement of where metrics go. A collector that is not running there is not
    # reported (fire-and-forget gauges); a target that cannot work (a name that does not
    # resolve, no route) is, once for the whole server.
    log.info(
        "vrypt metrics: pusher pid %s sends StatsD to %s every %gs%s",
        pid,
        settings.target,
        settings.interval,
        f" with prefix {settings.prefix!r}" if settings.prefix else "",
    )


def _ensure_pusher(server: _Server, log: Any) -> None:
    if server.pusher and not _pusher_alive(server.pusher):
        old = server.pusher
        pid = _fork_pusher(server, log)
        log.warning("vrypt metrics: pusher pid %s was gone; started pid %s", old, pid)


def _private_counts() -> memoryview:
    return memoryview(bytearray(SLOT_BYTES)).cast("Q")


_warned_full = False


def claim(worker: Any) -> tuple[memoryview, int, int, int]:
    """In the arbiter, from VryptWorker.__init__: (counts, base, answered, rejected).

    The worker stores its counters at `counts[base + ANSWERED]` etc. and starts counting at
    `answered`/`rejected` (a reused slot goes on from its values). Without metrics, or with every
    slot taken, `counts` is a private array nobody reads: the stores cost the same."""
    global _warned_full
    server = _server
    if server is None or os.getpid() != server.arbiter:
        return _private_counts(), 0, 0, 0
    _ensure_pusher(server, worker.log)
    slot = server.board.claim(worker)
    if slot is None:
        if not _warned_full:
            _warned_full = True
            worker.log.warning(
                "vrypt metrics: all %d counter slots are taken; a worker goes uncounted",
                server.board.slots,
            )
        return _private_counts(), 0, 0, 0
    answered, rejected = server.board.values(slot)
    return server.board.words, slot * WORDS, answered, rejected


def attach(worker: Any) -> None:
    """In the worker after the fork: mark the slot as this process's, for the pusher."""
    worker.counts[worker.slot_base + OWNER] = os.getpid()
    worker.counts[worker.slot_base + SERVING] = 1


def record_workers(count: Any) -> None:
    """In the arbiter: gunicorn's own worker count, as its statsd logger sends it (on change
    only); the pusher sends the last value every interval."""
    server = _server
    if server is not None and os.getpid() == server.arbiter and isinstance(count, int):
        server.board.words[server.board.header + WORKERS] = max(count, 0) + 1


_deputy: Deputy | None = None
_deputy_failed = False


def watch(worker: Any) -> None:
    """In every worker, once per sweep (VryptWorker._on_sweep): is the pusher's role to be taken
    over, and by this worker? See `Deputy`. Never on the request path."""
    global _deputy, _deputy_failed
    server = _server
    if server is None or worker.counts is not server.board.words or _deputy_failed:
        return  # no metrics, or a worker without a slot (it is not counted, so it cannot push)
    try:
        if _deputy is None:
            _deputy = Deputy(worker, server)
        _deputy.sweep()
    except Exception:  # the sweep also runs timeouts and the heartbeat: never break it
        _deputy_failed = True
        worker.log.exception("vrypt metrics: the pusher watch failed; it is off in this worker")


def publish(worker: Any) -> None:
    """Store all of a worker's counters in its slot (sweep, final answers, slow sends)."""
    counts = worker.counts
    base = worker.slot_base
    rules = worker.rules
    counts[base + ANSWERED] = rules.answered
    counts[base + REJECTED] = rules.rejected
    counts[base + OPEN] = len(worker.connections)

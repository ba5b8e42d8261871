"""This server's metrics, from the processes' side: what the arbiter does (`start` before any
fork, `claim` a slot for each worker it builds, `record_workers` as gunicorn sends its count, the
last push as it exits) and what a worker does (`attach` after its fork, `publish` its counters,
`watch` whose turn it is to push). One arbiter per process, so the state is module-level.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

from vrypt_worker.metrics.board import (
    ANSWERED,
    MIN_SLOTS,
    OPEN,
    OWNER,
    PUSHER,
    REJECTED,
    SERVING,
    SLOT_BYTES,
    WORDS,
    WORKERS,
    Board,
)
from vrypt_worker.metrics.pushing import Pusher, Turn, preload_resolver
from vrypt_worker.metrics.statsd import Settings, is_name, notices


@dataclass(frozen=True)
class _Server:
    """This arbiter's metrics state, inherited by its workers."""

    board: Board
    settings: Settings
    arbiter: int


_server: _Server | None = None


def start(cfg: Any, log: Any) -> None:
    """In the arbiter, once, before any worker forks (VryptWorker.check_config)."""
    global _server
    settings = Settings.from_cfg(cfg)  # a bad VRYPT_STATSD_INTERVAL fails here, at start
    notices()  # map the shared "reported once" page before anything forks
    if settings is None or _server is not None:
        return
    workers = max(int(cfg.workers or 1), 1)
    server = _Server(Board(max(MIN_SLOTS, 4 * workers)), settings, os.getpid())
    _server = server
    if is_name(settings.host):
        preload_resolver()
    # gunicorn's arbiter leaves through sys.exit once its workers are gone (Arbiter.halt).
    atexit.register(_push_at_exit, server, log)
    # The one announcement of where metrics go. A collector that is not running there is not
    # reported (fire-and-forget gauges); a target that cannot work (a name that does not
    # resolve, no route) is, once for the whole server.
    log.info(
        "vrypt metrics: the workers send StatsD to %s every %gs%s, one worker at a time",
        settings.target,
        settings.interval,
        f" with prefix {settings.prefix!r}" if settings.prefix else "",
    )


def _push_at_exit(server: _Server, log: Any) -> None:
    """The last push, from the arbiter after its workers have exited: what they answered since
    the last push of the worker whose turn it was (a stop's final answers) is sent too."""
    if os.getpid() != server.arbiter:
        return  # a worker that leaves through sys.exit inherited this handler
    board = server.board
    board.words[board.header + PUSHER] = server.arbiter
    pusher = Pusher(board, server.settings, server.arbiter, log)
    pusher.push_safely()
    pusher.close()


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
    """In the worker after the fork: mark the slot as this process's."""
    worker.counts[worker.slot_base + OWNER] = os.getpid()
    worker.counts[worker.slot_base + SERVING] = 1


def record_workers(count: Any) -> None:
    """In the arbiter: gunicorn's own worker count, as its statsd logger sends it (on change
    only); whoever pushes sends the last value every interval."""
    server = _server
    if server is not None and os.getpid() == server.arbiter and isinstance(count, int):
        server.board.words[server.board.header + WORKERS] = max(count, 0) + 1


_turn: Turn | None = None
_turn_failed = False


def watch(worker: Any) -> None:
    """In every worker, at its start and once per sweep (VryptWorker.run, _on_sweep): whose turn
    it is to push, and this worker's pushes when it is its own. See `Turn`. Never on the request
    path."""
    global _turn, _turn_failed
    server = _server
    if server is None or worker.counts is not server.board.words or _turn_failed:
        return  # no metrics, or a worker without a slot (it is not counted, so it cannot push)
    try:
        if _turn is None:
            _turn = Turn(worker, server.board, server.settings, server.arbiter)
        _turn.sweep()
    except Exception:  # the sweep also runs timeouts and the heartbeat: never break it
        _turn_failed = True
        worker.log.exception("vrypt metrics: the pushing turn failed; it is off in this worker")


def publish(worker: Any) -> None:
    """Store all of a worker's counters in its slot (sweep, final answers, slow sends)."""
    counts = worker.counts
    base = worker.slot_base
    rules = worker.rules
    counts[base + ANSWERED] = rules.answered
    counts[base + REJECTED] = rules.rejected
    counts[base + OPEN] = len(worker.connections)

"""The shared counter board: one 64-byte slot per worker in memory every process of the server
maps, and one line of bookkeeping after the slots. No I/O but reading /proc to tell a live
worker from a dead one; docs/metrics.md explains the design.

Slot layout (uint64 words): answered, rejected, open connections, owner pid, serving (1 until the
worker starts draining), 3 words of padding. The line after the slots: the totals sent so far,
the number of slots ever handed out, the pid of the process whose turn it is to push, gunicorn's
own worker count (+1; 0 when the arbiter has not said), and when the last push took its totals
(CLOCK_MONOTONIC nanoseconds, the same clock in every process).
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Protocol

SLOT_BYTES = 64  # one cache line: a worker's stores never share a line with another worker's
WORDS = SLOT_BYTES // 8
ANSWERED, REJECTED, OPEN, OWNER, SERVING = 0, 1, 2, 3, 4
# The line after the slots: written by whoever pushes (SENT_*, PUSHER, PUSHED) and by the
# arbiter (USED, WORKERS).
SENT_ANSWERED, SENT_REJECTED, USED, PUSHER, WORKERS, PUSHED = 0, 1, 2, 3, 4, 5
MIN_SLOTS = 1024


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

    # whoever pushes ---------------------------------------------------------------------------

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

        The totals sent so far live in the shared header, so whoever pushes after another one
        stopped (or died) goes on where that one stopped: nothing counted twice."""
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

    def serving(self, pid: int, parent: int) -> bool:
        """True if `pid` is a live worker of `parent` whose slot says it serves."""
        words = self.words
        for base in range(0, words[self.header + USED] * WORDS, WORDS):
            if words[base + OWNER] == pid:
                return bool(words[base + SERVING]) and alive_child(pid, parent)
        return False

    def first_serving(self, parent: int, below: int, me: int) -> bool:
        """True if no live, serving worker of `parent` other than `me` holds a slot below
        `below`: the worker in slot `below` is then the one to take the turn to push."""
        words = self.words
        for base in range(0, below * WORDS, WORDS):
            owner = words[base + OWNER]
            if owner and owner != me and words[base + SERVING] and alive_child(owner, parent):
                return False
        return True

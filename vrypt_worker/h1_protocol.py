"""HTTP/1.x as a `PlaintextProtocol`: what a transport other than the plain socket (TLS) serves
when the peer chose `http/1.1` by ALPN, or chose nothing.

It answers exactly as worker.Connection does, from the same `RequestFramer` and the worker's
response table: one answer per request, in order, counted in `rules.answered` (4xx included,
`rules.rejected` too); `Connection: close`, HTTP/1.0, HEAD, `Expect: 100-continue`, errors (4xx
and close), the answer that reaches max_requests and every answer while draining saying close
(`rules.open_until`). The common keep-alive read (exactly one head seen before) takes the same
shortcut as the plain path (FramingRules' hot-path contract), without calling the framer.

Pipelined requests are answered in one piece (one TLS record, one write). Past BATCH answers in
one read the rest are kept as answer kinds and rendered a batch at a time as the transport's
writes go (`writable`), so a client that pipelines and never reads costs counts, not answers.

Timeouts that belong to a request are here (`tick`): the head timeout from a partial head's first
read to its end (`head_since`, which the h2c negotiation hands over when the head began before
HTTP/1 was chosen), and the body timeout between two reads of a body, each answered 408 and
close. The keep-alive and send timeouts are the transport's (connection.py).

The partial-head budget: given the worker as `budget` (its `held` and `head_budget`), the bytes
this connection's unfinished head holds are counted in `budget.held` as on the plain path, and a
head past SMALL_HEAD that would take the total past `head_budget` gets 431. The transport calls
`release()` when the connection closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vrypt_worker.framing import (
    BATCH,
    CLOSING,
    FIELDS_TOO_LARGE,
    OK_CLOSE_HEAD,
    OK_HEAD,
    REQUEST_TIMEOUT,
    SMALL_HEAD,
    FramingRules,
    RequestFramer,
)
from vrypt_worker.owed import OwedAnswers

# The cache's answer for a head it does not hold: above every answer kind, so the framer takes it.
_UNCACHED = 1 << 16


class H1Protocol(OwedAnswers):
    """One connection's HTTP/1.x state, I/O-free (see the module docstring)."""

    # A cached head whose answer closes is answered without the framer (answer_and_close). The
    # access log's subclass turns this off: its framer reports every head it frames.
    close_shortcut = True

    __slots__ = (
        "body_since",
        "body_timeout",
        "budget",
        "clean",
        "clock",
        "closing",
        "fed",
        "framer",
        "head_since",
        "head_timeout",
        "held",
        "owed",
        "rules",
        "table",
    )

    def __init__(
        self,
        rules: FramingRules,
        table: list[bytes],
        head_timeout: float,
        body_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        budget: Any = None,
    ) -> None:
        self.rules = rules
        self.table = table  # the worker's live response table (updated in place each second)
        self.framer = RequestFramer(rules)
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.clock = clock
        self.closing = False
        self.clean = False
        self.owed: list[int] = []  # answer kinds beyond the batch already given
        self.head_since = 0.0  # when the current partial head began (clock), or 0
        self.fed = False  # input since the last tick (for the body timeout)
        self.body_since = 0.0  # the body's last input as the last tick saw it (clock)
        self.budget = budget  # the worker: `held` and `head_budget` (None: no budget)
        self.held = 0  # partial bytes counted in budget.held

    def receive(self, data: bytes) -> bytes:
        framer = self.framer
        rules = self.rules
        if framer.fresh:
            # The plain path's shortcut: a read that is exactly one keep-alive head seen before.
            if data == rules.recent_head:
                kind = rules.recent_kind
            else:
                kind = rules.cache.get(data, _UNCACHED)
                if kind < CLOSING:
                    rules.recent_head = data
                    rules.recent_kind = kind
            if kind < CLOSING and rules.answered < rules.open_until:
                rules.answered += 1
                return self.table[kind]
            if kind <= OK_CLOSE_HEAD and self.close_shortcut:
                # ...or exactly one head seen before after which the connection closes (what a
                # new TLS connection per request sends), as plain.FirstRead answers it.
                return self.answer_and_close(CLOSING | (kind & OK_HEAD))
        if self.closing or framer.closed:
            return b""  # input after the final answer is dropped
        self.fed = True
        out = framer.feed(data)
        payload = b""
        if out:
            table = self.table
            if len(out) > BATCH:
                self.owed.extend(out[BATCH:])  # rules.out is shared: copy what we keep
                out = out[:BATCH]
            first = out[0]
            if len(out) == 1:
                payload = table[first]
            elif out.count(first) == len(out):
                payload = table[first] * len(out)
            else:
                payload = b"".join(map(table.__getitem__, out))
        framer.chunk_lines = 0  # (the plain path's read-size hint; records bound reads here)
        if framer.in_head:
            if out or not self.head_since:  # a new head began in this read
                self.head_since = self.clock()
        else:
            self.head_since = 0.0
        if self.budget is not None and (self.held or not framer.fresh):
            payload += self.account()
        if framer.closed and not self.owed:
            self.closing = True
            self.clean = framer.clean
        return payload

    def answer_and_close(self, kind: int) -> bytes:
        """The final answer to a read that was one whole cached head, as `feed` would decide it:
        nothing followed the request, so the close needs no lingering (`clean`)."""
        self.rules.answered += 1
        self.framer.finish()
        self.closing = True
        self.clean = True
        return self.table[kind]

    def account(self) -> bytes:
        """Off the hot path: count the partial bytes held against the worker's budget; a big
        head past it gets 431 (returned)."""
        budget = self.budget
        framer = self.framer
        held = framer.buffered
        if (
            framer.in_head
            and held > SMALL_HEAD
            and budget.held + held - self.held > budget.head_budget
        ):
            return self.refuse(FIELDS_TOO_LARGE)
        budget.held += held - self.held
        self.held = held
        return b""

    def eof(self) -> bytes:
        self.closing = True
        self.head_since = 0.0
        return b""

    def idle(self) -> bool:
        return self.framer.idle and not self.owed and not self.closing

    def shutdown(self) -> bytes:
        # HTTP/1 announces nothing: the worker's rules make every answer from now on say close.
        return b""

    def tick(self, now: float, last_input: float | None = None) -> bytes:
        if self.closing or self.framer.closed:
            return b""
        if self.head_since:
            if now - self.head_since >= self.head_timeout:
                return self.refuse(REQUEST_TIMEOUT)
        elif not self.framer.idle:  # between two reads of a body
            if self.fed:
                self.fed = False
                self.body_since = now if last_input is None else last_input
            if now - self.body_since >= self.body_timeout:
                return self.refuse(REQUEST_TIMEOUT)
        return b""

    def refuse(self, kind: int) -> bytes:
        """The server's own final answer (408 on a timeout), after any answers still owed."""
        rules = self.rules
        rules.rejected += 1
        rules.answered += 1
        self.release()
        self.framer.finish()
        self.head_since = 0.0
        self.clean = False
        if self.owed:
            self.owed.append(kind)
            return b""
        self.closing = True
        return self.table[kind]

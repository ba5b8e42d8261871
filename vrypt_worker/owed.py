"""What the HTTP/1 and uwsgi protocols share (h1_protocol.py, uwsgi_protocol.py): the answers
owed past one batch, given a batch at a time as the transport's writes go (`writable`), and the
partial bytes a connection holds in the worker's head budget, given back when it closes
(`release`). I/O-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vrypt_worker.framing import BATCH


class OwedAnswers:
    """A mixin for a protocol that has the attributes annotated below."""

    __slots__ = ()

    table: list[bytes]  # the worker's live response table, by answer kind
    owed: list[int]  # answer kinds beyond the batch already given
    framer: Any  # `closed` and `clean` once the final request or packet is framed
    closing: bool
    clean: bool
    head_since: float  # when the current partial request began (clock), or 0
    clock: Callable[[], float]
    budget: Any  # the worker: `held` and `head_budget`
    held: int  # partial bytes counted in budget.held

    def render(self, kinds: list[int]) -> bytes:
        """The bytes of the answers `kinds` (at most a batch)."""
        table = self.table
        first = kinds[0]
        if len(kinds) == 1:
            return table[first]
        if kinds.count(first) == len(kinds):  # pipelined, all alike: no list to build
            return table[first] * len(kinds)
        return b"".join(map(table.__getitem__, kinds))

    def writable(self) -> bytes:
        owed = self.owed
        if not owed:
            if self.head_since and not self.closing:
                # we stopped reading that request (back-pressure), not the client sending it
                self.head_since = self.clock()
            return b""
        batch = owed[:BATCH]
        del owed[:BATCH]
        if not owed and self.framer.closed:
            self.closing = True
            self.clean = self.framer.clean
        return self.render(batch)

    def release(self) -> None:
        """The connection closed: its partial bytes leave the worker's budget."""
        if self.held:
            self.budget.held -= self.held
            self.held = 0

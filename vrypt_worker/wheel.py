"""The timer wheel every connection class is filed on: one slot per sweep (a second).

A worker's sweep runs once a second and looks only at the connections filed under that sweep's
tick: those whose timeout is due, and those accepted since the last sweep. Each of them says when
it is due next (`on_tick` returns a tick) and is filed again there. So a sweep costs what its due
connections cost, not what the open ones do: 50,000 idle keep-alive connections cost nothing
until their timeout, instead of a Python walk every second.

A connection's `due` slot holds the tick it is filed under. The int object stored there is the
one from the wheel's (tick, set) entry, shared by every connection filed under that tick: an int
of its own would be 32 bytes per connection (10,000 idle connections, 320 KB).

The wheel knows nothing about connections beyond `due` and hashing: it is I/O-free and is tested
on its own.
"""

from __future__ import annotations

from typing import Any


class TimerWheel:
    """Ticks (sweeps so far) and the connections each coming tick must look at."""

    __slots__ = ("_arrival_tick", "_arrivals", "slots", "tick")

    def __init__(self) -> None:
        self.tick = 0
        self._arrivals: set[Any] = set()
        self._arrival_tick = 1
        self.slots: dict[int, tuple[int, set[Any]]] = {1: (1, self._arrivals)}

    def add(self, conn: Any) -> None:
        """A new connection: the next sweep looks at it first."""
        conn.due = self._arrival_tick
        self._arrivals.add(conn)

    def wake(self, conn: Any, due: int) -> None:
        """File `conn` under tick `due` (at the earliest the next one), unless it is filed under
        an earlier coming tick already: a connection calls this when a timeout shorter than the
        one it was filed under starts (a head, a body, answers owed, lingering)."""
        tick = self.tick
        current = conn.due
        if tick < current <= due:
            return
        self.file(conn, due)

    def file(self, conn: Any, due: int) -> None:
        """File `conn` under tick `due` (at the earliest the next one), wherever it was."""
        tick = self.tick
        if due <= tick:
            due = tick + 1
        slots = self.slots
        current = conn.due
        if current > tick and current != due:
            filed = slots.get(current)
            if filed is not None:
                filed[1].discard(conn)
        entry = slots.get(due)
        if entry is None:
            slots[due] = (due, {conn})
            conn.due = due
        else:
            entry[1].add(conn)
            conn.due = entry[0]

    def discard(self, conn: Any) -> None:
        """`conn` closed: it leaves the wheel."""
        filed = self.slots.get(conn.due)
        if filed is not None:
            filed[1].discard(conn)

    def advance(self) -> set[Any]:
        """The next sweep: its tick becomes current; returns the connections filed under it
        (the caller files each again, or lets it go once closed)."""
        tick = self.tick = self.tick + 1
        _, due = self.slots.pop(tick, (tick, set()))
        self._arrival_tick, self._arrivals = self.slots.setdefault(tick + 1, (tick + 1, set()))
        return due

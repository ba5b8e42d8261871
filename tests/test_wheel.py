"""The timer wheel (vrypt_worker/wheel.py), I/O-free: what each sweep looks at."""

from __future__ import annotations

import random

from vrypt_worker.wheel import TimerWheel


class Conn:
    __slots__ = ("due", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.due = 0  # never filed (the worker `add`s a connection at its accept)

    def __repr__(self) -> str:
        return self.name


def test_a_new_connection_is_looked_at_by_the_next_sweep_only() -> None:
    wheel = TimerWheel()
    conn = Conn("a")
    wheel.add(conn)
    assert wheel.advance() == {conn}
    assert wheel.tick == 1
    assert wheel.advance() == set()  # not filed again: nobody looks at it


def test_filed_connections_wait_for_their_tick() -> None:
    wheel = TimerWheel()
    a, b = Conn("a"), Conn("b")
    wheel.file(a, 3)
    wheel.file(b, 5)
    seen = [wheel.advance() for _ in range(6)]
    assert seen == [set(), set(), {a}, set(), {b}, set()]


def test_a_tick_in_the_past_means_the_next_sweep() -> None:
    wheel = TimerWheel()
    wheel.advance()
    wheel.advance()
    conn = Conn("a")
    wheel.file(conn, 1)
    assert conn.due == 3
    assert wheel.advance() == {conn}


def test_wake_moves_earlier_never_later() -> None:
    wheel = TimerWheel()
    conn = Conn("a")
    wheel.file(conn, 10)
    wheel.wake(conn, 20)  # later: stays at 10
    assert conn.due == 10
    wheel.wake(conn, 4)  # earlier: moves, and is no longer under 10
    assert conn.due == 4
    assert [len(wheel.advance()) for _ in range(10)] == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]


def test_file_moves_either_way_and_discard_forgets() -> None:
    wheel = TimerWheel()
    conn = Conn("a")
    wheel.file(conn, 2)
    wheel.file(conn, 6)  # later: the sweep decided so
    assert [len(wheel.advance()) for _ in range(6)] == [0, 0, 0, 0, 0, 1]
    wheel.file(conn, 8)
    wheel.discard(conn)
    assert [len(wheel.advance()) for _ in range(4)] == [0, 0, 0, 0]


def test_connections_filed_under_one_tick_share_its_int() -> None:
    """`due` holds the wheel's own int for the tick: one object, not one per connection."""
    wheel = TimerWheel()
    conns = [Conn(str(i)) for i in range(3)]
    for conn in conns:
        wheel.file(conn, 12345)
    assert len({id(conn.due) for conn in conns}) == 1


def test_random_filings_are_each_looked_at_once_at_their_tick() -> None:
    rng = random.Random(7)
    wheel = TimerWheel()
    conns = [Conn(str(i)) for i in range(200)]
    want: dict[Conn, int] = {}
    for conn in conns:
        wheel.file(conn, rng.randint(1, 40))
        if rng.random() < 0.5:
            wheel.wake(conn, rng.randint(1, 40))
        want[conn] = conn.due
    for tick in range(1, 45):
        got = wheel.advance()
        assert got == {conn for conn, due in want.items() if due == tick}

"""HTTP/1 on a plain socket: `Connection`, the class every plain client gets, with the framer
driven inline.

The path of one request: the hub's epoll reports the socket readable and calls the connection
itself (`__call__` is `on_readable`) directly in the loop, with no greenlet switch; it does one
`recv`, and a read that is exactly one keep-alive head seen before is answered from the rules'
cache with one `send` (FramingRules' hot-path contract, framing.py). Anything else goes through
`frame`: pipelined copies of one head, or a `RequestFramer` made for this connection while it
holds something partial, whose answers for every complete request in the read leave in one
`send`. Sending, back-pressure, lingering, closing and the transport's timeouts are the core's
(connection.py); HTTP/1's head, body and keep-alive timeouts are here (`timers`).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from _socket import socket as RawSocket
from collections.abc import Callable
from typing import Any

from vrypt_worker.connection import (
    FIRST_RECV_SIZE,
    RECV_SIZE,
    BaseConnection,
    WorkerState,
    never_received,
)
from vrypt_worker.framing import (
    BATCH,
    CLOSING,
    FIELDS_TOO_LARGE,
    OK_CLOSE_HEAD,
    OK_HEAD,
    REQUEST_TIMEOUT,
    SMALL_HEAD,
    RequestFramer,
)

# The cache's answer for a head it does not hold: above every bare answer kind, so the hot path
# leaves it to the framer.
UNCACHED = 1 << 16
# A read whose body had more chunk-size lines than this parsed one at a time (chunks with
# extensions, leading zeros or 16+ bytes: about 1.5 µs each, so up to 14 ms for 64 KiB) moves
# its connection to reads of _CHUNKY_RECV_SIZE: about 1 ms of one loop turn at most, so a
# client sending such a body cannot hold up the others for longer.
_MANY_CHUNK_LINES = 256
_CHUNKY_RECV_SIZE = 4096
# A connection whose first bytes were read at its accept has O_NONBLOCK set already: with
# SOCK_NONBLOCK in the type its socket object agrees (timeout 0) without the ioctl setblocking
# makes.
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


class Connection(BaseConnection):
    """One plain client socket: read, frame, answer (module docstring)."""

    __slots__ = ("framer", "head_since", "held", "owed", "recv_size", "rules", "table")

    def __init__(self, state: WorkerState, sock: Any) -> None:
        super().__init__(state, sock)
        self.rules = state.rules
        # The framing state, made only when a read is not one whole request (new_framer) and
        # dropped when it is back at a request boundary with nothing held: None means `fresh`
        # (FramingRules' hot-path contract), so an idle keep-alive connection holds no framer.
        self.framer: RequestFramer | None = None
        self.table = state.responses.bytes_for
        # Answers owed beyond `pending`, as [kind, count] runs, rendered a batch at a time when
        # the kernel takes them. Whenever it is not empty, `pending` is not empty either. An
        # empty tuple until then: no list per connection (10,000 idle ones, 0.5 MB).
        self.owed: list[list[int]] | tuple[()] = ()
        self.head_since = 0.0  # monotonic time of the current partial head's first read, or 0
        self.held = 0  # partial bytes the framer holds, as counted in state.held
        self.recv_size = FIRST_RECV_SIZE
        # The connection itself is the callback (__call__ is on_readable): no bound method
        # object per connection.
        self.reader.start(self)

    def new_framer(self) -> RequestFramer:
        return RequestFramer(self.rules)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        rules = self.rules
        self.seen = rules.tick
        framer = self.framer
        if framer is None:
            # The hot path, inlined (a Python call costs as much as the rest): a read that is
            # exactly one keep-alive head seen before. See FramingRules for the contract.
            if data == rules.recent_head:  # the head answered last, again: no hashing
                kind = rules.recent_kind
            else:
                kind = rules.cache.get(data, UNCACHED)
                if kind < CLOSING:
                    rules.recent_head = data
                    rules.recent_kind = kind
            if kind < CLOSING and rules.answered < rules.open_until:
                rules.answered += 1
                payload = self.table[kind]
                try:
                    sent = self.sock.send(payload)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self.close()
                    return
                if sent != len(payload):
                    self.wait_writable(payload[sent:])
                return
            if kind <= OK_CLOSE_HEAD:  # one whole request, after which the connection closes
                self.answer_and_close(CLOSING | (kind & OK_HEAD))
                return
        self.frame(data)

    __call__ = on_readable

    def frame(self, data: bytes) -> None:
        """A read the hot path does not take: through the framer, which is made if need be."""
        framer = self.framer
        try:
            if len(data) == self.recv_size == FIRST_RECV_SIZE:
                self.recv_size = RECV_SIZE  # more may be waiting: pipelined, or a body
            if framer is None:
                # Pipelined copies of one keep-alive head (load generators, checkers that
                # pipeline): the answers feed() would give, without a framer.
                rules = self.rules
                count = rules.copies(data, BATCH)
                if count:
                    self.send(self.table[rules.recent_kind] * count)
                    return
                framer = self.framer = self.new_framer()
            out = framer.feed(data)
            if out:
                table = self.table
                first = out[0]
                if len(out) == 1:
                    payload = table[first]
                elif len(out) > BATCH:  # counted, rendered as the kernel takes them
                    self.owe(out)
                    payload = b""
                elif out.count(first) == len(out):  # pipelined, all alike: no list to build
                    payload = table[first] * len(out)
                else:
                    payload = b"".join(map(table.__getitem__, out))
                if payload:
                    self.send(payload)
            if not framer.fresh or self.held:  # something partial held now, or until now
                self.track_partial(bool(out))
            if framer.closed:
                if not self.pending:
                    self.finish()
            elif framer.fresh:
                self.framer = None  # nothing held: the next read may take the hot path
        except Exception:
            # A bug must cost one connection, never the worker and its other clients.
            self.state.log.exception("vrypt_worker: closing a connection after an internal error")
            self.close()

    def answer_and_close(self, kind: int) -> None:
        """A read that was exactly one cached head after which the connection closes
        (`Connection: close`, HTTP/1.0, draining), as RequestFramer.feed would decide it: its
        answer, then the close at once (nothing followed the request: no lingering needed)."""
        rules = self.rules
        rules.answered += 1
        payload = self.table[kind]
        try:
            sent = self.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent == len(payload):
            self.close()
            state = self.state
            if rules.answered >= state.max_requests:  # as in linger()
                state.recycle()
            return
        self.close_after(payload[sent:])

    def close_after(self, rest: bytes) -> None:
        """The rest of a final answer the kernel did not take at once: sent as the client reads,
        then the close."""
        framer = self.framer = self.new_framer()
        framer.finish()
        framer.clean = True  # linger() closes once the rest has gone
        self.wait_writable(rest)

    def track_partial(self, answered: bool) -> None:
        """Off the hot path: account the bytes a partial head holds against the worker's
        budget, and note when the current head began (the head timeout runs from there)."""
        if self.reader is None:  # the send just failed and closed the connection
            return
        framer = self.framer
        state = self.state
        if framer.chunk_lines:
            if framer.chunk_lines > _MANY_CHUNK_LINES:
                self.recv_size = _CHUNKY_RECV_SIZE  # small chunks the scan cannot take
            framer.chunk_lines = 0
        held = framer.buffered
        if framer.in_head:
            if answered or not self.head_since:  # a new head began in this read
                self.head_since = time.monotonic()
                state.wheel.wake(self, state.wheel.tick + state.head_timeout)
            if held > SMALL_HEAD and state.held + held - self.held > state.head_budget:
                self.refuse(FIELDS_TOO_LARGE)  # the budget is spent: big heads are refused
                return
        else:
            self.head_since = 0.0
            if not framer.idle and not framer.closed:  # a body: the time to its next read
                state.wheel.wake(self, state.wheel.tick + 1 + state.body_timeout)
        state.held += held - self.held
        self.held = held

    def owe(self, out: list[int]) -> None:
        """Many answers from one read: keep them as counts, send what the kernel takes."""
        owed = self.owed = self.owed or []
        first = out[0]
        if out.count(first) == len(out):
            owed.append([first, len(out)])
        else:
            for kind, run in itertools.groupby(out):
                owed.append([kind, sum(1 for _ in run)])
        if not self.pending:
            self.flush(waiting=False)

    def flush(self, waiting: bool) -> bool:
        """Render and send owed answers a batch at a time. When the kernel stops taking them,
        the unsent rest of the answer it stopped in (or the next whole one) becomes `pending`
        and the connection waits to be writable; returns whether everything went."""
        owed: list[list[int]] = self.owed  # type: ignore[assignment]  # called when not empty
        table = self.table
        while owed:
            run = owed[0]
            kind, count = run
            answer = table[kind]
            size = len(answer)
            payload = answer * min(count, BATCH)
            try:
                sent = self.sock.send(payload)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return False
            # When the kernel stopped short, the answer it stopped in (or the next whole one)
            # goes to pending, so `pending` holds at most one answer.
            done = len(payload) // size if sent == len(payload) else sent // size + 1
            if done < count:
                run[1] = count - done
            else:
                del owed[0]
            if sent != len(payload):
                if sent:
                    self.seen = self.state.wheel.tick
                rest = payload[sent : done * size]
                if waiting:
                    self.pending = rest
                else:
                    self.wait_writable(rest)
                return False
        return True

    def refuse(self, kind: int) -> None:
        """The worker's own final answer (408 on a timeout, 431 past the head budget)."""
        state = self.state
        state.held -= self.held  # finish() drops the partial bytes
        self.held = 0
        self.head_since = 0.0
        state.rules.rejected += 1
        state.rules.answered += 1
        state.publish()
        if self.owed:  # after the answers still owed, in order (a list when not empty)
            self.owed.append([kind, 1])  # type: ignore[union-attr]
        else:
            self.send(self.table[kind])
        self.close_after_send()

    def close_after_send(self) -> None:
        framer = self.framer
        if framer is None:
            framer = self.framer = self.new_framer()
        framer.finish()
        if not self.pending:
            self.finish()

    def finish(self) -> None:
        """After the final answer (the framer says closed): close, lingering if bytes may
        still come (connection.BaseConnection.linger)."""
        self.linger(self.framer.clean)  # type: ignore[union-attr]  # closed: a framer said so

    # the core's hooks -------------------------------------------------------------------------

    def refill(self) -> bool:
        return not self.owed or self.flush(waiting=True)

    def resume(self) -> None:
        framer = self.framer
        if framer is not None and framer.closed:
            self.finish()
        else:
            if self.head_since:  # we stopped reading that head, not the client sending it
                self.head_since = time.monotonic()
            self.reader.start(self)

    def release(self) -> None:
        if self.held:
            self.state.held -= self.held
            self.held = 0
        self.owed = ()

    def idle(self) -> bool:
        """Between requests: nothing partial, no body being read."""
        framer = self.framer
        return framer is None or framer.idle

    def timers(self, keepalive: int, now: float, tick: int, seen: int) -> int | None:
        """HTTP/1's head, body and keep-alive timeouts, each measured per request
        (connection.py's model)."""
        state = self.state
        if self.head_since:  # a head from its first byte to its end: the head timeout
            left = state.head_timeout - (now - self.head_since)
            if left > 0:
                return tick + max(1, int(left))
        elif self.idle():  # between requests: keep-alive
            due = seen + 1 + keepalive
            if tick < due:
                return due
            self.close()
            return None
        else:  # between two reads of a body
            due = seen + 1 + state.body_timeout
            if tick < due:
                return due
        self.refuse(REQUEST_TIMEOUT)
        return None if self.reader is None else tick + 1

    # draining -------------------------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown (the rules now make every answer close): a request already waiting
        in the kernel is answered now; an idle connection is closed after the worker's grace."""
        framer = self.framer
        if (framer is None or framer.idle) and not self.pending and not self.lingering:
            self.on_readable()

    def close_if_idle(self, spare_fresh: bool = False) -> bool:
        """Draining: close this connection if it has nothing in progress. A request that has
        reached the kernel is read and answered first (closing over unread bytes would reset the
        connection and lose it). Returns True when it was spared because it is fresh."""
        if self.reader is None or not self.idle() or self.pending or self.lingering:
            return False
        # Fresh or not, asked before the read: a request that reaches the kernel between the
        # read and this question would otherwise be closed unread (a reset, the request lost).
        fresh = spare_fresh and never_received(self.sock)
        self.on_readable()
        if self.reader is None or not self.idle() or self.pending or self.lingering:
            return False
        if fresh:
            return True
        self.close()
        return False


class FirstRead:
    """The first read of a plain HTTP/1 connection, at its accept (`TCP_DEFER_ACCEPT`): called
    by the worker's accept loop with the descriptor accept4 gave it; `new` makes the connection
    (Connection, or the access log's LoggingConnection) and `add` hands it to the worker."""

    __slots__ = ("add", "new", "state")

    def __init__(
        self,
        state: WorkerState,
        new: Callable[[WorkerState, Any], Connection],
        add: Callable[[Connection], None],
    ) -> None:
        self.state = state
        self.new = new
        self.add = add

    def read(self, fd: int, family: int, given: bytes = b"") -> None:
        """A plain HTTP/1 connection, just accepted: with TCP_DEFER_ACCEPT its request is
        usually here already. Read it now; a whole cached head whose answer closes the connection
        (`Connection: close`, HTTP/1.0, draining: what health checks and probes send) is
        answered and closed on the descriptor, without a socket object, a watcher or a
        Connection (the hot path of Connection.on_readable and answer_and_close, for a
        connection that never reaches the loop), and reported to the access log when it is on.
        Anything else becomes a Connection, given what was read. `given`: bytes already read
        from the non-blocking descriptor, in place of this read (what followed a PROXY
        protocol header, proxied.py)."""
        data: bytes | None = given
        if not given:
            try:
                # os.set_blocking is one ioctl; fcntl.fcntl(fd, F_SETFL, O_NONBLOCK) would
                # first try its third argument as a buffer and format the TypeError it then
                # drops (a tenth of this path's instructions, measured with callgrind).
                os.set_blocking(fd, False)
                data = os.read(fd, FIRST_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None  # nothing yet (a second passed, or the option is off here)
            except OSError:
                os.close(fd)
                return
        if data is not None:
            if not data:  # connected and closed without a request
                os.close(fd)
                return
            state = self.state
            rules = state.rules
            if data == rules.recent_close_head:  # a probe's request again: no hashing
                kind = rules.recent_close_kind
            else:
                kind = rules.cache.get(data, UNCACHED)
                if CLOSING <= kind <= OK_CLOSE_HEAD:
                    rules.recent_close_head = data
                    rules.recent_close_kind = kind
            if kind <= OK_CLOSE_HEAD and (kind >= CLOSING or rules.answered >= rules.open_until):
                kind = CLOSING | (kind & OK_HEAD)
                rules.answered += 1
                payload = state.responses.bytes_for[kind]
                try:
                    sent = os.write(fd, payload)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = len(payload)  # the client is gone: nothing more to send it
                if state.access_log is not None:  # its one test on this path, where it is used
                    state.access_log.accepted(fd, family, data, kind)
                if sent == len(payload):
                    os.close(fd)
                    if rules.answered >= state.max_requests:  # as in BaseConnection.linger
                        state.recycle()  # may close the listener under the accept loop
                    return
                conn = self.new(state, RawSocket(family, _NONBLOCKING_STREAM, 0, fd))
                self.add(conn)
                conn.close_after(payload[sent:])
                return
        conn = self.new(self.state, RawSocket(family, _NONBLOCKING_STREAM, 0, fd))
        self.add(conn)
        if data is not None:
            conn.seen = self.state.rules.tick
            conn.frame(data)

"""The access log's writer thread: lines collected on the hub are written to gunicorn's
`gunicorn.access` logger here, so that a slow disk stalls this thread, never the hub.

Chunks of lines wait in a queue bounded by _MAX_QUEUED characters: past the bound, new lines are
dropped and counted, and the count goes to the error log once the writer catches up (nginx would
block its worker instead). When every handler writes `%(message)s` alone (gunicorn's own access
handlers), one record carries many lines: one write per chunk for a regular file, PIPE_BUF-sized
records for a pipe or a terminal; otherwise one record per line, so that a `logconfig_dict`
formatter sees each line.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import threading
from collections import deque
from typing import Any

# Characters of lines waiting for the writer thread beyond which new lines are dropped: a disk
# that stalls for seconds under 100k requests/s costs at most this much memory (x4 as str).
_MAX_QUEUED = 16 * 1024 * 1024


class LineWriter:
    """One worker's writer thread and the queue that feeds it."""

    def __init__(self, logger: logging.Logger, error: Any) -> None:
        self.logger = logger
        self.error = error  # gunicorn's error log: dropped lines and write failures
        self.queue: deque[list[str]] = deque()
        self.queued = 0  # characters waiting
        self.dropped = 0  # lines dropped at the bound since the last report
        self.ready = threading.Condition(threading.Lock())
        self.stopping = False
        self.whole = False  # one record per batch, else PIPE_BUF-sized records (_records)
        self.batch = self._batchable()
        self.thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self.thread.start()

    # the hub's side ------------------------------------------------------------------------------

    def hand(self, lines: list[str]) -> None:
        """Queue a chunk of lines for the thread (dropped, and counted, past the bound)."""
        size = sum(map(len, lines))
        with self.ready:
            if self.queued + size > _MAX_QUEUED:
                self.dropped += len(lines)
                return
            self.queued += size
            self.queue.append(lines)
            self.ready.notify()

    def stop(self, timeout: float) -> None:
        """Leaving: the thread writes what is queued, then ends (waited for up to `timeout`)."""
        with self.ready:
            self.stopping = True
            self.ready.notify()
        self.thread.join(timeout)

    # the writer thread's side --------------------------------------------------------------------

    def _batchable(self) -> bool:
        """Whether one record may carry many lines: every handler that will see it writes the
        message alone (gunicorn's own access handlers, `%(message)s`) and nothing filters."""
        logger: logging.Logger | None = self.logger
        if logger is None or logger.filters:
            return False
        handlers: list[logging.Handler] = []
        while logger is not None:
            handlers.extend(logger.handlers)
            if not logger.propagate:
                break
            logger = logger.parent
        whole = True
        for handler in handlers:
            if handler.filters or not isinstance(handler, logging.StreamHandler):
                return False
            if handler.formatter is not None and handler.formatter._fmt != "%(message)s":
                return False
            try:
                regular = stat.S_ISREG(os.fstat(handler.stream.fileno()).st_mode)
            except (AttributeError, OSError, ValueError):
                regular = False
            whole = whole and regular
        self.whole = whole
        return True

    def _records(self, lines: list[str]) -> list[str]:
        """Lines joined into records: one for a regular file (an O_APPEND write is not
        interleaved with another worker's); for a pipe or a terminal (`-`), records of at most
        PIPE_BUF bytes, the size up to which the kernel keeps two workers' writes apart."""
        if self.whole:
            return ["\n".join(lines)]
        records: list[str] = []
        group: list[str] = []
        size = 0
        for line in lines:
            if group and size + len(line) + 1 > select.PIPE_BUF:
                records.append("\n".join(group))
                group = []
                size = 0
            group.append(line)
            size += len(line) + 1
        if group:
            records.append("\n".join(group))
        return records

    def _write_loop(self) -> None:
        logger = self.logger
        while True:
            with self.ready:
                while not self.queue and not self.stopping:
                    self.ready.wait()
                chunks = list(self.queue)
                self.queue.clear()
                self.queued = 0
                dropped, self.dropped = self.dropped, 0
                stopping = self.stopping
            try:
                if chunks:
                    if self.batch:
                        lines = [line for chunk in chunks for line in chunk]
                        for record in self._records(lines):
                            logger.info(record)
                    else:
                        for chunk in chunks:
                            for line in chunk:
                                logger.info(line)
                if dropped:
                    self.error.warning(
                        "access log: %d lines dropped, the log's output was slower than the "
                        "requests",
                        dropped,
                    )
            except Exception:
                self.error.exception("access log: writing failed")
            if stopping:
                return

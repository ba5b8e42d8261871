"""What the arbiter says about its listeners at start: the `Listening at:` line, with one
SO_REUSEPORT listener per worker slot, and the address families each wildcard address serves.

gunicorn builds the line from its `Arbiter.LISTENERS`, which here hold every slot's listener
(listeners.py), so each address showed once per worker: `http://0.0.0.0:8080,http://0.0.0.0:8080`.
The line is rewritten as gunicorn logs it to name each address once, with the number of
listeners it has, and keeps gunicorn's form before that (`Listening at: URL[,URL] (PID)`), which
scripts parse:

    Listening at: http://0.0.0.0:8080 (1234); 4 SO_REUSEPORT listeners on each address, one per
    worker slot

gunicorn offers no hook between building the line and logging it, so this is a logging filter
on gunicorn's error logger (`gunicorn.error`, which every gunicorn Logger class writes to and
keeps across a HUP's log setup). It touches only the two messages gunicorn 27's Arbiter logs
(`start`, and `reload` when the bind changed); tests/test_arbiter.py names them if they change.
"""

from __future__ import annotations

import logging
from typing import Any

from vrypt_worker import families

# gunicorn 27's Arbiter.start and Arbiter.reload, verbatim.
AT_START = "Listening at: %s (%s)"
AT_RELOAD = "Listening at: %s"
_SUFFIX = "; %d SO_REUSEPORT listeners on each address, one per worker slot"


def once_per_address(urls: str) -> tuple[str, int]:
    """`a,a,b,b` -> (`a,b`, 2): each address once, in order, and how many listeners each has
    (the fewest, should they differ)."""
    counts: dict[str, int] = {}
    for url in urls.split(","):
        counts[url] = counts.get(url, 0) + 1
    return ",".join(counts), min(counts.values(), default=1)


class ListeningOnce(logging.Filter):
    """Rewrites gunicorn's `Listening at:` record; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in (AT_START, AT_RELOAD) and isinstance(record.args, tuple) and record.args:
            urls, *rest = record.args
            if isinstance(urls, str):
                unique, each = once_per_address(urls)
                if each > 1:
                    record.msg = f"{record.msg}{_SUFFIX}"
                    record.args = (unique, *rest, each)
                else:
                    record.args = (unique, *rest)
        return True


def listening_once(log: Any) -> None:
    """Install the filter on gunicorn's error logger (once)."""
    logger = getattr(log, "error_log", None) or logging.getLogger("gunicorn.error")
    if not any(isinstance(f, ListeningOnce) for f in logger.filters):
        logger.addFilter(ListeningOnce())


def families_served(listeners: list[Any], log: Any) -> None:
    """Say at start what each wildcard address serves: IPv6 and IPv4 (`[::]`, the default), or
    one family only, and why (families.describe)."""
    said: set[str] = set()
    for listener in listeners:
        text = families.describe(listener)
        if text is not None and text not in said:
            said.add(text)
            log.info("vrypt_worker: %s", text)

"""Per-worker counters in shared memory and the StatsD metrics of the server (docs/metrics.md).

One concern per module:

- `board`: the shared counter slots every process of the server maps, and their bookkeeping.
- `statsd`: where metrics go (gunicorn's statsd settings), the clients, reporting a broken
  collector once.
- `pushing`: reading the board once per interval and sending the differences, from one serving
  worker at a time (whose turn it is: `Turn`).
- `server`: what the arbiter and each worker call (start, claim, attach, publish, watch).
- `logger`: gunicorn's statsd logger for this server (`logger_class` in the conf).

The names the rest of the package (worker.py, listeners.py, settings.py, the conf) uses are
re-exported here.
"""

from vrypt_worker.metrics.board import (
    ANSWERED,
    MIN_SLOTS,
    OPEN,
    OWNER,
    PUSHED,
    PUSHER,
    REJECTED,
    SENT_ANSWERED,
    SENT_REJECTED,
    SERVING,
    SLOT_BYTES,
    USED,
    WORDS,
    WORKERS,
    Board,
    alive_child,
)
from vrypt_worker.metrics.logger import StatsdLogger
from vrypt_worker.metrics.pushing import Pusher, Turn
from vrypt_worker.metrics.server import attach, claim, publish, record_workers, start, watch
from vrypt_worker.metrics.statsd import (
    DEFAULT_INTERVAL,
    Settings,
    TaggedStatsClient,
    UnixDatagramStatsClient,
    collector_problem,
    first_report,
    interval_from_env,
    is_name,
    literal_address,
    make_client,
    not_listening,
    statsd_prefix,
)

__all__ = [
    "ANSWERED",
    "DEFAULT_INTERVAL",
    "MIN_SLOTS",
    "OPEN",
    "OWNER",
    "PUSHED",
    "PUSHER",
    "REJECTED",
    "SENT_ANSWERED",
    "SENT_REJECTED",
    "SERVING",
    "SLOT_BYTES",
    "USED",
    "WORDS",
    "WORKERS",
    "Board",
    "Pusher",
    "Settings",
    "StatsdLogger",
    "TaggedStatsClient",
    "Turn",
    "UnixDatagramStatsClient",
    "alive_child",
    "attach",
    "claim",
    "collector_problem",
    "first_report",
    "interval_from_env",
    "is_name",
    "literal_address",
    "make_client",
    "not_listening",
    "publish",
    "record_workers",
    "start",
    "statsd_prefix",
    "watch",
]

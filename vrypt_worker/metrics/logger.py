"""gunicorn's statsd logger for this server (`logger_class` in vrypt_worker/conf.py): gunicorn's
own metrics, a collector it cannot reach reported once instead of a traceback per metric, and
gunicorn's worker count recorded for the pusher, which sends it every interval.
"""

from __future__ import annotations

import socket
from typing import Any

from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.instrument.statsd import Statsd

from vrypt_worker.metrics.server import record_workers
from vrypt_worker.metrics.statsd import collector_problem, statsd_prefix


class StatsdLogger(Statsd):
    """gunicorn's statsd logger, set by vrypt_worker/conf.py, that reports a collector it cannot
    reach once for the whole server instead of a warning with a traceback per metric. Without
    statsd_host it is the plain gunicorn logger (with an explicit logger_class gunicorn no longer
    switches between the two by itself)."""

    def __init__(self, cfg: Any) -> None:
        Logger.__init__(self, cfg)
        self.prefix = statsd_prefix(cfg.statsd_prefix)
        self.dogstatsd_tags = cfg.dogstatsd_tags
        self.sock: socket.socket | None = None
        host = cfg.statsd_host
        if host is None:
            return
        if isinstance(host, str):
            family = socket.AF_UNIX
        elif util.is_ipv6(host[0]):
            family = socket.AF_INET6
        else:
            family = socket.AF_INET
        self._target = f"unix:{host}" if isinstance(host, str) else f"{host[0]}:{host[1]}"
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.connect(host)
        except Exception as exc:
            sock.close()
            collector_problem(self._warn, self._target, exc)
            return
        self.sock = sock

    def _warn(self, msg: str, *args: Any) -> None:
        Logger.warning(self, msg, *args)  # not self.warning: that would send a metric

    def gauge(self, name: str, value: Any) -> None:
        # gunicorn's arbiter sends gunicorn.workers only when the count changes; the pusher sends
        # it every interval (a restarted exporter knows it at once), with this same value.
        if name == "gunicorn.workers":
            record_workers(value)
        super().gauge(name, value)

    def _sock_send(self, msg: str | bytes) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            if isinstance(msg, str):
                msg = msg.encode("ascii")
            if self.dogstatsd_tags:
                msg = msg + b"|#" + self.dogstatsd_tags.encode("ascii")
            sock.send(msg)
        except Exception as exc:
            collector_problem(self._warn, self._target, exc)

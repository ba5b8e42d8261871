"""Gunicorn settings for vrypt_worker, behind `conf/gunicorn.conf.py` and `vrypt-server`.

This module is itself a gunicorn config (`gunicorn -c python:vrypt_worker.conf`). Every value here
can be overridden as usual: on the command line (which wins) or in `GUNICORN_CMD_ARGS`. Where
gunicorn has no flag to undo a value set here, an environment variable switches it instead, so an
operator never edits this file to change a mode:

  PORT               port to bind on 0.0.0.0 (default 8080), as gunicorn itself reads it
  WEB_CONCURRENCY    number of workers (default: the CPUs this process may run on)
  VRYPT_REUSE_PORT   1 (default): one SO_REUSEPORT listener per worker; 0: one shared listener
  VRYPT_STATSD_HOST  host:port of the StatsD collector (default 127.0.0.1:8125); empty disables
  VRYPT_STATSD_INTERVAL  seconds between two sends of the metrics pusher (default 1)
"""

import os


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


bind = [f"0.0.0.0:{os.environ.get('PORT') or 8080}"]
workers = int(os.environ.get("WEB_CONCURRENCY") or len(os.sched_getaffinity(0)))
worker_class = "vrypt_worker.VryptWorker"
# Never imported by VryptWorker; named so that gunicorn needs no APP_MODULE argument, and so that
# another worker class (`-k gevent`) given this conf serves the same answer through WSGI.
wsgi_app = "vrypt_worker.wsgi:application"

# Each worker binds its own listener after fork and the kernel spreads connections across them,
# as the Rust original does with one SO_REUSEPORT socket per thread.
reuse_port = _env_flag("VRYPT_REUSE_PORT", True)
backlog = 4096
# Idle keep-alive connections are closed after this many seconds, like the original.
keepalive = 30
# Open connections per worker; the worker raises its open-file limit to fit when it can.
worker_connections = 50_000
graceful_timeout = 30

accesslog = None
errorlog = "-"
loglevel = "info"

statsd_host = os.environ.get("VRYPT_STATSD_HOST", "127.0.0.1:8125") or None
# gunicorn's statsd logger, reporting a collector it cannot reach once rather than per metric;
# without statsd_host it is gunicorn's plain logger (see docs/metrics.md).
logger_class = "vrypt_worker.metrics.StatsdLogger"

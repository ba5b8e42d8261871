"""Gunicorn settings for vrypt_worker, behind `conf/gunicorn.conf.py` and `vrypt-server`.

This module is itself a gunicorn config (`gunicorn -c python:vrypt_worker.conf`). Every value here
can be overridden as usual: on the command line (which wins) or in `GUNICORN_CMD_ARGS`. Where
gunicorn has no flag to undo a value set here, an environment variable switches it instead, so an
operator never edits this file to change a mode:

  PORT               port to bind on [::] and 0.0.0.0 (default 8080), as gunicorn reads it
  WEB_CONCURRENCY    number of workers (default: the CPUs this process may run on)
  VRYPT_REUSE_PORT   1 (default): one SO_REUSEPORT listener per worker; 0: one shared listener
  VRYPT_DEFER_ACCEPT 1 (default): TCP listeners hand over a connection once its first bytes came
                     (TCP_DEFER_ACCEPT, 1 s at most), and the worker reads them at the accept
  VRYPT_STATSD_HOST  host:port of the StatsD collector (default 127.0.0.1:8125); empty disables
  VRYPT_STATSD_INTERVAL  seconds between two sends of the metrics pusher (default 1)
  VRYPT_HEAD_TIMEOUT seconds from a request head's first byte to its end (default 10)
  VRYPT_BODY_TIMEOUT seconds between two reads of a request body (default 60)
  VRYPT_SEND_TIMEOUT seconds a client may leave owed answers untaken before the close (default 60)
  VRYPT_HEAD_BUFFER  bytes of unfinished heads a worker holds before big ones get 431 (32 MiB)
  VRYPT_HTTP3        1: HTTP/3 on UDP at the port of each bind, only with certfile and keyfile
                     (default 0; also `vrypt_http3 = True` in a conf file; docs/http3.md)
  VRYPT_STATUS, VRYPT_BODY, VRYPT_BODY_FILE, VRYPT_CONTENT_TYPE, VRYPT_HEADERS: the answer
                     (vrypt_worker/answer.py; also `vrypt_status` ... as variables of a conf file)

A bad value of any of them stops the start with a message naming it and exit status 2.
"""

import os

from vrypt_worker import arbiter as _arbiter
from vrypt_worker import families as _families
from vrypt_worker import settings as _settings

try:
    _settings.check_environment()
    _port = _settings.env_port() or _settings.DEFAULT_PORT
    _workers = _settings.env_workers()
    _reuse_port = _settings.env_flag("VRYPT_REUSE_PORT", True)
    _statsd_host = _settings.env_statsd_host()
except _settings.SettingError as _error:
    _settings.refuse(_error)

# Both address families: `[::]` with IPV6_V6ONLY off, or `0.0.0.0` where the machine has no IPv6
# sockets (vrypt_worker/families.py); the arbiter says which at start.
bind = [_families.default_bind(_port)]
workers = _workers or len(os.sched_getaffinity(0))
worker_class = "vrypt_worker.VryptWorker"
# Never imported by VryptWorker; named so that gunicorn needs no APP_MODULE argument, and so that
# another worker class (`-k gevent`) given this conf serves the same answer through WSGI.
wsgi_app = _settings.OWN_WSGI_APP

# Each worker binds its own listener after fork and the kernel spreads connections across them,
# as the Rust original does with one SO_REUSEPORT socket per thread.
reuse_port = _reuse_port
backlog = 4096
# Idle keep-alive connections are closed after this many seconds, like the original.
keepalive = 30
# Open connections per worker: 50,000, or fewer where the hard open-file limit is lower, so that a
# default never asks for descriptors the machine refuses. The worker raises its soft limit to fit.
worker_connections = _settings.fitting_worker_connections()
graceful_timeout = 30

accesslog = None
errorlog = "-"
loglevel = "info"

statsd_host = _statsd_host
# gunicorn's statsd logger, reporting a collector it cannot reach once rather than per metric;
# without statsd_host it is gunicorn's plain logger (see docs/metrics.md).
logger_class = "vrypt_worker.metrics.StatsdLogger"


# gunicorn's server hooks: what runs in the arbiter (vrypt_worker/arbiter.py). A conf that defines
# on_starting or on_reload itself can call these from it (vrypt_worker.conf.on_starting(server));
# one that defines nworkers_changed gets ours called before its own.
nworkers_changed = _arbiter.nworkers_changed
on_starting = _arbiter.on_starting
on_reload = _arbiter.on_reload

# Gunicorn configuration for vrypt_worker:  gunicorn -c conf/gunicorn.conf.py
#
# The defaults live in the package (vrypt_worker/conf.py) so that `vrypt-server` and an installed
# wheel use exactly the same ones; that file documents each value and the environment variables
# (PORT, WEB_CONCURRENCY, VRYPT_REUSE_PORT, VRYPT_STATSD_HOST, VRYPT_HEAD_TIMEOUT) that switch them.
# Override a value below, or on the command line / in GUNICORN_CMD_ARGS, which win over this file.
from vrypt_worker.conf import *  # noqa: F403

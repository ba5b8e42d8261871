# Gunicorn configuration for vrypt_worker:  gunicorn -c conf/gunicorn.conf.py
#
# The defaults live in the package (vrypt_worker/conf.py) so that `vrypt-server` and an installed
# wheel use exactly the same ones; that file documents each value and the environment variables
# (PORT, WEB_CONCURRENCY, VRYPT_REUSE_PORT, VRYPT_STATSD_HOST, VRYPT_HEAD_TIMEOUT, VRYPT_STATUS ...)
# that switch them. Override a value below, or on the command line / in GUNICORN_CMD_ARGS, which
# win over this file.
from vrypt_worker.conf import *  # noqa: F403

# The answer (default: 200, text/plain, `Vrypt`). gunicorn ignores these names; the worker reads
# them at start and refuses a bad value. VRYPT_STATUS, VRYPT_BODY, VRYPT_BODY_FILE,
# VRYPT_CONTENT_TYPE and VRYPT_HEADERS in the environment win over them. A maintenance page:
#
# vrypt_status = 503
# vrypt_body_file = "maintenance.html"             # relative to the directory gunicorn runs in
# vrypt_content_type = "text/html; charset=utf-8"  # guessed from the file name when unset
# vrypt_headers = {"Retry-After": "120"}           # or a list of "Name: value" lines

# HTTP/3 (QUIC on UDP, the port of each bind), only with certfile and keyfile, and aioquic
# installed (pip install 'vrypt-worker[http3]'); answers over TLS then carry Alt-Svc. VRYPT_HTTP3
# in the environment wins. See docs/http3.md.
#
# vrypt_http3 = True

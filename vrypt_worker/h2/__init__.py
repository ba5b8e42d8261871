"""HTTP/2 for vrypt_worker, I/O-free: frames in, frames out (RFC 9113, RFC 7541).

The public API, all the transport needs:

- `H2Answers(now)`: the answer's HEADERS block and DATA, one per worker; `refresh(now)` once a
  second (Date).
- `H2Config(...)` or `H2Config.from_gunicorn(cfg)`: gunicorn's `http2_*` settings, timeouts.
- `H2Protocol(config, rules, answers)`: a `PlaintextProtocol` for one connection (TLS with ALPN
  `h2`, or h2c prior knowledge: give it every byte read, preface included). Write `start()`
  first (server SETTINGS), then `receive(data)`, `writable()`, `tick(now)`, `shutdown()`,
  `eof()`; close when `closing`. `H2Protocol.prior_knowledge(config, rules, answers, received)`
  does the first two steps: (protocol, bytes to write).
- `H2Protocol.upgraded(config, rules, answers, settings, head)`: after `Upgrade: h2c`, when
  the transport has written `UPGRADE_101`; `start()` then holds our SETTINGS and the answer
  to stream 1.
- `H2cPolicy.from_config(cfg)`, `upgrade_request(head)`, `preface_match(buf)`: the h2c
  decisions, as gunicorn makes them.
"""

from vrypt_worker.h2.answers import H2Answers
from vrypt_worker.h2.connection import H2Config, H2Protocol
from vrypt_worker.h2.negotiation import (
    H2C_PREFACE,
    H2C_PREFACE_TIMEOUT,
    MATCH,
    MISMATCH,
    PARTIAL,
    REJECT,
    SERVE_H2,
    SERVE_HTTP1,
    UPGRADE_101,
    WAIT,
    H2cPolicy,
    Upgrade,
    preface_match,
    upgrade_request,
)

__all__ = [
    "H2C_PREFACE",
    "H2C_PREFACE_TIMEOUT",
    "MATCH",
    "MISMATCH",
    "PARTIAL",
    "REJECT",
    "SERVE_H2",
    "SERVE_HTTP1",
    "UPGRADE_101",
    "WAIT",
    "H2Answers",
    "H2Config",
    "H2Protocol",
    "H2cPolicy",
    "Upgrade",
    "preface_match",
    "upgrade_request",
]

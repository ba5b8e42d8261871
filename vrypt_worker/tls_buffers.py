"""SSL_MODE_RELEASE_BUFFERS on a Python `ssl.SSLContext`, which the ssl module does not expose.

OpenSSL keeps a connection's record buffers (about 17 KiB to read, as much to write) for the
connection's whole life unless the context's mode has SSL_MODE_RELEASE_BUFFERS: then it frees
each as soon as it is empty, so an idle keep-alive connection holds none. nginx sets it on every
context (ngx_ssl_create); the ssl module has no way to.

This reaches the `SSL_CTX` under the Python object with ctypes: CPython's `PySSLContext` begins,
after the object header, with its `SSL_CTX *` (Modules/_ssl.c, unchanged from 3.7 to 3.13), and
the functions come from the libssl that the `_ssl` extension itself is linked against (looked up
through its handle), so the call goes to the very library that made the context. That layout is
not a public interface, so the pointer is checked before it is used: `SSL_CTX_get_options` on it
must give back exactly `context.options` and `SSL_CTX_get_num_tickets` exactly
`context.num_tickets` (both are read from the same SSL_CTX by the ssl module). Any mismatch, a
missing symbol or an interpreter other than CPython, and nothing is done: the context works as
before, only without the release (`release_buffers` returns False and the worker logs it once).
`VRYPT_TLS_RELEASE_BUFFERS=0` turns it off.
"""

from __future__ import annotations

import ctypes
import platform
import ssl
from typing import Any

SSL_CTRL_MODE = 33  # ssl.h: SSL_CTX_set_mode(ctx, m) is SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, m, NULL)
SSL_MODE_RELEASE_BUFFERS = 0x10


def _libssl() -> Any:
    import _ssl  # the extension module: its handle resolves the libssl it was linked against

    lib = ctypes.CDLL(_ssl.__file__)
    ctrl = lib.SSL_CTX_ctrl
    ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
    ctrl.restype = ctypes.c_long
    options = lib.SSL_CTX_get_options
    options.argtypes = (ctypes.c_void_p,)
    options.restype = ctypes.c_uint64
    tickets = lib.SSL_CTX_get_num_tickets
    tickets.argtypes = (ctypes.c_void_p,)
    tickets.restype = ctypes.c_size_t
    return ctrl, options, tickets


def _ssl_ctx(context: ssl.SSLContext, options: Any, tickets: Any) -> int | None:
    """The SSL_CTX pointer under `context`, or None when it cannot be confirmed."""
    if platform.python_implementation() != "CPython":
        return None
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        return None
    if options(pointer) != int(context.options) or tickets(pointer) != context.num_tickets:
        return None
    return pointer


def release_buffers(context: ssl.SSLContext) -> bool:
    """Set SSL_MODE_RELEASE_BUFFERS on `context` (module docstring). True when it was set."""
    try:
        ctrl, options, tickets = _libssl()
        pointer = _ssl_ctx(context, options, tickets)
        if pointer is None:
            return False
        mode = ctrl(pointer, SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, None)
    except (OSError, AttributeError, ValueError):
        return False
    return bool(mode & SSL_MODE_RELEASE_BUFFERS)

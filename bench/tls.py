"""TLS for the benchmark: a throwaway certificate per server run, and the clients' TLS contexts.

The certificate is made with the `openssl` command line (`openssl req -x509`) into the server's
temporary directory, so nothing is kept between runs: an ECDSA P-256 key (what trustme and most
public CAs hand out today; the handshake's signature is what a new connection pays for most),
valid for `127.0.0.1` and `localhost`, one day.

Clients do not verify it (the figures are the server's cost, not the PKI's), but they do check the
protocol they get: TLS 1.2 or 1.3, and for HTTP/2 the ALPN result.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


class TLSSetupError(RuntimeError):
    pass


def openssl_available() -> bool:
    return Path(OPENSSL).exists()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate and key for 127.0.0.1, in ``directory``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    argv = [
        OPENSSL, "req", "-x509",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
        "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise TLSSetupError(f"openssl req -x509 failed: {done.stderr.strip()}")
    key.chmod(0o600)
    return cert, key


def client_context(alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A client context that does not verify the (self-signed) certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx

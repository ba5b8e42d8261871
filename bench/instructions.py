"""User-space instructions per request, counted by valgrind's callgrind: a figure that does not
move with the machine's noise.

    python -m bench.instructions [--servers vrypt,nginx] [--rounds 200] [--connections 100]
    python -m bench.instructions --close [--rounds 50]   # a new connection per request
    python -m bench.instructions --close --keep DIR      # and keep the dumps: callgrind_annotate
    python -m bench.instructions --pipeline 16           # 16 pipelined requests per send (pipe16)
    python -m bench.instructions --proxy v1 [--close]    # vrypt with and without a PROXY header
    python -m bench.instructions --uwsgi --servers vrypt # --protocol uwsgi, as nginx loads it
    python -m bench.instructions --tls [--resume] --rounds 20 --connections 20
                                   # a new TLS connection per request: full (or resumed) handshake
    python -m bench.instructions --tls --keepalive       # keep-alive requests over TLS

Wall-clock CPU per request moves by ±10-30 % from run to run on a shared machine; the number of
instructions a server executes in user space per request does not (±2 % here), so a change to
the hot path can be judged in one run. It leaves out the kernel (about three quarters of a
keep-alive request's CPU, the same system calls for vrypt and nginx: docs/performance.md), and
an instruction is not a fixed time, so this complements `python -m bench`, it does not replace
it.

Each server runs under `valgrind --tool=callgrind --trace-children=yes` with one worker. A
client opens the connections, sends one request on each, reads every answer, and repeats: like
wrk with 100 connections, but counted exactly. After a warm-up the worker's counters are zeroed
(`callgrind_control -z`), the measured rounds run, and the counters are dumped (`-d`); while a
control command waits, single requests wake the worker so that valgrind takes it.
Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.proxyload import HEADERS
from bench.scenarios import Placement, available_cpus
from bench.servers import (
    BUILTIN,
    NGINX,
    NGINX_CONF,
    ServerSpec,
    nginx_available,
    peer_spec,
    running,
)
from bench.tlsdrive import TLSDriver, TLSKeepAliveDriver
from bench.transports import TRANSPORTS

WARMUP_ROUNDS = 30
TLS_WARMUP_ROUNDS = 3  # a handshake under callgrind takes tens of milliseconds
# `--proxy v1|v2`: what each new connection sends before its first request (bench.proxyload's
# header), to the servers measured a second time with the PROXY protocol on.
HEADER = b""
READY_TIMEOUT = 120.0  # a Python server starts in seconds under valgrind, not milliseconds


def request(port: int) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port


def drive_closing(port: int, connections: int, rounds: int, timeout: float = 60.0) -> None:
    """`rounds` times: `connections` new connections, one `Connection: close` request on each,
    every answer read up to the server's close (the bench's `close` scenario, counted)."""
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port
    for _ in range(rounds):
        socks = [
            socket.create_connection(("127.0.0.1", port), timeout=timeout)
            for _ in range(connections)
        ]
        try:
            for sock in socks:
                sock.sendall(HEADER + req)
            for sock in socks:
                buf = b""
                while chunk := sock.recv(4096):
                    buf += chunk
                if not buf.endswith(b"Vrypt"):
                    raise RuntimeError("an answer without its body before the close")
        finally:
            for sock in socks:
                sock.close()


def uwsgi_packet(remote_port: int) -> bytes:
    """A GET as nginx's `uwsgi_pass` with its `uwsgi_params` sends it (the vars nginx fills in
    for `GET /` from a client on `remote_port`)."""
    pairs = (
        ("QUERY_STRING", ""), ("REQUEST_METHOD", "GET"), ("CONTENT_TYPE", ""),
        ("CONTENT_LENGTH", ""), ("REQUEST_URI", "/"), ("PATH_INFO", "/"),
        ("DOCUMENT_ROOT", "/usr/share/nginx/html"), ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_SCHEME", "http"), ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", str(remote_port)), ("SERVER_PORT", "8080"), ("SERVER_NAME", ""),
        ("HTTP_HOST", "127.0.0.1:8080"),
    )  # fmt: skip
    block = b"".join(
        len(k).to_bytes(2, "little") + k.encode() + len(v).to_bytes(2, "little") + v.encode()
        for k, v in pairs
    )
    return b"\0" + len(block).to_bytes(2, "little") + b"\0" + block


def drive_uwsgi(port: int, connections: int, rounds: int, timeout: float = 60.0) -> None:
    """As nginx's `uwsgi_pass` does: a new connection per request, one packet, the answer read
    (Content-Length), then the close from our side (nginx never reuses a uwsgi connection).
    The packets differ in REMOTE_PORT only, one per connection slot, as wrk's 100 connections
    through nginx make them."""
    for _ in range(rounds):
        socks = [
            socket.create_connection(("127.0.0.1", port), timeout=timeout)
            for _ in range(connections)
        ]
        try:
            for index, sock in enumerate(socks):
                sock.sendall(uwsgi_packet(40000 + index))
            for sock in socks:
                buf = b""
                while not buf.endswith(b"\r\n\r\nVrypt"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise RuntimeError("closed before the answer")
                    buf += chunk
        finally:
            for sock in socks:
                sock.close()


def drive(
    port: int, connections: int, rounds: int, timeout: float = 60.0, depth: int = 1
) -> None:
    """`rounds` times: `depth` requests in one send on every connection (pipelined when more
    than one), then every answer read in full (each answer's body is `Vrypt`). Raises if a
    server closes or stalls."""
    req = request(port) * depth
    ends = b"\r\n\r\nVrypt"
    socks = [
        socket.create_connection(("127.0.0.1", port), timeout=timeout) for _ in range(connections)
    ]
    first = HEADER  # once per connection, with its first request
    try:
        for _ in range(rounds):
            for sock in socks:
                sock.sendall(first + req)
            first = b""
            for sock in socks:
                buf = b""
                while not (buf.endswith(b"Vrypt") and buf.count(ends) == depth):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError("the server closed a keep-alive connection")
                    buf += chunk
    finally:
        for sock in socks:
            sock.close()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def worker_pid(leader: int) -> int:
    """The process that serves: the leader's one child (gunicorn's worker), or the leader
    itself when it has none (nginx without its master). Called once the server answers."""
    kids = children(leader)
    return kids[0] if kids else leader


def _nginx_single_process(port: int, workers: int, tmp: Path, log: bool = False) -> list[str]:
    """nginx as one process (`master_process off`): started as root, nginx's workers switch to
    an unprivileged user, which can no longer take callgrind_control's commands or write its
    counts into our temporary directory; one process that stays who it was can. With `log`,
    it logs to a file in its default `combined` format (the nginx-log server)."""
    conf = tmp / "nginx.conf"
    access_log = f"{tmp}/access.log combined" if log else "off"
    text = NGINX_CONF.format(workers=workers, tmp=tmp, port=port, access_log=access_log)
    conf.write_text(text.replace("master_process on;", "master_process off;"))
    return [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]


def _nginx_single_process_log(port: int, workers: int, tmp: Path) -> list[str]:
    return _nginx_single_process(port, workers, tmp, log=True)


def total_instructions(dump: Path) -> int:
    match = re.search(r"^(?:totals|summary):\s*(\d+)", dump.read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError(f"no totals in {dump}")
    return int(match[1])


def callgrind_control(option: str, pid: int, port: int, timeout: float = 60.0) -> None:
    """Run `callgrind_control OPTION PID`. Valgrind takes the command when the worker runs code:
    a worker that sleeps in epoll_wait with no timer (nginx's) never would, so one request at a
    time pokes it until the command is done (at most one request's instructions land on the
    wrong side of the zero or the dump)."""
    ctl = subprocess.Popen(
        ["callgrind_control", option, str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    try:
        while ctl.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"callgrind_control {option} {pid}: no answer in {timeout} s")
            drive(port, 1, 1)
            time.sleep(0.05)
    finally:
        if ctl.poll() is None:
            ctl.kill()
        ctl.wait()
    if ctl.returncode != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed ({ctl.returncode})")


class UwsgiReadiness:
    """For `running`: the server's own command, and readiness asked with a uwsgi packet."""

    @staticmethod
    def build(spec: ServerSpec, port: int, workers: int, tmp: Path) -> list[str]:
        return spec.build(port, workers, tmp)

    @staticmethod
    def probe(port: int, timeout: float = 1.0) -> bytes | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                sock.sendall(uwsgi_packet(1))
                line = sock.recv(4096).split(b"\r\n", 1)[0]
                return line or None
        except OSError:
            return None


def with_flags(spec: ServerSpec, *flags: str) -> ServerSpec:
    def build(port: int, workers: int, tmp: Path) -> list[str]:
        return [*spec.build(port, workers, tmp), *flags]

    return dataclasses.replace(spec, build=build)


def under_callgrind(spec: ServerSpec, out_dir: Path, transport: Any = None) -> ServerSpec:
    """`spec` under callgrind; with `transport` (bench/transports.py: TLS), its command for it."""

    def build(port: int, workers: int, tmp: Path) -> list[str]:
        command = (
            transport.build(spec, port, workers, tmp)
            if transport is not None
            else spec.build(port, workers, tmp)
        )
        return [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={out_dir}/callgrind.%p",
            *command,
        ]

    return dataclasses.replace(spec, build=build)


@dataclasses.dataclass(frozen=True)
class _ProbeOnly:
    """A transport's probe, for `running`, around a command already made for it."""

    transport: Any

    def build(self, spec: ServerSpec, port: int, workers: int, tmp: Path) -> list[str]:
        return spec.build(port, workers, tmp)

    def probe(self, port: int, timeout: float = 1.0) -> bytes | None:
        return self.transport.probe(port, timeout)


def measure(
    spec: ServerSpec,
    connections: int,
    rounds: int,
    cpus: tuple[int, ...],
    keep: Path | None = None,
    depth: int = 1,
    uwsgi: bool = False,
    transport: Any = None,
    warmup: int = WARMUP_ROUNDS,
) -> float:
    """User-space instructions per request of the server's worker; with `keep`, its dump is
    copied there as `callgrind.NAME`, for `callgrind_annotate` (where the instructions go)."""
    with tempfile.TemporaryDirectory(prefix=f"callgrind-{spec.name}-") as tmpdir:
        out_dir = Path(tmpdir)
        where = Placement(cpus[:1], cpus[1:] or cpus, 1)
        readiness: Any = UwsgiReadiness() if uwsgi else None
        if transport is not None:
            readiness = _ProbeOnly(transport)
        served = under_callgrind(spec, out_dir, transport)
        with running(served, where, READY_TIMEOUT, readiness) as server:
            worker = worker_pid(server.proc.pid)
            drive(server.port, connections, warmup)
            callgrind_control("-z", worker, server.port)
            drive(server.port, connections, rounds)
            before = set(out_dir.glob(f"callgrind.{worker}.*"))
            callgrind_control("-d", worker, server.port)
            deadline = time.monotonic() + 30
            while not (dumps := set(out_dir.glob(f"callgrind.{worker}.*")) - before):
                if time.monotonic() > deadline:
                    raise RuntimeError("callgrind wrote no dump")
                time.sleep(0.1)
            time.sleep(0.5)  # the dump is written by the worker: let it finish
            dump = max(dumps, key=os.path.getmtime)
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dump, keep / f"callgrind.{spec.name}")
            return total_instructions(dump) / (rounds * connections * depth)


def with_proxy(spec: ServerSpec, version: str) -> ServerSpec:
    """The server with the PROXY protocol on: gunicorn `--proxy-protocol auto`, nginx `listen
    ... proxy_protocol` (what bench.transports' `proxy` transport does)."""
    proxy = TRANSPORTS["proxy"]

    def build(port: int, workers: int, tmp: Path) -> list[str]:
        return proxy.build(spec, port, workers, tmp)

    return dataclasses.replace(spec, name=f"{spec.name}+proxy-{version}", build=build)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--servers", default="vrypt,nginx", help="comma-separated (default vrypt,nginx)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND")
    p.add_argument("--rounds", type=int, default=200, help="measured rounds (default 200)")
    p.add_argument("--connections", type=int, default=100, help="connections (default 100)")
    p.add_argument(
        "--close", action="store_true", help="a new connection per request (`Connection: close`)"
    )
    p.add_argument(
        "--uwsgi",
        action="store_true",
        help="vrypt with --protocol uwsgi, loaded as nginx's uwsgi_pass does (a new connection, "
        "one packet, the close from the client); compare with --close",
    )
    p.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep each server's dump as DIR/callgrind.NAME (read it with callgrind_annotate)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=1,
        metavar="N",
        help="N requests per send on each connection, pipelined (default 1)",
    )
    p.add_argument(
        "--proxy",
        choices=("v1", "v2"),
        help="measure each server again with the PROXY protocol on and this header on every "
        "new connection (gunicorn --proxy-protocol auto, nginx listen ... proxy_protocol)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="a new TLS connection per request, full handshake (bench/tlsdrive.py)",
    )
    p.add_argument(
        "--resume", action="store_true", help="with --tls: resumed handshakes (session tickets)"
    )
    p.add_argument(
        "--keepalive",
        action="store_true",
        help="with --tls: keep-alive requests on TLS connections made before the count",
    )
    args = p.parse_args(argv)
    global drive
    transport = None
    warmup = WARMUP_ROUNDS
    if args.tls:
        transport = TRANSPORTS["tls"]
        warmup = TLS_WARMUP_ROUNDS
    elif args.uwsgi:
        drive = drive_uwsgi  # type: ignore[assignment]  # callgrind_control's pokes too
    elif args.close:
        drive = drive_closing  # type: ignore[assignment]  # callgrind_control's pokes too
    elif args.pipeline > 1:
        drive = functools.partial(drive, depth=args.pipeline)  # type: ignore[assignment]
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install valgrind", file=sys.stderr)
            return 2
    specs = [BUILTIN[name] for name in args.servers.split(",") if name]
    single = {"nginx": _nginx_single_process, "nginx-log": _nginx_single_process_log}
    specs = [dataclasses.replace(s, build=single[s.name]) if s.name in single else s for s in specs]
    specs = [s for s in specs if s.name not in single or nginx_available()]
    specs += [peer_spec(arg) for arg in args.peer]
    if args.uwsgi:  # the gunicorn servers speak uwsgi; nginx cannot be the server here
        specs = [with_flags(s, "--protocol", "uwsgi") for s in specs if s.name not in single]
    results: dict[str, float] = {}
    runs = [(spec, b"") for spec in specs]
    if args.proxy:  # side by side: each server without, then with, the header
        header = HEADERS[args.proxy]
        # (gunicorn only: its probes and callgrind_control's pokes go without a header, which
        # `--proxy-protocol` allows and nginx's `proxy_protocol` refuses)
        runs += [(with_proxy(s, args.proxy), header) for s in specs if s.name not in single]
    global HEADER
    for spec, header in runs:
        print(f"{spec.name}: measuring under callgrind ...", file=sys.stderr, flush=True)
        HEADER = header
        if args.tls and args.keepalive:
            drive = TLSKeepAliveDriver()  # type: ignore[assignment]
        elif args.tls:  # a client per server: no session offered to another server
            drive = tls_driver = TLSDriver(args.resume)  # type: ignore[assignment]
        results[spec.name] = measure(
            spec, args.connections, args.rounds, available_cpus(), args.keep, args.pipeline,
            args.uwsgi, transport, warmup,
        )  # fmt: skip
        if args.tls and not args.keepalive:
            print(
                f"{spec.name}: {tls_driver.resumed} of {tls_driver.handshakes} handshakes resumed",
                file=sys.stderr,
            )
    reference = results.get("nginx")
    print("| server | user-space instructions per request | vs nginx |")
    print("|---|---|---|")
    for name, value in results.items():
        ratio = f"{value / reference:.2f}x" if reference else "-"
        print(f"| {name} | {value:,.0f} | {ratio} |")
    kind = "new connections (`Connection: close`)" if args.close else "keep-alive connections"
    if args.uwsgi:
        kind = "new connections, one uwsgi packet each (as nginx's uwsgi_pass)"
    if args.tls:
        kind = "new TLS connections, " + ("resumed" if args.resume else "full") + " handshakes"
        if args.keepalive:
            kind = "keep-alive TLS connections"
    each = "one request"
    if args.pipeline > 1 and not args.close:
        each = f"{args.pipeline} pipelined requests"
    print(
        f"\n{args.connections} {kind}, {args.rounds} measured rounds of {each} "
        f"per connection, after {warmup} warm-up rounds."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HTTP/2 attacks against each server, side by side in one run (issue 25), over h2c and TLS.

    python -m bench.h2_hostile [--servers vrypt,nginx] [--transports h2c,tls-h2]
                               [--attacks nonreaders,wu-held,references,...] [--seconds 8]
                               [--connections 1000] [--peer NAME=COMMAND]

Each attack runs against each server with its default settings (vrypt: conf/gunicorn.conf.py,
nginx: bench/servers.py's configuration; bench/transports.py adds h2c or TLS with ALPN h2), one
worker pinned to the first CPU; the attacker and a bystander (a normal HTTP/2 client doing
sequential GETs on one connection) run unpinned. Reported: when the server closed the
attacker's connection ("open" if it still was after --seconds) and the GOAWAY code it sent, the
worker's CPU time over the attack, the bystander's p99; for `nonreaders` (--connections clients
that send HEAD or GET requests until the kernel takes no more and never read): the worker's RSS
added and the bystander's p99 while they hold. The attacks are in bench/h2_attacks.py;
`big-reads` (not in the default list) is a legitimate client whose every write is 5,000
requests: the bystander's p99 beside it shows whether one read's answers hold the loop.
"""

from __future__ import annotations

import argparse
import time

from bench.h2_attacks import FLOODS, Bystander, non_readers
from bench.hostile import cpu_s, rss_kb, workers
from bench.scenarios import Placement, available_cpus
from bench.servers import BUILTIN, RunningServer, peer_spec, running
from bench.transports import TRANSPORTS

ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 11: "ENHANCE_YOUR_CALM", 2: "INTERNAL_ERROR"}


def run_flood(server: RunningServer, tls: bool, attack: str, seconds: float) -> dict[str, str]:
    pids = workers(server)
    cpu = cpu_s(pids)
    started = time.monotonic()
    with Bystander(server.port, tls) as bystander:
        time.sleep(0.2)
        outcome = FLOODS[attack](server.port, tls, seconds)
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    used = cpu_s(pids) - cpu
    closed = (
        "open"
        if outcome.closed_after is None
        else f"{outcome.closed_after:.2f} s"
        + (f" ({ERRORS.get(outcome.goaway, outcome.goaway)})" if outcome.goaway is not None else "")
    )
    return {
        "closed after": closed,
        "frames sent": str(outcome.sent_frames),
        "worker CPU": f"{used:.2f} s in {elapsed:.1f} s",
        "bystander p99": f"{bystander.p99():.1f} ms" + (" (failed)" if bystander.failed else ""),
    }


def run_nonreaders(
    server: RunningServer, tls: bool, connections: int, method: bytes = b"HEAD"
) -> dict[str, str]:
    pids = workers(server)
    with Bystander(server.port, tls) as warm:
        time.sleep(0.3)
    del warm
    before, cpu = rss_kb(pids), cpu_s(pids)
    socks = non_readers(server.port, tls, connections, method)
    time.sleep(1.0)
    held = rss_kb(pids)
    with Bystander(server.port, tls) as bystander:
        time.sleep(1.0)
    used = cpu_s(pids) - cpu
    for sock in socks:
        sock.close()
    return {
        "RSS added": f"{(held - before) / 1024:.1f} MB",
        "worker CPU": f"{used:.2f} s",
        "bystander p99": f"{bystander.p99():.1f} ms" + (" (failed)" if bystander.failed else ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.h2_hostile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--servers", default="vrypt,nginx")
    p.add_argument("--transports", default="h2c,tls-h2")
    p.add_argument(
        "--attacks",
        default=",".join(
            ["nonreaders", "nonreaders-get", *(a for a in FLOODS if a != "big-reads")]
        ),
    )
    p.add_argument("--seconds", type=float, default=8.0, help="how long each flood lasts")
    p.add_argument("--connections", type=int, default=1000, help="for nonreaders")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another server, run by sh with {port}, {workers}, {certfile} and {keyfile} filled "
        "in; it names its own HTTP/2 and TLS flags (bench/transports.py)",
    )
    args = p.parse_args()
    specs = dict(BUILTIN)
    specs.update((spec.name, spec) for spec in map(peer_spec, args.peer))
    cpus = available_cpus()
    where = Placement(cpus[:1], cpus[1:] or cpus, 1)
    rows = []
    for attack in args.attacks.split(","):
        for transport_name in args.transports.split(","):
            transport = TRANSPORTS[transport_name]
            for name in args.servers.split(","):
                with running(specs[name], where, transport=transport) as server:
                    if attack.startswith("nonreaders"):
                        method = b"GET" if attack == "nonreaders-get" else b"HEAD"
                        figures = run_nonreaders(server, transport.tls, args.connections, method)
                    else:
                        figures = run_flood(server, transport.tls, attack, args.seconds)
                print(f"{attack} {transport_name} {name}: {figures}", flush=True)
                rows.append((attack, transport_name, name, figures))
    print("\n| attack | transport | server | figures |\n|---|---|---|---|")
    for attack, transport_name, name, figures in rows:
        text = "; ".join(f"{k}: {v}" for k, v in figures.items())
        print(f"| {attack} | {transport_name} | {name} | {text} |")


if __name__ == "__main__":
    main()

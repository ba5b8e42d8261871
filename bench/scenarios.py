"""The load scenarios: how many connections, pipelined or not, keep-alive or not, on which cores."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    connections: int
    pipeline: int = 1  # requests written at once per connection (wrk Lua script when > 1)
    close: bool = False  # send `Connection: close`: a new connection per request
    all_cores: bool = False  # server on every core (one worker per core), load shares them


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("ka100", "keep-alive, 100 connections, 1 core", 100),
        Scenario("ka1000", "keep-alive, 1000 connections, 1 core", 1000),
        Scenario("pipe16", "pipelined x16, 100 connections, 1 core", 100, pipeline=16),
        Scenario("close", "new connection per request, 100 connections, 1 core", 100, close=True),
        Scenario("ka100-all", "keep-alive, 100 connections, all cores", 100, all_cores=True),
        Scenario(
            "pipe16-all",
            "pipelined x16, 100 connections, all cores",
            100,
            pipeline=16,
            all_cores=True,
        ),
    )
}
DEFAULT_SCENARIOS = ("ka100", "ka1000", "pipe16", "close", "ka100-all")
QUICK_SCENARIOS = ("ka100",)


@dataclass(frozen=True)
class Placement:
    """Which CPUs the server and the load generator run on, and how many server workers."""

    server_cpus: tuple[int, ...]
    load_cpus: tuple[int, ...]
    workers: int

    @property
    def shared(self) -> bool:
        return bool(set(self.server_cpus) & set(self.load_cpus))


def available_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def placement(scenario: Scenario, cpus: tuple[int, ...]) -> Placement:
    """One core for the server and the rest for wrk; with ``all_cores`` both get every core."""
    if scenario.all_cores:
        return Placement(cpus, cpus, len(cpus))
    if len(cpus) == 1:
        return Placement(cpus, cpus, 1)
    return Placement(cpus[:1], cpus[1:], 1)


def cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


# --- HTTP/2 and TLS scenarios (issue 11): opt-in (not in DEFAULT_SCENARIOS); their transports,
# load tools and measurement are in bench/transports.py, bench/h2load.py, bench/tlsload.py and
# bench/proto.py, which documents each.
@dataclass(frozen=True)
class ProtoScenario(Scenario):
    transport: str = "plain"  # a key of bench.transports.TRANSPORTS, or "plain"
    tool: str = "wrk"  # wrk | h2load | tlsload | idle
    streams: int = 1  # h2load -m
    resume: bool = False  # tlsload --resume
    header: str = ""  # proxyload --header (v1, v2): a PROXY header first on each connection


PROTO_SCENARIOS: dict[str, ProtoScenario] = {
    s.name: s
    for s in (
        ProtoScenario(
            "h2c", "h2c (prior knowledge), 100 connections x 10 streams, h2load, 1 core", 100,
            transport="h2c", tool="h2load", streams=10,
        ),
        ProtoScenario(
            "h2-tls", "HTTP/2 over TLS (ALPN h2), 100 connections x 10 streams, h2load, 1 core",
            100, transport="tls-h2", tool="h2load", streams=10,
        ),
        ProtoScenario(
            "tls-ka100", "TLS HTTP/1.1 keep-alive, 100 connections, wrk, 1 core", 100,
            transport="tls",
        ),
        ProtoScenario(
            "tls-new", "new TLS connection per request, full handshake, 4 clients, 1 core", 4,
            close=True, transport="tls", tool="tlsload",
        ),
        ProtoScenario(
            "tls-resume", "new TLS connection per request, resumed session, 4 clients, 1 core",
            4, close=True, transport="tls", tool="tlsload", resume=True,
        ),
        ProtoScenario(
            "idle-h1", "memory per idle plain HTTP/1.1 connection, 1000 connections", 1000,
            transport="plain", tool="idle",
        ),
        ProtoScenario(
            "idle-tls", "memory per idle TLS HTTP/1.1 connection, 1000 connections", 1000,
            transport="tls", tool="idle",
        ),
        ProtoScenario(
            "idle-h2", "memory per idle h2c connection, 1000 connections", 1000,
            transport="h2c", tool="idle",
        ),
        ProtoScenario(
            "idle-h2-tls", "memory per idle HTTP/2-over-TLS connection, 1000 connections", 1000,
            transport="tls-h2", tool="idle",
        ),
        # PROXY protocol (issue 22): the same client with and without a header, so their ratio
        # is the header's cost on a new connection; and wrk keep-alive with the setting on.
        ProtoScenario(
            "new-py", "new connection per request, bench.proxyload, 4 clients, 1 core", 4,
            close=True, transport="plain", tool="proxyload",
        ),
        ProtoScenario(
            "proxy-v1-new", "new connection per request with a PROXY v1 header, 4 clients, 1 core",
            4, close=True, transport="proxy", tool="proxyload", header="v1",
        ),
        ProtoScenario(
            "proxy-v2-new", "new connection per request with a PROXY v2 header, 4 clients, 1 core",
            4, close=True, transport="proxy", tool="proxyload", header="v2",
        ),
        ProtoScenario(
            "proxy-ka100", "keep-alive, proxy_protocol on, no header, 100 connections, wrk, 1 core",
            100, transport="proxy",
        ),
        # nginx in front (issue 22): wrk keep-alive to nginx, nginx to the server by uwsgi_pass
        # or proxy_pass; both on the server's core (bench/transports.py, FrontTransport).
        ProtoScenario(
            "nginx-uwsgi", "nginx uwsgi_pass in front, wrk keep-alive 100 connections, 1 core",
            100, transport="nginx-uwsgi",
        ),
        ProtoScenario(
            "nginx-proxy", "nginx proxy_pass (HTTP/1.0, an upstream connection per request) "
            "in front, wrk keep-alive 100 connections, 1 core", 100, transport="nginx-proxy",
        ),
        ProtoScenario(
            "nginx-proxy-ka", "nginx proxy_pass (HTTP/1.1, upstream keepalive) in front, wrk "
            "keep-alive 100 connections, 1 core", 100, transport="nginx-proxy-ka",
        ),
    )
}  # fmt: skip
# HTTP/3 (issue 23): aioquic's client in processes on the load core (bench/h3load.py).
PROTO_SCENARIOS["h3"] = ProtoScenario(
    "h3",
    "HTTP/3, 2 connections x 20 streams, aioquic client processes, 1 core",
    2,
    transport="h3",
    tool="h3load",
    streams=20,
)
SCENARIOS.update(PROTO_SCENARIOS)
# --- end of HTTP/2 and TLS scenarios
